"""The dense reference: trained (or taken as given) once, cached by task-config hash."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petra.candidate import artifact
from petra.candidate.measure import (
    macs_and_params,
    median_latency_ms,
    session_accuracy,
    session_metric,
)
from petra.errors import ConfigError
from petra.files import write_atomic
from petra.tasks import Task, accuracy
from petra.tasks.fingerprint import fingerprint

# Bump when the baseline recipe changes, so stale caches are not reused.
RECIPE_VERSION = 2
#: Fewer dense-model errors than this on the validation split, and the split is too small to
#: rank candidates: on text_bert's 300 (5 errors), a second fine-tune seed moved a candidate's
#: accuracy by one example, and re-ranked the measured candidates at Spearman 0.61.
FEW_VAL_ERRORS = 10


@dataclass
class Baseline:
    """The dense model's weights, its deployable artifact and its measurements."""

    state: bytes  # torch.save of the state_dict
    artifact: bytes  # the dense fp32 artifact (same format and runtime as every candidate)
    metrics: dict[str, float] = field(default_factory=dict)
    key: str = ""
    cached: bool = False
    classes: int = 0  # the width of the model's output, where it is a batch of scores

    @property
    def bytes(self) -> int:
        return len(self.artifact)


def baseline_key(task_name: str, task_params: dict[str, Any], seed: int = 0,
                 stand_ins: Sequence[str] = (), plain: Sequence[str] = (),
                 fingerprint: str = "") -> str:
    """The baseline cache's key; ``stand_ins``, the layers the task contract replaced
    (:func:`petra.tasks.stand_ins.linear_stand_ins`, ``bag:`` and those of
    :func:`petra.tasks.bags.bag_stand_ins`), change the weights' shapes or names, and
    ``plain``, the layers whose reparametrization it baked (``plain_weights``), their names;
    ``fingerprint`` (:func:`petra.tasks.fingerprint.fingerprint`) is the model, the data and
    the training recipe."""
    config: dict[str, Any] = {"name": task_name, "params": task_params, "seed": seed,
                              "recipe": RECIPE_VERSION, "task": fingerprint}
    if stand_ins:
        config["linear_stand_ins"] = sorted(stand_ins)
    if plain:
        config["plain_weights"] = sorted(plain)
    payload = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_task(task: Task, task_name: str) -> None:
    """Run the task's model, loss and metric once (:func:`petra.tasks.contract.check`); a
    function that raises stops the command with one line on ``task.name``, before anything
    traces the model. A task that passed is not run again (the commands check early, and
    :func:`prepare_baseline` checks what it is given)."""
    from petra.tasks.contract import TaskError, check

    if getattr(task, "checked", False):
        return
    try:
        check(task, task_name)
    except TaskError as exc:
        raise ConfigError("task.name", task_name, "", str(exc)) from exc
    task.checked = True


def task_space(space_cfg: Any, task: Task, cache: str | Path | None) -> Any:
    """The search space of ``task``: :func:`petra.space.model_space` of its model (verdicts
    cached in ``cache``), less the genes its targets leave idle
    (:func:`petra.compress.regularize.fit_to_targets`)."""
    from petra.compress.regularize import fit_to_targets
    from petra.space import model_space

    space = model_space(space_cfg, task.model, task.example_input, cache=cache)
    fit_to_targets(space, task.val)
    return space


