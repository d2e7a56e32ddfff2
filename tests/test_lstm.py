"""LSTM hidden-unit pruning (``l2_units``), as for GRUs in test_blocks_recurrent.py."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import petra.compress  # noqa: F401  (fills the registries)
from petra.candidate import artifact
from petra.compress.recurrent import gru_layers, prune_recurrent, prune_units, recurrent_layers
from petra.registry import PRUNING
from tests.test_quantize import op_types, quantize


class LSTMNet(nn.Module):
    """Linear → LSTM → Linear head, reading ``out[:, -1]`` (``read="output"``) or ``h_n[-1]``."""

    def __init__(self, hidden: int = 12, width: int = 8, *, read: str = "output",
                 batch_first: bool = True, bias: bool = True, **lstm: object) -> None:
        super().__init__()
        self.read, self.batch_first = read, batch_first
        self.proj = nn.Linear(5, width)
        self.lstm = nn.LSTM(width, hidden, batch_first=batch_first, bias=bias, **lstm)
        self.head = nn.Linear(hidden * (2 if lstm.get("bidirectional") else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is (batch, time, 5) in every case; a time-major LSTM gets it transposed.
        seq = torch.relu(self.proj(x))
        out, (h_n, _c_n) = self.lstm(seq if self.batch_first else seq.transpose(0, 1))
        if self.read == "h_n":
            return self.head(h_n[-1])
        return self.head(out[:, -1] if self.batch_first else out[-1])


def example(**kwargs: object) -> tuple[LSTMNet, torch.Tensor]:
    torch.manual_seed(0)
    return LSTMNet(**kwargs).eval(), torch.randn(3, 7, 5)


@pytest.mark.parametrize("read, batch_first, bias", [
    ("output", True, True), ("h_n", True, True), ("output", False, True), ("h_n", False, False),
])
def test_lstm_units_are_removed_with_their_readers_columns(read, batch_first, bias):
    model, x = example(read=read, batch_first=batch_first, bias=bias)
    (info,) = recurrent_layers(model, (x,))
    assert info.name == "lstm" and info.hidden == 12 and info.consumers == ("head",)
    original = copy.deepcopy(model)
    keep = [0, 3, 4, 9, 11]
    prune_units(model, info, keep)
    lstm = model.lstm
    assert isinstance(lstm, nn.LSTM) and lstm.hidden_size == 5 and model.head.in_features == 5
    assert lstm.batch_first == batch_first and lstm.bias == bias
    assert lstm.weight_ih_l0.shape == (20, 8) and lstm.weight_hh_l0.shape == (20, 5)
    with torch.no_grad():
        assert model(x).shape == (3, 3)
    rows = [g * 12 + k for g in range(4) for k in keep]  # gates i, f, g, o
    assert torch.equal(lstm.weight_ih_l0, original.lstm.weight_ih_l0[rows])
    assert torch.equal(lstm.weight_hh_l0, original.lstm.weight_hh_l0[rows][:, keep])
    if bias:
        assert torch.equal(lstm.bias_ih_l0, original.lstm.bias_ih_l0[rows])
        assert torch.equal(lstm.bias_hh_l0, original.lstm.bias_hh_l0[rows])
    assert torch.equal(model.head.weight, original.head.weight[:, keep])


def test_a_frozen_lstm_and_its_reader_stay_frozen_when_they_lose_units():
    """The LSTM is rebuilt and its reader's weight replaced, as new parameters that require
    grad: a frozen LSTM became trainable in petra's fine-tune once it lost units."""
    model, x = example()
    model.lstm.requires_grad_(False)
    model.head.weight.requires_grad_(False)
    (info,) = recurrent_layers(model, (x,))
    prune_units(model, info, [0, 3, 4])
    assert not any(p.requires_grad for p in model.lstm.parameters())
    assert not model.head.weight.requires_grad and model.head.bias.requires_grad


