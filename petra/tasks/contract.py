"""The task contract's inputs and outputs, in one canonical form for everything downstream.

A user's model may take a tensor, a tuple of tensors, or a dict of tensors (``input_ids`` with
``attention_mask``), and may return a tensor, a tuple, a dict or a Hugging Face ``ModelOutput``.
:func:`adapt` turns a :class:`petra.Task` into the one form the rest of petra works with:

- ``task.model`` is a :class:`TaskModel`: called as ``model(*inputs)`` with a tuple of tensors,
  it returns one tensor (``task.output`` applied). It shares its children with the user's
  model, so layer names, state_dict keys and in-place surgery are those of the user's model.
- ``task.example_input`` and the inputs of every ``train``/``val``/``test`` batch are tuples of
  tensors, in the order of :attr:`TaskModel.input_names`.
- ``task.input_names`` names them: the dict's keys, or ``input`` (``input_0``, ``input_1``... for
  a tuple). These are the artifact's ONNX input names, each with a dynamic batch axis.
- A Hugging Face ``Conv1D`` (GPT-2's projections: a Linear that stores its weight transposed)
  is replaced by the ``nn.Linear`` it computes
  (:func:`~petra.tasks.stand_ins.linear_stand_ins`), so every gene that takes a Linear takes
  it; ``task.linear_stand_ins`` names them.
- An ``nn.EmbeddingBag`` read as a 2-D batch of ids is replaced by the ``nn.Embedding`` and the
  pooling it computes (:mod:`petra.tasks.bags`), so its table is an embedding like any other;
  ``task.bag_stand_ins`` names them.
- A weight reparametrization (``weight_norm``, ``spectral_norm``, either form; the masks
  ``torch.nn.utils.prune`` leaves in place) is baked into the plain weight it computes
  (:func:`~petra.tasks.stand_ins.plain_weights`): channel removal assigns new weights, which
  a parametrized layer refuses; ``task.plain_weights`` names the layers.
- A frozen BatchNorm that holds its statistics and affine in buffers (torchvision's and
  detectron2's ``FrozenBatchNorm2d``) is replaced by a BatchNorm that computes the same and
  stays frozen (:class:`~petra.tasks.stand_ins.FrozenNorm`), whose channels go with its conv's;
  ``task.frozen_norms`` names them.
- Any other persistent floating buffer with a dimension longer than 1 (a sinusoidal position
  table) becomes a frozen parameter of the same name
  (:func:`~petra.tasks.stand_ins.buffers_as_parameters`), which torch-pruning cuts with the
  channels it meets; ``task.buffer_parameters`` names them.
- An attention that sizes its heads from its input's width (``B, N, C = x.shape``, then
  ``reshape(B, N, C)``) sizes them from its own (:mod:`petra.tasks.widths`);
  ``task.own_width`` names them.
- A model wrapped by ``torch.compile`` is unwrapped: its layers are the model's.
- A model in float16, bfloat16 or float64 is computed in float32, with its inputs and targets
  (``task.cast_from`` names the dtype): ONNX Runtime's CPU kernels and its int8 quantizers
  take float32 (a float64 conv has no kernel there, and no quantizer touched a float64
  graph), and a bfloat16 output failed the default metric (``Got unsupported ScalarType
  BFloat16``).

``metric`` and ``loss`` always receive torch tensors: a model's output in torch, and an ONNX
Runtime output converted with ``torch.from_numpy``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from petra.errors import first_line
from petra.tasks.bags import bag_stand_ins
from petra.tasks.stand_ins import (
    buffers_as_parameters,
    frozen_norms,
    linear_stand_ins,
    plain_weights,
)
from petra.tasks.widths import own_width_forwards

if TYPE_CHECKING:
    from petra.tasks import Task


#: The names :func:`first_tensor` prefers in a dict or ``ModelOutput``, in order.
OUTPUT_KEYS = ("logits", "last_hidden_state")


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``: itself, or those in its dict values, tuples and lists."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, tuple | list):
        return [t for v in value for t in tensors_in(v)]
    return []


def first_tensor(output: Any) -> torch.Tensor:
    """The default ``Task.output``: a tensor as it is; from a dict or ``ModelOutput``, its
    ``logits``, else its ``last_hidden_state``, else its first tensor; from a tuple or list,
    its first tensor.

    Raises:
        TypeError: when the output holds no tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # ModelOutput is an OrderedDict
        for key in OUTPUT_KEYS:
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        raise TypeError(f"the model returned {type(output).__name__}; give the task an "
                        "`output` function that picks one tensor")
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"the model's {type(output).__name__} output holds no tensor; give the task "
                    "an `output` function that picks one")


