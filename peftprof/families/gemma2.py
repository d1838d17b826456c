"""gemma2: Gemma 2 (transformers/models/gemma2/modeling_gemma2.py): four RMSNorms per layer (input,
post-attention, pre- and post-feed-forward), tanh soft-capping of the attention logits (50) and of the final
logits (30), sliding-window attention (4096) on every other layer (layer_types: sliding when (i+1) % 2),
GELU-tanh MLP, scaled and tied embeddings, vocabulary 256k, head_dim 256 by default."""

from .base import (
    LLAMA_LIKE,
    LLAMA_REQUIRED,
    Family,
    attention_linears,
    gated_mlp_linears,
    heads,
    keys_without,
    rotary_arch,
    sliding_layer_ids,
    sliding_layers,
)

KEYS = keys_without(LLAMA_LIKE, "mlp_bias", "hidden_act", num_key_value_heads=("int?", 4),  # the config class's default
                    head_dim=("int?", 256),
                    max_position_embeddings=("int", 8192), tie_word_embeddings=("bool", True),
                    hidden_activation=("str", "gelu_pytorch_tanh"), query_pre_attn_scalar=("int", 256),
                    sliding_window=("int?", 4096), final_logit_softcapping=("float?", 30.0),
                    attn_logit_softcapping=("float?", 50.0))


def build(cfg: dict):
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    bias = cfg.get("attention_bias", False)
    linears = attention_linears(h, n_heads, n_kv, head_dim, bias, bias) + gated_mlp_linears(h, cfg["intermediate_size"])
    return rotary_arch(cfg, linears=linears, n_norms=4, embed_scale=True, sliding_window=cfg.get("sliding_window"),
                       n_sliding_layers=sliding_layers(cfg, cfg["num_hidden_layers"], 2),
                       sliding_ids=sliding_layer_ids(cfg, cfg["num_hidden_layers"], 2),
                       attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"))


FAMILY = Family(name="gemma2", keys=KEYS, required=LLAMA_REQUIRED, build=build,
                sdpa=False,  # Gemma2ForCausalLM refuses SDPA (soft-capped logits): eager only
                ia3_targets=("q_proj", "v_proj", "down_proj"))
