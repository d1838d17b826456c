"""Per-rank trace of a [distributed] variant in one process: a fake process group of `world_size` ranks
(torch.testing._internal.distributed.fake_pg: collectives return at once and move no data) and fake tensors
(peftprof/trace.py's route: build on meta, stand-in bitsandbytes layers, fake parameters), wrapped in DDP or
FSDP2 by the runner's own code (run/distributed.py apply_strategy) and stepped with the runner's step and probe.
So a 70B model sharded over 8 GPUs is traced on a laptop: every tensor rank 0 would hold, and nothing else.

Rank 0 is traced by default: torch.chunk gives it the largest shard when a dimension does not divide evenly (FSDP2
pads every rank's storage to that size; optimizer states follow the unpadded shard), so its peak is the largest.
`rank=r` traces another rank (this process is rank r of the fake group): tests/test_fsdp_repeat.py compares each
measured rank with its own trace.
"""

from __future__ import annotations

import contextlib

from .errors import UserError
from .settings import Scenario

TRACED_STRATEGIES = ("ddp", "fsdp")


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    """The default process group as a fake one of `world_size` ranks, this process being `rank`."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UserError("--method trace of a [distributed] variant needs a process without a process group")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _packed_weights_as_parameters(model) -> None:
    """The stand-in 4-bit/8-bit layers (trace.py) keep the packed weight as a buffer; bitsandbytes keeps it as a
    frozen parameter (Params4bit, Int8Params), which FSDP shards and DDP broadcasts. Make it one, so the
    wrappers treat it as they treat the real one; quantization constants stay replicated, as bitsandbytes'
    quant_state (plain attributes) is."""
    import torch

    for m in model.modules():
        if type(m).__name__.startswith("Traced"):
            for name in ("packed", "cb"):
                if name in m._buffers:
                    t = m._buffers.pop(name)
                    m.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))


class _KeepBuckets:
    """DDP's reducer, except that it keeps its first buckets: the rebuild in the second iteration
    (nn/parallel/distributed.py _pre_forward -> reducer._rebuild_buckets) broadcasts the new bucket order from
    rank 0, reading values that fake tensors do not have. It regroups the same gradients (their total bytes, per
    dtype, are unchanged) and happens once, before the steady step that is tracked."""

    def __init__(self, reducer):
        self._reducer = reducer

    def _rebuild_buckets(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._reducer, name)


def check_traceable_distributed(s: Scenario) -> None:
    d = s.distributed
    if d.strategy not in TRACED_STRATEGIES:
        raise UserError(f"{s.name}: --method trace runs ddp and fsdp; {d.strategy} (DeepSpeed ZeRO) is estimated "
                        "by the analytic method alone")
    if d.cpu_offload:
        raise UserError(f"{s.name}: --method trace does not split host and device memory (cpu_offload); "
                        "use --method analytic")


def trace_peak_distributed(s: Scenario, snapshot_path=None, rank: int = 0) -> dict:
    """trace.trace_peak for world_size > 1: `rank`'s tensor-level peak and breakdown (rank 0: the largest), same
    fields."""
    import logging
    import math
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .run.build import adapt, base_model, make_optimizer, model_bytes
    from .run.distributed import apply_strategy, clear_buckets, held_outside_step, inner_model
    from .run.probe import CpuProbe
    from .run.step import optimizer_state, registered_tensors, train_step
    from .trace import (
        _fake_in_place,
        _grouped_mm_on_fake_tensors,
        _mask_decisions_as_in_real_runs,
        _quantize_on_meta,
        check_traceable,
    )

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    check_traceable(s)
    check_traceable_distributed(s)
    if not 0 <= rank < s.distributed.world_size:
        raise ValueError(f"rank {rank} is not one of the {s.distributed.world_size} ranks")
    if s.precision.weights == "int4":
        raise UserError(f"{s.name}: --method trace does not support int4 (optimum-quanto cannot quantize meta "
                        "tensors); use --method analytic")
    model = base_model(s, "meta")
    if s.precision.weights in ("int8", "fp4", "nf4"):
        _quantize_on_meta(model, s)
    with torch.device("meta"):
        model = adapt(model, s)
    _packed_weights_as_parameters(model)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_in_place(model, fake_mode)
    quant = [b for m in model.modules() if type(m).__name__.startswith("Traced") for b in m.buffers(recurse=False)]

    class Built:  # what train_step and registered_tensors read
        pass

    with fake_process_group(s.distributed.world_size, rank):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (s.distributed.world_size,))  # outside fake mode: it reads real ranks
        with fake_mode:
            wrapped = apply_strategy(model, s, "cpu", mesh=mesh, init_sync=False)
        if s.distributed.strategy == "ddp":
            wrapped.reducer = _KeepBuckets(wrapped.reducer)
        built, view = Built(), Built()
        built.model, built.quant_tensors = wrapped, quant
        wrapped.train()
        built.optimizer = make_optimizer(s, wrapped.parameters())  # outside fake mode, as trace.py does
        view.model, view.optimizer, view.quant_tensors = inner_model(wrapped), built.optimizer, quant
        with fake_mode, _mask_decisions_as_in_real_runs(s), _grouped_mm_on_fake_tensors():
            ids = torch.randint(0, s.model.arch.vocab_size, (s.training.batch_size, s.training.seq_len))
            probe = CpuProbe(vocab_size=s.model.arch.vocab_size, sample_rss=False)
            n = max(1, s.run.warmup_steps)  # FSDP initialises in the first; DDP keeps its first buckets here
            for i in range(n):
                if i == n - 1:
                    clear_buckets(wrapped)
                train_step(built, s, ids, probe, {})
            registered = registered_tensors(view)
            for category, tensors in held_outside_step(wrapped).items():
                registered[category] = registered.get(category, []) + tensors
            with probe.tracking(registered):
                train_step(built, s, ids, probe, {})
            result = probe.result(optimizer_state(built.optimizer))
        wrapped_bytes = model_bytes(view.model, quant)
    from .estimate.allocator_replay import tracker_stream
    from .estimate.widths import BNB_PAGED_MIN_NUMEL
    from .timeline import explain

    paged_dtype = (torch.uint8 if s.training.optimizer.endswith("8bit") else torch.float32) \
        if s.training.optimizer.startswith("paged") else None

    def paged(a) -> bool:  # as trace.trace_peak: bitsandbytes pages state1/state2 of >= 1e5 values
        return (a.category == "optimizer" and a.dtype == paged_dtype and a.shape is not None
                and math.prod(a.shape) >= BNB_PAGED_MIN_NUMEL)

    if snapshot_path is not None:
        from .snapshot import write_snapshot

        write_snapshot(probe.tracker, snapshot_path)
    return {"peak_bytes": result.peak_bytes, "peak_phase": result.peak_phase, "breakdown": result.breakdown,
            "phase_peaks": result.phase_peaks, "wrapped_bytes": wrapped_bytes, "rank": rank,
            "world_size": s.distributed.world_size, "strategy": s.distributed.strategy,
            "n_trainable_params": sum(p.numel() for p in view.model.parameters() if p.requires_grad),
            "alloc_stream": tracker_stream(probe.tracker, paged), **explain(probe.tracker)}
