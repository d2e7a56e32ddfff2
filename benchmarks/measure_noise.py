"""How repeatable are petra's measurements? 3 fixed genomes x 5 evaluations, fresh processes.

Each evaluation is one `petra evaluate --json` process on digits_cnn (1 thread, pinned core,
interleaved with the dense baseline). Writes the coefficient of variation (std / mean) of
`latency_ratio` and `size_ratio` per genome to benchmarks/results/measure_noise.json.

    .venv/bin/python benchmarks/measure_noise.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "search_spaces" / "quickstart.yaml"
CONVS = ["stem", "layer1.conv1", "layer1.conv2", "layer1.downsample.0", "layer2.conv1",
         "layer2.conv2", "layer2.downsample.0", "layer3.conv1", "layer3.conv2"]
GENOMES = {
    "int8_static": {"quant.scheme": "int8_static"},
    "l2_channel_50_round8_int8": {
        **{f"layers.{n}.method": "l2_channel" for n in CONVS},
        **{f"layers.{n}.sparsity": 0.5 for n in CONVS},
        "prune.round_to": 8, "quant.scheme": "int8_static",
    },
    "magnitude_90": {
        **{f"layers.{n}.method": "magnitude" for n in CONVS},
        **{f"layers.{n}.sparsity": 0.9 for n in CONVS},
    },
}


def evaluate(genome: dict, workdir: Path) -> dict:
    path = workdir / "genome.json"
    path.write_text(json.dumps(genome))
    proc = subprocess.run(
        [sys.executable, "-m", "petra.cli", "evaluate", str(CONFIG), "--genome", str(path),
         "--json"], cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout)["metrics"]


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started = time.time()
    runs: dict[str, list[dict]] = {name: [] for name in GENOMES}
    with tempfile.TemporaryDirectory() as tmp:
        # Round-robin over the genomes, so slow phases of the VM hit all of them alike.
        for _ in range(args.repeats):
            for name, genome in GENOMES.items():
                runs[name].append(evaluate(genome, Path(tmp)))
    report = {"config": str(CONFIG.relative_to(ROOT)), "repeats": args.repeats, "genomes": {}}
    for name, metrics in runs.items():
        lat = [m["latency_ratio"] for m in metrics]
        size = [m["size_ratio"] for m in metrics]
        report["genomes"][name] = {
            "latency_ratio": lat, "size_ratio": size,
            "latency_ratio_mean": statistics.mean(lat), "latency_ratio_cv": cv(lat),
            "size_ratio_mean": statistics.mean(size), "size_ratio_cv": cv(size),
            "latency_ratio_iqr_mean": statistics.mean(m["latency_ratio_iqr"] for m in metrics),
        }
    report["max_latency_ratio_cv"] = max(g["latency_ratio_cv"] for g in report["genomes"].values())
    report["max_size_ratio_cv"] = max(g["size_ratio_cv"] for g in report["genomes"].values())
    report["wall_s"] = round(time.time() - started, 1)
    out = ROOT / "benchmarks" / "results" / "measure_noise.json"
    out.write_text(json.dumps(report, indent=2))
    for name, g in report["genomes"].items():
        print(f"{name:<28} latency {g['latency_ratio_mean']:.3f} (cv {g['latency_ratio_cv']:.1%})"
              f"  size {g['size_ratio_mean']:.4f} (cv {g['size_ratio_cv']:.2%})")
    print(f"wrote {out.relative_to(ROOT)} in {report['wall_s']} s")


if __name__ == "__main__":
    main()
