"""Bytes per element of each kind of tensor a training step holds: the one place the estimator decides
dtypes. memory.py (persistent state) and activations.py (saved tensors, transients) both read these and
nothing else about dtypes. Under `[precision] autocast` the dtypes of what the step makes (linear outputs, casts
saved for backward, held logits) follow torch's autocast policy: those rules live beside this, in autocast.py;
persistent state (weights, adapters, gradients, optimizer states) is unchanged by autocast.
"""

from __future__ import annotations

from ..settings import BYTES_PER_ELEMENT, Scenario

FP32 = 4
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes/optim/optimizer.py: Optimizer8bit min_8bit_size default
BNB_8BIT_BLOCK = 256  # bitsandbytes/functional.py: blockwise optimizer states, 256 values per absmax
BNB_PAGED_MIN_NUMEL = 100_000  # bitsandbytes/optim/optimizer.py get_state_buffer: smaller states are not paged
ADAPTER_BYTES_PER_ELEMENT = FP32  # peft autocast_adapter_dtype=True keeps fp16/bf16 adapters in fp32 (peft 0.21)
CUDA_DROPOUT_MASK_BYTES_PER_ELEMENT = 1  # CUDA's fused native_dropout keeps a bool mask


def compute_bytes_per_element(s: Scenario) -> int:
    """Quantized layers' matmuls (dequantized weight, input cast) run in compute_dtype."""
    return BYTES_PER_ELEMENT[s.precision.compute_dtype]


def non_quantized_bytes_per_element(s: Scenario) -> int:
    """Embeddings, norms, lm_head, biases: fp32 on bitsandbytes models (peft's prepare_model_for_kbit_training
    upcasts every non-quantized parameter, peft/utils/other.py), the compute dtype on int4 (quanto) models
    (not prepared: run/build.py prepare_quanto_for_training), else the weights dtype."""
    p = s.precision
    if p.weights == "int4":
        return BYTES_PER_ELEMENT[p.compute_dtype]
    return FP32 if p.is_quantized else BYTES_PER_ELEMENT[p.weights]


def activation_bytes_per_element(s: Scenario) -> int:
    """The hidden stream between layers: the dtype of the embeddings and norms (`non_quantized_bytes_per_element`);
    bitsandbytes casts to compute_dtype inside each quantized layer and back (bitsandbytes nn/modules.py)."""
    return non_quantized_bytes_per_element(s)


def trainable_bytes_per_element(s: Scenario) -> int:
    """Trainable parameters, their gradients and AdamW states: adapters in fp32 (ADAPTER_BYTES_PER_ELEMENT);
    full fine-tuning trains the weights in their own dtype."""
    return BYTES_PER_ELEMENT[s.precision.weights] if s.peft.method == "full" else ADAPTER_BYTES_PER_ELEMENT


def dropout_mask_bytes_per_element(s: Scenario, device: str) -> int:
    """What dropout saves per element: CUDA's fused native_dropout keeps a bool mask; the CPU kernel
    (aten/native/Dropout.cpp) draws the mask with empty_like(input).bernoulli_, in the input's dtype."""
    return CUDA_DROPOUT_MASK_BYTES_PER_ELEMENT if device == "cuda" else activation_bytes_per_element(s)


def adapter_dropout_mask_bytes_per_element(device: str) -> int:
    """LoRA dropout runs on the input already cast to the fp32 adapter dtype (peft/tuners/lora/layer.py):
    its CPU mask is fp32 (aten/native/Dropout.cpp, as above)."""
    return CUDA_DROPOUT_MASK_BYTES_PER_ELEMENT if device == "cuda" else ADAPTER_BYTES_PER_ELEMENT
