"""gpt2 (transformers/models/gpt2/modeling_gpt2.py): learned positions, pre-LayerNorm, Conv1D c_attn
(hidden -> 3 hidden), c_proj, MLP c_fc / c_proj with GELU (gelu_new), dropout 0.1 everywhere in training."""

from .base import Arch, Family, LinearSpec

KEYS = {
    "n_embd": ("int", None),
    "n_layer": ("int", None),
    "n_head": ("int", None),
    "n_inner": ("int?", None),  # None -> 4 * n_embd
    "n_positions": ("int", 1024),
    "vocab_size": ("int", None),
    "tie_word_embeddings": ("bool", True),
    "layer_norm_epsilon": ("float", 1e-5),
    "activation_function": ("str", "gelu_new"),
}


def build(cfg: dict) -> Arch:
    h, n_heads = cfg["n_embd"], cfg["n_head"]
    if h % n_heads:
        raise ValueError(f"n_embd {h} is not divisible by n_head {n_heads}")
    inner = cfg.get("n_inner") or 4 * h
    linears = (
        LinearSpec(path="attn.c_attn", in_features=h, out_features=3 * h, bias=True),
        LinearSpec(path="attn.c_proj", in_features=h, out_features=h, bias=True),
        LinearSpec(path="mlp.c_fc", in_features=h, out_features=inner, bias=True),
        LinearSpec(path="mlp.c_proj", in_features=inner, out_features=h, bias=True),
    )
    return Arch(model_type="gpt2", hidden_size=h, n_layers=cfg["n_layer"], n_heads=n_heads, n_kv_heads=n_heads,
                head_dim=h // n_heads, intermediate_size=inner, vocab_size=cfg["vocab_size"],
                max_positions=cfg["n_positions"], tied_embeddings=cfg["tie_word_embeddings"], embed_dim=h,
                norm="layer", gated_mlp=False, layer_linears=linears, model_linears=(), n_norms_per_layer=2,
                final_norm=True, n_position_embeddings=cfg["n_positions"], resid_dropout=True, attn_dropout=True,
                hidden_act=cfg.get("activation_function", "gelu_new"))


FAMILY = Family(name="gpt2", keys=KEYS, required=("n_embd", "n_layer", "n_head", "vocab_size"), build=build,
                lora_targets=("c_attn",), ia3_targets=("c_attn", "mlp.c_proj"), ia3_feedforward=("mlp.c_proj",))
