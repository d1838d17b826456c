"""Plain LoRA on a llama-family decoder layer (separate q/k/v and gate/up/down, two RMSNorms, no experts, no
autocast): the terms activations.py adds for it, each traced on CPU against the runner (tests/test_lora_activations.py):
what layer 0 does not save before its first adapted group, the moment a checkpointed layer's forward reruns inside
backward, and the final RMSNorm's fp32 backward on a half-precision stream. Bytes throughout.
"""

from __future__ import annotations

from ..settings import BYTES_PER_ELEMENT, Scenario
from . import activations as act  # (activations.py imports this module: names are read at call time)
from . import autocast as amp
from .rotary import GEMMA_NORMS
from .widths import FP32


def first_layer_unsaved_bytes(s: Scenario, saves: dict[str, int]) -> int:
    """Plain LoRA on a llama-family layer with no adapter on q/k/v: layer 0's attention input needs no gradient
    (frozen embeddings), so autograd records nothing up to the first group of linears holding an adapter
    (LAYER_LINEAR_GROUPS; derivatives.yaml: an op saves a tensor only for an input that needs a gradient):
    attention, then the post-attention norm, then the MLP's gate/up products save nothing, nor does LoRA
    dropout on that group's input save its mask. mul(act(gate), up) saves up only when gate is adapted,
    act(gate) only when up is, and silu its input only when gate is. Traced on CPU."""
    m, a = s.peft, s.model.arch
    names = {spec.path.rsplit(".", 1)[-1]: spec for spec in a.layer_linears}
    if (m.method != "lora" or m.use_dora or amp.enabled(s) or a.n_experts or s.precision.weights in ("int8", "int4")
            or a.n_norms_per_layer != 2 or not {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"} <= names.keys()):
        return 0
    hit = {n: act._targeted(s, spec) for n, spec in names.items()}
    if hit["q_proj"] or hit["k_proj"] or hit["v_proj"]:
        return 0

    def masks(*group: str) -> int:
        return sum(saves.get(f"{names[n].path}.dropout_mask", 0) for n in group)

    o = names["o_proj"].path
    lora_keeps_attn_out = hit["o_proj"] and not any(k in saves for k in ("o_in", f"{o}.x_fp32", f"{o}.dropout_out"))
    total = sum(v for key, v in saves.items() if key in act.ATTENTION_SAVES and not (
        key == "attn_out" and lora_keeps_attn_out))  # (fp32, no dropout: lora_A saves attn_out's view itself)
    if hit["o_proj"]:
        return total + masks("o_proj")
    total += saves.get("o_in", 0) + sum(v for key, v in saves.items() if key.startswith("post_attention_layernorm."))
    if hit["gate_proj"] or hit["up_proj"]:
        return total + masks("gate_proj", "up_proj") + (0 if hit["gate_proj"] else saves.get("gate", 0) + saves.get(
            "up", 0)) + (0 if hit["up_proj"] else saves.get("act_out", 0))
    return total + masks("down_proj") + sum(saves.get(k, 0) for k in ("gate", "act_out", "up"))


def rms_input_is_checkpoint_bytes(s: Scenario, device: str = "cpu") -> int:
    """An fp32 stream's first RMSNorm saves the layer's input itself (modeling_llama.py LlamaRMSNorm:
    `hidden_states.to(torch.float32)` is then a no-op), which a checkpointed layer already keeps. Traced."""
    if s.model.arch.norm != "rms" or amp.stream_bytes(s) != FP32:
        return 0
    return act.layer_saves(s, device).get("input_layernorm.in_fp32", 0)


def final_rms_backward_bytes(s: Scenario) -> int:
    """Temporaries of the final RMSNorm's backward on a half-precision stream, plain LoRA on a llama-family
    model without autocast (traced: 5 fp32 b*s*hidden); 0 elsewhere (other moments decide there)."""
    a = s.model.arch
    if (a.norm != "rms" or not a.final_norm or amp.enabled(s) or amp.stream_bytes(s) == FP32 or a.n_experts
            or a.model_type in GEMMA_NORMS or s.peft.method != "lora" or s.peft.use_dora):
        return 0
    return 5 * FP32 * act.tokens_per_micro_batch(s) * a.hidden_size


def recompute_forward_peak_bytes(s: Scenario, device: str = "cpu") -> int:
    """Temporaries at the largest moment of a checkpointed llama-family layer's recomputation (non-reentrant
    torch.utils.checkpoint: run when backward first unpacks a saved tensor of the layer, stopped once its last
    saved tensor exists). Its MLP (modeling_llama.py LlamaMLP: down(act(gate(x)) * up(x))) recomputes after
    everything the layer saved before it, beside the layer's locals (the post-attention residual sum and the
    norm's output x) and the gradients waiting to come down: the residual stream's and, for LoRA on down_proj
    (peft lora/layer.py `result + lora_B(lora_A(x)) * scaling`, cast back), the base branch's cast and the scaled
    fp32 branch's. Moments: up_proj's forward (LoRA: base output, scaled fp32 output and their fp32 sum;
    act(gate) already made), the gate*up product, and down_proj's forward (LoRA: its base output; recomputation
    stops as lora_B saves lora_A's output, before lora_B's output exists). 0 outside plain LoRA on a gated
    llama-family MLP without autocast or LoRA dropout. Traced on CPU."""
    a, m = s.model.arch, s.peft
    names = {spec.path.rsplit(".", 1)[-1]: spec for spec in a.layer_linears}
    if (m.method != "lora" or m.use_dora or amp.enabled(s) or a.n_experts or a.model_type in ("gpt2", "opt")
            or not {"gate_proj", "up_proj", "down_proj"} <= names.keys() or a.n_norms_per_layer != 2
            or m.dropout > 0):  # (LoRA dropout's masks and outputs: not modelled here yet)
        return 0
    T = act.tokens_per_micro_batch(s)
    saves = act.layer_saves(s, device)
    out, f32 = amp.linear_output_bytes(s), FP32
    h, i = T * a.hidden_size, T * a.intermediate_size
    up, down = names["up_proj"], names["down_proj"]
    down_keys = {k for k in saves if k.startswith(down.path + ".") or k == "mlp_mid"}
    waiting = amp.stream_bytes(s) * h
    if act._targeted(s, down):
        waiting += f32 * h + (out * h if out != f32 else 0)
    locals_ = amp.stream_bytes(s) * h + (0 if "x2" in saves else BYTES_PER_ELEMENT[amp.norm_output_dtype(s, device)] * h)
    before_down = sum(v for k, v in saves.items() if k not in down_keys)
    up_fwd = before_down - saves.get("up", 0) + (out * i + 2 * f32 * i if act._targeted(s, up) else out * i)
    product = before_down + (out * i if "mlp_mid" not in saves else 0)
    down_fwd = sum(saves.values()) + (out * i if "mlp_mid" not in saves else 0) \
        + (out * h if act._targeted(s, down) else 0)
    return max(up_fwd, product, down_fwd) + locals_ + waiting - rms_input_is_checkpoint_bytes(s, device)
