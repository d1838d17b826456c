"""Analytic memory model: pure functions of a resolved `Scenario`, bytes unless the name says otherwise.

Sources are cited per formula. "autograd" means the tensors PyTorch's autograd saves for backward
(derivatives.yaml); "transformers"/"peft"/"bitsandbytes" name the library file whose forward we model.
"""

from __future__ import annotations

import functools
import math

from ..arch import Arch, LinearSpec
from ..settings import BYTES_PER_ELEMENT, Scenario, matches_target
from . import adapter_saves, cuda, peft_methods
from . import xlora as xlora_model
from .moe import check_moe_analytic
from .widths import (  # noqa: F401  (re-exported: tests read them here)
    ADAPTER_BYTES_PER_ELEMENT,
    BNB_8BIT_BLOCK,
    BNB_8BIT_MIN_SIZE,
    BNB_PAGED_MIN_NUMEL,
    FP32,
    compute_bytes_per_element,
    non_quantized_bytes_per_element,
    trainable_bytes_per_element,
)


def quantized_linears(a: Arch) -> tuple[LinearSpec, ...]:
    """transformers' bitsandbytes integration replaces every nn.Linear/Conv1D except the output embedding
    (integrations/bitsandbytes.py replace_with_bnb_linear; get_keys_to_not_convert keeps lm_head)."""
    return a.layer_linears * a.n_layers + a.model_linears


def weight_bytes(s: Scenario) -> int:
    """Base weights in storage dtype: 4-bit packed 2 values/byte, int8 1 byte, biases and all
    non-linear parameters in `non_quantized_bytes_per_element` (QLoRA paper, Dettmers et al. 2023)."""
    a = s.model.arch
    p = s.precision
    if a.n_experts:  # the analytic estimate starts here: adapters on experts/router go to the trace (estimate/moe.py)
        check_moe_analytic(s)
    frozen = peft_methods.frozen_adapter_bytes(s) + adapter_saves.frozen_buffer_bytes(s)  # K adapters, VeRA, OFT
    frozen += xlora_model.expert_bytes(s)  # X-LoRA's K frozen experts (estimate/xlora.py)
    if not p.is_quantized:
        return a.n_params * BYTES_PER_ELEMENT[p.weights] + frozen
    linear_weights = sum(spec.n_weight_params for spec in quantized_linears(a))
    packed = sum(math.ceil(spec.n_weight_params / 2) for spec in quantized_linears(a)) if p.is_4bit else linear_weights
    return packed + (a.n_params - linear_weights) * non_quantized_bytes_per_element(s) + frozen


def quant_constant_bytes(s: Scenario) -> int:
    """bitsandbytes' constants (functional.py quantize_4bit / QuantState). 4-bit: fp32 absmax per block
    (0.5 bit/param at block 64) and the 16-entry fp32 NF4/FP4 code, per layer. Double quant: absmax as
    uint8, fp32 absmax per 256 of them, a fp32 offset, the 16-entry code, and a copy of the 256-entry fp32
    blockwise code per layer (quantize_blockwise: code.to(device, copy=True)): 0.127 bit/param (QLoRA
    paper, sec. 2). int4: see below. int8 (Linear8bitLt): a fp32 scale per output row (SCB)."""
    p = s.precision
    if not p.is_quantized:
        return 0
    total = 0
    for spec in quantized_linears(s.model.arch):
        n = spec.n_weight_params
        if p.weights == "int8":
            total += spec.out_features * FP32
            continue
        if p.weights == "int4":
            # optimum-quanto qint4: a scale and a shift per group, in the compute dtype
            total += 2 * n // quanto_group_size(spec.in_features, spec.out_features) * compute_bytes_per_element(s)
            continue
        n_blocks = math.ceil(n / p.quant_block_size)
        if p.double_quant:
            total += n_blocks + math.ceil(n_blocks / 256) * FP32 + FP32 + 16 * FP32 + 256 * FP32
        else:
            total += n_blocks * FP32 + 16 * FP32
    return total


