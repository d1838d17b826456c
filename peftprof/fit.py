"""`fit`: the largest batch size or sequence length whose estimated peak fits a GPU with headroom, or the fewest
GPUs (world_size, per-rank peak) that fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .catalog import Gpu
from .settings import Scenario

AXES = ("batch_size", "seq_len", "world_size")
MAX_WORLD_SIZE = 65536  # [distributed] world_size's upper bound (rules_distributed.SCHEMA)


def with_axis(s: Scenario, axis: str, value: int) -> Scenario:
    if axis == "world_size":
        return dataclasses.replace(s, distributed=dataclasses.replace(s.distributed, world_size=value))
    return dataclasses.replace(s, training=dataclasses.replace(s.training, **{axis: value}))


def axis_limit(s: Scenario, axis: str) -> int:
    """Upper bound of the search: max positions for seq_len (minus prompt tokens), 2^20 for batch."""
    if axis == "seq_len":
        extra = s.peft.num_virtual_tokens if s.peft.method == "prompt_tuning" else 0
        return s.model.arch.max_positions - extra
    return 1 << 20


def largest_fitting(s: Scenario, gpu: Gpu, *, axis: str, headroom: float,
                    estimate_fn: Callable[[Scenario], dict]) -> tuple[int | None, dict | None]:
    """Binary search on `axis` (peak memory grows monotonically with it). Returns (value, estimate) or
    (None, estimate at 1) when even 1 does not fit. `headroom` is a fraction of the GPU's memory kept free."""
    budget = gpu.memory_bytes * (1 - headroom)

    def need(est: dict) -> int:
        return est.get("device_bytes", est["peak_bytes"])

    lo_est = estimate_fn(with_axis(s, axis, 1))
    if need(lo_est) > budget:
        return None, lo_est
    lo, hi = 1, axis_limit(s, axis)
    best = lo_est
    hi_est = estimate_fn(with_axis(s, axis, hi))
    if need(hi_est) <= budget:
        return hi, hi_est
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        est = estimate_fn(with_axis(s, axis, mid))
        if need(est) <= budget:
            lo, best = mid, est
        else:
            hi = mid
    return lo, best


def _need(est: dict) -> int:
    return est.get("device_bytes", est["peak_bytes"])


def fewest_fitting(s: Scenario, gpu: Gpu, *, headroom: float,
                   estimate_fn: Callable[[Scenario], dict]) -> tuple[int | None, dict]:
    """The fewest ranks whose per-rank peak fits `gpu` with `headroom` (a fraction of its memory kept free), with
    the scenario's strategy. Returns (world_size, estimate) or (None, estimate at the largest size tried).
    World size 1 is one device, unsharded. DDP replicates everything (the per-rank peak never falls with more
    ranks), so only 1 is tried; otherwise doubling finds a fitting size and a binary search the fewest (sharded
    terms fall as 1/N; the padding of dim 0 to a multiple of N moves them by bytes)."""
    budget = gpu.memory_bytes * (1 - headroom)
    est = estimate_fn(with_axis(s, "world_size", 1))
    if _need(est) <= budget:
        return 1, est
    if s.distributed.strategy == "ddp":
        return None, est
    lo, hi = 1, 2  # invariant: lo does not fit
    while True:
        est = estimate_fn(with_axis(s, "world_size", hi))
        if _need(est) <= budget:
            break
        if hi == MAX_WORLD_SIZE:
            return None, est
        lo, hi = hi, min(2 * hi, MAX_WORLD_SIZE)
    best = est
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_est = estimate_fn(with_axis(s, "world_size", mid))
        if _need(mid_est) <= budget:
            hi, best = mid, mid_est
        else:
            lo = mid
    return hi, best
