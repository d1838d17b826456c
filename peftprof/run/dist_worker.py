"""One rank of a [distributed] run, started by torchrun (peftprof/run/distributed.py launch_command):
`python -m peftprof.run.dist_worker SPEC OUT_DIR`. It builds the variant as the runner does, wraps it (DDP or
FSDP2), trains the warm-up and timed steps, tracks one step with the runner's probe, and writes
OUT_DIR/rank<R>.json: {rank, status, error, measured, checks}. A rank that fails writes its record and exits 1,
so that torchrun stops the others (which would otherwise wait in a collective)."""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .build import build, make_optimizer, model_bytes
from .distributed import apply_strategy, clear_buckets, held_outside_step, inner_model, unsettled_collectives
from .probe import make_probe, now
from .runner import _adapter_checks, error_info
from .step import inject_fault, optimizer_state, registered_tensors, synthetic_batch, train_step
from .track import SimulatedOOM


class _View:
    """What registered_tensors reads: the model under its parallel wrapper, the optimizer, quant tensors."""

    def __init__(self, built):
        self.model, self.optimizer, self.quant_tensors = inner_model(built.model), built.optimizer, built.quant_tensors


def run_rank(s, *, device: str, steps: int, max_memory: int | None, fault: str | None) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    rec = {"rank": rank, "status": "ok", "error": None, "measured": None, "checks": {}}
    probe = make_probe(device, cap_bytes=max_memory, vocab_size=s.model.arch.vocab_size)
    where = {"phase": "build"}
    fault = fault if rank == 0 else None  # test hook: one rank fails, torchrun stops the others
    try:
        inject_fault(fault, "build")
        built = build(s, device)
        gen = torch.Generator().manual_seed(s.run.seed + rank)  # each rank its own batch, as a sampler gives
        ids = synthetic_batch(s, device, gen)
        where["phase"] = "checks"
        rec["checks"].update(_adapter_checks(built, s, ids))
        rec["checks"]["quantization_rel_error"] = built.quantization_error
        where["phase"] = "build"
        built.model = apply_strategy(built.model, s, torch.device(device).type)
        built.optimizer = make_optimizer(s, built.model.parameters())  # over the sharded parameters
        sharded_bytes = model_bytes(inner_model(built.model), built.quant_tensors)
        if max_memory is not None and sharded_bytes > max_memory:
            raise SimulatedOOM(f"the sharded model alone needs {sharded_bytes:,} B, over the cap {max_memory:,} B")
        built.model.train()
        for _ in range(max(1, s.run.warmup_steps)):  # FSDP initialises lazily in the first forward
            train_step(built, s, ids, probe, where)
        times = []
        for i in range(steps):
            if i == steps - 1:
                clear_buckets(built.model)  # DDP: the last untracked step records the current buckets
            probe.synchronize()
            t0 = now()
            train_step(built, s, ids, probe, where)
            probe.synchronize()
            times.append(now() - t0)
        registered = registered_tensors(_View(built))
        for category, tensors in held_outside_step(built.model).items():
            registered[category] = registered.get(category, []) + tensors
        with probe.tracking(registered):
            train_step(built, s, ids, probe, where, fault)
        tracked = probe.result(optimizer_state(built.optimizer))
        step_time = sorted(times)[len(times) // 2]
        tokens = s.training.batch_size * s.training.seq_len * s.training.grad_accum_steps
        phases = [{"phase": "built", "bytes": built.base_bytes}, {"phase": "wrapped", "bytes": built.wrapped_bytes},
                  {"phase": "sharded", "bytes": sharded_bytes}]
        phases += [{"phase": p, "bytes": tracked.phase_peaks.get(p, 0)} for p in ("forward", "backward", "optimizer")]
        phases.append({"phase": "steady", "bytes": tracked.steady_bytes})
        rec["measured"] = {"rank": rank, "world_size": world, "device": device, "peak_bytes": tracked.peak_bytes,
                           "peak_phase": tracked.peak_phase, "breakdown": tracked.breakdown, "phases": phases,
                           "step_time_s": step_time, "step_times_s": times, "tokens": tokens,
                           "tokens_per_s": tokens / step_time}
        tracker = getattr(probe, "tracker", None)
        if tracker is not None:
            from ..timeline import explain

            rec["measured"].update(explain(tracker))
            # 0 when every free was seen in the step's program order (run/distributed.py wait_released)
            rec["measured"]["off_thread_frees"] = tracker.off_thread_frees
        rec["measured"]["unsettled_collectives"] = unsettled_collectives()
        rec["checks"]["merge_max_abs_diff"] = None
        rec["checks"]["merge_note"] = "not checked under [distributed] (peft merges an unsharded model)"
    except (torch.OutOfMemoryError, MemoryError, SimulatedOOM) as e:
        rec.update(status="oom", error={"phase": where["phase"], "message": str(e)[:500]}, failed_at=time.time())
    except Exception as e:  # a library refusing, a collective failing: a result with its phase
        rec.update(status="error", error=error_info(e, where["phase"]), failed_at=time.time())
    finally:
        extra = probe.finish()
        if rec["measured"] is not None:
            rec["measured"].update(extra)
    return rec


def die_with_parent() -> None:
    """Linux: SIGKILL this rank when torchrun (its parent) dies, so that no rank outlives a killed launch."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    die_with_parent()
    spec_path, out_dir = Path(argv[0]), Path(argv[1])
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)  # written by distributed.write_spec for this run
    s, o = spec["scenario"], spec["options"]
    device = o["device"]
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    rec = run_rank(s, device=device, steps=o["steps"], max_memory=o["max_memory"], fault=o["fault"])
    tmp = out_dir / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(rec, default=str))
    os.replace(tmp, out_dir / f"rank{rank}.json")
    if rec["status"] != "ok":
        sys.stdout.flush()
        os._exit(1)  # without waiting for peers blocked in a collective: torchrun stops them
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
