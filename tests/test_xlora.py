"""X-LoRA (peft XLoraModel, run/xlora.py): K frozen LoRA experts gated by a trained classifier. Parameter counts by
hand against the real peft model, the trace against the CPU runner (exact), and the loader's refusals, each
backed where it can be by the library failure it prevents."""

import math
import os
import re
from dataclasses import replace

import pytest
import torch

from peftprof.errors import UserError
from peftprof.estimate import AnalyticUnsupported, estimate
from peftprof.run.xlora import classifier_params, expert_params
from peftprof.scenario import load_scenario

# hidden 64, 2 layers, GQA 4/2 heads (v_proj out 32), MLP 160, vocab 500; experts on peft's llama default q_proj, v_proj
ARCH = ('[model]\nmodel_type = "llama"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
        'num_key_value_heads = 2\nintermediate_size = 160\nvocab_size = 500\n')


def scenario(write_scenario, peft: str, precision: str = 'weights = "fp32"', training: str = ""):
    text = (f'{ARCH}[precision]\n{precision}\n[peft]\nmethod = "xlora"\nr = 4\n{peft}\n[training]\nbatch_size = 2\n'
            f'seq_len = 32\n{training}\n[run]\ndevice = "cpu"\nsteps = 1\nwarmup_steps = 1\n')
    (s,) = load_scenario(write_scenario(text))
    return s


def built_model(s):
    from peftprof.run.build import adapt, base_model

    torch.manual_seed(0)
    return adapt(base_model(s, "cpu"), s)


def test_parameter_counts_by_hand_against_peft(write_scenario):
    """Experts: per layer q 4 x (64 + 64) = 512 and v 4 x (64 + 32) = 384, 2 layers, K = 2: 3,584 frozen values.
    Classifier, depth 1: Linear(64 -> K) with bias, 65 x 2 = 130 trainable. Everything else frozen is the base:
    embeddings 32,000 + lm_head 32,000 + 2 x (q 4,096 + k 2,048 + v 2,048 + o 4,096 + MLP 30,720 + norms 128)
    + final norm 64 = 150,336. The 153,920 "frozen LoRA values" once seen were base + experts: peft names every
    parameter base_model.lora_model.model...., so a filter on "lora" in the name counts the whole model."""
    s = scenario(write_scenario, "num_adapters = 2")
    model = built_model(s)
    named = dict(model.named_parameters())
    experts = {n: p for n, p in named.items() if ".lora_A." in n or ".lora_B." in n}
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    assert sum(p.numel() for p in experts.values()) == 3584 == expert_params(s)
    assert not any(p.requires_grad for p in experts.values())
    assert {re.search(r"\.lora_[AB]\.(\w+)\.", n)[1] for n in experts} == {"0", "1"}  # names: run/xlora.py
    assert all(p.abs().sum() > 0 for p in experts.values())  # random A and B: every expert changes the output
    assert all("internal_xlora_classifier" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 130 == classifier_params(64, 2, 4, 1, 2048, False)
    frozen = sum(p.numel() for p in named.values() if not p.requires_grad)
    assert frozen == 150_336 + 3584
    assert sum(p.numel() for n, p in named.items() if "lora" in n and not p.requires_grad) == frozen


@pytest.mark.parametrize(("peft", "hand"), [
    # depth 2, width 16, per-layer gates: Linear(64 -> 16) 1,040 + Linear(16 -> 3 x 4 adapted linears) 17 x 12 = 204
    ("num_adapters = 3\nxlora_depth = 2\nxlora_size = 16\nlayerwise_scalings = true", 1040 + 204),
    # depth 3, width 16: 1,040 + Linear(16 -> 16) 272 + Linear(16 -> 3) 51
    ("num_adapters = 3\nxlora_depth = 3\nxlora_size = 16", 1040 + 272 + 51),
])
def test_classifier_counts_by_hand(write_scenario, peft, hand):
    s = scenario(write_scenario, peft)
    model = built_model(s)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == hand
    m = s.peft
    assert classifier_params(64, m.num_adapters, 4, m.xlora_depth, m.xlora_size, m.layerwise_scalings) == hand


def test_opt_classifier_reads_the_projected_hidden_state(write_scenario):
    """OPT projects its last hidden state from hidden_size 64 down to word_embed_proj_dim 32 (project_out), and
    X-LoRA's classifier reads that state: Linear(32 -> 16) 33 x 16 = 528 + Linear(16 -> 2) 34 = 562 trainable; a
    step trains it (with hidden_size 64 peft's classifier fails on the shape)."""
    from peftprof.run.step import model_inputs, synthetic_batch

    text = ('[model]\nmodel_type = "opt"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
            'ffn_dim = 128\nvocab_size = 500\nword_embed_proj_dim = 32\n[precision]\nweights = "fp32"\n[peft]\n'
            'method = "xlora"\nnum_adapters = 2\nr = 4\nxlora_depth = 2\nxlora_size = 16\n[training]\n'
            'batch_size = 2\nseq_len = 16\n')
    (s,) = load_scenario(write_scenario(text))
    model = built_model(s)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 562
    ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(0))
    model(**model_inputs(ids)).loss.backward()
    assert all(p.grad is not None for p in trainable)


