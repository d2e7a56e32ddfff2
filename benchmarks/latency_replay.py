"""Replay racing's latency model over measured candidates, one variant against another.

Racing predicts a screened candidate's latency ratio from its per-layer table estimate
(``tier0_latency_ratio``), corrected by the measured candidates
(:func:`petra.engine.racing.table_latency`): from a scheme's second on, by their median
measured/table ratio, and from ``FIT_FROM`` of them on by the ``FORM`` fitted to them (``ratio``,
``affine``, ``shared`` or ``power``; the search's default is ``racing.TABLE_FORM``). This
replays each variant (``--variants FORM[:FIT_FROM]``) over a search's measured candidates in the
order they finished, each predicted from those before it (as a search predicts it), and reports
the median absolute relative error of each: the issue's latency-model figure. A search counts
only the candidates it screened once its calibration was ready, so its own figure can differ.

Sources: the racing searches of an MLflow store (``--store``, ``--experiment``: each
experiment's latest search run) and ``benchmarks/tier0.py`` results files (``--tier0``: random
genomes, each measured in full). Choose on tuning seeds (0-2); report held-out ones.

    python benchmarks/latency_replay.py --store sqlite:///runs/benchmarks/search_at_scale/mlflow.db \
        --experiment scale-text_bert-0-racing --experiment scale-text_bert-1-racing \
        --tier0 benchmarks/results/tier0_text_bert_seed0_val1200.json \
        --out benchmarks/results/latency_replay_tuning.json

Writes the figures with the commit, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import provenance  # noqa: E402

Sequence = list[tuple[str, float, float]]  # (scheme, table estimate, measured ratio), in order


def replay(seq: Sequence, form: str, fit_from: float) -> list[float]:
    """Each candidate's relative error, predicted from the candidates measured before it."""
    from petra.engine.racing import table_latency

    seen: list[tuple[str, float, float]] = []
    errors = []
    for scheme, table, measured in seq:
        if not (math.isfinite(table) and table > 0 and math.isfinite(measured) and measured > 0):
            continue
        errors.append(abs(table_latency(seen, scheme, table, form, fit_from) / measured - 1))
        seen.append((scheme, table, measured))
    return errors


def latest_search(uri: str, experiment: str) -> tuple[str, list]:
    """The id of the experiment's latest search run, and every run of the experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"--experiment: no experiment {experiment!r} in {uri}")
    runs = client.search_runs([exp.experiment_id], max_results=50000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return max(parents, key=lambda r: r.info.start_time).info.run_id, runs


def from_store(uri: str, experiment: str) -> Sequence:
    """The measured candidates of the experiment's latest search run, in finishing order."""
    latest, runs = latest_search(uri, experiment)
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == latest
            and "latency_ratio" in r.data.metrics and "tier0_latency_ratio" in r.data.metrics]
    kids.sort(key=lambda r: r.info.end_time or 0)
    return [(r.data.params.get("quant.scheme", "none"), r.data.metrics["tier0_latency_ratio"],
             r.data.metrics["latency_ratio"]) for r in kids]


def from_tier0(path: str) -> Sequence:
    rows = json.loads(Path(path).read_text())["rows"]
    return [(r["genome"].get("quant.scheme", "none"),
             float(r["tier0"].get("tier0_latency_ratio", math.nan)),
             float(r["measured"].get("latency_ratio") or math.nan)) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=None, help="the MLflow tracking URI")
    parser.add_argument("--experiment", action="append", default=[])
    parser.add_argument("--tier0", action="append", default=[])
    parser.add_argument("--variants", nargs="+",
                        default=["ratio", "affine:2", "affine:4", "shared:2", "shared:3",
                                 "power:3"],
                        help="FORM[:FIT_FROM], as table_latency takes them")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    sources = {f"tier0:{Path(p).name}": from_tier0(p) for p in opts.tier0}
    sources |= {e: from_store(opts.store, e) for e in opts.experiment}
    report = {}
    for name, seq in sources.items():
        variants = {}
        for variant in opts.variants:
            form, _, fit_from = variant.partition(":")
            errors = replay(seq, form, float(fit_from or 2))
            variants[variant] = {
                "median_rel_error": float(np.median(errors)) if errors else math.nan,
                "n": len(errors)}
        measured = [m for _, _, m in seq if math.isfinite(m)]
        report[name] = {"candidates": len(seq), "min_latency_ratio": min(measured, default=None),
                        "variants": variants}
        print(name, json.dumps(report[name]), flush=True)
    names = next(iter(report.values()))["variants"] if report else {}
    report["mean"] = {v: float(np.mean([r["variants"][v]["median_rel_error"]
                                        for r in report.values()])) for v in names}
    print("mean", json.dumps(report["mean"]))
    Path(opts.out).write_text(json.dumps({"provenance": provenance(), "sources": report},
                                         indent=1, default=str))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
