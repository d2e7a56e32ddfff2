"""Cache files that concurrent searches share are written whole or not at all."""

from __future__ import annotations

import subprocess
import sys

from petra.files import write_atomic

SIZE = 4 * 1024 * 1024  # a baseline's order of size: one write takes a few milliseconds


def test_a_reader_sees_a_cache_file_whole_while_two_processes_rewrite_it(tmp_path):
    path = tmp_path / "cache" / "baseline-key.pt"
    write_atomic(path, b"a" * SIZE)
    rewrite = ("import sys\nfrom petra.files import write_atomic\n"
               "for _ in range(60):\n    write_atomic(sys.argv[1], sys.argv[2].encode() * "
               f"{SIZE})\n")
    writers = [subprocess.Popen([sys.executable, "-c", rewrite, str(path), mark])
               for mark in "bc"]
    reads = 0
    while any(w.poll() is None for w in writers):
        data = path.read_bytes()
        assert len(data) == SIZE and data.count(data[:1]) == SIZE, "a part of a file was read"
        reads += 1
    assert [w.wait() for w in writers] == [0, 0] and reads > 10
    assert path.read_bytes() in (b"b" * SIZE, b"c" * SIZE)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file is left


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "probe.json"
    write_atomic(path, '{"lr": 0.005}')
    try:
        write_atomic(path, "\ud800")  # a lone surrogate: its encoding fails mid-write
    except UnicodeEncodeError:
        pass
    else:
        raise AssertionError("the surrogate was written")
    assert path.read_text() == '{"lr": 0.005}' and len(list(tmp_path.iterdir())) == 1
