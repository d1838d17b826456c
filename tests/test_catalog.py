"""Catalogues: every preset's parameter count against the model transformers builds on the meta device."""

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from peftprof.arch import build_arch, resolve_keys
from peftprof.catalog import gpu, gpus, model_presets

REQUIRED_PRESETS = {"tiny-llama", "gpt2", "opt-350m", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b",
                    "llama-3.2-1b", "llama-3.2-3b", "mistral-7b", "qwen2.5-7b", "gemma-2b",
                    # what people fine-tune now (issue #14)
                    "llama-3.1-8b", "llama-3.1-70b", "llama-3.3-70b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b",
                    "qwen3-8b", "qwen3-14b", "qwen3-32b", "qwen3-30b-a3b", "gemma-2-9b", "gemma-2-27b", "gemma-3-4b",
                    "gemma-3-12b", "gemma-3-27b", "phi-3.5-mini", "phi-4", "mistral-nemo-12b", "mixtral-8x7b"}
REQUIRED_GPUS = {"T4", "L4", "A10G", "RTX-3090", "RTX-4090", "V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB",
                 "L40S", "H100-80GB", "H200"}
# Published parameter counts (model cards / HF hub safetensors metadata), as a second, external check.
PUBLISHED = {"tiny-llama": 19_548_416,  # shared/facts.md, measured
             "gpt2": 124_439_808, "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320,
             "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
             "llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496, "llama-3.3-70b": 70_553_706_496,
             "qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664, "qwen2.5-32b": 32_763_876_352,
             "qwen2.5-72b": 72_706_203_648, "qwen3-8b": 8_190_735_360, "qwen3-14b": 14_768_307_200,
             "qwen3-32b": 32_762_123_264, "qwen3-30b-a3b": 30_532_122_624, "gemma-2-9b": 9_241_705_984,
             "gemma-2-27b": 27_227_128_320, "phi-3.5-mini": 3_821_079_552, "phi-4": 14_659_507_200,
             "mistral-nemo-12b": 12_247_782_400, "mixtral-8x7b": 46_702_792_704}
# The Gemma 3 presets are the text models of multimodal checkpoints: their published totals (text + vision
# tower) are checked in tests/test_families.py. Published active parameters of the MoE presets (model cards:
# "12.9B active", "3.3B activated"), to the 0.1B they are quoted with (rounded or cut).
PUBLISHED_ACTIVE_B = {"mixtral-8x7b": 12.9, "qwen3-30b-a3b": 3.3}


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


def test_every_preset_but_the_tiny_ones_has_a_published_count():
    assert set(model_presets()) - set(PUBLISHED) == {"opt-350m", "llama-2-70b", "llama-3.2-1b", "llama-3.2-3b",
                                                     "gemma-2b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b"}


@pytest.mark.parametrize("name", sorted(PUBLISHED_ACTIVE_B))
def test_moe_presets_active_parameters_match_the_published_figure(name):
    cfg = dict(model_presets()[name])
    arch = build_arch(resolve_keys(cfg.pop("model_type"), cfg))
    assert abs(arch.n_active_params / 1e9 - PUBLISHED_ACTIVE_B[name]) < 0.06  # 12.88 -> 12.9, 3.35 -> 3.3
    assert arch.n_active_params < arch.n_params


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
    for param in arch.layer_params:  # q/k norms, routers, expert stacks
        assert tuple(layer.get_parameter(param.path).shape) == param.shape, param.path


def test_gpu_lookup_is_exact_and_lists_the_catalogue():
    assert gpu("RTX-4090").memory_bytes == 24 * 2**30
    assert gpu("H100-80GB").bf16_tflops == 989.0  # datasheet: 1,979 sparse -> 989 dense
    with pytest.raises(ValueError, match=r"unknown GPU 'rtx-4090' \(allowed: T4, L4, A10G, RTX-3090"):
        gpu("rtx-4090")


def test_presets_command_shows_total_and_active_parameters():
    import json

    from click.testing import CliRunner

    from peftprof.cli import cli

    data = json.loads(CliRunner().invoke(cli, ["presets", "--format", "json"]).output)
    rows = {m["name"]: m for m in data["models"]}
    assert (rows["mixtral-8x7b"]["n_params"], rows["mixtral-8x7b"]["n_active_params"]) == (46_702_792_704,
                                                                                          12_879_925_248)
    assert rows["mixtral-8x7b"]["n_experts"] == 8 and rows["mixtral-8x7b"]["experts_per_token"] == 2
    assert rows["qwen3-8b"]["n_active_params"] == rows["qwen3-8b"]["n_params"]
    table = CliRunner().invoke(cli, ["presets"]).output
    line = next(x for x in table.splitlines() if x.startswith("qwen3-30b-a3b "))
    assert "30,532,122,624" in line and "3,353,032,704" in line and "8 of 128" in line
