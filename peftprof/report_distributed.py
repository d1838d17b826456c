"""The report's part for data-parallel runs ([distributed]): memory per rank, host memory, and "how many GPUs do
I need" (the per-rank peak against the world size, one line per strategy, beside the catalogue GPUs' memory).

Fields read (the contract with run/distributed.py and estimate/, /tmp/coord/H_contract.md), all optional:
`scenario.distributed` {"world_size", "strategy", "cpu_offload"} (settings.Scenario.to_dict); `measured.ranks`,
a list of {"rank", "peak_bytes", "breakdown", "rss_peak_bytes", "host_bytes"} (run/distributed.py assemble; the
record's `measured.peak_bytes` is the largest rank's); `estimate.distributed` {"strategy", "world_size",
"host_bytes"} (estimate/__init__.py distributed_breakdown, the estimate being rank 0's: the rank that holds the
largest shard of every tensor) and `estimate.host_bytes`. report.py checks their types (`field_problems` here)
and assembles the page; user strings are escaped as report.py describes.
"""

from __future__ import annotations

import json
import math

from .results import CATEGORIES, bytes_problem, show
from .textfmt import md_cell

MEASURED_FIELDS = ("peak_bytes", "rss_peak_bytes", "host_bytes", "nvml_peak_bytes", "reserved_peak_bytes")
DIST_AXES = ("distributed.world_size", "distributed.strategy", "distributed.cpu_offload")


def _pl(text) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def settings(r: dict) -> dict:
    """(world_size, strategy, cpu_offload) of a record: its resolved settings, else its estimate's detail."""
    d = (r.get("scenario") or {}).get("distributed") or {}
    e = r["estimate"].get("distributed") or {}
    return {"world_size": d.get("world_size") or e.get("world_size") or 1,
            "strategy": d.get("strategy") or e.get("strategy") or "ddp",
            "cpu_offload": bool(d.get("cpu_offload", e.get("cpu_offload", False)))}


def ranks(r: dict) -> list[dict]:
    m = r.get("measured")
    return [x for x in (m.get("ranks") or []) if isinstance(x, dict)] if isinstance(m, dict) else []


def is_distributed(r: dict) -> bool:
    return settings(r)["world_size"] > 1 or bool(ranks(r)) or bool(r["estimate"].get("distributed"))


def host_bytes(r: dict) -> int | None:
    """Bytes per rank the estimate keeps on the host (CPU offload; paged state is reported apart)."""
    e = r["estimate"]
    v = (e.get("distributed") or {}).get("host_bytes")
    return e.get("host_bytes") if v is None else v


def need_bytes(r: dict) -> int | None:
    """What one rank needs on its device: the largest measured rank of a run that finished (status "ok"), the
    estimate (device bytes on CUDA) for a record that was not run (no status); None for a run that failed
    (out of memory, error): it does not show that the variant fits, whatever the estimate says."""
    status = r.get("status")
    m = r.get("measured")
    if status is not None and status != "ok":
        return None
    if isinstance(m, dict) and m.get("peak_bytes"):
        return m["peak_bytes"]
    e = r["estimate"]
    return e.get("device_bytes") or e["peak_bytes"]


def _failed(r: dict) -> str:
    return "out of memory" if r.get("status") == "oom" else str(r.get("status"))