def input_names(example: Any) -> tuple[str, ...]:
    """The ONNX input names of a task's inputs (see the module docstring)."""
    if isinstance(example, torch.Tensor):
        return ("input",)
    if isinstance(example, Mapping):
        return tuple(str(k) for k in example)
    if isinstance(example, (tuple, list)):
        return tuple(f"input_{i}" for i in range(len(example)))
    raise TypeError(f"example_input must be a tensor, a tuple or a dict of tensors; got "
                    f"{type(example).__name__}")


def as_tuple(inputs: Any, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """A batch's inputs in canonical form: a tuple of tensors in the order of ``names``."""
    if isinstance(inputs, torch.Tensor):
        values: tuple[Any, ...] = (inputs,)
    elif isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise KeyError(f"a batch lacks the input {missing[0]!r} that example_input has")
        values = tuple(inputs[n] for n in names)
    else:
        values = tuple(inputs)
    if len(values) != len(names):
        raise ValueError(f"a batch has {len(values)} inputs; example_input has {len(names)}")
    return tuple(full(v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)))
                 for v in values)


#: The floating dtypes petra computes in float32 (:func:`adapt`).
CAST = (torch.float16, torch.bfloat16, torch.float64)


def full(value: Any) -> Any:
    """``value`` in float32 where it is a tensor of a dtype of :data:`CAST`; as it is
    otherwise."""
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in CAST else value


def args(inputs: Any) -> tuple[Any, ...]:
    """The positional arguments of a canonical model for ``inputs``: a tuple as it is, a
    single tensor as a 1-tuple (so ``model(*args(x))`` serves both)."""
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


def feed(inputs: Sequence[Any], names: Sequence[str]) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed of canonical ``inputs``."""
    return {n: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for n, v in zip(names, inputs, strict=True)}


def to_torch(value: Any) -> Any:
    """``value`` as a torch tensor when it is a numpy array (ONNX Runtime's outputs)."""
    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) \
        else value


def batch_size(targets: Any) -> int:
    """The number of samples in a batch, read off its targets."""
    return int(targets.shape[0]) if hasattr(targets, "shape") and len(targets.shape) \
        else len(targets)


class TaskModel(nn.Module):
    """The user's model, called with a tuple of tensors and returning one tensor.

    The user's model is not a child: this module *shares* its ``_modules``, ``_parameters`` and
    ``_buffers``, so ``named_modules()``, ``state_dict()`` and every in-place change (channel
    removal, block skipping) read and write the user's model under the user's names.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], keyword: bool,
                 output: Callable[[Any], Any] = first_tensor) -> None:
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        object.__setattr__(self, "inner", model)
        object.__setattr__(self, "output_fn", output)
        self.input_names = tuple(names)
        self.keyword = keyword

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.outputs(*inputs)[0]

    def outputs(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The task's output and everything the user's model returned (an auxiliary head's
        output too, which the task does not read but the model computes)."""
        if self.keyword:
            raw = self.inner(**dict(zip(self.input_names, inputs, strict=True)))
        else:
            raw = self.inner(*inputs)
        out = self.output_fn(raw)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the task's output function returned {type(out).__name__}, "
                            "not a tensor")
        return out, raw

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        self.inner.training = mode  # the user's root module reads its own flag too
        return self


class CanonicalBatches:
    """Re-iterable batches with their inputs in canonical form; ``len`` when the source has it."""

    def __init__(self, source: Iterable[Any], names: Sequence[str]) -> None:
        self.source, self.names = source, tuple(names)

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], Any]]:
        for batch in self.source:
            if isinstance(batch, Mapping) or not isinstance(batch, Sequence) or len(batch) != 2:
                what = (f"a dict with keys {list(batch)}" if isinstance(batch, Mapping)
                        else f"a {type(batch).__name__}" + (
                            f" of {len(batch)}" if isinstance(batch, Sequence) else ""))
                raise TaskError(f"each batch must be a pair (inputs, targets); one is {what}: "
                                "split it into the model's inputs and the targets")
            inputs, targets = batch
            yield as_tuple(inputs, self.names), full(targets)



