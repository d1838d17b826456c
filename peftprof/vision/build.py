"""The vision model and its synthetic batch, for the runner and the trace (run/build.py and run/step.py branch
here): AutoModelForImageClassification from the config with random weights, peft's LoRA without a task type
(peft's PeftModel: the model's own forward and loss), random images and labels."""

from __future__ import annotations

import torch

from ..settings import Scenario


def hf_config(s: Scenario):
    """transformers config object from the resolved fields (lists for ResNet's stage sizes); ViT gets the
    scenario's attention implementation, ResNet has no attention."""
    from transformers import CONFIG_MAPPING

    fields = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in s.model.config.items()}
    conf = CONFIG_MAPPING[fields.pop("model_type")](**fields)
    if conf.model_type == "vit":
        conf._attn_implementation = s.training.attention
    return conf


def base_model(s: Scenario, device: str, dtype: torch.dtype):
    """ViTForImageClassification / ResNetForImageClassification with random weights on `device`."""
    from transformers import AutoModelForImageClassification

    with torch.device(device):
        return AutoModelForImageClassification.from_config(hf_config(s), dtype=dtype)


def peft_task_type(s: Scenario):
    """No task type: peft wraps the classifier in a plain PeftModel, whose forward is the model's own
    (peft/peft_model.py PeftModel.forward); "all-linear" then includes the classifier (peft's
    _maybe_include_all_linear_layers excludes a head only for causal LMs' output embeddings and SEQ_CLS)."""
    return None


def synthetic_batch(s: Scenario, device: str, generator: torch.Generator | None) -> dict:
    """batch_size random images (num_channels x image_size x image_size, standard normal, in the weights'
    dtype as an image processor's output is cast) and random class labels. Under FakeTensorMode (the trace)
    pass generator=None."""
    a = s.model.arch
    b = s.training.batch_size
    shape = (b, a.num_channels, a.image_size, a.image_size)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.precision.weights, torch.float32)
    pixels = torch.randn(shape, generator=generator, dtype=dtype) if generator is not None else \
        torch.randn(shape, dtype=dtype)
    labels = torch.randint(0, a.num_labels, (b,), generator=generator) if generator is not None else \
        torch.randint(0, a.num_labels, (b,))
    return {"pixel_values": pixels.to(device), "labels": labels.to(device)}
