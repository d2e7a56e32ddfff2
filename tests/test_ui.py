"""`petra ui` on loopback, and the fronts of two searches seen in a real headless Chromium.

The browser part drives Debian's chromium through its chromedriver with selenium. `make test`
installs both (apt, as root) when they are missing; without them the browser test is skipped,
and says so in the summary.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ON_TWO_SEARCHES, benchmark, stop_group
from tests.test_executor import LOOPBACK, listeners_of

pytestmark = [pytest.mark.integration, ON_TWO_SEARCHES]

faults = benchmark("faults")

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "runs" / "screenshots"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--window-size=1500,1000")


@pytest.fixture(scope="module")
def ui(two_searches):
    """`petra ui` on a free loopback port over the two searches' store."""
    from petra.tracking.ui import free_port, wait_ready

    folder, uri, run_ids = two_searches
    port = free_port()
    log = open(folder / "ui.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "petra.cli", "ui", "--port", str(port),
                             "--set", f"tracking.uri={uri}"], cwd=folder, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_ready(url, timeout_s=120, alive=lambda: proc.poll() is None), (
            (folder / "ui.log").read_text()[-3000:])
        deadline = time.monotonic() + 30  # the guide is printed once the server answers
        while "tags.petra.on_front" not in (folder / "ui.log").read_text():
            assert time.monotonic() < deadline, (folder / "ui.log").read_text()
            time.sleep(0.2)
        yield url, proc, folder, uri, run_ids
    finally:
        stop_group(proc, signal.SIGINT)
        log.close()


def test_petra_ui_answers_on_loopback_only_and_prints_the_filter(ui):
    url, proc, folder, _uri, _ids = ui
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
    text = (folder / "ui.log").read_text()
    assert url in text and 'tags.petra.on_front = "true"' in text
    assert "experiment 'fronts'" in text
    if shutil.which("ss"):
        tree = faults.process_tree(proc.pid)
        assert len(tree) > 1, "expected petra ui to have started the MLflow server"
        addresses = listeners_of(tree)
        assert addresses, "expected the MLflow server to listen"
        assert all(a.startswith(LOOPBACK) for a in addresses), addresses


def chrome(tmp_path: Path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("BROWSER TEST SKIPPED: Debian's chromium and chromium-driver are not "
                    "installed (make test installs them with apt when run as root)")
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for_text(driver, texts, timeout_s: float = 90.0) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"never saw {texts} on {driver.current_url}; the page said:\n"
                         f"{body[:3000]}")


def close_assistant(driver) -> None:
    """Close MLflow's assistant panel, when it opens, so that it does not cover the page."""
    from selenium.webdriver.common.by import By

    time.sleep(2)
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        with contextlib.suppress(Exception):
            button.click()


def test_the_searches_and_their_fronts_are_visible_in_chromium(ui, tmp_path):
    from mlflow.tracking import MlflowClient

    url, _proc, _folder, uri, run_ids = ui
    client = MlflowClient(uri)
    runs = [client.get_run(r) for r in run_ids]
    exp_id = runs[0].info.experiment_id
    from selenium.webdriver.common.by import By

    from petra.tracking.ui import FILTERS, runs_url
    from petra.tracking.views import fronts_url

    driver = chrome(tmp_path)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        # the experiment's runs table, filtered to the fronts: both searches are listed
        driver.get(runs_url(url, exp_id, FILTERS[0]))
        wait_for_text(driver, [r.info.run_name for r in runs])
        shot = SCREENSHOTS / "ui-experiment.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        # petra's fronts view, as a table: model training, the fronts only, each candidate's
        # real duration (its evaluation's, not the milliseconds it took to log it)
        front = client.search_runs([exp_id], filter_string=FILTERS[0])
        for c in front:
            seconds = (c.info.end_time - c.info.start_time) / 1000
            assert seconds >= 0.9 * c.data.metrics["eval_time_s"], c.info.run_name
            assert seconds > 0.1, c.info.run_name  # logged after the fact, it would be ~20 ms
        driver.get(fronts_url(url, exp_id).replace("compareRunsMode=CHART",
                                                    "compareRunsMode=TABLE"))
        close_assistant(driver)
        body = wait_for_text(driver, ["Model registry", "Duration", "val_accuracy",
                                      "size_ratio", f"{len(front)} matching runs"])
        for c in front:  # as MLflow writes a duration under a minute: 1.3s (either rounding)
            tenths = (c.info.end_time - c.info.start_time) / 100
            shown = {f"{math.floor(tenths) / 10:.1f}s", f"{math.ceil(tenths) / 10:.1f}s"}
            assert any(text in body.split() for text in shown), (shown, body[-3000:])
        assert "Evaluation runs" not in body and "Prompts" not in body  # not the GenAI sidebar
        # the evaluation's duration, then the objectives, left to right, and no other metric
        x = {h.text: h.location["x"]
             for h in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]") if h.text}
        order = ["Duration", "val_accuracy", "test_accuracy", "size_ratio", "latency_ratio",
                 "artifact_bytes"]
        assert sorted(order, key=lambda h: x.get(h, -1)) == order, x
        assert not {"eval_time_s", "peak_rss_mb", "macs", "params"} & set(x), x
        driver.save_screenshot(str(SCREENSHOTS / "ui-fronts-table.png"))

        # ... and charted: size and latency against accuracy, one point per front member
        driver.get(fronts_url(url, exp_id))
        close_assistant(driver)
        wait_for_text(driver, ["petra: the fronts", "size_ratio vs. val_accuracy",
                               "latency_ratio vs. val_accuracy"])
        time.sleep(2)
        driver.save_screenshot(str(SCREENSHOTS / "ui-fronts-charts.png"))

        # a search run's artifacts: the front files, and its front.html rendered in the preview
        driver.get(f"{url}/#/experiments/{exp_id}/runs/{run_ids[0]}/artifacts"
                   "?workflowType=machine_learning")
        wait_for_text(driver, ["front.html", "front.png", "fronts", "config.yaml"])
        driver.find_element(By.XPATH, "//*[normalize-space(text())='front.html']").click()
        deadline = time.monotonic() + 60
        while not driver.find_elements(By.TAG_NAME, "iframe"):
            assert time.monotonic() < deadline, "the front.html preview never appeared"
            time.sleep(0.5)
        time.sleep(2)
        shot = SCREENSHOTS / "ui-search-front.png"
        driver.save_screenshot(str(shot))
        driver.switch_to.frame(driver.find_elements(By.TAG_NAME, "iframe")[0])
        body = wait_for_text(driver, ["petra front", "recipe"])
        # plotly drew the page: one figure, its 3-D view among its canvases
        assert len(driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) == 1
        assert driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .gl-container canvas")
        front = client.search_runs([exp_id], filter_string=(
            f"tags.mlflow.parentRunId = '{run_ids[0]}' and tags.petra.on_front = 'true'"))
        assert front and all(c.info.run_id[:8] in body for c in front)  # its front's table
        driver.switch_to.default_content()
        print(f"screenshots: {SCREENSHOTS}")
    finally:
        driver.quit()


