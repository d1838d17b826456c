"""Regression test on the estimator's error: a fast subset of benchmarks/accuracy.py, measured for real."""

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import generate, load  # noqa: E402

from peftprof.estimate import estimate  # noqa: E402
from peftprof.run.runner import run_variant  # noqa: E402

# benchmarks/results/accuracy.md targets: analytic peak median <= 2%, max <= 5% (issue 8)
MEDIAN_TARGET, MAX_TARGET = 0.02, 0.05


def test_analytic_error_on_ten_generated_scenarios(tmp_path):
    scenarios = [load(name, text, tmp_path) for name, text in generate(60, seed=0)]
    small = sorted(scenarios, key=lambda s: s.model.arch.n_params * s.training.batch_size * s.training.seq_len)[:10]
    errors = {}
    for s in small:
        rec = run_variant(s, device="cpu")
        assert rec["status"] == "ok", (s.name, rec["error"])
        measured = rec["measured"]["peak_bytes"]
        errors[s.name] = (estimate(s, device="cpu")["peak_bytes"] - measured) / measured
    assert len({s.peft.method for s in small}) >= 3  # the subset is not one method only
    assert statistics.median(abs(e) for e in errors.values()) <= MEDIAN_TARGET, errors
    assert max(abs(e) for e in errors.values()) <= MAX_TARGET, errors
