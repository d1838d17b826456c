"""Scenario files (TOML): read, validate every problem at once, expand sweeps into variants.

The raw dict from tomllib never leaves this module: callers get frozen `Scenario` objects or a
`UserError` listing every problem as `FILE: [section] key: problem (allowed: ...)`.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import arch as arch_mod
from .catalog import model_presets
from .errors import Problem, UserError
from .settings import (ATTENTIONS, BNB_4BIT_KINDS, COMPUTE_DTYPES, DEVICES, FLOAT_KINDS, FOUR_BIT_KINDS, METHODS,
                       OPTIMIZERS, WEIGHT_KINDS, ModelSettings, PeftSettings, PrecisionSettings, RunSettings,
                       Scenario, TrainingSettings, frozen_mapping, matches_target)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_SCENARIO_BYTES = 1 << 20
MAX_CONFIG_BYTES = 10 << 20
MAX_VARIANTS = 10_000
TOP_LEVEL_KEYS = ("name", "description", "model", "precision", "peft", "training", "run", "sweep")
SECTIONS = ("model", "precision", "peft", "training", "run")
MODEL_SOURCE_KEYS = ("preset", "config")


@dataclass(frozen=True)
class Key:
    """Schema of one key: kind ('int', 'float', 'bool', 'choice', 'str'), bounds, choices."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    lo_open: bool = False
    hi_open: bool = False

    def allowed(self) -> str:
        if self.kind == "choice":
            return " | ".join(str(c) for c in self.choices)
        if self.kind == "bool":
            return "true | false"
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        hi = "" if self.hi is None else f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        kind = "integer" if self.kind == "int" else "number"
        return " and ".join(x for x in (f"{kind} {lo}".strip(), hi) if x)


SCHEMA: dict[str, dict[str, Key]] = {
    "precision": {
        "weights": Key("choice", choices=WEIGHT_KINDS),
        "double_quant": Key("bool"),
        "compute_dtype": Key("choice", choices=COMPUTE_DTYPES),
        "quant_block_size": Key("choice", choices=(32, 64, 128, 256, 512, 1024, 2048, 4096)),
    },
    "peft": {
        "method": Key("choice", choices=METHODS),
        "r": Key("int", 1, 65536),
        "alpha": Key("float", 0, 1e6, lo_open=True),
        "dropout": Key("float", 0, 1, hi_open=True),
        "target_modules": Key("targets"),
        "num_virtual_tokens": Key("int", 1, 65536),
    },
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
    },
}
# which PEFT keys apply to which method (a key set for another method is "not applicable")
PEFT_KEYS_BY_METHOD = {
    "full": (), "lora": ("r", "alpha", "dropout", "target_modules"), "ia3": ("target_modules",),
    "prompt_tuning": ("num_virtual_tokens",), "prefix_tuning": ("num_virtual_tokens",),
}
MODEL_INT_MAX = 10_000_000


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _fmt(value) -> str:
    """A value as the user wrote it in TOML/JSON (true, "text", 3)."""
    if isinstance(value, (str, bool)) or value is None:
        return json.dumps(value)
    return repr(value)


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def check_value(key: Key, value) -> str | None:
    """Returns a problem message or None. Bools are not integers here; NaN and inf are rejected."""
    if key.kind == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {_fmt(value)}"
    if key.kind == "choice":
        return None if (value in key.choices and type(value) is type(key.choices[0])) else \
            f"unknown value {_fmt(value)}{_closest(str(value), map(str, key.choices))}"
    if key.kind == "str":
        return None if isinstance(value, str) else f"must be a string, got {_fmt(value)}"
    if key.kind in ("int", "float"):
        ok_type = isinstance(value, int) if key.kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            return f"must be {'an integer' if key.kind == 'int' else 'a number'}, got {_fmt(value)}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        if key.lo is not None and (value <= key.lo if key.lo_open else value < key.lo):
            return f"out of range: {value}"
        if key.hi is not None and (value >= key.hi if key.hi_open else value > key.hi):
            return f"out of range: {value}"
        return None
    if key.kind == "targets":
        if value == "all-linear":
            return None
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return None
        return f"must be \"all-linear\" or a non-empty list of module names, got {_fmt(value)}"
    if key.kind == "policy":
        if value in ("none", "full"):
            return None
        if isinstance(value, str) and value.startswith("every_") and value[6:].isdigit() and int(value[6:]) >= 1:
            return None
        return f"unknown value {_fmt(value)}"
    raise AssertionError(key.kind)