@pytest.mark.slow  # a server started and killed, each signal (~25 s): in make test's second run
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_killed_petra_ui_stops_its_whole_server(two_searches, sig):
    """`kill` (SIGTERM) or a closed terminal (SIGHUP) sent to `petra ui` alone, not to its
    group: the MLflow server, its workers and its consumers must all go, and the port with
    them."""
    from petra.tracking.ui import free_port, port_free, wait_ready

    folder, uri, _ids = two_searches
    port = free_port()
    log = folder / f"ui-{sig.name}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "petra.cli", "ui", "--port", str(port),
                                 "--set", f"tracking.uri={uri}"], cwd=folder, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ))
        try:
            assert wait_ready(f"http://127.0.0.1:{port}", timeout_s=120,
                              alive=lambda: proc.poll() is None), log.read_text()[-3000:]
            tree = faults.process_tree(proc.pid)
            assert len(tree) > 1, "expected petra ui to have started the MLflow server"
            proc.send_signal(sig)  # to petra ui only
            assert proc.wait(timeout=60) == 128 + sig, log.read_text()[-3000:]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (alive(tree) or not port_free(port)):
                time.sleep(0.2)
            assert not alive(tree), f"left running: {sorted(alive(tree))}"
            assert port_free(port)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_signal_that_a_library_swallows_still_ends_petra_ui():
    """The handler raises where the main thread is; inside a weakref callback or a library's
    ``except BaseException`` that raise is lost (a CI run hung 60 s on it). The signal must
    still end ``petra ui`` at its next poll, and only once."""
    from petra.tracking.ui import Signalled, ending_signals

    before = signal.getsignal(signal.SIGHUP)  # SIG_IGN under nohup, SIG_DFL otherwise
    with ending_signals() as signals:
        signals.check()  # nothing fired yet
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)  # the handler runs here, at the latest
        except BaseException:  # noqa: BLE001 - what a careless library does
            pass
        with pytest.raises(Signalled, match="SIGHUP"):
            signals.check()
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not interrupt the cleanup
        time.sleep(0.2)
        assert signals.fired == [signal.SIGHUP]
    assert signal.getsignal(signal.SIGHUP) == before


def test_a_port_is_free_once_its_server_has_gone_even_with_connections_in_time_wait():
    """A stopped server leaves its closed connections in TIME_WAIT for a minute; a new server
    (SO_REUSEADDR, as uvicorn binds) can listen at once, so `petra ui` must call the port free.
    A live listener keeps it in use."""
    import socket

    from petra.tracking.ui import HOST, port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((HOST, 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection((HOST, port))
    accepted, _ = server.accept()
    assert not port_free(port)
    accepted.close()  # the server closes first: its side waits in TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    assert port_free(port)


def alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` still running (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state != "Z":
            out.add(pid)
    return out
