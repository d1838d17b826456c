"""The training step that the runner measures and the trace estimator replays on fake tensors: one
public home both import, so they run the same code by construction."""

from __future__ import annotations

import torch

from ..settings import Scenario


def synthetic_batch(s: Scenario, device: str, generator: torch.Generator) -> torch.Tensor:
    """Synthetic tokens: batch_size x seq_len random ids; labels = ids."""
    return torch.randint(0, s.model.arch.vocab_size, (s.training.batch_size, s.training.seq_len),
                         generator=generator).to(device)


def train_step(built, s: Scenario, ids, probe, where: dict, fault=None) -> None:
    """One optimizer step over grad_accum_steps micro-batches; the phase goes to the probe and to `where`
    (so an out-of-memory names it). The model output is held through backward, as transformers'
    no_trainer examples do (`outputs = model(**batch); outputs.loss.backward()`)."""

    def phase(name):
        where["phase"] = name
        probe.set_phase(name)
        inject_fault(fault, name)

    for _ in range(s.training.grad_accum_steps):
        phase("forward")
        outputs = built.model(input_ids=ids, labels=ids)
        phase("backward")
        outputs.loss.backward()
        del outputs
    probe.mark_gradients(gradients(built.model))
    phase("optimizer")
    built.optimizer.step()
    built.optimizer.zero_grad(set_to_none=True)
    where["phase"] = "steady"
    probe.set_phase("steady")


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
