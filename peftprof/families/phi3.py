"""phi3: Phi-3 / Phi-3.5-mini / Phi-4 (transformers/models/phi3/modeling_phi3.py): fused projections, one
qkv_proj (hidden -> (heads + 2 kv_heads) x head_dim) and one gate_up_proj (hidden -> 2 x intermediate, split
in two before act(gate) * up), no biases. peft has no default LoRA or IA3 targets for phi3: give
target_modules. Phi3Config's pad_token_id defaults to 32000, which must lie inside the vocabulary
(shared/facts.md). Phi-3.5's longrope `rope_scaling` changes no tensor size (not passed on)."""

from .base import LLAMA_LIKE, LLAMA_REQUIRED, Family, LinearSpec, heads, keys_without, rotary_arch

KEYS = keys_without(LLAMA_LIKE, "attention_bias", "mlp_bias", max_position_embeddings=("int", 4096),
                    original_max_position_embeddings=("int", 4096), rms_norm_eps=("float", 1e-5),
                    sliding_window=("int?", None))
PAD_TOKEN_ID = 32000  # configuration_phi3.py default


def build(cfg: dict):
    h = cfg["hidden_size"]
    if cfg["vocab_size"] <= PAD_TOKEN_ID:
        raise ValueError(f"vocab_size {cfg['vocab_size']} must exceed Phi3Config's pad_token_id {PAD_TOKEN_ID}")
    n_heads, n_kv, head_dim = heads(cfg, h)
    inter = cfg["intermediate_size"]
    linears = (
        LinearSpec(path="self_attn.o_proj", in_features=n_heads * head_dim, out_features=h, bias=False),
        LinearSpec(path="self_attn.qkv_proj", in_features=h, out_features=(n_heads + 2 * n_kv) * head_dim, bias=False),
        LinearSpec(path="mlp.gate_up_proj", in_features=h, out_features=2 * inter, bias=False),
        LinearSpec(path="mlp.down_proj", in_features=inter, out_features=h, bias=False),
    )
    window = cfg.get("sliding_window")
    return rotary_arch(cfg, linears=linears, sliding_window=window,
                       n_sliding_layers=cfg["num_hidden_layers"] if window else 0)


FAMILY = Family(name="phi3", keys=KEYS, required=LLAMA_REQUIRED, build=build,
                lora_targets=None, ia3_targets=None, ia3_feedforward=None)
