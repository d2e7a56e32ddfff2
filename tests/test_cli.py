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
    genes = {g["name"]: g for g in json.loads(proc.stdout)["genes"]}
    assert genes["layers.layer1.conv1.method"]["choices"] == ["none", "magnitude", "l2_channel"]
    assert "layers.fc.method" not in genes  # excluded by the quickstart's glob
    assert genes["quant.scheme"]["kind"] == "categorical"
    assert genes["finetune.epochs"]["kind"] == "int"


def test_methods_lists_the_registries() -> None:
    proc = petra("methods", "--json")
    assert proc.returncode == 0, proc.stderr
    table = json.loads(proc.stdout)
    assert {"magnitude", "l2_channel", "none", "equilibrium", "shapley"} <= set(table["pruning"])
    assert {"fixed", "auto_emp"} <= set(table["sparsity_rule"])
    assert {"energy", "mp"} <= set(table["rank_rule"])
    assert {"none", "int8_static"} <= set(table["quantization"])
    assert {"nsga2", "random"} <= set(table["strategy"])
    assert "digits_cnn" in table["task"]


def tiny_config(tmp_path: Path) -> Path:
    import yaml

    from tests.conftest import TINY_TASK

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "task": TINY_TASK,
        "space": {"pruning": ["none", "magnitude", "l2_channel"], "layers": {"exclude": ["fc"]},
                  "quantization": ["none", "int8_static"]},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }))
    return path


def test_evaluate_a_hand_written_recipe_and_export_it(tmp_path: Path, tiny_task) -> None:
    genome = tmp_path / "recipe.yaml"
    genome.write_text("quant.scheme: int8_static\n"
                      "layers.layer2.conv1.method: l2_channel\n"
                      "layers.layer2.conv1.sparsity: 0.5\n")
    out = tmp_path / "bundle"
    proc = petra("evaluate", str(tiny_config(tmp_path)), "--genome", str(genome), "--json",
                 "--export", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "complete"
    assert set(result["objectives"]) == {"val_accuracy", "artifact_bytes", "latency_ratio"}
    for key in ("val_accuracy", "artifact_bytes", "size_ratio", "latency_ms", "latency_ratio",
                "params", "macs"):
        assert key in result["metrics"]
    assert result["metrics"]["size_ratio"] < 0.45
    assert set(result["effective"]) == {"bytes", "latency"} and result["effective"]["bytes"]
    assert result["genome"]["layers.stem.method"] == "none"  # omitted genes mean no compression
    assert result["channels"]  # l2_channel removed channels of layer2.conv1's group

    # the bundle runs in a Python that never imports petra or torch
    script = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(out)!r})\n"
        "from load_petra import load\n"
        f"s = load({str(out / 'model.petra')!r})\n"
        "y = s.run(None, {'input': np.zeros((3, 1, 8, 8), np.float32)})[0]\n"
        "assert y.shape == (3, 10), y.shape\n"
        "assert 'petra' not in sys.modules and 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]
    assert "load_petra" in (out / "MODEL_CARD.md").read_text()
    assert (out / "example.py").exists() and (out / "example.npz").exists()


