"""From a traced step to the allocator simulation (estimate/allocator.py), and back from a recorded CUDA memory
snapshot (torch.cuda.memory._record_memory_history + _dump_snapshot) to a check of the simulation.

What the simulation covers and what it does not: see estimate/allocator.py. A CPU trace sees the storages a CUDA
step allocates, with their sizes and order, but not what exists only on CUDA (the CUDA context, cuBLAS
workspaces beyond the one added here, kernels that save less or differently than their CPU counterparts).
"""

from __future__ import annotations

from .alloc_conf import AllocConf, parse_alloc_conf
from .allocator import CachingAllocator, SimResult, simulate

SEGMENT_ACTIONS = ("segment_alloc", "segment_free", "segment_map", "segment_unmap")
# --- from a trace to an allocation stream ------------------------------------------------------------------------
def tracker_stream(tracker, paged=lambda a: False) -> dict:
    """A MemoryTracker's events (run/track.py: registered storages first, then the tracked step, in order) as
    the stream `simulate` reads: {"events", "n_registered" (leading allocations that exist before the step),
    "paged" (ordinals of allocations that live outside torch's allocator on CUDA, `paged(alloc)`)}. Zero-byte
    storages are left out (NativeCachingAllocator::allocate allocates nothing for size 0)."""
    ordinal: dict[int, int] = {}
    events, paged_ordinals, n_registered, step_started = [], [], 0, False
    for uid, sign in tracker.events:
        a = tracker.allocs[uid]
        if a.nbytes == 0:
            continue
        if sign > 0:
            if a.category is not None and not step_started:
                n_registered += 1
                if paged(a):
                    paged_ordinals.append(len(ordinal))
            else:
                step_started = True
            ordinal[uid] = len(ordinal)
            events.append(a.nbytes)
        else:
            step_started = True
            events.append(-(ordinal[uid] + 1))
    return {"events": events, "n_registered": n_registered, "paged": paged_ordinals}


def steady_state_events(stream: dict, *, workspace_bytes: int = 0, n_steps: int = 2) -> list[int]:
    """The stream as a CUDA process sees it: the registered storages (parameters, buffers, optimizer state) in
    registration order, as loading creates them, without the paged ones; the cuBLAS workspace (held by the
    allocator from the first matmul on); then the step `n_steps` times, so the last one runs on a warm cache as
    the measured step does. What a step leaves alive is freed before the next step starts."""
    events, n_reg = stream["events"], stream["n_registered"]
    excluded = set(stream.get("paged", ()))
    out: list[int] = []
    n_allocs = 0
    registered: dict[int, int] = {}  # ordinal in `stream` -> ordinal in `out`
    for k in range(n_reg):
        if k not in excluded:
            registered[k] = n_allocs
            out.append(events[k])
            n_allocs += 1
    if workspace_bytes > 0:
        out.append(workspace_bytes)
        n_allocs += 1
    for rep in range(n_steps):
        live: dict[int, int] = {}
        k = n_reg
        for e in events[n_reg:]:
            if e > 0:
                live[k] = n_allocs
                out.append(e)
                n_allocs += 1
                k += 1
            else:
                src = -e - 1
                new = live.pop(src, None) if src >= n_reg else registered.pop(src, None)
                if new is not None:
                    out.append(-(new + 1))
        if rep < n_steps - 1:
            out.extend(-(new + 1) for new in live.values())
    return out


def simulate_trace(stream: dict, *, conf: AllocConf | str | None = None, capacity_bytes: int | None = None,
                   total_memory_bytes: int | None = None, workspace_bytes: int = 0, n_steps: int = 2) -> SimResult:
    """The allocator simulation of a traced step in its steady state (steady_state_events)."""
    events = steady_state_events(stream, workspace_bytes=workspace_bytes, n_steps=n_steps)
    result, _ = simulate(events, conf=conf, capacity_bytes=capacity_bytes, total_memory_bytes=total_memory_bytes)
    return result


def _reserved_peak(entries) -> int:
    current = peak = 0
    for action, _, size in entries:
        current += size if action in ("segment_alloc", "segment_map") else -size
        peak = max(peak, current)
    return peak


def _recorded_segments(snap: dict, device: int) -> list[tuple]:
    out = []
    for seg in sorted((s for s in snap.get("segments", []) if s.get("device", 0) == device),
                      key=lambda s: s["address"]):
        blocks = tuple((b["size"], b["state"] != "inactive") for b in seg["blocks"])
        out.append((seg["total_size"], blocks))
    return out


def replay_snapshot(snap: dict, *, conf: AllocConf | str | None = None, device: int = 0) -> dict:
    """Replay a recorded snapshot's alloc/free_completed entries (device_traces) in order through the simulation
    and compare: the segment entries (action and size, in order), the peak reserved bytes they add up to, and
    the segments at the end (sizes and blocks). The recording must start before the process's first CUDA
    allocation. New cudaMalloc segments take the recorded addresses in order (the simulation cannot know them).
    The simulation has no capacity here, so a recorded segment_free/segment_unmap it has not produced itself is
    an empty_cache (or the out-of-memory path's release_cached_blocks) and is replayed as one."""
    if not isinstance(conf, AllocConf):
        conf = parse_alloc_conf(conf if conf is not None else snap.get("allocator_settings", {}).get(
            "PYTORCH_CUDA_ALLOC_CONF") or None)
    trace = snap["device_traces"][device]
    addresses = iter([e["addr"] for e in trace if e["action"] == "segment_alloc"])
    alloc = CachingAllocator(conf, address_source=lambda size: next(addresses))
    live, recorded = {}, []
    for e in trace:
        action = e["action"]
        if action == "alloc":
            live[e["addr"]] = alloc.malloc(e["size"])
        elif action == "free_completed":
            alloc.free(live.pop(e["addr"]))
        elif action in SEGMENT_ACTIONS:
            recorded.append((action, e["addr"], e["size"]))
            if action in ("segment_free", "segment_unmap") and len(alloc.log) < len(recorded):
                alloc.empty_cache()
    rec = [(a, s) for a, _, s in recorded]
    sim = [(a, s) for a, _, s in alloc.log]
    first = next((i for i, (x, y) in enumerate(zip(rec, sim, strict=False)) if x != y), None)
    if first is None and len(rec) != len(sim):
        first = min(len(rec), len(sim))
    simulated_segments = [(s["total_size"], tuple(s["blocks"])) for s in alloc.segments()]
    recorded_segments = _recorded_segments(snap, device)
    out = {"recorded_peak_reserved_bytes": _reserved_peak(recorded),
           "simulated_peak_reserved_bytes": alloc.peak_reserved_bytes,
           "recorded_segments": recorded_segments, "simulated_segments": simulated_segments,
           "first_segment_difference": None if first is None else {
               "index": first, "recorded": rec[first] if first < len(rec) else None,
               "simulated": sim[first] if first < len(sim) else None}}
    out["match"] = (first is None and out["recorded_peak_reserved_bytes"] == out["simulated_peak_reserved_bytes"]
                    and (not snap.get("segments") or recorded_segments == simulated_segments))
    return out
