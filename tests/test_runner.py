"""The runner on CPU: every method/precision/policy/optimizer trains; OOMs and errors are results;
results are atomic and resumable; the PEFT checks hold."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_MODEL

from peftprof.cli import cli
from peftprof.errors import UserError
from peftprof.results import measured_error
from peftprof.run import runner as runner_mod
from peftprof.run.build import build, tensor_bytes
from peftprof.run.runner import run_variant
from peftprof.run.session import run_scenarios
from peftprof.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_MODEL + '''[peft]
r = 4
[training]
batch_size = 2
seq_len = 16
[run]
device = "cpu"
steps = 1
warmup_steps = 1
'''


@pytest.fixture(scope="module")
def matrix_records(tmp_path_factory):
    """Both shipped test matrices, run once: 48 method x precision and 30 training variants."""
    out = tmp_path_factory.mktemp("matrix")
    variants = load_scenario(ROOT / "tests/scenarios/cpu-methods.toml") + \
        load_scenario(ROOT / "tests/scenarios/cpu-training.toml")
    records, _, interrupted = run_scenarios(variants, out_dir=out, device="cpu", progress=False)
    assert not interrupted
    return records


def test_every_method_precision_policy_and_optimizer_trains_on_cpu(matrix_records):
    failed = {r["variant"]: r["error"] for r in matrix_records if r["status"] != "ok"}
    assert not failed
    names = " ".join(r["variant"] for r in matrix_records)
    for token in ["lora", "ia3", "prompt_tuning", "prefix_tuning", "full", "fp32", "bf16", "int8", "int4", "fp4", "nf4",
                  "double_quant=true", "every_2", "gradient_checkpointing=full", "adamw_8bit", "paged_adamw_8bit",
                  "paged_adamw,", "sgd", "eager"]:
        assert token in names, token
    for r in matrix_records:
        m = r["measured"]
        assert m["peak_bytes"] > 0 and m["tokens_per_s"] > 0
        assert [p["phase"] for p in m["phases"]] == ["built", "wrapped", "forward", "backward", "optimizer", "steady"]
        assert sum(m["breakdown"].values()) == m["peak_bytes"]  # the categories add up to the peak


def test_estimate_tracks_measurement_on_the_matrix(matrix_records):
    # regression guard for the analytic model on tiny models; the full accuracy table is benchmarks/accuracy.py
    errors = {r["variant"]: measured_error(r) for r in matrix_records}
    worst = max(errors.items(), key=lambda kv: abs(kv[1]))
    assert abs(worst[1]) < 0.05, worst


def test_trace_equals_measurement_on_every_cpu_combination(matrix_records):
    """issue 5: trace peak within 0.5% of the CPU runner's tensor-level peak, each category within 1% or 1 MiB,
    for each method, precision (int4 excepted: quanto cannot quantize meta tensors), policy, optimizer and
    attention implementation."""
    from peftprof.trace import trace_peak

    variants = {v.name: v for v in load_scenario(ROOT / "tests/scenarios/cpu-methods.toml")
                + load_scenario(ROOT / "tests/scenarios/cpu-training.toml")}
    n = 0
    for rec in matrix_records:
        v = variants[rec["variant"]]
        if v.precision.weights == "int4":
            continue
        traced, measured = trace_peak(v), rec["measured"]
        assert abs(traced["peak_bytes"] - measured["peak_bytes"]) <= 0.005 * measured["peak_bytes"], v.name
        for cat, real in measured["breakdown"].items():
            assert abs(traced["breakdown"][cat] - real) <= max(0.01 * real, 1 << 20), (v.name, cat)
        n += 1
    assert n == 70


def test_measured_weights_and_optimizer_equal_real_tensors():
    (s,) = load_scenario_text(TINY)
    rec = run_variant(s, device="cpu")
    built = build(s, "cpu")
    frozen = [p for p in built.model.parameters() if not p.requires_grad] + list(built.model.buffers())
    assert rec["measured"]["breakdown"]["weights"] == tensor_bytes(frozen)
    # AdamW after a step: exp_avg + exp_avg_sq in fp32 per adapter tensor + a 4-byte step each
    n_adapter = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    n_tensors = sum(1 for p in built.model.parameters() if p.requires_grad)
    assert rec["measured"]["breakdown"]["optimizer"] == 8 * n_adapter + 4 * n_tensors


def load_scenario_text(text):
    import tempfile

    d = Path(tempfile.mkdtemp())
    p = d / "tiny.toml"
    p.write_text(text)
    return load_scenario(p)


def test_peft_checks_identity_exact_and_merge_below_1e4_in_fp32():
    (s,) = load_scenario_text(TINY)
    rec = run_variant(s, device="cpu")
    c = rec["checks"]
    assert c["identity_max_abs_diff"] == 0.0  # LoRA's B = 0: the adapter changes nothing at step 0
    assert c["merge_max_abs_diff"] < 1e-4
    assert c["merged_latency_ms"] > 0 and c["unmerged_latency_ms"] > 0
    assert c["quantization_rel_error"] is None


def test_quantization_error_is_reported_for_nf4():
    (s,) = load_scenario_text(TINY.replace('weights = "fp32"', 'weights = "nf4"\ncompute_dtype = "fp32"'))
    rec = run_variant(s, device="cpu")
    # shared/facts.md: NF4 round-trip relative error on normal weights ~0.092 (transformers' init is normal)
    assert 0.05 < rec["checks"]["quantization_rel_error"] < 0.15


@pytest.mark.parametrize("phase", ["build", "forward", "backward", "optimizer"])
def test_oom_in_each_phase_is_a_result_and_the_next_variant_runs(tmp_path, phase):
    variants = load_scenario_text(TINY + '[sweep]\n"peft.r" = [2, 4]\n')
    records, files, _ = run_scenarios(variants, out_dir=tmp_path, device="cpu", progress=False,
                                      fault={variants[0].name: phase})
    assert records[0]["status"] == "oom"
    assert records[0]["error"]["phase"] == phase
    assert records[1]["status"] == "ok"
    stored = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["status"] for r in stored] == ["oom", "ok"]


def test_max_memory_cap_on_cpu_is_an_oom_with_its_phase(tmp_path):
    (s,) = load_scenario_text(TINY)
    ok = run_variant(s, device="cpu")["measured"]
    wrapped = ok["phases"][1]["bytes"]
    rec = run_variant(s, device="cpu", max_memory=(wrapped + ok["peak_bytes"]) // 2)  # the model fits, the step not
    assert rec["status"] == "oom"
    assert rec["error"]["phase"] in ("forward", "backward")
    assert "exceeds the cap" in rec["error"]["message"]
    rec = run_variant(s, device="cpu", max_memory=wrapped // 2)
    assert rec["status"] == "oom" and rec["error"]["phase"] == "build"


def test_an_error_in_one_variant_does_not_stop_the_others(tmp_path, monkeypatch):
    variants = load_scenario_text(TINY + '[sweep]\n"peft.r" = [2, 4, 8]\n')
    real_build = runner_mod.build

    def flaky(s, device):
        if s.peft.r == 4:
            raise RuntimeError("simulated failure")
        return real_build(s, device)

    monkeypatch.setattr(runner_mod, "build", flaky)
    records, _, _ = run_scenarios(variants, out_dir=tmp_path, device="cpu", progress=False)
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert records[1]["error"] == {"phase": "build", "message": "RuntimeError: simulated failure", "library": None,
                                   "exception": "RuntimeError", "traceback": records[1]["error"]["traceback"]}
    assert 'raise RuntimeError("simulated failure")' in records[1]["error"]["traceback"]


def test_a_trace_that_fails_inside_a_library_is_a_note_and_the_run_still_measures(monkeypatch):
    """A variant only the trace estimates (the analytic estimator refuses it) whose trace fails in a library: the
    record has no estimate and says why, and the runner measures anyway (runner.record_estimate)."""
    from peftprof import trace as trace_mod
    from peftprof.estimate import AnalyticUnsupported

    (s,) = load_scenario_text(TINY)

    def refuse(*args, **kwargs):
        raise AnalyticUnsupported("not modelled")

    def broken(*args, **kwargs):
        raise TypeError("a library failed\nsecond line")

    monkeypatch.setattr(runner_mod, "estimate", refuse)
    monkeypatch.setattr(trace_mod, "trace_estimate", broken)
    assert runner_mod.record_estimate(s, "cpu") == (None, "the trace failed: TypeError: a library failed")


def test_resume_after_interruption_and_skip_measured(tmp_path, monkeypatch):
    variants = load_scenario_text(TINY + '[sweep]\n"peft.r" = [2, 4, 8]\n')
    calls, ctrl_c = [], {"armed": True}
    real = runner_mod.run_variant

    def interrupting(s, **kw):
        calls.append(s.name)
        if len(calls) == 2 and ctrl_c["armed"]:  # Ctrl-C during the second variant, once
            ctrl_c["armed"] = False
            raise KeyboardInterrupt
        return real(s, **kw)

    monkeypatch.setattr(runner_mod, "run_variant", interrupting)
    records, files, interrupted = run_scenarios(variants, out_dir=tmp_path, device="cpu", progress=False)
    assert interrupted and len(records) == 1
    assert len(files[0].read_text().splitlines()) == 1  # what finished is saved
    calls.clear()
    records, _, interrupted = run_scenarios(variants, out_dir=tmp_path, device="cpu", progress=False)
    assert not interrupted and [r["status"] for r in records] == ["ok"] * 3
    assert calls == [variants[1].name, variants[2].name]  # the first was not measured again
    calls.clear()
    run_scenarios(variants, out_dir=tmp_path, device="cpu", progress=False, force=True)
    assert len(calls) == 3


def test_unreadable_results_file_is_a_clear_error(tmp_path):
    variants = load_scenario_text(TINY)
    (tmp_path / "tiny.jsonl").mkdir()
    with pytest.raises(UserError) as err:
        run_scenarios(variants, out_dir=tmp_path, device="cpu", progress=False)
    assert err.value.lines() == [f"{tmp_path / 'tiny.jsonl'}: is a directory; the results of scenario 'tiny' go in "
                                 "a file there"]


def test_run_command_writes_results_report_and_summary(tmp_path):
    scen = tmp_path / "tiny.toml"
    scen.write_text(TINY)
    result = CliRunner().invoke(cli, ["run", str(scen), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    # a tiny model: sizes in MiB (textfmt.size_unit), not 0.00 GiB
    assert "variant  status  estimated MiB  measured MiB  error  tokens/s" in result.output
    assert f"results: {tmp_path / 'out' / 'tiny.jsonl'}" in result.output
    assert (tmp_path / "out" / "tiny.html").exists()
    import pandas as pd

    df = pd.read_json(tmp_path / "out" / "tiny.jsonl", lines=True)  # readable by pandas in one call
    assert list(df["status"]) == ["ok"]
    prov = df["provenance"][0]
    assert {"python", "torch", "transformers", "peft", "bitsandbytes", "device", "commit", "time", "host"} <= set(prov)


def test_cuda_request_without_cuda_is_exit_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    scen = tmp_path / "tiny.toml"
    scen.write_text(TINY)
    result = CliRunner().invoke(cli, ["run", str(scen), "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output == "error: --device: device cuda requested but torch sees no CUDA device\n"
    assert not list(tmp_path.glob("*.jsonl"))


def test_estimate_method_trace_cli_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTPROF_CACHE", str(tmp_path / "cache"))
    import importlib

    import peftprof.trace as trace_mod

    importlib.reload(trace_mod)
    scen = tmp_path / "tiny.toml"
    scen.write_text(TINY)
    result = CliRunner().invoke(cli, ["estimate", str(scen), "--method", "trace", "--format", "json",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (est,) = json.loads(result.output)
    assert est["estimate"]["method"] == "trace"
    assert sum(est["estimate"]["breakdown"].values()) == est["estimate"]["peak_bytes"]
    assert len(list((tmp_path / "cache" / "trace").glob("*.json"))) == 1  # cached by resolved variant
    rec = run_variant(load_scenario(scen)[0], device="cpu")
    assert est["estimate"]["peak_bytes"] == rec["measured"]["peak_bytes"]
    scen.write_text(TINY.replace('weights = "fp32"', 'weights = "int4"\ncompute_dtype = "fp32"'))
    result = CliRunner().invoke(cli, ["estimate", str(scen), "--method", "trace"])
    assert result.exit_code == 2
    assert "--method trace does not support int4" in result.output


def test_tracker_counts_new_storages_once_and_not_views_or_in_place_results():
    from peftprof.run.track import MemoryTracker

    x = torch.zeros(256)  # made before tracking: 1,024 bytes nobody registered
    with MemoryTracker() as tracker:
        x.view(16, 16).add_(1)  # a view and an in-place op: no new storage
        y = x * 2  # new: 1,024 bytes
        halves = torch.zeros(64).split(32)  # zeros: new 256 bytes; split: views of it
        del y
    sizes = [tracker.allocs[uid].nbytes for uid, sign in tracker.events if sign == 1]
    assert sorted(sizes) == [256, 1024]
    assert tracker.live_bytes == 256 and len(halves) == 2  # y freed; the halves keep the zeros alive
