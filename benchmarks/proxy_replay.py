"""Other tier-0 accuracy proxies, replayed over the measured candidates of a racing search.

Racing predicts a screened candidate's final validation accuracy from its tier-0 reading
(:func:`petra.engine.racing.features`: the divergence from the dense model, the fine-tune's
epochs and the MACs ratio; nearest neighbours among the measured candidates). This script
re-compresses each measured candidate of a search (from its journal: the genome as it ran) and
reads, in torch and with no fine-tune, what else a screen could read:

- ``probe``: the KL divergence from the dense model after the model's last Linear is refitted
  to the dense model's outputs by ridge regression (16 training batches to fit, 8 to score; two thirds and a third of a
  shorter training split):
  how much of what the output layer needs the compressed features still carry;
- ``grad_sq``: the squared norm of the gradient of the KL divergence on 4 training batches,
  the first step a fine-tune would take;
- ``params``: the parameters left.

It reports the Spearman correlation of each (and of the logged divergence) with the final
validation accuracy, and replays the calibration over the candidates in the order they
finished, each predicted from those before it (as a search predicts), with each feature set.
Choose on tuning seeds (0-2); report held-out ones.

    python benchmarks/proxy_replay.py --config search_spaces/text_bert.yaml --seed 0 \\
        --store sqlite:///runs/benchmarks/search_at_scale/mlflow.db \\
        --experiment scale-text_bert-0-racing --out benchmarks/results/proxy_replay_tuning.json

Reads the journals under ``runs/journal/`` of the experiments' latest search runs. Writes the
figures with the commit, the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from latency_replay import latest_search  # noqa: E402
from provenance import provenance  # noqa: E402
from ranks import spearman  # noqa: E402

FIT_BATCHES, SCORE_BATCHES, GRAD_BATCHES, RIDGE = 16, 8, 4, 1e-2


def _kl(dense: Any, outputs: Any) -> Any:
    """KL(dense || outputs) of the output distributions, averaged over the examples."""
    p = dense.log_softmax(-1)
    return (p.exp() * (p - outputs.log_softmax(-1))).sum(-1).mean()


def _log(x: float) -> float:
    return math.log(max(float(x), 1e-9))


#: The calibration's feature sets replayed: racing's own, and each proxy added or swapped in.
FEATURE_SETS: dict[str, Callable[[dict, dict, dict], tuple[float, ...]]] = {}


def _feature_sets() -> None:
    from petra.engine.racing import features

    FEATURE_SETS.update({
        "racing": lambda g, m, p: features(g, m),
        "racing+probe": lambda g, m, p: (*features(g, m), _log(p["probe"])),
        "probe_for_divergence": lambda g, m, p: (_log(p["probe"]), *features(g, m)[1:]),
        "racing+grad_sq": lambda g, m, p: (*features(g, m), _log(p["grad_sq"])),
        "racing+params": lambda g, m, p: (*features(g, m), _log(p["params"])),
        "no_divergence": lambda g, m, p: features(g, m)[1:],
    })


#: ``--genome-only``: what the genome and the logged tier-0 reading add, with no re-compression.
GENOME_SETS: dict[str, Callable[[dict, dict, dict], tuple[float, ...]]] = {}


def _genome_sets() -> None:
    from petra.engine.racing import features

    GENOME_SETS.update({
        "racing": lambda g, m, p: features(g, m),
        "racing+lr": lambda g, m, p: (*features(g, m), _log(float(g.get("finetune.lr", 1.0)))
                                      if g.get("finetune.epochs") else 0.0),
        "racing+kd": lambda g, m, p: (*features(g, m), float(g.get("reg.kind") == "kd")),
        "racing+int4": lambda g, m, p: (*features(g, m),
                                        float(g.get("quant.scheme") == "int4_weight")),
        "racing+size": lambda g, m, p: (*features(g, m), _log(m["tier0_size_ratio"])),
    })


def measured_records(store: str, experiment: str) -> list[dict]:
    """The measured candidates (with a tier-0 reading) of the experiment's latest search run,
    from its journal, in finishing order."""
    latest, _ = latest_search(store, experiment)
    journal = ROOT / "runs" / "journal" / latest / "results.jsonl"
    if not journal.exists():
        raise SystemExit(f"--experiment {experiment}: no journal at {journal}")
    rows = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("status") == "complete"
            and "tier0_divergence" in r.get("metrics", {})]


class Reader:
    """What the proxies compare against: the task's dense model and its training batches."""

    def __init__(self, config: str, seed: int) -> None:
        import torch

        from petra.candidate.baseline import prepare_baseline
        from petra.candidate.evaluate import Evaluator
        from petra.config import load_config
        from petra.engine.loop import cache_dir
        from petra.tasks import load_task

        cfg = load_config(config, [f"seed={seed}"])
        task = load_task(cfg.task.name, cfg.task.params)
        baseline = prepare_baseline(task, task_name=cfg.task.name, task_params=cfg.task.params,
                                    cache_dir=cache_dir(), seed=cfg.seed, threads=1)
        self.evaluator = Evaluator.from_config(cfg, baseline, threads=1, core=0)
        torch.set_num_threads(1)
        self.task = self.evaluator.task
        self.batches = list(itertools.islice(self.task.train, FIT_BATCHES + SCORE_BATCHES))
        self.fit = len(self.batches) * FIT_BATCHES // (FIT_BATCHES + SCORE_BATCHES)
        dense = self._outputs(self.task.model, self.batches)
        self.dense_fit = torch.cat(dense[:self.fit])
        self.dense_score = torch.cat(dense[self.fit:])
        self.dense_grad = dense[self.fit:self.fit + GRAD_BATCHES]

    def _outputs(self, model: Any, batches: Sequence[Any]) -> list[Any]:
        import torch

        from petra.tasks.contract import args

        with torch.no_grad():
            return [model(*args(b[0])).double() for b in batches]

    def _head_inputs(self, model: Any, batches: Sequence[Any]) -> Any:
        """The inputs of the last ``nn.Linear`` called, per example."""
        import torch
        from torch import nn

        from petra.tasks.contract import args

        seen: list[Any] = []
        hooks = [m.register_forward_hook(lambda _m, i, _o: seen.append(i[0].detach()))
                 for m in model.modules() if isinstance(m, nn.Linear)]
        xs = []
        try:
            with torch.no_grad():
                for b in batches:
                    seen.clear()
                    model(*args(b[0]))
                    xs.append(seen[-1].reshape(-1, seen[-1].shape[-1]))
        finally:
            for h in hooks:
                h.remove()
        return torch.cat(xs).double()

    def read(self, genome: dict, seed: int) -> dict[str, float]:
        import torch

        from petra.candidate.recipes import Recipe
        from petra.candidate.screen import round_weights
        from petra.compress.gates import recalibrate_batchnorm
        from petra.registry import QUANTIZATION
        from petra.tasks.contract import args

        recipe = Recipe.from_genome(genome)
        model = copy.deepcopy(self.task.model)
        self.evaluator.compress(model, recipe, seed)
        recalibrate_batchnorm(model, self.batches[:4])
        meta = QUANTIZATION.get(recipe.quant).meta
        round_weights(model, meta["weights"], meta["applies_to"])
        model.eval()
        x_fit = self._head_inputs(model, self.batches[:self.fit])
        x_score = self._head_inputs(model, self.batches[self.fit:])
        mu, sd = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)

        def design(x: Any) -> Any:
            return torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)

        z = design(x_fit)
        ridge = RIDGE * len(z) * torch.eye(z.shape[1], dtype=z.dtype)
        ridge[-1, -1] = 0.0  # the bias is not shrunk
        w = torch.linalg.solve(z.T @ z + ridge, z.T @ self.dense_fit)
        probe = float(_kl(self.dense_score, design(x_score) @ w))
        grad_sq = 0.0
        for b, dense in zip(self.batches[self.fit:], self.dense_grad, strict=False):
            model.zero_grad()
            for param in model.parameters():
                param.requires_grad_(True)
            _kl(dense, model(*args(b[0])).double()).backward()
            grad_sq += sum(float((t.grad ** 2).sum()) for t in model.parameters()
                           if t.grad is not None)
        return {"probe": probe, "grad_sq": grad_sq / GRAD_BATCHES,
                "params": float(sum(t.numel() for t in model.parameters()))}


