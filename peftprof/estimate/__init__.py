"""Analytic estimator: peak memory of a steady-state training step as a breakdown, FLOPs and speed.

`estimate(scenario)` returns the JSON structure every later stage consumes (see README, "Estimate JSON").

Layout, one concern per module; imports only go down this list (no cycles):
- widths.py: bytes per element of every kind of tensor (hidden stream, non-quantized parameters, compute,
  trainable parameters, adapters, dropout masks). autocast.py beside it: the dtypes under torch.autocast
  (CPU and CUDA op lists), read by activations.py.
- memory.py: persistent state (weights, quantization constants, trainable parameters, gradients, optimizer).
- activations.py: what a step saves and its transients (per layer, model-level, logits, backward moments).
- flops.py: FLOPs and speed. cuda.py: what differs on CUDA (allocator blocks, reserved/device terms).
- distributed.py: per-rank terms of DDP, FSDP2 and ZeRO ([distributed] world_size > 1), built on the above.
- this module: the peak as the largest moment of the step (per rank with world_size > 1).
"""

from __future__ import annotations

from ..arch import analytic_gap
from ..catalog import Gpu
from ..errors import UserError
from ..results import CATEGORIES
from ..settings import Scenario
from ..vision import is_vision
from . import activations as act_mod
from . import distributed as dist_mod
from . import memory as mem
from . import peft_methods
from . import xlora as xlora_model
from .cuda import CUDA_CUBLAS_WORKSPACE_BYTES, cuda_reserved_and_device_bytes
from .flops import DEFAULT_MFU, flops_per_step


class AnalyticUnsupported(UserError):
    """The analytic estimator does not model this variant's family (arch.analytic_gap): `--method trace`
    answers (trace.trace_estimate builds its estimate from the trace alone)."""


def step_moments(s: Scenario, *, device: str) -> tuple[dict[str, int], list[tuple[str, dict[str, int]]], int]:
    """(persistent state, candidate moments, paged_bytes) of a single-device step: the peak is the largest
    candidate plus the persistent state (memory_breakdown)."""
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
    forward = peft_methods.forward_moments(s, device, grads_live)  # 5. DoRA's forward transients (peft_methods.py)
    forward += xlora_model.step_moments(s, device, grads_live)  # X-LoRA's scaling pass and experts (xlora.py)
    forward += peft_methods.recompute_moments(s, device, grads, grads_live)  # 6. and their rerun under checkpointing
    return persistent, [("backward", backward), ("backward", late), ("backward", end), ("optimizer", step)] + forward, paged


def _largest(persistent: dict[str, int], candidates) -> tuple[dict[str, int], str]:
    phase, varying = max(candidates, key=lambda c: sum(c[1].values()))
    return {c: int(persistent.get(c, 0) + varying.get(c, 0)) for c in CATEGORIES}, phase


def memory_breakdown(s: Scenario, *, device: str) -> tuple[dict[str, int], int, str]:
    """(breakdown, paged_bytes, peak_phase). The peak is the largest of the moments of a steady-state step
    (step_moments): the start of backward (all activations and the loss's logits copies live), inside a
    decoder layer's backward, the end of backward, and the optimizer step (all gradients live)."""
    persistent, candidates, paged = step_moments(s, device=device)
    breakdown, phase = _largest(persistent, candidates)
    return breakdown, paged, phase


