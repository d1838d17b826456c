"""qwen2_moe: Qwen1.5-MoE / Qwen2-57B-A14B (transformers/models/qwen2_moe/modeling_qwen2_moe.py): Qwen2
attention (q/k/v bias = qkv_bias), a sparse block of `num_experts` experts of `moe_intermediate_size`
(top `num_experts_per_tok`) plus an always-on shared expert (an nn.Linear SwiGLU MLP of
`shared_expert_intermediate_size`) scaled by sigmoid(shared_expert_gate(x)). No peft defaults."""

from .base import (
    LLAMA_LIKE,
    LLAMA_REQUIRED,
    Family,
    LinearSpec,
    attention_linears,
    gated_mlp_linears,
    heads,
    keys_without,
    rotary_arch,
)
from .moe import check_uniform, expert_params
from .qwen2 import window_layers

KEYS = keys_without(LLAMA_LIKE, "attention_bias", "mlp_bias", num_key_value_heads=("int?", 16),  # the config class's default
                    max_position_embeddings=("int", 32768),
                    sliding_window=("int?", 4096), use_sliding_window=("bool", False), max_window_layers=("int", 28),
                    qkv_bias=("bool", True), decoder_sparse_step=("int", 1), moe_intermediate_size=("int", 1408),
                    shared_expert_intermediate_size=("int", 5632), num_experts_per_tok=("int", 4),
                    num_experts=("int", 60), norm_topk_prob=("bool", False), output_router_logits=("bool", False),
                    router_aux_loss_coef=("float", 0.001))


def build(cfg: dict):
    check_uniform(cfg)
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    n_exp, k, inter = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    if k > n_exp:
        raise ValueError(f"num_experts_per_tok {k} exceeds num_experts {n_exp}")
    bias = cfg.get("qkv_bias", True)
    linears = attention_linears(h, n_heads, n_kv, head_dim, bias, False) + gated_mlp_linears(
        h, cfg["shared_expert_intermediate_size"], prefix="mlp.shared_expert") + (
        LinearSpec(path="mlp.shared_expert_gate", in_features=h, out_features=1, bias=False),)
    window, n_sliding = window_layers(cfg)
    return rotary_arch(cfg, linears=linears, layer_params=expert_params(n_exp, h, inter), n_experts=n_exp,
                       experts_per_token=k, moe_intermediate_size=inter, sliding_window=window,
                       shared_intermediate_size=cfg["shared_expert_intermediate_size"],
                       router_logits=bool(cfg.get("output_router_logits")),
                       n_sliding_layers=n_sliding)


FAMILY = Family(name="qwen2_moe", keys=KEYS, required=LLAMA_REQUIRED, build=build, moe=True,
                lora_targets=None, ia3_targets=None, ia3_feedforward=None)
