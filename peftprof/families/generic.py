"""generic: any decoder-only causal LM that transformers builds from its config, for a model_type outside the
registry (falcon, gpt_neox, starcoder2, olmo2, stablelm, ...).

No hand-written shapes: the config goes to transformers' own config class (CONFIG_MAPPING[model_type], which
validates it), AutoModelForCausalLM builds the model on the meta device (no memory, no weights, never remote
code), and the Arch is read off the module tree: the decoder-layer stack (transformers 5's
GradientCheckpointingLayer modules, else the nn.ModuleList of num_hidden_layers blocks), its nn.Linear and
Conv1D modules with their shapes (what peft's target_modules and "all-linear" reach), every other parameter,
the embeddings and the tied lm_head. The analytic estimator does not model these families (`analytic=False`):
`estimate` answers from the trace, which runs the real model, and says so. torch and transformers are imported
here only when a generic model is resolved, so registry families and `peftprof --help` stay fast.

Which model types: those in transformers' CONFIG_MAPPING and MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
(transformers/models/auto/modeling_auto.py), less encoder-decoders (MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
or a config class whose is_encoder_decoder defaults true), encoders that transformers can also run as decoders
(MODEL_FOR_MASKED_LM_MAPPING_NAMES: bert, roberta, ...) and multimodal wrappers (a config class with
sub_configs: give the language model's config instead). `type_problem` is the one rule; hub.py and the
scenario loader both use it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass

from .base import Arch, Family, LinearSpec, ParamSpec

# the sizes that make a model's scale: transformers' config classes default them to a full-size model, so a
# generic config must give them (under their standard names or the config class's own, via its attribute_map)
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# published config.json keys that are not architecture: dropped before the config class sees them (peftprof
# chooses dtypes and quantization itself; auto_map is refused before this)
DROPPED_KEYS = ("architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                "quantization_config", "use_cache", "_attn_implementation", "attn_implementation")
NO_POSITION_LIMIT = 10_000_000  # alibi / no learned positions: seq_len's own bound (scenario.SCHEMA)
# config attributes that name top-k in mixture-of-experts configs (num_experts_per_tok: mixtral, qwen*_moe, ...)
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "top_k", "num_selected_experts")
FFN_KEYS = ("intermediate_size", "ffn_hidden_size", "ffn_dim", "n_inner", "d_ff")
MODALITIES = ("vision", "audio", "image", "speech", "video")  # sub-config names of multimodal wrappers
ACT_KEYS = ("hidden_act", "hidden_activation", "activation_function", "activation")


@dataclass(frozen=True, kw_only=True)
class GenericArch(Arch):
    """An Arch read off a transformers module tree. Norms are counted in `layer_params` (n_norms_per_layer 0);
    `model_params` are the parameters outside the decoder layers besides the word embeddings, lm_head and
    `model_linears` (final norm, learned positions, ...). `total_params` is transformers' own count (tied
    weights once): with layers that differ from each other (`uniform_layers` False) the per-layer formula
    of Arch.n_params cannot hold, so it is not used. `flops_gap`: why estimate/flops.py (linears and
    attention) does not count this model's matmuls, or None."""

    model_params: tuple[ParamSpec, ...] = ()
    total_params: int = 0
    uniform_layers: bool = True
    flops_gap: str | None = None
    layer_stack: str = ""  # module path of the decoder layers, e.g. "transformer.h"

    @property
    def n_params(self) -> int:
        return self.total_params


@dataclass(frozen=True, kw_only=True)
class GenericFamily(Family):
    """A Family for one transformers model_type outside the registry; `checkpointing`: whether transformers
    supports gradient checkpointing for its class (PreTrainedModel.supports_gradient_checkpointing)."""

    checkpointing: bool = True
    config_class: str = ""


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs config advice (e.g. bos_token_id outside a tiny vocabulary) on every build."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _mappings():
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return CONFIG_MAPPING_NAMES, modeling_auto


