"""Contract tests run against every built-in task in ``TASKS`` (a new task is tested unedited).

Every module of :mod:`petra.tasks` is imported, so whatever it registers is collected. Each task
is built small: the parameters of :data:`SMALL` that its function accepts are passed. Tasks are
put in canonical form (:func:`petra.tasks.contract.adapt`), as :func:`petra.tasks.load_task`
does, so a task whose inputs are a dict (``text_bert``) is tested like one with a tensor.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import time

import numpy as np
import pytest
import torch

import petra.tasks
from petra.candidate import artifact
from petra.space import prunable_layers
from petra.tasks import TASKS, Task
from petra.tasks.contract import adapt, feed

for _module in pkgutil.iter_modules(petra.tasks.__path__):
    importlib.import_module(f"petra.tasks.{_module.name}")

NAMES = TASKS.names()

# Shrinks the work of any task whose function accepts these parameters.
SMALL = {"num_samples": 600, "n_sequences": 400, "width": 8, "hidden": 16, "heads": 2,
         "layers": 1}

# Test accuracy of the default baseline (1 thread, default recipe), measured with a margin:
# digits_cnn 0.99, digits_mlp 0.97-0.98, mnist1d_cnn 0.977-0.982, events_gru 0.973-0.98
# over seeds 0-2; digits_vit 0.964, digits_mobilenet 0.997, events_lstm 0.967, text_bert 0.970
# on seed 0. A task not listed must at least beat DEFAULT_MIN_ACCURACY.
BASELINE_MIN_ACCURACY = {"digits_cnn": 0.95, "digits_mlp": 0.94, "mnist1d_cnn": 0.94,
                         "events_gru": 0.93, "digits_vit": 0.93, "digits_mobilenet": 0.95,
                         "events_lstm": 0.93, "text_bert": 0.9}
DEFAULT_MIN_ACCURACY = 0.6


def small_params(name: str, **extra: object) -> dict[str, object]:
    accepted = inspect.signature(TASKS.get(name).fn).parameters
    params = {k: v for k, v in SMALL.items() if k in accepted}
    params.update(extra)
    return params


def build(name: str, **extra: object) -> Task:
    """The task, small, in canonical form: every batch's inputs are a tuple of tensors."""
    return adapt(TASKS.get(name).fn(**small_params(name, **extra)))


def digests(batches) -> set[str]:
    """One digest per sample, over all of its inputs."""
    out = set()
    for inputs, _ in batches:
        for i in range(len(inputs[0])):
            sha = hashlib.sha1()
            for x in inputs:
                sha.update(np.ascontiguousarray(x[i].numpy()).tobytes())
            out.add(sha.hexdigest())
    return out


def batch_len(inputs) -> int:
    return len(inputs[0])


def equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def first_batch(batches):
    return next(iter(batches))


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    torch.set_num_threads(1)
    return request.param, build(request.param)