@pytest.mark.parametrize(("peft", "precision"), [
    ("num_adapters = 2", 'weights = "fp32"'),
    ("num_adapters = 3\nxlora_depth = 2\nxlora_size = 16\nlayerwise_scalings = true", 'weights = "fp32"'),
    ("num_adapters = 2\nlayerwise_scalings = true\ndropout = 0.1", 'weights = "bf16"'),
])
def test_trace_equals_the_runner(write_scenario, peft, precision):
    """The trace builds X-LoRA on the meta device from the same expert directories (configs, no tensors) and runs
    both of its passes on fake tensors: its peak and every category equal the CPU runner's to the byte."""
    from peftprof.run.runner import run_variant
    from peftprof.trace import trace_peak

    s = scenario(write_scenario, peft, precision)
    rec = run_variant(s, device="cpu")
    assert rec["status"] == "ok", rec.get("error")
    traced, measured = trace_peak(s), rec["measured"]
    assert traced["peak_bytes"] == measured["peak_bytes"]
    assert traced["breakdown"] == measured["breakdown"]
    assert measured["breakdown"]["trainable"] > 0 and measured["breakdown"]["gradients"] == 0  # set to None


def test_analytic_and_trace_answer_and_autocast_goes_to_the_trace(write_scenario):
    """estimate/xlora.py answers for llama without autocast (its accuracy: tests/test_xlora_analytic.py); the trace
    counts the scaling pass's FLOPs like the analytic (a consistency check: both call estimate/flops.py)."""
    from peftprof.trace import trace_estimate

    s = scenario(write_scenario, "num_adapters = 2")
    analytic = estimate(s, device="cpu")
    assert analytic["n_trainable_params"] == 130
    out = trace_estimate(s, device="cpu")
    assert out["method"] == "trace" and out["n_trainable_params"] == 130 and "note" not in out
    assert out["flops_per_step"] == analytic["flops_per_step"]
    amp = scenario(write_scenario, "num_adapters = 2", precision='weights = "fp32"\nautocast = "bf16"')
    with pytest.raises(AnalyticUnsupported, match="X-LoRA"):
        estimate(amp, device="cpu")


def test_loader_refuses_every_bad_combination_at_once(write_scenario):
    text = (f'{ARCH}[precision]\nweights = "nf4"\n[peft]\nmethod = "xlora"\nnum_adapters = 1\nuse_dora = true\n'
            'num_virtual_tokens = 8\n[training]\ngradient_checkpointing = "full"\noptimizer = "paged_adamw"\n')
    with pytest.raises(UserError) as e:
        load_scenario(write_scenario(text))
    lines = e.value.lines()
    for key, words in (("num_adapters", "X-LoRA gates K LoRA experts; there is 1"),
                       ("use_dora", "does not apply to method xlora (applies to: lora)"),
                       ("weights", "nf4 weights fails in peft"),
                       ("gradient_checkpointing", "recomputation"), ("optimizer", "pages on CUDA"),
                       ("num_virtual_tokens", "does not apply to method xlora")):
        assert any(key in line and words in line for line in lines), (key, lines)
    assert all("\n" not in line for line in lines)