def prepare_baseline(
    task: Task, *, task_name: str, task_params: dict[str, Any], cache_dir: str | Path,
    seed: int = 0, threads: int = 1,
) -> Baseline:
    """Train the task's model (or take it as trained), export it, and measure it.

    The trained weights are cached under ``cache_dir`` by a hash of the task config, its model
    and its data (:func:`baseline_key`); a cached baseline is loaded instead of retrained.
    ``task.model`` holds the baseline weights afterwards.
    """
    import torch

    from petra.candidate.train import train

    check_task(task, task_name)
    # a model taken as trained is keyed by its weights too (the lr probe's cache reads the key)
    key = baseline_key(task_name, task_params, seed, (
        *getattr(task, "linear_stand_ins", ()),
        *(f"bag:{n}" for n in getattr(task, "bag_stand_ins", ()))),
        getattr(task, "plain_weights", ()), fingerprint(task, weights=task.trained))
    path = Path(cache_dir) / f"baseline-{key}.pt"
    cached = False
    if not task.trained and path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        task.model.load_state_dict(blob)
        cached = True
    elif not task.trained:
        torch.set_num_threads(threads)
        train(task.model, task.train, epochs=task.train_epochs, lr=task.train_lr,
              loss_fn=task.loss, seed=seed)
        trained = io.BytesIO()
        torch.save(task.model.state_dict(), trained)
        write_atomic(path, trained.getvalue())  # another search may be reading or writing it
    task.model.eval()
    buffer = io.BytesIO()
    torch.save(task.model.state_dict(), buffer)
    data = artifact.pack(export_dense(task.model, task.example_input, task_name,
                                      lambda s: check_artifact(task, task_name, s)))
    session = artifact.load(data, threads=threads)
    val_accuracy, val_examples = session_metric(session, task.val, task.metric)
    metrics = {
        "val_accuracy": val_accuracy,
        "val_examples": float(val_examples),
        "test_accuracy": session_accuracy(session, task.test, task.metric),
        "artifact_bytes": float(len(data)),
        "size_ratio": 1.0,
        "latency_ratio": 1.0,
        "latency_ms": median_latency_ms(session, task.example_input),
    }
    macs, params_dense, params = macs_and_params(task.model, task.example_input)
    # non-zero, as a candidate's: an embedding's zero padding row is no parameter lost
    metrics.update(macs=float(macs), params=float(params), params_dense=float(params_dense))
    with torch.no_grad():
        out = task.model(*task.example_input)
    classes = int(out.shape[-1]) if out.dim() == 2 else 0
    if classes > 1:
        metrics["val_majority"] = majority_share(task.val, classes)
    return Baseline(state=buffer.getvalue(), artifact=data, metrics=metrics, key=key, cached=cached,
                    classes=classes)


def majority_share(batches: Any, classes: int) -> float:
    """The share of the most common class among the class-label targets of ``batches`` (0
    where they are no class labels)."""
    import torch

    counts = torch.zeros(classes, dtype=torch.long)
    for _, targets in batches:
        if not (isinstance(targets, torch.Tensor) and targets.dim() == 1
                and not targets.is_floating_point()) or targets.numel() and (
                    int(targets.min()) < 0 or int(targets.max()) >= classes):
            return 0.0
        counts += torch.bincount(targets.cpu(), minlength=classes)
    return float(counts.max() / counts.sum()) if counts.sum() else 0.0


def export_dense(model: Any, example_input: Any, task_name: str = "",
                 check: Any = None) -> Any:
    """:func:`~petra.candidate.artifact.export_onnx` of the task's dense model, whose failure,
    ONNX Runtime's refusal of it, or a graph that does not compute the model on the example
    batch (or fails ``check(session)``) stops the command with one line on ``task.name``
    (``petra space`` too, which had offered genes for a model whose search could not start).
    Where the TorchScript exporter's graph is refused or computes something else, the dynamo
    exporter's is tried, and where it passes, it is the exporter of this model's candidates
    (:func:`petra.candidate.onnx_forms.prefer`)."""
    try:
        return _export_dense(model, example_input, task_name, check)
    except ConfigError as exc:
        projected = next((n for n, m in model.named_modules()
                          if type(m).__name__ == "LSTM" and getattr(m, "proj_size", 0)), None)
        if projected is None:
            raise
        raise ConfigError(exc.field, exc.value, exc.allowed, (
            f"{str(exc).partition(': ')[2]}; {projected} is an nn.LSTM with proj_size, which "
            "torch's TorchScript exporter refuses and whose dynamo export ONNX Runtime does not "
            "run")) from None