class SizedCanonicalBatches(CanonicalBatches):
    """:class:`CanonicalBatches` of a source with a length (a DataLoader, a list)."""

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]


def adapt(task: Task) -> Any:
    """Put ``task`` (a :class:`petra.Task`) in canonical form, in place; returns it.

    Raises:
        TypeError, ValueError: for inputs or outputs outside the contract.
    """
    if isinstance(task.model, TaskModel):
        return task
    # torch.compile's wrapper: its graph is compiled for the weights as they are, and it hides
    # the layers from the trace (`'*' matches no prunable layer`); petra compresses the model
    if type(task.model).__name__ == "OptimizedModule":
        task.model = task.model._orig_mod
    if isinstance(task.model, torch.jit.ScriptModule) or not isinstance(task.model, nn.Module):
        raise TypeError(
            f"model is a {type(task.model).__name__}, not an nn.Module in Python: petra "
            "rebuilds the layers it prunes, which a TorchScript module (torch.jit.script or "
            "torch.jit.load) cannot have; give the model's Python class with its weights")
    example = task.example_input
    names = input_names(example)
    keyword = isinstance(example, Mapping)
    cast = {str(t.dtype).removeprefix("torch.") for t in (*task.model.parameters(),
                                                          *task.model.buffers())
            if t.dtype in CAST}
    if cast:  # ONNX Runtime's CPU kernels, and its int8 quantizers, take float32
        task.model.float()
        task.cast_from = ", ".join(sorted(cast))
    task.model = TaskModel(task.model, names, keyword, task.output or first_tensor)
    task.example_input = as_tuple(example, names)
    no_fast_path(task.model)
    task.plain_weights = plain_weights(task.model)
    task.linear_stand_ins = linear_stand_ins(task.model, task.example_input)
    task.frozen_norms = frozen_norms(task.model, task.example_input)
    task.buffer_parameters = buffers_as_parameters(task.model, task.example_input)
    task.own_width = own_width_forwards(task.model, task.example_input)
    task.bag_stand_ins = bag_stand_ins(task.model, task.example_input)
    task.input_names = names
    for split in ("train", "val", "test"):
        source = getattr(task, split)
        wrap = SizedCanonicalBatches if hasattr(source, "__len__") else CanonicalBatches
        setattr(task, split, wrap(source, names))
    task.model.varying_axes = varying_axes(task, names)
    return task


