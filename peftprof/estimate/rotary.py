"""Saved tensors of the llama family's descendants (transformers 5 modeling_<family>.py): the decoder layer of
llama, mistral, qwen2/3, gemma 1-3, phi3 and the MoE families (estimate/moe.py for the sparse block), the gemma
norms, and the masks of sliding-window attention. activations.py drives it; bytes throughout."""

from __future__ import annotations

from ..settings import Scenario
from . import autocast as amp
from .moe import moe_block_saves
from .widths import FP32, activation_bytes_per_element

GEMMA_NORMS = ("gemma", "gemma2", "gemma3_text")  # RMSNorm computing (x * (1 + w)) in fp32


def normed_bytes(s: Scenario) -> int:
    """Bytes per element of the normalized tensor a trained norm weight's mul saves: gemma norms multiply in fp32
    and cast after ((x * (1 + w.float())).type_as(x), modeling_gemma.py); llama's weight * x.to(input_dtype)
    works in the stream dtype (modeling_llama.py)."""
    return FP32 if s.model.arch.model_type in GEMMA_NORMS else amp.stream_bytes(s)


def rotary_layer_saves(s, saved: dict[str, int], norm, linear, attention, lin_out: int, T: int,
                        device: str) -> None:
    """The llama family and its descendants (decoder layer of modeling_llama.py and the files that copy it):
    fused qkv_proj / gate_up_proj (phi3: slices of one output, views of it), q_norm/k_norm over head_dim before
    rotary (qwen3, gemma3: RMSNorm saving its fp32 input and rsqrt per head), four norms per layer (gemma2/3:
    post_attention_layernorm on o_proj's output, pre/post_feedforward_layernorm around the MLP), and the sparse
    MoE block in place of the MLP (estimate/moe.py)."""
    a = s.model.arch
    norm("input_layernorm")
    if a.model_type == "phi3":
        linear("qkv_proj", "x1", "qkv")
    else:
        for n in ("q_proj", "k_proj", "v_proj"):
            linear(n, "x1", n)
    if a.qk_norm:
        norm("self_attn.q_norm", a.n_heads * a.head_dim, T * a.n_heads, a.head_dim)
        norm("self_attn.k_norm", a.n_kv_heads * a.head_dim, T * a.n_kv_heads, a.head_dim)
    # repeat_kv copies k and v to every head for eager attention and for prefix tuning's explicit mask path
    attention(a.n_kv_heads != a.n_heads and (s.peft.method == "prefix_tuning" or s.training.attention == "eager"))
    linear("o_proj", "o_in", "o_out")
    if a.n_norms_per_layer == 4:
        norm("attn_post_norm")  # gemma2/3 post_attention_layernorm: on o_proj's output, before the residual add
        norm("pre_feedforward_layernorm")
    else:
        norm("post_attention_layernorm")
    i = a.intermediate_size
    if a.n_experts:
        saved.update(moe_block_saves(s, linear, lin_out, T, device))
    elif a.model_type == "phi3":
        linear("gate_up_proj", "x2", "gate_up")
        # gate, up = gate_up.chunk(2): act(gate) and the product save views of the one fused output
        saved["gate"] = lin_out * T * 2 * i
        saved["act_out"] = lin_out * T * i
        linear("down_proj", "mlp_mid", "down")
    else:
        linear("gate_proj", "x2", "gate")
        linear("up_proj", "x2", "up")
        saved["gate"] = lin_out * T * i  # activation saves its input
        saved["act_out"] = lin_out * T * i  # act(gate) * up saves both factors
        saved["up"] = lin_out * T * i
        linear("down_proj", "mlp_mid", "down")
    if a.n_norms_per_layer == 4:
        norm("post_feedforward_layernorm")


def window_active(s: Scenario, T: int) -> bool:
    """Sliding-window layers see more than their window (T tokens per micro-batch): masks are made."""
    a = s.model.arch
    return bool(a.sliding_window) and T // s.training.batch_size > a.sliding_window


def sliding_layer_ids(a) -> tuple[int, ...]:
    """Indices of the sliding-window layers: the family's pattern (gemma2/3) or the last n_sliding_layers
    (qwen2/3 use_sliding_window: layers >= max_window_layers; mistral, phi3, mixtral: all)."""
    return a.sliding_ids or tuple(range(a.n_layers - a.n_sliding_layers, a.n_layers))


def sliding_window_mask_bytes(s: Scenario, T: int) -> int:
    """Sliding-window attention over sequences longer than the window: transformers builds an explicit
    b x 1 x s x s mask for those layers (masking_utils.py sliding_window_causal_mask_function; no is_causal
    shortcut once s > window). SDPA converts the boolean mask to a float one in the query dtype in each call
    and saves it (convert_boolean_attn_mask), per non-checkpointed sliding layer; checkpointed layers keep the
    boolean mask (1 byte, one tensor for all) as an input, and eager attention its additive float mask (one
    beside the causal one counted in model_activation_bytes). Prefix tuning is left aside. Measured on CPU."""
    a = s.model.arch
    b = s.training.batch_size
    s_q = T // b
    if not window_active(s, T) or s.peft.method == "prefix_tuning":
        return 0
    k = s.training.checkpoint_every
    ids = sliding_layer_ids(a)
    plain = [i for i in ids if not (k and i % k == 0)]

    total = 0
    if s.training.attention == "sdpa":
        total += len(plain) * activation_bytes_per_element(s) * b * s_q * s_q
    if k and len(plain) < len(ids):
        total += (1 if s.training.attention == "sdpa" else activation_bytes_per_element(s)) * b * s_q * s_q

    return total
