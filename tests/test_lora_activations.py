"""Plain LoRA on tiny llama models: the analytic activation terms (peftprof/estimate/activations.py) against the
fake-tensor trace, which equals the CPU runner to the byte (README, Accuracy). Three fixed errors:
1. checkpointed layers: the recomputed forward's own moment (lora_layer.recompute_forward_peak_bytes) and an fp32 stream's
   first RMSNorm input being the checkpoint itself (was 0.8-5.7% low on bf16/nf4);
2. no adapter on layer 0's q/k/v: its attention (and what follows up to the first adapter) saves nothing
   (lora_layer.first_layer_unsaved_bytes; was up to +9% on fp32, +26% on nf4);
3. the residual stream's gradient beside the MLP's backward (mlp_backward_moments; was ~0.8% low).
Found on the way: the final RMSNorm's fp32 backward (up to 3.9% low with a half stream, hidden by error 2 before)
and bitsandbytes 4-bit's compute-dtype backward of a LoRA'd down_proj (was 1.4-1.9% high)."""

from __future__ import annotations

import pytest

from peftprof.estimate import estimate
from peftprof.scenario import load_scenario
from peftprof.trace import trace_peak

MODEL = ('[model]\nmodel_type = "llama"\nhidden_size = {h}\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
         'num_key_value_heads = 2\nintermediate_size = {i}\nvocab_size = {v}\n')
SMALL = dict(h=64, i=160, v=1000)  # logits-heavy: the layer-0 saves decide
MLP_HEAVY = dict(h=256, i=688, v=100)  # the MLP's (recomputed) moments decide the peak
TARGETS = {"qv": '["q_proj", "v_proj"]', "o": '["o_proj"]', "down": '["down_proj"]', "gate": '["gate_proj"]',
           "up": '["up_proj"]', "mlp": '["gate_proj", "up_proj", "down_proj"]', "all": '"all-linear"'}
# the trace also holds the loss, its gradient and a few small tensors the estimate leaves out (<= 520 B here);
# every error fixed here was >= 0.45% of the peak
TOLERANCE = 0.0003


def scenario(tmp_path, weights, ckpt, targets, size=SMALL, dropout=0.0):
    text = (MODEL.format(**size) + f'[precision]\nweights = "{weights}"\n[peft]\nr = 8\ndropout = {dropout}\n'
            f'target_modules = {TARGETS[targets]}\n[training]\nbatch_size = 2\nseq_len = 32\n'
            f'gradient_checkpointing = "{ckpt}"\n[run]\ndevice = "cpu"\n')
    path = tmp_path / f"{weights}-{ckpt}-{targets}-{size['h']}-{dropout}.toml"
    path.write_text(f'name = "{path.stem}"\n' + text)
    return load_scenario(path)[0]


def relative_gap(s) -> float:
    traced = trace_peak(s)["peak_bytes"]
    return (estimate(s, device="cpu")["peak_bytes"] - traced) / traced


@pytest.mark.parametrize("weights,ckpt,targets", [
    ("bf16", "full", "all"),  # was -4.60%: the recomputed up_proj's LoRA forward
    ("bf16", "full", "down"),  # was -4.73%: the recomputed down_proj's forward
    ("bf16", "full", "mlp"),  # was -5.23%
    ("nf4", "every_2", "qv"),  # was -1.32%
    ("fp32", "every_2", "o"),  # was -0.65%: layer 0's input_layernorm saves the checkpoint itself
])
def test_checkpointed_recompute(tmp_path, weights, ckpt, targets):
    assert abs(relative_gap(scenario(tmp_path, weights, ckpt, targets, MLP_HEAVY))) < TOLERANCE


@pytest.mark.parametrize("weights,targets", [
    ("fp32", "down"),  # was +8.47%
    ("fp32", "o"),  # was +1.47% (lora_A keeps attn_out's view: still saved)
    ("bf16", "mlp"),  # was +2.32%
    ("nf4", "gate"),  # mul(act(gate), up) saves up only
    ("bf16", "up"),  # ... and act(gate) only
])
def test_first_layer_without_qkv_adapters(tmp_path, weights, targets):
    assert abs(relative_gap(scenario(tmp_path, weights, "none", targets))) < TOLERANCE


def test_first_layer_lora_dropout_mask_unsaved(tmp_path):
    # LoRA dropout on a no-grad input saves no mask (the first adapted group: o_proj here)
    assert abs(relative_gap(scenario(tmp_path, "bf16", "none", "o", dropout=0.1))) < TOLERANCE


def test_residual_gradient_beside_mlp_backward(tmp_path):
    # the checkpointed layer's gated-product backward, plus the residual stream's gradient: was -0.79%
    assert abs(relative_gap(scenario(tmp_path, "bf16", "full", "qv", MLP_HEAVY))) < TOLERANCE


@pytest.mark.parametrize("weights,ckpt,targets", [
    ("bf16", "none", "all"),  # was -3.92%: the final RMSNorm's backward in fp32
    ("bf16", "every_2", "qv"),  # was -2.37%
])
def test_final_norm_backward(tmp_path, weights, ckpt, targets):
    assert abs(relative_gap(scenario(tmp_path, weights, ckpt, targets, MLP_HEAVY))) < TOLERANCE


@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_nf4_down_proj_backward_in_compute_dtype(tmp_path, ckpt):
    # fp32 activations (prepare_model_for_kbit_training), bf16 compute: was +1.88% (full), +25.8% (none, with error 2)
    assert abs(relative_gap(scenario(tmp_path, "nf4", ckpt, "down", MLP_HEAVY))) < TOLERANCE
