"""Model architectures: Hugging Face config fields -> the shapes the estimator and runner need.

Supported families and their config keys. Defaults equal the transformers config classes'
defaults (tests build each family with transformers on the meta device and compare).
No torch import here: the estimator stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass

# key -> (kind, default). kind: "int" (>= 1), "int0" (>= 0), "bool", "float" (> 0), "str", "int?" (int or absent)
_LLAMA_LIKE = {
    "hidden_size": ("int", None),
    "num_hidden_layers": ("int", None),
    "num_attention_heads": ("int", None),
    "num_key_value_heads": ("int", None),  # None -> num_attention_heads
    "head_dim": ("int", None),  # None -> hidden_size // num_attention_heads
    "intermediate_size": ("int", None),
    "vocab_size": ("int", None),
    "max_position_embeddings": ("int", 2048),
    "tie_word_embeddings": ("bool", False),
    "rms_norm_eps": ("float", 1e-6),
    "rope_theta": ("float", 10000.0),
    "attention_bias": ("bool", False),
    "mlp_bias": ("bool", False),
    "hidden_act": ("str", "silu"),
}
FAMILY_KEYS: dict[str, dict[str, tuple[str, object]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": {**{k: v for k, v in _LLAMA_LIKE.items() if k not in ("attention_bias", "mlp_bias")},
                "max_position_embeddings": ("int", 4096 * 32), "sliding_window": ("int?", 4096)},
    "qwen2": {**{k: v for k, v in _LLAMA_LIKE.items() if k not in ("attention_bias", "mlp_bias")},
              "max_position_embeddings": ("int", 32768), "sliding_window": ("int?", 4096)},
    "gemma": {**{k: v for k, v in _LLAMA_LIKE.items() if k not in ("mlp_bias", "hidden_act")},
              "max_position_embeddings": ("int", 8192), "tie_word_embeddings": ("bool", True),
              "hidden_activation": ("str", "gelu_pytorch_tanh")},
    "gpt2": {
        "n_embd": ("int", None),
        "n_layer": ("int", None),
        "n_head": ("int", None),
        "n_inner": ("int?", None),  # None -> 4 * n_embd
        "n_positions": ("int", 1024),
        "vocab_size": ("int", None),
        "tie_word_embeddings": ("bool", True),
        "layer_norm_epsilon": ("float", 1e-5),
        "activation_function": ("str", "gelu_new"),
    },
    "opt": {
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
    },
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_KEYS)
ALL_MODEL_KEYS = sorted({"model_type"} | {k for keys in FAMILY_KEYS.values() for k in keys})


def required_keys(model_type: str) -> list[str]:
    return [k for k, (kind, default) in FAMILY_KEYS[model_type].items() if default is None and kind == "int"
            and k not in ("num_key_value_heads", "head_dim")]


@dataclass(frozen=True, kw_only=True)
class LinearSpec:
    """One linear layer: `path` inside its decoder layer (or the model), `name` its leaf name."""

    path: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def n_weight_params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True, kw_only=True)
class Arch:
    """The tensor shapes of one decoder-only model, derived from its HF config."""

    model_type: str
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tied_embeddings: bool
    embed_dim: int  # word-embedding width (OPT projects it to hidden_size)
    norm: str  # "rms" (weight only) or "layer" (weight + bias)
    gated_mlp: bool  # gate/up/down (llama family) against fc1/fc2
    layer_linears: tuple[LinearSpec, ...]
    model_linears: tuple[LinearSpec, ...]  # linears outside the decoder layers, lm_head excluded
    n_norms_per_layer: int
    final_norm: bool
    n_position_embeddings: int  # learned absolute positions (gpt2, opt); 0 for rotary
    # dropout active in training with the transformers config defaults (not settable here):
    # gpt2 resid/embd/attn_pdrop 0.1; opt dropout 0.1, attention_dropout 0; llama family all 0
    resid_dropout: bool = False
    attn_dropout: bool = False

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Leaf names that peft's target_modules can name (lm_head excluded, as peft's all-linear does)."""
        seen: dict[str, None] = {}
        for spec in self.layer_linears + self.model_linears:
            seen[spec.name] = None
        return tuple(seen)

    @property
    def norm_params(self) -> int:
        per_norm = self.hidden_size * (2 if self.norm == "layer" else 1)
        return per_norm * (self.n_norms_per_layer * self.n_layers + (1 if self.final_norm else 0))

    @property
    def n_params(self) -> int:
        """Total parameters as transformers counts them (tied lm_head counted once)."""
        layer = sum(s.n_weight_params + (s.out_features if s.bias else 0) for s in self.layer_linears)
        model = sum(s.n_weight_params + (s.out_features if s.bias else 0) for s in self.model_linears)
        embed = self.vocab_size * self.embed_dim
        lm_head = 0 if self.tied_embeddings else self.vocab_size * self.embed_dim
        positions = self.n_position_embeddings * self.hidden_size
        return embed + positions + self.n_layers * layer + model + self.norm_params + lm_head


