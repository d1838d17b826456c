"""A tracked step as a PyTorch memory snapshot, so it opens in PyTorch's own viewers.

The format is what `torch.cuda.memory._snapshot()` returns and `torch.cuda.memory._dump_snapshot` pickles
(torch 2.13, torch/cuda/memory.py `_snapshot`; the reader is torch/cuda/_memory_viz.py): a dict with
`segments` (the allocator's segments at the end, each a list of `blocks`) and `device_traces` (one list
of events per device: `alloc`, `free_requested`, `free_completed`, each with `addr`, `size`, `stream`,
`frames`). It is built the way torch's own `_profile_to_snapshot` (same file) builds one from a CPU
profile: one segment spanning every address, a block per tensor live at the end.

A CPU step has no allocator addresses: each storage gets a fresh 512-byte aligned address (the caching
allocator's rounding, c10/cuda/CUDACachingAllocator.cpp kMinBlockSize) that is never reused, so every
alloc pairs with exactly one free. Sizes are the storages' exact byte counts. The frame of each event names
the module that created the tensor, its category, dtype and shape; the viewer shows it as the stack.

    python -m torch.cuda._memory_viz trace_plot step.pickle -o step.html
    (or drop step.pickle on https://pytorch.org/memory_viz)
"""

from __future__ import annotations

import pickle
from pathlib import Path

from .errors import UserError
from .timeline import _dtype, module_label

BASE_ADDRESS = 0x7F0000000000
ALIGN = 512


def _frames(a, category: str) -> list[dict]:
    shape = "" if a.shape is None else "[" + ", ".join(map(str, a.shape)) + "]"
    what = f"{category} {_dtype(a.dtype) or ''}{shape}".strip()
    return [{"filename": module_label(a.where, category), "line": 0, "name": what}]


def snapshot(tracker) -> dict:
    """The tracked step (after tracker.classify) as a `torch.cuda.memory._snapshot()` dict."""
    allocs, roles = tracker.allocs, tracker.roles
    trace, addr_of, frames_of = [], {}, {}
    nxt = BASE_ADDRESS
    for i, (uid, sign) in enumerate(tracker.events):
        a = allocs[uid]
        if a.nbytes == 0:
            continue
        if sign > 0:
            addr_of[uid], frames_of[uid] = nxt, _frames(a, roles[uid])
            nxt += -(-a.nbytes // ALIGN) * ALIGN
            trace.append({"action": "alloc", "addr": addr_of[uid], "size": a.nbytes, "stream": 0, "time_us": i,
                          "frames": frames_of[uid], "category": roles[uid]})
        else:
            for action in ("free_requested", "free_completed"):
                trace.append({"action": action, "addr": addr_of[uid], "size": a.nbytes, "stream": 0, "time_us": i,
                              "frames": frames_of[uid]})
            del addr_of[uid]
    blocks, last = [], BASE_ADDRESS
    for uid, addr in sorted(addr_of.items(), key=lambda kv: kv[1]):  # live at the end, in address order
        size = allocs[uid].nbytes
        if addr > last:
            blocks.append({"address": last, "size": addr - last, "requested_size": 0, "state": "inactive",
                           "frames": []})
        blocks.append({"address": addr, "size": size, "requested_size": size, "state": "active_allocated",
                       "frames": frames_of[uid]})
        last = addr + size
    if nxt > last:
        blocks.append({"address": last, "size": nxt - last, "requested_size": 0, "state": "inactive", "frames": []})
    live = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    segment = {"device": 0, "address": BASE_ADDRESS, "total_size": nxt - BASE_ADDRESS,
               "allocated_size": live, "active_size": live, "requested_size": live, "stream": 0,
               "segment_type": "large", "segment_pool_id": (0, 0), "is_expandable": False, "frames": [],
               "blocks": blocks}
    return {"segments": [segment] if blocks else [], "device_traces": [trace],
            "allocator_settings": {}, "external_annotations": []}


def traced_snapshot_problems(variants) -> list[str]:
    """Variants the trace cannot snapshot (`peftprof snapshot` without --run), one line each naming the file,
    the key and what to do instead: int4 (optimum-quanto cannot quantize meta tensors) is snapshotted from a
    measured step with --run."""
    from .textfmt import visible

    return [f"{visible(v.source)}: [precision] weights: \"int4\": variant {visible(v.name)}: the traced snapshot "
            "cannot build int4 layers on fake tensors (optimum-quanto cannot quantize meta tensors); add --run to "
            "snapshot a measured CPU step (allowed without --run: fp32, fp16, bf16, int8, fp4, nf4)"
            for v in variants if v.precision.weights == "int4"]


def write_snapshot(tracker, path) -> Path:
    """Pickle the snapshot as torch.cuda.memory._dump_snapshot does; UserError if it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(snapshot(tracker), f)
    except OSError as e:
        raise UserError(f"{path}: cannot write the snapshot: {e.strerror or e}") from None
    return path
