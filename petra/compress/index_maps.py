"""torch-pruning's index mappings, mended where they fail a model: the channels a pixel shuffle
regroups, and the reshapes and concatenations whose channel counts it cannot infer
(:func:`petra.compress.graph.dependency_graph` installs them)."""

from __future__ import annotations

from typing import Any


def map_pixel_shuffles(graph: Any) -> None:
    """Map channels through each pixel shuffle as the reshape it is: channel ``c`` of its
    output is channels ``c * r * r`` to ``c * r * r + r * r - 1`` of its input (and a pixel
    unshuffle's the other way). torch-pruning took it for an element-wise op, one channel for
    one, so an ESPCN's last conv had every removal withheld ("maps this group's channels past
    the width of conv4"). A removal takes whole blocks (:func:`~petra.compress.channel_counts.
    ties`)."""
    from torch_pruning._helpers import _HybridIndex
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    class Blocks(_FlattenIndexMapping):  # a block's channel once, not once per channel of it
        def __call__(self, idxs: Any) -> list[Any]:
            if not self.reverse:
                return super().__call__(idxs)
            first = {}
            for i in idxs:
                first.setdefault(i.idx // self._stride, i.root_idx)
            return [_HybridIndex(idx=k, root_idx=r) for k, r in first.items()]

    for node in list(graph.module2node.values()):
        name = node.grad_fn.name() if node.grad_fn is not None else ""
        if name not in ("PixelShuffleBackward0", "PixelUnshuffleBackward0"):
            continue
        shuffle = name == "PixelShuffleBackward0"
        r = getattr(node.grad_fn, "_saved_upscale_factor" if shuffle
                    else "_saved_downscale_factor")
        # the node's own indices are the wider side's: its input's for a shuffle
        for other in node.outputs if shuffle else node.inputs:
            for dep in node.dependencies:
                if dep.target == other:
                    dep.index_mapping[0] = Blocks(stride=r * r, reverse=True)
            for dep in other.dependencies:
                if dep.target == node:
                    dep.index_mapping[0] = Blocks(stride=r * r, reverse=False)


def guard_index_mappings() -> None:
    """Make torch-pruning leave a reshape unmapped where it infers 0 channels on one side, and a
    concatenation where it infers no count for one of its inputs.

    It infers 0 where a path reaches the model's inputs or a parameter added to the stream
    (a ViT's ``cat([cls, x]) + pos_embed`` with every block skipped), and then divides by it
    (``ZeroDivisionError`` in ``update_reshape_index_mapping``). Where it infers no count at
    all it leaves the reshape unmapped; a 0 is taken the same way. The counts of a
    concatenation's inputs it summed before it checked them for one it does not infer (half the
    model's input, in a RealNVP coupling's ``cat([x1, y2])``: ``TypeError`` in
    ``update_concat_index_mapping``), failing the whole graph; the concatenation is left
    unmapped, as torch-pruning leaves it where the sum passes. Installed once."""
    from torch_pruning.dependency import index_mapping

    if getattr(index_mapping.update_reshape_index_mapping, "petra_guarded", False):
        return
    for name, error in (("update_reshape_index_mapping", ZeroDivisionError),
                        ("update_concat_index_mapping", TypeError)):
        setattr(index_mapping, name, _unmapped_on(getattr(index_mapping, name), error))


def _unmapped_on(original: Any, error: type[Exception]) -> Any:
    """``original``, an index-mapping update of torch-pruning, returning where it raises
    ``error`` (before it maps anything)."""

    def update(graph: Any, node: Any) -> None:
        try:
            original(graph, node)
        except error:
            return

    update.petra_guarded = True  # type: ignore[attr-defined]
    return update
