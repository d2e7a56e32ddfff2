"""The write-ahead journal: durable entries, the logged marks, a torn last line, checkpoints."""

from __future__ import annotations

from petra.tracking.journal import Journal


def entry(key: str, gen: int = 0) -> dict:
    return {"genome_hash": key, "generation": gen, "index": 0, "genome": {"quant.scheme": "none"},
            "metrics": {"val_accuracy": 0.9}, "status": "complete", "error": None, "info": {}}


def test_entries_keep_their_order_artifacts_and_logged_marks(tmp_path):
    journal = Journal("run1", root=tmp_path)
    journal.add(entry("a"), b"artifact-a")
    journal.add(entry("b"), None)
    journal.logged("a", "child-a")
    again = Journal("run1", root=tmp_path)  # a new process reads what the old one wrote
    assert [e["genome_hash"] for e in again.entries()] == ["a", "b"]
    assert again.entries()[0]["run_id"] == "child-a" and again.entries()[1]["run_id"] is None
    assert [e["genome_hash"] for e in again.pending()] == ["b"]
    assert again.artifact("a") == b"artifact-a" and again.artifact("b") is None


def test_a_line_cut_short_by_a_kill_is_ignored(tmp_path):
    journal = Journal("run2", root=tmp_path)
    journal.add(entry("a"), None)
    with open(journal.results, "ab") as f:
        f.write(b'{"kind": "result", "genome_hash": "b", "gen')  # the kill came mid-write
    assert [e["genome_hash"] for e in journal.entries()] == ["a"]
    journal.add(entry("c"), None)  # the next line still parses after the torn one
    assert [e["genome_hash"] for e in journal.entries()] == ["a", "c"]


def test_the_checkpoint_is_replaced_whole(tmp_path):
    journal = Journal("run3", root=tmp_path)
    assert journal.checkpoint() is None
    journal.save_checkpoint('{"records": [1]}')
    journal.save_checkpoint('{"records": [1, 2]}')
    assert journal.checkpoint() == '{"records": [1, 2]}'
    assert not list(journal.folder.glob("*.tmp"))
