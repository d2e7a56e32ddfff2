"""The `petra` command: config errors exit 2 with one line and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def petra(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "petra.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "field", "value"),
    [
        ("search: {population: -3}\n", [], "search.population", "-3"),
        ("search: {populaton: 4}\n", [], "search.populaton", "populaton"),
        ("search: {population: many}\n", [], "search.population", "many"),
        ("space: {pruning: [none, foo]}\n", [], "space.pruning[1]", "foo"),
        ("space: {sparsity: [0.0, 1.5]}\n", [], "space.sparsity", "1.5"),
        ("{}\n", ["execution.workers=0"], "execution.workers", "0"),
        ("name: [unclosed\n", [], "config", "line"),
        ("task: {name: no_such_task}\n", [], "task.name", "no_such_task"),
        ("task: {name: 'nowhere.mod:fn'}\n", [], "task.name", "nowhere.mod:fn"),
        ("task: {name: digits_cnn, params: {depth: 3}}\n", [], "task.params", "depth"),
    ],
)
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, yaml_text: str, overrides: list[str], field: str, value: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    args = ["search", str(path)]
    for item in overrides:
        args += ["--set", item]
    proc = petra(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert field in lines[0] and value in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_space_lists_genes_decoded_from_the_model() -> None:
    root = Path(__file__).resolve().parents[1]
    proc = petra("space", str(root / "search_spaces" / "quickstart.yaml"), "--json")
    assert proc.returncode == 0, proc.stderr
    genes = {g["name"]: g for g in json.loads(proc.stdout)}
    assert genes["layers.layer1.conv1.method"]["choices"] == ["none", "magnitude", "l2_channel"]
    assert "layers.fc.method" not in genes  # excluded by the quickstart's glob
    assert genes["quant.scheme"]["kind"] == "categorical"
    assert genes["finetune.epochs"]["kind"] == "int"


def test_methods_lists_the_registries() -> None:
    proc = petra("methods", "--json")
    assert proc.returncode == 0, proc.stderr
    table = json.loads(proc.stdout)
    assert {"magnitude", "l2_channel", "none"} <= set(table["pruning"])
    assert {"none", "int8_static"} <= set(table["quantization"])
    assert {"nsga2", "random"} <= set(table["strategy"])
    assert "digits_cnn" in table["task"]
