"""Build the real training stack for a variant: transformers model from config (random weights, nothing
downloaded), bitsandbytes / optimum-quanto quantization, peft adapter, checkpointing policy, optimizer.

The runner and the trace estimator share this code.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

from ..settings import ADAPTER_METHODS, Scenario
from ..vision import build as vision_build
from ..vision import is_vision

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Built:
    """The model, its optimizer and what the checks need."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    quant_tensors: list[torch.Tensor] = field(default_factory=list)  # bnb quant_state tensors (not parameters)
    quantization_error: float | None = None  # relative Frobenius norm of W - dequant(quant(W)), first layer
    base_bytes: int = 0  # after the base model is built (weights + quantization constants)
    wrapped_bytes: int = 0  # after the PEFT wrap
    scaler: object = None  # torch.amp.GradScaler under fp16 autocast (run/step.py grad_scaler), made on first use
    # dtypes of the trainable parameters, e.g. ["float32"] for adapters: peft's autocast_adapter_dtype=True (its
    # default, kept) upcasts fp16/bf16 adapters to fp32, so they stay fp32 under autocast too
    trainable_dtypes: list[str] = field(default_factory=list)


def hf_config(s: Scenario):
    """transformers config object from the resolved fields; never trust_remote_code, never the hub."""
    from transformers import CONFIG_MAPPING

    fields = dict(s.model.config)
    conf = CONFIG_MAPPING[fields.pop("model_type")](**fields)
    conf.use_cache = False
    conf._attn_implementation = s.training.attention
    return conf


def quantizable_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """Every nn.Linear / Conv1D except the output embedding, as transformers' bitsandbytes integration
    chooses them (integrations/bitsandbytes.py replace_with_bnb_linear, get_keys_to_not_convert)."""
    from transformers.pytorch_utils import Conv1D

    out_emb = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules()
            if (type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and m is not out_emb]


def _rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w, w_hat = w.float(), w_hat.float()
    return float((w - w_hat).norm() / w.norm())


def pin_bnb_cpu_dequantize_fallback(enabled: bool) -> bool | None:
    """bitsandbytes' CPU 4-bit dequantize branches on the CPU: with AVX512 and a block size >= 2048 it
    takes a pure-torch fallback (backends/cpu/ops.py dequantize_4bit: `_has_avx512 and blocksize >= 2048`,
    because its AVX512 kernel is inexact there) that allocates an int32 and two fp32 copies of the weight;
    elsewhere the native kernel allocates only the output, as the CUDA kernel does. The module flag is read
    on every call, so it can be pinned: the runner profiles with the native path on every CPU (allocations
    as on CUDA, the same on every machine) and computes the quantization error with the exact fallback.
    Returns the previous setting (None: this bitsandbytes has no such branch)."""
    try:
        from bitsandbytes.backends.cpu import ops
    except ImportError:
        return None
    before = getattr(ops, "_has_avx512", None)
    if before is not None:
        ops._has_avx512 = enabled
    return before


@contextlib.contextmanager
def bnb_cpu_dequantize_fallback(enabled: bool):
    before = pin_bnb_cpu_dequantize_fallback(enabled)
    try:
        yield
    finally:
        if before is not None:
            pin_bnb_cpu_dequantize_fallback(before)