def field_problems(rec: dict, prefix: str) -> list[str]:
    """Wrong types in the distributed fields of one record (one line each, naming the field)."""
    out = []
    m = rec.get("measured")
    rs = m.get("ranks") if isinstance(m, dict) else None
    if rs is not None and not isinstance(rs, list):
        out.append(f"{prefix}: measured.ranks: {show(rs)} is not a list of per-rank objects")
    for i, x in enumerate(rs if isinstance(rs, list) else [], 1):
        if not isinstance(x, dict) or isinstance(x.get("rank"), bool) or not isinstance(x.get("rank"), int):
            out.append(f"{prefix}: measured.ranks[{i}]: {show(x)} is not an object with a whole-number \"rank\"")
            continue
        for k in MEASURED_FIELDS:
            if x.get(k) is not None and (why := bytes_problem(x[k])):
                out.append(f"{prefix}: measured.ranks[{i}].{k}: {why}")
        bd = x.get("breakdown")
        if bd is not None and not isinstance(bd, dict):
            out.append(f"{prefix}: measured.ranks[{i}].breakdown: {show(bd)} is not an object of byte counts")
        for c in CATEGORIES if isinstance(bd, dict) else ():
            if bd.get(c) is not None and (why := bytes_problem(bd[c])):
                out.append(f"{prefix}: measured.ranks[{i}].breakdown.{c}: {why}")
    for part, obj in (("scenario.distributed", (rec.get("scenario") or {}).get("distributed")),
                      ("estimate.distributed", rec["estimate"].get("distributed"))):
        if obj is None:
            continue
        if not isinstance(obj, dict):
            out.append(f"{prefix}: {part}: {show(obj)} is not an object")
            continue
        ws = obj.get("world_size")
        if ws is not None and (isinstance(ws, bool) or not isinstance(ws, int) or not 1 <= ws <= 1 << 20):
            out.append(f"{prefix}: {part}.world_size: {show(ws)} is not a whole number of ranks from 1")
        if obj.get("strategy") is not None and not isinstance(obj["strategy"], str):
            out.append(f"{prefix}: {part}.strategy: {show(obj['strategy'])} is not a string")
        if part == "estimate.distributed" and obj.get("host_bytes") is not None and (
                why := bytes_problem(obj["host_bytes"])):
            out.append(f"{prefix}: {part}.host_bytes: {why}")
    if rec["estimate"].get("host_bytes") is not None and (why := bytes_problem(rec["estimate"]["host_bytes"])):
        out.append(f"{prefix}: estimate.host_bytes: {why}")
    return out


def _biggest(bd: dict) -> str | None:
    items = [(c, bd.get(c) or 0) for c in CATEGORIES]
    c, n = max(items, key=lambda kv: kv[1])
    return c if n else None


def rank_rows(records, unit: str, scale: int) -> list[dict]:
    """One row per rank of each distributed record (measured), or one row of the estimate (rank 0) when it was
    not measured. The estimate is rank 0's, so it is compared with rank 0's measurement."""
    out = []
    for i, r in enumerate(records):
        if not is_distributed(r):
            continue
        st, est, host = settings(r), r["estimate"]["peak_bytes"], host_bytes(r)
        base = {"#": i + 1, "variant": r["variant"], "strategy": st["strategy"] + (" + offload" if st["cpu_offload"]
                                                                                    else ""),
                "world size": st["world_size"]}
        fmt = lambda n: None if n is None else f"{n / scale:,.3f}"  # noqa: E731
        rs = sorted(ranks(r), key=lambda x: x["rank"])
        if not rs:
            out.append({**base, "rank": "0 (estimate)", f"measured peak ({unit})": None,
                        f"estimated peak ({unit})": fmt(est), "error (%)": None,
                        "biggest category": _biggest(r["estimate"]["breakdown"]),
                        f"host, estimated ({unit})": fmt(host), f"process RSS ({unit})": None})
            continue
        for x in rs:
            peak = x.get("peak_bytes")
            first = x["rank"] == 0
            out.append({**base, "rank": x["rank"], f"measured peak ({unit})": fmt(peak),
                        f"estimated peak ({unit})": fmt(est) if first else None,
                        "error (%)": f"{(est - peak) / peak * 100:+.2f}" if first and peak else None,
                        "biggest category": _biggest(x.get("breakdown") or {}),
                        f"host, estimated ({unit})": fmt(host) if first else None,
                        f"process RSS ({unit})": fmt(x.get("host_bytes") or x.get("rss_peak_bytes"))})
    return out


