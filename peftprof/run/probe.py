"""Memory probes behind one interface (`Probe`): tensor-level tracking on CPU, the caching allocator's counters
plus NVML on CUDA, and a probe that measures nothing (untracked steps, the overhead benchmark's baseline).

The training step (run/step.py train_step) calls `set_phase` and `mark_gradients` on every step, timed or
not; a probe acts on them only inside `tracking(...)`, so timed steps pay a Python call and nothing else.
The CUDA-only code is `CudaProbe` and `NvmlMemory`; both take stand-ins for `torch.cuda` and `pynvml`, so
their logic is tested on CPU (tests/test_probe.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch

from .track import PHASES, MemoryTracker, TrackResult

# torch/cuda/memory.py (torch 2.13): max_memory_allocated / max_memory_reserved read these keys of
# memory_stats(); one memory_stats() call reads both peaks before reset_peak_memory_stats() resets both
# (c10/cuda/CUDACachingAllocator.cpp resetPeakStats: reset_peak_stat on allocated_bytes and reserved_bytes).
ALLOCATED_PEAK, RESERVED_PEAK = "allocated_bytes.all.peak", "reserved_bytes.all.peak"
ALLOCATED_NOW = "allocated_bytes.all.current"


@runtime_checkable
class Probe(Protocol):
    """What the runner, the training step and the trace call on a probe."""

    device: str

    def tracking(self, registered: dict[str, list]) -> AbstractContextManager: ...

    def set_phase(self, phase: str) -> None: ...

    def mark_gradients(self, grads) -> None: ...

    def result(self, optimizer_state) -> TrackResult: ...

    def finish(self) -> dict: ...

    def synchronize(self) -> None: ...


class Sampler(threading.Thread):
    """Polls `read()` every `interval_s` seconds and keeps the maximum (RSS on CPU, NVML on CUDA). A read
    that raises is counted, never taken as 0: `peak` stays None until one read succeeds."""

    def __init__(self, read, interval_s: float = 0.01):
        super().__init__(daemon=True)
        self.read, self.interval_s = read, interval_s
        self.peak: int | None = None
        self.n_reads = self.n_failed = 0
        self.error: str | None = None
        self._stop_event = threading.Event()

    def sample(self) -> None:
        try:
            value = int(self.read())
        except Exception as e:
            self.n_failed += 1
            self.error = f"{type(e).__name__}: {e}"
            return
        self.n_reads += 1
        self.peak = value if self.peak is None else max(self.peak, value)

    def run(self):
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int | None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=1)
        self.sample()
        return self.peak

    def note(self) -> str | None:
        """None when every read succeeded; else how many failed and the last error."""
        if not self.n_failed:
            return None
        return f"{self.n_failed} of {self.n_failed + self.n_reads} reads failed, last: {self.error}"


def rss_bytes() -> int:
    """Resident set size of this process (/proc/self/statm, pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sampled(key: str, note_key: str, sampler: Sampler) -> dict:
    """{key: peak} from a stopped sampler, plus {note_key: ...} when reads failed; no `key` when none succeeded."""
    peak = sampler.stop()
    out = {} if peak is None else {key: peak}
    if sampler.note():
        out[note_key] = sampler.note()
    return out


class NullProbe:
    """Measures nothing: the probe of untracked steps (the trace's warm-up) and the overhead baseline."""

    device = "none"

    @contextlib.contextmanager
    def tracking(self, registered):
        yield None

    def set_phase(self, phase: str) -> None:
        pass

    def mark_gradients(self, grads) -> None:
        pass

    def result(self, optimizer_state) -> TrackResult:
        raise RuntimeError("NullProbe measures nothing")

    def finish(self) -> dict:
        return {}

    def synchronize(self) -> None:
        pass


class CpuProbe:
    """Tensor-level peak by category (MemoryTracker) plus the sampled process RSS (`sample_rss=False` for
    fake tensors, whose RSS means nothing)."""

    device = "cpu"

    def __init__(self, *, cap_bytes: int | None = None, vocab_size: int | None = None, sample_rss: bool = True,
                 logits_ndim: int | None = None):
        self.cap_bytes, self.vocab_size, self.logits_ndim = cap_bytes, vocab_size, logits_ndim
        self.rss = Sampler(rss_bytes) if sample_rss else None
        if self.rss is not None:
            self.rss.start()
        self.tracker: MemoryTracker | None = None  # the last tracked step's, for result()
        self.active = False

    @contextlib.contextmanager
    def tracking(self, registered: dict[str, list]):
        self.tracker = MemoryTracker(cap_bytes=self.cap_bytes, vocab_size=self.vocab_size, logits_ndim=self.logits_ndim)
        for category, tensors in registered.items():
            self.tracker.register(tensors, category)
        self.active = True
        try:
            with self.tracker:
                yield self.tracker
        finally:
            self.active = False

    def set_phase(self, phase: str) -> None:
        if self.active:
            self.tracker.phase = phase

    def mark_gradients(self, grads) -> None:
        if self.active:
            self.tracker.mark(grads, "gradients")

    def result(self, optimizer_state) -> TrackResult:
        if self.tracker is None:
            raise RuntimeError("no tracked step")
        return self.tracker.classify(optimizer_state)

    def finish(self) -> dict:
        return {} if self.rss is None else sampled("rss_peak_bytes", "rss_note", self.rss)

    def synchronize(self) -> None:
        pass


def nvml_handle(nvml, props):
    """NVML handle of the CUDA device with properties `props`, by UUID, else by PCI bus id: torch's index is
    not NVML's under CUDA_VISIBLE_DEVICES (torch/cuda/__init__.py _get_nvml_device_index maps it by hand).
    torch prints the UUID without NVML's "GPU-" prefix (torch/csrc/cuda/Module.cpp _CUuuid __str__)."""
    errors = []
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid), f"uuid {uuid}"
        except Exception as e:
            errors.append(f"by UUID {uuid}: {type(e).__name__}: {e}")
    try:  # NVML's "domain:bus:device.function" from the ids torch exposes (as torch/numa/binding.py reads them)
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId(bus_id), f"pci {bus_id}"
    except Exception as e:
        errors.append(f"by PCI bus id: {type(e).__name__}: {e}")
    raise LookupError("; ".join(errors))