def _export_dense(model: Any, example_input: Any, task_name: str, check: Any) -> Any:
    import onnx

    from petra.candidate import onnx_forms

    try:
        return _checked_export(model, example_input, task_name, check, "")
    except ConfigError as first:
        if onnx_forms.preferred(model) == "dynamo" or "does not export" in str(first):
            raise  # the dynamo exporter was tried already
        try:
            proto = _checked_export(model, example_input, task_name, check, "dynamo")
        except Exception:  # noqa: BLE001 - the first exporter's line says it
            raise first from None
        onnx_forms.prefer(model, "dynamo")
        meta = {p.key: p.value for p in proto.metadata_props}  # workers read it from here
        onnx.helper.set_model_props(proto, {**meta, onnx_forms.EXPORTER_KEY: "dynamo"})
        return proto


def _static_only(model: Any, example_input: Any) -> bool:
    """Whether ``model`` exports with a fixed batch size, where it failed with a dynamic one."""
    import torch

    inputs = tuple(example_input) if isinstance(example_input, tuple | list) else (
        example_input,)
    try:
        with torch.no_grad(), artifact.quiet_output():
            torch.onnx.export(model, inputs, io.BytesIO(), dynamo=False, opset_version=17)
    except Exception:  # noqa: BLE001 - it does not export either way
        return False
    return True


def _checked_export(model: Any, example_input: Any, task_name: str, check: Any,
                    exporter: str) -> Any:
    from petra.errors import first_line

    try:
        proto = artifact.export_onnx(model, example_input, exporter=exporter)
        session = artifact.load(proto)  # ORT runs every candidate (Falcon's ALiBi: complex128)
    except RuntimeError as exc:
        op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", str(exc))
        hint = (f"an operator with no ONNX form ({op.group(1)}) needs another implementation"
                + (" (a Hugging Face MoE exports with experts_implementation=\"eager\")"
                   if "grouped_mm" in op.group(1) else "") if op else (
                    "it exports with a fixed batch size only: its forward puts the batch size "
                    "where ONNX needs a constant (a conv over the batch with groups=B), and "
                    "petra exports with a dynamic batch axis" if _static_only(
                        model, example_input) else "a forward that ONNX cannot trace, such as "
                    "pack_padded_sequence or data-dependent Python control flow, needs another "
                    "form"))
        raise ConfigError("task.name", task_name, "", f"the model does not export to ONNX, and "
                          f"petra measures the exported artifact ({first_line(exc, 300)}); {hint}"
                          ) from exc
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's refusals are no RuntimeError
        raise ConfigError("task.name", task_name, "", "the model's ONNX export does not load in "
                          f"ONNX Runtime, which runs every candidate ({first_line(exc, 300)})"
                          ) from exc
    check_runs(model, session, example_input, task_name, "the example batch", (
        "ONNX Runtime rejects a node the exporter wrote for this forward", "the exporter wrote "
        "an operator of this forward as something else (an in-place write, a scatter?)"))
    if check is not None:
        check(session)
    return proto


def check_artifact(task: Task, task_name: str, session: Any) -> None:
    """Stop the command with one line on ``task.name`` where the dense model's exported
    artifact does not run on the first validation batch, or computes something else there
    than the model does. The export traces the example batch: a shape the forward computes
    in Python from it (a batch size, a sequence length) becomes a constant of the graph, which
    fails, or silently mixes examples, on a batch of another size."""
    hint = ("the export traced the example batch, and a shape computed from it in Python (a "
            "batch size, a length) may have become a constant: compute it with -1 or in torch")
    check_runs(task.model, session, next(iter(task.val))[0], task_name,
               "the first validation batch", (hint, hint))


#: Why a batch of other sizes than the example's fails: they did not vary in the first batches.
VARYING = ("the export keeps every axis but the batch at the example's size, except those the "
           "first 8 validation and test batches and 4 training batches vary in: pad every batch "
           "to one length, or let those first batches show the lengths vary")


