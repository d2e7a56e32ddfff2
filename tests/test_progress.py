"""The live progress display, and its plain-line fallback when stdout is not a terminal."""

from __future__ import annotations

import io

from petra.tracking.progress import ConsoleProgress, Status, as_reporter


def status(done: int = 5) -> Status:
    return Status(generation=1, generations=4, done=done, planned=16, running=2, failed=1,
                  pruned=3, elapsed_s=30.0, eta_s=66.0, hypervolume=0.0712,
                  best={"val_accuracy": 0.9944, "size_ratio": 0.043, "latency_ratio": 0.31})


def test_the_status_line_holds_counts_eta_best_values_and_hypervolume():
    line = status().line()
    assert line.startswith("gen 2/4 | 5/16 done, 2 running, 1 failed, 3 pruned | ETA 1m06s")
    assert "best val 0.9944, size 0.043, latency 0.31" in line and line.endswith("HV 0.0712")


def test_a_terminal_gets_one_live_status_line_with_messages_above_it():
    out = io.StringIO()
    progress = ConsoleProgress(out, live=True)
    progress.update(status(5))
    progress.update(status(6))
    progress.message("generation 2/4: ...")
    progress.close()
    text = out.getvalue()
    assert "5/16 done" in text and "6/16 done" in text
    assert "\x1b[2K" in text  # the live line is erased before it is redrawn
    # a message goes above the status line, which is then drawn again
    assert "generation 2/4: ..." in text
    assert text.index("generation 2/4") < text.rindex("6/16 done")
    # closing clears the status line: nothing of it is left after the last erase
    assert "done" not in text[text.rindex("\x1b[2K"):]


def test_without_a_terminal_only_plain_lines_are_printed():
    out = io.StringIO()
    progress = ConsoleProgress(out)  # StringIO is not a TTY
    assert not progress.live
    progress.update(status())
    progress.message("generation 2/4: ...")
    progress.close()
    assert out.getvalue() == "generation 2/4: ...\n"


def test_a_plain_callable_is_a_reporter_of_messages():
    seen = []
    reporter = as_reporter(seen.append)
    reporter.message("hello")
    reporter.update(status())
    assert seen == ["hello"]
    as_reporter(None).message("nothing happens")


def test_a_front_with_no_hypervolume_says_why():
    """A tiny model's members were all slower than the dense one, and the line read
    ``hypervolume 0.0000`` beside a best accuracy equal to the baseline's, which looked like
    a bug."""
    from types import SimpleNamespace

    from petra.tracking.progress import ZERO_HV, generation_line

    status = SimpleNamespace(generation=0, generations=3, done=4, failed=0, pruned=0,
                             best={"val_accuracy": 1.0}, eta_s=None, planned=12, elapsed_s=20)
    line = generation_line(SimpleNamespace(members=[{}], hypervolume=0.0), status)
    assert f"hypervolume 0.0000{ZERO_HV}; best val 1" in line
    line = generation_line(SimpleNamespace(members=[{}], hypervolume=0.05), status)
    assert "hypervolume 0.0500; best" in line


def test_the_best_values_shown_are_those_the_front_may_hold():
    """A generation line showed best val 0.9777 from a candidate over `max_bytes`, while the
    front's best was 0.8357: the best values count feasible candidates only."""
    from petra.tracking.progress import best_values

    def record(val: float, size: float, status: str = "complete") -> dict:
        return {"status": status, "metrics": {"val_accuracy": val, "size_ratio": size,
                                              "artifact_bytes": size * 1000}}

    records = [record(0.98, 0.9), record(0.84, 0.05), record(0.99, 0.01, "pruned")]
    objectives = [("val_accuracy", "max"), ("artifact_bytes", "min")]
    baseline = {"val_accuracy": 0.99, "artifact_bytes": 1000.0}
    assert best_values(records, objectives, baseline, None) == {
        "val_accuracy": 0.98, "size_ratio": 0.05}
    assert best_values(records, objectives, baseline, {"max_bytes": 100}) == {
        "val_accuracy": 0.84, "size_ratio": 0.05}
