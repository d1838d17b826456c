"""What to change so that a variant fits: the smallest single changes, each with its new estimated peak and
its estimated speed cost, from the analytic estimator (peftprof/estimate, ~0.5 ms a variant).

A variant gets advice when it needs more than (1 - ADVISE_HEADROOM) of the target's memory: it does not fit,
or it fits with less than 5% to spare. Each knob is moved by the smallest step that brings it under that
budget: the fewest checkpointed layers (every_k with the largest k), the largest micro-batch (with gradient
accumulation keeping the tokens per step), the longest sequence, an 8-bit (or paged 8-bit) optimizer, NF4
weights with double quantization, peft's default target modules. Speed is the analytic prediction (model
FLOPs at a fixed utilisation, estimate/flops.py): it counts recomputation and fewer tokens, not kernel
efficiency; where that is what changes, the note says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .catalog import Gpu, gpus
from .errors import UserError
from .families import family
from .settings import (
    DistributedSettings,
    InferenceSettings,
    ModelSettings,
    PeftSettings,
    PrecisionSettings,
    RunSettings,
    Scenario,
    TrainingSettings,
    frozen_mapping,
)
from .vision import is_vision

ADVISE_HEADROOM = 0.05  # advise when less than 5% of the memory would stay free; changes must leave 5% free
NOT_MODELLED = "the analytic speed model counts FLOPs only"


@dataclass(frozen=True)
class Target:
    """What the variant must fit: a catalogue GPU (CUDA estimate) or a memory cap (--max-memory on CPU)."""

    name: str
    memory_bytes: int
    device: str
    gpu: Gpu | None = None

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_bytes * (1 - ADVISE_HEADROOM))


def gpu_target(gpu: Gpu) -> Target:
    return Target(name=gpu.name, memory_bytes=gpu.memory_bytes, device="cuda", gpu=gpu)


def need_bytes(est: dict) -> int:
    """What a target must hold: device bytes on CUDA (context, reservation), the peak elsewhere."""
    return est.get("device_bytes") or est["peak_bytes"]


TEXT_COMBINE = "combine them (e.g. 4-bit weights and checkpointing)"
VISION_COMBINE = ("advice on an image classifier tries smaller micro-batches only (4-bit weights are refused on it, "
                  "checkpointing on ResNet, and the analytic model sizes neither checkpointing nor 8-bit "
                  "optimizers): try a smaller image_size or fewer adapted layers")


def _estimate(s: Scenario, target: Target) -> dict:
    from .estimate import estimate

    return estimate(s, device=target.device, gpu=target.gpu)


def _replace(s: Scenario, section: str, **changes) -> Scenario:
    return dataclasses.replace(s, **{section: dataclasses.replace(getattr(s, section), **changes)})


def _candidates(s: Scenario):
    """(change text, dotted key, value, scenarios to try in order of preference, note)."""
    t, p, f = s.training, s.precision, s.peft
    a = s.model.arch
    if is_vision(s):  # the loader refuses 4-bit weights and ResNet checkpointing; the analytic model 8-bit states
        yield from _micro_batches(s)
        return
    if f.method != "prefix_tuning" and t.checkpoint_every != 1:  # peft refuses prefix tuning + checkpointing
        every = t.checkpoint_every or a.n_layers + 1
        ks = [k for k in (8, 4, 2, 1) if k < every and k <= a.n_layers]
        yield ("gradient checkpointing", "training.gradient_checkpointing",
               [_replace(s, "training", gradient_checkpointing="full" if k == 1 else f"every_{k}") for k in ks],
               "recomputes the checkpointed layers' forward in backward")
    if t.optimizer in ("adamw", "paged_adamw"):
        yield ("optimizer", "training.optimizer", [_replace(s, "training", optimizer="adamw_8bit")],
               f"8-bit states (bitsandbytes); {NOT_MODELLED}")
    if t.optimizer in ("adamw", "paged_adamw", "adamw_8bit"):
        yield ("optimizer", "training.optimizer", [_replace(s, "training", optimizer="paged_adamw_8bit")],
               f"states in CUDA unified memory, outside the peak; {NOT_MODELLED}")
    yield from _micro_batches(s)
    if t.seq_len > 1:
        lengths, n = [], t.seq_len
        while n > 16:
            n //= 2
            lengths.append(n)
        yield ("sequence length", "training.seq_len", [_replace(s, "training", seq_len=n) for n in lengths],
               "trains on shorter sequences (changes what is learned)")
    if f.method != "full" and not p.is_4bit:
        compute = p.compute_dtype if p.compute_dtype in ("bf16", "fp16") else "bf16"
        yield ("4-bit weights", "precision.weights",
               [_replace(s, "precision", weights="nf4", double_quant=True, compute_dtype=compute)],
               f"QLoRA (NF4, double quantization); dequantization cost: {NOT_MODELLED}")
    default = getattr(family(a.model_type), "ia3_targets" if f.method == "ia3" else "lora_targets")
    if f.method in ("lora", "ia3") and f.target_modules is not None and default is not None:  # peft has defaults
        fewer = _replace(s, "peft", target_modules=None)
        if len(fewer.peft.targeted_linears(a)) < len(f.targeted_linears(a)):
            yield ("target modules", "peft.target_modules", [fewer], "peft's default modules for "
                   f"{a.model_type}: {', '.join(fewer.peft.targets(a))}")


def _micro_batches(s: Scenario):
    t = s.training
    if t.batch_size > 1:
        divisors = [b for b in range(t.batch_size - 1, 0, -1) if t.batch_size % b == 0]
        yield ("micro-batch", "training.batch_size",
               [_replace(s, "training", batch_size=b, grad_accum_steps=t.grad_accum_steps * (t.batch_size // b))
                for b in divisors],
               f"same tokens per step through gradient accumulation; smaller matmuls run less efficiently "
               f"({NOT_MODELLED})")


def _value(s: Scenario, key: str):
    section, _, field = key.partition(".")
    v = getattr(getattr(s, section), field)
    if key == "peft.target_modules" and v is None:
        return "default"
    return v


def _describe(base: Scenario, new: Scenario, key: str) -> str:
    text = f"{key} = {_value(new, key)}"
    if key == "training.batch_size":
        text += f", training.grad_accum_steps = {new.training.grad_accum_steps}"
    if key == "precision.weights":
        text += ", precision.double_quant = true"
    return text


def advise(s: Scenario, target: Target) -> dict:
    """{"target", "memory_bytes", "budget_bytes", "need_bytes", "needed": bool, "changes": [...]}: every
    single change that fits, those that keep the training the same first, each group fastest first. Each
    change: knob, change, key, value, peak_bytes, need_bytes, tokens_per_s and speed_change_pct (when the
    target is a GPU), note."""
    base = _estimate(s, target)
    out = {"target": target.name, "device": target.device, "memory_bytes": target.memory_bytes,
           "budget_bytes": target.budget_bytes, "need_bytes": need_bytes(base), "peak_bytes": base["peak_bytes"],
           "needed": need_bytes(base) > target.budget_bytes, "changes": [],
           "combine": VISION_COMBINE if is_vision(s) else TEXT_COMBINE}
    if not out["needed"]:
        return out
    base_tps = base.get("predicted_tokens_per_s")
    for label, key, tries, note in _candidates(s):
        for new in tries:
            try:
                est = _estimate(new, target)
            except (ValueError, KeyError, ZeroDivisionError, UserError):  # a combination the estimator cannot size
                continue
            if need_bytes(est) > target.budget_bytes:
                continue
            tps = est.get("predicted_tokens_per_s")
            out["changes"].append({
                "knob": label, "change": _describe(s, new, key), "key": key, "value": _value(new, key),
                "peak_bytes": est["peak_bytes"], "need_bytes": need_bytes(est),
                "tokens_per_s": tps, "speed_change_pct": None if not (tps and base_tps) else
                round((tps / base_tps - 1) * 100, 1), "note": note})
            break
    # what keeps the training the same first (a shorter sequence changes what is learned), then the fastest
    out["changes"].sort(key=lambda c: (c["key"] == "training.seq_len", -(c["speed_change_pct"] or 0),
                                       c["need_bytes"]))
    return out


# --- from a result record (the report) ---

def scenario_from_dict(d: dict) -> Scenario:
    """The Scenario behind a record's `scenario` (Scenario.to_dict); ValueError/TypeError/KeyError when it is
    not one."""
    peft = dict(d["peft"])
    for key in ("target_modules", "modules_to_save", "target_parameters"):  # JSON lists; settings hold tuples
        if isinstance(peft.get(key), list):
            peft[key] = tuple(peft[key])
    model = d["model"]
    return Scenario(name=d["name"], scenario=d.get("scenario", d["name"]),
                    model=ModelSettings(preset=model.get("preset"), config_file=model.get("config_file"),
                                        config=frozen_mapping(model["config"])),
                    precision=PrecisionSettings(**d["precision"]), peft=PeftSettings(**peft),
                    training=TrainingSettings(**d["training"]), run=RunSettings(**d["run"]),
                    # absent from records written before these sections existed: their defaults
                    distributed=DistributedSettings(**d.get("distributed", {})),
                    inference=InferenceSettings(**d.get("inference", {})))


def record_target(record: dict, s: Scenario) -> Target | None:
    """The target of a record: its estimate's GPU; else the run's --max-memory cap (CPU); else the largest
    catalogue GPU the variant does not fit (what to change to fit a smaller GPU), None when every GPU holds it."""
    table = gpus()
    name = record["estimate"].get("gpu")
    if isinstance(name, str) and name in table:
        return gpu_target(table[name])
    cap = (record.get("run_options") or {}).get("max_memory")
    if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
        return Target(name=f"--max-memory {cap / (1 << 30):.2f} GiB", memory_bytes=cap, device="cpu")
    from .estimate import estimate

    need = need_bytes(estimate(s, device="cuda"))
    smaller = [g for g in table.values() if g.memory_bytes * (1 - ADVISE_HEADROOM) < need]
    return gpu_target(max(smaller, key=lambda g: g.memory_bytes)) if smaller else None


def advise_record(record: dict) -> dict | None:
    """Advice for a result record, or None when it needs none or its scenario cannot be rebuilt."""
    try:
        s = scenario_from_dict(record["scenario"])
        target = record_target(record, s)
        out = None if target is None else advise(s, target)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, UserError):
        return None  # e.g. a family the analytic estimator (which advice runs on) does not model
    return out if out is not None and out["needed"] else None


def advice_lines(variant: str, advice: dict) -> list[str]:
    """Terminal text: what the variant needs and each change that fits (`visible` applied by the caller)."""
    gib = 1 << 30
    if "unavailable" in advice:
        return [f"{variant}: no advice: {advice['unavailable']} (advice runs on the analytic estimator)"]
    head = (f"{variant}: needs {advice['need_bytes'] / gib:.2f} GiB of {advice['target']} "
            f"({advice['memory_bytes'] / gib:.2f} GiB; advice keeps {ADVISE_HEADROOM:.0%} free)")
    if not advice["needed"]:
        return [head + ": fits, nothing to change"]
    if not advice["changes"]:
        return [head + ": no single change fits; " + advice.get("combine", TEXT_COMBINE)]
    lines = [head + ", changes that fit:"]
    for c in advice["changes"]:
        speed = "speed not predicted" if c["speed_change_pct"] is None else f"speed {c['speed_change_pct']:+.1f}%"
        lines.append(f"  {c['change']}: {c['need_bytes'] / gib:.2f} GiB, {speed} ({c['note']})")
    return lines
