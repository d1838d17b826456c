"""Catalogues: every preset's parameter count against the model transformers builds on the meta device."""

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from peftprof.arch import build_arch, resolve_keys
from peftprof.catalog import gpu, gpus, model_presets

REQUIRED_PRESETS = {"tiny-llama", "gpt2", "opt-350m", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b",
                    "llama-3.2-1b", "llama-3.2-3b", "mistral-7b", "qwen2.5-7b", "gemma-2b"}
REQUIRED_GPUS = {"T4", "L4", "A10G", "RTX-3090", "RTX-4090", "V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB",
                 "L40S", "H100-80GB", "H200"}
# Published parameter counts (model cards / HF hub safetensors metadata), as a second, external check.
PUBLISHED = {"tiny-llama": 19_548_416,  # shared/facts.md, measured
             "gpt2": 124_439_808, "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320,
             "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096}


def meta_model(config: dict):
    cfg = dict(config)
    conf = CONFIG_MAPPING[cfg.pop("model_type")](**cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf)


def test_catalogues_hold_the_required_entries():
    assert REQUIRED_PRESETS <= set(model_presets())
    assert REQUIRED_GPUS <= set(gpus())


@pytest.mark.parametrize("name", sorted(model_presets()))
def test_preset_parameter_count_matches_transformers(name):
    cfg = dict(model_presets()[name])
    resolved = resolve_keys(cfg.pop("model_type"), cfg)
    model = meta_model(resolved)
    n_real = sum(p.numel() for p in model.parameters())
    assert build_arch(resolved).n_params == n_real
    if name in PUBLISHED:
        assert n_real == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(model_presets()))
def test_preset_linear_shapes_match_transformers(name):
    cfg = dict(model_presets()[name])
    resolved = resolve_keys(cfg.pop("model_type"), cfg)
    arch = build_arch(resolved)
    model = meta_model(resolved)
    layer = model.base_model.layers[0] if hasattr(model.base_model, "layers") else (
        model.base_model.h[0] if hasattr(model.base_model, "h") else model.base_model.decoder.layers[0])
    for spec in arch.layer_linears:
        mod = layer.get_submodule(spec.path)
        w = mod.weight
        shape = (spec.out_features, spec.in_features) if type(mod).__name__ == "Linear" else (
            spec.in_features, spec.out_features)  # gpt2 Conv1D stores (in, out)
        assert tuple(w.shape) == shape, spec.path
        assert (mod.bias is not None) == spec.bias, spec.path


def test_gpu_lookup_is_exact_and_lists_the_catalogue():
    assert gpu("RTX-4090").memory_bytes == 24 * 2**30
    assert gpu("H100-80GB").bf16_tflops == 989.0  # datasheet: 1,979 sparse -> 989 dense
    with pytest.raises(ValueError, match=r"unknown GPU 'rtx-4090' \(allowed: T4, L4, A10G, RTX-3090"):
        gpu("rtx-4090")
