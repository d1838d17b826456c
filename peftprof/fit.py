"""`fit`: the largest batch size or sequence length whose estimated peak fits a GPU with headroom."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .catalog import Gpu
from .settings import Scenario

AXES = ("batch_size", "seq_len")


def with_axis(s: Scenario, axis: str, value: int) -> Scenario:
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
