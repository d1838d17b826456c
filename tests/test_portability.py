"""The runner, the trace and the checks behave the same on every x86 CPU (issue 12).

bitsandbytes branches on two CPU capabilities that change what is allocated:
- AVX512-BF16 (`has_avx512bf16()`, read when a Linear4bit is built): an eval-mode forward on an input
  without grad repacks the 4-bit weight for good into a CPU inference layout (nn/modules.py
  Linear4bit.forward -> _convert_weight_packed_for_cpu). The runner's checks do exactly that, which broke
  training afterwards on such CPUs (`result += bias` in-place error, reshape errors).
- AVX512 (`backends/cpu/ops.py _has_avx512`, read on every dequantize): block sizes >= 2048 take a
  pure-torch fallback that allocates int32 and fp32 copies of the weight.
CI cannot choose its CPU, so each branch is forced here in both directions.
"""

import bitsandbytes
import pytest
import torch
from bitsandbytes.backends.cpu import ops as bnb_cpu_ops

from peftprof.run.runner import run_variant
from peftprof.scenario import load_scenarios
from peftprof.trace import trace_peak

# gpt2 has biases on every linear (Conv1D): IA3 on 4-bit layers with a bias failed on AVX512-BF16 CPUs
GPT2_IA3_NF4 = '''[model]
model_type = "gpt2"
n_embd = 64
n_layer = 2
n_head = 2
vocab_size = 1000
n_positions = 128
[precision]
weights = "nf4"
compute_dtype = "bf16"
[peft]
method = "ia3"
[training]
batch_size = 2
seq_len = 16
[run]
device = "cpu"
steps = 1
warmup_steps = 1
'''
# fp4 LoRA failed in the checks phase ("shape '[64, 2]' is invalid") on AVX512-BF16 CPUs
LLAMA_LORA_FP4 = '''[model]
model_type = "llama"
hidden_size = 64
num_hidden_layers = 2
num_attention_heads = 4
intermediate_size = 160
vocab_size = 1000
[precision]
weights = "fp4"
compute_dtype = "bf16"
quant_block_size = {block}
[peft]
method = "lora"
r = 4
[training]
batch_size = 2
seq_len = 16
[run]
device = "cpu"
steps = 1
warmup_steps = 1
'''


def _load(tmp_path, text):
    path = tmp_path / "s.toml"
    path.write_text(text)
    (s,) = load_scenarios([path])
    return s


@pytest.fixture
def cpu_has_avx512bf16(monkeypatch, request):
    """Make bitsandbytes believe this CPU has (or lacks) AVX512-BF16 for layers built in the test."""
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: request.param)
    return request.param


@pytest.mark.parametrize("cpu_has_avx512bf16", [True, False], indirect=True)
def test_forcing_reaches_bitsandbytes_repacking(cpu_has_avx512bf16):
    """The forcing is real: a plain Linear4bit built under it repacks (or not) on an eval no-grad forward."""
    layer = bitsandbytes.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)) is cpu_has_avx512bf16


@pytest.mark.parametrize("cpu_has_avx512bf16", [True, False], indirect=True)
@pytest.mark.parametrize("text", [GPT2_IA3_NF4, LLAMA_LORA_FP4.format(block=64)], ids=["gpt2-ia3-nf4", "llama-lora-fp4"])
def test_runner_and_trace_agree_whatever_the_cpu_says(tmp_path, cpu_has_avx512bf16, text):
    s = _load(tmp_path, text)
    rec = run_variant(s, device="cpu")
    assert rec["status"] == "ok", rec["error"]
    assert rec["checks"]["quantization_rel_error"] is not None
    # the trace replays the training layout; the measurement must be of that layout too, to the byte
    assert trace_peak(s)["peak_bytes"] == rec["measured"]["peak_bytes"]


def test_large_blocks_dequantize_the_same_way_on_every_cpu(tmp_path, monkeypatch):
    """Block size 4096: the AVX512 fallback branch is pinned off while profiling (allocations as on CUDA,
    trace == measurement) and on for the quantization error (the exact path), whatever the CPU has."""
    s = _load(tmp_path, LLAMA_LORA_FP4.format(block=4096).replace('"fp4"', '"nf4"'))
    errors = {}
    for avx512 in (True, False):
        monkeypatch.setattr(bnb_cpu_ops, "_has_avx512", avx512)
        rec = run_variant(s, device="cpu")
        assert rec["status"] == "ok", rec["error"]
        assert trace_peak(s)["peak_bytes"] == rec["measured"]["peak_bytes"]
        errors[avx512] = rec["checks"]["quantization_rel_error"]
    # unpinned, this CPU's AVX512 kernel gave 0.163 against the exact 0.114 (nf4, block 4096, measured here)
    assert errors[True] == pytest.approx(errors[False], rel=1e-6)