def distributed_breakdown(s: Scenario, *, device: str) -> tuple[dict[str, int], int, str, dict]:
    """(breakdown, paged_bytes, peak_phase, detail) of rank 0 with world_size > 1 (estimate/distributed.py).
    The categories stay results.CATEGORIES: sharded and gathered parameters are `weights` (frozen, and all of
    full fine-tuning's) or `trainable`, sharded and unsharded gradients and DDP's buckets `gradients`,
    all-gather and reduce-scatter buffers `temporaries`. `detail` names every term, and `host_bytes` what CPU
    offload keeps on the host (not in the device peak)."""
    d = s.distributed
    detail: dict = {"strategy": d.strategy, "world_size": d.world_size, "rank": 0, "cpu_offload": d.cpu_offload}
    persistent, candidates, paged = step_moments(s, device=device)
    if d.strategy == "ddp":
        buckets = dist_mod.ddp_bucket_bytes(s, device)
        persistent = {**persistent, "gradients": sum(buckets)}
        breakdown, phase = _largest(persistent, candidates)
        detail.update(terms={"gradient_buckets": sum(buckets)}, n_buckets=len(buckets), host_bytes=0)
        return breakdown, paged, phase, detail
    if d.strategy == "fsdp":
        moments, terms, host = dist_mod.fsdp_moments(s, device)
        full = s.peft.method == "full"
        on_device = not d.cpu_offload
        sharded = {"weights": terms["sharded_frozen"] + (terms["sharded_trainable"] if full else 0),
                   "trainable": 0 if full else terms["sharded_trainable"]}
        persistent = {**persistent, "weights": sharded["weights"] * on_device,
                      "trainable": sharded["trainable"] * on_device,
                      "optimizer": terms["optimizer_state"] * on_device}
        breakdown, phase = _largest(persistent, moments)
        detail.update(terms=terms, host_bytes=host)
        return breakdown, paged, phase, detail
    zero, host = dist_mod.zero_terms(s, device)
    persistent = {**persistent, "weights": zero["weights"], "trainable": zero["trainable"],
                  "optimizer": zero["optimizer"]}
    moved = []
    for phase, moment in candidates:
        grads = zero["gradients"] + (zero["reduce_bucket"] if phase == "backward" else 0)
        gathered = zero["gathered_params"] if phase == "backward" else 0
        moved.append((phase, {**moment, "gradients": grads, "temporaries": moment.get("temporaries", 0) + gathered}))
    breakdown, phase = _largest(persistent, moved)
    detail.update(terms=zero, host_bytes=host)
    return breakdown, 0, phase, detail


def estimate(s: Scenario, *, device: str | None = None, gpu: Gpu | None = None, mfu: float = DEFAULT_MFU) -> dict:
    """The analytic estimate of one variant, as the JSON-ready dict described in the README. Raises
    AnalyticUnsupported for a family it does not model: never a silent guess."""
    if s.inference.enabled:  # serving, forward only: estimate/inference.py
        from .inference import estimate_inference

        return estimate_inference(s, device=device or ("cuda" if s.run.device == "auto" else s.run.device), gpu=gpu)
    if is_vision(s):  # image classifiers: peftprof/vision/estimate.py
        from ..vision.estimate import estimate as vision_estimate

        return vision_estimate(s, device=device, gpu=gpu, mfu=mfu)
    gap = analytic_gap(s.model.arch.model_type) or peft_methods.analytic_gap(s) or xlora_model.analytic_gap(s)
    if gap:
        raise AnalyticUnsupported(f"{s.name}: {gap}; --method trace answers")
    device = device or ("cuda" if s.run.device == "auto" else s.run.device)
    detail = None
    if s.distributed.world_size > 1:
        breakdown, paged, phase, detail = distributed_breakdown(s, device=device)
    else:
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
        # every rank's micro-batches: with world_size > 1 the FLOPs and tokens of all ranks (one optimizer step)
        "flops_per_step": flops_per_step(s) * s.distributed.world_size,
        "tokens_per_step": s.training.batch_size * s.training.seq_len * s.training.grad_accum_steps
        * s.distributed.world_size,
    }
    if detail is not None:
        out["host_bytes"] = detail["host_bytes"]
        out["distributed"] = detail
        note = dist_mod.unmeasured_note(s)
        if note:
            out["note"] = note
    if device == "cuda":
        out.update(cuda_reserved_and_device_bytes(peak))
    if gpu is not None:
        need = out.get("device_bytes", peak)
        # the ranks compute side by side (communication not modelled: docs/distributed.md)
        step_time_s = out["flops_per_step"] / (gpu.bf16_tflops * 1e12 * mfu * s.distributed.world_size)
        out.update({
            "gpu": gpu.name,
            "fits": need <= gpu.memory_bytes,
            "headroom_bytes": gpu.memory_bytes - need,
            "mfu": mfu,
            "predicted_step_time_s": step_time_s,
            "predicted_tokens_per_s": out["tokens_per_step"] / step_time_s,
        })
    return out
