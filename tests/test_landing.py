"""Channel groups that torch-pruning maps wrongly through the forward are withheld
(petra.compress.landing), and groups it maps right are still offered."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from petra.config import load_config
from petra.space import model_space


class ShuffleUnit(nn.Module):
    """ShuffleNet-V1's unit: grouped 1x1 conv, channel shuffle, depthwise 3x3, grouped 1x1."""

    def __init__(self, c: int = 16, g: int = 2, norm_after: bool = False) -> None:
        super().__init__()
        self.g, self.norm_after = g, norm_after
        self.g1, self.bn1 = nn.Conv2d(c, c, 1, groups=g, bias=False), nn.BatchNorm2d(c)
        self.dw, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.g2, self.bn3 = nn.Conv2d(c, c, 1, groups=g, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.g1(x) if self.norm_after else F.relu(self.bn1(self.g1(x)))
        b, c, hh, ww = h.shape
        h = h.view(b, self.g, c // self.g, hh, ww).transpose(1, 2).reshape(b, c, hh, ww)
        h = F.relu(self.bn1(h)) if self.norm_after else h
        return F.relu(x + self.bn3(self.g2(self.bn2(self.dw(h)))))


class Net(nn.Module):
    def __init__(self, shuffle: bool, norm_after: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.unit = ShuffleUnit(norm_after=norm_after) if shuffle else nn.Sequential(  # MobileNet's, no shuffle
            nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 16, 1))
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.unit(self.stem(x)).mean((2, 3)))


def space_of(model: nn.Module):
    torch.manual_seed(0)
    with torch.no_grad():  # trained-like norms, so no channel is constant by chance
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    cfg = load_config({"space": {"pruning": ["none", "l2_channel"], "quantization": ["none"],
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    return model_space(cfg, model.eval(), (torch.randn(4, 1, 8, 8),))


@pytest.mark.parametrize("norm_after", [False, True], ids=["norm_before", "norm_after"])
def test_a_group_mapped_wrongly_through_a_channel_shuffle_is_withheld(norm_after):
    """torch-pruning mapped a ShuffleNet unit's shuffle (view, transpose, reshape) one to one:
    removing half of the grouped conv's channels cut the depthwise conv after it at the same
    indices, and a model written outside the repo fell from 0.98 to 0.47 (masking the same
    channels: 0.81) while every check passed. With the BatchNorm after the shuffle, the first
    check zeroed it at the wrong indices too, and passed (0.30 where masking gave 0.82)."""
    space = space_of(Net(shuffle=True, norm_after=norm_after))
    reason = space.withheld["layers.unit.g1"]
    assert reason.startswith("torch-pruning maps this group's channels wrongly") and "unit.dw would lose input channels" in reason
    assert "through the operations between them (" in reason and "transpose" in reason
    assert "layers.unit.dw.method" not in space and "layers.unit.g1.method" not in space
    assert "l2_channel" in space.gene("layers.stem.0.method").choices  # mapped right


class Ghost(nn.Module):
    """GhostNet's module as its ports write it: a primary conv, a cheap depthwise conv of its
    output, both through one shared ReLU, concatenated and sliced to the output width."""

    def __init__(self, c: int = 12) -> None:
        super().__init__()
        act = nn.ReLU()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.primary = nn.Sequential(nn.Conv2d(8, c, 1, bias=False), nn.BatchNorm2d(c), act)
        self.cheap = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                                   nn.BatchNorm2d(c), act)
        self.dw = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, 2, 1, groups=2 * c, bias=False),
                                nn.BatchNorm2d(2 * c))
        self.fc = nn.Linear(2 * c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.primary(self.stem(x))
        h = torch.cat([h, self.cheap(h)], 1)[:, :24]
        return self.fc(self.dw(h).mean((2, 3)))


def test_a_wrong_mapping_names_the_operations_torch_pruning_followed():
    """A GhostNet written outside the repo: its depthwise conv after the module's concat was
    withheld with a guess at a channel shuffle or a view, which the model does not have; the
    reason now names what torch-pruning followed, the concat and the slice (an alias: it
    keeps every channel)."""
    reason = space_of(Ghost()).withheld["layers.dw.0"]
    assert "would lose input channels" in reason, reason
    assert "through the operations between them (" in reason and "concat" in reason, reason
    assert "channel shuffle" not in reason


def test_groups_mapped_right_are_offered():
    space = space_of(Net(shuffle=False))
    assert not space.withheld
    for layer in ("stem.0", "unit.0", "unit.3"):
        assert "l2_channel" in space.gene(f"layers.{layer}.method").choices


class SpatialGate(nn.Module):
    """CBAM's spatial attention: a 1-channel map from the mean and max over channels, a
    sigmoid of it broadcast over every channel."""

    def __init__(self) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(s))


def test_a_cbam_blocks_channels_are_withheld_with_what_torch_pruning_follows():
    """torch-pruning put a CBAM block's convs in one group with its 1-channel spatial map (the
    broadcast taken as elementwise), rooted at the map: ``l2_channel`` on the convs that hold
    most of the model was offered, and removed nothing at any sparsity (the bytes, params and
    accuracy of the dense model), with no word. The broadcast no longer ties them
    (:mod:`petra.compress.broadcasts`); the channel mean and max that feed the map's 2 input
    channels still do, and the group is withheld, naming them."""
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          SpatialGate(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    space = space_of(model)
    reason = space.withheld["layers.0"]
    assert reason == ("torch-pruning maps this group's channels past the width of 3.spatial, "
                      "a Conv2d with 2 channels (to channel 15): it follows them wrongly "
                      "through the operations between them (relu, mean, concat)")
    assert "layers.0.method" not in space or "l2_channel" not in space.gene(
        "layers.0.method").choices
    assert "l2_channel" in space.gene("layers.4.method").choices  # its own group removes


class FirstTwoSwapped(nn.Module):
    """A conv whose first two output channels reach the next conv swapped (``index_select``
    with a fixed permutation): the last channels, which verification removes, land right."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 3)
        self.register_buffer("order", torch.tensor([1, 0, *range(2, 16)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x).index_select(1, self.order)).mean((2, 3)))


def test_a_mapping_that_moves_only_the_first_channels_is_withheld():
    """Only the last channels were checked: a permutation of the first two passed it, and
    the removal then failed in ONNX Runtime with its own words (``INDICES element is out of
    DATA bounds``), or, with the importance order, cut the channels a kept one carries."""
    space = space_of(FirstTwoSwapped())
    reason = space.withheld["layers.a.0"]
    assert reason.startswith("torch-pruning maps this group's channels wrongly") and "b would lose input channels [1]" in reason
    assert "l2_channel" in space.gene("layers.b.method").choices


class Latents(nn.Module):
    """A Perceiver's stream: a learned latent array, read by a layer before anything is added."""

    def __init__(self) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(6, 16))
        self.embed = nn.Conv2d(1, 16, 3, padding=1)
        self.q, self.out, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.embed(x).flatten(2).mean(2, keepdim=True).transpose(1, 2)  # (B, 1, 16)
        stream = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        stream = stream + self.out(torch.relu(self.q(stream) + context))
        return self.head(stream.mean(1))


def test_a_stream_that_starts_at_a_learned_array_is_offered():
    """The latent array was not zeroed with the stream's writers: its reader kept its
    channels, and the group was withheld as mapped wrongly, where its removal is right."""
    space = space_of(Latents())
    assert not any(k.startswith("layers.out") for k in space.withheld), space.withheld
    assert "l2_channel" in space.gene("layers.out.method").choices
    from petra.compress.structured import prune_channels

    torch.manual_seed(0)
    model, x = Latents().eval(), torch.randn(4, 1, 8, 8)
    dense = copy.deepcopy(model)
    (_, kept), = prune_channels(model, (x,), {"out": ("l2_channel", 0.5)}).values()
    assert kept == 8 and model.latents.shape == (6, 8)
    stay = [next(i for i in range(16) if torch.equal(col, dense.latents[:, i]))
            for col in model.latents.T]
    cut = [i for i in range(16) if i not in stay]
    with torch.no_grad():  # the dense model with the removed stream channels zeroed
        dense.latents[:, cut] = 0
        dense.out.weight[cut], dense.out.bias[cut] = 0, 0
        torch.testing.assert_close(model(x), dense(x))


def _space():
    return load_config({"space": {"pruning": ["none", "l2_channel"], "quantization": ["none"],
                                  "layers": {"include": ["*"], "exclude": []}}}).space


def _reducing(op: str) -> nn.Module:
    """Two conv stages, the first followed by ``op`` over its channels (outside any layer)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            if op == "softmax":
                h = h * torch.softmax(h, 1) * h.shape[1]
            elif op == "standardize":
                h = (h - h.mean(1, keepdim=True)) / (h.std(1, keepdim=True) + 1e-5)
            elif op == "logsumexp":
                h = h - torch.logsumexp(h, 1, keepdim=True)
            return self.head(torch.relu(self.c2(h)).mean((2, 3)))

    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.parametrize("op", ["softmax", "standardize", "logsumexp"])
def test_a_removal_that_is_not_a_masking_is_withheld(op):
    """Over a softmax, a standardization or a logsumexp across the channels, a removal
    computes over the channels kept, and the kept channels change: each such candidate was
    reported complete, its artifact 0.17 to 1.6 off the model with the same channels zeroed."""
    from petra.compress.verify import REDUCED

    space = model_space(_space(), _reducing(op), (torch.randn(2, 3, 8, 8),))
    assert space.withheld["layers.c1"].startswith(f"{REDUCED} (the output moves by ")
    assert "layers.c2.method" in space  # the rest is offered


def test_a_removal_that_is_a_masking_passes():
    """The same net with no reduction over the channels: c1 loses channels."""
    space = model_space(_space(), _reducing("none"), (torch.randn(2, 3, 8, 8),))
    assert not space.withheld and "layers.c1.method" in space


class _StdConv(nn.Conv2d):
    """BiT's weight-standardized conv: each output channel's weight is standardized over its
    input channels, so a reader that loses inputs standardizes over fewer."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_reader_that_standardizes_its_weight_withholds_its_writers_removal():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), _StdConv(16, 8, 3, padding=1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

    from petra.compress.verify import REDUCED

    space = model_space(_space(), Net().eval(), (torch.randn(2, 3, 8, 8),))
    assert space.withheld["layers.c1"].startswith(REDUCED)


def test_a_groupnorm_keeps_as_many_channels_in_each_of_its_groups():
    """torch-pruning keeps a GroupNorm's group count and regroups the channels it keeps in
    order: 8 of 16 kept as 1, 4, 2 and 1 per group were normalized as 2, 2, 2 and 2, mixing
    groups (1.02 off the model normalizing each group's kept channels)."""
    from petra.compress.structured import prune_channels

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
            self.c2, self.head = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.relu(self.c2(torch.relu(self.gn(self.c1(x))))).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # channel scores that would empty the last groups first
        model.c1.weight.mul_(torch.linspace(2, 0.1, 16).view(16, 1, 1, 1))
    x = (torch.randn(2, 3, 8, 8),)
    kept = model.c1.weight.detach().flatten(1).norm(dim=1)
    prune_channels(model, x, {"c1": ("l2_channel", 0.5)}, protected=["head"])
    assert model.gn.num_channels == 8 and model.gn.num_groups == 4
    survivors = [int(i) for i in torch.nonzero(torch.isclose(
        kept[:, None], model.c1.weight.detach().flatten(1).norm(dim=1)[None]).any(1))]
    assert [sum(1 for i in survivors if i // 4 == g) for g in range(4)] == [2, 2, 2, 2]


class _ChannelsFirstNorm(nn.Module):
    """ConvNeXt's LayerNorm over the channels of a (B, C, H, W) map, written by hand."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        mu, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, unbiased=False)
        return (x - mu) / (var + 1e-6).sqrt() * self.weight[:, None, None] \
            + self.bias[:, None, None]


@pytest.mark.parametrize("side", [6, 16], ids=["wide_map", "map_as_wide_as_channels"])
def test_a_hand_written_norm_over_the_channels_is_compared_over_those_kept(side):
    """A norm of the group takes its statistics over the channels kept, as a LayerNorm does:
    a hand-written channels-first one is found on its channel dimension, and where the map is
    as wide as the channels (which dimension it normalizes cannot be told) the removal is not
    compared rather than withheld."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.norm = nn.Conv2d(3, 16, 3, padding=1), _ChannelsFirstNorm(16)
            self.c2, self.head = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.relu(self.c2(self.norm(self.c1(x)))).mean((2, 3)))

    space = model_space(_space(), Net().eval(), (torch.randn(2, 3, side, side),))
    assert not space.withheld and "layers.c1.method" in space


class Blocks(nn.Module):
    """Three residual blocks (skippable) around a ShuffleNet unit (mapped wrongly)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 16, 1))
            for _ in range(3))
        self.unit, self.fc = ShuffleUnit(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = h + block(h)
            if i == 0:
                h = self.unit(h)
        return self.fc(h.mean((2, 3)))


def test_a_group_whose_landing_passed_is_not_checked_again():
    """The skip trials each checked every channel group again (a MobileViT's 35 trials, 32
    groups each): a group whose key passed is not, and the space is the same as when every
    trial checks every group."""
    import sys

    from petra.compress import landing

    def space(memo: bool) -> tuple[object, list]:
        calls = []
        members = landing._members

        def counted(graph, group):  # returns, never raises: the reasons keep their frames
            caller = sys._getframe(1).f_locals
            if sys._getframe(1).f_code.co_name == "check_landing":
                model = caller["model"]
                names = {id(t): n for n, t in [*model.named_modules(),
                                               *model.named_parameters()]}
                calls.append((landing.landing_key(group, names, caller["removed"]),
                              caller["bits"]))
            return members(graph, group)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(landing, "_members", counted)
            if not memo:  # every key new: every group checked in every trial
                mp.setattr(landing, "landing_key", lambda *a: object())
            torch.manual_seed(0)
            model = Blocks()
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
            cfg = load_config({"space": {
                "pruning": ["none", "l2_channel"], "quantization": ["none"], "skip_blocks": True,
                "layers": {"include": ["*"], "exclude": []}}}).space
            out = model_space(cfg, model.eval(), (torch.randn(4, 1, 8, 8),))
        return out, calls

    with_memo, checked = space(memo=True)
    without, every = space(memo=False)
    assert any("maps this group's channels wrongly" in why for why in with_memo.withheld.values())
    assert with_memo.withheld == without.withheld and with_memo.names == without.names
    assert len(checked) == len(set(checked)) and len(checked) < len(every) / 2, (  # noqa: PT018
        len(checked), len(every))


class _Vae(nn.Module):
    """A VAE's encoder and classifier: the log-variance head is read in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mu, self.logvar = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.enc(x))
        z = self.mu(h)
        if self.training:
            z = z + torch.exp(0.5 * self.logvar(h)) * torch.randn_like(z)
        return self.head(F.relu(z))


def test_a_removal_that_breaks_the_train_mode_forward_is_withheld():
    """The checks ran the model in eval mode, where a VAE's log-variance head is not read: its
    encoder and mean head were offered, and every candidate that fine-tuned them failed
    (``mat1 and mat2 shapes cannot be multiplied``). The trial now runs in train mode too."""
    torch.manual_seed(0)
    space = model_space(_space(), _Vae().eval(), (torch.randn(4, 6),))
    for layer in ("enc", "mu"):
        assert space.withheld[f"layers.{layer}"].startswith(
            "in train mode, as a fine-tune runs it: the compressed model's forward fails")


class _DeepSupervision(nn.Module):
    """A stacked net with an intermediate head: in eval mode it returns the last head, in train
    mode both heads concatenated, for a loss on each (an hourglass's intermediate supervision)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack1, self.head1 = nn.Linear(6, 16), nn.Linear(16, 2)
        self.stack2, self.head2 = nn.Linear(18, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stack1(x))
        first = self.head1(h)
        last = self.head2(F.relu(self.stack2(torch.cat([h, first], 1))))
        return torch.cat([first, last], 1) if self.training else last


def test_a_removal_that_changes_what_the_train_mode_forward_returns_is_withheld():
    """An intermediate head is an inner layer in eval mode, and part of the output in train mode:
    its l2_channel gene was offered, and every candidate that fine-tuned with it failed in the
    loss (``The size of tensor a (3) must match the size of tensor b (4)``). The trial compares
    what the train-mode forward returns with the dense model's."""
    torch.manual_seed(0)
    space = model_space(_space(), _DeepSupervision().eval(), (torch.randn(4, 6),))
    assert space.withheld["layers.head1"].startswith(
        "in train mode, as a fine-tune runs it, the model returns shapes "
        "((4, 3),) where the dense model returns ((4, 4),)")
    assert "l2_channel" in space.gene("layers.stack1.method").choices
