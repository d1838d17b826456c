"""[distributed] runs: launch a variant on `world_size` ranks with torchrun, wrap its model in DDP or FSDP2 the way
training recipes do, and assemble the ranks' measurements into one record (`measured.ranks`, the top-level peak
being the largest rank's). The per-rank trace (peftprof/trace_distributed.py) wraps its fake model with the same
functions here, so trace and measurement run the same code.

What a rank measures is the runner's own tracked step (run/step.py train_step under run/probe.py's probe); the
only additions are the storages the parallel wrappers hold outside it: DDP's gradient buckets and FSDP2's
unsharded parameters (allocated and freed by resizing their storages in place; run/track.py follows resizes).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

from ..settings import Scenario

MEASURED_STRATEGIES = ("ddp", "fsdp")  # DeepSpeed ZeRO (zero1/2/3) is estimated, not run (docs/distributed.md)
DEFAULT_TIMEOUT_S = 3600.0
_TAIL = 3000  # characters of torchrun's output kept in an error


# --- wrapping a model ----------------------------------------------------------------------------------------


def unit_modules(model) -> list[torch.nn.Module]:
    """The modules FSDP wraps one by one: the decoder layers, named by the model's `_no_split_modules` as
    Accelerate's FSDP plugin picks its auto-wrap classes (accelerate/utils/dataclasses.py
    FullyShardedDataParallelPlugin: transformer_cls_names_to_wrap defaults to model._no_split_modules); torchtune
    shards each decoder layer the same way (torchtune/training/_distributed.py shard_model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def restore_bnb_quant_state(model) -> None:
    """bitsandbytes keeps a 4-bit weight's quantization state on the parameter object; FSDP replaces the
    parameter, and Linear4bit.forward then restores the state from the module (nn/modules.py
    fix_4bit_weight_quant_state_from_module), which Linear4bit sets only when it quantizes its own weight. The
    runner assigns the quantized Params4bit itself (run/build.py quantize_bnb), so set it here."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight, "quant_state", None) is not None:
            m.quant_state = m.weight.quant_state


def apply_strategy(model, s: Scenario, device_type: str, mesh=None, init_sync: bool = True):
    """DDP, or FSDP2 `fully_shard` on each decoder layer and then the root (torchtune's and the Hugging Face
    FSDP + QLoRA recipes' layout; FSDP2 shards every parameter, frozen ones included, along dim 0, so 4-bit
    weights shard in their uint8 storage). Returns the model to train (DDP's wrapper, or the FSDP model).
    `init_sync=False`: DDP skips its start-up check and broadcast of the ranks' parameters (they read values,
    which fake tensors have none of; nothing they allocate outlives the constructor)."""
    d = s.distributed
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if device_type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, init_sync=init_sync)
        ddp.register_comm_hook(None, bucket_recorder())
        return ddp
    if d.strategy != "fsdp":
        raise ValueError(f"strategy {d.strategy!r} is not run by peftprof (measured: {', '.join(MEASURED_STRATEGIES)})")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    restore_bnb_quant_state(model)
    mesh = mesh if mesh is not None else init_device_mesh(device_type, (d.world_size,))
    # CPU offload keeps the sharded parameters, gradients and optimizer step on the host (FSDP2
    # CPUOffloadPolicy); pinned memory needs CUDA
    offload = CPUOffloadPolicy(pin_memory=device_type == "cuda") if d.cpu_offload else OffloadPolicy()
    for layer in unit_modules(model):
        fully_shard(layer, mesh=mesh, offload_policy=offload)
    fully_shard(model, mesh=mesh, offload_policy=offload)
    if dist.get_backend(mesh.get_group()) == "gloo":  # (not the trace's fake process group, nor nccl)
        settle_collectives(model)
    return model


# --- collectives that finish in program order (gloo) ------------------------------------------------------------


def storage_refs(t: torch.Tensor) -> int:
    """References to a tensor's storage (c10 StorageImpl use count): one per tensor or view, in Python or C++."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def wait_released(tensors, refs: list[int], timeout_s: float = 10.0) -> bool:
    """Wait until no more references than `refs` hold each tensor's storage. gloo runs a collective on a worker
    thread that marks it complete (waking the caller) before it drops its own references to the work and the
    tensors the work holds (ProcessGroupGloo.cpp runLoop: AsyncWork::execute(work), then
    workInProgress_[i].reset()); a buffer the caller frees next then dies on that thread, after the caller's
    next allocations: measured, 12-13% of synchronous all-gathers and reduce-scatters return with the worker's
    references still held (2 ranks, 4,000 collectives each), which moved gpt2-lora-fsdp2's measured peak from
    3,819,976 B to 3,940,808 B (a layer's prefetched all-gather buffer alive beside the next one). False if still
    held after the timeout."""
    deadline = time.monotonic() + timeout_s
    while any(storage_refs(t) > n for t, n in zip(tensors, refs, strict=True)):
        if time.monotonic() > deadline:
            return False
        os.sched_yield()
    return True


def _settled(base):
    """FSDP2's default collective (`base`: fsdp/_fully_shard/_fsdp_collectives.py DefaultAllGather or
    DefaultReduceScatter, whose allocate() it keeps) that returns only when the backend holds no reference to its
    tensors, so that every buffer dies where FSDP drops it, in program order: the order the per-rank trace (fake
    process group: no threads) and the estimate follow. `unsettled` counts collectives whose references outlived
    the timeout (the record reports them). FSDP2 calls both synchronously (async_op False: unshard_async_op's
    default; foreach_reduce never passes it); an asynchronous call is passed through unchanged."""

    class Settled(base):
        unsettled = 0
        # after the first collective whose references outlive the timeout, stop waiting: a backend that keeps its
        # references for good would otherwise cost the timeout on every collective of the run
        timeout_s = 10.0

        def __call__(self, output_tensor, input_tensor, group, *args, async_op: bool = False, **kwargs):
            refs = [storage_refs(output_tensor), storage_refs(input_tensor)]
            work = super().__call__(output_tensor, input_tensor, group, *args, async_op=async_op, **kwargs)
            if not async_op and not wait_released((output_tensor, input_tensor), refs, type(self).timeout_s):
                type(self).unsettled += 1
                type(self).timeout_s = 0.0
            return work

    Settled.__name__ = Settled.__qualname__ = "Settled" + base.__name__.removeprefix("Default")
    return Settled


_SETTLED: list = []  # the two classes, built on first use (importing FSDP2 costs ~1 s the launcher does not need)


def settled_comms() -> tuple[type, type]:
    """(SettledAllGather, SettledReduceScatter): FSDP2's DefaultAllGather and DefaultReduceScatter, settled."""
    if not _SETTLED:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

        _SETTLED.extend((_settled(DefaultAllGather), _settled(DefaultReduceScatter)))
    return _SETTLED[0], _SETTLED[1]


def settle_collectives(model) -> None:
    """Every FSDP2 unit of `model` all-gathers and reduce-scatters through the settled collectives (FSDPModule
    set_custom_all_gather / set_custom_reduce_scatter, torch's API for replacing them)."""
    from torch.distributed.fsdp import FSDPModule

    all_gather, reduce_scatter = (cls() for cls in settled_comms())
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_custom_all_gather(all_gather)
            m.set_custom_reduce_scatter(reduce_scatter)


def unsettled_collectives() -> int:
    """Collectives whose backend references outlived wait_released's timeout in this process."""
    return sum(cls.unsettled for cls in _SETTLED)


def bucket_recorder():
    """A DDP comm hook: torch's default all-reduce (ddp_comm_hooks/default_hooks.py allreduce_hook: divides the
    bucket in place and all-reduces it, as the built-in hook does) that keeps the current bucket tensors in its
    `buffers`. DDP copies each gradient into a flat bucket allocated outside any step (reducer.cpp
    initialize_buckets; rebuilt once, in the second iteration): gradient memory the step's tracker would not
    see. A function, since DDP reads the hook's __name__."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffers: dict[int, torch.Tensor] = {}

    def record_buckets(state, bucket):
        buffers[bucket.index()] = bucket.buffer()
        if dist.get_backend(state) == "fake":  # the trace's fake group completes no futures: in-place, as the hook
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer().div_(dist.get_world_size(state)))
            return fut
        return allreduce_hook(state, bucket)

    record_buckets.buffers = buffers
    return record_buckets


def _recorded_buckets(model) -> dict | None:
    for hook, _ in getattr(model, "_comm_hooks", ()):  # (hook, state) pairs (nn/parallel/distributed.py)
        if getattr(hook, "__name__", "") == "record_buckets":
            return hook.buffers
    return None


def inner_model(model):
    """The wrapped model under DDP (what registered_tensors should read), else the model itself."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def held_outside_step(model) -> dict[str, list]:
    """Storages the parallel wrapper holds that the tracker must know before the tracked step, by category:
    DDP's buckets (gradients); FSDP2's unsharded parameters (fsdp/_fully_shard/_fsdp_param.py
    FSDPParam._unsharded_param: storage resized to 0 between uses), weights or trainable as their parameter."""
    out: dict[str, list] = {"gradients": [], "weights": [], "trainable": []}
    if type(model).__name__ == "DistributedDataParallel":
        out["gradients"] = list((_recorded_buckets(model) or {}).values())
        return out
    from torch.distributed.fsdp import FSDPModule

    full = all(p.requires_grad for p in model.parameters())
    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            for fp in group.fsdp_params if group is not None else ():
                u = getattr(fp, "_unsharded_param", None)
                if u is not None:
                    out["trainable" if u.requires_grad and not full else "weights"].append(u)
    return out


def clear_buckets(model) -> None:
    """Forget recorded DDP buckets before the last untracked step, which records the current ones."""
    buffers = _recorded_buckets(model)
    if buffers is not None:
        buffers.clear()


# --- launching -----------------------------------------------------------------------------------------------


def _mappingproxy(d: dict):
    return types.MappingProxyType(d)


def write_spec(path: Path, s: Scenario, options: dict) -> None:
    """The scenario (read-only mappings as dicts) and the run options, for the ranks."""
    import copyreg

    with open(path, "wb") as f:
        p = pickle.Pickler(f)
        p.dispatch_table = copyreg.dispatch_table.copy()
        p.dispatch_table[types.MappingProxyType] = lambda m: (_mappingproxy, (dict(m),))
        p.dump({"scenario": s, "options": options})


def launch_command(world_size: int, spec: Path, out_dir: Path) -> list[str]:
    """torchrun (torch.distributed.run) on this host, rendezvous on a free port (--standalone)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
            "--max_restarts=0", "-m", "peftprof.run.dist_worker", str(spec), str(out_dir)]


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop torchrun and its ranks. torchrun starts each rank in a session of its own
    (elastic/multiprocessing/subprocess_handler: start_new_session) and on SIGTERM stops them itself; then its own
    process group is killed. A rank whose torchrun died anyway dies with it (dist_worker: PR_SET_PDEATHSIG)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_distributed(s: Scenario, *, device: str, steps: int | None = None, max_memory: int | None = None,
                    fault: str | None = None, progress=None, timeout_s: float | None = None) -> dict:
    """run_variant for world_size > 1: the record of run_variant with `measured.ranks` (each rank's peak,
    breakdown, phases and speed) and the top level from the rank with the largest peak; tokens_per_s counts
    every rank's tokens. A failing rank makes the record's status and error (its phase); the others are stopped
    by torchrun. Past `timeout_s` the whole process group is killed."""
    from .runner import _base_record, run_options

    say = progress or (lambda msg: None)
    options = run_options(s, device=device, steps=steps, max_memory=max_memory)
    record = _base_record(s, device, options)
    d = s.distributed
    if d.strategy not in MEASURED_STRATEGIES:
        record.update(status="unmeasured", error={"phase": "build", "message": (
            f"{d.strategy} (DeepSpeed ZeRO) is not run by peftprof: its per-rank memory is the estimate alone")})
        return record
    if d.cpu_offload and device != "cuda":
        record.update(status="unmeasured", error={"phase": "build", "message": (
            "cpu_offload moves memory from the GPU to the host: on a CPU run both are host memory; "
            "run it on CUDA, or use the estimate")})
        return record
    if device == "cuda" and torch.cuda.device_count() < d.world_size:
        record.update(status="error", error={"phase": "startup", "message": (
            f"world_size {d.world_size} needs one GPU per rank on this host; torch sees "
            f"{torch.cuda.device_count()}")})
        return record
    timeout_s = timeout_s or float(os.environ.get("PEFTPROF_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    with tempfile.TemporaryDirectory(prefix="peftprof-dist-") as tmp:
        tmp = Path(tmp)
        write_spec(tmp / "spec.pkl", s, {"device": device, "steps": steps or s.run.steps, "max_memory": max_memory,
                                         "fault": fault})
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[2])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        if device == "cuda" and s.run.cuda_alloc_conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = s.run.cuda_alloc_conf
        say(f"torchrun: {d.world_size} ranks ({d.strategy})")
        with open(tmp / "torchrun.log", "wb") as log:
            proc = subprocess.Popen(launch_command(d.world_size, tmp / "spec.pkl", tmp), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # its own process group: killed as one
            t0, timed_out = time.monotonic(), False
            try:
                while proc.poll() is None:
                    if time.monotonic() - t0 > timeout_s:
                        timed_out = True
                        _kill_group(proc)
                        break
                    time.sleep(0.1)
            except BaseException:  # Ctrl-C, SIGTERM: the ranks go with the variant
                _kill_group(proc)
                raise
        ranks = []
        for r in range(d.world_size):
            path = tmp / f"rank{r}.json"
            ranks.append(json.loads(path.read_text()) if path.exists() else None)
        log_tail = (tmp / "torchrun.log").read_text(errors="replace")[-_TAIL:]
    return assemble(record, ranks, exit_code=proc.returncode, timed_out=timed_out, timeout_s=timeout_s,
                    log_tail=log_tail)


def assemble(record: dict, ranks: list[dict | None], *, exit_code: int | None, timed_out: bool = False,
             timeout_s: float = 0.0, log_tail: str = "") -> dict:
    """One record from the ranks' partial ones (None: the rank wrote nothing)."""
    failed = [r for r in ranks if r is not None and r["status"] != "ok"]
    if failed:  # the first rank that failed decides; torchrun stopped the rest
        first = min(failed, key=lambda r: r.get("failed_at", 0.0))
        record.update(status=first["status"], error=dict(first["error"], rank=first["rank"]))
    elif timed_out:
        record.update(status="error", error={"phase": "run", "message": (
            f"the ranks did not finish within {timeout_s:g} s; their process group was killed")})
    elif any(r is None for r in ranks) or exit_code != 0:
        missing = [i for i, r in enumerate(ranks) if r is None]
        record.update(status="error", error={"phase": "startup", "exit_code": exit_code, "message": (
            f"torchrun exited with code {exit_code}" + (f"; ranks {missing} wrote no result" if missing else "")
            + f"; its output ends: {log_tail[-800:]}")})
    done = [r for r in ranks if r is not None]
    record["checks"] = next((r["checks"] for r in done if r.get("checks")), {})
    measured = [r["measured"] for r in done if r.get("measured")]
    if record["status"] != "ok" or len(measured) != len(ranks):
        record["measured"] = None
        return record
    top = max(measured, key=lambda m: m["peak_bytes"])
    step_time = max(m["step_time_s"] for m in measured)  # the ranks step together: the slowest sets the pace
    per_rank_keys = ("rank", "peak_bytes", "peak_phase", "breakdown", "phases", "step_time_s", "rss_peak_bytes",
                     "reserved_peak_bytes", "nvml_peak_bytes", "off_thread_frees", "unsettled_collectives")
    record["measured"] = dict(top, step_time_s=step_time, tokens_per_s=sum(m["tokens"] for m in measured) / step_time,
                              peak_rank=top["rank"], world_size=len(ranks),
                              ranks=[{k: m[k] for k in per_rank_keys if k in m} for m in measured])
    record["measured"].pop("tokens", None)
    return record
