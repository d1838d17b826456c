"""Vision models (image classification) built from a transformers config with random weights, LoRA on their
Conv2d and Linear layers as peft applies it: shapes (arch.py), registry entries (families.py), the model and its
synthetic batch (build.py), the analytic estimate (estimate.py) and the loader's rules (rules.py). The decoder-only
pipeline branches here in one place each, on `is_vision`. No torch import at this level."""

from __future__ import annotations

VISION_TYPES = ("vit", "resnet")


def is_vision(s_or_model_type) -> bool:
    """Whether a scenario (or a model_type) is an image classifier of this package."""
    model_type = s_or_model_type if isinstance(s_or_model_type, str) else s_or_model_type.model.config["model_type"]
    return model_type in VISION_TYPES
