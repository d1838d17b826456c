"""Catalogues shipped with the package: model presets (HF config fields) and GPUs (datasheets).

Plain dicts with exact-name lookups; an unknown name lists the known ones.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GIB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class Gpu:
    """One GPU from data/gpus.toml (each number cites its datasheet there)."""

    name: str
    memory_bytes: int
    bf16_tflops: float  # dense tensor-core throughput, 10^12 FLOP/s
    bandwidth_bytes_per_s: float
    bf16: bool


def _load(name: str) -> dict:
    with resources.files("peftprof").joinpath("data", name).open("rb") as f:
        return tomllib.load(f)


@functools.cache
def model_presets() -> dict[str, dict]:
    """Preset name -> HF config fields (model_type included)."""
    return _load("models.toml")


@functools.cache
def gpus() -> dict[str, Gpu]:
    return {
        name: Gpu(name=name, memory_bytes=int(row["memory_gib"] * GIB), bf16_tflops=float(row["bf16_tflops"]),
                  bandwidth_bytes_per_s=float(row["bandwidth_gbps"]) * 1e9, bf16=bool(row["bf16"]))
        for name, row in _load("gpus.toml").items()
    }


def gpu(name: str) -> Gpu:
    """Exact-name lookup; an unknown name is a ValueError that lists the catalogue."""
    table = gpus()
    if name not in table:
        raise ValueError(f"unknown GPU {name!r} (allowed: {', '.join(table)})")
    return table[name]
