"""Why the peak is where it is: the memory timeline of a tracked step and what is live at its peak.

Both come from the tracker's events (peftprof/run/track.py MemoryTracker): every storage the step creates,
when it dies, what it became (the category `classify` gives it), its shape and dtype and the module that
created it (forward hooks; the autograd node in backward). The runner's tracked step gives the measured
ones, the trace estimator's fake-tensor step the estimated ones (the same tracker, trace.py trace_peak).

Records stay small: the timeline is downsampled to at most `TIMELINE_POINTS` moments, each bucket of events
keeping its highest moment, so the peak is kept exactly; at the peak only the `N_TOP` largest tensors and
the `N_GROUPS` largest modules are kept (layers: all of them, they are few).
"""

from __future__ import annotations

import re

from .results import CATEGORIES, bytes_problem, show

TIMELINE_POINTS = 240
N_TOP = 20
N_GROUPS = 15
MAX_LAYERS = 512
STEP_PHASES = ("forward", "backward", "optimizer", "steady")
PEAK_PHASES = ("forward", "backward", "optimizer")  # track.py PHASES: where classify looks for the peak
# decoder layer containers of the supported models: llama/mistral/qwen2/gemma `model.layers.N`, gpt2
# `transformer.h.N`, opt `model.decoder.layers.N`
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
# ResNet blocks (transformers modeling_resnet.py): `resnet.encoder.stages.S.layers.B`, keyed "S.B"
_STAGE_BLOCK = re.compile(r"(?:^|\.)stages\.(\d+)\.layers\.(\d+)(?:\.|$)")
MODEL_LABEL = "(model top level, e.g. the loss)"


def _replay(tracker):
    """(totals after each event, first index of the peak, per-event phase). The peak is found as
    MemoryTracker.classify finds it: the first event with the largest total inside forward/backward/optimizer."""
    allocs, phases = tracker.allocs, tracker._event_phases()
    totals, total, peak, peak_i = [], 0, -1, None
    for i, ((uid, sign), phase) in enumerate(zip(tracker.events, phases, strict=True)):
        total += allocs[uid].nbytes * sign
        totals.append(total)
        if phase in PEAK_PHASES and total > peak:
            peak, peak_i = total, i
    return totals, peak_i, phases


