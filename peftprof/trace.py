"""Trace estimator: run the real training step (transformers + peft + bitsandbytes, the runner's own
construction and step code) on fake tensors and track every allocation. Exact tensor-level peaks for any
model size, on a CPU, with almost no memory.

Route (shared/facts.md): build on the meta device, quantize with stand-in bitsandbytes layers that hold the
same tensors (Params4bit cannot wrap a fake tensor), wrap with peft, then replace every parameter and
buffer in place by a fake CPU tensor (nn.Module.to() refuses fake parameters) and run a warm-up step and
a tracked step under FakeTensorMode. CUDA terms (cuBLAS workspace, allocator rounding, context) come from
the analytic model: fake CUDA tensors with SDPA abort a CPU-only torch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from pathlib import Path

from .catalog import Gpu
from .errors import UserError
from .settings import Scenario

CACHE_DIR = Path(os.environ.get("PEFTPROF_CACHE", ".peftprof-cache")) / "trace"
# The trace's time grows with the decoder layers it runs through (about 1 s per layer pass on our 2-core
# machine: benchmarks/results/trace_7b.txt, 32 layers in ~30 s), not with widths or token counts (fake
# tensors). The deepest published decoders have 126 layers (Llama-3.1-405B); gradient accumulation repeats
# the passes. Past this bound the trace is refused and the analytic estimate is the answer.
MAX_TRACED_LAYER_PASSES = 256


class TraceTooLarge(UserError):
    """The trace would not finish in reasonable time; the analytic estimate answers instead."""


def check_traceable(s: Scenario) -> None:
    passes = s.model.arch.n_layers * s.training.grad_accum_steps
    if s.inference.enabled:  # a served request: one forward per generated token (run/infer.py)
        passes = s.model.arch.n_layers * max(1, s.inference.max_new_tokens)
        if passes > MAX_TRACED_LAYER_PASSES:
            raise TraceTooLarge(f"{s.name}: --method trace runs at most {MAX_TRACED_LAYER_PASSES} decoder-layer "
                                f"passes; this request needs {passes:,} ({s.model.arch.n_layers:,} layers x "
                                f"{max(1, s.inference.max_new_tokens)} forwards)")
    if passes > MAX_TRACED_LAYER_PASSES:
        raise TraceTooLarge(f"{s.name}: --method trace runs at most {MAX_TRACED_LAYER_PASSES} decoder-layer passes "
                            f"per step; this one needs {passes:,} ({s.model.arch.n_layers:,} layers x "
                            f"{s.training.grad_accum_steps} micro-batches)")


def _stand_in_classes():
    """bitsandbytes layer classes whose tensors are plain registered buffers (fakeable). They subclass the
    real ones so peft picks the same adapter layer (peft/tuners/lora/bnb.py, which e.g. clones the 4-bit
    output) and run the same kernels through the same autograd functions."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import QuantState

    class WeightInfo:
        """What peft reads from `base_layer.weight` (device, dtype, quant settings): no storage."""

        def __init__(self, **kw):
            self.__dict__.update(kw)

    class TracedLinear4bit(bnb.nn.Linear4bit):
        def __init__(self, in_f, out_f, bias, compute_dtype, quant_type, double_quant, block):
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_f, out_f
            self.compute_dtype, self.compute_type_is_set, self.quant_storage = compute_dtype, True, torch.uint8
            self.support_avx512bf16_for_cpu = False
            n = in_f * out_f
            n_blocks = math.ceil(n / block)
            meta = torch.device("meta")
            self.register_buffer("packed", torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=meta))
            self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=meta))
            if double_quant:  # functional.quantize_4bit with compress_statistics
                self.register_buffer("absmax", torch.empty(n_blocks, dtype=torch.uint8, device=meta))
                self.register_buffer("absmax2", torch.empty(math.ceil(n_blocks / 256), dtype=torch.float32, device=meta))
                self.register_buffer("code2", torch.empty(256, dtype=torch.float32, device=meta))
                self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=meta))
            else:
                self.register_buffer("absmax", torch.empty(n_blocks, dtype=torch.float32, device=meta))
            self.double_quant, self.quant_type, self.block = double_quant, quant_type, block
            self.bias = torch.nn.Parameter(torch.empty(out_f, dtype=compute_dtype, device=meta),
                                           requires_grad=False) if bias else None
            self.weight = WeightInfo(device=meta, dtype=torch.uint8, compress_statistics=double_quant,
                                     quant_type=quant_type, shape=torch.Size([(n + 1) // 2, 1]))

        def quant_state(self):
            state2 = None
            if self.double_quant:
                state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=256, dtype=torch.float32)
            return QuantState(absmax=self.absmax, shape=torch.Size([self.out_features, self.in_features]),
                              code=self.code, blocksize=self.block, quant_type=self.quant_type,
                              dtype=self.compute_dtype, offset=getattr(self, "offset", None), state2=state2)

        def forward(self, x):  # bitsandbytes nn/modules.py Linear4bit.forward, training path
            inp_dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = self.bias
            if bias is not None:
                if bias.dtype != x.dtype:
                    bias.data = bias.data.to(x.dtype)
                bias = bias.to(self.compute_dtype)
            return bnb.matmul_4bit(x, self.packed, bias=bias, quant_state=self.quant_state()).to(inp_dtype)

    class TracedLinear8bitLt(bnb.nn.Linear8bitLt):
        def __init__(self, in_f, out_f, bias):
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_f, out_f
            meta = torch.device("meta")
            self.register_buffer("cb", torch.empty(out_f, in_f, dtype=torch.int8, device=meta))
            self.register_buffer("scb", torch.empty(out_f, dtype=torch.float32, device=meta))
            self.bias = torch.nn.Parameter(torch.empty(out_f, dtype=torch.float16, device=meta),
                                           requires_grad=False) if bias else None
            self.state = bnb.MatmulLtState()
            self.state.has_fp16_weights = False
            self.index = None
            self.weight = WeightInfo(device=meta, dtype=torch.int8)

        def forward(self, x):  # bitsandbytes Linear8bitLt.forward with CB/SCB moved into the state
            self.state.is_training = self.training
            self.state.CB, self.state.SCB = self.cb, self.scb
            if self.bias is not None and self.bias.dtype != x.dtype:
                self.bias.data = self.bias.data.to(x.dtype)
            return bnb.matmul(x, self.cb, bias=self.bias, state=self.state)

    return TracedLinear4bit, TracedLinear8bitLt


def _quantize_on_meta(model, s: Scenario) -> None:
    from transformers.pytorch_utils import Conv1D

    from .run.build import TORCH_DTYPES, quantizable_linears

    Traced4, Traced8 = _stand_in_classes()
    p = s.precision
    for name, mod in quantizable_linears(model):
        out_f, in_f = (mod.weight.shape[1], mod.weight.shape[0]) if isinstance(mod, Conv1D) else mod.weight.shape
        bias = mod.bias is not None
        if p.weights == "int8":
            new = Traced8(in_f, out_f, bias)
        else:
            new = Traced4(in_f, out_f, bias, TORCH_DTYPES[p.compute_dtype], p.weights, p.double_quant,
                          p.quant_block_size)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.is_loaded_in_8bit = p.weights == "int8"
    model.is_loaded_in_4bit = p.weights != "int8"


def _fake_in_place(model, fake_mode) -> None:
    """Replace every parameter and buffer by a fake CPU tensor of the same shape and dtype (shared ones
    stay shared). Fake tensors carry no data: nothing is allocated."""
    import torch

    memo: dict[int, tuple] = {}  # id(original) -> (original, fake); originals kept so ids stay unique

    def empty_fake(t):
        with fake_mode:
            return torch.empty(t.shape, dtype=t.dtype, device="cpu")

    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = (p, torch.nn.Parameter(empty_fake(p), requires_grad=p.requires_grad))
                mod._parameters[name] = memo[id(p)][1]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                if id(b) not in memo:
                    memo[id(b)] = (b, empty_fake(b))
                mod._buffers[name] = memo[id(b)][1]


@contextlib.contextmanager
def _mask_decisions_as_in_real_runs(s: Scenario):
    """transformers treats fake tensors as graph tracing (utils/import_utils.py is_tracing) and then
    materialises the causal mask that a real run skips (masking_utils.find_packed_sequence_indices and
    _ignore_causal_mask_sdpa), which changes what SDPA saves. Our synthetic batches are never padded nor
    packed and start at cache position 0 (after the prefix for prefix tuning), so decide with those known
    values, as the real run does."""
    import transformers.masking_utils as mu
    from torch._subclasses.fake_tensor import FakeTensor

    original, original_packed = mu._ignore_causal_mask_sdpa, mu.find_packed_sequence_indices
    q_offset_value = s.peft.num_virtual_tokens if s.peft.method == "prefix_tuning" else 0

    def decide(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if isinstance(padding_mask, FakeTensor):
            padding_mask = None  # all ones: decides like no mask
        if isinstance(q_offset, FakeTensor):
            q_offset = q_offset_value
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    def packed(position_ids):
        return None if isinstance(position_ids, FakeTensor) else original_packed(position_ids)

    mu._ignore_causal_mask_sdpa, mu.find_packed_sequence_indices = decide, packed
    try:
        yield
    finally:
        mu._ignore_causal_mask_sdpa, mu.find_packed_sequence_indices = original, original_packed


@contextlib.contextmanager
def _grouped_mm_on_fake_tensors():
    """Mixture-of-experts layers in transformers 5 run their experts through torch's grouped_mm
    (integrations/moe.py grouped_mm_experts_forward: every token-expert pair in one sorted batch, so what is
    allocated does not depend on how tokens are routed). Its fake/meta kernel accepts only bf16, while a
    k-bit-prepared model runs its experts in fp32 (peft prepare_model_for_kbit_training upcasts them: they are
    not nn.Linear, bitsandbytes leaves them unquantized). Under fake tensors a stand-in with the kernel's
    allocations replaces it: the output (tokens x out), and in backward the gradient of each input that needs
    one; it saves the input only when the weight needs a gradient and the weight only when the input does
    (autograd derivatives.yaml _grouped_mm: self <- grad @ mat2^T, mat2 <- self^T @ grad). Real runs keep
    the native kernel; tests/test_families.py compares the two."""
    try:
        import transformers.integrations.moe as moe
    except ImportError:  # a transformers without MoE experts integration
        yield
        return
    import torch

    class GroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, offs):
            ctx.save_for_backward(x if w.requires_grad else None, w if x.requires_grad else None)
            ctx.shapes = (x.shape, w.shape)
            return x.new_empty((x.shape[0], w.shape[-1]))

        @staticmethod
        def backward(ctx, grad):
            x_shape, w_shape = ctx.shapes
            gx = grad.new_empty(x_shape) if ctx.needs_input_grad[0] else None
            gw = grad.new_empty(w_shape) if ctx.needs_input_grad[1] else None
            return gx, gw, None

    original = moe._grouped_mm
    moe._grouped_mm = lambda input, weight, offs: GroupedMM.apply(input.to(weight.dtype), weight, offs)
    try:
        yield
    finally:
        moe._grouped_mm = original


def _check_generic_family(s: Scenario) -> None:
    """What transformers refuses for a model_type outside the registry (families/generic.py): gradient
    checkpointing on a class without it (PreTrainedModel.supports_gradient_checkpointing, e.g. openai-gpt)."""
    from .families import REGISTRY, family

    name = s.model.arch.model_type
    if name in REGISTRY or not s.training.checkpoint_every or getattr(family(name), "checkpointing", True):
        return
    raise UserError(f"{s.name}: [training] gradient_checkpointing: transformers' {name} model does not support "
                    f"gradient checkpointing (allowed: none)")


def trace_peak(s: Scenario, snapshot_path=None) -> dict:
    """Tensor-level peak and breakdown of a steady-state step, traced on fake tensors (CPU semantics), with
    its memory timeline and what is live at the peak (peftprof/timeline.py); `snapshot_path` receives the
    step as a torch memory snapshot (peftprof/snapshot.py)."""
    if s.inference.enabled:  # a serving request, forward only: run/infer.py
        from .run.infer import trace_serving

        return trace_serving(s, snapshot_path)
    import logging
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .run.build import adapt, base_model, make_optimizer, model_bytes
    from .run.probe import CpuProbe
    from .run.step import optimizer_state, registered_tensors, synthetic_batch, train_step
    from .vision import is_vision

    if s.distributed.world_size > 1:  # one rank under a fake process group (trace_distributed.py)
        from .trace_distributed import trace_peak_distributed

        return trace_peak_distributed(s, snapshot_path)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
    warnings.filterwarnings("ignore", category=UserWarning)  # e.g. "Paged optimizers are not supported on CPU"
    check_traceable(s)
    _check_generic_family(s)
    if s.precision.weights == "int4":
        from .arch import analytic_gap

        hint = "; use --method analytic" if analytic_gap(s.model.arch.model_type) is None else ""
        raise UserError(f"{s.name}: --method trace does not support int4 (optimum-quanto cannot quantize meta "
                        f"tensors){hint}")
    model = base_model(s, "meta")
    if s.precision.weights in ("int8", "fp4", "nf4"):
        _quantize_on_meta(model, s)
    with torch.device("meta"):
        model = adapt(model, s)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # peft keeps real prompt_tokens; bnb real code maps
    _fake_in_place(model, fake_mode)

    class Built:  # what train_step and registered_tensors read
        pass

    built = Built()
    built.model = model
    built.quant_tensors = [b for m in model.modules() if type(m).__name__.startswith("Traced")
                           for n, b in m.named_buffers(recurse=False) if n not in ("packed", "cb")]  # those are weights
    model.train()
    # outside fake mode: bitsandbytes builds its real 256-entry quantization maps here (.item() calls)
    built.optimizer = make_optimizer(s, model.parameters())
    with fake_mode, _mask_decisions_as_in_real_runs(s), _grouped_mm_on_fake_tensors():
        ids = torch.randint(0, s.model.arch.vocab_size, (s.training.batch_size, s.training.seq_len)) \
            if not is_vision(s) else synthetic_batch(s, "cpu", None)  # images and labels: peftprof/vision/build.py

        # the runner's CPU probe, idle through the warm-up steps as in the runner; no RSS (fake tensors)
        probe = CpuProbe(vocab_size=s.model.arch.vocab_size, sample_rss=False,
                         logits_ndim=getattr(s.model.arch, "logits_ndim", None))
        for _ in range(max(1, s.run.warmup_steps)):
            train_step(built, s, ids, probe, {})
        registered = registered_tensors(built)
        registered["weights"] += [b for m in model.modules() if type(m).__name__.startswith("Traced")
                                  for n, b in m.named_buffers(recurse=False) if n in ("packed", "cb")]
        with probe.tracking(registered):
            train_step(built, s, ids, probe, {})
        result = probe.result(optimizer_state(built.optimizer))
    from .estimate.allocator_replay import tracker_stream
    from .estimate.widths import BNB_PAGED_MIN_NUMEL
    from .timeline import explain

    paged_dtype = (torch.uint8 if s.training.optimizer.endswith("8bit") else torch.float32) \
        if s.training.optimizer.startswith("paged") else None

    def paged(a) -> bool:  # bitsandbytes get_state_buffer pages state1/state2 of >= 1e5 values (CUDA unified memory)
        return (a.category == "optimizer" and a.dtype == paged_dtype and a.shape is not None
                and math.prod(a.shape) >= BNB_PAGED_MIN_NUMEL)

    if snapshot_path is not None:
        from .snapshot import write_snapshot

        write_snapshot(probe.tracker, snapshot_path)
    return {"peak_bytes": result.peak_bytes, "peak_phase": result.peak_phase, "breakdown": result.breakdown,
            "phase_peaks": result.phase_peaks, "wrapped_bytes": model_bytes(model, built.quant_tensors),
            "n_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "alloc_stream": tracker_stream(probe.tracker, paged), **explain(probe.tracker)}


def source_fingerprint(root: Path) -> str:
    """sha256 over the relative paths and contents of every Python file below `root`."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Fingerprint of the whole peftprof package: the cache must never serve a trace computed by other
    code (a version string does not change on every edit)."""
    return source_fingerprint(Path(__file__).resolve().parent)


def _cache_key(s: Scenario) -> str:
    """Resolved variant + library versions + the code that traces it."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    versions = f"{torch.__version__}-{transformers.__version__}-{peft.__version__}-{bitsandbytes.__version__}"
    digest = hashlib.sha256(f"{versions}-{code_fingerprint()}".encode()).hexdigest()[:16]
    return f"{s.settings_key()}-{digest}"


def cached_trace_peak(s: Scenario) -> dict:
    """trace_peak, cached on disk by the resolved variant and library versions."""
    from .results import write_atomic

    path = CACHE_DIR / f"{_cache_key(s)}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    out = trace_peak(s)
    try:
        write_atomic(path, json.dumps(out))
    except OSError:
        pass  # a read-only checkout still traces, just without the cache
    return out


def trace_estimate(s: Scenario, *, device: str | None = None, gpu: Gpu | None = None, mfu: float | None = None) -> dict:
    """Same structure as the analytic estimate, with method 'trace': the traced CPU peak plus, for CUDA,
    the device terms (cuBLAS workspace; reserved and device bytes from the simulated allocator). For a family
    the analytic estimator does not model (AnalyticUnsupported) the estimate is built from the trace alone
    and says so in its `note`."""
    from .estimate import AnalyticUnsupported, estimate
    from .estimate.cuda import CUDA_CUBLAS_WORKSPACE_BYTES, cuda_reserved_and_device_bytes
    from .estimate.flops import DEFAULT_MFU

    device = device or ("cuda" if s.run.device == "auto" else s.run.device)
    mfu = mfu or DEFAULT_MFU
    try:
        analytic, unsupported = estimate(s, device=device, gpu=gpu, mfu=mfu), None
    except AnalyticUnsupported as e:
        analytic, unsupported = None, e.lines()[0]
    # why the analytic estimator cannot answer, without the variant's name and the pointer to the trace
    gap = unsupported and unsupported.removeprefix(f"{s.name}: ").removesuffix("; --method trace answers")
    try:
        check_traceable(s)
    except TraceTooLarge as e:
        if analytic is None:
            raise UserError(f"{e.lines()[0]}, and {gap}: neither estimator answers") from None
        return dict(analytic, note=f"{e.lines()[0]}: the analytic estimate answers instead")
    try:
        traced = cached_trace_peak(s)
    except UserError as e:
        if analytic is not None:
            raise
        raise UserError(f"{e.lines()[0]}, and {gap}: neither estimator answers") from None
    notes = []
    if analytic is None:
        analytic, note = _trace_only_fields(s, device, gpu, mfu, traced)
        notes.append(f"{unsupported} instead, from the trace alone ({note})")
    breakdown = dict(traced["breakdown"])
    breakdown["overhead"] = CUDA_CUBLAS_WORKSPACE_BYTES if device == "cuda" else 0
    # the trace follows CPU semantics, where paged optimizer states are plain tensors; on CUDA they live
    # in unified memory outside torch's allocator (analytic paged_optimizer_bytes)
    breakdown["optimizer"] = max(0, breakdown["optimizer"] - analytic["paged_optimizer_bytes"])
    peak = sum(breakdown.values())
    out = dict(analytic, method="trace", peak_bytes=peak, peak_phase=traced["peak_phase"], breakdown=breakdown,
               **{k: traced[k] for k in ("timeline", "at_peak") if k in traced})
    out.update(traced.get("serving", {}))  # [inference]: KV cache, forward FLOPs (run/infer.py serving_fields)
    if device == "cuda":
        out.update(cuda_reserved_and_device_bytes(peak))
        if "timeline" in out:  # the timeline is the CPU tensor trace: say how the CUDA peak differs from it
            paged = traced["breakdown"]["optimizer"] - breakdown["optimizer"]
            out["timeline"] = dict(out["timeline"], note=(
                f"The timeline is the traced step's tensors; the CUDA peak of {peak / 2**20:,.3f} MiB adds the cuBLAS "
                f"workspace ({CUDA_CUBLAS_WORKSPACE_BYTES / 2**20:g} MiB)"
                + (f" and leaves out {paged / 2**20:,.3f} MiB of paged optimizer states (CUDA unified memory)"
                   if paged else "") + "."))
        if s.precision.autocast != "none" and s.model.arch.model_type in ("gpt2", "opt"):
            notes.append(f"{s.name}: the trace follows torch's CPU autocast op list; CUDA's also runs layer_norm, "
                         "softmax and pow in fp32 (estimate/autocast.py): the analytic CUDA estimate follows it")
        if "alloc_stream" in traced:  # the caching allocator simulated on the traced alloc/free order
            out.update(_simulated_cuda_terms(s, traced["alloc_stream"], gpu))
    if notes:
        out["note"] = "; ".join(notes)
    if gpu is not None:
        need = out.get("device_bytes", peak)
        out.update(fits=need <= gpu.memory_bytes and not out.get("allocator_oom", False),
                   headroom_bytes=gpu.memory_bytes - need)
    return out


def _trace_only_fields(s: Scenario, device: str, gpu: Gpu | None, mfu: float, traced: dict) -> tuple[dict, str]:
    """The estimate's fields besides the memory breakdown when only the trace answers: parameter counts (the
    family's Arch, tested against transformers; trainable ones counted on the traced model), the paged optimizer
    bytes (estimate/memory.py: per trainable tensor, valid for every family), and FLOPs and speed where
    estimate/flops.py counts the family's matmuls (dense decoders: all of them are nn.Linear); a mixture of
    experts runs matmuls that are not nn.Linear (expert stacks), which flops.py does not count: omitted.
    Returns (fields, what the note says about FLOPs)."""
    from .estimate import memory as mem
    from .estimate.flops import flops_per_step
    from .vision import is_vision

    if is_vision(s):  # image classifiers: peftprof/vision/estimate.py
        from .vision.estimate import trace_fields

        return trace_fields(s, device, gpu, mfu, traced)
    a = s.model.arch
    out = {"method": "trace", "device": device,
           "paged_optimizer_bytes": mem.optimizer_state_bytes(s, device=device)[1], "n_params": a.n_params,
           "n_trainable_params": traced.get("n_trainable_params", sum(mem.trainable_tensors(s))),
           "tokens_per_step": s.training.batch_size * s.training.seq_len * s.training.grad_accum_steps}
    if gpu is not None:
        out["gpu"] = gpu.name
    if a.n_experts:
        return out, "flops_per_step and speed omitted: estimate/flops.py does not count expert matmuls"
    if getattr(a, "flops_gap", None):  # a generic family whose matmuls flops.py does not count (families/generic.py)
        return out, a.flops_gap
    out["flops_per_step"] = flops_per_step(s)
    if gpu is not None:
        step_time_s = out["flops_per_step"] / (gpu.bf16_tflops * 1e12 * mfu)
        out.update(mfu=mfu, predicted_step_time_s=step_time_s,
                   predicted_tokens_per_s=out["tokens_per_step"] / step_time_s)
    return out, "flops_per_step from estimate/flops.py: every matmul of this dense family is a linear layer"


def _simulated_cuda_terms(s: Scenario, stream: dict, gpu: Gpu | None) -> dict:
    """estimate/allocator.py on the step's events: peak reserved, fragmentation, segments, and whether the
    allocator would run out of memory on `gpu` (whose memory less the CUDA context is what it can obtain)."""
    from .estimate.alloc_conf import AllocConfError
    from .estimate.allocator_replay import simulate_trace
    from .estimate.cuda import CUDA_CONTEXT_BYTES, CUDA_CUBLAS_WORKSPACE_BYTES

    conf = getattr(s.run, "cuda_alloc_conf", None) or None
    try:
        sim = simulate_trace(stream, conf=conf, workspace_bytes=CUDA_CUBLAS_WORKSPACE_BYTES,
                             capacity_bytes=None if gpu is None else gpu.memory_bytes - CUDA_CONTEXT_BYTES,
                             total_memory_bytes=None if gpu is None else gpu.memory_bytes)
    except AllocConfError as e:
        raise UserError(f"{s.name}: [run] cuda_alloc_conf: {e}") from None
    return {"reserved_bytes": sim.peak_reserved_bytes, "device_bytes": sim.peak_reserved_bytes + CUDA_CONTEXT_BYTES,
            "fragmentation_bytes": sim.fragmentation_bytes, "n_segments": sim.n_segments,
            "allocator_oom": sim.oom is not None}
