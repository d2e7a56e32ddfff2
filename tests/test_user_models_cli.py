"""Models petra has never seen, as a new user brings them: through the CLI, on a local Ray
cluster, into a sqlite MLflow store. Nothing is mocked.

- a Hugging Face ``BertModel`` (from a config) with dict inputs and a ``ModelOutput``;
- torch's ``nn.TransformerEncoder`` with tuple inputs (tokens, padding mask);
- a metric written with torch ops (both), and a metric that raises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # the Ray workers import the user's module too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "petra.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def config(tmp_path: Path, task: str, name: str) -> Path:
    cfg = {
        "name": name, "seed": 0,
        "task": {"name": f"tests.user_transformers:{task}", "params": {}},
        "space": {"pruning": ["none", "magnitude", "l2_channel", "l2_heads"],
                  "sparsity": [0.0, 0.8], "skip_blocks": True,
                  "quantization": ["none", "fp16", "int8_dynamic", "int8_static",
                                   "int4_weight"],
                  "finetune": {"epochs": [0, 1]}},
        "search": {"strategy": "nsga2", "population": 4, "generations": 2},
        "execution": {"workers": 2, "cpus_per_candidate": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": name},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # two searches, 2-3 minutes: in make test's second run
@pytest.mark.parametrize("task", ["bert_task", "encoder_task"])
def test_a_transformer_user_task_searches_with_no_failed_candidate(task, tmp_path):
    pytest.importorskip("transformers")
    from mlflow.tracking import MlflowClient

    proc = run("search", str(config(tmp_path, task, task)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(task)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) >= 4
    statuses = {r.data.tags["petra.genome_hash"]: r.data.tags["petra.status"] for r in children}
    errors = [r.data.tags.get("petra.error") for r in children
              if r.data.tags["petra.status"] == "failed"]
    assert not errors, errors  # the space offers only genes that run on this model
    # the seed recipes remove whole heads
    assert any(r.data.params.get(k) == "l2_heads" for r in children for k in r.data.params
               if k.endswith(".method")), statuses


def test_evaluate_json_is_only_json_and_heads_leave_the_artifact(tmp_path):
    pytest.importorskip("transformers")
    genome = tmp_path / "genome.yaml"
    genome.write_text(yaml.safe_dump({
        "layers.bert.encoder.layer.0.attention.self.method": "l2_heads",
        "layers.bert.encoder.layer.0.attention.self.sparsity": 0.5,
        "layers.bert.encoder.layer.1.attention.self.method": "l2_heads",
        "layers.bert.encoder.layer.1.attention.self.sparsity": 0.5,
        "quant.scheme": "int8_dynamic"}))
    proc = run("evaluate", str(config(tmp_path, "bert_task", "ev")), "--genome", str(genome),
               "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout)  # nothing but JSON on stdout
    assert payload["status"] == "complete"
    assert payload["heads"] == {"bert.encoder.layer.0.attention.self": [4, 2],
                                "bert.encoder.layer.1.attention.self": [4, 2]}
    assert payload["objectives"]["artifact_bytes"] < 0.5 * payload["baseline"]["artifact_bytes"]
    # the torch metric (``.float()`` on a tensor) ran on the artifact's outputs
    assert payload["objectives"]["val_accuracy"] > 0.5


def test_a_task_whose_metric_raises_gets_one_line_and_exit_code_2(tmp_path):
    path = config(tmp_path, "failing_metric_task", "bad")
    proc = run("search", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "metric" in lines[0] and "failing_metric_task" in lines[0]
    assert "this metric always fails" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["space", "search"])
def test_a_task_whose_forward_raises_gets_one_line_before_anything_traces_it(tmp_path, command):
    path = config(tmp_path, "failing_forward_task", "bad_forward")
    proc = run(command, str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model's forward" in lines[0] and "failing_forward_task" in lines[0]
    assert "mat1 and mat2 shapes cannot be multiplied" in lines[0]


def test_a_task_module_beside_the_config_is_found_with_no_pythonpath(tmp_path):
    """A task file in the folder petra runs in was not found (ModuleNotFoundError) unless
    PYTHONPATH named that folder, which the README never asked for."""
    (tmp_path / "own_task.py").write_text(
        "import torch\nfrom torch import nn\nimport petra\n\n"
        "def make_task():\n"
        "    x = torch.randn(64, 6)\n"
        "    y = (x[:, 0] > 0).long()\n"
        "    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]\n"
        "    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))\n"
        "    return petra.Task(model=model, train=batches, val=batches, test=batches,\n"
        "                      example_input=x[:16], train_epochs=1)\n")
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump({"task": {"name": "own_task:make_task"},
                                    "space": {"quantization": ["none"]}}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    petra = Path(sys.executable).with_name("petra")  # `python -m` would put the folder first
    proc = subprocess.run([str(petra), "space", str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layers.0.method" in proc.stdout
