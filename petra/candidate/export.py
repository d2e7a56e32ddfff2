"""The deployable bundle: the artifact, a loader and an example that need no petra, a model card.

``petra export RUN_ID CANDIDATE_RUN_ID --out DIR`` (:func:`export_candidate`) and
``petra evaluate --export DIR`` both write, through :func:`write_bundle`:

- ``model.petra``: the artifact, exactly as measured;
- ``load_petra.py``: a loader that needs numpy, onnx and onnxruntime only;
- ``example.py``: loads the model and runs it on the task's example batch, ``example.npz``
  (one array per named input: a tensor, or each tensor of a tuple or dict of inputs);
- ``MODEL_CARD.md``: the recipe, the objectives, the test accuracy, the baseline, how it was
  measured and how to load it;
- ``genome.json`` and ``metrics.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from petra.candidate import artifact
from petra.candidate.artifact import loader_source
from petra.candidate.measure import session_accuracy
from petra.errors import ConfigError
from petra.space import summarize
from petra.tasks import load_task
from petra.tracking.runs import open_search
from petra.tracking.store import Tracker

_CARD = """# {name}

A model compressed by petra. It runs with numpy, onnx and onnxruntime only; petra and torch are
not needed.

{source}

## How to load it

```python
import numpy as np
from load_petra import load   # load_petra.py sits beside this file

session = load("model.petra", threads=1)        # an onnxruntime.InferenceSession
outputs = session.run(None, {feed})[0]
```

The inputs, by name, as in the task's example batch (any batch size):

{inputs}

`python example.py` runs it once on that batch, `example.npz`.

## Recipe

{summary}

```json
{genome}
```

## Measured on this artifact

| metric | this model | dense baseline |
|---|---|---|
{rows}

How these were measured:
- accuracies on the artifact itself, in ONNX Runtime; `test_accuracy` on the held-out test
  split, which the search never saw;
- `artifact_bytes`: the length of `model.petra`; `size_ratio` divides it by the dense
  baseline's artifact, saved the same way;
- `latency_ratio`: timed against the dense baseline's artifact in the same process and the same
  runtime, 1 thread, in interleaved rounds (the median of the per-round ratios). Absolute
  milliseconds depend on the machine; the ratio travels better.
"""

_EXAMPLE = '''"""Run the exported model once on the task's example batch (needs numpy, onnx and
onnxruntime only)."""

import numpy as np

from load_petra import load

session = load("model.petra", threads=1)
with np.load("example.npz") as example:
    feed = {name: example[name] for name in example.files}
outputs = session.run(None, feed)[0]
print("outputs", outputs.shape, outputs.dtype, "finite:", bool(np.isfinite(outputs).all()))
'''

_ROWS = ("val_accuracy", "test_accuracy", "artifact_bytes", "size_ratio", "latency_ms",
         "latency_ratio", "params", "macs")


def write_bundle(
    out_dir: str | Path, *, artifact_bytes: bytes, genome: Mapping[str, Any],
    metrics: Mapping[str, float], baseline: Mapping[str, float],
    example: Mapping[str, Any], name: str = "petra model", source: str = "",
    seed: int | None = None,
) -> Path:
    """Write the bundle into ``out_dir``; returns the directory.

    Args:
        example: the task's example batch as an ONNX Runtime feed (input name → array).
        source: a paragraph saying where the model comes from (search and candidate runs).
    """
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.petra").write_bytes(artifact_bytes)
    (out / "load_petra.py").write_text(loader_source())
    np.savez(out / "example.npz", **{k: np.asarray(v) for k, v in example.items()})
    (out / "example.py").write_text(_EXAMPLE)
    (out / "genome.json").write_text(json.dumps(dict(genome), indent=2, sort_keys=True))
    (out / "metrics.json").write_text(json.dumps(
        {"metrics": dict(metrics), "baseline": dict(baseline), "seed": seed}, indent=2,
        sort_keys=True))
    rows = "\n".join(
        f"| {k} | {_fmt(metrics[k])} | {_fmt(baseline.get(k, ''))} |" for k in _ROWS
        if k in metrics)
    (out / "MODEL_CARD.md").write_text(_CARD.format(
        name=name, source=source,
        feed="{" + ", ".join(f'"{k}": {k}' for k in example) + "}",
        inputs="\n".join(f"- `{k}`: {np.asarray(v).dtype}, shape `{list(np.shape(v))}`"
                         for k, v in example.items()),
        summary=f"`{summarize(genome, metrics)}`",
        genome=json.dumps(dict(genome), indent=2, sort_keys=True), rows=rows,
    ))
    return out


def export_candidate(uri: str, search_run_id: str, candidate_run_id: str,
                     out_dir: str | Path) -> Path:
    """Export candidate ``candidate_run_id`` of search ``search_run_id`` into ``out_dir``.

    Its test accuracy comes from its run when the search measured it (front members), and is
    measured here on the task's test split otherwise.

    Raises:
        petra.config.ConfigError: an unknown run, a candidate of another search, or one without
            an artifact (failed or pruned).
    """

    search = open_search(uri, search_run_id)
    record = search.record(candidate_run_id)
    candidate_run_id = record["id"]
    data = Tracker.fetch(uri, candidate_run_id, "model.petra")
    if data is None:
        raise ConfigError("candidate", candidate_run_id, "", (
            f"candidate {candidate_run_id} has no artifact (its status is "
            f"{record['status']}); export a complete candidate, e.g. one on the front"))
    metrics = dict(record["metrics"])
    task = load_task(search.config.task.name, search.config.task.params)
    if "test_accuracy" not in metrics:
        session = artifact.load(data, threads=1)
        metrics["test_accuracy"] = session_accuracy(session, task.test, task.metric)
    where = "on the front" if record.get("on_front") else "not on the final front"
    source = (f"Candidate run `{candidate_run_id}` ({where}) of the search run "
              f"`{search_run_id}` ({search.name}, task `{search.config.task.name}`), "
              f"tracked in `{uri}`.")
    if record.get("seed") is not None:  # what measures it again, as the search did
        source += (f" Its pruning and fine-tune seed was {record['seed']}: `petra evaluate "
                   f"CONFIG --genome genome.json --seed {record['seed']}` measures it again.")
    from petra.tasks.contract import feed

    return write_bundle(out_dir, artifact_bytes=data, genome=record["genome"], metrics=metrics,
                        baseline=search.baseline,
                        example=feed(task.example_input, task.input_names),
                        name=f"{search.name}: candidate {candidate_run_id[:8]}", source=source,
                        seed=record.get("seed"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