def test_fp16_weights_under_fp16_autocast_are_refused(write_scenario):
    """The classifier is built in the model's dtype: fp16 gradients, which GradScaler refuses to unscale."""
    with pytest.raises(UserError) as e:
        scenario(write_scenario, "num_adapters = 2", precision='weights = "fp16"\nautocast = "fp16"')
    assert len(e.value.lines()) == 1 and "[precision] autocast" in e.value.lines()[0]
    assert "Attempting to unscale FP16 gradients" in e.value.lines()[0]
    # accepted off the rotary q/k projections (on them mixed halves fail in rotate_half: test_loader_crashes.py)
    scenario(write_scenario, 'num_adapters = 2\ntarget_modules = ["o_proj"]',
             precision='weights = "fp16"\nautocast = "bf16"')


def test_classifier_keys_apply_only_where_peft_reads_them(write_scenario):
    with pytest.raises(UserError, match="xlora_size.*only with xlora_depth > 1"):
        scenario(write_scenario, "num_adapters = 2\nxlora_size = 64")
    with pytest.raises(UserError, match="xlora_depth.*does not apply to method lora"):
        load_scenario(write_scenario(f'{ARCH}[peft]\nmethod = "lora"\nxlora_depth = 2\n'))


def test_what_the_loader_refuses_fails_in_peft(write_scenario):
    """The measured failures behind two refusals (bypassing the loader): bitsandbytes LoRA layers receive X-LoRA's
    gates as an argument they do not take, and checkpointing recomputes the layers without the gates. If a peft
    release fixes either, this test fails: lift the refusal in rules_peft.py then."""
    from peftprof.run.build import build
    from peftprof.run.step import model_inputs, synthetic_batch

    s = scenario(write_scenario, "num_adapters = 2")
    ids = synthetic_batch(s, "cpu", torch.Generator().manual_seed(0))
    nf4 = replace(s, precision=replace(s.precision, weights="nf4", compute_dtype="fp32"))
    model = build(nf4, "cpu").model
    model.train()
    with pytest.raises(TypeError, match="scalings"):
        model(**model_inputs(ids))
    ckpt = replace(s, training=replace(s.training, gradient_checkpointing="full"))
    model = build(ckpt, "cpu").model
    model.train()
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        model(**model_inputs(ids)).loss.backward()


def test_scaling_pass_ends_before_the_real_forward(write_scenario, monkeypatch):
    """X-LoRA's first, no-grad pass (peft xlora/model.py _pre_forward) runs the whole model with the labels, so it
    makes logits of its own, but its tensors die before the real forward saves anything: its highest moment stays
    below the step's peak (the start of backward). Traced on fake tensors; the tracked step's events are split at
    the classifier's call, which ends the scaling pass."""
    from conftest import trace_marking_xlora_classifier

    from peftprof.timeline import _replay

    s = scenario(write_scenario, "num_adapters = 3\nxlora_depth = 2\nxlora_size = 64")
    out, tracker, marks = trace_marking_xlora_classifier(monkeypatch, s)
    totals, peak_i, phases = _replay(tracker)
    start = phases.index("forward")
    (mark,) = marks  # one scaling pass in the tracked step
    scaling_pass = [a for a in tracker.allocs.values() if start <= a.index < mark]
    # its own logits, batch x seq x vocab (lm_head's output, made as tokens x vocab)
    assert any(str(a.where).endswith("lm_head") and math.prod(a.shape) == 2 * 32 * 500 for a in scaling_pass)
    assert max(totals[start:mark]) < totals[peak_i]
    assert out["peak_phase"] == "backward"


def test_expert_directories_of_dead_processes_are_removed(tmp_path):
    """A run SIGKILLed while peft builds X-LoRA leaves its expert directories; the next build removes them."""
    import subprocess
    import sys

    from peftprof.run.xlora import PREFIX, remove_stale_directories

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / f"{PREFIX}{dead}-abc" / "0").mkdir(parents=True)
    (tmp_path / f"{PREFIX}{os.getpid()}-live").mkdir()  # this process: alive
    (tmp_path / "other").mkdir()
    assert remove_stale_directories(str(tmp_path)) == [str(tmp_path / f"{PREFIX}{dead}-abc")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{PREFIX}{os.getpid()}-live", "other"])