def _one_line(e: BaseException) -> str:
    """The cause of an exception in one line: a strict-dataclass validation error's last line (its first only
    says which field), another exception's first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if type(e).__name__.startswith("StrictDataclass") and len(lines) > 1:
        return lines[-1]
    return lines[0]


def type_problem(model_type) -> str | None:
    """Why `model_type` is not a decoder-only causal LM that transformers builds from a config, as a sentence
    naming it (None: it is one). Registry families are not asked here."""
    reason = type_reason(model_type)
    if reason is None:
        return None
    if not isinstance(model_type, str) or not model_type:
        return "config has no model_type"
    name = model_type if len(model_type) <= 60 else model_type[:60] + "…"
    return f"model_type {name!r} is {reason}" if reason.startswith("unknown") else f"{name} is {reason}"


def type_reason(model_type) -> str | None:
    """`type_problem` without the model_type's name: "an encoder-decoder model, not a decoder-only causal LM".
    Any value is answered (a TOML list or table is not a model_type name), never a TypeError."""
    if not isinstance(model_type, str) or not model_type:
        return "not a model_type name"
    return _type_reason(model_type)


@functools.lru_cache(maxsize=256)
def _type_reason(model_type: str) -> str | None:
    names, auto = _mappings()
    if model_type not in names:
        import transformers

        return f"unknown to transformers {transformers.__version__}"
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    if model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES or _default(config_class, "is_encoder_decoder"):
        return "an encoder-decoder model, not a decoder-only causal LM"
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return ("an encoder-only model (a masked-LM encoder that transformers can also run as a decoder), not a "
                "decoder-only causal LM")
    if model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return (f"a model without a causal-LM head in transformers ({config_class.__name__} is not in "
                "AutoModelForCausalLM's mapping), not a decoder-only causal LM")
    subs = dict(getattr(config_class, "sub_configs", None) or {})
    # nested configs of one text model (dbrx's attn_config, mpt's attn_config) are not other modalities
    if any(k == "text_config" or any(w in k for w in MODALITIES) for k in subs):
        text = _text_model_type(subs.get("text_config"))
        return (f"a multimodal model (its config holds {', '.join(sorted(subs))}); give its language model's "
                "config" + (f" (model_type {text!r})" if text else "") + " instead")
    return None


def _default(config_class, attr: str):
    try:
        with _quiet_transformers():
            return getattr(config_class(), attr, None)
    except Exception:  # a config class that needs arguments has no usable default here
        return None


def _text_model_type(sub) -> str | None:
    return getattr(sub, "model_type", None) or None


def config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def config_fields(model_type: str) -> tuple[str, ...]:
    """The keys `model_type`'s config class reads (its own dataclass fields and attribute_map aliases), less
    those every PreTrainedConfig has."""
    import dataclasses

    from transformers import PreTrainedConfig

    cls = config_class(model_type)
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)} if dataclasses.is_dataclass(PreTrainedConfig) \
        else set()
    own = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    return tuple(sorted({k for k in own if k not in base and not k.startswith("_")} | set(cls.attribute_map)))


def accepts_key(model_type: str, key: str) -> bool:
    """Whether the config class reads `key` (its fields, the PreTrainedConfig ones included, or an alias)."""
    import dataclasses

    cls = config_class(model_type)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return key in fields or key in cls.attribute_map or key in cls.attribute_map.values()


def accepted_keys(model_type: str) -> tuple[str, ...]:
    """Every key `accepts_key` accepts, sorted (a [sweep] over a generic model's own config keys)."""
    import dataclasses

    cls = config_class(model_type)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return tuple(sorted({k for k in fields if not k.startswith("_")} | set(cls.attribute_map)
                        | set(cls.attribute_map.values())))


def non_json(value, path: str = "") -> tuple[str, object] | None:
    """(where, value) of the first part of a config value that JSON cannot hold (a TOML date or time, a
    non-string key): the config is written into result files and `estimate --format json`. None: all JSON."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    if isinstance(value, (list, tuple)):
        return next((bad for i, x in enumerate(value) if (bad := non_json(x, f"{path}[{i}]"))), None)
    if isinstance(value, dict):
        for k, x in value.items():
            if not isinstance(k, str):
                return f"{path}.{k}", k
            if bad := non_json(x, f"{path}.{k}"):
                return bad
        return None
    return path, value


def required_keys(model_type: str) -> tuple[str, ...]:
    """SIZE_KEYS that this config class has (mamba has no attention heads)."""
    cls = config_class(model_type)
    return tuple(k for k in SIZE_KEYS if k in cls.attribute_map or accepts_key(model_type, k))


def missing_keys(model_type: str, given: dict) -> list[str]:
    cls = config_class(model_type)
    return [k for k in required_keys(model_type) if k not in given and cls.attribute_map.get(k) not in given]


def config_fields_from(config: dict) -> dict:
    """A published config.json's keys less DROPPED_KEYS (model_type kept)."""
    return {k: v for k, v in config.items() if k not in DROPPED_KEYS}


class ConfigRejected(ValueError):
    """transformers' config class refused the config; `field` names the key where it says which."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def hf_config(cfg: dict):
    """transformers' config object for a resolved generic config (model_type included). Raises ConfigRejected
    with the config class's one-line complaint."""
    fields = dict(cfg)
    model_type = fields.pop("model_type")
    cls = config_class(model_type)
    try:
        with _quiet_transformers():
            return cls(**fields)
    except Exception as e:  # strict-dataclass validation, ValueError/TypeError from __post_init__
        field = re.match(r"Validation error for field '([^']+)'", str(e))
        cause = re.sub(r"^[A-Za-z]*Error: ", "", _one_line(e))
        # a union-typed field lists each member's complaint after the types it allows: the types say it
        cause = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", cause.split(". Errors: ", 1)[0])
        cause = cause if len(cause) <= 200 else cause[:200] + "…"
        raise ConfigRejected(f"{cls.__name__} rejects it: {cause}", field[1] if field else None) from None


@functools.lru_cache(maxsize=64)
def family(model_type: str) -> GenericFamily:
    """The Family of a transformers causal LM outside the registry; peft's default targets from
    peft/utils/constants.py (TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING), None where peft has none (the
    loader then asks for target_modules). Raises ValueError for a model_type that is not one (type_problem)."""
    problem = type_problem(model_type)
    if problem:
        raise ValueError(problem)
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[config_class(model_type)]

    def targets(mapping):
        value = mapping.get(model_type)
        return tuple(value) if value else None

    return GenericFamily(
        name=model_type, keys={}, required=required_keys(model_type), build=build, analytic=False,
        lora_targets=targets(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
        ia3_targets=targets(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING),
        ia3_feedforward=targets(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING),
        sdpa=bool(getattr(model_class, "_supports_sdpa", False)),
        checkpointing=bool(getattr(model_class, "supports_gradient_checkpointing", False)),
        config_class=config_class(model_type).__name__,
        notes="generic: shapes read off the transformers module tree; the trace answers")


def build(cfg: dict) -> GenericArch:
    """The Arch of a resolved generic config (see module docstring). Raises ValueError with one line."""
    return _build(json.dumps(cfg, sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _build(key: str) -> GenericArch:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = json.loads(key)
    conf = hf_config(cfg)
    try:
        with _quiet_transformers(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf, trust_remote_code=False)
    except Exception as e:  # the modeling code's own checks (e.g. heads that do not divide hidden_size)
        raise ValueError(f"transformers cannot build {cfg['model_type']} from this config: {_one_line(e)}") from None
    return arch_of(model, conf, cfg["model_type"])


def _is_linear(m) -> bool:
    """What peft's "all-linear" and LoRA wrap (peft/tuners/tuners_utils.py: torch.nn.Linear and Conv1D)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (torch.nn.Linear, Conv1D))


def _linear_spec(path: str, m) -> LinearSpec:
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, Conv1D):  # weight stored (in, out)
        in_f, out_f = m.weight.shape
    else:
        in_f, out_f = m.in_features, m.out_features
    return LinearSpec(path=path, in_features=int(in_f), out_features=int(out_f), bias=m.bias is not None)


def _decoder_stack(model, n_layers: int):
    """(path, ModuleList) of the decoder layers: the ModuleList of GradientCheckpointingLayer modules
    (transformers 5's decoder layers), else the largest ModuleList of n_layers blocks."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    for name, mods in lists:
        if all(isinstance(x, GradientCheckpointingLayer) for x in mods) and (not n_layers or len(mods) == n_layers):
            return name, mods
    sized = [(sum(p.numel() for p in mods.parameters()), name, mods) for name, mods in lists if len(mods) == n_layers]
    if sized:
        _, name, mods = max(sized, key=lambda t: t[0])
        return name, mods
    raise ValueError(f"no stack of num_hidden_layers ({n_layers}) decoder layers in {type(model).__name__}")


def _layer_parts(layer) -> tuple[tuple[LinearSpec, ...], tuple[ParamSpec, ...], int]:
    """(linears, other parameters, experts) of one decoder layer; experts: the count of a 3-D expert stack
    (transformers 5) or of an nn.ModuleList named experts."""
    import torch

    linears, owned = [], set()
    n_experts = 0
    for path, m in layer.named_modules():
        if _is_linear(m):
            linears.append(_linear_spec(path, m))
            owned.update(id(p) for p in m.parameters(recurse=False))
        if path.rsplit(".", 1)[-1] == "experts" and isinstance(m, torch.nn.ModuleList):
            n_experts = max(n_experts, len(m))
    params = []
    for path, p in layer.named_parameters():
        if id(p) in owned:
            continue
        expert = p.dim() >= 3 and "expert" in path  # a stack of experts' weights, not e.g. a conv kernel
        if expert:
            n_experts = max(n_experts, int(p.shape[0]))
        params.append(ParamSpec(path=path, shape=tuple(int(d) for d in p.shape), expert=expert))
    return tuple(linears), tuple(params), n_experts


def _first_attr(obj, names, default=None):
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def arch_of(model, conf, model_type: str) -> GenericArch:
    """Read the Arch off a built (meta) transformers causal LM."""
    import torch

    n_layers = _first_attr(conf, ("num_hidden_layers",), 0)
    stack_name, layers = _decoder_stack(model, n_layers)
    parts = [_layer_parts(layer) for layer in layers]
    uniform = all(p[:2] == parts[0][:2] for p in parts)
    if uniform:
        layer_linears, layer_params = parts[0][:2]
    else:  # every distinct linear / parameter path once (target_modules are checked against them)
        lin: dict[str, LinearSpec] = {}
        par: dict[str, ParamSpec] = {}
        for linears, params, _ in parts:
            lin.update((s.path, s) for s in linears if s.path not in lin)
            par.update((s.path, s) for s in params if s.path not in par)
        layer_linears, layer_params = tuple(lin.values()), tuple(par.values())
    n_experts = max(p[2] for p in parts)

    in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    vocab, embed_dim = (int(d) for d in in_emb.weight.shape)
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    in_stack = {id(p) for p in layers.parameters()}
    skip = {id(in_emb.weight)} | ({id(out_emb.weight)} if out_emb is not None else set())
    model_linears, owned = [], set()
    for path, m in model.named_modules():
        if _is_linear(m) and m is not out_emb and not any(id(p) in in_stack for p in m.parameters()):
            model_linears.append(_linear_spec(path, m))
            owned.update(id(p) for p in m.parameters(recurse=False))
    model_params = tuple(ParamSpec(path=n, shape=tuple(int(d) for d in p.shape))
                         for n, p in model.named_parameters()
                         if id(p) not in in_stack and id(p) not in skip and id(p) not in owned)

    hidden = _first_attr(conf, ("hidden_size",), embed_dim)
    n_heads = _first_attr(conf, ("num_attention_heads",), 0)
    attn = next((m for m in layers[0].modules() if isinstance(getattr(m, "head_dim", None), int)), None)
    head_dim = _first_attr(attn, ("head_dim",)) or _first_attr(conf, ("head_dim",)) or (
        hidden // n_heads if n_heads else 0)
    n_kv = _first_attr(attn, ("num_key_value_heads", "num_kv_heads")) or _first_attr(
        conf, ("num_key_value_heads", "num_kv_heads"))
    groups = _first_attr(attn, ("num_key_value_groups",))
    if n_kv is None:
        n_kv = n_heads // groups if groups and n_heads else (1 if getattr(conf, "multi_query", False) else n_heads)
    top_k = _first_attr(conf, TOP_K_KEYS, 0) if n_experts else 0
    act = next((v for k in ACT_KEYS if isinstance(v := getattr(conf, k, None), str)), "")
    window = getattr(conf, "sliding_window", None)

    flops_gap = None
    if not uniform:
        flops_gap = "its decoder layers differ from each other"
    elif not n_heads:
        flops_gap = "it has no attention heads (num_attention_heads)"
    elif any(len(p.shape) >= 2 and not p.expert for p in layer_params):
        shown = next(p.path for p in layer_params if len(p.shape) >= 2 and not p.expert)
        flops_gap = f"its decoder layers multiply by parameters that are not linear layers ({shown})"
    if flops_gap:
        flops_gap = f"flops_per_step and speed omitted: estimate/flops.py counts linear layers and attention, and " \
                    f"{flops_gap}"
    return GenericArch(
        model_type=model_type, hidden_size=hidden, n_layers=len(layers), n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, intermediate_size=_first_attr(conf, FFN_KEYS, 0), vocab_size=vocab,
        max_positions=_first_attr(conf, ("max_position_embeddings",), NO_POSITION_LIMIT),
        tied_embeddings=tied, embed_dim=embed_dim,
        norm="layer" if any(isinstance(m, torch.nn.LayerNorm) for m in layers[0].modules()) else "rms",
        gated_mlp=any(s.name in ("gate_proj", "gate_up_proj", "w1") for s in layer_linears),
        layer_linears=layer_linears, model_linears=tuple(model_linears), n_norms_per_layer=0, final_norm=False,
        n_position_embeddings=0, layer_params=layer_params, hidden_act=act,
        sliding_window=window if isinstance(window, int) and not isinstance(window, bool) else None,
        n_experts=n_experts, experts_per_token=top_k or n_experts, model_params=model_params,
        total_params=sum(p.numel() for p in model.parameters()), uniform_layers=uniform, flops_gap=flops_gap,
        layer_stack=stack_name)
