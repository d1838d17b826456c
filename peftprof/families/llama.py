"""llama: Llama 2, Llama 3 / 3.1 / 3.2 / 3.3 (transformers/models/llama/modeling_llama.py).

Llama 3.1+ publish `rope_scaling = {rope_type = "llama3", ...}`: it rescales the rotary frequencies and
changes no tensor size, so it is accepted and not passed on (Family.ignored)."""

from .base import LLAMA_LIKE, LLAMA_REQUIRED, Family, attention_linears, gated_mlp_linears, heads, rotary_arch


def build(cfg: dict):
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    bias = cfg.get("attention_bias", False)  # LlamaAttention: q/k/v/o all take config.attention_bias
    linears = attention_linears(h, n_heads, n_kv, head_dim, bias, bias) + gated_mlp_linears(
        h, cfg["intermediate_size"], cfg.get("mlp_bias", False))
    return rotary_arch(cfg, linears=linears)


FAMILY = Family(name="llama", keys=LLAMA_LIKE, required=LLAMA_REQUIRED, build=build)
