"""What a model family is: its config keys and defaults, its linears and other parameters, its peft defaults.

A family turns a resolved Hugging Face config (a dict) into an `Arch`: the tensor shapes the estimator and
the runner need. No torch import here: the estimator stays instant. Each family's module cites the
transformers file it follows (transformers/models/<type>/modeling_<type>.py and configuration_<type>.py);
tests/test_families.py builds every family with transformers on the meta device and compares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Config key kinds: "int" (>= 1), "int?" (int or null), "bool", "float" (> 0), "float?" (> 0 or null), "str".
KeyTable = dict[str, tuple[str, object]]


@dataclass(frozen=True, kw_only=True)
class LinearSpec:
    """One nn.Linear / Conv1D: `path` inside its decoder layer (or the model), `name` its leaf name."""

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
class ParamSpec:
    """A parameter of a decoder layer that is neither a linear's nor a hidden-size norm's: q/k norms on the head
    dimension, a router's weight, a stack of expert weights (transformers 5 keeps experts as 3-D nn.Parameters,
    not nn.Linear modules: peft's all-linear and bitsandbytes' replacement do not reach them)."""

    path: str
    shape: tuple[int, ...]
    expert: bool = False  # one slice per expert along dim 0 (only top-k of them run per token)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


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
    # details that move memory in newer families (each family module says where it reads them)
    layer_params: tuple[ParamSpec, ...] = ()  # per decoder layer, besides linears and hidden-size norms
    hidden_act: str = "silu"
    qk_norm: bool = False  # RMSNorm on q and k per head (qwen3, gemma3)
    sliding_window: int | None = None  # local attention span of the sliding layers
    n_sliding_layers: int = 0  # decoder layers with sliding-window attention
    sliding_ids: tuple[int, ...] = ()  # their indices, where not simply the last n_sliding_layers (gemma2/3)
    attn_softcap: float | None = None  # tanh soft-capping of attention logits (gemma2)
    final_softcap: float | None = None  # tanh soft-capping of the output logits (gemma2)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) (gemma family)
    n_experts: int = 0  # mixture of experts: experts per MoE layer (0: dense)
    experts_per_token: int = 0  # top-k
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0  # qwen2_moe's always-on shared expert
    router_logits: bool = False  # output_router_logits: router logits kept and the load-balancing loss added

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
    def layer_param_count(self) -> int:
        """Parameters of one decoder layer: linears (with biases), hidden-size norms and `layer_params`."""
        linears = sum(s.n_weight_params + (s.out_features if s.bias else 0) for s in self.layer_linears)
        norms = self.hidden_size * (2 if self.norm == "layer" else 1) * self.n_norms_per_layer
        return linears + norms + sum(p.numel for p in self.layer_params)

    @property
    def n_params(self) -> int:
        """Total parameters as transformers counts them (tied lm_head counted once)."""
        model = sum(s.n_weight_params + (s.out_features if s.bias else 0) for s in self.model_linears)
        embed = self.vocab_size * self.embed_dim
        lm_head = 0 if self.tied_embeddings else self.vocab_size * self.embed_dim
        positions = self.n_position_embeddings * self.hidden_size
        final = self.hidden_size * (2 if self.norm == "layer" else 1) * (1 if self.final_norm else 0)
        return embed + positions + self.n_layers * self.layer_param_count + model + final + lm_head

    @property
    def expert_params_per_layer(self) -> int:
        return sum(p.numel for p in self.layer_params if p.expert)

    @property
    def n_active_params(self) -> int:
        """Parameters one token runs through: all of a dense model; for MoE, top-k of the experts."""
        if not self.n_experts:
            return self.n_params
        idle = self.expert_params_per_layer * (self.n_experts - self.experts_per_token) // self.n_experts
        return self.n_params - self.n_layers * idle


@dataclass(frozen=True, kw_only=True)
class Family:
    """One registry entry. `keys`: config key -> (kind, default), defaults equal to the transformers config
    class's; `required`: keys without a default; `build`: resolved config -> Arch (ValueError if inconsistent).
    `analytic`: whether the analytic estimator models this family's saved tensors (otherwise `estimate`
    falls back to the trace and says so). `sdpa`: whether transformers builds it with SDPA attention.
    `lora_targets` / `ia3_targets` / `ia3_feedforward`: peft's defaults
    (peft/utils/constants.py). `from_hub`: rewrites a published config.json into this family's keys (e.g. the
    text part of a multimodal config). `ignored`: published config keys that change no tensor size."""

    name: str
    keys: KeyTable
    required: tuple[str, ...]
    build: Callable[[dict], Arch]
    analytic: bool = True
    lora_targets: tuple[str, ...] | None = ("q_proj", "v_proj")  # None: peft has no default, give target_modules
    ia3_targets: tuple[str, ...] | None = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward: tuple[str, ...] | None = ("down_proj",)
    moe: bool = False
    sdpa: bool = True  # transformers accepts attn_implementation="sdpa" for it (else eager only)
    from_hub: Callable[[dict], dict] | None = None
    notes: str = ""
    ignored: tuple[str, ...] = field(default=("rope_scaling", "rope_parameters", "torch_dtype", "dtype"))


def heads(cfg: dict, hidden: int) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of a rotary-attention family; head_dim may differ from hidden/heads
    (Gemma 256, Qwen3 128, Mistral-Nemo 128 at hidden 5120)."""
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads {n_heads} is not divisible by num_key_value_heads {n_kv}")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % n_heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {n_heads}")
        head_dim = hidden // n_heads
    return n_heads, n_kv, head_dim