def _group_label(r: dict, multi_scenario: bool) -> str:
    """The line a record belongs to. The strategy and offload are the sweep's values where swept: at world size 1
    the loader drops them as not applicable, yet that point starts each strategy's line."""
    st = settings(r)
    ov = (r.get("scenario") or {}).get("overrides") or {}
    others = ", ".join(f"{k}={json.dumps(v)}" for k, v in ov.items() if k not in DIST_AXES)
    strategy = ov.get("distributed.strategy", st["strategy"])
    label = str(strategy) + (" + CPU offload" if ov.get("distributed.cpu_offload", st["cpu_offload"]) else "")
    if others:
        label += f" ({others})"
    if multi_scenario:
        label = f"{(r.get('scenario') or {}).get('scenario') or ''}: {label}"
    return label


def gpu_groups(records) -> dict[str, list[dict]]:
    """Records of the scenarios that run distributed, by line of the plot: scenario, strategy, offload and the
    other sweep axes (so a line varies the world size alone)."""
    names = {(r.get("scenario") or {}).get("scenario") for r in records if is_distributed(r)}
    chosen = [r for r in records if (r.get("scenario") or {}).get("scenario") in names]
    multi = len(names) > 1
    groups: dict[str, list[dict]] = {}
    for r in chosen:
        groups.setdefault(_group_label(r, multi), []).append(r)
    return {k: sorted(v, key=lambda r: settings(r)["world_size"]) for k, v in groups.items()}


def memory_sizes() -> list[tuple[int, list[str]]]:
    """The catalogue's GPU memory sizes, smallest first, with the GPUs of each."""
    from .catalog import gpus

    sizes: dict[int, list[str]] = {}
    for g in gpus().values():
        sizes.setdefault(g.memory_bytes, []).append(g.name)
    return sorted(sizes.items())


def fewest_gpus(records) -> list[dict]:
    """For each line of the plot and each GPU memory size: the smallest world size in the records whose per-rank
    need fits that memory (measured where measured; a failed run fits nowhere, and the cell names the world
    sizes below the answer whose run failed: "4 (2: out of memory)")."""
    rows = []
    sizes = memory_sizes()
    for label, rs in gpu_groups(records).items():
        row = {"strategy": label}
        for mem, names in sizes:
            fit = [settings(r)["world_size"] for r in rs if (n := need_bytes(r)) is not None and n <= mem]
            answer = min(fit) if fit else None
            failed = [f"{settings(r)['world_size']}: {_failed(r)}" for r in rs if need_bytes(r) is None
                      and (answer is None or settings(r)["world_size"] < answer)]
            row[f"{mem / (1 << 30):g} GiB ({', '.join(names)})"] = (
                (str(answer) if answer is not None else f"more than {max(settings(r)['world_size'] for r in rs)}")
                + (f" ({', '.join(failed)})" if failed else ""))
        rows.append(row)
    return rows


PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d", "#ff9da6")


