"""The trace cache never serves results of other code; the trace refuses what it cannot finish (issues 12, 19)."""

import json
import time

from click.testing import CliRunner

from peftprof.cli import cli
from peftprof.scenario import load_scenarios
from tests.conftest import TINY_MODEL


def test_trace_cache_is_keyed_by_the_code_that_traced(tmp_path, monkeypatch):
    import peftprof.trace as trace_mod

    monkeypatch.setattr(trace_mod, "CACHE_DIR", tmp_path / "cache")
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_MODEL + '[training]\nbatch_size = 1\nseq_len = 8\n[run]\ndevice = "cpu"\n')
    (s,) = load_scenarios([path])
    real = trace_mod.cached_trace_peak(s)
    (entry,) = (tmp_path / "cache").glob("*.json")
    # a result left by older code under the same variant and versions: poison it, then change the code
    entry.write_text(json.dumps(dict(real, peak_bytes=1)))
    assert trace_mod.cached_trace_peak(s)["peak_bytes"] == 1  # same code: the cache is used
    monkeypatch.setattr(trace_mod, "code_fingerprint", lambda: "edited-code")
    assert trace_mod.cached_trace_peak(s)["peak_bytes"] == real["peak_bytes"]  # other code: traced again
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_source_fingerprint_changes_with_any_module_of_the_package(tmp_path):
    import shutil
    from pathlib import Path

    import peftprof
    from peftprof.trace import source_fingerprint

    copy = tmp_path / "peftprof"
    shutil.copytree(Path(peftprof.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    before = source_fingerprint(copy)
    step = copy / "run" / "step.py"
    step.write_text(step.read_text() + "\n# an edit\n")
    assert source_fingerprint(copy) != before


def test_trace_of_a_ten_million_layer_model_is_refused_with_the_analytic_answer(write_scenario):
    path = write_scenario(TINY_MODEL.replace("num_hidden_layers = 2", "num_hidden_layers = 10000000")
                          + '[training]\nbatch_size = 1\nseq_len = 8\n')
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, ["estimate", str(path), "--method", "trace", "--format", "json", "--device", "cpu"])
    # bounded: without the limit it builds 10M layers (hours); a loose bound, since a loaded 2-core machine took 64 s
    assert time.perf_counter() - t0 < 300
    assert result.exit_code == 0, result.output
    (est,) = json.loads(result.stdout)
    assert est["estimate"]["method"] == "analytic"
    assert ("note: s: --method trace runs at most 256 decoder-layer passes per step; this one needs 10,000,000 "
            "(10,000,000 layers x 1 micro-batches): the analytic estimate answers instead") in result.stderr