def _allowed(key: Key) -> str:
    if key.kind == "targets":
        return "\"all-linear\" or a list of module names"
    if key.kind == "policy":
        return "none | full | every_2 | every_4 ... (every k-th decoder layer)"
    return key.allowed()


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


@dataclass
class _Collector:
    file: str
    problems: list[Problem] = field(default_factory=list)

    def add(self, section, key, message, allowed=None, variant=None):
        self.problems.append(Problem(file=self.file, section=section, key=key, message=message, allowed=allowed,
                                     variant=variant))


def _check_model_keys(c: _Collector, model_type: str, given: dict, origin: str) -> dict:
    """Type-check architecture keys against the family schema; returns the checked ones."""
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
        if kind in ("int", "int?"):
            if value is None and kind == "int?":
                checked[key] = None
                continue
            msg = check_value(Key("int", 1, MODEL_INT_MAX), value)
        else:
            msg = check_value(Key({"bool": "bool", "float": "float", "str": "str"}[kind], 0, None, lo_open=True)
                              if kind == "float" else Key(kind), value)
        if msg:
            c.add("model", key if origin == "inline" else "config", msg if origin == "inline" else f"{origin}: {key} {msg}")
        else:
            checked[key] = value
    return checked


def _resolve_model(c: _Collector, raw: dict, base_dir: Path) -> ModelSettings | None:
    if not isinstance(raw, dict):
        c.add("model", None, "must be a table")
        return None
    known = MODEL_SOURCE_KEYS + tuple(arch_mod.ALL_MODEL_KEYS)
    for key in raw:
        if key not in known:
            c.add("model", key, f"unknown key{_closest(key, known)}", "preset, config, or HF architecture keys: "
                  + ", ".join(arch_mod.ALL_MODEL_KEYS))
    n_problems = len(c.problems)
    preset, config_file = raw.get("preset"), raw.get("config")
    base: dict = {}
    if preset is not None and config_file is not None:
        c.add("model", "config", "give either preset or config, not both")
    elif preset is not None:
        presets = model_presets()
        if not isinstance(preset, str) or preset not in presets:
            c.add("model", "preset", f"unknown preset {_fmt(preset)}{_closest(str(preset), presets)}",
                  ", ".join(presets))
        else:
            base = dict(presets[preset])
    elif config_file is not None:
        if not isinstance(config_file, str) or not config_file:
            c.add("model", "config", f"must be a path string, got {_fmt(config_file)}")
        else:
            path = (base_dir / config_file)
            try:
                loaded = json.loads(read_text_file(path, MAX_CONFIG_BYTES))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                c.add("model", "config", f"{config_file}: {e if 'JSON' not in type(e).__name__ else 'not valid JSON: ' + str(e)}")
                loaded = None
            except RecursionError:
                c.add("model", "config", f"{config_file}: JSON nested too deeply")
                loaded = None
            if loaded is not None and not isinstance(loaded, dict):
                c.add("model", "config", f"{config_file}: must hold a JSON object")
            elif loaded is not None:
                base = loaded
    elif "model_type" not in raw:
        c.add("model", None, "needs preset, config, or inline architecture keys with model_type",
              "preset = one of " + ", ".join(model_presets()))
        return None
    if len(c.problems) > n_problems:
        return None
    model_type = raw.get("model_type", base.get("model_type"))
    if base and "model_type" in raw and raw["model_type"] != base.get("model_type"):
        c.add("model", "model_type", f"{_fmt(raw['model_type'])} differs from the {'preset' if preset else 'config'}'s "
              f"{_fmt(base.get('model_type'))}")
        return None
    if model_type not in arch_mod.SUPPORTED_MODEL_TYPES:
        c.add("model", "model_type" if "model_type" in raw or not base else "config",
              f"unsupported model_type {_fmt(model_type)}", ", ".join(arch_mod.SUPPORTED_MODEL_TYPES))
        return None
    given = _check_model_keys(c, model_type, base, "preset" if preset else (config_file or "inline"))
    inline = {k: v for k, v in raw.items() if k not in MODEL_SOURCE_KEYS}
    given.update(_check_model_keys(c, model_type, inline, "inline"))
    missing = [k for k in arch_mod.required_keys(model_type) if k not in given]
    if missing:
        c.add("model", missing[0] if len(missing) == 1 else None, f"missing required architecture keys: "
              f"{', '.join(missing)}" + (f" (in {config_file})" if config_file else ""))
    if len(c.problems) > n_problems:
        return None
    resolved = arch_mod.resolve_keys(model_type, given)
    try:
        arch_mod.build_arch(resolved)
    except ValueError as e:
        c.add("model", None, str(e))
        return None
    return ModelSettings(preset=preset, config_file=str(config_file) if config_file else None,
                         config=frozen_mapping(resolved))


