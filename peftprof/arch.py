"""Model architectures: Hugging Face config fields -> the shapes the estimator and runner need.

The families live in peftprof/families/ (one module each: config keys and defaults, linears, other
parameters, peft defaults, build quirks); this module is their common entry point. Defaults equal the
transformers config classes' defaults (tests build each family with transformers on the meta device and
compare). No torch import here: the estimator stays instant.
"""

from __future__ import annotations

from .families import REGISTRY, family
from .families.base import NULL_MEANS_OFF, Arch, LinearSpec, ParamSpec

__all__ = ["ALL_MODEL_KEYS", "FAMILY_KEYS", "SUPPORTED_MODEL_TYPES", "Arch", "LinearSpec", "ParamSpec",
           "analytic_gap", "build_arch", "family_fields", "required_keys", "resolve_keys"]

# key -> (kind, default). kind: "int" (>= 1), "int?" (int or null), "bool", "float" (> 0), "float?", "str"
FAMILY_KEYS: dict[str, dict[str, tuple[str, object]]] = {name: f.keys for name, f in REGISTRY.items()}
SUPPORTED_MODEL_TYPES = tuple(REGISTRY)
ALL_MODEL_KEYS = sorted({"model_type"} | {k for keys in FAMILY_KEYS.values() for k in keys})


def required_keys(model_type: str) -> list[str]:
    return list(family(model_type).required)


def resolve_keys(model_type: str, given: dict) -> dict:
    """Fill a family's defaults into `given` (already type-checked); returns the full config dict. A null given
    for a key of NULL_MEANS_OFF whose default is not null stays (transformers receives it: Gemma 2 without
    soft-capping, Mistral-Nemo without a sliding window), where leaving it out would let the config class's
    default apply instead; other nulls take the default."""
    out = {"model_type": model_type}
    for key, (_kind, default) in family(model_type).keys.items():
        if key in NULL_MEANS_OFF and key in given and given[key] is None:
            if default is not None:  # off, where the default is on (a null default needs no key)
                out[key] = None
            continue
        value = default if given.get(key) is None else given[key]
        if value is not None:
            out[key] = value
    return out


def family_fields(config: dict) -> dict:
    """The keys of a published config.json that its family reads (model_type included; nulls dropped, so the
    family's defaults apply). Unknown model types give {} (see analytic_gap)."""
    f = REGISTRY.get(config.get("model_type"))
    if f is None:
        return {}
    return {"model_type": f.name, **{k: v for k, v in config.items() if k in f.keys and v is not None}}


def build_arch(cfg: dict) -> Arch:
    """Derive shapes from a resolved config (see `resolve_keys`). Raises ValueError if inconsistent."""
    return family(cfg["model_type"]).build(cfg)


def analytic_gap(model_type: str) -> str | None:
    """Why the analytic estimator cannot answer for this model type (None: it can). The trace answers instead."""
    f = REGISTRY.get(model_type)
    if f is None:
        return (f"model_type {model_type!r} is not in the analytic estimator's families "
                f"({', '.join(name for name, g in REGISTRY.items() if g.analytic)})")
    if not f.analytic:
        return f"the analytic estimator does not model {model_type}'s saved tensors yet"
    return None