def test_gru_layers_is_the_old_name_and_finds_lstms_too():
    model, x = example()
    assert gru_layers is recurrent_layers
    assert [i.name for i in gru_layers(model, (x,))] == ["lstm"]


@torch.no_grad()
def kill(lstm: nn.LSTM, units: list[int]) -> None:
    """Zero every weight of ``units``. A unit whose gate rows and biases are all zero has
    g = tanh(0) = 0, so its cell state stays at its initial 0 and its output o * tanh(c) is 0:
    it reads nothing and writes nothing, whatever its reader's column holds."""
    h = lstm.hidden_size
    for unit in units:
        rows = [g * h + unit for g in range(4)]
        for param in (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0):
            param[rows] = 0
        lstm.weight_hh_l0[:, unit] = 0


def test_lstm_units_whose_weights_are_zero_change_nothing_when_removed():
    model, x = example(read="h_n")
    dead = [1, 2, 5, 6, 7, 8, 10]
    kill(model.lstm, dead)
    with torch.no_grad():
        reference = model(x)
    (info,) = recurrent_layers(model, (x,))
    scores = PRUNING.get("l2_units").fn(model, info)
    assert set(torch.argsort(scores)[:7].tolist()) == set(dead)
    changes = prune_recurrent(model, {"lstm": ("l2_units", 7 / 12)}, [info])
    assert changes == {"lstm": (12, 5)}
    assert model.lstm.hidden_size == 5
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-6)


def test_l2_units_scores_one_entry_per_lstm_unit():
    model, x = example(hidden=10)
    (info,) = recurrent_layers(model, (x,))
    scores = PRUNING.get("l2_units").fn(model, info)
    assert scores.shape == (10,)
    unit, lstm = 4, model.lstm
    rows = [g * 10 + unit for g in range(4)]
    want = (lstm.weight_ih_l0[rows].pow(2).sum() + lstm.weight_hh_l0[rows].pow(2).sum()
            + lstm.weight_hh_l0[:, unit].pow(2).sum() + model.head.weight[:, unit].pow(2).sum())
    assert torch.isclose(scores[unit], want.sqrt().detach())


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
def test_a_projected_lstm_is_not_offered():
    torch.manual_seed(0)
    model = LSTMNet(hidden=12, proj_size=4).eval()
    model.head = nn.Linear(4, 3)
    x = torch.randn(3, 7, 5)
    with torch.no_grad():
        assert model(x).shape == (3, 3)
    why: dict[str, str] = {}
    assert recurrent_layers(model, (x,), why=why) == []
    assert why == {"lstm": "proj_size=4: only an nn.LSTM without projection loses units"}


def test_an_lstm_read_by_nothing_prunable_is_not_offered():
    torch.manual_seed(0)
    model = nn.LSTM(5, 8, batch_first=True).eval()
    why: dict[str, str] = {}
    assert recurrent_layers(model, (torch.randn(2, 4, 5),), why=why) == []
    assert why[""].startswith("no Linear or Conv1d reads its outputs")