def replay(rows: Sequence[dict], feature: Callable[[dict, dict, dict], tuple[float, ...]]
           ) -> float:
    """Spearman of the calibration's predictions and the measured accuracy, each candidate
    predicted from those measured before it once the calibration is ready."""
    from petra.engine.racing import MIN_OBSERVED, _knn

    seen: list[dict] = []
    predicted, measured = [], []
    for r in rows:
        x = feature(r["genome"], r["metrics"], r["proxies"])
        if len(seen) >= MIN_OBSERVED:
            predicted.append(_knn(seen, x))
            measured.append(r["metrics"]["val_accuracy"])
        seen.append({"features": x, "val_accuracy": r["metrics"]["val_accuracy"]})
    return spearman(predicted, measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, required=True, help="the search's seed")
    parser.add_argument("--store", required=True, help="the MLflow tracking URI")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", required=True, help="a results file; a new experiment is "
                        "added to one that exists")
    parser.add_argument("--genome-only", action="store_true", help="replay only what the "
                        "genome and the logged tier-0 reading add (the lr, distillation, int4, "
                        "the estimated size): nothing re-compressed")
    opts = parser.parse_args()
    rows = measured_records(opts.store, opts.experiment)
    if opts.genome_only:
        _genome_sets()
        for r in rows:
            r["proxies"] = {}
        write(Path(opts.out), opts.experiment, {"candidates": len(rows), (
            "spearman_calibrated_vs_val"): {k: replay(rows, f) for k, f in GENOME_SETS.items()}})
        return
    _feature_sets()
    reader = Reader(opts.config, opts.seed)
    for i, r in enumerate(rows):
        r["proxies"] = reader.read(r["genome"], opts.seed + i)
        print(f"{i + 1}/{len(rows)} {json.dumps(r['proxies'])} val "
              f"{r['metrics']['val_accuracy']:.4f}", flush=True)
    val = [r["metrics"]["val_accuracy"] for r in rows]
    raw = {"tier0_divergence": spearman([-r["metrics"]["tier0_divergence"] for r in rows], val)}
    raw |= {k: spearman([-r["proxies"][k] for r in rows], val)
            for k in ("probe", "grad_sq", "params")}
    report = {"candidates": len(rows), "spearman_vs_val_lower_is_better": raw,
              "spearman_calibrated_vs_val": {k: replay(rows, f)
                                             for k, f in FEATURE_SETS.items()},
              "rows": [{"genome_hash": r["genome_hash"], "val": r["metrics"]["val_accuracy"],
                        "tier0_divergence": r["metrics"]["tier0_divergence"], **r["proxies"]}
                       for r in rows]}
    write(Path(opts.out), opts.experiment, report)


def write(out: Path, experiment: str, report: dict) -> None:
    """``report`` as ``experiment``'s entry of the results file ``out``, with provenance."""
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    data = json.loads(out.read_text()) if out.exists() else {"experiments": {}}
    data["experiments"][experiment] = {"provenance": provenance(), **report}
    out.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
