"""mixtral: Mixtral-8x7B / 8x22B (transformers/models/mixtral/modeling_mixtral.py): llama attention without
biases, every layer a sparse MoE block of `num_local_experts` SwiGLU experts of `intermediate_size`, top
`num_experts_per_tok` per token with renormalised softmax weights. peft's IA3 defaults for mixtral name
"w2", a module transformers 5 no longer has: give target_modules."""

from .base import LLAMA_LIKE, LLAMA_REQUIRED, Family, attention_linears, heads, keys_without, rotary_arch
from .moe import expert_params

KEYS = keys_without(LLAMA_LIKE, "attention_bias", "mlp_bias", num_key_value_heads=("int?", 8),  # the config class's default
                    max_position_embeddings=("int", 4096 * 32),
                    rms_norm_eps=("float", 1e-5), rope_theta=("float", 1e6), sliding_window=("int?", None),
                    num_local_experts=("int", 8), num_experts_per_tok=("int", 2),
                    output_router_logits=("bool", False), router_aux_loss_coef=("float", 0.001))


def build(cfg: dict):
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    n_exp, k, inter = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]
    if k > n_exp:
        raise ValueError(f"num_experts_per_tok {k} exceeds num_local_experts {n_exp}")
    window = cfg.get("sliding_window")
    return rotary_arch(cfg, linears=attention_linears(h, n_heads, n_kv, head_dim, False, False),
                       layer_params=expert_params(n_exp, h, inter), n_experts=n_exp, experts_per_token=k,
                       moe_intermediate_size=inter, sliding_window=window,
                       router_logits=bool(cfg.get("output_router_logits")),
                       n_sliding_layers=cfg["num_hidden_layers"] if window else 0)


FAMILY = Family(name="mixtral", keys=KEYS, required=LLAMA_REQUIRED, build=build, moe=True,
                ia3_targets=None, ia3_feedforward=None)