def varying_axes(task: Any, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The axes past the batch axis of each input whose size differs from the example's in
    the first batches of the splits (dynamic padding: each batch padded to its own longest);
    they are dynamic axes of every export, as the batch axis is."""
    import itertools

    found: dict[int, set[int]] = {}
    for split, count in (("val", 8), ("test", 8), ("train", 4)):
        for inputs, _ in itertools.islice(getattr(task, split), count):
            for i, (x, ref) in enumerate(zip(inputs, task.example_input, strict=False)):
                if isinstance(x, torch.Tensor) and isinstance(ref, torch.Tensor) \
                        and x.dim() == ref.dim():
                    found.setdefault(i, set()).update(
                        a for a in range(1, x.dim()) if x.shape[a] != ref.shape[a])
    return {names[i]: tuple(sorted(axes)) for i, axes in found.items() if axes}


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``. A tensor a forward left in an attribute of a module, computed
    with grad on (LeViT caches its attention biases so, in eval mode), cannot be deep-copied:
    ``petra space`` died in a traceback (``Only Tensors created explicitly by the user (graph
    leaves) support the deepcopy protocol``). Such tensors are detached first, in place."""
    import copy

    def leaf(value: Any) -> Any:
        return value.detach() if isinstance(value, torch.Tensor) and not value.is_leaf else value

    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                module.__dict__[key] = value.detach()
            elif isinstance(value, dict) and any(leaf(v) is not v for v in value.values()):
                value.update({k: leaf(v) for k, v in value.items()})
    return copy.deepcopy(model)


def no_fast_path(model: nn.Module) -> None:
    """Turn off the nested-tensor fast path of every ``nn.TransformerEncoder`` in ``model``.

    torch takes it in eval mode where a padding mask is given (``enable_nested_tensor``, on by
    default): its layers then pass nested tensors, whose shapes no forward hook can read, and
    it returns zeros at the padded positions, where the exported ONNX graph, which never takes
    it, computes what the other positions attend to. petra measures the artifact, so torch
    computes as the artifact does; a pruned layer or a skipped one needs it off too.
    """
    for owner in model.modules():
        if isinstance(owner, nn.TransformerEncoder):
            owner.use_nested_tensor = False


class TaskError(ValueError):
    """A task function that raised on the task's own data, named with its error in one line."""


def _deterministic(model: nn.Module, example_input: Sequence[Any], name: str) -> None:
    """Two forwards of the example batch in eval mode, which must agree: petra verifies each
    compression by comparing outputs, and measures a candidate's accuracy once.

    Raises:
        TaskError: where they differ (a forward that samples, as a VAE's ``randn_like``, or
            that updates a state it reads).
    """
    first, second = (tensors_in(model(*example_input)) for _ in range(2))
    diff = max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(
        1e-12)).item() for a, b in zip(first, second, strict=True)
        if a.shape == b.shape and a.is_floating_point() and a.numel()) if first else 0.0
    if diff > 1e-5 or [t.shape for t in first] != [t.shape for t in second]:
        raise TaskError(
            f"the model's forward of task {name!r} is not deterministic in eval mode: two "
            f"forwards of the example batch differ (by {diff:.2g} of the output's largest "
            "value); petra checks each compression by comparing outputs, so a forward must not "
            "sample in eval mode (a VAE's randn_like: use the mean there) nor change a state it "
            "reads")


def _train_forward(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """The output of a copy of ``model`` in train mode on ``batch``, and its targets: the
    fine-tune's form (a model may return another output, or run other layers, only in
    training); the copy keeps the model's norms' statistics."""
    inputs, targets = batch
    return copy_model(model).train()(*inputs), targets


def check(task: Task, name: str) -> None:
    """Run the task's model, loss and metric once, in torch, on its own batches, then the model
    and the loss once more in train mode, on a copy, as the fine-tune runs them.

    Raises:
        TaskError: naming the function that raised (``forward``, ``loss`` or ``metric``) and
            its error, in one line.
    """

    def first(split: str) -> Any:
        batch = next(iter(getattr(task, split)), None)
        if batch is None:
            raise TaskError(f"the task {name!r} has an empty {split} split")
        targets = batch[1]
        if isinstance(targets, torch.Tensor) and targets.dim() and not len(targets):
            # an empty batch reached the metric as nan (a split sliced past its data's end)
            raise TaskError(f"the first batch of the task {name!r}'s {split} split holds no "
                            "examples")
        return batch

    model = task.model
    was_training = model.training
    model.eval()
    stage, mode = "forward", ""
    try:
        with torch.no_grad():
            _deterministic(model, task.example_input, name)
            inputs, targets = first("train")
            outputs = model(*inputs)
            stage = "loss"
            loss = task.loss(outputs, targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"must return a scalar tensor; got {type(loss).__name__}")
            stage = "forward"
            inputs, targets = first("val")
            outputs = model(*inputs)
            stage = "metric"
            value = float(task.metric(outputs, targets))
            if value != value:
                raise ValueError("returned nan")
            stage, mode = "forward", " in train mode (as the fine-tune runs it)"
            outputs, targets = _train_forward(model, first("train"))
            stage = "loss"
            task.loss(outputs, targets)
    except TaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's function can raise anything
        fn = {"forward": "model's forward", "loss": "loss", "metric": "metric"}[stage]
        hint = ""
        if stage == "forward" and isinstance(exc, TypeError) and getattr(
                model, "keyword", False) and any(
                m in str(exc) for m in ("unexpected keyword", "required positional")):
            hint = (" (a dict input is passed to the model as keywords: forward("
                    + ", ".join(model.input_names) + "))")
        raise TaskError(f"the {fn} of task {name!r} raised {type(exc).__name__}{mode}: "
                        f"{first_line(exc, typed=False)}{hint}") from exc
    finally:
        model.train(was_training)
