"""Probes on CPU: the CUDA probe's logic against a scripted stand-in for torch.cuda's allocator counters and
a stand-in for pynvml, driven by the real training step (run/step.py train_step)."""

import math
import types

import pytest

from peftprof.run import probe as probe_mod
from peftprof.run.probe import CpuProbe, CudaProbe, NullProbe, NvmlMemory, Probe, Sampler, nvml_handle
from peftprof.run.step import train_step

UUID = "8a7f1c2e-0000-1111-2222-333344445555"  # as torch prints it: no "GPU-" prefix
SEGMENT = 1024  # the stand-in reserves in 1 KiB segments


class FakeCuda:
    """torch.cuda's counters as c10's caching allocator keeps them: allocated/reserved current and peak;
    reset_peak_memory_stats sets both peaks to their current values; reserved never shrinks unless
    `release()` (empty_cache) is called."""

    def __init__(self):
        self.allocated = self.allocated_peak = self.reserved = self.reserved_peak = 0
        self.calls: list[str] = []

    def alloc(self, n):
        self.allocated += n
        self.allocated_peak = max(self.allocated_peak, self.allocated)
        self.reserved = max(self.reserved, math.ceil(self.allocated / SEGMENT) * SEGMENT)
        self.reserved_peak = max(self.reserved_peak, self.reserved)

    def free(self, n):
        self.allocated -= n

    def release(self):
        self.reserved = math.ceil(self.allocated / SEGMENT) * SEGMENT

    # torch.cuda's API, as CudaProbe calls it
    def current_device(self):
        return 0

    def memory_stats(self, device):
        assert device == 0
        return {"allocated_bytes.all.current": self.allocated, "allocated_bytes.all.peak": self.allocated_peak,
                "reserved_bytes.all.current": self.reserved, "reserved_bytes.all.peak": self.reserved_peak,
                "num_alloc_retries": 2, "num_ooms": 0}

    def reset_peak_memory_stats(self, device):
        self.calls.append("reset")
        self.allocated_peak, self.reserved_peak = self.allocated, self.reserved

    def synchronize(self, device):
        self.calls.append("sync")

    def get_device_properties(self, device):
        return types.SimpleNamespace(uuid=UUID, pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)

    def get_device_name(self, device):
        return "Fake H200"


class NVMLError(Exception):
    pass


class FakeNvml:
    """pynvml's calls CudaProbe makes; no by-index lookup exists, so using it fails the test."""

    nvmlMemory_v2 = 0x02000028  # pynvml.py

    def __init__(self, used=(100, 300, 200), uuids=("GPU-" + UUID,), pci=(), fail_init=False, fail_reads_after=None):
        self.used, self.uuids, self.pci = list(used), set(uuids), set(pci)
        self.fail_init, self.fail_reads_after = fail_init, fail_reads_after
        self.n_reads = self.n_init = self.n_shutdown = 0

    def nvmlInit(self):
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")
        self.n_init += 1

    def nvmlShutdown(self):
        self.n_shutdown += 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.uuids:
            raise NVMLError("Not Found")
        return ("uuid", uuid)

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        if bus_id not in self.pci:
            raise NVMLError("Not Found")
        return ("pci", bus_id)

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        assert version == self.nvmlMemory_v2  # the struct nvidia-smi reports
        self.n_reads += 1
        if self.fail_reads_after is not None and self.n_reads > self.fail_reads_after:
            raise NVMLError("GPU is lost")
        return types.SimpleNamespace(used=self.used[min(self.n_reads - 1, len(self.used) - 1)])


class Loss:
    def __init__(self, cuda):
        self.cuda = cuda

    def backward(self):
        # backward: gradients and layer temporaries, then activations and temporaries go
        self.cuda.alloc(4000)
        self.cuda.free(7000)
        self.cuda.release()  # the allocator gives cached segments back (as on an allocation retry)


class FakeModel:
    def __init__(self, cuda, spike=0):
        self.cuda, self.spike = cuda, spike

    def __call__(self, input_ids, labels):
        self.cuda.alloc(3000 + self.spike)  # activations (+ a spike in untracked steps)
        self.cuda.free(self.spike)
        return types.SimpleNamespace(loss=Loss(self.cuda))

    def parameters(self):
        return []


