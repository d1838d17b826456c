"""qwen3: Qwen3 dense (transformers/models/qwen3/modeling_qwen3.py): RMSNorm on q and k per head (q_norm,
k_norm over head_dim, before rotary), head_dim 128 by default whatever hidden/heads is (Qwen3-8B: hidden
4096, 32 heads, head_dim 128; Qwen3-14B: 5120, 40, 128), all projections biased only with attention_bias."""

from .base import (
    LLAMA_LIKE,
    LLAMA_REQUIRED,
    Family,
    attention_linears,
    gated_mlp_linears,
    heads,
    keys_without,
    qk_norm_params,
    rotary_arch,
)
from .qwen2 import window_layers

KEYS = keys_without(LLAMA_LIKE, "mlp_bias", num_key_value_heads=("int?", 32),  # the config class's default
                    head_dim=("int?", 128), max_position_embeddings=("int", 32768),
                    sliding_window=("int?", 4096), use_sliding_window=("bool", False), max_window_layers=("int", 28))


def build(cfg: dict):
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    bias = cfg.get("attention_bias", False)
    window, n_sliding = window_layers(cfg)
    linears = attention_linears(h, n_heads, n_kv, head_dim, bias, bias) + gated_mlp_linears(h, cfg["intermediate_size"])
    return rotary_arch(cfg, linears=linears, layer_params=qk_norm_params(head_dim), qk_norm=True,
                       sliding_window=window, n_sliding_layers=n_sliding)


FAMILY = Family(name="qwen3", keys=KEYS, required=LLAMA_REQUIRED, build=build,
                ia3_targets=("q_proj", "v_proj", "down_proj"))
