"""Ordinary layers the TorchScript exporter writes wrong or unrunnable, mended on export
(petra.candidate.onnx_forms), and the dense export's check on the example batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from petra.candidate import artifact
from petra.candidate.baseline import export_dense
from petra.errors import ConfigError


class MessagePassing(nn.Module):
    """Each node sums its neighbours' messages (``index_add_``): nodes 1 and 2 receive two."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("src", torch.tensor([0, 1, 2, 0, 1]))
        self.register_buffer("dst", torch.tensor([1, 1, 0, 2, 2]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (batch, nodes, features)
        out = torch.zeros(h.shape[0], h.shape[1], 4)
        return out.index_add_(1, self.dst, self.lin(h)[:, self.src])


def run(proto, x: torch.Tensor) -> np.ndarray:
    return artifact.load(proto).run(None, {"input": x.numpy()})[0]


def test_index_add_sums_the_messages_to_one_node():
    """The exporter's own index_add scattered into zeros, so of two messages to a node only
    the last arrived: a GNN written outside the repo was refused at its baseline (largest
    difference 7.2 of 8.5)."""
    model = MessagePassing().eval()
    proto = artifact.export_onnx(model, torch.randn(2, 3, 4))
    scatter = [n for n in proto.graph.node if n.op_type == "ScatterElements"]
    assert [a.s for n in scatter for a in n.attribute if a.name == "reduction"] == [b"add"]
    x = torch.randn(5, 3, 4)  # another batch size: the batch axis stays dynamic
    with torch.no_grad():
        assert np.allclose(run(proto, x), model(x).numpy(), atol=1e-5)


@pytest.mark.parametrize(("kernel", "dilation"), [(3, 2), (4, 3), (2, 1)])
def test_a_dilated_same_padded_conv_runs_in_onnx_runtime(kernel, dilation):
    """``padding="same"`` is exported as ``auto_pad=SAME_UPPER``, which ONNX Runtime's
    optimized conv refuses with a dilation: a super-resolution net written outside the repo
    could not be searched. Its pads are written out, the odd one at the end as torch pads."""
    import onnx

    from petra.candidate.onnx_forms import explicit_pads

    model = nn.Conv2d(3, 4, kernel, padding="same", dilation=dilation).eval()
    x = torch.randn(2, 3, 9, 8)
    proto = artifact.export_onnx(model, x)
    (conv,) = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert "auto_pad" not in {a.name for a in conv.attribute}
    with torch.no_grad():
        assert np.allclose(run(proto, x), model(x).numpy(), atol=1e-5)
    if dilation > 1:  # what the exporter wrote, which the mending rewrites
        for a in conv.attribute:
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
        with pytest.raises(Exception, match="Dilation not supported"):
            run(proto, x)
        assert np.allclose(run(explicit_pads(proto), x), model(x).detach().numpy(), atol=1e-5)


def test_a_dense_export_that_computes_something_else_stops_in_one_line():
    """``petra space`` offered every gene of a model whose export did not compute it, then
    ``petra search`` stopped at the baseline: the dense export is checked on the example
    batch wherever it is made."""

    class Traced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # wrong under either exporter
            exporting = torch.jit.is_tracing() or torch.compiler.is_compiling()
            return self.fc(x) * (2.0 if exporting else 1.0)

    with pytest.raises(ConfigError, match="task.name: the exported model computes something "
                                          "else than the model on the example batch"):
        export_dense(Traced().eval(), torch.randn(3, 4))
    export_dense(nn.Linear(4, 2).eval(), torch.randn(3, 4))  # an export that computes it


class TracedWrong(nn.Module):
    """A forward the TorchScript exporter records wrongly (as a Longformer, once trained,
    was), while the dynamo exporter records it right."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (2.0 if torch.jit.is_tracing() else 1.0)


def test_a_model_the_torchscript_exporter_gets_wrong_is_exported_by_dynamo():
    """PatchTST, Mamba and a Cohere with q/k norms were refused (ONNX Runtime rejected their
    TorchScript graphs), and a trained Longformer's graph computed something else, where the
    dynamo exporter's graphs were right. The dense export tries it, and its candidates (in
    this process, and in the workers, which read the dense artifact's metadata) follow."""
    import copy

    from petra.candidate import onnx_forms

    model, x = TracedWrong().eval(), torch.randn(3, 4)
    try:
        proto = export_dense(model, x)
        assert onnx_forms.preferred(model) == "dynamo"
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta[onnx_forms.EXPORTER_KEY] == "dynamo"
        session = artifact.load(artifact.pack(proto))
        assert session.get_modelmeta().custom_metadata_map[onnx_forms.EXPORTER_KEY] == "dynamo"
        candidate = copy.deepcopy(model)  # a candidate: another instance of the class
        with torch.no_grad():
            got = run(artifact.export_onnx(candidate, x), x)
            assert np.allclose(got, candidate(x).numpy(), atol=1e-6)
    finally:
        onnx_forms._PREFERRED.clear()
    assert onnx_forms.preferred(model) == ""


class Pooled(nn.Module):
    """Token ids and a padding mask in a dict, mean-pooled over the kept positions."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1).float()
        return self.fc((self.emb(ids) * keep).sum(1) / keep.sum(1).clamp(min=1))


def padded(n: int, length: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, length), generator=g)
    mask = (torch.arange(length)[None] < torch.randint(1, length + 1, (n, 1), generator=g)).long()
    return {"ids": ids * mask, "mask": mask}, torch.randint(0, 3, (n,), generator=g)


def test_batches_padded_each_to_its_own_length_run_on_the_artifact(tmp_path):
    """Each batch padded to its own longest (Hugging Face's DataCollatorWithPadding): the
    export fixed the length at the example's, and ``petra search`` stopped at the baseline
    ("Got invalid dimensions for input: input_ids"), with a hint about Python shapes. The
    axes the first batches vary in are dynamic axes of every export."""
    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.measure import session_feed
    from petra.tasks import Task
    from petra.tasks.contract import adapt

    torch.manual_seed(0)
    batches = [padded(6, length, seed) for seed, length in enumerate((9, 5, 7, 12))]
    task = adapt(Task(model=Pooled(), train=batches, val=batches, test=batches,
                      example_input=batches[0][0], trained=True))
    assert task.model.varying_axes == {"ids": (1,), "mask": (1,)}
    baseline = prepare_baseline(task, task_name="padded", task_params={}, cache_dir=tmp_path)
    assert baseline.metrics["val_examples"] == 24
    session = artifact.load(baseline.artifact)
    for inputs, _ in task.val:
        with torch.no_grad():
            want = task.model(*inputs).numpy()
        assert np.allclose(session.run(None, session_feed(session, inputs))[0], want, atol=1e-5)
    fixed = [padded(6, 9, seed) for seed in range(3)]  # one length: the export as before
    assert adapt(Task(model=Pooled(), train=fixed, val=fixed, test=fixed,
                      example_input=fixed[0][0], trained=True)).model.varying_axes == {}