def attention_linears(h: int, n_heads: int, n_kv: int, head_dim: int, qkv_bias: bool,
                      o_bias: bool) -> tuple[LinearSpec, ...]:
    """q/k/v/o projections of LlamaAttention and the families that copy it."""
    return (
        LinearSpec(path="self_attn.q_proj", in_features=h, out_features=n_heads * head_dim, bias=qkv_bias),
        LinearSpec(path="self_attn.k_proj", in_features=h, out_features=n_kv * head_dim, bias=qkv_bias),
        LinearSpec(path="self_attn.v_proj", in_features=h, out_features=n_kv * head_dim, bias=qkv_bias),
        LinearSpec(path="self_attn.o_proj", in_features=n_heads * head_dim, out_features=h, bias=o_bias),
    )


def gated_mlp_linears(h: int, inter: int, bias: bool = False, prefix: str = "mlp") -> tuple[LinearSpec, ...]:
    """gate/up/down projections of LlamaMLP: down(act(gate(x)) * up(x))."""
    return (
        LinearSpec(path=f"{prefix}.gate_proj", in_features=h, out_features=inter, bias=bias),
        LinearSpec(path=f"{prefix}.up_proj", in_features=h, out_features=inter, bias=bias),
        LinearSpec(path=f"{prefix}.down_proj", in_features=inter, out_features=h, bias=bias),
    )


def rotary_arch(cfg: dict, *, linears: tuple[LinearSpec, ...], n_norms: int = 2, **extra) -> Arch:
    """An Arch for a rotary, RMSNorm, gated-MLP decoder (llama and its descendants)."""
    h = cfg["hidden_size"]
    n_heads, n_kv, head_dim = heads(cfg, h)
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    return Arch(model_type=cfg["model_type"], hidden_size=h, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=n_kv, head_dim=head_dim, intermediate_size=cfg["intermediate_size"],
                vocab_size=cfg["vocab_size"], max_positions=cfg["max_position_embeddings"],
                tied_embeddings=cfg["tie_word_embeddings"], embed_dim=h, norm="rms", gated_mlp=True,
                layer_linears=linears, model_linears=(), n_norms_per_layer=n_norms, final_norm=True,
                n_position_embeddings=0, hidden_act=act, **extra)


def qk_norm_params(head_dim: int) -> tuple[ParamSpec, ...]:
    """q_norm and k_norm: RMSNorm over head_dim, one weight each (Qwen3Attention, Gemma3Attention)."""
    return (ParamSpec(path="self_attn.q_norm.weight", shape=(head_dim,)),
            ParamSpec(path="self_attn.k_norm.weight", shape=(head_dim,)))


def sliding_layers(cfg: dict, n_layers: int, default_pattern: int) -> int:
    """How many layers use sliding-window attention: `layer_types` when given, else the family's default
    pattern (every `default_pattern`-th layer global; 0: none)."""
    return len(sliding_layer_ids(cfg, n_layers, default_pattern))


def sliding_layer_ids(cfg: dict, n_layers: int, default_pattern: int) -> tuple[int, ...]:
    """The indices of the sliding-window layers (as `sliding_layers` counts them)."""
    types = cfg.get("layer_types")
    if isinstance(types, (list, tuple)):
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not default_pattern or cfg.get("sliding_window") is None:
        return ()
    return tuple(i for i in range(n_layers) if (i + 1) % default_pattern)


# keys whose null transformers reads as "none" (no sliding window, no soft-capping): a null given for one of them
# is passed on (arch.resolve_keys), not replaced by the family's default. Other nulls mean "the default" (a
# config class may refuse None: GemmaConfig's head_dim).
NULL_MEANS_OFF = ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping")

LLAMA_LIKE: KeyTable = {
    "hidden_size": ("int", None),
    "num_hidden_layers": ("int", None),
    "num_attention_heads": ("int", None),
    "num_key_value_heads": ("int?", None),  # None -> num_attention_heads
    "head_dim": ("int?", None),  # None -> hidden_size // num_attention_heads
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
LLAMA_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def keys_without(table: KeyTable, *drop: str, **changes: tuple[str, object]) -> KeyTable:
    out = {k: v for k, v in table.items() if k not in drop}
    out.update(changes)
    return out