def test_evaluate_rejects_an_unknown_gene(tmp_path: Path) -> None:
    genome = tmp_path / "recipe.json"
    genome.write_text('{"quant.schema": "int8_static"}')
    proc = petra("evaluate", str(tiny_config(tmp_path)), "--genome", str(genome), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "quant.schema" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("genome", "says"), [
    ('{"finetune.epochs": 9}', "gene finetune.epochs must be in [0, 4]; got 9"),
    ('{"finetune.epochs": 0.5}', "gene finetune.epochs must be an integer in [0, 4]; got 0.5"),
    ('{"finetune.lr": 0.5}', "gene finetune.lr must be in ["),
])
def test_evaluate_rejects_a_gene_outside_its_range(tmp_path: Path, genome: str, says: str) -> None:
    """A head sparsity of 1.5, a width of 0.9 and 3 fine-tune epochs ran as 0.9, 0.5 and 1,
    and nothing said the genome had changed: the search clips its own variations into the
    space, but a genome the user wrote is checked."""
    from petra.genes import Float, Int, check_range

    path = tmp_path / "recipe.json"
    path.write_text(genome)
    proc = petra("evaluate", str(tiny_config(tmp_path)), "--genome", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert says in proc.stderr and "baseline" not in proc.stdout  # before the baseline trains
    check_range(Float("x", 0.0, 0.9, 0.0), 0.9)
    check_range(Int("n", 0, 2, 0), 2.0)
    with pytest.raises(ValueError, match="must be a number"):
        check_range(Float("x", 0.0, 0.9, 0.0), "half")


def test_evaluate_shows_the_latency_its_ratio_divides_by() -> None:
    """The baseline beside ``latency_ms`` was the search's cached baseline, timed in another
    process (20.9 ms against a candidate's 13.0 at a ratio of 0.99); it is now the dense model
    timed beside the candidate, and every baseline figure is rounded as the candidate's."""
    from petra.cli import metric_rows

    rows = metric_rows({"val_accuracy": 0.9, "latency_ms": 13.0, "baseline_latency_ms": 13.1,
                        "latency_ratio": 0.99},
                       {"val_accuracy": 0.951234567, "latency_ms": 20.9, "latency_ratio": 1.0})
    assert rows == ["  val_accuracy       0.9   (baseline 0.951235)",
                    "  latency_ms         13   (baseline 13.1)",
                    "  latency_ratio      0.99   (baseline 1)"]


def test_space_says_what_each_skipped_block_becomes() -> None:
    """A skip gene read the same for a block that hands on its input, a residual branch that
    gives zeros, and one that becomes its shortcut."""
    root = Path(__file__).resolve().parents[1]
    proc = petra("space", str(root / "search_spaces" / "quickstart.yaml"),
                 "--set", "space.skip_blocks=true")
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stdout.splitlines() if line.startswith("skipped, ")]
    genes = [line.split()[0] for line in proc.stdout.splitlines() if line.endswith(".skip")
             or ".skip " in line]
    assert said and genes
    named = {n.strip() for line in said for n in line.split(": ", 1)[1].split(",")}
    assert named == {g[len("blocks."):-len(".skip")] for g in genes}


@pytest.mark.parametrize("command", ["space", "evaluate"])
def test_json_output_is_only_json_whatever_the_model_prints(tmp_path: Path, command: str) -> None:
    """A model whose forward writes to file descriptor 1, with an activation module used twice
    (torch-pruning's operation counter prints a warning for it): stdout holds the JSON alone,
    and what they wrote goes to stderr."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "chatty.yaml"
    path.write_text(yaml.safe_dump({
        "task": {"name": "tests.user_task:chatty"},
        "space": {"pruning": ["none", "l2_channel"], "quantization": ["none"]},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
    genome = tmp_path / "genome.yaml"
    genome.write_text("layers.a.0.method: l2_channel\nlayers.a.0.sparsity: 0.5\n")
    extra = ["--genome", str(genome)] if command == "evaluate" else []
    proc = petra(command, str(path), *extra, "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout)
    assert "chatty forward" in proc.stderr
    if command == "evaluate":
        assert payload["status"] == "complete" and payload["channels"]
        assert "ptflops" not in proc.stderr  # the counter's warning is dropped, not moved
    else:
        assert "layers.a.0.method" in {g["name"] for g in payload["genes"]}


def test_json_only_with_a_stderr_that_has_no_descriptor_redirects_in_python_and_leaks_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout a real file, stderr a Python stream (a harness's capture): what is printed goes
    to that stream, the JSON to the file, and no descriptor is left open."""
    import io
    import os

    from petra.cli import _emit, json_only

    err = io.StringIO()
    with open(tmp_path / "out.json", "w", encoding="utf-8") as out:
        monkeypatch.setattr("sys.stdout", out)
        monkeypatch.setattr("sys.stderr", err)
        before = sorted(os.listdir("/proc/self/fd"))
        with json_only(True):
            print("a library's print")
            _emit({"a": 1})
        assert sorted(os.listdir("/proc/self/fd")) == before
    assert err.getvalue() == "a library's print\n"
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1}
