"""Issue #13, mixed precision: the training step under torch.autocast as Accelerate / the HF Trainer run it
(forward and loss under autocast, outputs made fp32, backward outside it, torch.amp.GradScaler for fp16), the
trace replaying it on fake tensors, and the CLI accepting the setting."""

import json

import pytest
import torch
from click.testing import CliRunner

from peftprof.cli import cli
from peftprof.run import step as step_mod
from peftprof.run.build import build
from peftprof.run.runner import run_variant
from peftprof.run.step import synthetic_batch, train_step
from peftprof.scenario import load_scenario
from peftprof.trace import trace_peak

LLAMA = ('model_type = "llama"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
         'num_key_value_heads = 2\nintermediate_size = 160\nvocab_size = 1000')


class _NoProbe:
    def set_phase(self, name):
        pass

    def mark_gradients(self, grads):
        pass


def _scenario(write_scenario, precision: str, peft: str = 'method = "lora"\nr = 8', training: str = "",
              name: str = "amp", seq_len: int = 16):
    text = (f'name = "{name}"\n[model]\n{LLAMA}\n[precision]\n{precision}\n[peft]\n{peft}\n'
            f'[training]\nbatch_size = 2\nseq_len = {seq_len}\n{training}\n'
            '[run]\ndevice = "cpu"\nsteps = 1\nwarmup_steps = 1\n')
    (s,) = load_scenario(write_scenario(text, name=f"{name}.toml"))
    return s


def _dtypes_seen(built, s, ids) -> dict:
    """Output dtype of q_proj's frozen base layer, of lora_A, and of the logits the step holds."""
    seen = {}
    q = built.model.base_model.model.model.layers[0].self_attn.q_proj
    hooks = [q.base_layer.register_forward_hook(lambda m, i, o: seen.setdefault("base", o.dtype) and None),
             q.lora_A["default"].register_forward_hook(lambda m, i, o: seen.setdefault("lora_A", o.dtype) and None)]
    original = step_mod.outputs_to_fp32

    def spy(outputs):
        outputs = original(outputs)
        seen["logits"] = outputs.logits.dtype
        return outputs

    step_mod.outputs_to_fp32 = spy
    try:
        train_step(built, s, ids, _NoProbe(), {})
    finally:
        step_mod.outputs_to_fp32 = original
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("autocast,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_step_runs_forward_under_autocast_and_keeps_adapters_fp32(write_scenario, autocast, dtype):
    """fp32 weights: under autocast the frozen linear and the LoRA matmul compute in the autocast dtype
    (torch's CPU lower-precision list has linear), the held logits are fp32 (Accelerate's
    convert_outputs_to_fp32), and the adapters themselves stay fp32 parameters (peft autocast_adapter_dtype)."""
    s = _scenario(write_scenario, f'weights = "fp32"\nautocast = "{autocast}"')
    built = build(s, "cpu")
    ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(0))
    built.model.train()
    seen = _dtypes_seen(built, s, ids)
    assert seen == {"base": dtype, "lora_A": dtype, "logits": torch.float32}
    assert {p.dtype for p in built.model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.grad for p in built.model.parameters()} == {None}  # zero_grad(set_to_none) after the step


def test_without_autocast_nothing_changes(write_scenario):
    s = _scenario(write_scenario, 'weights = "fp32"')
    built = build(s, "cpu")
    ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(0))
    train_step(built, s, ids, _NoProbe(), {})
    assert built.scaler is None
    q = built.model.base_model.model.model.layers[0].self_attn.q_proj
    seen = {}
    q.base_layer.register_forward_hook(lambda m, i, o: seen.setdefault("base", o.dtype) and None)
    train_step(built, s, ids, _NoProbe(), {})
    assert seen == {"base": torch.float32}


def test_bf16_adapters_of_a_bf16_model_stay_fp32(write_scenario):
    s = _scenario(write_scenario, 'weights = "bf16"\nautocast = "bf16"')
    built = build(s, "cpu")
    assert {p.dtype for p in built.model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in built.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert built.trainable_dtypes == ["float32"]  # for the run record (peft autocast_adapter_dtype kept)


def test_fp16_autocast_scales_the_loss_and_the_scaler_adds_a_few_bytes(write_scenario, monkeypatch):
    """fp16: torch.amp.GradScaler as Accelerate uses it; its scale survives steps (kept on `built`). What it
    adds to the measured step, against the same step without a scaler: the scaled loss and unscale_'s
    found-inf flag, two fp32 scalars, at the peak (measured: +4 B at the backward peak, 8 B of temporaries)."""
    s = _scenario(write_scenario, 'weights = "fp32"\nautocast = "fp16"', 'method = "full"', seq_len=32)
    built = build(s, "cpu")
    ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(0))
    train_step(built, s, ids, _NoProbe(), {})
    assert isinstance(built.scaler, torch.amp.GradScaler)
    assert built.scaler.get_scale() == 65536.0  # torch's init_scale, no inf found in a normal step
    with_scaler = run_variant(s, device="cpu")["measured"]
    monkeypatch.setattr(step_mod, "grad_scaler", lambda built, s, device_type: None)
    without = run_variant(s, device="cpu")["measured"]
    assert with_scaler["peak_phase"] == without["peak_phase"] == "backward"
    assert with_scaler["peak_bytes"] - without["peak_bytes"] == 4
    assert {k: with_scaler["breakdown"][k] - without["breakdown"][k] for k in with_scaler["breakdown"]} == \
        dict.fromkeys(with_scaler["breakdown"], 0) | {"temporaries": 4}


