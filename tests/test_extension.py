"""Adding a pruning criterion is one function with one decorator (tests/plugin_criterion.py):
the space offers it, a strategy proposes it, an evaluation runs it, and the contract suites
cover it without a test edit. Run in fresh interpreters, so the registry of this one stays as
it is."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import tests.plugin_criterion  # registers row_scaled
from petra.config import load_config
from petra.space import prunable_layers, build_space
from petra.engine.strategies import make_strategy
from petra.tasks import load_task

task = load_task("digits_cnn", {"width": 8})
space = build_space(load_config({"space": {"pruning": ["none", "row_scaled"]}}).space,
                    prunable_layers(task.model, task.example_input))
offered = [n for n in space.names if n.endswith(".method")
           and "row_scaled" in space.gene(n).choices]
strategy = make_strategy("nsga2", space=space, objectives=[("val_accuracy", "max")],
                         population=8, generations=1, seed=0)
proposed = sum(v == "row_scaled" for g in strategy.ask() for k, v in g.items())
print(len(offered), proposed)
"""


def test_a_registered_criterion_is_offered_and_proposed():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    offered, proposed = map(int, out.stdout.split())
    assert offered >= 4  # unstructured: every prunable layer, the classifier too
    assert proposed > 0


def test_the_contract_suites_cover_a_registered_criterion_with_no_test_edit():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.plugin_criterion", "-k",
         "row_scaled", "tests/test_compress.py", "tests/test_sparsity_rules.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    # the unstructured contract at each sparsity, and each automatic rule in each scope
    assert passed >= 4, summary
