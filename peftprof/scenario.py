"""Scenario files (TOML): read, validate every problem at once, expand sweeps into variants.

The raw dict from tomllib never leaves this module: callers get frozen `Scenario` objects or a
`UserError` listing every problem as `FILE: [section] key: problem (allowed: ...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import sys
from pathlib import Path

from . import arch as arch_mod
from . import hub as hub_mod
from . import rules_distributed, rules_inference, rules_peft
from .activations_known import ACT_KEYS, KNOWN_ACTIVATIONS
from .catalog import model_presets
from .errors import Problem, UserError, clean, show
from .estimate.alloc_conf import ALLOWED as ALLOC_CONF_ALLOWED
from .estimate.alloc_conf import alloc_conf_problems
from .families import ANY_CAUSAL_LM, REGISTRY, family, generic, hub_rewrite
from .schema import POLICY_EVERY, Collector, Key, Parts, allowed_text, check_value
from .settings import (
    ATTENTIONS,
    AUTOCAST_KINDS,
    BNB_4BIT_KINDS,
    COMPUTE_DTYPES,
    DEVICES,
    FLOAT_KINDS,
    FOUR_BIT_KINDS,
    METHODS,
    OPTIMIZERS,
    WEIGHT_KINDS,
    DistributedSettings,
    InferenceSettings,
    ModelSettings,
    PeftSettings,
    PrecisionSettings,
    RunSettings,
    Scenario,
    TrainingSettings,
    frozen_mapping,
    matches_target,
)
from .sweep import closest, collect_problems, expand, sweep_axes
from .trace import MAX_TRACED_LAYER_PASSES
from .vision import rules as vision_rules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_SCENARIO_BYTES = 1 << 20
MAX_CONFIG_BYTES = 10 << 20
# The name names the results file <name>.jsonl and the files beside it (.<name>.jsonl.XXXXXXXX.tmp while it is
# written, its lock, its set-aside bad lines <name>.jsonl.bad-<time>-<n>): about 30 bytes more than the name, and
# a file name holds at most 255 bytes. Names keep non-ASCII letters (up to 4 bytes each in UTF-8).
MAX_NAME_CHARS = 100
MAX_NAME_BYTES = 200
# control characters: C0, DEL, C1, bidirectional overrides and isolates, line and paragraph separators
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
TOP_LEVEL_KEYS = ("name", "description", "model", "precision", "peft", "training", "run", "distributed", "inference",
                  "sweep")
SECTIONS = ("model", "precision", "peft", "training", "run", "distributed", "inference")
MODEL_SOURCE_KEYS = ("preset", "config", "hub", "revision")
SOURCES = ("preset", "config", "hub")  # where a model comes from: exactly one of them (or inline keys alone)


SCHEMA: dict[str, dict[str, Key]] = {
    "precision": {
        "weights": Key("choice", choices=WEIGHT_KINDS),
        "double_quant": Key("bool"),
        "compute_dtype": Key("choice", choices=COMPUTE_DTYPES),
        "quant_block_size": Key("choice", choices=(32, 64, 128, 256, 512, 1024, 2048, 4096)),
        "autocast": Key("choice", choices=AUTOCAST_KINDS),
    },
    "peft": rules_peft.SCHEMA,
    "training": {
        "batch_size": Key("int", 1, 1_000_000),
        "seq_len": Key("int", 1, 10_000_000),
        "grad_accum_steps": Key("int", 1, 1_000_000),
        "optimizer": Key("choice", choices=OPTIMIZERS),
        "gradient_checkpointing": Key("policy"),
        "attention": Key("choice", choices=ATTENTIONS),
    },
    "run": {
        "device": Key("choice", choices=DEVICES),
        "steps": Key("int", 1, 100_000),
        "warmup_steps": Key("int", 0, 100_000),
        "seed": Key("int", 0, 2**32 - 1),
        "cuda_alloc_conf": Key("str", text=ALLOC_CONF_ALLOWED),
    },
    "distributed": rules_distributed.SCHEMA,
    "inference": rules_inference.SCHEMA,
}
PEFT_KEYS_BY_METHOD = rules_peft.PEFT_KEYS_BY_METHOD
MODEL_INT_MAX = 10_000_000


_fmt = show  # a value as the user wrote it in TOML/JSON (true, "text", 3), cut when long
_closest = closest


def read_text_file(path: Path, max_bytes: int) -> str:
    """Read a regular, size-capped UTF-8 file; raises ValueError with a one-line reason."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except OSError as e:
        raise ValueError(f"cannot read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError("is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("is not a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"is {st.st_size:,} bytes; the limit is {max_bytes:,}")
    try:
        data = path.read_bytes()[: max_bytes + 1]
    except OSError as e:
        raise ValueError(f"cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None


def _check_model_keys(c: Collector, model_type: str, given: dict, origin: str, source: str = "config") -> dict:
    """Type-check architecture keys against the family schema; returns the checked ones. `origin` is "inline" or
    what the keys came from (a preset, a config file, a hub model), reported on the key `source`."""
    family = arch_mod.FAMILY_KEYS[model_type]
    checked = {}
    for key, value in given.items():
        if key == "model_type":
            continue
        if key not in family:
            if origin == "inline":
                c.add("model", key, f"does not apply to model_type {model_type!r}", ", ".join(sorted(family)))
            continue  # HF config.json files carry many keys we do not use
        kind, _ = family[key]
        if value is None and kind in ("int?", "float?"):  # null: the key's absence in transformers' sense
            checked[key] = None
            continue
        if kind in ("int", "int?"):
            msg = check_value(Key("int", 1, MODEL_INT_MAX), value)
        elif kind in ("float", "float?"):
            msg = check_value(Key("float", 0, None, lo_open=True), value)
        else:
            msg = check_value(Key(kind), value)
        if not msg and key in ACT_KEYS and value not in KNOWN_ACTIVATIONS:  # transformers activations.py ACT2FN
            msg = f"{value!r} is not an activation of transformers (allowed: {', '.join(KNOWN_ACTIVATIONS)})"
        if msg:
            c.add("model", key if origin == "inline" else source, msg if origin == "inline" else
                  f"{clean(origin)}: {key} {msg}")
        else:
            checked[key] = value
    labels = given.get("id2label")  # transformers PretrainedConfig: num_labels = len(id2label) when only it is given
    if "num_labels" in family and given.get("num_labels") is None and isinstance(labels, dict) and labels:
        checked["num_labels"] = len(labels)
    return checked


def _read_config_file(c: Collector, config_file, base_dir: Path) -> dict | None:
    """`config = "file.json"`: a Hugging Face config.json relative to the scenario, refused as the hub's are
    (custom code, not a decoder-only causal LM) and rewritten as they are (a multimodal wrapper -> its text
    model)."""
    if not isinstance(config_file, str) or not config_file:
        c.add("model", "config", f"must be a path string, got {_fmt(config_file)}")
        return None
    try:
        loaded = json.loads(read_text_file(base_dir / config_file, MAX_CONFIG_BYTES))
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        c.add("model", "config", f"{clean(config_file)}: "
              f"{e if 'JSON' not in type(e).__name__ else 'not valid JSON: ' + str(e)}")
        return None
    except RecursionError:
        c.add("model", "config", f"{clean(config_file)}: JSON nested too deeply")
        return None
    if not isinstance(loaded, dict):
        c.add("model", "config", f"{clean(config_file)}: must hold a JSON object")
        return None
    problem = hub_mod.refusal(loaded)  # a type outside the registry is reported below, with the allowed ones
    if problem:
        c.add("model", "config", f"{clean(config_file)}: {problem}")
        return None
    try:
        return hub_rewrite(loaded)
    except ValueError as e:
        c.add("model", "config", f"{clean(config_file)}: {e}")
        return None


def _model_source(c: Collector, raw: dict, base_dir: Path) -> tuple[str | None, dict] | None:
    """(origin of the base keys, base keys) from preset, config or hub; None after a problem."""
    given = [k for k in SOURCES if raw.get(k) is not None]
    if len(given) > 1:
        c.add("model", given[-1], f"give only one of preset, config and hub (got {' and '.join(given)})")
        return None
    if "revision" in raw and raw.get("hub") is None:
        c.add("model", "revision", "applies only with hub (the revision of a hub model)", "hub = \"org/name\"")
        return None
    source = given[0] if given else None
    if source == "preset":
        presets = model_presets()
        preset = raw["preset"]
        if not isinstance(preset, str) or preset not in presets:
            c.add("model", "preset", f"unknown preset {_fmt(preset)}{_closest(str(preset), presets)}",
                  ", ".join(presets))
            return None
        return "preset", dict(presets[preset])
    if source == "config":
        loaded = _read_config_file(c, raw["config"], base_dir)
        return None if loaded is None else (raw["config"], loaded)
    if source == "hub":
        revision = raw.get("revision")
        try:
            loaded, _path = hub_mod.hub_config(raw["hub"], revision)
        except hub_mod.HubError as e:
            c.add("model", "hub", str(e))  # one line saying what to do
            return None
        return f"{raw['hub']}{'@' + revision if revision else ''} config.json", loaded
    if "model_type" not in raw:
        c.add("model", None, "needs preset, config, hub, or inline architecture keys with model_type",
              "preset = one of " + ", ".join(model_presets()))
        return None
    return None, {}


def _check_model_key_names(c: Collector, raw: dict, model_type) -> None:
    """Inline [model] keys must be source keys or architecture keys: a registry family's (any of them), or
    for a generic causal LM the fields of its transformers config class (families/generic.py)."""
    if isinstance(model_type, str) and model_type not in REGISTRY and generic.type_reason(model_type) is None:
        cls = generic.config_class(model_type).__name__
        for key in raw:
            if key not in MODEL_SOURCE_KEYS and key != "model_type" and not generic.accepts_key(model_type, key):
                fields = generic.config_fields(model_type)
                c.add("model", key, f"does not apply to model_type {model_type!r} ({cls} has no such field)"
                      f"{_closest(key, fields)}", ", ".join(MODEL_SOURCE_KEYS + fields))
        return
    known = MODEL_SOURCE_KEYS + tuple(arch_mod.ALL_MODEL_KEYS)
    for key in raw:
        if key not in known:
            c.add("model", key, f"unknown key{_closest(key, known)}", "preset, config, hub, revision, or HF "
                  "architecture keys: " + ", ".join(arch_mod.ALL_MODEL_KEYS))


def _resolve_model(c: Collector, raw: dict, base_dir: Path) -> ModelSettings | None:
    if not isinstance(raw, dict):
        c.add("model", None, "must be a table")
        return None
    n_problems = len(c.problems)
    # a config or hub model's type is known only once its config.json is read
    type_from_source = "model_type" not in raw and any(raw.get(k) is not None for k in ("config", "hub"))
    if not type_from_source:
        _check_model_key_names(c, raw, raw.get("model_type"))
    found = _model_source(c, raw, base_dir)
    if type_from_source:
        _check_model_key_names(c, raw, None if found is None else found[1].get("model_type"))
    if found is None or len(c.problems) > n_problems:
        return None
    origin, base = found
    source = next((k for k in SOURCES if raw.get(k) is not None), None)
    model_type = raw.get("model_type", base.get("model_type"))
    if base and "model_type" in raw and raw["model_type"] != base.get("model_type"):
        c.add("model", "model_type", f"{_fmt(raw['model_type'])} differs from the {source}'s "
              f"{_fmt(base.get('model_type'))}")
        return None
    if not isinstance(model_type, str) or model_type not in REGISTRY:
        return _resolve_generic(c, raw, base, origin, source, model_type)
    given = _check_model_keys(c, model_type, base, origin or "inline", source or "config")
    inline = {k: v for k, v in raw.items() if k not in MODEL_SOURCE_KEYS}
    given.update(_check_model_keys(c, model_type, inline, "inline"))
    missing = [k for k in arch_mod.required_keys(model_type) if k not in given]
    if missing:
        c.add("model", missing[0] if len(missing) == 1 else None, f"missing required architecture keys: "
              f"{', '.join(missing)}" + (f" (in {clean(origin)})" if source in ("config", "hub") else ""))
    if len(c.problems) > n_problems:
        return None
    resolved = arch_mod.resolve_keys(model_type, given)
    try:
        arch_mod.build_arch(resolved)
    except ValueError as e:
        c.add("model", None, str(e))
        return None
    config_file = raw.get("config")
    return ModelSettings(preset=raw.get("preset"), config_file=str(config_file) if config_file else None,
                         config=frozen_mapping(resolved), hub=raw.get("hub"), revision=raw.get("revision"))


def _resolve_generic(c: Collector, raw: dict, base: dict, origin: str | None, source: str | None,
                     model_type) -> ModelSettings | None:
    """A model_type outside the registry: any decoder-only causal LM that transformers builds from its config
    (families/generic.py). The config goes to transformers' config class as given (it validates it); the
    sizes that make the model's scale must be given; the Arch is read off the model built on meta."""
    n0 = len(c.problems)
    where = "model_type" if "model_type" in raw or not base else source
    reason = generic.type_reason(model_type)
    if reason:
        c.add("model", where, f"unsupported model_type {_fmt(model_type)}: {reason}",
              f"{', '.join(REGISTRY)}, or {ANY_CAUSAL_LM}")
        return None
    inline = {k: v for k, v in raw.items() if k not in MODEL_SOURCE_KEYS}
    for key, value in inline.items():  # the config is written into results and estimate JSON
        if bad := generic.non_json(value, key):
            c.add("model", key, f"{bad[0]} is a TOML {type(bad[1]).__name__} ({bad[1]}), which a model config "
                  "cannot hold", "strings, numbers, booleans, arrays and tables of them")
    config = {**generic.config_fields_from(base), **inline, "model_type": model_type}
    in_source = f" (in {clean(origin)})" if source in ("config", "hub") else ""
    missing = generic.missing_keys(model_type, config)
    if missing:
        c.add("model", missing[0] if len(missing) == 1 and not in_source else None,
              f"missing required architecture keys: {', '.join(missing)}{in_source}; transformers' "
              f"{generic.config_class(model_type).__name__} would default them to a full-size model")
    aliases = generic.config_class(model_type).attribute_map
    for key in generic.required_keys(model_type):
        name = key if key in config else aliases.get(key)
        if name in config:
            size = Key("int", 1, MODEL_INT_MAX)
            msg = check_value(size, config[name])
            if msg:
                c.add("model", name if name in inline else source, msg if name in inline else
                      f"{clean(origin)}: {name} {msg}", size.allowed())
    if len(c.problems) > n0:
        return None
    try:
        arch_mod.build_arch(config)
    except generic.ConfigRejected as e:
        key = e.field if e.field in inline else (source if source in ("config", "hub") else None)
        c.add("model", key, f"{clean(origin)}: {e}" if key == source and source else str(e))
        return None
    except ValueError as e:
        c.add("model", source if source in ("config", "hub") else None,
              f"{clean(origin)}: {e}" if source in ("config", "hub") else str(e))
        return None
    config_file = raw.get("config")
    return ModelSettings(preset=raw.get("preset"), config_file=str(config_file) if config_file else None,
                         config=frozen_mapping(config), hub=raw.get("hub"), revision=raw.get("revision"))


def _section(c: Collector, raw: dict, name: str) -> dict:
    """Type- and range-check one plain section; returns its valid keys."""
    section = raw.get(name, {})
    if not isinstance(section, dict):
        c.add(name, None, "must be a table")
        return {}
    schema = SCHEMA[name]
    valid = {}
    for key, value in section.items():
        if key not in schema:
            c.add(name, key, f"unknown key{_closest(key, schema)}", ", ".join(schema))
            continue
        msg = check_value(schema[key], value)
        if msg:
            c.add(name, key, msg, allowed_text(schema[key]))
        else:
            valid[key] = tuple(value) if isinstance(value, list) else value
    return valid


def _variant(c: Collector, cond: Collector, raw: dict, base_dir: Path, name: str, variant_name: str,
             overrides: tuple, model_cache: dict) -> Scenario | None:
    """Validate one variant. Problems in `c`; not-applicable keys (conditional problems) in `cond`."""
    n0 = len(c.problems)
    model_key = json.dumps(raw.get("model"), sort_keys=True, default=str)
    if "model" not in raw:  # reported once, as the missing section
        model_cache[model_key] = (None, [])
    if model_key not in model_cache:
        mc = Collector(c.file)
        model_cache[model_key] = (_resolve_model(mc, raw.get("model"), base_dir), mc.problems)
    model, model_problems = model_cache[model_key]
    c.problems.extend(model_problems)
    prec, peft, train, run, dist, inf = (_section(c, raw, s) for s in (
        "precision", "peft", "training", "run", "distributed", "inference"))

    weights = prec.get("weights", PrecisionSettings.weights)
    gap = None if model is None else arch_mod.analytic_gap(model.arch.model_type)
    accum = train.get("grad_accum_steps", 1)
    passes = model.arch.n_layers * accum if gap is not None and isinstance(accum, int) else 0
    # where the analytic estimator cannot answer, the trace must: refuse what it cannot do
    if gap is not None and weights == "int4":  # the trace cannot quantize int4 on meta tensors
        c.add("precision", "weights", f"int4 on {model.arch.model_type} cannot be estimated: {gap}, and the trace "
              "cannot quantize int4 (optimum-quanto) on meta tensors", "fp32, fp16, bf16, int8, fp4, nf4")
    elif passes > MAX_TRACED_LAYER_PASSES:
        c.add("training", "grad_accum_steps", f"{model.arch.n_layers} layers x {accum} micro-batches cannot be "
              f"estimated: {gap}, and the trace runs at most {MAX_TRACED_LAYER_PASSES} decoder-layer passes",
              f"<= {MAX_TRACED_LAYER_PASSES // model.arch.n_layers} micro-batches"
              if model.arch.n_layers <= MAX_TRACED_LAYER_PASSES else "a model the trace can run")
    if "double_quant" in prec and weights not in BNB_4BIT_KINDS:
        cond.add("precision", "double_quant", f"applies only to {' and '.join(BNB_4BIT_KINDS)} weights, not {weights}")
        prec.pop("double_quant")
    if "quant_block_size" in prec and weights not in BNB_4BIT_KINDS:
        cond.add("precision", "quant_block_size", f"applies only to bitsandbytes 4-bit weights "
                 f"({', '.join(BNB_4BIT_KINDS)}), not {weights}")
        prec.pop("quant_block_size")
    if weights in FLOAT_KINDS and prec.get("compute_dtype", weights) != weights:
        # float models compute in their own dtype (no autocast here); the key applies to quantized weights
        cond.add("precision", "compute_dtype", f"{prec['compute_dtype']} cannot compute a {weights} model "
                 f"(float weights compute in their own dtype; compute_dtype applies to quantized weights)")
        prec.pop("compute_dtype")
    prec["compute_dtype"] = prec.get("compute_dtype", weights if weights in FLOAT_KINDS else
                                     PrecisionSettings.compute_dtype)

    method = peft.get("method", PeftSettings.method)
    for key in list(peft):
        if key != "method" and key not in PEFT_KEYS_BY_METHOD[method]:
            users = [m for m, keys in PEFT_KEYS_BY_METHOD.items() if key in keys]
            cond.add("peft", key, f"does not apply to method {method} (applies to: {', '.join(users)})")
            peft.pop(key)
    if isinstance(peft.get("target_modules"), tuple):
        peft["target_modules"] = tuple(peft["target_modules"])
    policy = train.get("gradient_checkpointing", "none")
    if method == "prefix_tuning" and policy != "none":
        c.add("training", "gradient_checkpointing", "peft refuses prefix_tuning with gradient checkpointing", "none")
    if weights in FOUR_BIT_KINDS + ("int8",) and method == "full":
        c.add("peft", "method", f"full fine-tuning cannot train {weights} quantized weights",
              ", ".join(m for m in METHODS if m != "full"))
    _check_autocast(c, prec.get("autocast", "none"), weights, method)

    if "cuda_alloc_conf" in run:
        for msg in alloc_conf_problems(run["cuda_alloc_conf"]):
            c.add("run", "cuda_alloc_conf", msg.removesuffix(f"; allowed: {ALLOC_CONF_ALLOWED}"), ALLOC_CONF_ALLOWED)

    if model is not None:
        a = model.arch
        _check_family(c, family(a.model_type), a, peft, method, train)
        targets = peft.get("target_modules")
        if isinstance(targets, tuple):
            paths = [s.path for s in a.layer_linears + a.model_linears]
            unknown = [t for t in targets if not any(matches_target(p, t) for p in paths)]
            if unknown:
                shown = ", ".join(map(_fmt, unknown[:5])) + (f" and {len(unknown) - 5:,} more"
                                                              if len(unknown) > 5 else "")
                c.add("peft", "target_modules", f"{shown} not in {a.model_type} "
                      f"(its linear layers: {', '.join(a.linear_names)})", "\"all-linear\" or names from that list")
        _check_positions(c, a.max_positions, train.get("seq_len", TrainingSettings.seq_len),
                         peft.get("num_virtual_tokens", PeftSettings.num_virtual_tokens) if method == "prompt_tuning"
                         else None)
        if method == "prompt_tuning" and a.embed_dim != a.hidden_size:
            c.add("peft", "method", f"peft sizes prompt embeddings by hidden_size {a.hidden_size}, but this "
                  f"model's word embeddings are {a.embed_dim} wide (word_embed_proj_dim)",
                  ", ".join(m for m in METHODS if m != "prompt_tuning"))
        every = POLICY_EVERY.fullmatch(policy)
        if every and (len(every[1]) > 9 or int(every[1]) > a.n_layers):
            c.add("training", "gradient_checkpointing", f"{clean(policy)}: the model has only {a.n_layers} layers",
                  f"every_1 .. every_{a.n_layers}")
    parts = Parts(prec=prec, peft=peft, train=train, run=run, dist=dist, inf=inf)
    for rules in (rules_peft, rules_distributed, rules_inference, vision_rules):
        rules.check(c, cond, parts, model)
    if len(c.problems) > n0 or model is None:
        return None
    return Scenario(name=variant_name, scenario=name, description=str(raw.get("description", "")),
                    source=c.file, model=model, precision=PrecisionSettings(**prec), peft=PeftSettings(**peft),
                    training=TrainingSettings(**train), run=RunSettings(**run),
                    distributed=DistributedSettings(**dist), inference=InferenceSettings(**inf), overrides=overrides)


def _check_family(c: Collector, fam, a, peft: dict, method: str, train: dict) -> None:
    """What a model family refuses or lacks: SDPA attention (transformers builds gemma2 eager only: an unset
    attention becomes eager, recorded in the resolved scenario; an explicit sdpa is an error), and peft's
    default target modules (none for phi3 and the MoE families: target_modules must be given)."""
    if not fam.sdpa:
        if "attention" not in train:
            train["attention"] = "eager"
        elif train["attention"] == "sdpa":
            c.add("training", "attention", f"transformers builds {fam.name} with eager attention only (it refuses "
                  "sdpa)", "eager")
    if getattr(fam, "checkpointing", True) is False and train.get("gradient_checkpointing", "none") != "none":
        c.add("training", "gradient_checkpointing", f"transformers' {fam.name} model does not support gradient "
              "checkpointing", "none")
    if method in ("lora", "ia3") and peft.get("target_modules") is None:
        default = fam.ia3_targets if method == "ia3" else fam.lora_targets
        if default is None:
            c.add("peft", "target_modules", f"peft has no default for {fam.name}", ", ".join(a.linear_names))


def _check_autocast(c: Collector, autocast: str, weights: str, method: str) -> None:
    """Combinations the libraries refuse under autocast (measured, torch 2.13): fp16 autocast's loss scaler
    cannot unscale fp16 gradients (torch/amp/grad_scaler.py _unscale_grads_: "Attempting to unscale FP16
    gradients"), which full fine-tuning of fp16 weights makes; peft's virtual tokens are concatenated with
    the model's embeddings or keys/values, and autocast's cat (aten/src/ATen/autocast_mode.h prioritize)
    refuses bf16 beside fp16 ("Unexpected floating ScalarType")."""
    if autocast == "fp16" and weights == "fp16" and method == "full":
        c.add("precision", "autocast", "fp16 autocast scales the loss with torch.amp.GradScaler, which refuses "
              "to unscale the fp16 gradients of fully fine-tuned fp16 weights", "none | bf16")
    half = ("fp16", "bf16")
    if method in ("prompt_tuning", "prefix_tuning") and autocast in half and weights in half and weights != autocast:
        c.add("precision", "autocast", f"{autocast} autocast of {weights} weights with {method}: torch's autocast "
              f"refuses to concatenate peft's virtual tokens in {weights} with {autocast} tensors",
              f"none | {weights}")


def _check_positions(c: Collector, max_positions: int, seq: int, virtual: int | None) -> None:
    """seq_len, plus prompt_tuning's virtual tokens (peft prepends them to the input), must fit the
    model's positions. The allowed range is shown only where it is not empty."""
    if virtual is None:
        if seq > max_positions:
            c.add("training", "seq_len", f"{seq} exceeds the model's max_position_embeddings {max_positions}",
                  f"<= {max_positions}")
        return
    if seq + virtual <= max_positions:
        return
    why = (f"num_virtual_tokens + seq_len must be <= max_position_embeddings {max_positions}: "
           f"{virtual} + {seq} > {max_positions}")
    if seq < max_positions:
        c.add("peft", "num_virtual_tokens", why, f"<= {max_positions - seq} at seq_len {seq}")
    else:
        c.add("training", "seq_len", f"{why}; seq_len alone already {'reaches' if seq == max_positions else 'exceeds'}"
              f" it, so no num_virtual_tokens fits",
              f"<= {max_positions - 1} with prompt_tuning" if max_positions > 1 else None)


def _model_keys(section: str, model=None, base_dir: Path | None = None) -> tuple:
    """The keys a [sweep] may vary in `section`; for [model] of a generic model_type (given inline or by its
    config file `model`), its transformers config class's fields."""
    if section != "model":
        return tuple(SCHEMA[section])
    model_type = model.get("model_type") if isinstance(model, dict) else None
    if model_type is None and isinstance(model, dict) and isinstance(model.get("config"), str) and base_dir:
        model_type = (_read_config_file(Collector(""), model["config"], base_dir) or {}).get("model_type")
    if isinstance(model_type, str) and model_type not in REGISTRY and generic.type_reason(model_type) is None:
        return MODEL_SOURCE_KEYS + tuple(k for k in generic.accepted_keys(model_type) if k not in MODEL_SOURCE_KEYS)
    return MODEL_SOURCE_KEYS + tuple(arch_mod.ALL_MODEL_KEYS)


def _check_text(c: Collector, key: str, value: str, stem: bool = False) -> None:
    """`name` and `description` are printed in tables, reports and file names: no control characters
    (a description may span lines); the name also names the results file, so its length is bounded."""
    where = "not set, and the file name used instead " if stem else ""
    allowed_ws = "\n\t" if key == "description" else ""
    bad = next((m for m in CONTROL_CHARS.finditer(value) if m[0] not in allowed_ws), None)
    if bad:
        c.add(None, key, f"{where}contains the control character U+{ord(bad[0]):04X} at character {bad.start() + 1:,}",
              "printable characters" + (", line breaks and tabs" if key == "description" else ""))
    if key != "name":
        return
    if len(value) > MAX_NAME_CHARS:
        c.add(None, key, f"{where}is {len(value):,} characters long; it names the results file <name>.jsonl",
              f"at most {MAX_NAME_CHARS} characters")
    elif len(value.encode()) > MAX_NAME_BYTES:
        c.add(None, key, f"{where}is {len(value.encode()):,} bytes in UTF-8; it names the results file "
              f"<name>.jsonl", f"at most {MAX_NAME_BYTES} bytes")


def load_scenario(path: str | os.PathLike) -> list[Scenario]:
    """Read one scenario file into its variants; raises UserError with every problem found."""
    path = Path(path)
    c = Collector(str(path))
    try:
        text = read_text_file(path, MAX_SCENARIO_BYTES)
        raw = tomllib.loads(text)
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        msg = str(e) if not isinstance(e, tomllib.TOMLDecodeError) else f"not valid TOML: {e}"
        raise UserError([Problem(file=str(path), message=msg)]) from None
    except RecursionError:
        raise UserError([Problem(file=str(path), message="not valid TOML: nested too deeply")]) from None
    if not raw:
        raise UserError([Problem(file=str(path), message="empty scenario: needs at least a [model] section")])
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            c.add(None, key, f"unknown section or key{_closest(key, TOP_LEVEL_KEYS)}", ", ".join(TOP_LEVEL_KEYS))
    if "model" not in raw:
        c.add("model", None, "missing section: every scenario names a model", "preset, config or inline keys")
    for key in ("name", "description"):
        if key in raw and (not isinstance(raw[key], str) or (key == "name" and not raw[key].strip())):
            c.add(None, key, f"must be a non-empty string, got {_fmt(raw[key])}")
        elif key in raw:
            _check_text(c, key, raw[key])
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        name = path.stem
        if "name" not in raw:
            _check_text(c, "name", name, stem=True)
    # a bad [sweep] does not hide the rest: the valid axes are still expanded and every variant checked
    axes, sweep_ok = sweep_axes(c.add, raw.get("sweep"), SECTIONS,
                                lambda section: _model_keys(section, raw.get("model"), path.parent))

    base = {s: dict(raw[s]) if isinstance(raw.get(s), dict) else raw.get(s) for s in SECTIONS if s in raw}
    base["description"] = raw.get("description", "")
    model_cache: dict = {}
    results: list[tuple[Scenario | None, list[Problem], list[Problem]]] = []
    names: list[str] = []
    for vname, variant_raw, combo in expand(name, base, axes):
        vc, cond = Collector(str(path)), Collector(str(path))
        scenario = _variant(vc, cond, variant_raw, path.parent, name, vname, combo, model_cache)
        results.append((scenario, vc.problems, cond.problems))
        names.append(vname)
    collect_problems(c.add, results, names, conditional=sweep_ok)
    if c.problems:
        raise UserError(c.problems)
    out = []
    for scenario, _, cond in results:
        na = tuple(f"{p.section}.{p.key}" for p in cond)
        out.append(scenario if not na else dataclasses.replace(scenario, not_applicable=na))
    return out


def load_scenarios(paths) -> list[Scenario]:
    """Load several files; problems of all files are reported together. Results are keyed by variant name
    (the summary, the results file, the gate), so two files may not give a variant the same name."""
    out, problems = [], []
    variants: dict[str, str] = {}  # variant name -> the file that gave it
    given: set[Path] = set()
    for p in paths:
        try:
            same = Path(p).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop: load_scenario says what is wrong
            same = Path(p)
        if same in given:
            problems.append(Problem(file=str(p), message="the same file is given twice"))
            continue
        given.add(same)
        try:
            loaded = load_scenario(p)
        except UserError as e:
            problems.extend(e.problems)
            continue
        taken = next((v.name for v in loaded if v.name in variants), None)
        if taken is not None:
            problems.append(Problem(file=str(p), key="name", message=f"variant {show(taken)} is also a variant of "
                                    f"{variants[taken]}", allowed="a name of its own"))
            continue
        variants.update((v.name, str(p)) for v in loaded)
        out.extend(loaded)
    if problems:
        raise UserError(problems)
    return out
