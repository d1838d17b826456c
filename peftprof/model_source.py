"""Where a scenario's model comes from ([model]: a preset, a config.json, a hub id or inline keys) and its
architecture keys checked against its family's schema; scenario.py calls these with its Collector."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from . import arch as arch_mod
from . import hub as hub_mod
from .activations_known import ACT_KEYS, KNOWN_ACTIVATIONS
from .catalog import model_presets
from .errors import clean, show
from .families import ANY_CAUSAL_LM, REGISTRY, generic, hub_rewrite
from .schema import Collector, Key, check_value
from .settings import ModelSettings, frozen_mapping
from .sweep import closest

MAX_CONFIG_BYTES = 10 << 20
MODEL_SOURCE_KEYS = ("preset", "config", "hub", "revision")
SOURCES = ("preset", "config", "hub")  # where a model comes from: exactly one of them (or inline keys alone)
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


def read_config_file(c: Collector, config_file, base_dir: Path) -> dict | None:
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
        loaded = read_config_file(c, raw["config"], base_dir)
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


def resolve_model(c: Collector, raw: dict, base_dir: Path) -> ModelSettings | None:
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
