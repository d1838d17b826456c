"""Mixed precision (`[precision] autocast`): the dtype of each kind of tensor a step makes under
`torch.autocast`, as the training step runs it (run/step.py: forward and loss under autocast, outputs made fp32
as Accelerate does, backward outside it). Every rule was checked against the CPU runner (tests/test_autocast.py,
tests/test_estimate_formulas.py); activations.py reads these and nothing else about autocast.

Sources. torch's op lists: aten/src/ATen/autocast_mode.cpp (mirrored, python-visible, in
torch/testing/_internal/autocast_test_lists.py: AutocastTestLists for CUDA, AutocastCPUTestLists for CPU) and
https://pytorch.org/docs/stable/amp.html ("CUDA Ops that can autocast to float16", "CPU Ops that can autocast
to bfloat16"). Both devices run linear/matmul/bmm/addmm and scaled_dot_product_attention in the autocast dtype
("lower precision") and the losses (nll_loss, cross_entropy) in fp32. Only CUDA also runs layer_norm, softmax,
log_softmax, pow, rsqrt, exp, sum... in fp32; on CPU those run in their input's dtype. In these models that
changes gpt2/opt's LayerNorm (fp32 output on CUDA) and gpt2's tanh-GELU (its pow, and so the rest of it, in
fp32 on CUDA) and gpt2's eager softmax (no dtype argument); llama-family RMSNorm casts to fp32 itself and
eager attention passes dtype=float32 to softmax, so those agree. The trace estimator runs the CPU policy (a
CPU-only torch cannot run CUDA autocast on fake tensors); the CUDA differences live here, in `*_cuda` rules.

Autocast's cast cache (autocast_mode.cpp cached_cast: `arg.requires_grad() && arg.is_leaf()`, fp32 only) keeps
one cast per trainable fp32 leaf (LoRA A/B, fully trained fp32 weights) for the whole forward; a frozen weight
is cast again on every call, and that copy is what the matmul saves for backward (shared/facts.md).
"""

from __future__ import annotations

from ..settings import BYTES_PER_ELEMENT, Scenario

FP32_NAME = "fp32"


def enabled(s: Scenario) -> bool:
    return s.precision.autocast != "none"


def _promote(a: str, b: str) -> str:
    """torch type promotion between float dtypes: equal stays, anything else (fp32 beside a half, or bf16
    beside fp16) becomes fp32 (c10/core/ScalarType.h promoteTypes)."""
    return a if a == b else FP32_NAME


def hidden_dtype(s: Scenario) -> str:
    """Embeddings, norms' weights, lm_head: the weights dtype; fp32 on bitsandbytes models
    (prepare_model_for_kbit_training); the compute dtype on int4 (quanto) models (widths.py)."""
    p = s.precision
    if p.weights in ("fp32", "fp16", "bf16"):
        return p.weights
    return p.compute_dtype if p.weights == "int4" else FP32_NAME


def linear_output_dtype(s: Scenario) -> str:
    """A base linear's output. Float, int8 (bitsandbytes MatMul8bitFp runs F.linear) and int4 (quanto) bases
    compute in the autocast dtype; bitsandbytes 4-bit layers cast their output back to their input's dtype
    (nn/modules.py Linear4bit.forward `.to(inp_dtype)`), the hidden dtype."""
    if not enabled(s):
        return hidden_dtype(s)
    return hidden_dtype(s) if s.precision.weights in ("fp4", "nf4") else s.precision.autocast


def stream_dtype(s: Scenario) -> str:
    """The residual stream after a layer's first residual add: hidden + linear output, promoted."""
    return _promote(hidden_dtype(s), linear_output_dtype(s))


def autocast_bytes(s: Scenario) -> int:
    return BYTES_PER_ELEMENT[s.precision.autocast] if enabled(s) else 0


def stream_bytes(s: Scenario) -> int:
    return BYTES_PER_ELEMENT[stream_dtype(s)]


def linear_output_bytes(s: Scenario) -> int:
    return BYTES_PER_ELEMENT[linear_output_dtype(s)]


def attention_bytes(s: Scenario) -> int:
    """q, k, v, the attention output and eager's probabilities: SDPA and matmul are lower-precision ops, so
    they run in the autocast dtype whatever rotary embedding promoted q and k to (its cos/sin are in the hidden
    dtype, transformers LlamaRotaryEmbedding `cos.to(x.dtype)`)."""
    return autocast_bytes(s) if enabled(s) else linear_output_bytes(s)


