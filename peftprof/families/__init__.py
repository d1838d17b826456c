"""The model-family registry: model_type -> Family (one small module each). Exact-name lookups; an unknown
name lists the known ones. A decoder-only causal LM outside the registry still runs through the trace
estimator and the runner (transformers builds it from its config); see `generic`."""

from __future__ import annotations

from ..vision.families import families as vision_families
from . import gemma, gemma2, gemma3_text, gpt2, llama, mistral, mixtral, opt, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe
from .base import Arch, Family, LinearSpec, ParamSpec

__all__ = ["REGISTRY", "Arch", "Family", "LinearSpec", "ParamSpec", "family", "hub_rewrite"]

REGISTRY: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (
    llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, gpt2, opt, mixtral, qwen2_moe, qwen3_moe)}
REGISTRY.update((f.name, f) for f in vision_families())  # image classifiers: peftprof/vision/

# published model_types whose config.json holds a registry family's config elsewhere (multimodal wrappers)
HUB_REWRITES = {"gemma3": gemma3_text.from_hub}


def family(name: str) -> Family:
    """The registry's family, else the generic one of a transformers causal LM (imports transformers)."""
    if name in REGISTRY:
        return REGISTRY[name]
    from . import generic

    try:
        return generic.family(name)
    except ValueError as e:
        raise ValueError(f"unknown model family {name!r} (allowed: {', '.join(REGISTRY)}, or {ANY_CAUSAL_LM}): "
                         f"{e}") from None


ANY_CAUSAL_LM = "any decoder-only causal LM model_type of transformers"


def hub_rewrite(config: dict) -> dict:
    """A published config.json in the form a family reads (e.g. a gemma3 wrapper -> its gemma3_text part)."""
    rewrite = HUB_REWRITES.get(config.get("model_type"))
    return rewrite(config) if rewrite else config