def _section(c: _Collector, raw: dict, name: str) -> dict:
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
            c.add(name, key, msg, _allowed(schema[key]))
        else:
            valid[key] = tuple(value) if isinstance(value, list) else value
    return valid


def _variant(c: _Collector, cond: _Collector, raw: dict, base_dir: Path, name: str, variant_name: str,
             overrides: tuple, model_cache: dict) -> Scenario | None:
    """Validate one variant. Problems in `c`; not-applicable keys (conditional problems) in `cond`."""
    n0 = len(c.problems)
    model_key = json.dumps(raw.get("model"), sort_keys=True, default=str)
    if model_key not in model_cache:
        mc = _Collector(c.file)
        model_cache[model_key] = (_resolve_model(mc, raw.get("model"), base_dir), mc.problems)
    model, model_problems = model_cache[model_key]
    c.problems.extend(model_problems)
    prec, peft, train, run = (_section(c, raw, s) for s in ("precision", "peft", "training", "run"))

    weights = prec.get("weights", PrecisionSettings.weights)
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

    if model is not None:
        a = model.arch
        targets = peft.get("target_modules")
        if isinstance(targets, tuple):
            paths = [s.path for s in a.layer_linears + a.model_linears]
            unknown = [t for t in targets if not any(matches_target(p, t) for p in paths)]
            if unknown:
                c.add("peft", "target_modules", f"{', '.join(map(_fmt, unknown))} not in {a.model_type} "
                      f"(its linear layers: {', '.join(a.linear_names)})", "\"all-linear\" or names from that list")
        seq = train.get("seq_len", TrainingSettings.seq_len)
        extra = peft.get("num_virtual_tokens", PeftSettings.num_virtual_tokens) if method == "prompt_tuning" else 0
        if seq + extra > a.max_positions:
            c.add("training", "seq_len", f"{seq}{f' + {extra} virtual tokens' if extra else ''} exceeds the "
                  f"model's max_position_embeddings {a.max_positions}", f"<= {a.max_positions - extra}")
        if method == "prompt_tuning" and a.embed_dim != a.hidden_size:
            c.add("peft", "method", f"peft sizes prompt embeddings by hidden_size {a.hidden_size}, but this "
                  f"model's word embeddings are {a.embed_dim} wide (word_embed_proj_dim)",
                  ", ".join(m for m in METHODS if m != "prompt_tuning"))
        if policy.startswith("every_") and int(policy[6:]) > a.n_layers:
            c.add("training", "gradient_checkpointing", f"{policy}: the model has only {a.n_layers} layers",
                  f"every_1 .. every_{a.n_layers}")
    if len(c.problems) > n0 or model is None:
        return None
    return Scenario(name=variant_name, scenario=name, description=str(raw.get("description", "")),
                    source=c.file, model=model, precision=PrecisionSettings(**prec), peft=PeftSettings(**peft),
                    training=TrainingSettings(**train), run=RunSettings(**run), overrides=overrides)


def _sweep_axes(c: _Collector, raw) -> list[tuple[str, list]]:
    if raw is None:
        return []
    if not isinstance(raw, dict):
        c.add("sweep", None, "must be a table of \"section.key\" = [values]")
        return []
    axes = []
    model_keys = MODEL_SOURCE_KEYS + tuple(arch_mod.ALL_MODEL_KEYS)
    for dotted, values in raw.items():
        section, _, key = dotted.partition(".")
        if isinstance(values, dict):  # sweep.peft.r = [...] parses as a nested table
            c.add("sweep", dotted, "quote dotted keys: \"section.key\" = [values]")
            continue
        if section not in SECTIONS:
            c.add("sweep", dotted, f"unknown section {section!r}", ", ".join(f"{s}.<key>" for s in SECTIONS))
            continue
        keys = model_keys if section == "model" else tuple(SCHEMA[section])
        if key not in keys:
            c.add("sweep", dotted, f"unknown key {key!r} in [{section}]{_closest(key, keys)}", ", ".join(keys))
            continue
        if not isinstance(values, list) or not values:
            c.add("sweep", dotted, f"must be a non-empty list of values, got {_fmt(values)}")
            continue
        axes.append((dotted, values))
    n = math.prod(len(v) for _, v in axes) if axes else 1
    if n > MAX_VARIANTS:
        c.add("sweep", None, f"expands to {n:,} variants", f"at most {MAX_VARIANTS:,}")
        return []
    return axes