@pytest.mark.parametrize("precision,peft,training", [
    ('weights = "bf16"\nautocast = "bf16"', 'method = "lora"\nr = 8\ndropout = 0.1', 'attention = "eager"'),
    ('weights = "fp32"\nautocast = "fp16"', 'method = "full"', 'gradient_checkpointing = "full"'),
    ('weights = "nf4"\ndouble_quant = true\ncompute_dtype = "bf16"\nautocast = "bf16"',
     'method = "lora"\nr = 8\ntarget_modules = "all-linear"',
     'gradient_checkpointing = "full"\noptimizer = "paged_adamw_8bit"'),
    ('weights = "int8"\ncompute_dtype = "fp32"\nautocast = "fp16"', 'method = "ia3"', 'optimizer = "sgd"'),
])
def test_trace_replays_the_autocast_step_exactly(write_scenario, precision, peft, training):
    """The trace runs step.py's autocast step on fake tensors (device type cpu, the CPU autocast policy)."""
    s = _scenario(write_scenario, precision, peft, training)
    measured = run_variant(s, device="cpu")["measured"]
    traced = trace_peak(s)
    assert traced["peak_bytes"] == measured["peak_bytes"]
    assert traced["breakdown"] == measured["breakdown"]


def test_cli_estimate_trace_and_run_accept_autocast(write_scenario, tmp_path):
    s = _scenario(write_scenario, 'weights = "fp32"\nautocast = "bf16"', name="cli-amp")
    path = s.source
    runner = CliRunner()
    for method in ("analytic", "trace"):
        result = runner.invoke(cli, ["estimate", path, "--device", "cpu", "--method", method, "--format", "json"])
        assert result.exit_code == 0, result.output
        (est,) = json.loads(result.output)
        assert est["scenario"]["precision"]["autocast"] == "bf16"
        assert est["estimate"]["peak_bytes"] > 0
    result = runner.invoke(cli, ["run", path, "--device", "cpu", "--out", str(tmp_path / "out"), "--no-report",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    (rec,) = [json.loads(line) for line in (tmp_path / "out" / "cli-amp.jsonl").read_text().splitlines()]
    assert rec["status"] == "ok" and rec["scenario"]["precision"]["autocast"] == "bf16"


def test_bad_autocast_value_exits_2_naming_file_and_key(write_scenario):
    path = write_scenario(f'[model]\n{LLAMA}\n[precision]\nautocast = "fp8"\n', name="bad.toml")
    result = CliRunner().invoke(cli, ["estimate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f'error: {path}: [precision] autocast: unknown value "fp8" '
                                     '(allowed: none | bf16 | fp16)')


def test_records_say_adapters_stay_fp32_and_the_trace_names_the_cuda_policy_gap(tmp_path):
    from peftprof.run.runner import run_variant
    from peftprof.scenario import load_scenarios
    from peftprof.trace import trace_estimate

    path = tmp_path / "gpt2.toml"
    path.write_text('[model]\nmodel_type = "gpt2"\nn_embd = 64\nn_layer = 1\nn_head = 2\nvocab_size = 500\n'
                    '[precision]\nweights = "fp32"\nautocast = "bf16"\n[peft]\nmethod = "lora"\n'
                    '[training]\nbatch_size = 1\nseq_len = 8\n[run]\ndevice = "cpu"\nsteps = 1\n')
    (s,) = load_scenarios([path])
    rec = run_variant(s, device="cpu")
    assert rec["status"] == "ok", rec["error"]
    assert rec["checks"]["trainable_dtypes"] == ["float32"]  # peft's autocast_adapter_dtype keeps adapters fp32
    est = trace_estimate(s, device="cuda")
    assert est["note"] == ("gpt2: the trace follows torch's CPU autocast op list; CUDA's also runs layer_norm, "
                           "softmax and pow in fp32 (estimate/autocast.py): the analytic CUDA estimate follows it")
    assert "note" not in trace_estimate(s, device="cpu")
