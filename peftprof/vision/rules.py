"""The loader's rules for image classifiers (called from scenario.py `_variant` beside the other rules): what
applies to a vision model and what the libraries (or peftprof) refuse there. `check` sees the valid keys of every
section of one variant as mutable dicts (problems in `c`; keys that do not apply go to `cond` and are dropped).

A target name that is neither a Linear nor a Conv2d of the model (a conv name on a text model, an unknown conv
name on a vision model) is refused by the loader's target check, which lists the model's adaptable layers."""

from __future__ import annotations

from ..schema import Collector
from ..settings import FLOAT_KINDS, matches_target
from . import is_vision

VISION_METHODS = ("lora", "full")


def check(c: Collector, cond: Collector, parts, model) -> None:
    if model is None or not is_vision(model.config["model_type"]):
        return
    a = model.arch
    mt = a.model_type
    method = parts.peft.get("method", "lora")
    if method in ("prompt_tuning", "prefix_tuning"):
        c.add("peft", "method", f"{method} prepends virtual tokens to a text model's token embeddings (or its "
              f"attention keys and values); {mt} is an image classifier", " | ".join(VISION_METHODS))
    elif method not in VISION_METHODS:
        c.add("peft", "method", f"{method} on an image classifier ({mt}) is not supported yet",
              " | ".join(VISION_METHODS))
    weights = parts.prec.get("weights", "bf16")
    if weights not in FLOAT_KINDS:
        c.add("precision", "weights", f"{weights} on an image classifier ({mt}) is not supported: bitsandbytes and "
              "quanto quantize Linear layers only, not the convolutions", " | ".join(FLOAT_KINDS))
    if parts.prec.get("autocast", "none") != "none":
        c.add("precision", "autocast", f"autocast on an image classifier ({mt}) is not supported yet", "none")
    # one sample is one image: seq_len does not apply; 1 keeps "tokens" per step = images per step
    if "seq_len" in parts.train:
        cond.add("training", "seq_len", f"does not apply to an image classifier ({mt}: its batch is batch_size "
                 "images of num_channels x image_size x image_size, set in [model])")
    parts.train["seq_len"] = 1
    if mt == "resnet":
        if "attention" in parts.train:
            cond.add("training", "attention", "does not apply to resnet (no attention layers)")
            parts.train.pop("attention")
        if parts.train.get("gradient_checkpointing", "none") != "none":
            c.add("training", "gradient_checkpointing", "transformers does not support gradient checkpointing for "
                  "resnet (ResNetPreTrainedModel has no checkpointed layers)", "none")
    if parts.peft.get("num_adapters", 1) > 1 or parts.peft.get("target_parameters"):
        key = "num_adapters" if parts.peft.get("num_adapters", 1) > 1 else "target_parameters"
        c.add("peft", key, f"not supported on an image classifier ({mt}) yet")
    if parts.dist.get("world_size", 1) > 1:
        c.add("distributed", "world_size", f"distributed training of an image classifier ({mt}) is not supported "
              "yet", "1")
    if parts.inf.get("enabled", False):
        c.add("inference", "enabled", f"inference on an image classifier ({mt}) is not supported yet", "false")
    r = parts.peft.get("r", 8)
    targets = parts.peft.get("target_modules")
    if method == "lora" and isinstance(targets, tuple):
        # peft/tuners/lora/layer.py _ConvNd: LoRA's B conv takes the base conv's groups, so r % groups must be 0
        grouped = [cv for cv in a.convs if cv.groups > 1 and r % cv.groups
                   and any(matches_target(cv.path, t) for t in targets)]
        if grouped:
            c.add("peft", "r", f"peft's LoRA on a grouped Conv2d needs r divisible by its groups ({grouped[0].path}: "
                  f"groups {grouped[0].groups})", f"a multiple of {grouped[0].groups}")
