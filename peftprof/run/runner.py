"""Train each variant for real and measure memory per phase and throughput; never lose a result."""

from __future__ import annotations

import gc
import json
import logging
import platform
import signal
import socket
import subprocess
import traceback
import types
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..errors import UserError
from ..estimate import AnalyticUnsupported, estimate
from ..settings import Scenario
from .build import build
from .probe import make_probe, now
from .step import inject_fault, model_inputs, optimizer_state, registered_tensors, synthetic_batch, train_step
from .track import SimulatedOOM

# The libraries of the real stack: an error raised inside one of them is that library refusing the combination.
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "optimum")


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
        adapted = model(**model_inputs(ids, labels=False)).logits.float()
        with model.disable_adapter():
            base = model(**model_inputs(ids, labels=False)).logits.float()
    model.train()
    return {"identity_max_abs_diff": float((adapted - base).abs().max())}


def _merge_checks(built, s: Scenario, ids, probe) -> dict:
    """After training: merged (merge_and_unload) against unmerged outputs and forward latency at batch 1."""
    if s.peft.method not in ("lora", "ia3"):
        return {"merge_max_abs_diff": None}
    model = built.model
    model.eval()
    one = model_inputs(ids, labels=False, first=1)  # batch 1 of the ids or images

    def latency_ms(m) -> float:
        with torch.no_grad():
            m(**one)
            probe.synchronize()
            t0, n = now(), 3
            for _ in range(n):
                m(**one)
            probe.synchronize()
        return (now() - t0) / n * 1000

    with torch.no_grad():
        unmerged = model(**model_inputs(ids, labels=False)).logits.float()
    unmerged_ms = latency_ms(model)
    try:
        merged_model = model.merge_and_unload()
    except (ValueError, NotImplementedError, TypeError) as e:  # e.g. peft cannot merge IA3 into k-bit layers
        return {"merge_max_abs_diff": None, "unmerged_latency_ms": unmerged_ms, "merge_note": str(e)[:300]}
    with torch.no_grad():
        merged = merged_model(**model_inputs(ids, labels=False)).logits.float()
    return {"merge_max_abs_diff": float((merged - unmerged).abs().max()), "unmerged_latency_ms": unmerged_ms,
            "merged_latency_ms": latency_ms(merged_model)}


def run_options(s: Scenario, *, device: str, steps: int | None = None, max_memory: int | None = None) -> dict:
    """The run options that change a measurement (with `settings_key`, what identifies a finished variant);
    `device` is the resolved device."""
    return {"device": device, "steps": steps or s.run.steps, "max_memory": max_memory}


def _base_record(s: Scenario, device: str, options: dict) -> dict:
    est, note = record_estimate(s, device)
    record = {"variant": s.name, "scenario": s.to_dict(), "settings_key": s.settings_key(), "run_options": options,
              "estimate": est, "status": "ok", "measured": None, "checks": {}, "error": None,
              "provenance": provenance(device)}
    if note:
        record["estimate_note"] = note
    return record


def refusing_library(exc: BaseException) -> str | None:
    """The library (of LIBRARIES) of the innermost traceback frame that belongs to one of them, or None."""
    found, tb = None, exc.__traceback__
    while tb is not None:
        top = str(tb.tb_frame.f_globals.get("__name__") or "").split(".", 1)[0]
        if top in LIBRARIES:
            found = top
        tb = tb.tb_next
    return found


def error_info(exc: BaseException, phase: str) -> dict:
    """A failure as a record's `error`: a library refusing says so in one line ("peft refuses: ...")."""
    library = refusing_library(exc)
    text = str(exc).strip()
    if library is None:
        message = f"{type(exc).__name__}: {exc}"[:2000]
    else:
        message = f"{library} refuses: {text.splitlines()[0] if text else type(exc).__name__}"[:500]
    return {"phase": phase, "message": message, "library": library, "exception": type(exc).__name__,
            "traceback": traceback.format_exc()[-4000:]}


def record_estimate(s: Scenario, device: str) -> tuple[dict | None, str | None]:
    """(estimate, note) of a record: the analytic estimate, or for a family it does not model the trace's (whose
    own note says so); None and a note when neither answers (e.g. int4 weights, which the trace cannot
    quantize): the runner still measures."""
    try:
        return estimate(s, device=device), None
    except AnalyticUnsupported:
        from ..trace import trace_estimate

        try:
            return trace_estimate(s, device=device), None
        except UserError as e:  # it says why neither estimator answers
            return None, e.lines()[0]
        except Exception as e:  # noqa: BLE001  a library failing inside the trace: the run measures and records it
            return None, f"the trace failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def _refused_by_estimate(est: dict | None, max_memory: int | None) -> str | None:
    """Refuse to build what the estimate already puts over the cap (protects the host)."""
    if max_memory is None or est is None:
        return None
    b = est["breakdown"]
    need = b["weights"] + b["quant_constants"] + b["trainable"]
    if need <= max_memory:
        return None
    return (f"refused from the estimate: weights + quantization constants + trainable parameters alone are "
            f"estimated at {need:,} B, over the cap {max_memory:,} B; the model was not built")