def resolve_keys(model_type: str, given: dict) -> dict:
    """Fill a family's defaults into `given` (already type-checked); returns the full config dict."""
    out = {"model_type": model_type}
    for key, (_kind, default) in FAMILY_KEYS[model_type].items():
        value = given.get(key, default)
        if value is not None:
            out[key] = value
    return out


def build_arch(cfg: dict) -> Arch:
    """Derive shapes from a resolved config (see `resolve_keys`). Raises ValueError if inconsistent."""
    mt = cfg["model_type"]
    if mt == "gpt2":
        h, n_heads = cfg["n_embd"], cfg["n_head"]
        if h % n_heads:
            raise ValueError(f"n_embd {h} is not divisible by n_head {n_heads}")
        inner = cfg.get("n_inner") or 4 * h
        # transformers/models/gpt2/modeling_gpt2.py: Conv1D c_attn (h -> 3h), c_proj, mlp c_fc, c_proj
        linears = (
            LinearSpec(path="attn.c_attn", in_features=h, out_features=3 * h, bias=True),
            LinearSpec(path="attn.c_proj", in_features=h, out_features=h, bias=True),
            LinearSpec(path="mlp.c_fc", in_features=h, out_features=inner, bias=True),
            LinearSpec(path="mlp.c_proj", in_features=inner, out_features=h, bias=True),
        )
        return Arch(model_type=mt, hidden_size=h, n_layers=cfg["n_layer"], n_heads=n_heads, n_kv_heads=n_heads,
                    head_dim=h // n_heads, intermediate_size=inner, vocab_size=cfg["vocab_size"],
                    max_positions=cfg["n_positions"], tied_embeddings=cfg["tie_word_embeddings"], embed_dim=h,
                    norm="layer", gated_mlp=False, layer_linears=linears, model_linears=(), n_norms_per_layer=2,
                    final_norm=True, n_position_embeddings=cfg["n_positions"], resid_dropout=True, attn_dropout=True)
    if mt == "opt":
        h, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if h % n_heads:
            raise ValueError(f"hidden_size {h} is not divisible by num_attention_heads {n_heads}")
        bias, ffn = cfg["enable_bias"], cfg["ffn_dim"]
        embed_dim = cfg.get("word_embed_proj_dim") or h
        # transformers/models/opt/modeling_opt.py: OPTAttention q/k/v/out_proj, fc1, fc2
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
        return Arch(model_type=mt, hidden_size=h, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                    n_kv_heads=n_heads, head_dim=h // n_heads, intermediate_size=ffn, vocab_size=cfg["vocab_size"],
                    max_positions=cfg["max_position_embeddings"], tied_embeddings=cfg["tie_word_embeddings"],
                    embed_dim=embed_dim, norm="layer", gated_mlp=False, layer_linears=linears,
                    model_linears=model_linears, n_norms_per_layer=2, final_norm=cfg["do_layer_norm_before"],
                    n_position_embeddings=cfg["max_position_embeddings"] + 2, resid_dropout=True)
    # llama family: llama, mistral, qwen2, gemma (transformers/models/<type>/modeling_<type>.py)
    h, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads {n_heads} is not divisible by num_key_value_heads {n_kv}")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if h % n_heads:
            raise ValueError(f"hidden_size {h} is not divisible by num_attention_heads {n_heads}")
        head_dim = h // n_heads
    inter = cfg["intermediate_size"]
    qkv_bias = True if mt == "qwen2" else cfg.get("attention_bias", False)
    o_bias = cfg.get("attention_bias", False) if mt in ("llama", "gemma") else False
    mlp_bias = cfg.get("mlp_bias", False)
    linears = (
        LinearSpec(path="self_attn.q_proj", in_features=h, out_features=n_heads * head_dim, bias=qkv_bias),
        LinearSpec(path="self_attn.k_proj", in_features=h, out_features=n_kv * head_dim, bias=qkv_bias),
        LinearSpec(path="self_attn.v_proj", in_features=h, out_features=n_kv * head_dim, bias=qkv_bias),
        LinearSpec(path="self_attn.o_proj", in_features=n_heads * head_dim, out_features=h, bias=o_bias),
        LinearSpec(path="mlp.gate_proj", in_features=h, out_features=inter, bias=mlp_bias),
        LinearSpec(path="mlp.up_proj", in_features=h, out_features=inter, bias=mlp_bias),
        LinearSpec(path="mlp.down_proj", in_features=inter, out_features=h, bias=mlp_bias),
    )
    return Arch(model_type=mt, hidden_size=h, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv,
                head_dim=head_dim, intermediate_size=inter, vocab_size=cfg["vocab_size"],
                max_positions=cfg["max_position_embeddings"], tied_embeddings=cfg["tie_word_embeddings"],
                embed_dim=h, norm="rms", gated_mlp=True, layer_linears=linears, model_linears=(),
                n_norms_per_layer=2, final_norm=True, n_position_embeddings=0)