def quantize_bnb(model, s: Scenario, device: str) -> tuple[list[torch.Tensor], float | None]:
    """Swap linears for bitsandbytes Linear4bit (nf4/fp4, block size, double quant) or Linear8bitLt;
    quantization happens on `.to(device)`. Returns the quant_state tensors and the first layer's error."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    p = s.precision
    compute = TORCH_DTYPES[p.compute_dtype]
    quant_tensors: list[torch.Tensor] = []
    error = None
    for name, mod in quantizable_linears(model):
        w = mod.weight.data.t() if isinstance(mod, Conv1D) else mod.weight.data  # Conv1D stores (in, out)
        out_f, in_f = w.shape
        bias = mod.bias is not None
        if p.weights == "int8":
            new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, device="meta")
            new.weight = bnb.nn.Int8Params(w.contiguous().to(torch.float16), requires_grad=False,
                                           has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute, compress_statistics=p.double_quant,
                                    quant_type=p.weights, device="meta")
            new.weight = bnb.nn.Params4bit(w.contiguous().to(compute), requires_grad=False, blocksize=p.quant_block_size,
                                           compress_statistics=p.double_quant, quant_type=p.weights)
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for good into a CPU-only inference
            # layout the first time the layer runs in eval mode on an input without grad (nn/modules.py
            # Linear4bit.forward -> _convert_weight_packed_for_cpu); the runner's checks do exactly that.
            # Profiling measures the training layout that CUDA uses, so keep every CPU on it.
            new.support_avx512bf16_for_cpu = False
        if bias:
            new.bias = torch.nn.Parameter(mod.bias.data.to(compute), requires_grad=False)
        new = new.to(device)
        if error is None:
            if p.weights == "int8":
                w_hat = new.weight.data.float() * new.weight.SCB.float().unsqueeze(1) / 127
            else:
                with bnb_cpu_dequantize_fallback(True):  # the exact pure-torch path on every CPU (see below)
                    w_hat = bnb.functional.dequantize_4bit(new.weight.data, new.weight.quant_state)
            error = _rel_error(w.to(device), w_hat)
        if p.weights != "int8":
            qs = new.weight.quant_state
            quant_tensors += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
        else:
            quant_tensors.append(new.weight.SCB)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.is_loaded_in_8bit = p.weights == "int8"
    model.is_loaded_in_4bit = p.weights != "int8"
    return quant_tensors, error


def quantize_int4(model, s: Scenario) -> float | None:
    """Uniform integer 4-bit grid through optimum-quanto (qint4, group-wise scale and shift)."""
    from optimum.quanto import freeze, qint4, quantize

    first_name, first = quantizable_linears(model)[0]
    w = first.weight.data.clone()
    out_emb = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    quantize(model, weights=qint4, exclude=out_emb)
    freeze(model)
    return _rel_error(w, model.get_submodule(first_name).weight.dequantize())


def prepare_quanto_for_training(model) -> None:
    """Freeze the base. Unlike peft's prepare_model_for_kbit_training (which would try to cast quanto's
    QTensors, refused: "The dtype of a WeightQBitsTensor cannot be changed"), nothing is upcast: quanto's
    QLinear does not cast its input to the weight dtype, so the hidden stream stays in the compute dtype."""
    for param in model.parameters():
        param.requires_grad_(False)


def quanto_constants(model) -> list[torch.Tensor]:
    """Scale/shift tensors inside quanto's QBits weights (counted as quantization constants)."""
    from optimum.quanto import QTensor

    out = []
    for param in model.parameters():
        if isinstance(param, QTensor) or isinstance(param.data, QTensor):
            w = param if isinstance(param, QTensor) else param.data
            attrs, _ = w.__tensor_flatten__()
            out += [getattr(w, a) for a in attrs if a != "_data"]
    return out


def _peft_config(s: Scenario):
    """The peft config of the variant's method. LoHa/LoKr/VeRA/OFT take peft's own defaults for everything the
    scenario does not set (peft/tuners/{loha,lokr,vera,oft}/config.py, peft 0.21.2); OFT's `r` is peft's
    number of blocks per layer (oft_block_size then 0: peft takes exactly one of the two)."""
    import peft

    m = s.peft
    a = s.model.arch
    task = None if is_vision(s) else peft.TaskType.CAUSAL_LM  # image classifiers: peftprof/vision/build.py
    adapts = m.method in ADAPTER_METHODS  # prompt/prefix tuning target no modules (phi3 has no peft default)
    targets = "all-linear" if m.target_modules == "all-linear" else list(m.targets(a)) if adapts else None
    saved = list(m.modules_to_save) or None
    if m.method == "lora":
        return peft.LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules=targets, task_type=task,
                               use_dora=m.use_dora, use_rslora=m.use_rslora, modules_to_save=saved,
                               target_parameters=list(m.target_parameters) or None)
    if m.method == "loha":
        return peft.LoHaConfig(r=m.r, alpha=m.alpha, target_modules=targets, modules_to_save=saved, task_type=task)
    if m.method == "lokr":
        return peft.LoKrConfig(r=m.r, alpha=m.alpha, target_modules=targets, modules_to_save=saved, task_type=task)
    if m.method == "vera":
        return peft.VeraConfig(r=m.r, vera_dropout=m.dropout, target_modules=targets, modules_to_save=saved,
                               task_type=task)
    if m.method == "oft":
        return peft.OFTConfig(r=m.r, oft_block_size=0, target_modules=targets, modules_to_save=saved, task_type=task)
    if m.method == "ia3":
        return peft.IA3Config(target_modules=list(m.targets(a)), feedforward_modules=list(m.feedforward_targets(a)),
                              task_type=task)
    if m.method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=m.num_virtual_tokens, task_type=task)
    return peft.PrefixTuningConfig(num_virtual_tokens=m.num_virtual_tokens, task_type=task)