class FakeOptimizer:
    def __init__(self, cuda):
        self.cuda = cuda

    def step(self):
        self.cuda.alloc(500)  # e.g. foreach AdamW's sqrt list
        self.cuda.free(500)

    def zero_grad(self, set_to_none=True):
        self.cuda.free(0)


def scenario(grad_accum_steps=1):
    return types.SimpleNamespace(training=types.SimpleNamespace(grad_accum_steps=grad_accum_steps))


def built_on(cuda, spike=0):
    return types.SimpleNamespace(model=FakeModel(cuda, spike), optimizer=FakeOptimizer(cuda))


def test_every_probe_satisfies_the_interface():
    cpu = CpuProbe(sample_rss=False)
    cuda = CudaProbe(cuda=FakeCuda(), nvml=FakeNvml())
    for p in (cpu, NullProbe(), cuda):
        assert isinstance(p, Probe)
    cuda.finish()


def test_cuda_probe_keeps_allocated_and_reserved_peaks_per_phase_read_before_each_reset():
    cuda = FakeCuda()
    cuda.alloc(1000)  # weights
    probe = CudaProbe(cuda=cuda, nvml=FakeNvml())
    # untracked steps (the runner's timed ones), with a 5000 B spike in forward: the probe must do nothing
    for _ in range(2):
        train_step(built_on(cuda, spike=5000), scenario(), None, probe, {})
    assert cuda.calls == []  # no synchronize and no reset inside timed steps
    assert (cuda.allocated, cuda.allocated_peak, cuda.reserved_peak) == (1000, 9000, 9216)
    with probe.tracking({}):
        train_step(built_on(cuda), scenario(), None, probe, {})
    # forward: 1000 + 3000 = 4000 (reserved 4096); backward: 4000 + 4000 = 8000 (reserved 8192), then 1000
    # with the cache released to 1024; optimizer: 1000 + 500 = 1500 (reserved 2048)
    assert probe.phase_peaks == {"forward": 4000, "backward": 8000, "optimizer": 1500}
    assert probe.reserved_phase_peaks == {"forward": 4096, "backward": 8192, "optimizer": 2048}
    res = probe.result([])
    assert (res.peak_bytes, res.peak_phase, res.steady_bytes) == (8000, "backward", 1000)
    out = probe.finish()
    assert out["reserved_peak_bytes"] == 8192  # read before the next reset (after it: 1024)
    assert out["alloc_retries"] == 0 and out["cuda_ooms"] == 0 and out["device_name"] == "Fake H200"
    # tracked step: sync + reset on entry, sync/read + reset at each of its 4 phase changes, sync at exit
    assert cuda.calls == ["sync", "reset"] + ["sync", "reset"] * 4 + ["sync"]


def test_cuda_probe_gradient_accumulation_keeps_the_max_over_micro_batches():
    cuda = FakeCuda()
    cuda.alloc(1000)
    probe = CudaProbe(cuda=cuda, nvml=FakeNvml())
    with probe.tracking({}):
        train_step(built_on(cuda, spike=2000), scenario(grad_accum_steps=2), None, probe, {})
    # each micro-batch: forward 1000 + 5000 (spike) = 6000, backward 1000 + 3000 + 4000 = 8000
    assert probe.phase_peaks == {"forward": 6000, "backward": 8000, "optimizer": 1500}
    probe.finish()


def test_nvml_looked_up_by_uuid_sampled_with_v2_and_shut_down():
    nvml = FakeNvml(used=(100, 300, 200))
    probe = CudaProbe(cuda=FakeCuda(), nvml=nvml, interval_s=60)
    out = probe.finish()
    assert out["nvml_peak_bytes"] == 300 and out["nvml_device"] == f"uuid GPU-{UUID}"
    assert "nvml_note" not in out
    assert (nvml.n_init, nvml.n_shutdown) == (1, 1)
    assert probe.finish() == {} and nvml.n_shutdown == 1  # idempotent