def quanto_group_size(in_features: int, out_features: int) -> int:
    """optimum-quanto nn/qmodule.py: group 128, stepped down by 32 (not below 32) until it divides
    in_features; inputs of 128 or fewer (or no divisor found) get one group per output row."""
    g = 128
    if in_features > g:
        while in_features % g and g > 32:
            g -= 32
        if in_features % g == 0:
            return g
    return in_features


def trainable_tensors(s: Scenario) -> list[int]:
    """Element counts of every trainable tensor: the adapter's, then modules_to_save's full copies."""
    return list(_trainable_tensors(s.peft, s.model.arch)) + [n for n, _ in adapter_saves.saved_module_tensors(s)]


def trainable_tensor_widths(s: Scenario) -> list[tuple[int, int]]:
    """(elements, bytes per element) of every trainable tensor, as `trainable_tensors`: the adapter's in
    `adapter_saves.adapter_bytes_per_element` (fp32 but cat's combined adapter), modules_to_save's copies in their
    module's dtype (estimate/adapter_saves.py)."""
    width = adapter_saves.adapter_bytes_per_element(s) if s.peft.method != "full" else trainable_bytes_per_element(s)
    width = xlora_model.classifier_bytes_per_element(s) if s.peft.method == "xlora" else width  # model dtype
    return [(n, width) for n in _trainable_tensors(s.peft, s.model.arch)] + adapter_saves.saved_module_tensors(s)


@functools.lru_cache(maxsize=4096)  # sweeps re-ask for the same (peft, arch) pair many times
def _trainable_tensors(m, a) -> tuple[int, ...]:
    """Element counts of every trainable tensor, as peft creates them (LoRA A r x in and B out x r per
    targeted module; IA3 one vector per module, in_features for feed-forward ones, else out_features;
    prompt tuning n_virtual x hidden; prefix tuning n_virtual x n_layers*2*kv_dim; peft/tuners/*)."""
    if m.method == "xlora":  # the gating classifier (estimate/xlora.py)
        return xlora_model.classifier_tensors(m, a)
    modelled = peft_methods.trainable_tensors(m, a)  # newer methods and LoRA options
    if modelled is not None:
        return modelled
    if m.method == "full":
        return tuple(_all_parameter_tensors(a))
    if m.method == "lora":
        out = []
        for spec in m.targeted_linears(a):
            n_copies = a.n_layers if spec in a.layer_linears else 1
            out += [m.r * spec.in_features, spec.out_features * m.r] * n_copies
        return tuple(out)
    if m.method == "ia3":
        ff = m.feedforward_targets(a)
        out = []
        for spec in m.targeted_linears(a):
            is_ff = any(matches_target(spec.path, t) for t in ff)
            n_copies = a.n_layers if spec in a.layer_linears else 1
            out += [spec.in_features if is_ff else spec.out_features] * n_copies
        return tuple(out)
    if m.method == "prompt_tuning":
        return (m.num_virtual_tokens * a.hidden_size,)
    # prefix tuning: peft sizes keys/values by num_key_value_heads * head_dim (GQA aware)
    return (m.num_virtual_tokens * a.n_layers * 2 * a.n_kv_heads * a.head_dim,)


def _all_parameter_tensors(a: Arch) -> list[int]:
    out = [a.vocab_size * a.embed_dim]
    if a.n_position_embeddings:
        out.append(a.n_position_embeddings * a.hidden_size)
    norm_tensors = [a.hidden_size] * (2 if a.norm == "layer" else 1)
    for _ in range(a.n_layers):
        for spec in a.layer_linears:
            out.append(spec.n_weight_params)
            if spec.bias:
                out.append(spec.out_features)
        out += norm_tensors * a.n_norms_per_layer
        out += [p.numel for p in a.layer_params]  # q/k norms, routers, expert stacks (full fine-tuning trains them)
    for spec in a.model_linears:
        out.append(spec.n_weight_params)
    if a.final_norm:
        out += norm_tensors
    if not a.tied_embeddings:
        out.append(a.vocab_size * a.embed_dim)
    return out