def run_variant(s: Scenario, *, device: str, steps: int | None = None, max_memory: int | None = None,
                fault: str | None = None, progress=None, snapshot_path=None) -> dict:
    """Build, warm up, train `steps` timed steps and one tracked step; returns the result record. On CPU the
    measurement adds the step's memory timeline and what is live at its peak (peftprof/timeline.py), and
    `snapshot_path` receives the step as a torch memory snapshot (peftprof/snapshot.py)."""
    device = resolve_device(device)
    if s.distributed.world_size > 1:  # one process per rank under torchrun (run/distributed.py)
        from .distributed import run_distributed

        return run_distributed(s, device=device, steps=steps, max_memory=max_memory, fault=fault, progress=progress)
    record = _base_record(s, device, run_options(s, device=device, steps=steps, max_memory=max_memory))
    est = record["estimate"]
    refused = _refused_by_estimate(est, max_memory)
    if refused is not None:
        record.update(status="oom", error={"phase": "build", "message": refused})
        return record
    if s.inference.enabled:  # serving, forward only (run/infer.py)
        from .infer import run_inference

        return run_inference(s, record, device=device, steps=steps, max_memory=max_memory, fault=fault,
                             progress=progress)
    steps = steps or s.run.steps
    probe = make_probe(device, cap_bytes=max_memory, vocab_size=s.model.arch.vocab_size,
                       logits_ndim=getattr(s.model.arch, "logits_ndim", None))
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
        record["checks"]["trainable_dtypes"] = built.trainable_dtypes  # adapters stay fp32 under autocast (peft)
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
        tracker = getattr(probe, "tracker", None)
        if tracker is not None:
            from ..timeline import explain

            record["measured"].update(explain(tracker))
            if snapshot_path is not None:
                from ..snapshot import write_snapshot

                record["measured"]["snapshot_path"] = str(write_snapshot(tracker, snapshot_path))
        where["phase"] = "checks"
        say("checks")
        record["checks"].update(_merge_checks(built, s, ids, probe))
    except (torch.OutOfMemoryError, MemoryError, SimulatedOOM) as e:
        record.update(status="oom", error={"phase": where["phase"], "message": str(e)[:500]})
    except Exception as e:  # any other failure is a result too; the next variant runs
        record.update(status="error", error=error_info(e, where["phase"]))
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



# --- one process per variant -------------------------------------------------------------------------------
# On CUDA the caching allocator's counters and segments, and bitsandbytes' paged buffers (its GlobalPageManager
# never frees them), outlive a variant in its process; a fresh process per variant keeps variants independent.


def _mappingproxy(d: dict):
    return types.MappingProxyType(d)


def _register_pickling() -> None:
    """Scenarios hold read-only mappings, which plain pickle refuses; send them to the child as dicts."""
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.register(types.MappingProxyType, lambda m: (_mappingproxy, (dict(m),)))


def _child_main(conn, target, s: Scenario, kwargs: dict) -> None:
    """In the child: run one variant, send progress messages and then the record (JSON) to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    conf = getattr(s.run, "cuda_alloc_conf", None)
    if conf and kwargs.get("device") == "cuda":
        # read once, when the caching allocator is first used (CUDAAllocatorConfig::instance, a function-local
        # static); nothing in this fresh process has allocated on CUDA yet
        import os

        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    try:
        rec = target(s, progress=lambda msg: conn.send(("progress", msg)), **kwargs)
        conn.send(("record", json.dumps(rec, default=str)))
    except Exception as e:  # run_variant turns failures into records; this is a failure around it
        conn.send(("exception", json.dumps(error_info(e, "startup"))))
    finally:
        conn.close()


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        hint = ", as the kernel's out-of-memory killer does" if -code == signal.SIGKILL else ""
        return f"was killed by signal {-code} ({name}{hint})"
    return f"exited with code {code} without a result"


def run_variant_isolated(s: Scenario, *, device: str, steps: int | None = None, max_memory: int | None = None,
                         fault: str | None = None, progress=None, target=None) -> dict:
    """`run_variant` in a fresh process (multiprocessing, spawn): its record comes back through a pipe. A child
    that dies without one becomes a `status: error` record naming its exit code or signal. `target` replaces
    run_variant in the child (tests; a module-level function)."""
    import multiprocessing as mp

    device = resolve_device(device)
    _register_pickling()
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    kwargs = {"device": device, "steps": steps, "max_memory": max_memory, "fault": fault}
    proc = ctx.Process(target=_child_main, args=(send, target or run_variant, s, kwargs), daemon=True,
                       name=f"peftprof variant {s.name[:60]}")
    say = progress or (lambda msg: None)
    last, result, failure = "startup", None, None
    proc.start()
    send.close()  # the child holds the only writing end: its death is EOF here
    try:
        while True:
            try:
                kind, payload = recv.recv()
            except EOFError:
                break
            if kind == "progress":
                last = payload
                say(payload)
            elif kind == "record":
                result = json.loads(payload)
            else:
                failure = {**json.loads(payload), "phase": last}
        proc.join()
    except BaseException:  # Ctrl-C, SIGTERM: the variant is abandoned with its process
        proc.kill()
        proc.join()
        raise
    finally:
        recv.close()
    if result is not None:
        return result
    record = _base_record(s, device, run_options(s, device=device, steps=steps, max_memory=max_memory))
    if failure is None:
        failure = {"phase": last, "message": f"the variant's process {_death(proc.exitcode)} during {last}",
                   "exit_code": proc.exitcode}
    record.update(status="error", error=failure)
    return record
