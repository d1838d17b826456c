"""opt (transformers/models/opt/modeling_opt.py): learned positions with an offset of 2 rows, q/k/v/out_proj,
fc1/fc2 with ReLU, optional projection of narrower word embeddings (word_embed_proj_dim), pre- or post-LN
(do_layer_norm_before; no final norm when post-LN), dropout 0.1."""

from .base import Arch, Family, LinearSpec

KEYS = {
    "hidden_size": ("int", None),
    "num_hidden_layers": ("int", None),
    "num_attention_heads": ("int", None),
    "ffn_dim": ("int", None),
    "vocab_size": ("int", None),
    "max_position_embeddings": ("int", 2048),
    "word_embed_proj_dim": ("int?", None),  # None -> hidden_size
    "do_layer_norm_before": ("bool", True),
    "enable_bias": ("bool", True),
    "tie_word_embeddings": ("bool", True),
    "activation_function": ("str", "relu"),
}


def build(cfg: dict) -> Arch:
    h, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if h % n_heads:
        raise ValueError(f"hidden_size {h} is not divisible by num_attention_heads {n_heads}")
    bias, ffn = cfg["enable_bias"], cfg["ffn_dim"]
    embed_dim = cfg.get("word_embed_proj_dim") or h
    linears = tuple(LinearSpec(path=f"self_attn.{n}", in_features=h, out_features=h, bias=bias)
                    for n in ("k_proj", "v_proj", "q_proj", "out_proj")) + (
        LinearSpec(path="fc1", in_features=h, out_features=ffn, bias=bias),
        LinearSpec(path="fc2", in_features=ffn, out_features=h, bias=bias),
    )
    model_linears: tuple[LinearSpec, ...] = ()
    if embed_dim != h:  # OPTDecoder.project_in / project_out, no bias
        model_linears = (LinearSpec(path="decoder.project_out", in_features=h, out_features=embed_dim, bias=False),
                         LinearSpec(path="decoder.project_in", in_features=embed_dim, out_features=h, bias=False))
    # OPTLearnedPositionalEmbedding keeps 2 extra rows (offset 2)
    return Arch(model_type="opt", hidden_size=h, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=n_heads, head_dim=h // n_heads, intermediate_size=ffn, vocab_size=cfg["vocab_size"],
                max_positions=cfg["max_position_embeddings"], tied_embeddings=cfg["tie_word_embeddings"],
                embed_dim=embed_dim, norm="layer", gated_mlp=False, layer_linears=linears,
                model_linears=model_linears, n_norms_per_layer=2, final_norm=cfg["do_layer_norm_before"],
                n_position_embeddings=cfg["max_position_embeddings"] + 2, resid_dropout=True,
                hidden_act=cfg.get("activation_function", "relu"))


FAMILY = Family(name="opt", keys=KEYS, required=("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                                                 "vocab_size"), build=build,
                ia3_targets=("q_proj", "k_proj", "fc2"), ia3_feedforward=("fc2",))