def attention_dropout_bytes(s: Scenario, device: str, mask: int) -> tuple[int, int, int]:
    """(softmax output, dropped probabilities, dropout mask) bytes per element where attention dropout saves
    probabilities (gpt2/opt; `mask` is what activations.py uses without autocast). SDPA on CPU takes the math
    path for dropout, which computes half inputs in fp32 (aten/src/ATen/native/transformers/attention.cpp
    _scaled_dot_product_attention_math: query/key/value `.to(at::kFloat)`): q, k, v, softmax, mask and dropped
    probabilities all fp32 (measured). Eager under autocast: the matmul output is in the autocast dtype and
    softmax (no dtype argument in gpt2/opt) keeps it on CPU, but is on CUDA's fp32 list."""
    att = attention_bytes(s)
    if not enabled(s):
        return att, att, mask
    fp32 = BYTES_PER_ELEMENT[FP32_NAME]
    if s.training.attention == "sdpa" and device != "cuda":
        return fp32, fp32, fp32
    return (fp32 if device == "cuda" else att), att, mask


def frozen_weight_cast_bytes(s: Scenario) -> int:
    """Bytes per weight element of the cast copy a float linear saves for backward (mm saves its weight when its
    input needs a gradient): the autocast dtype unless the weight already has it. Trainable fp32 weights (full
    fine-tuning) are cast once per forward (the cache) and saved just the same. 0 without autocast, and for
    quantized bases (they dequantize in backward, bitsandbytes MatMul4Bit / MatMul8bitFp)."""
    p = s.precision
    if not enabled(s) or p.is_quantized or p.weights == p.autocast:
        return 0
    return autocast_bytes(s)


def lm_head_cast_bytes(s: Scenario) -> int:
    """lm_head is a frozen (or trained) float linear in the hidden dtype on every model (never quantized:
    transformers keeps the output embedding, integrations/bitsandbytes.py get_keys_to_not_convert): under
    autocast its weight is cast per call and saved, unless it already has the autocast dtype."""
    if not enabled(s) or hidden_dtype(s) == s.precision.autocast:
        return 0
    return autocast_bytes(s)


def input_cast_bytes(s: Scenario, input_dtype: str) -> int:
    """Bytes per element of the copy autocast makes of a linear's input (0: the input is already in the autocast
    dtype and is used as is). Inputs are not leaves: every call casts again, so q, k and v each cast the same
    norm output (measured)."""
    if not enabled(s) or input_dtype == s.precision.autocast:
        return 0
    return autocast_bytes(s)


def norm_output_dtype(s: Scenario, device: str) -> str:
    """What a norm hands the next linear. RMSNorm (llama family): weight * normed.to(input dtype), the stream
    dtype promoted with the weight's. LayerNorm (gpt2/opt): in its input's dtype on CPU (not on the CPU fp32
    list), fp32 on CUDA (layer_norm is on CUDA's fp32 list)."""
    if enabled(s) and device == "cuda" and s.model.arch.norm == "layer":
        return FP32_NAME
    return _promote(stream_dtype(s), hidden_dtype(s))


def layernorm_saved_input_bytes(s: Scenario, device: str) -> int:
    """LayerNorm saves its input: on CUDA under autocast the fp32 copy autocast made of it (fp32 list)."""
    if enabled(s) and device == "cuda":
        return BYTES_PER_ELEMENT[FP32_NAME]
    return stream_bytes(s)


def gelu_saved_bytes_per_element(s: Scenario, device: str) -> int:
    """gpt2's NewGELU 0.5*x*(1+tanh(c*(x+0.044715*x^3))) saves x, tanh's output, 0.5*x and 1+tanh (4 tensors,
    activations.py). On CPU all in the linear output's dtype; on CUDA under autocast `pow` is on the fp32 list,
    so tanh's output and 1+tanh are fp32 while x and 0.5*x stay in the autocast dtype."""
    out = linear_output_bytes(s)
    if enabled(s) and device == "cuda":
        return 2 * out + 2 * BYTES_PER_ELEMENT[FP32_NAME]
    return 4 * out


def held_logits_bytes_per_element(s: Scenario) -> int:
    """The logits the step holds through backward: Accelerate's convert_outputs_to_fp32 replaces the autocast
    dtype logits by an fp32 copy (run/step.py outputs_to_fp32); else lm_head's output dtype."""
    return BYTES_PER_ELEMENT[FP32_NAME] if enabled(s) else BYTES_PER_ELEMENT[hidden_dtype(s)]