def make_optimizer(s: Scenario, params) -> torch.optim.Optimizer:
    """torch AdamW / SGD (momentum 0, torch's default) or bitsandbytes' 8-bit and paged AdamW."""
    params = [p for p in params if p.requires_grad]
    opt = s.training.optimizer
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[opt]
    return cls(params, lr=1e-4)


def apply_checkpointing(model, s: Scenario) -> None:
    """transformers' activation checkpointing, non-reentrant, on every k-th decoder layer (layers 0, k, 2k...):
    `every_n_layers` on transformers that have it (modeling_utils.py _set_gradient_checkpointing), the same
    per-layer flags set by hand on older ones."""
    k = s.training.checkpoint_every
    if not k:
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=k)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    from transformers.modeling_layers import GradientCheckpointingLayer

    for i, layer in enumerate(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        layer.gradient_checkpointing = i % k == 0


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors`."""
    from .track import storages_of

    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        for st in storages_of(t):
            key = (st.data_ptr(), st.nbytes()) if st.device.type != "meta" and st.data_ptr() else id(st)
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
    return total


def model_bytes(model, extra=()) -> int:
    return tensor_bytes(list(model.parameters()) + list(model.buffers()) + list(extra))


def base_model(s: Scenario, device: str):
    """transformers model from config with random weights on `device` ('cpu', 'cuda' or 'meta'), in the
    weights dtype (the compute dtype for quantized kinds, which are quantized from it)."""
    from transformers import AutoModelForCausalLM

    p = s.precision
    dtype = TORCH_DTYPES[p.weights] if not p.is_quantized else TORCH_DTYPES[p.compute_dtype]
    if is_vision(s):  # image classifiers (AutoModelForImageClassification): peftprof/vision/build.py
        return vision_build.base_model(s, device, dtype)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config(s), dtype=dtype)


def adapt(model, s: Scenario):
    """What follows quantization, shared by the runner and the trace: k-bit preparation, the
    checkpointing policy, and the PEFT wrap (or every parameter trainable for full fine-tuning)."""
    import peft

    p = s.precision
    if p.weights == "int4":
        prepare_quanto_for_training(model)
    elif p.is_quantized:
        # upcasts the non-quantized parameters to fp32 and freezes the base (peft/utils/other.py)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    apply_checkpointing(model, s)
    if s.peft.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    on_meta = next(model.parameters()).device.type == "meta"  # the trace builds on meta (peftprof/trace.py)
    if on_meta and s.peft.use_dora and p.is_quantized:
        from ..errors import UserError

        raise UserError(f"{s.name}: --method trace cannot build DoRA on {p.weights} weights: peft dequantizes the "
                        "real bitsandbytes weight (utils/integrations.py dequantize_module_weight), which the "
                        "trace's stand-ins do not hold; --method analytic answers")
    if s.peft.method == "xlora":  # K frozen LoRA experts and a trained gating classifier (run/xlora.py)
        from .xlora import wrap_xlora

        return wrap_xlora(model, s)
    model = peft.get_peft_model(model, _peft_config(s))
    for i in range(1, s.peft.num_adapters):
        # K-1 more adapters of the same config, resident but neither active nor trained: peft's add_adapter
        # leaves the active adapter as it is and its set_adapter freezes the others (peft_model.py add_adapter)
        model.add_adapter(f"resident_{i}", _peft_config(s))
    if s.peft.combination == "svd" and on_meta:
        from ..errors import UserError

        raise UserError(f"{s.name}: --method trace cannot see the in x in SVD factor peft's svd merge keeps behind "
                        "each combined lora_A (a view, estimate/peft_methods.py svd_factor_excess_bytes): its stand-in "
                        "parameters hold their own shape only; --method analytic answers")
    if s.peft.combination != "none":
        # the static merge: a new adapter from the K, weights 1/K (peft tuners/lora/model.py add_weighted_adapter,
        # which builds it frozen); set_adapter makes it the one trained and freezes the K
        names = list(model.peft_config)
        model.add_weighted_adapter(adapters=names, weights=[1 / len(names)] * len(names), adapter_name="combined",
                                   combination_type=s.peft.combination)
        model.set_adapter("combined")
        if on_meta and s.peft.combination == "cat":
            _cast_combined_like_peft(model)
    if s.peft.method in ("loha", "lokr") and on_meta:
        _decide_module_dropout_on_fake_tensors(model)
    return model


def _cast_combined_like_peft(model) -> None:
    """On a real device peft creates the combined adapter in its base layer's float dtype (tuners_utils.py
    _move_adapter_to_device_of_base_layer; bnb 4-bit: its compute_dtype) and add_weighted_adapter does not upcast
    it: cat fills it in place and keeps that dtype (bf16 on a bf16 or nf4 base, measured); linear and svd replace
    its data with fp32 tensors. On meta peft skips that move, so the trace makes it here (cat only)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and "combined" in module.lora_A:
            _, dtype = module._get_base_layer_device_and_dtype(module.get_base_layer())
            if dtype is not None and dtype.is_floating_point:
                for layer in (module.lora_A["combined"], module.lora_B["combined"]):
                    layer.weight.data = layer.weight.data.to(dtype)


class _NoModuleDropout(float):
    """module_dropout 0.0 for the trace. LoHa/LoKr decide per call whether to skip the adapter with
    `torch.rand(1) > module_dropout` (peft/tuners/loha/layer.py, lokr/layer.py forward): a fake tensor cannot
    answer that data-dependent `if`. At 0.0 a real run always keeps the adapter (but for a draw of exactly 0,
    2^-24), so the comparison answers True, as it does there; only the 4-byte draw is not made."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        import torch

        if func is torch.Tensor.gt or getattr(func, "__name__", "") == "gt":
            return True
        return NotImplemented


def _decide_module_dropout_on_fake_tensors(model) -> None:
    for module in model.modules():
        rates = getattr(module, "module_dropout", None)
        if isinstance(rates, dict):
            for name, rate in rates.items():
                if rate == 0.0:
                    rates[name] = _NoModuleDropout(0.0)


def build(s: Scenario, device: str, *, seed: int | None = None) -> Built:
    """Construct everything for one variant on `device` ('cpu' or 'cuda')."""
    torch.manual_seed(s.run.seed if seed is None else seed)
    p = s.precision
    model = base_model(s, "cpu" if p.weights in ("int8", "fp4", "nf4") else device)
    quant_tensors, error = [], None
    if p.weights in ("int8", "fp4", "nf4"):
        quant_tensors, error = quantize_bnb(model, s, device)
        model.to(device)
    elif p.weights == "int4":
        error = quantize_int4(model, s)
        quant_tensors = quanto_constants(model)
    if p.weights in ("fp4", "nf4") and device == "cpu":
        # for the rest of the process: profile the allocations CUDA makes (see bnb_cpu_dequantize_fallback)
        pin_bnb_cpu_dequantize_fallback(False)
    base_bytes = model_bytes(model, quant_tensors)
    model = adapt(model, s)
    wrapped_bytes = model_bytes(model, quant_tensors)
    optimizer = make_optimizer(s, model.parameters())
    trainable_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    return Built(model=model, optimizer=optimizer, quant_tensors=quant_tensors, quantization_error=error,
                 base_bytes=base_bytes, wrapped_bytes=wrapped_bytes, trainable_dtypes=trainable_dtypes)
