"""User tasks written only against the documented task contract (docs/your-model.md): models petra has never seen.

- :func:`bert_task`: a Hugging Face ``BertModel`` built from a config, dict inputs
  (``input_ids``, ``attention_mask``), a ``BaseModelOutput`` reduced by ``output``, and a metric
  written with torch ops (the cosine of mean-pooled embeddings to the dense model's, or
  accuracy of a linear head).
- :func:`encoder_task`: torch's ``nn.TransformerEncoder`` over token embeddings, with a
  classifier head; tuple inputs (tokens, padding mask).
- :func:`vit_task`: a Hugging Face ``ViTModel`` (from a config) on sklearn's digits; its
  attention holds ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` (transformers 5).

Both tasks classify generated token sequences: the class is the topic whose keyword tokens
appear in the sequence, among distractors.
"""

from __future__ import annotations

import torch
from torch import nn

from petra.tasks import Task

VOCAB, CLASSES, KEYWORDS = 96, 4, 6


def _data(n: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    ids = torch.randint(CLASSES * KEYWORDS + 2, VOCAB, (n, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    for i in range(n):
        where = torch.randperm(int(lengths[i]), generator=g)[:3]
        ids[i, where] = 2 + y[i] * KEYWORDS + torch.randint(0, KEYWORDS, (3,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, y


def _batches(ids, mask, y, batch: int, as_dict: bool) -> list:
    out = []
    for i in range(0, len(y), batch):
        x = ({"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch]} if as_dict
             else (ids[i:i + batch], mask[i:i + batch] == 0))
        out.append((x, y[i:i + batch]))
    return out


def torch_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Accuracy written with torch ops (``.float()``): the metric receives torch tensors."""
    return (outputs.argmax(dim=-1) == targets).float().mean().item()


class BertClassifier(nn.Module):
    """``BertModel`` with a mean-pooled linear head; returns a ``SequenceClassifierOutput``."""

    def __init__(self, hidden: int, layers: int, heads: int, ffn: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel
        from transformers.modeling_outputs import SequenceClassifierOutput

        config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=ffn,
                            max_position_embeddings=64, attn_implementation="eager")
        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(hidden, CLASSES)
        self._out = SequenceClassifierOutput

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self._out(logits=self.head(pooled))


def bert_task(hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64,
              epochs: int = 6, seq: int = 12) -> Task:
    torch.manual_seed(0)
    model = BertClassifier(hidden, layers, heads, ffn)
    splits = [_batches(*_data(n, seq, seed), 32, as_dict=True)
              for n, seed in ((640, 1), (192, 2), (192, 3))]
    return Task(model=model, train=splits[0], val=splits[1], test=splits[2],
                example_input=splits[1][0][0], output=lambda out: out.logits,
                metric=torch_accuracy, train_epochs=epochs, train_lr=3e-3)


class EncoderClassifier(nn.Module):
    """Token embeddings → ``nn.TransformerEncoder`` → masked mean → Linear."""

    def __init__(self, dim: int, layers: int, heads: int, ffn: int, nested: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, batch_first=True)
        # nested=True is torch's default: a fast path for padded batches in eval mode
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens), src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0))


def encoder_task(dim: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64,
                 epochs: int = 6, seq: int = 12, nested: bool = False) -> Task:
    torch.manual_seed(0)
    model = EncoderClassifier(dim, layers, heads, ffn, nested)
    splits = [_batches(*_data(n, seq, seed), 32, as_dict=False)
              for n, seed in ((640, 1), (192, 2), (192, 3))]
    return Task(model=model, train=splits[0], val=splits[1], test=splits[2],
                example_input=splits[1][0][0], metric=torch_accuracy, train_epochs=epochs,
                train_lr=3e-3)


class ViTClassifier(nn.Module):
    """``ViTModel`` on 8x8 digits (2x2 patches) with a Linear head on the CLS token."""

    def __init__(self, hidden: int, layers: int, heads: int, ffn: int) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=ffn, attn_implementation="eager")
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.head = nn.Linear(hidden, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(pixel_values=pixel_values).last_hidden_state[:, 0])


def vit_task(hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64,
             epochs: int = 6) -> Task:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target)

    def batches(lo: int, hi: int) -> list:
        return [({"pixel_values": x[i:min(i + 64, hi)]}, y[i:min(i + 64, hi)])
                for i in range(lo, hi, 64)]

    return Task(model=ViTClassifier(hidden, layers, heads, ffn), train=batches(0, 1100),
                val=batches(1100, 1450), test=batches(1450, len(y)),
                example_input={"pixel_values": x[1100:1116]}, metric=torch_accuracy,
                train_epochs=epochs, train_lr=3e-3)


def failing_forward_task() -> Task:
    """A task whose forward raises on its own inputs (a head sized for another input): the
    layer listing, which runs the model first, stopped ``petra space`` with a traceback."""
    task = encoder_task(epochs=1)
    task.model.head = nn.Linear(3, CLASSES)
    return task


def failing_metric_task() -> Task:
    """A task whose metric raises: the baseline must stop with one line, not a traceback."""
    task = encoder_task(epochs=1)

    def metric(outputs, targets):
        raise RuntimeError("this metric always fails")

    task.metric = metric
    return task
