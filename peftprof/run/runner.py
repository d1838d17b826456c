"""Train each variant for real and measure memory per phase and throughput; never lose a result."""

from __future__ import annotations

import gc
import logging
import warnings
import platform
import socket
import subprocess
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..estimate import estimate
from ..settings import Scenario
from .build import build
from .probe import make_probe, now
from .step import inject_fault, optimizer_state, registered_tensors, synthetic_batch, train_step
from .track import SimulatedOOM



def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch sees no CUDA device")
    return device


def provenance(device: str) -> dict:
    import bitsandbytes
    import peft
    import transformers

    from .. import __version__

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        pass
    return {"peftprof": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "commit": commit, "host": socket.gethostname(), "time": datetime.now(timezone.utc).isoformat()}


def _adapter_checks(built, s: Scenario, ids) -> dict:
    """PEFT practice: B=0 / ones initialisation leaves the output unchanged (before training)."""
    if s.peft.method not in ("lora", "ia3"):
        return {"identity_max_abs_diff": None}
    model = built.model
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float()
    model.train()
    return {"identity_max_abs_diff": float((adapted - base).abs().max())}


def _merge_checks(built, s: Scenario, ids, probe) -> dict:
    """After training: merged (merge_and_unload) against unmerged outputs and forward latency at batch 1."""
    if s.peft.method not in ("lora", "ia3"):
        return {"merge_max_abs_diff": None}
    model = built.model
    model.eval()
    one = ids[:1]

    def latency_ms(m) -> float:
        with torch.no_grad():
            m(input_ids=one)
            probe.synchronize()
            t0, n = now(), 3
            for _ in range(n):
                m(input_ids=one)
            probe.synchronize()
        return (now() - t0) / n * 1000

    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
    unmerged_ms = latency_ms(model)
    try:
        merged_model = model.merge_and_unload()
    except (ValueError, NotImplementedError, TypeError) as e:  # e.g. peft cannot merge IA3 into k-bit layers
        return {"merge_max_abs_diff": None, "unmerged_latency_ms": unmerged_ms, "merge_note": str(e)[:300]}
    with torch.no_grad():
        merged = merged_model(input_ids=ids).logits.float()
    return {"merge_max_abs_diff": float((merged - unmerged).abs().max()), "unmerged_latency_ms": unmerged_ms,
            "merged_latency_ms": latency_ms(merged_model)}


def run_variant(s: Scenario, *, device: str, steps: int | None = None, max_memory: int | None = None,
                fault: str | None = None, progress=None) -> dict:
    """Build, warm up, train `steps` timed steps and one tracked step; returns the result record."""
    device = resolve_device(device)
    est = estimate(s, device=device)
    record = {"variant": s.name, "scenario": s.to_dict(), "settings_key": s.settings_key(), "estimate": est,
              "status": "ok", "measured": None, "checks": {}, "error": None, "provenance": provenance(device)}
    steps = steps or s.run.steps
    probe = make_probe(device, cap_bytes=max_memory, vocab_size=s.model.arch.vocab_size)
    where = {"phase": "build"}
    say = progress or (lambda msg: None)
    built = None
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it logs a cast warning on every int8 call
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not results
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        say("build")
        inject_fault(fault, "build")
        built = build(s, device)
        if max_memory is not None and built.wrapped_bytes > max_memory:
            raise SimulatedOOM(f"the model alone needs {built.wrapped_bytes:,} B, over the cap {max_memory:,} B")
        gen = torch.Generator().manual_seed(s.run.seed)
        ids = synthetic_batch(s, device, gen)
        where["phase"] = "checks"
        record["checks"].update(_adapter_checks(built, s, ids))
        record["checks"]["quantization_rel_error"] = built.quantization_error
        built.model.train()
        for i in range(s.run.warmup_steps):
            say(f"warm-up step {i + 1}/{s.run.warmup_steps}")
            train_step(built, s, ids, probe, where)
        times = []
        for i in range(steps):
            say(f"step {i + 1}/{steps}")
            probe.synchronize()
            t0 = now()
            train_step(built, s, ids, probe, where)
            probe.synchronize()
            times.append(now() - t0)
        say("tracked step")
        with probe.tracking(registered_tensors(built)):
            train_step(built, s, ids, probe, where, fault)
        tracked = probe.result(optimizer_state(built.optimizer))
        step_time = sorted(times)[len(times) // 2]
        tokens = s.training.batch_size * s.training.seq_len * s.training.grad_accum_steps
        phases = [{"phase": "built", "bytes": built.base_bytes}, {"phase": "wrapped", "bytes": built.wrapped_bytes}]
        phases += [{"phase": p, "bytes": tracked.phase_peaks.get(p, 0)} for p in ("forward", "backward", "optimizer")]
        phases.append({"phase": "steady", "bytes": tracked.steady_bytes})
        record["measured"] = {"device": device, "peak_bytes": tracked.peak_bytes, "peak_phase": tracked.peak_phase,
                              "breakdown": tracked.breakdown, "phases": phases, "step_time_s": step_time,
                              "step_times_s": times, "tokens_per_s": tokens / step_time}
        where["phase"] = "checks"
        say("checks")
        record["checks"].update(_merge_checks(built, s, ids, probe))
    except (torch.OutOfMemoryError, MemoryError, SimulatedOOM) as e:
        record.update(status="oom", error={"phase": where["phase"], "message": str(e)[:500]})
    except Exception as e:  # any other failure is a result too; the next variant runs
        record.update(status="error", error={"phase": where["phase"], "message": f"{type(e).__name__}: {e}"[:2000],
                                             "traceback": traceback.format_exc()[-4000:]})
    finally:
        extra = probe.finish()
        if record["measured"] is not None:
            record["measured"].update(extra)
        elif record["status"] != "ok":
            record["measured"] = None
        del built
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return record

