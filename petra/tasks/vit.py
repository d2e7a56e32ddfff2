"""Built-in task: a small Vision Transformer on scikit-learn's bundled digits (no download).

Each 8×8 image is cut into 2×2 patches, 16 tokens of 4 pixels, which a Linear layer embeds. A
learned CLS token and learned position embeddings are added, and torch's own
``nn.TransformerEncoder`` (pre-norm layers, GELU, ``batch_first``) runs over the 17 tokens. The
CLS token's final state, layer-normed, feeds the Linear classifier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from petra.tasks import TASKS, Task
from petra.tasks.digits import digits_splits, split_batches

IMAGE = 8  # the digits are 8×8


@contextlib.contextmanager
def _slow_path() -> Iterator[None]:
    """Run ``nn.TransformerEncoder`` on its composite path, whatever the mode.

    In eval mode without grad, torch runs an encoder layer as one fused kernel
    (``aten::_transformer_encoder_layer_fwd``, or ``_native_multi_head_attention``) that the
    ONNX exporter cannot translate, and that skips the forward hooks of the attention's
    ``out_proj``, so tracing for prunable layers would not see it. The switch is torch's
    global one; it is restored on exit.
    """
    import torch

    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _vit_digits(
    *, patch: int, dim: int, layers: int, heads: int, mlp_ratio: int, dropout: float,
    num_classes: int = 10,
) -> Any:
    import torch
    from torch import nn

    tokens = (IMAGE // patch) ** 2

    class DigitsViT(nn.Module):
        """Patch embedding → CLS + position embeddings → TransformerEncoder → LayerNorm → Linear."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(patch * patch, dim)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
            layer = nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=mlp_ratio * dim, dropout=dropout,
                activation="gelu", batch_first=True, norm_first=True,
            )
            # enable_nested_tensor is for padded batches; every image has all its tokens.
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.fc = nn.Linear(dim, num_classes)

        def forward(self, x: Any) -> Any:
            n = x.shape[0]
            # (n, 1, 8, 8) -> (n, 16, 4): row-major 2×2 patches
            p = x.reshape(n, IMAGE // patch, patch, IMAGE // patch, patch)
            p = p.permute(0, 1, 3, 2, 4).reshape(n, tokens, patch * patch)
            h = torch.cat([self.cls.expand(n, -1, -1), self.embed(p)], dim=1) + self.pos
            with _slow_path():
                h = self.encoder(h)
            return self.fc(self.norm(h[:, 0]))

    return DigitsViT()


@TASKS.register(
    "digits_vit",
    description="ViT (2x2 patches, 4 pre-norm nn.TransformerEncoder layers, CLS token) on sklearn digits",
)
def digits_vit(
    *, seed: int = 0, width: int = 64, layers: int = 4, heads: int = 4, patch: int = 2,
    batch_size: int = 64, latency_batch: int = 16, epochs: int = 60, lr: float = 2e-3,
) -> Task:
    """sklearn digits as 16 patch tokens, a small ViT, 60/20/20 splits.

    Args:
        seed: the data split and the model's initialisation.
        width: the token dimension (``heads`` must divide it); the MLP is 2× wider.
        layers: the number of encoder layers.
        heads: attention heads per layer.
        patch: the patch side, a divisor of 8.
        batch_size: the training batch size.
        latency_batch: the example batch (tracing, export, latency).
        epochs, lr: the baseline's training recipe.
    """
    import torch

    if IMAGE % patch:
        raise ValueError(f"patch must divide {IMAGE}; got {patch}")
    if width % heads:
        raise ValueError(f"heads ({heads}) must divide width ({width})")
    splits = digits_splits(seed)
    shape = (1, IMAGE, IMAGE)
    train, val, test = split_batches(splits, batch_size=batch_size, shape=shape)
    torch.manual_seed(seed)
    model = _vit_digits(patch=patch, dim=width, layers=layers, heads=heads, mlp_ratio=2,
                        dropout=0.1)
    example = torch.from_numpy(splits["val"][0][:latency_batch].reshape(-1, *shape))
    return Task(
        model=model, train=train, val=val, test=test, example_input=example,
        train_epochs=epochs, train_lr=lr,
        info={"dataset": "sklearn digits", "splits": {k: len(v[1]) for k, v in splits.items()}},
    )