def fig_gpus(records, unit: str, scale: int):
    """Per-rank peak against the world size, one line per strategy (estimate dashed, measurement solid), and
    the catalogue's GPU memory sizes as horizontal lines."""
    import plotly.graph_objects as go

    fig = go.Figure()
    top, sizes = 0, set()
    for n, (label, rs) in enumerate(gpu_groups(records).items()):
        color = PALETTE[n % len(PALETTE)]
        xs = [settings(r)["world_size"] for r in rs]
        sizes.update(xs)
        est = [r["estimate"].get("device_bytes") or r["estimate"]["peak_bytes"] for r in rs]
        hover = [_pl(r["variant"]) for r in rs]
        fig.add_scatter(x=xs, y=[b / scale for b in est], mode="lines+markers", name=_pl(f"{label} (estimated)"),
                        line={"color": color, "dash": "dash"}, text=hover,
                        hovertemplate=f"%{{text}}<br>%{{x}} ranks: %{{y:,.3f}} {unit} per rank<extra></extra>")
        meas = [(x, r["measured"]["peak_bytes"]) for x, r in zip(xs, rs, strict=True)
                if r.get("status") == "ok" and isinstance(r.get("measured"), dict) and r["measured"].get("peak_bytes")]
        if meas:
            fig.add_scatter(x=[x for x, _ in meas], y=[b / scale for _, b in meas], mode="lines+markers",
                            name=_pl(f"{label} (measured, largest rank)"), line={"color": color},
                            marker={"symbol": "diamond", "size": 10})
        top = max([top, *est, *(b for _, b in meas)])
    shown = [(mem, names) for mem, names in memory_sizes() if mem <= 2 * top]  # lines far above would flatten it
    if not shown:
        smallest = memory_sizes()[0]
        fig.add_annotation(text=_pl(f"every catalogue GPU holds each rank (the smallest, {', '.join(smallest[1])}, "
                                    f"has {smallest[0] / (1 << 30):g} GiB)"), showarrow=False, xref="paper",
                           yref="paper", x=0.5, y=1.04)
    for mem, names in shown:
        fig.add_hline(y=mem / scale, line_dash="dot", line_color="#888",
                      annotation_text=_pl(f"{mem / (1 << 30):g} GiB: {', '.join(names)}"),
                      annotation_position="top left")
    lo, hi = min(sizes), max(sizes)  # log axis, ticks at the world sizes in the results
    return fig.update_layout(title="How many GPUs: memory per rank against the number of ranks",
                             xaxis_title="world size (GPUs)", yaxis_title=f"per rank ({unit})", height=480,
                             xaxis={"type": "log", "tickmode": "array", "tickvals": sorted(sizes),
                                    "range": [math.log10(lo / 1.5), math.log10(hi * 1.5)]})


def section_html(records, unit: str, scale: int, table_html, figure_html) -> str:
    """The HTML section, or "" when no record is distributed. `table_html(rows, id)` and `figure_html(fig, id)`
    are report.py's."""
    if not any(is_distributed(r) for r in records):
        return ""
    hosts = [host_bytes(r) or 0 for r in records if is_distributed(r)]
    note = ("" if not any(hosts) else f" With CPU offload, up to {max(hosts) / scale:,.3f} {unit} per rank stay "
            "in host memory, not in the peak.")
    return ("<h2>Per rank, and how many GPUs</h2><p class='hint'>Data-parallel variants: each rank's peak (measured "
            "by <code>peftprof run</code> on every rank; the estimate is rank 0's, the rank holding the largest "
            f"shard). Fewest GPUs: the smallest world size in these results whose per-rank need fits: the "
            "largest measured rank's peak, else the estimate's device memory (the plot's solid and dashed lines); a "
            "run that failed (out of memory, error) counts as not fitting, whatever its estimate, and is named."
            f"{note}</p>"
            + table_html(fewest_gpus(records), "fewest-gpus") + figure_html(fig_gpus(records, unit, scale), "gpus")
            + "<h3>Memory per rank</h3>" + table_html(rank_rows(records, unit, scale), "ranks"))


def markdown_lines(records, unit: str, scale: int) -> list[str]:
    """The per-rank table for the markdown report ([] when no record is distributed)."""
    rows = rank_rows(records, unit, scale)
    if not rows:
        return []
    keys = [k for k in rows[0] if k != "#"]
    lines = ["", "| " + " | ".join(keys) + " |", "|---|---|" + "---:|" * (len(keys) - 2)]
    lines += ["| " + " | ".join(md_cell("-" if row[k] is None else row[k]) for k in keys) + " |" for row in rows]
    return lines + ["", f"(memory per rank, {unit})"]


def csv_columns(r: dict) -> dict:
    """Columns the CSV report adds when some record is distributed: settings, host bytes, each rank's peak."""
    st = settings(r)
    rs = sorted(ranks(r), key=lambda x: x["rank"])
    return {"strategy": st["strategy"], "world_size": st["world_size"], "cpu_offload": st["cpu_offload"],
            "est_host_bytes": host_bytes(r),
            "meas_rank_peak_bytes": " ".join(str(x.get("peak_bytes")) for x in rs) or None}