def trainable_param_bytes(s: Scenario) -> int:
    """Adapter parameters; 0 for full fine-tuning (its weights are in `weight_bytes`)."""
    if s.peft.method == "full":
        return 0
    return sum(n * w for n, w in trainable_tensor_widths(s))


def gradient_bytes(s: Scenario) -> int:
    """One gradient per trainable parameter, in the parameter's dtype (torch autograd)."""
    return sum(n * w for n, w in trainable_tensor_widths(s))


def optimizer_state_bytes(s: Scenario, *, device: str = "cpu") -> tuple[int, int]:
    """(resident_bytes, paged_bytes). torch AdamW (optim/adamw.py): exp_avg and exp_avg_sq in the
    parameter's dtype plus a 0-dim fp32 `step` per tensor. bitsandbytes 8-bit (optim/optimizer.py):
    2 uint8 states + fp32 absmax per 256 values, fp32 states for tensors under 4096 values, and the two
    shared 256-entry fp32 quantization maps. 32-bit bnb states are fp32. Paged states live in CUDA
    unified memory (not in torch's allocator) when >= 1e5 values. SGD: torch default momentum 0 keeps
    no state. On CUDA the implementations differ: estimate/cuda.py."""
    opt = s.training.optimizer
    if opt == "sgd":
        return 0, 0
    tensors = trainable_tensors(s)
    if device == "cuda":

        if opt == "adamw":
            return sum(cuda.adamw_state_bytes([n], w) for n, w in trainable_tensor_widths(s)), 0
        return cuda.bnb_state_bytes(tensors, eight_bit=opt.endswith("8bit"), paged=opt.startswith("paged"))
    resident = paged = 0
    if opt == "adamw":
        return sum(2 * n * w for n, w in trainable_tensor_widths(s)) + FP32 * len(tensors), 0
    eight_bit = opt.endswith("8bit")
    for n in tensors:
        if eight_bit and n >= BNB_8BIT_MIN_SIZE:
            size = 2 * n + 2 * math.ceil(n / BNB_8BIT_BLOCK) * FP32
            state_numel = n
        else:
            size = 2 * n * FP32
            state_numel = n
        if opt.startswith("paged") and device == "cuda" and state_numel >= BNB_PAGED_MIN_NUMEL:
            paged += size
        else:
            resident += size
    if eight_bit and any(n >= BNB_8BIT_MIN_SIZE for n in tensors):
        resident += 2 * 256 * FP32
    return resident, paged


def embedding_gradient_bytes(s: Scenario) -> int:
    """Gradient of the input embedding when trained (full fine-tuning) and not tied to lm_head: autograd
    computes it last, after every layer's backward."""
    a = s.model.arch
    if s.peft.method != "full" or a.tied_embeddings:
        return 0
    return a.vocab_size * a.embed_dim * trainable_bytes_per_element(s)


def optimizer_temporary_bytes(s: Scenario, *, device: str = "cpu") -> int:
    """Transients of one optimizer step. torch's single-tensor AdamW (the CPU default, optim/adam.py
    _single_tensor_adam l. 544) computes denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): two
    parameter-sized temporaries for the largest tensor (measured on CPU). On CUDA the foreach implementation
    (estimate/cuda.py). bitsandbytes updates in place in its kernels; SGD without momentum adds the gradient
    in place (optim/sgd.py _single_tensor_sgd / _multi_tensor_sgd)."""
    if s.training.optimizer != "adamw":
        return 0
    if device == "cuda":

        return sum(cuda.adamw_temporary_bytes([n], w) for n, w in trainable_tensor_widths(s))
    return 2 * max((n * w for n, w in trainable_tensor_widths(s)), default=0)


def embedding_weight_elements(s: Scenario) -> int:
    return s.model.arch.vocab_size * s.model.arch.embed_dim