class NvmlMemory:
    """Device memory in use as nvidia-smi shows it: nvmlDeviceGetMemoryInfo_v2 `used` (pynvml
    nvmlDeviceGetMemoryInfo(handle, version=nvmlMemory_v2)); v1's `used` also counts driver-reserved memory.
    Any failure leaves `note` set and no handle; `shutdown()` always balances a successful nvmlInit."""

    def __init__(self, props, nvml=None):
        self.handle, self.note, self.lookup, self.shutdown_error = None, None, None, None
        self._initialised = False
        try:
            if nvml is None:
                import pynvml as nvml
            self.nvml = nvml
            nvml.nvmlInit()
            self._initialised = True
            self.handle, self.lookup = nvml_handle(nvml, props)
            self.read()
        except Exception as e:
            self.handle = None
            self.note = f"NVML unavailable: {type(e).__name__}: {e}"
            self.shutdown()

    def read(self) -> int:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle, version=self.nvml.nvmlMemory_v2).used

    def shutdown(self) -> None:
        if not self._initialised:
            return
        self._initialised = False
        try:
            self.nvml.nvmlShutdown()
        except Exception as e:
            self.shutdown_error = f"nvmlShutdown: {type(e).__name__}: {e}"


class CudaProbe:
    """torch's caching-allocator peaks (allocated and reserved) per phase of the tracked step, plus an NVML
    sampler for the device-level peak. Outside `tracking` every call is a no-op: no synchronize and no
    counter reset inside timed steps. `cuda`/`nvml` default to torch.cuda/pynvml (stand-ins in tests)."""

    device = "cuda"

    def __init__(self, *, cuda=None, nvml=None, interval_s: float = 0.01, **_):
        self.cuda = cuda if cuda is not None else torch.cuda
        self.index = self.cuda.current_device()
        self.phase, self.active = "setup", False
        self.phase_peaks: dict[str, int] = {}  # max_memory_allocated per phase
        self.reserved_phase_peaks: dict[str, int] = {}  # max_memory_reserved per phase
        self.steady_bytes: int | None = None
        stats = self.cuda.memory_stats(self.index)
        self._start_counts = (stats.get("num_alloc_retries", 0), stats.get("num_ooms", 0))
        self.nvml = NvmlMemory(self.cuda.get_device_properties(self.index), nvml)
        self.sampler = None
        if self.nvml.handle is not None:
            self.sampler = Sampler(self.nvml.read, interval_s)
            self.sampler.start()
        self._finished = False

    @contextlib.contextmanager
    def tracking(self, registered):
        self.cuda.synchronize(self.index)
        self.cuda.reset_peak_memory_stats(self.index)
        self.phase_peaks, self.reserved_phase_peaks = {}, {}
        self.phase, self.active = "setup", True
        try:
            yield None
            self._close_phase()
            self.steady_bytes = self.cuda.memory_stats(self.index).get(ALLOCATED_NOW, 0)
        finally:
            self.active = False

    def _close_phase(self) -> None:
        """Wait for the phase's kernels, then keep its allocated and reserved peaks (read before any reset)."""
        self.cuda.synchronize(self.index)
        if self.phase in PHASES:
            stats = self.cuda.memory_stats(self.index)
            for peaks, key in ((self.phase_peaks, ALLOCATED_PEAK), (self.reserved_phase_peaks, RESERVED_PEAK)):
                peaks[self.phase] = max(peaks.get(self.phase, 0), stats.get(key, 0))

    def set_phase(self, phase: str) -> None:
        if not self.active:
            return
        self._close_phase()
        self.cuda.reset_peak_memory_stats(self.index)
        self.phase = phase

    def mark_gradients(self, grads) -> None:
        pass

    def result(self, optimizer_state) -> TrackResult:
        if not self.phase_peaks:
            raise RuntimeError("no tracked step")
        peak_phase = max(self.phase_peaks, key=self.phase_peaks.get)
        return TrackResult(peak_bytes=self.phase_peaks[peak_phase], peak_phase=peak_phase, breakdown={},
                           phase_peaks=dict(self.phase_peaks), steady_bytes=self.steady_bytes or 0)

    def finish(self) -> dict:
        """Reserved peak of the tracked step, allocator retries/OOMs during this probe, NVML peak (or a note
        saying why there is none). Shuts NVML down whatever happens; a second call returns {}."""
        if self._finished:
            return {}
        self._finished = True
        out: dict = {}
        notes = [self.nvml.note] if self.nvml.note else []
        try:
            if self.sampler is not None:
                out.update(sampled("nvml_peak_bytes", "nvml_note", self.sampler))
                notes += [out.pop("nvml_note")] if "nvml_note" in out else []
                out["nvml_device"] = self.nvml.lookup
            if self.reserved_phase_peaks:
                out["reserved_peak_bytes"] = max(self.reserved_phase_peaks.values())
                out["reserved_phase_peaks"] = dict(self.reserved_phase_peaks)
            stats = self.cuda.memory_stats(self.index)
            out.update(alloc_retries=stats.get("num_alloc_retries", 0) - self._start_counts[0],
                       cuda_ooms=stats.get("num_ooms", 0) - self._start_counts[1],
                       device_name=self.cuda.get_device_name(self.index))
        finally:
            self.nvml.shutdown()
            notes += [self.nvml.shutdown_error] if self.nvml.shutdown_error else []
            if notes:
                out["nvml_note"] = "; ".join(notes)
        return out

    def synchronize(self) -> None:
        self.cuda.synchronize(self.index)


def make_probe(device: str, **kwargs) -> Probe:
    return CudaProbe(**kwargs) if device == "cuda" else CpuProbe(**kwargs)


def now() -> float:
    return time.perf_counter()