def _selected(totals: list[int], phases: list[str], start: int, peak_i: int | None, n_points: int) -> list[int]:
    """Event indices to keep: the highest event of each of `n_points` buckets, the peak, each phase's first
    and last event."""
    n = len(totals) - start
    keep = set()
    if n > 0:
        width = max(1, -(-n // n_points))
        for b in range(start, len(totals), width):
            end = min(b + width, len(totals))
            keep.add(max(range(b, end), key=totals.__getitem__))
        for i in range(start, len(totals)):
            if i == start or phases[i] != phases[i - 1]:
                keep.update((i, i - 1) if i > start else (i,))
        keep.add(len(totals) - 1)
    if peak_i is not None:
        keep.add(peak_i)
    return sorted(k for k in keep if k >= start)


def timeline(tracker, n_points: int = TIMELINE_POINTS) -> dict:
    """Live bytes by category through the tracked step, downsampled. x is the event number in the step
    (0: before its first allocation, registered weights/adapters/optimizer state live)."""
    totals, peak_i, phases = _replay(tracker)
    roles, allocs = tracker.roles, tracker.allocs
    start = next((i for i, p in enumerate(phases) if p != "setup"), len(phases))
    keep = _selected(totals, phases, start, peak_i, n_points)
    current = dict.fromkeys(CATEGORIES, 0)
    series = {c: [] for c in CATEGORIES}
    xs, want = [0], set(keep)
    for uid, sign in tracker.events[:start]:
        current[roles[uid]] += allocs[uid].nbytes * sign
    for c in CATEGORIES:
        series[c].append(current[c])
    for i in range(start, (keep[-1] + 1) if keep else start):
        uid, sign = tracker.events[i]
        current[roles[uid]] += allocs[uid].nbytes * sign
        if i in want:
            xs.append(i - start + 1)
            for c in CATEGORIES:
                series[c].append(current[c])
    spans = []
    for i in range(start, len(phases)):
        if phases[i] in STEP_PHASES and (i == start or phases[i] != phases[i - 1]):
            spans.append({"phase": phases[i], "start": i - start + 1, "end": i - start + 1})
        if spans and phases[i] == spans[-1]["phase"]:
            spans[-1]["end"] = i - start + 1
    peak = {"x": None if peak_i is None else peak_i - start + 1, "bytes": 0 if peak_i is None else totals[peak_i],
            "phase": None if peak_i is None else phases[peak_i]}
    return {"n_events": len(phases) - start, "x": xs, "phases": spans, "peak": peak,
            "bytes": {c: v for c, v in series.items() if any(v)}}


def _dtype(d) -> str | None:
    return None if d is None else str(d).removeprefix("torch.")


def module_label(where: str | None, category: str) -> str:
    if where == "":
        return MODEL_LABEL
    if where is None:
        return "(optimizer state)" if category == "optimizer" else "(not inside a module)"
    return where


def layer_of(where: str | None) -> str | None:
    """The decoder layer ("3") or ResNet stage and block ("1.0") a module path lies in (None: neither)."""
    m = _STAGE_BLOCK.search(where or "")
    if m is not None:
        return f"{m[1]}.{m[2]}"
    m = _LAYER.search(where or "")
    return None if m is None else m[1]


def at_peak(tracker, n_top: int = N_TOP, n_groups: int = N_GROUPS) -> dict:
    """What is live at the peak: the largest tensors (shape, dtype, bytes, category, module), and the live
    bytes grouped by module and by decoder layer."""
    totals, peak_i, _ = _replay(tracker)
    if peak_i is None:
        return {"live_bytes": 0, "n_live": 0, "top_tensors": [], "by_module": [], "by_layer": []}
    live: set[int] = set()
    for uid, sign in tracker.events[:peak_i + 1]:
        (live.add if sign > 0 else live.discard)(uid)
    allocs, roles = tracker.allocs, tracker.roles
    rows = []
    modules: dict[str, dict] = {}
    layers: dict[str, dict] = {}
    for uid in live:
        a, cat = allocs[uid], roles[uid]
        label = module_label(a.where, cat)
        rows.append((a.nbytes, uid, a, cat, label))
        g = modules.setdefault(label, {"module": label, "bytes": 0, "n_tensors": 0, "by_category": {}})
        layer = layer_of(a.where)
        h = layers.setdefault(layer or "", {"layer": layer, "bytes": 0, "n_tensors": 0, "by_category": {}})
        for grp in (g, h):
            grp["bytes"] += a.nbytes
            grp["n_tensors"] += 1
            grp["by_category"][cat] = grp["by_category"].get(cat, 0) + a.nbytes
    rows.sort(key=lambda r: (-r[0], r[1]))
    top = [{"bytes": n, "category": cat, "shape": None if a.shape is None else list(a.shape),
            "dtype": _dtype(a.dtype), "module": label, "layer": layer_of(a.where), "allocated_in": a.phase}
           for n, _, a, cat, label in rows[:n_top]]
    by_module = sorted(modules.values(), key=lambda g: (-g["bytes"], g["module"]))[:n_groups]
    by_layer = sorted(layers.values(), key=lambda g: (g["layer"] is None,
                                                            [int(x) for x in (g["layer"] or "0").split(".")]))[:MAX_LAYERS]
    return {"live_bytes": totals[peak_i], "n_live": len(live), "top_tensors": top, "by_module": by_module,
            "by_layer": by_layer}


def explain(tracker) -> dict:
    """The `timeline` and `at_peak` fields of a measurement or a trace (after tracker.classify)."""
    return {"timeline": timeline(tracker), "at_peak": at_peak(tracker)}


# --- reading them back (the report): the shape it relies on, as one-line problems ---

def _ints(value, n: int | None = None) -> bool:
    return isinstance(value, list) and (n is None or len(value) == n) and all(
        bytes_problem(v) is None for v in value)


def timeline_problem(tl) -> str | None:
    """Why `tl` is not a timeline the report can draw (None when it is one)."""
    if not isinstance(tl, dict):
        return f"{show(tl)} is not an object"
    xs = tl.get("x")
    if not _ints(xs) or not xs:
        return "x: not a non-empty list of event numbers"
    series = tl.get("bytes")
    if not isinstance(series, dict) or any(c not in CATEGORIES for c in series):
        return f"bytes: not an object of byte lists per category ({', '.join(CATEGORIES)})"
    for c, v in series.items():
        if not _ints(v, len(xs)):
            return f"bytes.{c}: not a list of {len(xs)} byte counts"
    peak = tl.get("peak")
    if not isinstance(peak, dict) or bytes_problem(peak.get("bytes")) or (
            peak.get("x") is not None and bytes_problem(peak["x"])):
        return "peak: not an object with x and bytes"
    spans = tl.get("phases")
    if not isinstance(spans, list) or not all(
            isinstance(p, dict) and isinstance(p.get("phase"), str) and bytes_problem(p.get("start")) is None
            and bytes_problem(p.get("end")) is None for p in spans):
        return "phases: not a list of {phase, start, end}"
    return None


def at_peak_problem(ap) -> str | None:
    if not isinstance(ap, dict):
        return f"{show(ap)} is not an object"
    for key, name_key in (("top_tensors", "module"), ("by_module", "module"), ("by_layer", "layer")):
        rows = ap.get(key)
        if not isinstance(rows, list):
            return f"{key}: not a list"
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict) or bytes_problem(row.get("bytes")) is not None:
                return f"{key}[{i}]: not an object with a byte count"
            if row.get(name_key) is not None and not isinstance(row[name_key], str):
                return f"{key}[{i}].{name_key}: {show(row[name_key])} is not a string"
    return None
