"""Memory probes behind one interface: tensor-level tracking on CPU, the caching allocator plus NVML on CUDA.

The CUDA-only code is the `CudaProbe` class and the NVML sampler; everything else runs on CPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

from .track import MemoryTracker, TrackResult


class Sampler(threading.Thread):
    """Polls `read()` every `interval_s` seconds and keeps the maximum (RSS on CPU, NVML on CUDA)."""

    def __init__(self, read, interval_s: float = 0.01):
        super().__init__(daemon=True)
        self.read, self.interval_s = read, interval_s
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.read())
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=1)
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, self.read())
        return self.peak


def rss_bytes() -> int:
    """Resident set size of this process (/proc/self/statm, pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class CpuProbe:
    """Tensor-level peak by category (MemoryTracker) plus the sampled process RSS."""

    device = "cpu"

    def __init__(self, *, cap_bytes: int | None = None, vocab_size: int | None = None):
        self.cap_bytes, self.vocab_size = cap_bytes, vocab_size
        self.rss = Sampler(rss_bytes)
        self.rss.start()
        self.tracker: MemoryTracker | None = None

    @contextlib.contextmanager
    def tracking(self, registered: dict[str, list]):
        self.tracker = MemoryTracker(cap_bytes=self.cap_bytes, vocab_size=self.vocab_size)
        for category, tensors in registered.items():
            self.tracker.register(tensors, category)
        with self.tracker:
            yield self.tracker

    def set_phase(self, phase: str) -> None:
        if self.tracker is not None:
            self.tracker.phase = phase

    def mark_gradients(self, grads) -> None:
        if self.tracker is not None:
            self.tracker.mark(grads, "gradients")

    def result(self, optimizer_state) -> TrackResult:
        return self.tracker.classify(optimizer_state)

    def finish(self) -> dict:
        return {"rss_peak_bytes": self.rss.stop()}

    @staticmethod
    def synchronize() -> None:
        pass


class CudaProbe:  # pragma: no cover - needs a GPU (benchmarks/gpu_check.sh runs it)
    """torch's caching-allocator counters per phase, plus an NVML sampler for the device-level peak."""

    device = "cuda"

    def __init__(self, **_):
        self.phase_peaks: dict[str, int] = {}
        self.phase = "setup"
        self.nvml_note = None
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.nvml = Sampler(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            self.nvml.start()
        except Exception as e:  # no NVML: say so in the result and go on
            self.nvml_note = f"NVML unavailable: {type(e).__name__}: {e}"

    @contextlib.contextmanager
    def tracking(self, registered):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.phase_peaks = {}
        yield None
        self._close_phase()

    def _close_phase(self):
        torch.cuda.synchronize()
        if self.phase in ("forward", "backward", "optimizer"):
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), torch.cuda.max_memory_allocated())

    def set_phase(self, phase: str) -> None:
        self._close_phase()
        torch.cuda.reset_peak_memory_stats()
        self.phase = phase

    def mark_gradients(self, grads) -> None:
        pass

    def result(self, optimizer_state) -> TrackResult:
        peak_phase = max(self.phase_peaks, key=self.phase_peaks.get)
        return TrackResult(peak_bytes=self.phase_peaks[peak_phase], peak_phase=peak_phase, breakdown={},
                           phase_peaks=dict(self.phase_peaks), steady_bytes=torch.cuda.memory_allocated())

    def finish(self) -> dict:
        stats = torch.cuda.memory_stats()
        out = {"reserved_peak_bytes": torch.cuda.max_memory_reserved(),
               "alloc_retries": stats.get("num_alloc_retries", 0), "cuda_ooms": stats.get("num_ooms", 0),
               "device_name": torch.cuda.get_device_name()}
        if self.nvml is not None:
            out["nvml_peak_bytes"] = self.nvml.stop()
        else:
            out["nvml_note"] = self.nvml_note
        return out

    @staticmethod
    def synchronize() -> None:
        torch.cuda.synchronize()


def make_probe(device: str, **kwargs):
    return CudaProbe(**kwargs) if device == "cuda" else CpuProbe(**kwargs)


def now() -> float:
    return time.perf_counter()
