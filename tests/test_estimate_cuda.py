"""The CUDA optimizer terms (estimate/cuda.py) against hand-computed bytes and against the real torch and
bitsandbytes optimizers stepping on fake CUDA tensors (FakeTensorMode works on a CPU-only torch)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from peftprof.estimate import cuda, estimate
from peftprof.estimate import memory as mem
from peftprof.run.track import MemoryTracker
from peftprof.scenario import load_scenario

LLAMA = ('[model]\nmodel_type = "llama"\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
         'intermediate_size = 160\nvocab_size = 1000\n[precision]\nweights = "fp32"\n')


def test_allocator_rounds_every_tensor_to_512_bytes():
    assert [cuda.block_bytes(n) for n in (0, 1, 511, 512, 513, 4000)] == [0, 512, 512, 512, 1024, 4096]


def test_adamw_on_cuda_by_hand():
    # three fp32 tensors: 400 B -> 512, 16,384 B, 4,000 B -> 4,096; two states each, step on the CPU
    sizes = [100, 4096, 1000]
    assert cuda.adamw_state_bytes(sizes, 4) == 2 * (512 + 16384 + 4096) == 41984
    # foreach: one sqrt tensor per second moment, all at once
    assert cuda.adamw_temporary_bytes(sizes, 4) == 512 + 16384 + 4096 == 20992


def test_bnb_states_on_cuda_by_hand():
    sizes = [131072, 8192, 1000]  # paged and 8-bit; 8-bit not paged (< 1e5); fp32 (< 4096)
    # 8-bit: absmax fp32 per 256 values: 512 -> 2,048 B, 32 -> 128 B -> 512; fp32 states 4,000 B -> 4,096
    absmax = 2 * 2048 + 2 * 512
    qmaps = 2 * 256 * 4
    assert cuda.bnb_state_bytes(sizes, eight_bit=True, paged=True) == (absmax + 2 * 8192 + 2 * 4096 + qmaps,
                                                                        2 * 131072)
    assert cuda.bnb_state_bytes(sizes, eight_bit=True, paged=False) == (
        2 * 131072 + absmax + 2 * 8192 + 2 * 4096 + qmaps, 0)
    assert cuda.bnb_state_bytes(sizes, eight_bit=False, paged=True) == (2 * 8192 * 4 + 2 * 4096, 2 * 131072 * 4)


def lora(write_scenario, optimizer):
    path = write_scenario(LLAMA + '[peft]\nmethod = "lora"\nr = 4\n[training]\nseq_len = 32\n'
                          f'optimizer = "{optimizer}"\n')
    (s,) = load_scenario(path)
    return s


def test_lora_scenario_on_cuda_and_cpu(write_scenario):
    s = lora(write_scenario, "adamw")
    # peft's llama default targets q_proj and v_proj: per layer A 4x64 and B 64x4 each, 256 fp32 values = 1 KiB
    assert mem.trainable_tensors(s) == [256] * 8
    assert mem.optimizer_state_bytes(s, device="cuda") == (8 * 2 * 1024, 0)  # step counters on the CPU
    assert mem.optimizer_state_bytes(s, device="cpu") == (8 * 2 * 1024 + 8 * 4, 0)
    assert mem.optimizer_temporary_bytes(s, device="cuda") == 8 * 1024  # foreach: all sqrt tensors
    assert mem.optimizer_temporary_bytes(s) == 2 * 1024  # single-tensor: denom of the largest, twice
    assert estimate(s, device="cuda")["breakdown"]["optimizer"] == 16384
    assert estimate(s, device="cpu")["breakdown"]["optimizer"] == 16416


def test_torch_adamw_on_cuda_defaults_to_foreach_with_step_on_the_cpu(monkeypatch):
    """The real AdamW, default arguments, on fake CUDA parameters. FakeTensor is not a type that
    _default_to_fused_or_foreach accepts (a real CUDA parameter is), so it is admitted for this test."""
    import torch.optim.adam as adam_mod
    import torch.optim.optimizer as opt_mod

    monkeypatch.setattr(opt_mod, "_foreach_supported_types", [*opt_mod._foreach_supported_types, FakeTensor])
    chosen = []
    original = adam_mod._multi_tensor_adam
    monkeypatch.setattr(adam_mod, "_multi_tensor_adam", lambda *a, **k: (chosen.append("foreach"), original(*a, **k)))
    sizes = [512 * 8, 8 * 512, 4096]  # multiples of 128 fp32 values: the 512 B rounding adds nothing
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in sizes]
        opt = torch.optim.AdamW(params, lr=1e-3)
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            state = [t for st in opt.state.values() for t in st.values()]
            tracker = MemoryTracker(phase="optimizer")
            for category, tensors in (("trainable", params), ("gradients", [p.grad for p in params]),
                                      ("optimizer", state)):
                tracker.register(tensors, category)
            with tracker:
                opt.step()
        result = tracker.classify(state)
    assert chosen == ["foreach", "foreach"]
    assert all(st["step"].device.type == "cpu" for st in opt.state.values())
    on_device = sum(t.untyped_storage().nbytes() for st in opt.state.values() for t in st.values() if t.is_cuda)
    assert on_device == cuda.adamw_state_bytes(sizes, 4)
    assert result.breakdown["temporaries"] == cuda.adamw_temporary_bytes(sizes, 4) == sum(sizes) * 4


@pytest.mark.parametrize("optimizer", ["PagedAdamW8bit", "AdamW8bit", "PagedAdamW"])
def test_bnb_init_state_on_cuda_pages_only_state1_and_state2(monkeypatch, optimizer):
    """bitsandbytes' own init_state on fake CUDA parameters, its paged allocation (F.get_paged, CUDA unified
    memory) replaced by a recorder."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    paged = []

    def get_paged(*shape, dtype=torch.float32, device=None):
        paged.append(torch.empty(*shape, dtype=dtype, device="meta"))
        return paged[-1]

    monkeypatch.setattr(F, "get_paged", get_paged)
    monkeypatch.setattr(F, "fill", lambda *a, **k: None)
    sizes = [131072, 8192, 1000]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in sizes]
    opt = getattr(bnb.optim, optimizer)(params, lr=1e-3)
    with mode:
        for i, p in enumerate(params):
            opt.init_state(opt.param_groups[0], p, 0, i)
    storages = {}
    for st in opt.state.values():
        for t in st.values():
            if torch.is_tensor(t) and t.is_cuda:
                storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    device = sum(cuda.block_bytes(n) for n in storages.values())
    expected = cuda.bnb_state_bytes(sizes, eight_bit=optimizer.endswith("8bit"), paged=optimizer.startswith("Paged"))
    assert (device, sum(t.nbytes for t in paged)) == expected