def _value_label(value) -> str:
    if isinstance(value, list):
        return ",".join(map(_value_label, value))
    return json.dumps(value) if isinstance(value, bool) else str(value)


def load_scenario(path: str | os.PathLike) -> list[Scenario]:
    """Read one scenario file into its variants; raises UserError with every problem found."""
    path = Path(path)
    c = _Collector(str(path))
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
    name = raw.get("name", path.stem)
    for key in ("name", "description"):
        if key in raw and (not isinstance(raw[key], str) or (key == "name" and not raw[key].strip())):
            c.add(None, key, f"must be a non-empty string, got {_fmt(raw[key])}")
    if not isinstance(name, str) or not name.strip():
        name = path.stem
    axes = _sweep_axes(c, raw.get("sweep"))
    if c.problems:
        raise UserError(c.problems)

    base = {s: dict(raw[s]) if isinstance(raw.get(s), dict) else raw.get(s) for s in SECTIONS if s in raw}
    base["description"] = raw.get("description", "")
    combos = list(itertools.product(*[[(k, v) for v in values] for k, values in axes])) or [()]
    model_cache: dict = {}
    results: list[tuple[Scenario | None, list[Problem], list[Problem]]] = []
    names: list[str] = []
    for combo in combos:
        variant_raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        for dotted, value in combo:
            section, _, key = dotted.partition(".")
            if not isinstance(variant_raw.get(section, {}), dict):
                continue  # reported as "must be a table"
            variant_raw.setdefault(section, {})[key] = value
        vname = name + ("[" + ",".join(f"{k}={_value_label(v)}" for k, v in combo) + "]" if combo else "")
        vc, cond = _Collector(str(path)), _Collector(str(path))
        scenario = _variant(vc, cond, variant_raw, path.parent, name, vname, tuple(combo), model_cache)
        results.append((scenario, vc.problems, cond.problems))
        names.append(vname)
    _collect_problems(c, results, names)
    if c.problems:
        raise UserError(c.problems)
    out = []
    for scenario, _, cond in results:
        na = tuple(f"{p.section}.{p.key}" for p in cond)
        out.append(scenario if not na else _replace(scenario, not_applicable=na))
    return out


def _replace(scenario: Scenario, **changes) -> Scenario:
    import dataclasses

    return dataclasses.replace(scenario, **changes)


def _collect_problems(c: _Collector, results, names: list[str]) -> None:
    """A problem in every variant is reported once; one in some variants names them. A not-applicable
    key is an error only when it applies to no variant at all."""
    n = len(results)
    seen: dict[tuple, list[str]] = {}
    for (scenario, problems, _), vname in zip(results, names):
        for p in problems:
            seen.setdefault((p.section, p.key, p.message, p.allowed), []).append(vname)
    for (section, key, message, allowed), variants in seen.items():
        variant = None if len(variants) == n else ", ".join(variants[:3]) + (
            f" and {len(variants) - 3} more" if len(variants) > 3 else "")
        c.add(section, key, message, allowed, variant or None)
    cond_counts: dict[tuple, int] = {}
    for _, _, cond in results:
        for p in cond:
            cond_counts[(p.section, p.key, p.message)] = cond_counts.get((p.section, p.key, p.message), 0) + 1
    reported = set()
    for (section, key, message) in cond_counts:
        if (section, key) in reported:
            continue
        if all(any(p.section == section and p.key == key for p in cond) for _, _, cond in results):
            reported.add((section, key))
            c.add(section, key, message)


def load_scenarios(paths) -> list[Scenario]:
    """Load several files; problems of all files are reported together."""
    out, problems = [], []
    for p in paths:
        try:
            out.extend(load_scenario(p))
        except UserError as e:
            problems.extend(e.problems)
    if problems:
        raise UserError(problems)
    return out
