"""gemma: Gemma 1 (transformers/models/gemma/modeling_gemma.py): RMSNorm computing x * (1 + w), embeddings
scaled by sqrt(hidden) (a bf16/fp32 scalar times the embedding output), GELU-tanh MLP (GemmaConfig maps a
published hidden_act "gelu" to it), tied embeddings, head_dim 256 by default (configuration_gemma.py),
vocabulary 256k."""

from .base import LLAMA_LIKE, LLAMA_REQUIRED, Family, attention_linears, gated_mlp_linears, heads, keys_without, rotary_arch

KEYS = keys_without(LLAMA_LIKE, "mlp_bias", head_dim=("int?", 256), max_position_embeddings=("int", 8192),
                    tie_word_embeddings=("bool", True), hidden_act=("str", "gelu_pytorch_tanh"))


def build(cfg: dict):
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    bias = cfg.get("attention_bias", False)
    linears = attention_linears(h, n_heads, n_kv, head_dim, bias, bias) + gated_mlp_linears(h, cfg["intermediate_size"])
    return rotary_arch(cfg, linears=linears, embed_scale=True)


FAMILY = Family(name="gemma", keys=KEYS, required=LLAMA_REQUIRED, build=build,
                ia3_targets=("q_proj", "v_proj", "down_proj"))
