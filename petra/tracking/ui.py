"""``petra ui``: the MLflow UI over petra's store, listening on 127.0.0.1 only.

It runs ``mlflow server`` on the configured store in a process group of its own, waits until it
answers, prints the URL of each experiment and the filters to paste, and stops the whole group
however ``petra ui`` ends: Ctrl-C, SIGTERM (``kill``) or SIGHUP (its terminal closed). A store that is already a server (``http://...``) is its own UI: its URL is printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from petra.errors import ConfigError
from petra.tracking.store import artifact_root, open_client
from petra.tracking.views import FRONT_FILTER, fronts_url, runs_url, save_view

HOST = "127.0.0.1"
DEFAULT_PORT = 5000
#: What to paste into the runs table's search box.
FILTERS = (FRONT_FILTER, 'tags.petra.kind = "search"')


def absolute_store(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute (the server runs elsewhere)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def port_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on ``port`` now. Bound as servers bind (SO_REUSEADDR), so
    the TIME_WAIT connections a stopped server leaves for a minute do not count as in use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(uri: str, port: int) -> list[str]:
    """The ``mlflow server`` command line for the store at ``uri``, bound to 127.0.0.1."""

    uri = absolute_store(uri)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", HOST, "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)
    if root:
        command += ["--default-artifact-root", root]
    return command


def start(uri: str, port: int, *, log: Path | None = None) -> subprocess.Popen:
    """Start the UI server in a new process group (see :func:`stop`).

    A sqlite store is created or migrated here first, under petra's store lock, so the server
    never races a search doing the same.
    """

    open_client(absolute_store(uri))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    sink = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    return subprocess.Popen(server_command(uri, port), stdout=sink, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def wait_ready(url: str, *, timeout_s: float = 90.0,
               alive: Callable[[], bool] = lambda: True) -> bool:
    """Whether ``url`` answers HTTP 200 within ``timeout_s`` (polling while ``alive()``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return True
        time.sleep(0.5)
    return False


class Signalled(BaseException):
    """``petra ui`` was sent a signal that ends it: a BaseException, as KeyboardInterrupt is,
    so that no library's ``except Exception`` wraps or swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class EndingSignals:
    """The signal that ended ``petra ui``, if one came. The handler raises :class:`Signalled`
    where the main thread happens to be, and that can be inside a weakref callback or a
    library's ``except BaseException``, which swallows it; :meth:`check` raises it again where
    the caller polls, so a swallowed signal still ends the command."""

    def __init__(self) -> None:
        self.fired: list[int] = []

    def check(self) -> None:
        if self.fired:
            raise Signalled(self.fired[0])


@contextlib.contextmanager
def ending_signals() -> Any:
    """SIGTERM and SIGHUP raise :class:`Signalled` inside this block (so that ``finally``
    clauses run, as they do on Ctrl-C), once: a second signal does not interrupt the cleanup.
    Yields an :class:`EndingSignals` to poll. Their handlers are restored after the block."""
    signals = EndingSignals()

    def handler(signum: int, _frame: Any) -> None:
        if not signals.fired:
            signals.fired.append(signum)
            raise Signalled(signum)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        pass
    try:
        yield signals
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop(process: subprocess.Popen, *, timeout_s: float = 10.0) -> None:
    """Stop the server's whole process group: SIGTERM, then SIGKILL. The group is signalled
    even when its leader has already exited, since its workers may not have."""
    if process.poll() is not None and not _group_alive(process.pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(process.pid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def experiments(uri: str) -> list[tuple[str, str, int, list[str]]]:
    """``(experiment id, name, petra search runs, front members' run ids)`` of every
    experiment in the store. An experiment that holds petra's runs but not yet its fronts view
    (logged by an older petra) gets it here."""
    client = open_client(uri)
    out = []
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], filter_string='tags.petra.kind = "search"',
                                  max_results=1000)
        if runs:
            save_view(client, exp)
        front = client.search_runs([exp.experiment_id], filter_string=FILTERS[0],
                                   max_results=200)
        out.append((exp.experiment_id, exp.name, len(runs), [r.info.run_id for r in front]))
    return out


def serve(uri: str, port: int | None, *, say: Callable[[str], None] = print) -> int:
    """Run the UI until Ctrl-C; returns the exit code."""

    if uri.startswith(("http://", "https://")):
        say(f"the store {uri} is an MLflow server: open {uri} (its UI)")
        _guide(uri.rstrip("/"), uri, say)
        return 0
    if uri.startswith("sqlite:///"):
        db = Path(absolute_store(uri)[len("sqlite:///"):])
        if not db.exists():
            raise ConfigError("tracking.uri", uri, "", f"no MLflow store at {db}; run "
                              f"`petra search CONFIG` first, or pass --set tracking.uri=URI")
    if port is None:
        port = DEFAULT_PORT if port_free(DEFAULT_PORT) else free_port()
    elif not port_free(port):
        raise ConfigError("--port", port, "", f"port {port} on {HOST} is in use; pick another "
                          f"with --port N")
    url = f"http://{HOST}:{port}"
    with ending_signals() as signals:
        process = start(uri, port)

        def running() -> bool:
            signals.check()
            return process.poll() is None

        try:
            if not wait_ready(url, alive=running):
                say(f"petra: the MLflow UI did not answer on {url}")
                return 1
            say(f"MLflow UI: {url}  (store {uri}; Ctrl-C stops it)")
            _guide(url, uri, say)
            while running():
                time.sleep(0.5)
            return int(process.returncode or 0)
        except KeyboardInterrupt:
            return 0
        except Signalled as stopped:
            say(f"petra ui: {stopped}; stopping the MLflow UI")
            return 128 + stopped.signum
        finally:
            stop(process)


def _guide(url: str, uri: str, say: Callable[[str], None]) -> None:
    for exp_id, name, searches, front in experiments(uri):
        say(f"  experiment {name!r} ({searches} searches): {runs_url(url, exp_id)}")
        if front:
            say(f"    its fronts, charted (accuracy against size and latency, objectives "
                f"first): {fronts_url(url, exp_id)}")
            say(f"    its fronts in the runs table: {runs_url(url, exp_id, FILTERS[0])}")
    say("To compare fronts: open the link \"its fronts, charted\" above; each scatter plot "
        "shows every search's front members, one colour per run. Or paste into the runs "
        f"search box: {FILTERS[0]}")
    say("`petra compare RUN_ID RUN_ID` overlays the fronts of searches in one plot and logs "
        "the comparison here.")
