"""qwen3_moe: Qwen3-30B-A3B / Qwen3-235B-A22B (transformers/models/qwen3_moe/modeling_qwen3_moe.py): Qwen3
attention (q_norm/k_norm over head_dim; head_dim given apart from hidden/heads: 128 at hidden 2048 with 32
heads), every layer a sparse block of `num_experts` experts of `moe_intermediate_size`, top
`num_experts_per_tok`, no shared expert. `intermediate_size` sizes only dense layers (mlp_only_layers),
which peftprof does not model. No peft defaults."""

from .base import LLAMA_LIKE, Family, attention_linears, heads, keys_without, qk_norm_params, rotary_arch
from .moe import check_uniform, expert_params

KEYS = keys_without(LLAMA_LIKE, "mlp_bias", num_key_value_heads=("int?", 4),  # the config class's default
                    intermediate_size=("int", 6144), max_position_embeddings=("int", 32768),
                    sliding_window=("int?", 4096), use_sliding_window=("bool", False),
                    decoder_sparse_step=("int", 1), moe_intermediate_size=("int", 768), num_experts_per_tok=("int", 8),
                    num_experts=("int", 128), norm_topk_prob=("bool", False), output_router_logits=("bool", False),
                    router_aux_loss_coef=("float", 0.001))
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def build(cfg: dict):
    check_uniform(cfg)
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    n_exp, k, inter = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    if k > n_exp:
        raise ValueError(f"num_experts_per_tok {k} exceeds num_experts {n_exp}")
    bias = cfg.get("attention_bias", False)
    # Qwen3MoeAttention: every layer takes config.sliding_window, which the config keeps only with use_sliding_window
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    n_sliding = cfg["num_hidden_layers"] if window else 0
    return rotary_arch(cfg, linears=attention_linears(h, n_heads, n_kv, head_dim, bias, bias),
                       layer_params=qk_norm_params(head_dim) + expert_params(n_exp, h, inter), qk_norm=True,
                       n_experts=n_exp, experts_per_token=k, moe_intermediate_size=inter, sliding_window=window,
                       router_logits=bool(cfg.get("output_router_logits")),
                       n_sliding_layers=n_sliding)


FAMILY = Family(name="qwen3_moe", keys=KEYS, required=REQUIRED, build=build, moe=True,
                lora_targets=None, ia3_targets=None, ia3_feedforward=None)
