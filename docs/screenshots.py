"""Screenshots of the MLflow UI for the README's walkthrough, from real runs in a store.

    .venv/bin/python docs/screenshots.py SEARCH_RUN_ID SEARCH_RUN_ID COMPARISON_RUN_ID \
        [--set tracking.uri=sqlite:///runs/mlflow.db]

It starts `petra ui`'s server on a free loopback port, opens headless Chromium (Debian's
chromium and chromedriver, through selenium) and writes docs/ui-fronts.png (petra's fronts view
of the experiment as a table: model training, durations, the objectives first),
docs/ui-fronts-charts.png (the same view charted), docs/ui-search-front.png (a search's
front.html in the artifact preview) and docs/ui-compare.png (the comparison run's
compare.html).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1500,1000")


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_text(driver, texts, timeout_s: float = 90.0) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(t in driver.find_element(By.TAG_NAME, "body").text for t in texts):
            return
        time.sleep(0.5)
    raise SystemExit(f"never saw {texts} on {driver.current_url}")


def close_assistant(driver) -> None:
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        button.click()
        time.sleep(1)


def preview(driver, url: str, run, name: str, out: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts"
               "?workflowType=machine_learning")
    wait_text(driver, [name])
    close_assistant(driver)
    driver.find_element(By.XPATH, f"//*[normalize-space(text())='{name}']").click()
    time.sleep(4)
    driver.save_screenshot(str(out))


def main() -> None:
    import tempfile

    from mlflow.tracking import MlflowClient

    from petra.tracking.runs import split_store
    from petra.tracking.ui import experiments, free_port, start, stop, wait_ready
    from petra.tracking.views import fronts_url

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("search_a")
    parser.add_argument("search_b")
    parser.add_argument("comparison")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    uri, _ = split_store(args.overrides)
    client = MlflowClient(uri)
    a, b, cmp = (client.get_run(r) for r in (args.search_a, args.search_b, args.comparison))
    port = free_port()
    server = start(uri, port)
    url = f"http://127.0.0.1:{port}"
    docs = ROOT / "docs"
    try:
        assert wait_ready(url), "the MLflow UI did not start"
        with tempfile.TemporaryDirectory() as profile:
            driver = browser(Path(profile))
            try:
                experiments(uri)  # an experiment logged by an older petra gets the view
                experiment = a.info.experiment_id
                charts = fronts_url(url, experiment)
                driver.get(charts.replace("compareRunsMode=CHART", "compareRunsMode=TABLE"))
                wait_text(driver, ["Duration", "val_accuracy", "matching runs"])
                close_assistant(driver)
                time.sleep(2)
                driver.save_screenshot(str(docs / "ui-fronts.png"))
                driver.get(charts)
                wait_text(driver, ["size_ratio vs. val_accuracy"])
                close_assistant(driver)
                time.sleep(3)
                driver.save_screenshot(str(docs / "ui-fronts-charts.png"))
                preview(driver, url, a, "front.html", docs / "ui-search-front.png")
                preview(driver, url, cmp, "compare.html", docs / "ui-compare.png")
            finally:
                driver.quit()
    finally:
        stop(server)
    print("wrote docs/ui-fronts.png, docs/ui-fronts-charts.png, docs/ui-search-front.png, "
          "docs/ui-compare.png")


if __name__ == "__main__":
    main()