def check_runs(model: Any, session: Any, inputs: Any, task_name: str, batch: str,
               hints: tuple[str, str]) -> None:
    """Stop the command with one line on ``task.name`` where ``session`` does not run on
    ``inputs`` (``hints[0]`` says why it may not), or computes something else there than
    ``model`` does (``hints[1]``)."""
    import numpy as np
    import torch

    from petra.candidate.measure import session_feed
    from petra.tasks.contract import args, first_tensor

    try:
        got = session.run(None, session_feed(session, inputs), artifact.quiet())[0]
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors are not RuntimeErrors
        said = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]  # ORT's next line: sizes
        raise ConfigError("task.name", task_name, "", (
            f"the exported model does not run in ONNX Runtime on {batch} ({said}); "
            + (VARYING if "invalid dimensions" in said else hints[0]))) from exc
    with torch.no_grad():
        want = first_tensor(model(*args(inputs))).detach().float().cpu().numpy()
    finite = np.abs(want[np.isfinite(want)])
    scale = float(finite.max()) if finite.size else 0.0
    # a model may output NaN or inf where it means to (a masked position): the artifact must too
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-2, atol=1e-2 * scale + 1e-6,
                                                  equal_nan=True):
        if got.shape != want.shape:
            diff = f"shape {tuple(got.shape)}, not {tuple(want.shape)}"
        elif (nan := int((np.isnan(got) != np.isnan(want)).sum())):
            diff = f"NaN in {nan} places where the other gives a number"
        else:
            diff = f"largest difference {float(np.nanmax(np.abs(got - want))):.3g} of {scale:.3g}"
        raise ConfigError("task.name", task_name, "", (
            f"the exported model computes something else than the model on {batch} ({diff}); "
            f"{hints[1]}"))


#: Above chance by less than this (with the default accuracy metric), the baseline is at chance.
CHANCE_MARGIN = 0.05


def describe(baseline: Baseline, metric: Any = accuracy, cast_from: str = "") -> str:
    """The baseline's line in a search's log; with the default accuracy metric, a warning
    when the dense model is within :data:`CHANCE_MARGIN` of chance (a ConvNeXtV2 and a
    SegFormer written outside the repo sat at 0.23 on 4 classes, and their searches went ahead
    in silence) or errs on fewer than :data:`FEW_VAL_ERRORS` validation examples; a note where
    the model was handed over in ``cast_from`` (float16, bfloat16 or float64)."""
    b = baseline.metrics
    n = int(b.get("val_examples", 0))
    line = (f"baseline: val {b['val_accuracy']:.4f} of {n} examples, test "
            f"{b['test_accuracy']:.4f}, {int(b['artifact_bytes'])} bytes, "
            f"{b['latency_ms']:.2f} ms/batch{' (cached)' if baseline.cached else ''}")
    errors = round((1 - b["val_accuracy"]) * n)
    if metric is accuracy and baseline.classes > 1 and \
            b["val_accuracy"] < 1 / baseline.classes + CHANCE_MARGIN:
        line += (f"\nwarning: the dense model's val accuracy is near chance ({1 / baseline.classes:.2f}"
                 f" for {baseline.classes} classes): candidates are ranked by noise; train it "
                 "longer (task.train_epochs), or check the task's labels")
    elif metric is accuracy and b["val_accuracy"] <= b.get("val_majority", 0.0) + 1e-9:
        line += (f"\nwarning: the dense model's val accuracy is the share of the validation "
                 f"split's most common class ({b['val_majority']:.4f}): it may predict that "
                 "class alone, and candidates are then ranked by size and latency alone; train "
                 "it longer (task.train_epochs), or balance the classes")
    elif metric is accuracy and n and errors < FEW_VAL_ERRORS:
        line += (f"\nwarning: the dense model errs on {errors} of {n} validation examples: "
                 f"candidates a few examples ({1 / n:.4f} each) apart are within noise of each "
                 "other; a larger validation split ranks them better")
    if cast_from:
        line += (f"\nnote: the model's weights are {cast_from}; petra computes, compresses and "
                 "measures it in float32, the baseline included")
    return line
