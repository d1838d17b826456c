"""The model-family registry: model_type -> Family (one small module each). Exact-name lookups; an unknown
name lists the known ones. A decoder-only causal LM outside the registry still runs through the trace
estimator and the runner (transformers builds it from its config); see `generic`."""

from __future__ import annotations

from . import gemma, gemma2, gemma3_text, gpt2, llama, mistral, mixtral, opt, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe
from .base import Arch, Family, LinearSpec, ParamSpec

__all__ = ["REGISTRY", "Arch", "Family", "LinearSpec", "ParamSpec", "family", "hub_rewrite"]

REGISTRY: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (
    llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, gpt2, opt, mixtral, qwen2_moe, qwen3_moe)}

# published model_types whose config.json holds a registry family's config elsewhere (multimodal wrappers)
HUB_REWRITES = {"gemma3": gemma3_text.from_hub}


def family(name: str) -> Family:
    if name not in REGISTRY:
        raise ValueError(f"unknown model family {name!r} (allowed: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def hub_rewrite(config: dict) -> dict:
    """A published config.json in the form a family reads (e.g. a gemma3 wrapper -> its gemma3_text part)."""
    rewrite = HUB_REWRITES.get(config.get("model_type"))
    return rewrite(config) if rewrite else config
