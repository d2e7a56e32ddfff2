"""Every strategy proposes exactly the genomes it proposed when they were recorded.

A fixed-seed search with a synthetic, deterministic evaluation (some candidates failed, some
pruned) runs each registered strategy for a few generations; its batches must equal those in
``tests/data/strategy_genomes.json``, genome for genome, in order. A refactor of the strategies
that changes no behaviour keeps this test passing; a deliberate change of behaviour re-records
the file (``python -m tests.test_strategy_genomes --record``) and says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from petra.config import load_config
from petra.engine.strategies import make_strategy
from petra.engine.strategies.base import STRATEGIES, Told
from petra.space import LayerInfo, build_space

RECORDED = Path(__file__).parent / "data" / "strategy_genomes.json"
OBJECTIVES = [("val_accuracy", "max"), ("artifact_bytes", "min"), ("latency_ratio", "min")]
LAYERS = [
    LayerInfo("stem", "Conv2d", 16, 160, True),
    LayerInfo("block.conv", "Conv2d", 32, 4640, True),
    LayerInfo("block.proj", "Conv2d", 32, 544, True),
    LayerInfo("head", "Linear", 64, 2112, True),
    LayerInfo("fc", "Linear", 10, 650, False),
]
SPACE = {
    "pruning": ["none", "magnitude", "l2_channel"],
    "quantization": ["none", "int8_static", "int8_dynamic"],
    "regularizer": ["none", "l1", "kd"],
    "finetune": {"epochs": [0, 3], "lr": [1e-4, 1e-2]},
    "sparsity_rules": ["fixed", "auto_emp"],
    "static": {"calibration": ["minmax", "entropy"], "fallback": [0.0, 0.3]},
}
POPULATION, GENERATIONS = 6, 3


def outcome(genome: dict) -> Told:
    """A deterministic stand-in for an evaluation: sparser is smaller and less accurate; a
    genome whose hash ends in certain digits failed, or was stopped early."""
    key = int(hashlib.sha256(json.dumps(genome, sort_keys=True).encode()).hexdigest(), 16)
    sparsities = [v for k, v in genome.items() if k.endswith(".sparsity")]
    mean = sum(sparsities) / len(sparsities)
    quantized = genome.get("quant.scheme", "none") != "none"
    if key % 9 == 0:
        return Told(genome=genome, values=None, status="failed")
    values = (0.99 - 0.3 * mean ** 2 - 0.01 * quantized + (key % 100) / 1e4,
              1e5 * (1 - mean) * (0.25 if quantized else 1.0),
              (1 - 0.5 * mean) * (0.7 if quantized else 1.0))
    return Told(genome=genome, values=values, status="pruned" if key % 7 == 0 else "complete")


def proposals(name: str) -> list[list[dict]]:
    """The batches strategy ``name`` proposes over the fixed-seed search."""
    space = build_space(load_config({"space": SPACE}).space, LAYERS)
    initial = [{"layers.stem.method": "l2_channel", "layers.stem.sparsity": 0.5,
                "quant.scheme": "int8_static"}]
    strategy = make_strategy(name, space=space, objectives=OBJECTIVES, population=POPULATION,
                             generations=GENERATIONS, seed=7, initial=initial)
    batches = []
    while not strategy.done:
        batch = strategy.ask()
        batches.append(batch)
        strategy.tell([outcome(g) for g in batch])
    return json.loads(json.dumps(batches))  # as the file holds them (tuples become lists)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_a_fixed_seed_search_proposes_the_recorded_genomes(name):
    recorded = json.loads(RECORDED.read_text())
    assert name in recorded, f"no genomes recorded for strategy {name!r}: re-record the file"
    got = proposals(name)
    assert len(got) == len(recorded[name])
    for generation, (batch, expected) in enumerate(zip(got, recorded[name], strict=True)):
        assert batch == expected, f"{name}: generation {generation} differs"


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.test_strategy_genomes --record")
    RECORDED.parent.mkdir(parents=True, exist_ok=True)
    RECORDED.write_text(json.dumps({n: proposals(n) for n in STRATEGIES.names()}, indent=1,
                                   sort_keys=True) + "\n")
    print(f"wrote {RECORDED}")
