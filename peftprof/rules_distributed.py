"""[distributed]: keys and the rules between them and the rest of a variant (owned by the distributed work).

`check` sees the valid keys of every section of one variant as mutable dicts (problems in `c`; keys that do
not apply to this variant go to `cond` and are dropped).

Decisions (docs/distributed.md, "The estimate"):
- world_size 1 is one process training alone: a strategy other than ddp, or cpu_offload = true, does not apply
  to it ("not applicable", so a sweep over world_size = [1, 2, 4] with strategy = "fsdp" works; a file where no
  variant has world_size > 1 is an error). Such variants are single-device variants, settings unchanged.
- cpu_offload only where the strategy has it: FSDP2 CPUOffloadPolicy (sharded parameters, gradients, optimizer
  step on the host), ZeRO-Offload (zero1/zero2: optimizer state; zero3: parameters and optimizer state); DDP
  has none.
- What the libraries refuse under FSDP2 `fully_shard` (measured, torch 2.13, bitsandbytes 0.50.2,
  optimum-quanto 0.2.7; /tmp-free reproduction in benchmarks/distributed_accuracy.py --refusals): bitsandbytes
  int8 weights (the gathered parameter is no longer Int8Params: "'Parameter' object has no attribute 'CB'"),
  bitsandbytes optimizers (no DTensor sharding strategy for bitsandbytes.optimizer_update_*), and optimum-quanto
  int4, which fully_shard silently turns into plain bf16 shards (the model is no longer 4-bit). bitsandbytes
  4-bit is accepted: FSDP2 shards the packed uint8 weights like any tensor and each rank keeps the whole
  quant_state (the runner restores it on the module: run/distributed.py restore_bnb_quant_state). The Hugging
  Face FSDP + QLoRA guide's bnb_4bit_quant_storage = compute dtype serves FSDP1's uniform flat parameters;
  the bytes are the same.
- ZeRO (zero1/2/3) estimates are formulas, unmeasured here (DeepSpeed does not run on our machines): the
  estimate says so in its note. They model torch AdamW and SGD only.
- Families and PEFT options only the trace answers for: the per-rank trace (trace_distributed.py) covers ddp
  and fsdp without cpu_offload; ZeRO and cpu_offload need the analytic estimator, so those are refused there.
"""

from __future__ import annotations

from .schema import Collector, Key
from .settings import BNB_4BIT_KINDS, STRATEGIES

SCHEMA: dict[str, Key] = {
    "world_size": Key("int", 1, 65536),
    "strategy": Key("choice", choices=STRATEGIES),
    "cpu_offload": Key("bool"),
}

OFFLOAD_STRATEGIES = ("fsdp", "zero1", "zero2", "zero3")  # DDP keeps everything on the device
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw", "paged_adamw_8bit")
SHARDED_PARAM_STRATEGIES = ("fsdp", "zero3")  # the parameters themselves are partitioned


def check(c: Collector, cond: Collector, parts, model) -> None:
    """Rules of [distributed] against the other sections. `parts`: schema.Parts. Every problem is added
    (none hides another)."""
    dist = parts.dist
    world = dist.get("world_size", 1)
    strategy = dist.get("strategy", "ddp")
    if parts.inf.get("enabled", False):
        for key in [k for k in ("world_size", "strategy", "cpu_offload") if k in dist]:
            cond.add("distributed", key, "applies to training; [inference] serves on one device")
            dist.pop(key)
        return
    if world == 1:
        if strategy != "ddp":
            cond.add("distributed", "strategy", f"{strategy} applies only with world_size > 1 (world_size 1 trains "
                     "in one process, unsharded)")
        if dist.get("cpu_offload", False):
            cond.add("distributed", "cpu_offload", "applies only with world_size > 1 and strategy fsdp, zero1, "
                     "zero2 or zero3")
        for key in ("strategy", "cpu_offload"):
            dist.pop(key, None)
        return
    if dist.get("cpu_offload", False) and strategy not in OFFLOAD_STRATEGIES:
        c.add("distributed", "cpu_offload", f"{strategy} has no CPU offload (DDP keeps parameters, gradients and "
              "optimizer state on every device)", "false, or strategy fsdp | zero1 | zero2 | zero3")
    weights = parts.prec.get("weights", "bf16")
    if strategy in SHARDED_PARAM_STRATEGIES and weights in ("int8", "int4"):
        why = {"int8": "the gathered parameter is no longer bitsandbytes Int8Params (\"no attribute 'CB'\")",
               "int4": "it turns optimum-quanto's int4 weights into plain bf16 shards (no longer 4-bit)"}[weights]
        msg = (f"FSDP2 fully_shard cannot shard {weights} weights: {why}; measured" if strategy == "fsdp" else
               f"the ZeRO-3 estimate does not model partitioned {weights} weights")
        c.add("distributed", "strategy", msg, f"ddp | zero1 | zero2, or weights {' | '.join(BNB_4BIT_KINDS)} "
              "| fp32 | fp16 | bf16")
    optimizer = parts.train.get("optimizer", "adamw")
    if strategy != "ddp" and optimizer in BNB_OPTIMIZERS:
        msg = ("bitsandbytes optimizers cannot step FSDP2's sharded (DTensor) parameters: no sharding strategy "
               "for bitsandbytes.optimizer_update_*; measured" if strategy == "fsdp" else
               "the ZeRO estimate models torch AdamW and SGD only")
        c.add("training", "optimizer", f"{optimizer} with strategy {strategy}: {msg}", "adamw | sgd, or strategy ddp")
    traced = strategy in ("ddp", "fsdp") and not dist.get("cpu_offload", False)
    if model is not None and not traced:
        from .arch import analytic_gap

        gap = analytic_gap(model.arch.model_type) or _peft_gap(parts.peft)
        if gap:
            c.add("distributed", "strategy", f"{strategy}{' with cpu_offload' if strategy in ('ddp', 'fsdp') else ''}"
                  f" is estimated by the analytic estimator alone (the per-rank trace runs ddp and fsdp without "
                  f"offload), and {gap}", "ddp | fsdp without cpu_offload, for this model and PEFT setting")


def _peft_gap(peft: dict) -> str | None:
    """estimate/peft_methods.analytic_gap on this variant's [peft] keys (the loader has no Scenario yet)."""
    from types import SimpleNamespace

    from .estimate import peft_methods
    from .settings import PeftSettings

    try:
        settings = PeftSettings(**peft)
    except TypeError:  # a key the settings do not take yet: another rule reports it
        return None
    return peft_methods.analytic_gap(SimpleNamespace(peft=settings))