def test_the_new_builtin_tasks_are_registered():
    assert {"digits_cnn", "digits_mlp", "mnist1d_cnn", "events_gru", "digits_vit",
            "digits_mobilenet", "events_lstm", "text_bert"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_documented_and_takes_the_common_params(name):
    entry = TASKS.get(name)
    assert entry.description and "\n" not in entry.description
    accepted = inspect.signature(entry.fn).parameters
    assert {"seed", "latency_batch"} <= set(accepted)
    assert accepted["latency_batch"].default == 16


def test_builds_a_task_with_nonempty_disjoint_splits(built):
    _name, task = built
    assert isinstance(task, Task)
    assert isinstance(task.model, torch.nn.Module)
    sizes = {split: sum(len(y) for _, y in getattr(task, split)) for split in ("train", "val", "test")}
    assert all(n > 0 for n in sizes.values()), sizes
    if "splits" in task.info:
        assert task.info["splits"] == sizes
    train, val, test = (digests(getattr(task, s)) for s in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == sum(sizes.values())  # no sample in two splits
    assert task.train_epochs > 0 and task.train_lr > 0


def test_example_input_gives_batch_by_classes_logits(built):
    _name, task = built
    assert batch_len(task.example_input) == 16  # the default latency_batch
    task.model.eval()
    with torch.no_grad():
        out = task.model(*task.example_input)
    labels = torch.cat([y for split in (task.train, task.val, task.test) for _, y in split])
    assert out.shape == (16, out.shape[1]) and out.shape[1] > int(labels.max())
    assert labels.dtype == torch.int64 and int(labels.min()) >= 0
    x, y = first_batch(task.val)
    with torch.no_grad():
        score = task.metric(task.model(*x), y)
    assert 0.0 <= score <= 1.0
    assert torch.isfinite(task.loss(task.model(*x), y))


@pytest.mark.parametrize("name", NAMES)
def test_latency_batch_sets_the_example_batch(name):
    task = build(name, latency_batch=5)
    assert batch_len(task.example_input) == 5


def test_onnx_artifact_reproduces_torch(built):
    _name, task = built
    task.model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, which the export folds
        for x, _ in list(task.train)[:3]:
            task.model(*x)
    task.model.eval()
    session = artifact.load(artifact.pack(artifact.export_onnx(task.model, task.example_input)))
    x_val, _ = first_batch(task.val)
    one = tuple(t[:1] for t in x_val)
    for x in (task.example_input, x_val, one):  # the batch axis is dynamic
        with torch.no_grad():
            expected = task.model(*x).numpy()
        got = session.run(None, feed(x, task.input_names))[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_prunable_layers_keep_the_classifier(built):
    _name, task = built
    layers = prunable_layers(task.model, task.example_input)
    assert layers, "no prunable layer"
    assert not layers[-1].structured  # the classifier: its outputs are the model's outputs
    assert any(layer.structured for layer in layers[:-1]) or len(layers) == 1


@pytest.mark.parametrize("name", NAMES)
def test_seed_determines_the_data_and_the_model(name):
    a, b, c = build(name, seed=0), build(name, seed=0), build(name, seed=1)
    for split in ("train", "val", "test"):
        # shuffled splits draw their order from torch's generator, which train() seeds
        torch.manual_seed(7)
        xa, ya = first_batch(getattr(a, split))
        torch.manual_seed(7)
        xb, yb = first_batch(getattr(b, split))
        assert equal(xa, xb) and torch.equal(ya, yb)
    assert equal(a.example_input, b.example_input)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # another seed draws other data: the unshuffled validation split differs
    assert not equal(first_batch(a.val)[0], first_batch(c.val)[0])
    torch.manual_seed(7)
    train_a = first_batch(a.train)[0]
    torch.manual_seed(7)
    assert not equal(train_a, first_batch(c.train)[0])


def test_events_labels_follow_the_burst_rule():
    from petra.tasks.events import BURST, RISKY, TINY_GAP, is_fraud, make_sequences

    amount = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    gap = np.array([1.0, TINY_GAP / 2, TINY_GAP / 2, 1.0, 1.0])
    risky = np.array([RISKY[0]] * 5)
    assert BURST == 3
    assert is_fraud(amount, gap, risky)
    assert not is_fraud(amount[::-1], gap, risky)  # falling amounts
    assert not is_fraud(amount, gap * 10, risky)  # not rapid
    assert not is_fraud(amount, gap, np.zeros(5, dtype=int))  # everyday category
    x, y = make_sequences(300, seed=0)
    assert x.shape == (300, 32, 10) and x.dtype == np.float32
    assert 0.3 < y.mean() < 0.7
    onehot = x[..., 2:]
    assert np.array_equal(onehot.sum(-1), np.ones((300, 32), dtype=np.float32))


def test_text_labels_follow_the_topic_rule():
    from petra.tasks.text import CLS, MARGIN, N_TOPICS, PAD, SEP, make_sentences, topic_words

    assert 0 not in topic_words(0) and len(set(topic_words(0)) & set(topic_words(1))) == 0
    ids, mask, y = make_sentences(300, vocab_size=512, max_length=20, seed=0)
    assert ids.shape == mask.shape == (300, 20) and ids.dtype == mask.dtype == np.int64
    assert set(y.tolist()) == set(range(N_TOPICS))
    for row, m, label in zip(ids, mask, y, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # left-aligned, then padding
        assert row[0] == CLS and row[n - 1] == SEP and (row[n:] == PAD).all()
        counts = [int(np.isin(row, topic_words(t)).sum()) for t in range(N_TOPICS)]
        assert counts[label] >= 2
        assert all(counts[label] - c >= MARGIN for t, c in enumerate(counts) if t != label)
    again = make_sentences(300, vocab_size=512, max_length=20, seed=0)
    assert all(np.array_equal(u, v) for u, v in zip((ids, mask, y), again, strict=True))


def test_text_bert_takes_a_dict_of_ids_and_mask():
    task = build("text_bert", latency_batch=4)
    assert task.input_names == ("input_ids", "attention_mask")
    assert all(t.dtype == torch.int64 and t.shape == (4, 24) for t in task.example_input)
    config = task.model.bert.config
    assert config._attn_implementation == "eager"  # the ONNX export needs it
    full = TASKS.get("text_bert").fn(num_samples=100).model.bert.config
    assert (full.num_hidden_layers, full.hidden_size, full.num_attention_heads,
            full.intermediate_size) == (6, 384, 12, 1536)  # MiniLM-L6's shape


def test_text_bert_val_samples_grows_the_val_split_and_leaves_train_and_test_alone():
    small, large = build("text_bert"), build("text_bert", val_samples=500)
    assert len(digests(small.val)) == 90 and len(digests(large.val)) == 500
    for split in ("train", "test"):
        assert digests(getattr(small, split)) == digests(getattr(large, split))
    assert digests(small.val) < digests(large.val)  # the default split, and more after it
    assert not digests(large.val) & (digests(large.train) | digests(large.test))
    assert len(digests(build("text_bert", val_samples=40).val)) == 40
    with pytest.raises(ValueError, match="val_samples must be at least 1; got 0"):
        TASKS.get("text_bert").fn(num_samples=100, val_samples=0)


def test_text_bert_without_transformers_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install petra\[transformers\]"):
        TASKS.get("text_bert").fn(num_samples=100)


def test_events_lstm_is_events_gru_with_an_lstm():
    gru, lstm = build("events_gru"), build("events_lstm")
    assert isinstance(lstm.model.lstm, torch.nn.LSTM) and not hasattr(lstm.model, "gru")
    assert (lstm.model.lstm.num_layers, lstm.model.lstm.bidirectional) == (1, False)
    assert lstm.model.lstm.batch_first
    for split in ("val", "test"):  # the same data
        assert torch.equal(first_batch(getattr(gru, split))[1],
                           first_batch(getattr(lstm, split))[1])


def test_digits_vit_exports_and_leaves_torch_fastpath_alone():
    task = build("digits_vit")
    enabled = torch.backends.mha.get_fastpath_enabled()
    task.model.eval()
    with torch.no_grad():
        task.model(*task.example_input)
    assert torch.backends.mha.get_fastpath_enabled() == enabled
    assert isinstance(task.model.encoder, torch.nn.TransformerEncoder)


def test_mobilenet_blocks_are_inverted_residuals():
    task = build("digits_mobilenet", width=8)
    depthwise = [m for m in task.model.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert [b.use_residual for b in task.model.blocks] == [True, False, True, False, True]


def test_mnist1d_generation_leaves_global_rng_alone():
    import random

    from petra.tasks.mnist1d import mnist1d_arrays

    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    x, y = mnist1d_arrays(200, seed=7)
    assert (np.random.random(), random.random()) == expected
    assert x.shape == (200, 40) and x.dtype == np.float32 and set(y.tolist()) == set(range(10))
    x[:] = 0  # callers get copies; the cache is untouched
    assert mnist1d_arrays(200, seed=7)[0].any()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_default_baseline_trains_to_a_good_accuracy(name, tmp_path):
    from petra.candidate.baseline import prepare_baseline

    torch.set_num_threads(1)
    start = time.perf_counter()
    task = adapt(TASKS.get(name).fn())
    baseline = prepare_baseline(task, task_name=name, task_params={}, cache_dir=tmp_path)
    elapsed = time.perf_counter() - start
    accuracy = baseline.metrics["test_accuracy"]
    print(f"{name}: test accuracy {accuracy:.4f}, built and trained in {elapsed:.1f}s")
    assert accuracy >= BASELINE_MIN_ACCURACY.get(name, DEFAULT_MIN_ACCURACY)