def test_nvml_falls_back_to_the_pci_bus_id():
    nvml = FakeNvml(uuids=(), pci=("00000000:3b:00.0",))
    handle, how = nvml_handle(nvml, FakeCuda().get_device_properties(0))
    assert handle == ("pci", "00000000:3b:00.0") and how == "pci 00000000:3b:00.0"
    with pytest.raises(LookupError, match="by UUID GPU-8a7f.*by PCI bus id"):
        nvml_handle(FakeNvml(uuids=()), FakeCuda().get_device_properties(0))


def test_nvml_failures_are_notes_never_zero_bytes():
    # init fails: a note, no peak, nothing to shut down
    nvml = FakeNvml(fail_init=True)
    out = CudaProbe(cuda=FakeCuda(), nvml=nvml).finish()
    assert "nvml_peak_bytes" not in out and "Driver Not Loaded" in out["nvml_note"]
    assert nvml.n_shutdown == 0
    # no handle: a note, and the successful init is balanced by a shutdown
    nvml = FakeNvml(uuids=())
    out = CudaProbe(cuda=FakeCuda(), nvml=nvml).finish()
    assert "nvml_peak_bytes" not in out and "LookupError" in out["nvml_note"] and nvml.n_shutdown == 1
    # the check read works, every sampled read fails: no peak, a note that says so
    nvml = FakeNvml(fail_reads_after=1)
    out = CudaProbe(cuda=FakeCuda(), nvml=nvml, interval_s=60).finish()
    assert "nvml_peak_bytes" not in out and "reads failed" in out["nvml_note"] and nvml.n_shutdown == 1


def test_probe_shuts_nvml_down_after_an_error_in_the_tracked_step():
    cuda, nvml = FakeCuda(), FakeNvml()
    probe = CudaProbe(cuda=cuda, nvml=nvml, interval_s=60)
    with pytest.raises(MemoryError), probe.tracking({}):
        probe.set_phase("forward")
        raise MemoryError("out of memory")
    n_calls = len(cuda.calls)
    probe.set_phase("backward")  # no longer tracking: nothing happens
    assert len(cuda.calls) == n_calls
    probe.finish()
    assert nvml.n_shutdown == 1


def test_sampler_reports_none_when_every_read_fails():
    def read():
        raise OSError("no device")

    s = Sampler(read, interval_s=60)
    assert s.stop() is None and s.note() == "1 of 1 reads failed, last: OSError: no device"
    values = iter([5, 9])
    s = Sampler(lambda: next(values), interval_s=60)
    s.sample()
    assert s.stop() == 9 and s.note() is None


def test_the_stand_ins_match_the_real_apis():
    pynvml = pytest.importorskip("pynvml")
    import inspect

    import torch

    assert pynvml.nvmlMemory_v2 == FakeNvml.nvmlMemory_v2
    assert "version" in inspect.signature(pynvml.nvmlDeviceGetMemoryInfo).parameters
    assert "used" in dict(pynvml.c_nvmlMemory_v2_t._fields_)
    for name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetHandleByUUID", "nvmlDeviceGetHandleByPciBusId"):
        assert callable(getattr(pynvml, name))
    for name in ("current_device", "memory_stats", "reset_peak_memory_stats", "synchronize",
                 "get_device_properties", "get_device_name"):
        assert callable(getattr(torch.cuda, name))
    assert probe_mod.ALLOCATED_PEAK in inspect.getsource(torch.cuda.max_memory_allocated)
    assert probe_mod.RESERVED_PEAK in inspect.getsource(torch.cuda.max_memory_reserved)


def test_real_nvml_without_a_gpu_is_a_note():
    pytest.importorskip("pynvml")
    nvml = NvmlMemory(FakeCuda().get_device_properties(0))
    assert nvml.handle is None and nvml.note.startswith("NVML unavailable")


def test_cpu_probe_acts_only_while_tracking():
    import torch

    probe = CpuProbe(sample_rss=False)
    probe.set_phase("forward")
    probe.mark_gradients([torch.zeros(3)])  # outside tracking: nothing to do, no error
    with probe.tracking({}) as tracker:
        probe.set_phase("forward")
        x = torch.ones(1024)
        assert tracker.phase == "forward"
        del x
    probe.set_phase("backward")
    assert probe.tracker.phase == "forward"
    assert probe.finish() == {}
