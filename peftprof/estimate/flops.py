"""Training FLOPs per step and predicted speed."""

from __future__ import annotations

from ..settings import Scenario
from .activations import tokens_per_micro_batch
from .memory import trainable_tensors
from .xlora import expert_flops_per_token

DEFAULT_MFU = 0.35  # assumed model-FLOPs utilisation of PEFT steps (not yet measured on a GPU); --mfu overrides


def matmul_flops_per_token(s: Scenario) -> tuple[int, int]:
    """(frozen, trainable) forward matmul FLOPs per token: 2 per weight (Kaplan et al. 2020, C_fwd = 2N),
    lm_head included; LoRA adds 2*r*(in+out) per targeted module."""
    a = s.model.arch
    layer = (sum(spec.n_weight_params for spec in a.layer_linears) + moe_active_params_per_layer(s)) * a.n_layers
    base = 2 * (layer + sum(spec.n_weight_params for spec in a.model_linears) + a.vocab_size * a.embed_dim)
    if s.peft.method == "full":
        return 0, base
    adapter = 2 * sum(trainable_tensors(s)) if s.peft.method == "lora" else 0
    if s.peft.method == "xlora":  # frozen experts (input gradients only), trained classifier (estimate/xlora.py)
        base, adapter = base + expert_flops_per_token(s), 2 * sum(trainable_tensors(s))
    return base, adapter


def moe_active_params_per_layer(s: Scenario) -> int:
    """Weights one token multiplies in a MoE layer besides its linears: the router (experts x hidden) and top-k of
    the experts' stacks (Fedus et al. 2021, Switch Transformer: FLOPs follow active, not total, parameters; the
    grouped matmuls of transformers' integrations/moe.py run exactly the T*k token-expert pairs). 0 for dense."""
    a = s.model.arch
    if not a.n_experts:
        return 0
    router = sum(p.numel for p in a.layer_params if p.path.endswith("gate.weight"))
    return router + a.expert_params_per_layer * a.experts_per_token // a.n_experts


def attention_flops_per_token(s: Scenario) -> int:
    """QK^T and PV: 2 * 2 * s_kv * n_heads * head_dim per layer per token (Narayanan et al. 2021, eq. 2),
    counted for the full square as the kernels compute it without causal skipping on CPU."""
    a = s.model.arch
    s_kv = tokens_per_micro_batch(s) // s.training.batch_size
    if s.peft.method == "prefix_tuning":
        s_kv += s.peft.num_virtual_tokens
    return 4 * s_kv * a.n_heads * a.head_dim * a.n_layers


def flops_per_step(s: Scenario) -> int:
    """Forward + backward over grad_accum_steps micro-batches. Backward computes input gradients for every
    matmul (= forward) and weight gradients only for trainable weights (frozen weights skip them);
    checkpointed layers run their forward twice (Narayanan et al. 2021: 3x forward, 4x with recompute)."""
    frozen, trainable = matmul_flops_per_token(s)
    attn = attention_flops_per_token(s)
    fwd = frozen + trainable + attn
    bwd = (frozen + trainable) + trainable + 2 * attn  # input grads + trainable weight grads; attention 2x
    a = s.model.arch
    k = s.training.checkpoint_every
    recompute = 0
    if k:
        n_ckpt = len(range(0, a.n_layers, k))
        recompute = (fwd - 2 * a.vocab_size * a.embed_dim) * n_ckpt / a.n_layers
    per_token = fwd + bwd + recompute
    if s.peft.method == "xlora":  # X-LoRA's no-grad scaling pass: the model and its experts once more
        per_token += frozen + attn
    return int(per_token * tokens_per_micro_batch(s) * s.training.grad_accum_steps)
