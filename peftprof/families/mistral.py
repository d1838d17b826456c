"""mistral: Mistral-7B, Mistral-Nemo-12B (transformers/models/mistral/modeling_mistral.py). No biases;
every layer uses `sliding_window` (4096 on Mistral-7B-v0.1, null on Nemo); head_dim may differ from
hidden/heads (Nemo: 128 at hidden 5120 with 32 heads)."""

from .base import LLAMA_LIKE, LLAMA_REQUIRED, Family, attention_linears, gated_mlp_linears, heads, keys_without, rotary_arch

KEYS = keys_without(LLAMA_LIKE, "attention_bias", "mlp_bias", max_position_embeddings=("int", 4096 * 32),
                    sliding_window=("int?", 4096))


def build(cfg: dict):
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    window = cfg.get("sliding_window")
    linears = attention_linears(h, n_heads, n_kv, head_dim, False, False) + gated_mlp_linears(h, cfg["intermediate_size"])
    return rotary_arch(cfg, linears=linears, sliding_window=window,
                       n_sliding_layers=cfg["num_hidden_layers"] if window else 0)


FAMILY = Family(name="mistral", keys=KEYS, required=LLAMA_REQUIRED, build=build)