def test_analytic_reserved_uses_the_fitted_ratio():
    # round_up(100 MiB x 1.113, 2 MiB) = 112 MiB; nvidia-smi adds the CUDA context
    assert cuda.cuda_reserved_and_device_bytes(100 * cuda.MIB) == {
        "reserved_bytes": 112 * cuda.MIB, "device_bytes": 112 * cuda.MIB + cuda.CUDA_CONTEXT_BYTES}


def test_fitted_ratio_is_the_one_the_fitting_script_wrote():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "allocator_ratio.md").read_text()
    assert float(re.search(r"\*\*ratio ([0-9.]+)\*\*", text).group(1)) == cuda.CUDA_RESERVED_FACTOR


def test_trace_estimate_on_cuda_simulates_the_allocator(write_scenario):
    from peftprof.catalog import Gpu
    from peftprof.trace import trace_estimate

    s = lora(write_scenario, "adamw")
    out = trace_estimate(s, device="cuda")
    # tiny model: its allocations fill small 2 MiB and large 20 MiB segments, reserved well above the tensors
    assert out["reserved_bytes"] > out["peak_bytes"] and out["n_segments"] >= 2
    assert 0 <= out["fragmentation_bytes"] < out["reserved_bytes"]
    assert out["device_bytes"] == out["reserved_bytes"] + cuda.CUDA_CONTEXT_BYTES
    assert out["allocator_oom"] is False
    # a GPU with room for half the step past the context: the simulated allocator fails (with the cache freed)
    tight = Gpu(name="tight", memory_bytes=cuda.CUDA_CONTEXT_BYTES + out["peak_bytes"] // 2,
                bf16_tflops=1.0, bandwidth_bytes_per_s=1e9, bf16=True)
    out = trace_estimate(s, device="cuda", gpu=tight)
    assert out["allocator_oom"] is True and out["fits"] is False
    roomy = Gpu(name="roomy", memory_bytes=cuda.CUDA_CONTEXT_BYTES + 2 * out["reserved_bytes"], bf16_tflops=1.0,
                bandwidth_bytes_per_s=1e9, bf16=True)
    out = trace_estimate(s, device="cuda", gpu=roomy)
    assert out["allocator_oom"] is False and out["fits"] is True
