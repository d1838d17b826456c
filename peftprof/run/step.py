"""The training step that the runner measures and the trace estimator replays on fake tensors: one
public home both import, so they run the same code by construction."""

from __future__ import annotations

import contextlib

import torch

from ..settings import Scenario
from ..vision import build as vision_build
from ..vision import is_vision

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def model_inputs(batch, *, labels: bool = True, first: int | None = None) -> dict:
    """The model's keyword inputs for a synthetic batch: a causal LM's ids (labels = ids), or an image
    classifier's dict (pixel_values, labels); `first`: only the first samples (the runner's latency check)."""
    if isinstance(batch, dict):
        return {k: v if first is None else v[:first] for k, v in batch.items() if labels or k != "labels"}
    ids = batch if first is None else batch[:first]
    return {"input_ids": ids, "labels": ids} if labels else {"input_ids": ids}


def lead_tensor(batch) -> torch.Tensor:
    """The batch's main tensor (its device, whether it is fake): the ids or the images."""
    return batch["pixel_values"] if isinstance(batch, dict) else batch


def synthetic_batch(s: Scenario, device: str, generator: torch.Generator) -> torch.Tensor | dict:
    """Synthetic tokens: batch_size x seq_len random ids; labels = ids. An image classifier's batch is a dict of
    random images and labels (peftprof/vision/build.py)."""
    if is_vision(s):
        return vision_build.synthetic_batch(s, device, generator)
    return torch.randint(0, s.model.arch.vocab_size, (s.training.batch_size, s.training.seq_len),
                         generator=generator).to(device)


def autocast_context(s: Scenario, device_type: str):
    """The forward (and the loss, computed inside it) under `torch.autocast(device_type, dtype)`, as Accelerate
    wraps a prepared model's forward (accelerator.py prepare_model: get_mixed_precision_context_manager), on
    CPU and CUDA alike; a null context without autocast."""
    if s.precision.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[s.precision.autocast])


def outputs_to_fp32(outputs):
    """Accelerate's `convert_outputs_to_fp32` (utils/operations.py ConvertOutputsToFp32), outside autocast:
    every fp16/bf16 tensor of the output becomes an fp32 copy (the logits), the low-precision one is dropped."""
    for key, value in outputs.items():
        if torch.is_tensor(value) and value.dtype in (torch.float16, torch.bfloat16):
            outputs[key] = value.float()
    return outputs


def grad_scaler(built, s: Scenario, device_type: str):
    """fp16 autocast trains with loss scaling, as Accelerate does for mixed_precision="fp16"
    (accelerator.py: torch.amp.GradScaler; backward = scaler.scale(loss).backward(); the optimizer step =
    scaler.step + scaler.update). Made on first use and kept on `built` (its scale carries across steps)."""
    if s.precision.autocast != "fp16":
        return None
    if getattr(built, "scaler", None) is None:
        built.scaler = torch.amp.GradScaler(device_type)
    return built.scaler


def train_step(built, s: Scenario, ids, probe, where: dict, fault=None) -> None:
    """One optimizer step over grad_accum_steps micro-batches; the phase goes to the probe and to `where`
    (so an out-of-memory names it). The model output is held through backward, as transformers'
    no_trainer examples do (`outputs = model(**batch); outputs.loss.backward()`). With autocast, the forward
    and loss run under it and backward outside it, with loss scaling for fp16 (see `autocast_context`)."""

    def phase(name):
        where["phase"] = name
        probe.set_phase(name)
        inject_fault(fault, name)

    # (the probe tests drive this with stand-ins that carry only training settings: no precision, no ids)
    amp = getattr(getattr(s, "precision", None), "autocast", "none") != "none"
    device_type = lead_tensor(ids).device.type if amp else None
    scaler = grad_scaler(built, s, device_type) if amp else None
    for _ in range(s.training.grad_accum_steps):
        phase("forward")
        with autocast_context(s, device_type) if amp else contextlib.nullcontext():
            outputs = built.model(**model_inputs(ids))
        if amp:
            outputs = outputs_to_fp32(outputs)
        phase("backward")
        (outputs.loss if scaler is None else scaler.scale(outputs.loss)).backward()
        del outputs
    probe.mark_gradients(gradients(built.model))
    phase("optimizer")
    if scaler is None:
        built.optimizer.step()
    elif is_fake(lead_tensor(ids)):
        # GradScaler.step (torch/amp/grad_scaler.py) is unscale_ then optimizer.step() unless an inf was found,
        # which it reads with .item(): fake tensors hold no values, and a steady step finds none
        scaler.unscale_(built.optimizer)
        built.optimizer.step()
        scaler.update()
    else:
        scaler.step(built.optimizer)
        scaler.update()
    built.optimizer.zero_grad(set_to_none=True)
    where["phase"] = "steady"
    probe.set_phase("steady")


def is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def inject_fault(fault, phase):
    """Test hook: raise an out-of-memory in a chosen phase."""
    if fault == phase:
        raise torch.OutOfMemoryError(f"injected out-of-memory in {phase}")


def gradients(model) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def optimizer_state(opt) -> list[torch.Tensor]:
    return [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]


def registered_tensors(built) -> dict[str, list]:
    """Storages that exist before the tracked step, by category: frozen weights and buffers, quantization
    constants, trainable parameters (PEFT) and optimizer state."""
    model = built.model
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    full = all(p.requires_grad for p in model.parameters())
    # peft's prompt/prefix tuning keeps its virtual token ids as a plain tensor (neither parameter nor buffer)
    prompt_ids = [t for t in getattr(model, "prompt_tokens", {}).values() if torch.is_tensor(t)]
    weights = frozen + list(model.buffers()) + prompt_ids + (trainable if full else [])
    return {"quant_constants": built.quant_tensors, "weights": weights,
            "trainable": [] if full else trainable, "optimizer": optimizer_state(built.optimizer)}