class ConcatNet(nn.Module):
    """An LSTM whose last step reaches the head through ``torch.cat`` with a side branch:
    ``order`` "first" (units at columns 0-11), "last" (after the side's 6 features), or
    "twice" (the last output and ``h_n``, around the side)."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.order = order
        self.lstm = nn.LSTM(5, 12, batch_first=True)
        self.side = nn.Linear(4, 6)
        self.head = nn.Linear(12 * (2 if order == "twice" else 1) + 6, 3)

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        out, (h_n, _c_n) = self.lstm(x)
        side = torch.relu(self.side(extra))
        parts = {"first": [out[:, -1], side], "last": [side, torch.tanh(out[:, -1])],
                 "twice": [out[:, -1], side, h_n[-1]]}[self.order]
        return self.head(torch.cat(parts, dim=-1))


@pytest.mark.parametrize("order, offsets", [("first", (0,)), ("last", (6,)),
                                            ("twice", (0, 18))])
def test_lstm_units_are_followed_through_a_concatenation(order, offsets):
    """The units are a block of the head's input columns (two blocks when the head reads the
    output and ``h_n``): dead units removed with their columns change nothing, and every
    column of the side branch stays."""
    torch.manual_seed(0)
    model = ConcatNet(order).eval()
    x, extra = torch.randn(3, 7, 5), torch.randn(3, 4)
    dead, h = [0, 3, 4, 9], 12
    kill(model.lstm, dead)
    with torch.no_grad():
        reference = model(x, extra)
    (info,) = recurrent_layers(model, (x, extra))
    assert info.consumers == ("head",) and info.offsets == (offsets,)
    scores = PRUNING.get("l2_units").fn(model, info)
    assert set(torch.argsort(scores)[:4].tolist()) == set(dead)
    original = copy.deepcopy(model)
    prune_recurrent(model, {"lstm": ("l2_units", 4 / 12)}, [info])
    keep = [k for k in range(h) if k not in dead]
    dropped = {o + d for o in offsets for d in dead}
    columns = [c for c in range(original.head.in_features) if c not in dropped]
    assert model.lstm.hidden_size == 8 and model.head.in_features == len(columns)
    assert torch.equal(model.head.weight, original.head.weight[:, columns])
    assert torch.equal(model.lstm.weight_hh_l0,
                       original.lstm.weight_hh_l0[[g * h + k for g in range(4) for k in keep]]
                       [:, keep])
    with torch.no_grad():
        assert torch.allclose(model(x, extra), reference, atol=1e-6)


def test_an_lstm_petra_cannot_follow_is_kept_whole_with_the_reason():
    """Concatenated along time, the units are not followed (no reader); read by the head and
    also scaled by a parameter of their width, the trial removal fails: either way, the reason
    is given."""

    class Net(nn.Module):
        def __init__(self, read: str) -> None:
            super().__init__()
            self.read = read
            self.lstm = nn.LSTM(5, 8, batch_first=True)
            self.prefix = nn.Parameter(torch.zeros(1, 2, 8))
            self.scale = nn.Parameter(torch.ones(8))
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            if self.read == "time":
                both = torch.cat([self.prefix.expand(len(x), -1, -1), out], dim=1)
                return self.head(both).mean(dim=1)
            last = out[:, -1]
            return self.head(last) + (last * self.scale).sum(-1, keepdim=True)

    torch.manual_seed(0)
    x = torch.randn(2, 4, 5)
    why: dict[str, str] = {}
    assert recurrent_layers(Net("time").eval(), (x,), why=why) == []
    assert why["lstm"].startswith("no Linear or Conv1d reads its outputs directly")
    assert recurrent_layers(Net("scaled").eval(), (x,), why=why) == []
    assert why["lstm"].startswith("removing half its units breaks the model (RuntimeError: ")


def test_petra_space_says_why_a_layer_is_kept_whole(tmp_path, capsys):
    """``model_space`` gives every layer of the space that no gene can shrink its reason: an
    LSTM read only through a parameter of its width, and the model's output layer."""
    from petra.config import load_config
    from petra.space import model_space

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(5, 8, batch_first=True)
            self.scale = nn.Parameter(torch.ones(8))
            self.head = nn.Linear(1, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head((self.lstm(x)[0][:, -1] * self.scale).sum(-1, keepdim=True))

    torch.manual_seed(0)
    cfg = load_config({"space": {"pruning": ["l2_channel", "l2_units"],
                                 "quantization": ["none"]}})
    space = model_space(cfg.space, Scaled().eval(), (torch.randn(3, 7, 5),))
    assert set(space.kept_whole) == {"lstm", "head"}
    assert space.kept_whole["lstm"].startswith("no Linear or Conv1d reads its outputs")
    assert space.kept_whole["head"] == "its output is the model's output"
    assert "layers.lstm.method" not in space
    # a genome that names it is told why (``petra evaluate``), not the whole gene list
    with pytest.raises(ValueError, match=r"layer lstm is kept whole \(no Linear or Conv1d"):
        space.complete({"layers.lstm.method": "l2_units"})


def test_a_pruned_lstm_exports_and_int8_dynamic_quantizes_it():
    model, x = example(hidden=16)
    (info,) = recurrent_layers(model, (x,))
    prune_recurrent(model, {"lstm": ("l2_units", 0.5)}, [info])
    assert model.lstm.hidden_size == 8
    proto = artifact.export_onnx(model, (x,))
    assert "LSTM" in op_types(proto)
    with torch.no_grad():
        reference = model(x).numpy()
    fp32 = artifact.load(artifact.pack(proto)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(fp32, reference, atol=1e-5)
    out = quantize("int8_dynamic", proto, [{"input": x.numpy()}])
    assert "DynamicQuantizeLSTM" in op_types(out) and "LSTM" not in op_types(out)
    int8 = artifact.load(artifact.pack(out)).run(None, {"input": x.numpy()})[0]
    assert np.abs(int8 - reference).max() < 0.05 * (np.ptp(reference) + 1e-6)


def test_recurrent_methods_are_offered_on_lstms():
    from petra.config import load_config
    from petra.space import model_space

    model, x = example()
    space = model_space(load_config({"space": {"pruning": ["l2_channel", "l2_units"]}}).space,
                        model, (x,))
    choices = {g.name: set(g.choices) for g in space.genes if g.name.endswith(".method")}
    assert "l2_units" in choices["layers.lstm.method"]
    assert "l2_channel" not in choices["layers.lstm.method"]
    assert all("l2_units" not in c for name, c in choices.items() if name != "layers.lstm.method")


def test_events_lstm_loses_units_in_the_evaluator(tmp_path):
    """events_lstm's LSTM is found, pruned, and int8-dynamic quantized end to end; with its
    reader ``hidden`` skipped, the classifier becomes the reader."""
    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.evaluate import Evaluator
    from petra.tasks import load_task

    params = {"n_sequences": 1200, "epochs": 2}
    task = load_task("events_lstm", params)
    (info,) = recurrent_layers(task.model, task.example_input)
    assert info.name == "lstm" and info.consumers == ("hidden",)
    baseline = prepare_baseline(task, task_name="events_lstm", task_params=params,
                                cache_dir=tmp_path)
    evaluator = Evaluator(task_name="events_lstm", task_params=params,
                          baseline_state=baseline.state, baseline_artifact=baseline.artifact)
    for genome in ({"layers.lstm.method": "l2_units", "layers.lstm.sparsity": 0.5,
                    "quant.scheme": "int8_dynamic", "finetune.epochs": 0},
                   {"blocks.hidden.skip": True, "layers.lstm.method": "l2_units",
                    "layers.lstm.sparsity": 0.5, "quant.scheme": "none", "finetune.epochs": 0}):
        result = evaluator.evaluate(genome)
        assert result.status == "complete", result.error
        assert result.info["channels"]["lstm"] == (64, 32)
        assert result.metrics["size_ratio"] < 0.5


class GRUWithSide(nn.Module):
    """A GRU's (or an LSTM's) last step concatenated with a side branch (``dim=1``), as a user
    writes it."""

    def __init__(self, cell: type[nn.Module] = nn.GRU, bidirectional: bool = False) -> None:
        super().__init__()
        self.gru = cell(5, 12, batch_first=True, bidirectional=bidirectional)
        self.side = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(12 * (2 if bidirectional else 1) + 8, 3)

    def forward(self, seq: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(seq)
        return self.head(torch.cat([out[:, -1], self.side(tab)], dim=1))


@pytest.mark.parametrize("cell, bidirectional", [(nn.GRU, False), (nn.GRU, True),
                                                 (nn.LSTM, False)])
def test_a_gru_concatenated_with_a_side_branch_leaves_both_prunable(cell, bidirectional):
    """torch-pruning has no pruner for ``nn.GRU``, so the concatenation failed the whole graph
    (``TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'``) and the side
    branch kept its channels; the GRU was not followed through the concatenation either. Both
    now lose units together, and the model runs."""
    from petra.compress.structured import prune_channels
    from petra.layers import protected, prunable_layers

    torch.manual_seed(0)
    model = GRUWithSide(cell, bidirectional).eval()
    x = (torch.randn(3, 7, 5), torch.randn(3, 4))
    layers = {layer.name: layer for layer in prunable_layers(model, x)}
    assert layers["gru"].structured and layers["side.0"].structured
    assert not layers["head"].structured
    (info,) = recurrent_layers(model, x)
    assert info.consumers == ("head",)
    assert info.offsets == (((0, 12),) if bidirectional else ((0,),))
    prune_recurrent(model, {"gru": ("l2_units", 0.5)}, [info])
    prune_channels(model, x, {"side.0": ("l2_channel", 0.5)},
                   protected=protected(layers.values()))
    assert model.gru.hidden_size == 6 and model.side[0].out_features == 4
    assert model.head.in_features == (16 if bidirectional else 10)
    with torch.no_grad():
        assert model(*x).shape == (3, 3)


@pytest.mark.parametrize("pool", ["mean", "sum_keepdim", "amax", "max_values", "masked_mean",
                                  "masked_fill"])
def test_lstm_units_are_followed_through_a_pooling_over_time(pool):
    """``out.mean(1)`` and kin keep the units in the last dimension: the head is their reader,
    and dead units removed with its columns change nothing. So does a mean over the positions
    a padding mask keeps, ``(out * mask).sum(1) / mask.sum(1)``, which kept an LSTM written
    outside the repo whole (no reader followed)."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(5, 12, batch_first=True)
            self.head = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            if pool == "mean":
                return self.head(out.mean(dim=1))
            if pool == "sum_keepdim":
                return self.head(torch.sum(out, dim=(1,), keepdim=True)).squeeze(1)
            if pool == "max_values":
                return self.head(out.max(dim=1)[0])
            mask = (x[..., :1] > -0.5).float()  # (batch, time, 1): the positions kept
            if pool == "masked_mean":
                return self.head((out * mask).sum(1) / mask.sum(1).clamp_min(1.0))
            if pool == "masked_fill":
                return self.head(out.masked_fill(mask == 0, -1e4).amax(dim=1))
            return self.head(torch.amax(torch.relu(out), dim=1))

    torch.manual_seed(0)
    model, x, h, dead = Pooled().eval(), torch.randn(3, 7, 5), 12, [2, 5, 7]
    kill(model.lstm, dead)
    with torch.no_grad():
        reference = model(x)
    (info,) = recurrent_layers(model, (x,))
    assert info.consumers == ("head",) and info.offsets == ()
    prune_units(model, info, [k for k in range(h) if k not in dead])
    assert model.head.in_features == 9
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-6)


def test_a_layernorm_between_a_gru_and_its_reader_loses_the_removed_units_too():
    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(5, 12, batch_first=True)
            self.norm = nn.LayerNorm(12)
            self.head = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.gru(x)[0])[:, -1])

    torch.manual_seed(0)
    model, x = Normed().eval(), torch.randn(3, 7, 5)
    with torch.no_grad():
        model.norm.weight.copy_(torch.linspace(0.5, 1.5, 12))
    original = copy.deepcopy(model)
    (info,) = recurrent_layers(model, (x,))
    assert info.consumers == ("head",) and info.norms == ("norm",)
    keep = [0, 1, 4, 6, 8, 11]
    prune_units(model, info, keep)
    assert model.norm.normalized_shape == (6,) and model.head.in_features == 6
    assert torch.equal(model.norm.weight, original.norm.weight[keep])
    assert torch.equal(model.norm.bias, original.norm.bias[keep])
    with torch.no_grad():
        assert model(x).shape == (3, 3)


@pytest.mark.parametrize("cell, read", [(nn.LSTM, "output"), (nn.GRU, "output"),
                                        (nn.GRU, "h_n")])
def test_a_bidirectional_layer_loses_the_same_units_in_both_directions(cell, read):
    """The sequence output holds the units twice, forward then backward: the head loses both
    blocks of columns. A reader of ``h_n[-1]`` (the backward state) loses one. The rebuilt
    layer is bidirectional, with each direction's kept rows, and exports to ONNX Runtime."""

    class BiNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cell(5, 8, batch_first=True, bidirectional=True)
            self.head = nn.Linear(16 if read == "output" else 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, state = self.rnn(x)
            h_n = state[0] if isinstance(state, tuple) else state
            return self.head(out[:, -1] if read == "output" else h_n[-1])

    torch.manual_seed(0)
    model, x = BiNet().eval(), torch.randn(3, 7, 5)
    original = copy.deepcopy(model)
    (info,) = recurrent_layers(model, (x,))
    assert info.offsets == (((0, 8),) if read == "output" else ())
    keep = [1, 2, 5, 7]
    prune_units(model, info, keep)
    rnn, gates = model.rnn, 4 if cell is nn.LSTM else 3
    assert rnn.bidirectional and rnn.hidden_size == 4
    rows = [g * 8 + k for g in range(gates) for k in keep]
    for suffix in ("", "_reverse"):
        assert torch.equal(getattr(rnn, f"weight_ih_l0{suffix}"),
                           getattr(original.rnn, f"weight_ih_l0{suffix}")[rows])
        assert torch.equal(getattr(rnn, f"weight_hh_l0{suffix}"),
                           getattr(original.rnn, f"weight_hh_l0{suffix}")[rows][:, keep])
    columns = keep + [8 + k for k in keep] if read == "output" else keep
    assert torch.equal(model.head.weight, original.head.weight[:, columns])
    with torch.no_grad():
        reference = model(x).numpy()
    proto = artifact.export_onnx(model, (x,))
    out = artifact.load(artifact.pack(proto)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize("cell, bidirectional", [(nn.LSTM, False), (nn.GRU, True)])
def test_a_stacked_layer_loses_the_same_units_in_every_layer(cell, bidirectional):
    """Each layer keeps the same units; a layer above the first keeps the input columns of the
    units it reads (each direction's block). Dead units everywhere change nothing."""
    torch.manual_seed(0)
    dirs, h, dead = 2 if bidirectional else 1, 8, [1, 4, 6]

    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cell(5, h, num_layers=3, batch_first=True, bidirectional=bidirectional)
            self.head = nn.Linear(dirs * h, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model, x = Stacked().eval(), torch.randn(3, 7, 5)
    gates = 4 if cell is nn.LSTM else 3
    # A unit whose every weight is 0 outputs 0 from h0 = 0 (an LSTM: o * tanh(0); a GRU:
    # (1 - z) * tanh(0) + z * 0); the layer above reads it with columns zeroed too.
    with torch.no_grad():
        for name, param in model.rnn.named_parameters():
            param[[g * h + u for g in range(gates) for u in dead]] = 0
            if name.startswith("weight_hh"):
                param[:, dead] = 0
            elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                param[:, [d * h + u for d in range(dirs) for u in dead]] = 0
        reference = model(x)
    (info,) = recurrent_layers(model, (x,))
    scores = PRUNING.get("l2_units").fn(model, info)
    assert set(torch.argsort(scores)[:3].tolist()) == set(dead)
    prune_recurrent(model, {"rnn": ("l2_units", 3 / 8)}, [info])
    rnn = model.rnn
    assert (rnn.num_layers, rnn.hidden_size, rnn.bidirectional) == (3, 5, bidirectional)
    assert rnn.weight_ih_l1.shape == (gates * 5, dirs * 5)
    assert model.head.in_features == dirs * 5
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-6)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
def test_an_lstm_petra_cannot_prune_is_not_offered_units_on_torch_prunings_word():
    """torch-pruning's LSTM pruner counts a projected LSTM's output as ``hidden_size`` wide:
    concatenated with a side branch, the LSTM came out of its groups as a channel writer, and
    was offered ``l2_units`` that no candidate could apply. Only petra's own finding counts."""
    from petra.layers import prunable_layers

    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(5, 8, batch_first=True, proj_size=4)
            self.side = nn.Linear(4, 6)
            self.head = nn.Linear(4 + 6, 3)

        def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.head(torch.cat([out[:, -1], torch.relu(self.side(extra))], -1))

    torch.manual_seed(0)
    layers = {layer.name: layer for layer in prunable_layers(
        Projected().eval(), (torch.randn(2, 7, 5), torch.randn(2, 4)))}
    assert not layers["lstm"].structured and layers["side"].structured
    assert layers["lstm"].whole == "proj_size=4: only an nn.LSTM without projection loses units"


@pytest.mark.parametrize("bidirectional, layers, read", [
    (False, 1, "output"), (True, 2, "output"), (False, 2, "h_n"), (True, 1, "h_n")])
def test_the_layer_that_feeds_a_gru_loses_channels_with_the_gru_s_input_columns(
        bidirectional, layers, read):
    """torch runs a GRU on CPU as ops per time step, where torch-pruning's group of the layer
    that feeds it broke: that layer got no structured gene, and no reason. The GRU is one node
    of the graph now, and its input columns (every direction of its first layer) go with the
    removed channels: dead channels removed change nothing, in ONNX Runtime too."""
    from petra.compress.structured import channel_layers, prune_channels

    dirs, dead = 2 if bidirectional else 1, [1, 4, 6, 9]

    class Fed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Sequential(nn.Linear(5, 12), nn.ReLU())
            self.gru = nn.GRU(12, 8, num_layers=layers, batch_first=True,
                              bidirectional=bidirectional)
            self.head = nn.Linear(8 * (dirs if read == "output" else 1), 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, h_n = self.gru(self.pre(x))
            return self.head(out[:, -1] if read == "output" else h_n[-1])

    torch.manual_seed(0)
    model, x = Fed().eval(), torch.randn(3, 7, 5)
    with torch.no_grad():
        model.pre[0].weight[dead] = 0
        model.pre[0].bias[dead] = 0
        reference = model(x)
    structured, _ = channel_layers(model, (x,))
    assert "pre.0" in structured
    assert prune_channels(model, (x,), {"pre.0": ("l2_channel", len(dead) / 12)},
                          protected=["head"]) == {"pre.0": (12, 8)}
    gru = model.gru
    assert gru.input_size == 8 and gru.weight_ih_l0.shape == (24, 8)
    if bidirectional:
        assert gru.weight_ih_l0_reverse.shape == (24, 8)
    if layers > 1:
        assert gru.weight_ih_l1.shape == (24, 8 * dirs)  # reads the units, not the input
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, reference, atol=1e-6)
    out = artifact.load(artifact.pack(artifact.export_onnx(model, (x,)))).run(
        None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, got.numpy(), atol=1e-5)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("bidirectional, read", [
    (False, "output"), (True, "output"), (False, "h_n"), (True, "h_n"), (True, "both")])
def test_a_side_branch_beside_a_recurrent_final_state_keeps_its_own_columns(
        cell, bidirectional, read):
    """A GRU's or LSTM's final state (``h_n[-1]``, one direction's width) or last output
    step, concatenated with a side branch: the layer's stand-in in the graph must give
    torch-pruning each width, or the side's channels map onto the wrong columns of the head
    (an LSTM read through ``h_n`` had its input columns removed with the side's channels; a
    bidirectional one failed the group). Dead channels of the side and of the layer that
    feeds the recurrent layer removed change nothing. ``both`` reads both directions' final
    states, ``torch.cat([h_n[-2], h_n[-1]], 1)`` as the PyTorch tutorials write it, which
    torch-pruning could not trace at all (every layer kept its channels)."""
    from petra.compress.structured import prune_channels

    dirs = 2 if bidirectional else 1

    class Beside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Sequential(nn.Linear(5, 12), nn.ReLU())
            self.rnn = cell(12, 8, batch_first=True, bidirectional=bidirectional)
            self.side = nn.Sequential(nn.Linear(4, 10), nn.ReLU())
            self.head = nn.Linear((8 if read == "h_n" else 8 * dirs) + 10, 3)

        def forward(self, x: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
            out, h_n = self.rnn(self.pre(x))
            h_n = h_n[0] if isinstance(h_n, tuple) else h_n
            if read == "both":
                state = torch.cat([h_n[-2], h_n[-1]], 1)
            else:
                state = out[:, -1] if read == "output" else h_n[-1]
            return self.head(torch.cat([state, self.side(tab)], dim=1))

    torch.manual_seed(0)
    model, x = Beside().eval(), (torch.randn(3, 7, 5), torch.randn(3, 4))
    with torch.no_grad():
        for layer, dead in ((model.side[0], [0, 3, 7]), (model.pre[0], [2, 5])):
            layer.weight[dead] = 0
            layer.bias[dead] = 0
        reference = model(*x)
    assert prune_channels(model, x, {"side.0": ("l2_channel", 0.3)},
                          protected=["head"]) == {"side.0": (10, 7)}
    assert prune_channels(model, x, {"pre.0": ("l2_channel", 2 / 12)},
                          protected=["head"]) == {"pre.0": (12, 10)}
    with torch.no_grad():
        assert torch.allclose(model(*x), reference, atol=1e-6)


def test_a_layer_before_a_packed_sequence_says_what_stops_torch_pruning():
    """torch-pruning cannot trace a model that packs its batch for a GRU; the layers before it
    were kept whole with its bare ``TypeError: unsupported operand type(s) for +: 'int' and
    'NoneType'``, which did not name the packed sequence."""
    from petra.layers import prunable_layers

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.gru, self.out = nn.Linear(4, 8), nn.GRU(8, 8, batch_first=True), \
                nn.Linear(8, 2)

        def forward(self, x, lengths):
            packed = nn.utils.rnn.pack_padded_sequence(self.inp(x), lengths, batch_first=True,
                                                       enforce_sorted=False)
            return self.out(self.gru(packed)[1][-1])

    x = (torch.randn(3, 5, 4), torch.tensor([5, 3, 2]))
    inp = next(layer for layer in prunable_layers(Packed().eval(), x) if layer.name == "inp")
    assert not inp.structured
    assert inp.whole.startswith("torch-pruning ")
    assert inp.whole.endswith("; gru reads a PackedSequence, which torch-pruning does not follow")


class Projected(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.fc = nn.LSTM(6, 16, batch_first=True, proj_size=8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.lstm(x)[0].mean(1))


def test_a_model_with_a_projected_lstm_is_refused_naming_it():
    """No ``nn.LSTM`` with ``proj_size`` exports to a graph ONNX Runtime loads on torch 2.13
    (TorchScript refuses it; the dynamo graph fails ORT's shape inference): the refusal showed
    only ORT's Concat error, and the docs offered such an LSTM as kept whole."""
    from petra.candidate.baseline import export_dense
    from petra.errors import ConfigError

    with pytest.raises(ConfigError, match="lstm is an nn.LSTM with proj_size, which torch's "
                       "TorchScript exporter refuses"):
        export_dense(Projected().eval(), (torch.randn(2, 5, 6),), "projected")
