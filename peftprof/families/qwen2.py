"""qwen2: Qwen2 / Qwen2.5 (transformers/models/qwen2/modeling_qwen2.py): q/k/v carry a bias, o_proj none;
sliding windows only with use_sliding_window, on layers >= max_window_layers (configuration_qwen2.py)."""

from .base import LLAMA_LIKE, LLAMA_REQUIRED, Family, attention_linears, gated_mlp_linears, heads, keys_without, rotary_arch

KEYS = keys_without(LLAMA_LIKE, "attention_bias", "mlp_bias", max_position_embeddings=("int", 32768),
                    sliding_window=("int?", 4096), use_sliding_window=("bool", False), max_window_layers=("int", 28))


def window_layers(cfg: dict) -> tuple[int | None, int]:
    """(window, layers using it): Qwen2Config/Qwen3Config.__post_init__ layer_types."""
    if not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return None, 0
    n = cfg["num_hidden_layers"]
    return cfg["sliding_window"], max(0, n - cfg.get("max_window_layers", 28))


def build(cfg: dict):
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    window, n_sliding = window_layers(cfg)
    linears = attention_linears(h, n_heads, n_kv, head_dim, True, False) + gated_mlp_linears(h, cfg["intermediate_size"])
    return rotary_arch(cfg, linears=linears, sliding_window=window, n_sliding_layers=n_sliding)


FAMILY = Family(name="qwen2", keys=KEYS, required=LLAMA_REQUIRED, build=build,
                ia3_targets=("q_proj", "v_proj", "down_proj"))
