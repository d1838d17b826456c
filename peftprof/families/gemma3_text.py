"""gemma3_text: the language model of Gemma 3 (transformers/models/gemma3/modeling_gemma3.py,
Gemma3ForCausalLM): Gemma 2's four norms per layer plus q_norm/k_norm over head_dim (soft-capping replaced by
them: both default to null), sliding-window attention (published 1024) on five layers of six
(layer_types: sliding when (i+1) % sliding_window_pattern), scaled and tied embeddings, vocabulary 262,208.

Published Gemma 3 checkpoints of 4B and more are multimodal: model_type "gemma3" with the language model's
keys under `text_config` (the rest defaulting to Gemma3TextConfig's). `from_hub` takes that part; peftprof
profiles the text model (the vision tower, about 0.42B parameters, is not built)."""

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
    sliding_layer_ids,
    sliding_layers,
)

KEYS = keys_without(LLAMA_LIKE, "mlp_bias", "hidden_act", num_key_value_heads=("int?", 4),  # the config class's default
                    head_dim=("int?", 256),
                    max_position_embeddings=("int", 131_072), tie_word_embeddings=("bool", True),
                    hidden_activation=("str", "gelu_pytorch_tanh"), query_pre_attn_scalar=("int", 256),
                    sliding_window=("int?", 4096), sliding_window_pattern=("int", 6),
                    rope_theta=("float", 1_000_000.0),  # global layers; local ones use rope_local_base_freq 10000
                    final_logit_softcapping=("float?", None), attn_logit_softcapping=("float?", None))
# Gemma3TextConfig's defaults (configuration_gemma3.py), for `text_config`s that leave them out
TEXT_DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}


def build(cfg: dict):
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    bias = cfg.get("attention_bias", False)
    linears = attention_linears(h, n_heads, n_kv, head_dim, bias, bias) + gated_mlp_linears(h, cfg["intermediate_size"])
    return rotary_arch(cfg, linears=linears, n_norms=4, embed_scale=True, layer_params=qk_norm_params(head_dim),
                       qk_norm=True, sliding_window=cfg.get("sliding_window"),
                       n_sliding_layers=sliding_layers(cfg, cfg["num_hidden_layers"], cfg.get("sliding_window_pattern", 6)),
                       sliding_ids=sliding_layer_ids(cfg, cfg["num_hidden_layers"], cfg.get("sliding_window_pattern", 6)),
                       attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"))


def from_hub(config: dict) -> dict:
    """A multimodal "gemma3" config.json -> its language model's keys (model_type gemma3_text)."""
    if config.get("model_type") != "gemma3":
        return config
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ValueError("model_type gemma3 without a text_config object")
    out = {**TEXT_DEFAULTS, **text, "model_type": "gemma3_text"}
    if "tie_word_embeddings" in config and "tie_word_embeddings" not in text:
        out["tie_word_embeddings"] = config["tie_word_embeddings"]
    return out


FAMILY = Family(name="gemma3_text", keys=KEYS, required=LLAMA_REQUIRED, build=build,
                ia3_targets=("q_proj", "v_proj", "down_proj"), from_hub=from_hub)
