"""Analytic estimator: peak memory of a steady-state training step as a breakdown, FLOPs and speed.

`estimate(scenario)` returns the JSON structure every later stage consumes (see README, "Estimate JSON").

Layout, one concern per module; imports only go down this list (no cycles):
- widths.py: bytes per element of every kind of tensor (hidden stream, non-quantized parameters, compute,
  trainable parameters, adapters, dropout masks). autocast.py beside it: the dtypes under torch.autocast
  (CPU and CUDA op lists), read by activations.py.
- memory.py: persistent state (weights, quantization constants, trainable parameters, gradients, optimizer).
- activations.py: what a step saves and its transients (per layer, model-level, logits, backward moments).
- flops.py: FLOPs and speed. cuda.py: what differs on CUDA (allocator blocks, reserved/device terms).
- this module: the peak as the largest moment of the step. Coming terms take their own module beside these
  (sharding: a world-size divisor of memory.py's terms; allocator models next to cuda.py).
"""

from __future__ import annotations

from ..arch import analytic_gap
from ..catalog import Gpu
from ..errors import UserError
from ..results import CATEGORIES
from ..settings import Scenario
from . import activations as act_mod
from . import memory as mem
from . import peft_methods
from .cuda import CUDA_CUBLAS_WORKSPACE_BYTES, cuda_reserved_and_device_bytes
from .flops import DEFAULT_MFU, flops_per_step


class AnalyticUnsupported(UserError):
    """The analytic estimator does not model this variant's family (arch.analytic_gap): `--method trace`
    answers (trace.trace_estimate builds its estimate from the trace alone)."""


def memory_breakdown(s: Scenario, *, device: str) -> tuple[dict[str, int], int, str]:
    """(breakdown, paged_bytes, peak_phase). The peak is the larger of two moments of a steady-state
    step: the start of backward (all activations and the loss's logits copies live) and the optimizer
    step (all gradients live, activations freed)."""
    optimizer, paged = mem.optimizer_state_bytes(s, device=device)
    persistent = {
        "weights": mem.weight_bytes(s),
        "quant_constants": mem.quant_constant_bytes(s),
        "trainable": mem.trainable_param_bytes(s),
        "optimizer": optimizer,
        "overhead": CUDA_CUBLAS_WORKSPACE_BYTES if device == "cuda" else 0,
    }
    grads = mem.gradient_bytes(s)
    # gradients of earlier micro-batches persist through later ones; in a single micro-batch none exist
    # yet at the start of backward (zero_grad(set_to_none=True)), measured on CPU
    grads_live = grads if s.training.grad_accum_steps > 1 else 0
    activations = act_mod.activation_bytes(s, device)
    logits = act_mod.logits_bytes(s)
    # 1. start of backward: every saved activation and the loss's logits copies
    backward = {"gradients": grads_live, "activations": activations, "logits": logits, "temporaries": 0}
    # 2. inside the backward of some decoder layer (logits gone, the model's logits still held)
    late = act_mod.layer_backward_peak(s, grads, grads_live, device)
    # 3. end of backward, full fine-tuning with tied embeddings: the embedding's gradient is computed and
    # added to lm_head's (AccumulateGrad), two vocab x hidden temporaries beside all other gradients
    end = {"gradients": grads, "activations": 0, "logits": act_mod.held_logits_bytes(s),
           "temporaries": 2 * mem.embedding_weight_elements(s) * mem.trainable_bytes_per_element(s)
           if s.peft.method == "full" and s.model.arch.tied_embeddings else 0}
    # 4. optimizer step: all gradients and the optimizer's temporaries
    step = {"gradients": grads, "activations": 0, "logits": 0,
            "temporaries": mem.optimizer_temporary_bytes(s, device=device)}
    candidates = [("backward", backward), ("backward", late), ("backward", end), ("optimizer", step)]
    phase, varying = max(candidates, key=lambda c: sum(c[1].values()))
    breakdown = {c: int({**persistent, **varying}[c]) for c in CATEGORIES}
    return breakdown, paged, phase


def estimate(s: Scenario, *, device: str | None = None, gpu: Gpu | None = None, mfu: float = DEFAULT_MFU) -> dict:
    """The analytic estimate of one variant, as the JSON-ready dict described in the README. Raises
    AnalyticUnsupported for a family it does not model: never a silent guess."""
    gap = analytic_gap(s.model.arch.model_type) or peft_methods.analytic_gap(s)
    if gap:
        raise AnalyticUnsupported(f"{s.name}: {gap}; --method trace answers")
    device = device or ("cuda" if s.run.device == "auto" else s.run.device)
    breakdown, paged, phase = memory_breakdown(s, device=device)
    peak = sum(breakdown.values())
    tensors = mem.trainable_tensors(s)
    out = {
        "method": "analytic",
        "device": device,
        "peak_bytes": peak,
        "peak_phase": phase,
        "breakdown": breakdown,
        "paged_optimizer_bytes": paged,
        "n_params": s.model.arch.n_params,
        "n_trainable_params": sum(tensors),
        "flops_per_step": flops_per_step(s),
        "tokens_per_step": s.training.batch_size * s.training.seq_len * s.training.grad_accum_steps,
    }
    if device == "cuda":
        out.update(cuda_reserved_and_device_bytes(peak))
    if gpu is not None:
        need = out.get("device_bytes", peak)
        step_time_s = out["flops_per_step"] / (gpu.bf16_tflops * 1e12 * mfu)
        out.update({
            "gpu": gpu.name,
            "fits": need <= gpu.memory_bytes,
            "headroom_bytes": gpu.memory_bytes - need,
            "mfu": mfu,
            "predicted_step_time_s": step_time_s,
            "predicted_tokens_per_s": out["tokens_per_step"] / step_time_s,
        })
    return out
