"""Tests for petra.candidate.train, petra.tasks (built-in and user tasks) and the cached baseline."""

import copy
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from petra.candidate import artifact
from petra.candidate.baseline import prepare_baseline
from petra.candidate.train import evaluate_metric, train
from petra.tasks import Task, load_task
from tests.conftest import TINY_TASK

REPO = Path(__file__).resolve().parent.parent


def synthetic(n=256, seed=0):
    """A linearly separable 3-class problem in 8 dimensions, in batches of 32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3].argmax(1)).long()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def ce(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets)


def members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- train -----------------------------------------------------------------------------------


def test_masked_weights_stay_exactly_zero(tiny_task):
    task, _ = tiny_task
    model = copy.deepcopy(task.model)
    weight = model.layer2.conv2.weight
    mask = (torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    before = weight.detach().clone()
    train(model, task.train, epochs=1, lr=1e-3, loss_fn=task.loss,
          masks={"layer2.conv2.weight": mask})
    after = model.layer2.conv2.weight.detach()
    assert torch.all(after[mask == 0] == 0)
    assert not torch.equal(after[mask == 1], before[mask == 1])  # the rest did train
    assert not model.training  # returned in eval mode


class TiedLM(nn.Module):
    """An embedding whose table is also the output layer's weight (a GPT's tied head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(8, 16), nn.Linear(16, 8, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def test_a_mask_on_a_tied_weight_is_kept_by_the_name_it_was_pruned_by():
    """A tied head pruned by magnitude failed every candidate with a fine-tune (KeyError:
    'lm_head.weight'): the tied weight is listed once, under the embedding's name."""
    model = TiedLM()
    mask = (torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    ids = torch.randint(0, 8, (32, 4), generator=torch.Generator().manual_seed(1))
    batches = [(ids, ids[:, 0])]
    train(model, batches, epochs=2, lr=1e-2, loss_fn=ce, masks={"head.weight": mask})
    assert model.head.weight is model.emb.weight
    assert torch.all(model.emb.weight[mask == 0] == 0)
    assert torch.all(model.emb.weight[mask == 1] != 0)


def test_zero_epochs_leave_the_model_unchanged(tiny_task):
    task, _ = tiny_task
    model = copy.deepcopy(task.model)
    before = snapshot(model)
    assert train(model, task.train, epochs=0, lr=1.0, loss_fn=task.loss) is model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_loss_decreases_on_the_tiny_task():
    task = load_task(TINY_TASK["name"], TINY_TASK["params"])  # untrained
    losses = []
    train(task.model, task.train, epochs=3, lr=5e-3, loss_fn=task.loss,
          report=lambda epoch, loss: losses.append((epoch, loss)))
    assert [epoch for epoch, _ in losses] == [0, 1, 2]
    assert losses[-1][1] < 0.7 * losses[0][1]
    assert evaluate_metric(task.model, task.val, task.metric) > 0.5


def test_same_seed_trains_the_same_weights():
    a, b = small_mlp(), small_mlp()
    train(a, synthetic(), epochs=2, lr=1e-2, loss_fn=ce, seed=3)
    train(b, synthetic(), epochs=2, lr=1e-2, loss_fn=ce, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_penalty_is_added_to_the_loss():
    def weight_norm(model):
        with torch.no_grad():
            return float(sum(p.abs().sum() for n, p in model.named_parameters() if "weight" in n))

    plain, penalized = small_mlp(), small_mlp()
    train(plain, synthetic(), epochs=3, lr=1e-2, loss_fn=ce)
    train(penalized, synthetic(), epochs=3, lr=1e-2, loss_fn=ce,
          penalty=lambda m, x, out, y: 1e-2 * sum(p.abs().sum() for p in m.parameters()))
    assert weight_norm(penalized) < 0.8 * weight_norm(plain)


# --- built-in tasks --------------------------------------------------------------------------


def test_digits_splits_are_disjoint_and_cover_the_dataset():
    task = load_task("digits_cnn", {"width": 8})
    sizes = task.info["splits"]
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    assert sum(sizes.values()) == 1797
    rows = {}
    for split in ("train", "val", "test"):
        batches = list(getattr(task, split))
        assert sum(len(y) for _, y in batches) == sizes[split]
        # load_task puts the inputs in canonical form: a tuple of tensors
        assert all(len(x) == 1 and x[0].shape[1:] == (1, 8, 8) and x[0].dtype == torch.float32
                   for x, _ in batches)
        rows[split] = {bytes(x.numpy()) for (xb,), _ in batches for x in xb}
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]
    assert task.example_input[0].shape == (16, 1, 8, 8)
    with torch.no_grad():
        assert task.model(*task.example_input).shape == (16, 10)


def test_train_batches_reshuffle_each_pass_but_val_does_not():
    task = load_task("digits_cnn", {"width": 8})
    first, second = (next(iter(task.train))[1] for _ in range(2))
    assert not torch.equal(first, second)
    assert torch.equal(next(iter(task.val))[1], next(iter(task.val))[1])


def test_unknown_built_in_task_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown task 'digits_xl'.*digits_cnn"):
        load_task("digits_xl")


# --- user tasks ------------------------------------------------------------------------------


def test_user_task_from_an_import_string(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    task = load_task("tests.user_task:iris_mlp", {"hidden": 5})
    assert isinstance(task, Task)
    # params reach the function as keyword arguments
    assert task.model.inner[0].out_features == 5
    assert task.example_input[0].shape == (8, 4)
    assert sum(len(y) for _, y in task.train) == 90
    assert task.model(*task.example_input).shape == (8, 3)
    assert (task.train_epochs, task.train_lr) == (30, 1e-2)


def test_user_task_goes_through_the_baseline_like_a_built_in(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO))
    task = load_task("tests.user_task:iris_mlp")
    baseline = prepare_baseline(task, task_name="tests.user_task:iris_mlp", task_params={},
                                cache_dir=tmp_path)
    assert not baseline.cached
    assert baseline.metrics["val_accuracy"] > 0.8
    assert baseline.metrics["params"] == 4 * 8 + 8 + 8 * 3 + 3


@pytest.mark.parametrize("name", ["tests.no_such_module_xyz:build", "tests.user_task:missing"])
def test_bad_import_string_raises_value_error_naming_it(monkeypatch, name):
    monkeypatch.syspath_prepend(str(REPO))
    with pytest.raises(ValueError, match="cannot import") as info:
        load_task(name)
    assert repr(name) in str(info.value)


def test_a_function_that_returns_no_task_is_rejected(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    with pytest.raises(ValueError, match=r"must return a petra.Task; got dict"):
        load_task("tests.user_task:not_a_task")


# --- the cached baseline ---------------------------------------------------------------------


def test_prepare_baseline_trains_once_then_loads_from_the_cache(tmp_path):
    def prepare():
        task = load_task(TINY_TASK["name"], TINY_TASK["params"])
        return task, prepare_baseline(task, task_name=TINY_TASK["name"],
                                      task_params=TINY_TASK["params"], cache_dir=tmp_path)

    _, first = prepare()
    assert not first.cached
    assert [p.name for p in tmp_path.iterdir()] == [f"baseline-{first.key}.pt"]
    task, second = prepare()
    assert second.cached
    assert second.key == first.key
    # the archive's members, not its raw bytes: zip headers carry the packing time (see
    # test_artifact.py::test_pack_is_deterministic)
    assert members(second.artifact) == members(first.artifact)
    assert second.state == first.state
    assert second.metrics["val_accuracy"] == first.metrics["val_accuracy"]
    assert first.metrics["val_accuracy"] > 0.8
    assert first.bytes == len(first.artifact)
    # task.model holds the baseline weights afterwards
    with torch.no_grad():
        logits = task.model(*task.example_input).numpy()
    assert np.isfinite(logits).all()
    assert evaluate_metric(task.model, task.val, task.metric) == pytest.approx(
        first.metrics["val_accuracy"], abs=0.01)


def test_a_task_changed_under_its_name_is_trained_again(tmp_path):
    """The cache was keyed by the task's name, params and seed: a model made wider under the
    same name died loading the old weights (``size mismatch for blocks.0.conv1.bias``), and
    relabelled data reused the weights trained on the old labels (the baseline read val 0.0,
    with no warning). A forward edited alone computes something else, too."""
    from torch import nn

    from petra.tasks.contract import adapt
    from tests.user_task import iris_mlp

    def prepare(change: str = ""):
        task = iris_mlp()
        task.train_epochs = 2
        if change == "labels":
            task.val = [(x, (y + 1) % 3) for x, y in task.val]
        elif change == "width":
            task.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        elif change == "forward":
            class Net(nn.Sequential):
                def forward(self, x: torch.Tensor) -> torch.Tensor:
                    return super().forward(2 * x)

            task.model = Net(*task.model)
        elif change == "weights":
            task.trained = True
        return prepare_baseline(adapt(task), task_name="iris", task_params={},
                                cache_dir=tmp_path)

    first = prepare()
    keys = {first.key}
    for change in ("labels", "width", "forward", "weights"):
        again = prepare(change)
        assert not again.cached and again.key not in keys, change
        keys.add(again.key)
    assert prepare().cached


@pytest.mark.parametrize("batches, epochs", [(1, 1), (1, 2), (4, 1), (2, 3)])
def test_a_run_too_short_for_the_one_cycle_schedule_trains_at_the_peak_lr(batches, epochs):
    """OneCycleLR divides by zero under 5 steps: such a run keeps the peak lr, and learns."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(32, 4)
    data = [(x, (x[:, 0] > 0).long())] * batches
    before = float(nn.functional.cross_entropy(model(x), data[0][1]))
    train(model, data, epochs=epochs, lr=0.1, loss_fn=nn.functional.cross_entropy)
    assert float(nn.functional.cross_entropy(model(x), data[0][1])) < before


def test_the_baseline_counts_its_val_examples_and_warns_when_too_few_errors_to_rank(tmp_path):
    from petra.candidate.baseline import FEW_VAL_ERRORS, Baseline, describe

    task = load_task(TINY_TASK["name"], TINY_TASK["params"])
    baseline = prepare_baseline(task, task_name=TINY_TASK["name"],
                                task_params=TINY_TASK["params"], cache_dir=tmp_path)
    n = sum(len(y) for _, y in task.val)
    assert baseline.metrics["val_examples"] == n
    assert describe(baseline).startswith(f"baseline: val {baseline.metrics['val_accuracy']:.4f}"
                                         f" of {n} examples, test ")

    def line(val_accuracy, examples=300, metric=None):
        b = Baseline(state=b"", artifact=b"", metrics={
            "val_accuracy": val_accuracy, "val_examples": examples, "test_accuracy": 0.9,
            "artifact_bytes": 1000.0, "latency_ms": 1.0})
        return describe(b) if metric is None else describe(b, metric)

    few = (FEW_VAL_ERRORS - 1) / 300
    assert "warning: the dense model errs on 9 of 300 validation examples" in line(1 - few)
    assert "a few examples (0.0033 each) apart" in line(1 - few)
    assert "warning" not in line(1 - (FEW_VAL_ERRORS + 1) / 300)  # enough errors to rank
    assert "warning" not in line(1 - few, metric=lambda out, y: 0.0)  # not an accuracy
    b = Baseline(state=b"", artifact=b"", metrics={
        "val_accuracy": 0.5, "val_examples": 300, "test_accuracy": 0.5, "artifact_bytes": 1.0,
        "latency_ms": 1.0})
    assert "note: the model's weights are bfloat16; petra computes" in describe(
        b, cast_from="bfloat16")
    assert "note" not in describe(b)
    b.classes = 4  # 0.5 of 300 on 4 classes: above chance (0.25) by more than the margin
    assert "chance" not in describe(b)
    b.metrics["val_accuracy"] = 0.26
    assert "warning: the dense model's val accuracy is near chance (0.25 for 4 classes)" in \
        describe(b)
    assert "chance" not in describe(b, metric=lambda out, y: 0.0)  # not an accuracy
    # a constant predictor of the most common class (an XGLM written outside the repo: val
    # 0.6783, the share of class 2, on 3 classes) was ranked with no word
    b.classes, b.metrics.update(val_accuracy=0.6783, val_majority=0.6783)
    assert "warning: the dense model's val accuracy is the share of the validation split's " \
        "most common class (0.6783)" in describe(b)
    b.metrics["val_accuracy"] = 0.70
    assert "warning" not in describe(b)


def test_the_majority_share_counts_class_labels_only():
    import torch

    from petra.candidate.baseline import majority_share

    labels = [(None, torch.tensor([2, 2, 1])), (None, torch.tensor([2, 0]))]
    assert majority_share(labels, 3) == pytest.approx(0.6)
    assert majority_share([(None, torch.rand(4))], 3) == 0.0  # regression targets
    assert majority_share([(None, torch.tensor([0, 5]))], 3) == 0.0  # not this head's classes


@pytest.mark.parametrize("how, says", [
    ("center", "computes something else than the model on the first validation batch"),
    ("add", "does not run in ONNX Runtime on the first validation batch"),
])
def test_an_artifact_that_fails_on_another_batch_size_is_one_line_on_the_task(
        monkeypatch, tmp_path, how, says):
    """A Mamba written outside the repo exported, then its artifact failed in ONNX Runtime on
    the validation batches: the search died in a traceback. Where it runs and computes
    something else, every candidate would have been measured wrong."""
    from petra.errors import ConfigError

    monkeypatch.syspath_prepend(str(REPO))
    task = load_task("tests.user_task:baked_batch", {"how": how})
    with pytest.raises(ConfigError, match="task.name") as info:
        prepare_baseline(task, task_name="tests.user_task:baked_batch", task_params={"how": how},
                         cache_dir=tmp_path)
    assert says in str(info.value) and "-1" in str(info.value)


def test_an_artifact_that_outputs_nan_where_the_model_does_passes_the_check():
    """A model may output NaN on purpose (a masked position); the check compared without
    ``equal_nan``, and stopped such a model though its artifact computes what it does. An
    artifact with NaN where the model gives a number is still told apart."""
    import torch
    from torch import nn

    from petra import Task
    from petra.candidate import artifact
    from petra.candidate.baseline import check_artifact
    from petra.errors import ConfigError
    from petra.tasks.contract import adapt

    class Masked(nn.Module):
        def __init__(self, where: int) -> None:
            super().__init__()
            self.fc, self.where = nn.Linear(4, 3), where

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(x)
            return torch.cat([out[:, :2], out[:, 2:] * float("nan")], 1) if self.where else out

    x = torch.randn(5, 4)
    batch = [(x, torch.zeros(5, dtype=torch.long))]
    for exported, run, ok in ((1, 1, True), (0, 1, False)):
        torch.manual_seed(0)
        session = artifact.load(artifact.pack(artifact.export_onnx(Masked(exported).eval(), (x,))))
        torch.manual_seed(0)
        task = adapt(Task(model=Masked(run).eval(), train=batch, val=batch, test=batch,
                          example_input=x, trained=True))
        if ok:
            check_artifact(task, "t", session)
        else:
            with pytest.raises(ConfigError, match="NaN in 5 places"):
                check_artifact(task, "t", session)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_half_or_double_precision_model_is_computed_in_float32_and_says_so(dtype):
    """A model handed over in bfloat16 stopped the command: the default metric raised ``Got
    unsupported ScalarType BFloat16``; one in float64 with a conv was refused (ONNX Runtime
    has no float64 Conv kernel), and without one had every quantization scheme withheld. ONNX
    Runtime's CPU kernels and int8 quantizers take float32, so the model, its inputs and its
    float targets are computed in float32, and ``task.cast_from`` says from what."""
    from torch import nn

    from petra import Task
    from petra.tasks.contract import adapt, check

    torch.manual_seed(0)
    x = torch.randn(6, 4)
    batch = [(x.to(dtype), torch.randn(6).to(dtype))]
    model = nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3), nn.Flatten(),
                          nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1), nn.Flatten(0))
    task = adapt(Task(model=model.to(dtype).eval(), train=batch, val=batch, test=batch,
                      example_input=x.to(dtype), trained=True,
                      loss=torch.nn.functional.mse_loss,
                      metric=lambda o, y: float(-(o - y).abs().mean())))
    assert task.cast_from == str(dtype).removeprefix("torch.")
    assert {t.dtype for t in (*task.model.parameters(), *task.model.buffers())
            if t.is_floating_point()} == {torch.float32}
    (inputs, targets), = list(task.val)
    assert inputs[0].dtype == targets.dtype == task.example_input[0].dtype == torch.float32
    check(task, "t")
    session = artifact.load(artifact.pack(artifact.export_onnx(task.model, task.example_input)))
    assert session.run(None, {"input": x.numpy()})[0].shape == (6,)


def test_a_compiled_model_is_searched_as_the_model_it_wraps():
    """``torch.compile``'s wrapper hid every layer: ``'*' matches no prunable layer of the
    model; its layers are (none)``."""
    from torch import nn

    from petra import Task
    from petra.space import prunable_layers
    from petra.tasks.contract import adapt

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batch = [(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))]
    task = adapt(Task(model=torch.compile(model), train=batch, val=batch, test=batch,
                      example_input=batch[0][0], trained=True))
    assert task.model.inner is model
    assert [layer.name for layer in prunable_layers(task.model, task.example_input)] == ["0", "2"]


@pytest.mark.parametrize("how, says", [
    ("script", "model is a RecursiveScriptModule, not an nn.Module in Python"),
    ("dict", "each batch must be a pair (inputs, targets); one is a dict with keys ['x', 'y']"),
])
def test_a_torchscript_model_or_a_dict_batch_is_one_line_on_the_task(how, says):
    """A TorchScript model died in a traceback (``'OrderedDictWrapper' object has no attribute
    'get'``); a batch given as one dict read as ``can't convert np.ndarray of type
    numpy.str_`` (its keys unpacked as inputs and targets)."""
    from torch import nn

    from petra import Task
    from petra.tasks.contract import adapt, check

    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(6, 4)
    batch = [{"x": x, "y": torch.zeros(6, dtype=torch.long)} if how == "dict"
             else (x, torch.zeros(6, dtype=torch.long))]
    with pytest.raises((TypeError, ValueError), match=re.escape(says)):
        check(adapt(Task(model=torch.jit.script(model) if how == "script" else model,
                         train=batch, val=batch, test=batch, example_input=x, trained=True)), "t")


def test_a_model_that_caches_a_tensor_computed_with_grad_is_copied():
    """LeViT caches its attention biases in eval mode; after a forward with grad on the cache
    held a non-leaf tensor, and ``petra space`` died deep-copying the model (``Only Tensors
    created explicitly by the user (graph leaves) support the deepcopy protocol``)."""
    import copy

    from torch import nn

    from petra.tasks.contract import copy_model

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.cache, self.last = nn.Linear(4, 3), {}, None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                self.cache["w"] = self.fc.weight * 2
            self.last = self.fc(x)
            return x @ self.cache["w"].T

    model, x = Cached().eval(), torch.randn(2, 4)
    want = model(x)  # grad on: the cache holds a tensor of the graph
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    twin = copy_model(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), want.detach())
    assert twin.fc.weight is not model.fc.weight
