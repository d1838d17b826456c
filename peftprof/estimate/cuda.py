"""What differs on CUDA: the caching allocator's block sizes, the terms nvidia-smi adds, and the optimizer
implementations torch and bitsandbytes pick on a CUDA device. Pure functions of element counts.

Versions read: torch 2.13 (torch/optim/*.py; c10/cuda/CUDACachingAllocator.cpp of the same release),
bitsandbytes 0.50.2 (bitsandbytes/optim/optimizer.py).
"""

from __future__ import annotations

import math

from .allocator import MIN_BLOCK_BYTES, SMALL_BUFFER_BYTES
from .widths import BNB_8BIT_BLOCK, BNB_8BIT_MIN_SIZE, BNB_PAGED_MIN_NUMEL, FP32

MIB = 1 << 20
# Assumptions until measured on a GPU (benchmarks/gpu_check.sh). cuBLAS keeps a workspace in torch's caching
# allocator (torch/csrc/cuda/CUDABlasHandlePool.cpp, default :4096:8 = 32 MiB on Hopper).
CUDA_CUBLAS_WORKSPACE_BYTES = 32 * MIB
CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context + kernels, outside the allocator (nvidia-smi only)
# Reserved over allocated peak of torch's caching allocator, for the analytic estimate: fitted, not set by hand.
# benchmarks/fit_allocator_ratio.py replays the traced steps of benchmarks/accuracy.py's 54 traceable generated
# scenarios through the allocator simulation (estimate/allocator.py, default PYTORCH_CUDA_ALLOC_CONF) and takes
# the median of simulated peak reserved / analytic CUDA peak (quotients 1.024-1.407); round_up(peak x 1.113,
# 2 MiB) is then within 4.59% of the simulated reserved bytes at the median, 11.0% at p90, 20.0% at worst
# (benchmarks/results/allocator_ratio.md). Small models: segment granularity weighs more there; the shipped
# qlora-7b simulates at about 1.14. `estimate --method trace --device cuda` simulates instead of using it.
CUDA_RESERVED_FACTOR = 1.113
# The allocator's constants (kSmallBuffer: 2 MiB small-pool segments; kMinBlockSize with round_size(): every
# request is rounded up to a multiple of 512 B and allocated_bytes counts the rounded size), from the simulation
CUDA_SEGMENT_BYTES = SMALL_BUFFER_BYTES
CUDA_MIN_BLOCK_BYTES = MIN_BLOCK_BYTES


def _round_up(n: float, to: int) -> int:
    return int(math.ceil(n / to) * to)


def cuda_reserved_and_device_bytes(peak_bytes: int) -> dict[str, int]:
    """What the caching allocator reserves for an allocated peak (the fitted ratio above) and what nvidia-smi
    would show (plus the CUDA context, an assumed term until measured)."""
    reserved = _round_up(peak_bytes * CUDA_RESERVED_FACTOR, CUDA_SEGMENT_BYTES)
    return {"reserved_bytes": reserved, "device_bytes": reserved + CUDA_CONTEXT_BYTES}


def block_bytes(nbytes: int) -> int:
    """Bytes torch's caching allocator counts for one tensor of `nbytes` (round_size; 0 B allocates nothing)."""
    return _round_up(nbytes, CUDA_MIN_BLOCK_BYTES) if nbytes > 0 else 0


def adamw_state_bytes(tensors: list[int], bytes_per_element: int) -> int:
    """torch AdamW on CUDA (optim/adam.py Adam._init_group, l. 165-184): exp_avg and exp_avg_sq like the
    parameter, each its own allocation; `step` is a CPU scalar when capturable and fused are off (the
    defaults: "special device hosting for step"), so it takes no device memory."""
    return sum(2 * block_bytes(n * bytes_per_element) for n in tensors)


def adamw_temporary_bytes(tensors: list[int], bytes_per_element: int) -> int:
    """torch AdamW on CUDA runs the foreach implementation (optim/optimizer.py _default_to_fused_or_foreach,
    l. 161-186: foreach when every parameter is a plain tensor on a foreach device; cuda is one,
    utils/_foreach_utils.py _get_foreach_kernels_supported_devices). optim/adam.py _multi_tensor_adam
    (l. 553-799), capturable off, no amsgrad/maximize, decoupled weight decay: lerp_, mul_, addcmul_, div_,
    add_ and addcdiv_ are in place; `exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)` (l. 790) is
    the one new list, a tensor like every second moment, all alive at once. One device/dtype group here
    (every trainable tensor shares a dtype)."""
    return sum(block_bytes(n * bytes_per_element) for n in tensors)


def bnb_state_bytes(tensors: list[int], *, eight_bit: bool, paged: bool) -> tuple[int, int]:
    """(device_bytes, paged_bytes) of bitsandbytes' 2-state optimizers on CUDA (optim/optimizer.py
    Optimizer2State.init_state, l. 492-532): 8-bit for tensors of >= min_8bit_size values (uint8 state1 and
    state2, fp32 absmax1/absmax2 per 256 values, the shared 256-entry fp32 qmaps moved to the device once),
    else fp32 state1/state2. get_state_buffer (l. 374-390) pages only state1/state2, and only of tensors of
    >= 1e5 values (F.get_paged: CUDA unified memory, outside torch's allocator, exact bytes); absmax and
    qmaps are ordinary device tensors (torch.zeros(..., device=p.device))."""
    device = paged_bytes = 0
    any_8bit = False
    for n in tensors:
        is_8bit = eight_bit and n >= BNB_8BIT_MIN_SIZE
        any_8bit |= is_8bit
        state_bytes = n if is_8bit else n * FP32
        if paged and n >= BNB_PAGED_MIN_NUMEL:
            paged_bytes += 2 * state_bytes
        else:
            device += 2 * block_bytes(state_bytes)
        if is_8bit:
            device += 2 * block_bytes(math.ceil(n / BNB_8BIT_BLOCK) * FP32)
    if any_8bit:
        device += 2 * block_bytes(256 * FP32)  # name2qmap["dynamic"] and ["udynamic"]
    return device, paged_bytes
