"""Reporter: one self-contained interactive HTML file (plotly.js inlined once), markdown, or CSV.

Inputs are runner results and/or `estimate --format json` output (peftprof.results). Lines that are not
results are skipped and named on stderr (the input files are never modified); a result whose fields have
the wrong types is bad input (exit 2, every problem named). Every user string is escaped for where it
goes: HTML text through html.escape; strings in figures through `_pl` (plotly renders a subset of HTML in
labels, hover text and titles, so `<a href=...>` would be a live link) and then plotly's JSON encoder
(which writes `<` as \\u003c, so nothing in a name can close the script element); markdown cells through
textfmt.md_cell; CSV cells through textfmt.csv_cell (no spreadsheet formulas).
"""

from __future__ import annotations

import html
import json
import os
import sys
from pathlib import Path

from . import report_distributed as dist
from . import report_inference as serving
from .errors import UserError
from .report_explain import EXPLAIN_JS, advice_html, biggest_category, explain_html, peak_of, unit_of, verdict_html
from .results import (
    CATEGORIES,
    Located,
    bytes_problem,
    duplicate_problems,
    index_problem,
    measured_error,
    merge_order,
    result_files,
    scan_results_file,
    show,
    write_atomic,
)
from .textfmt import csv_cell, md_cell, visible
from .timeline import at_peak_problem, timeline_problem

COLORS = dict(zip(CATEGORIES, ("#4c78a8", "#9ecae9", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b",
                               "#b279a2", "#9d755d"), strict=True))
GPU_LINES_GB = (16, 24, 40, 48, 80)
GIB = 1 << 30
PHASES = ("built", "wrapped", "forward", "backward", "optimizer", "steady")


def _gib(n) -> float | None:
    return None if n is None else n / GIB


def _pl(text) -> str:
    """A string for a plotly label, hover text or title: its pseudo-HTML (<a href>, <b>, <br>, &entities;)
    shown as text. Plotly decodes &amp; &lt; &gt; back to the characters."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _measured(r: dict) -> dict | None:
    m = r.get("measured")
    return m if isinstance(m, dict) and m.get("peak_bytes") else None


def error_pct(r: dict) -> float | None:
    err = measured_error(r)
    return None if err is None else err * 100


def fitting_gpus(r: dict) -> list[str]:
    """Catalogue GPUs whose memory holds the measured peak (or the estimate when not measured)."""
    from .catalog import gpus

    est = r["estimate"]
    need = (_measured(r) or {}).get("peak_bytes") or est.get("device_bytes") or est["peak_bytes"]
    return [g.name for g in sorted(gpus().values(), key=lambda g: g.memory_bytes) if g.memory_bytes >= need]


def _fits_label(names: list[str]) -> str:
    if not names:
        return "none"
    return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"


def summary_rows(records: list[dict]) -> list[dict]:
    rows = []
    for i, r in enumerate(records):
        m = _measured(r) or {}
        err = error_pct(r)
        status = r.get("status") or "estimate"
        if r.get("error"):
            status += f" ({r['error'].get('phase')})"
        est = r["estimate"]
        rows.append({
            "#": i + 1, "variant": r["variant"], "status": status,
            "estimated_peak_bytes": est["peak_bytes"],
            "measured_peak_bytes": None if not m else m["peak_bytes"],
            "error_pct": None if err is None else round(err, 2),
            "measured_tokens_per_s": None if not m.get("tokens_per_s") else round(m["tokens_per_s"], 1),
            "predicted_tokens_per_s": None if est.get("predicted_tokens_per_s") is None
            else round(est["predicted_tokens_per_s"], 1),
            "trainable_params": est.get("n_trainable_params"),
            "fits": _fits_label(fitting_gpus(r)),
        })
    return rows


MAX_FULL_LABELS = 12  # more variants than this are labelled #1, #2, ... (the summary's # column); hover names them


def _labels(records) -> list[str]:
    if len(records) <= MAX_FULL_LABELS:
        return [_pl(r["variant"]) for r in records]
    return [f"#{i + 1}" for i in range(len(records))]


def _fig_breakdown(records):
    import plotly.graph_objects as go

    fig = go.Figure()
    names = _labels(records)
    hover = [_pl(r["variant"]) for r in records]
    for cat in CATEGORIES:
        fig.add_bar(name=f"{cat} (estimated)", x=names, y=[_gib(r["estimate"]["breakdown"].get(cat)) for r in records],
                    marker_color=COLORS[cat], offsetgroup="estimate", legendgroup=cat, hovertext=hover)
        if any(_measured(r) and _measured(r).get("breakdown") for r in records):
            fig.add_bar(name=f"{cat} (measured)", x=names,
                        y=[_gib(((_measured(r) or {}).get("breakdown") or {}).get(cat)) for r in records],
                        marker_color=COLORS[cat], marker_pattern_shape="/", offsetgroup="measured", legendgroup=cat,
                        hovertext=hover)
    top = max(max(r["estimate"]["peak_bytes"], (_measured(r) or {}).get("peak_bytes") or 0) for r in records) / GIB
    for gb in [g for g in GPU_LINES_GB if g * 1e9 / GIB <= 2 * top]:  # lines far above the bars would flatten them
        fig.add_hline(y=gb * 1e9 / GIB, line_dash="dot", line_color="#888", annotation_text=f"{gb} GB",
                      annotation_position="top left")
    fig.update_layout(barmode="relative", yaxis_title="GiB", height=520, title="Peak memory by category: "
                      "estimate (solid) and measurement (hatched)")
    return fig


def _fig_scatter(records):
    import plotly.graph_objects as go

    pts = [(r["estimate"]["peak_bytes"] / GIB, _measured(r)["peak_bytes"] / GIB, _pl(r["variant"]))
           for r in records if _measured(r)]
    fig = go.Figure()
    if not pts:
        fig.add_annotation(text="not measured", showarrow=False, font_size=20)
        return fig.update_layout(height=300, title="Estimate against measurement")
    hi = max(max(p[0], p[1]) for p in pts) * 1.1
    fig.add_scatter(x=[0, hi, hi, 0], y=[0, hi * 1.05, hi * 0.95, 0], fill="toself", mode="none",
                    fillcolor="rgba(84,162,75,0.15)", name="±5%")
    fig.add_scatter(x=[0, hi], y=[0, hi], mode="lines", line_color="#54a24b", name="y = x")
    fig.add_scatter(x=[p[1] for p in pts], y=[p[0] for p in pts], mode="markers", text=[p[2] for p in pts],
                    hovertemplate="%{text}<br>measured %{x:.3f} GiB<br>estimated %{y:.3f} GiB<extra></extra>",
                    name="variants", marker_size=9)
    return fig.update_layout(xaxis_title="measured peak GiB", yaxis_title="estimated peak GiB", height=480,
                             title="Estimate against measurement")


def _overrides(r: dict) -> dict:
    return (r.get("scenario") or {}).get("overrides") or {}


def _axes(records) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        for k in _overrides(r):
            keys[k] = None
    return list(keys)


def _fig_sweeps(records):
    from plotly.subplots import make_subplots

    figs = []
    axes = _axes(records)
    for axis in axes:
        others = [a for a in axes if a != axis]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("peak memory (GiB)", "tokens/s"))
        groups: dict[str, list] = {}
        for r in records:
            ov = _overrides(r)
            label = ", ".join(f"{a}={json.dumps(ov.get(a))}" for a in others) or "all"
            groups.setdefault(_pl(f"{(r.get('scenario') or {}).get('scenario') or ''} {label}"), []).append(r)
        palette = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d", "#ff9da6")
        for n, (label, rs) in enumerate(groups.items()):
            color = palette[n % len(palette)]
            xs = [_pl(json.dumps(_overrides(r).get(axis))) for r in rs]
            mem = [_gib((_measured(r) or {}).get("peak_bytes") or r["estimate"]["peak_bytes"]) for r in rs]
            tps = [(_measured(r) or {}).get("tokens_per_s") or r["estimate"].get("predicted_tokens_per_s") for r in rs]
            fig.add_scatter(x=xs, y=mem, mode="lines+markers", name=label, legendgroup=label, line_color=color,
                            row=1, col=1)
            fig.add_scatter(x=xs, y=tps, mode="lines+markers", name=label, legendgroup=label, showlegend=False,
                            line_color=color, row=1, col=2)
        fig.update_layout(title=_pl(f"Along {axis} (measured where available, else estimated)"), height=420)
        figs.append((axis, fig))
    return figs


def _fig_timeline(records):
    import plotly.graph_objects as go

    fig = go.Figure()
    measured = [r for r in records if _measured(r) and _measured(r).get("phases")]
    for r in measured:
        ph = {p["phase"]: p.get("bytes") for p in _measured(r)["phases"]}
        fig.add_scatter(x=list(PHASES), y=[_gib(ph.get(p)) for p in PHASES], mode="lines+markers",
                        name=_pl(r["variant"]))
    if not measured:
        fig.add_annotation(text="not measured", showarrow=False, font_size=20)
    return fig.update_layout(title="Memory per phase", yaxis_title="GiB", height=420)


def _figure_html(fig, div_id: str) -> str:
    """A plot container and its spec. Plots are drawn when they come near the viewport, and all of them
    right after the load event, so the page is usable as soon as the first screen is drawn."""
    import plotly.io as pio

    spec = pio.to_json(fig, validate=False)  # plotly escapes "<" as \u003c
    return f'<div id="{div_id}" class="plot"></div><script>FIGS["{div_id}"]={spec};</script>'


WRAPPED = ("variant", "note", "fits on")  # columns that may wrap (long names), so the page needs no side scrolling


def _table_html(rows: list[dict], table_id: str) -> str:
    if not rows:
        return "<p>No rows.</p>"
    head = "".join(f"<th onclick=\"sortTable('{table_id}',{i})\">{html.escape(k)}</th>" for i, k in enumerate(rows[0]))
    wrap = [" class='wrap'" if k in WRAPPED else "" for k in rows[0]]
    body = "".join("<tr>" + "".join(f"<td{w}>{'' if v is None else html.escape(str(v))}</td>"
                                    for w, v in zip(wrap, row.values(), strict=True)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _num(v, spec: str) -> str | None:
    """A number for a table cell: `spec` formatting (e.g. ',.1f', '.3g'); None stays empty."""
    return None if v is None else format(v, spec)


def display_rows(records, unit: str, scale: int) -> list[dict]:
    """The HTML summary: sweep axes as their own columns, units in the headers, formatted numbers."""
    axes = _axes(records)
    out = []
    for r, row in zip(records, summary_rows(records), strict=True):
        m = _measured(r) or {}
        cat, _ = biggest_category(peak_of(r)[2])
        d = {"#": row["#"], "variant": row["variant"]}
        d.update({a: json.dumps(_overrides(r).get(a)) if a in _overrides(r) else None for a in axes})
        d.update({"status": row["status"], f"estimated peak ({unit})": f"{r['estimate']['peak_bytes'] / scale:,.3f}",
                  f"measured peak ({unit})": None if not m else f"{m['peak_bytes'] / scale:,.3f}",
                  "error (%)": _num(row["error_pct"], "+.2f"), "biggest category": cat,
                  "measured tokens/s": _num(row["measured_tokens_per_s"], ",.0f"),
                  "predicted tokens/s": _num(row["predicted_tokens_per_s"], ",.0f"),
                  "trainable params": _num(row["trainable_params"], ","), "fits on": row["fits"]})
        out.append(d)
    return out


def check_rows(records) -> list[dict]:
    out = []
    for r in records:
        c = r.get("checks") or {}
        if not c and not _measured(r):
            c = {"note": "not measured"}
        merge = c.get("merge_max_abs_diff", c.get("note"))
        out.append({"variant": r["variant"], "B=0 identity max |diff|": _num(c.get("identity_max_abs_diff"), ".3g"),
                    "merged vs unmerged max |diff|": merge if isinstance(merge, str) else _num(merge, ".3g"),
                    "unmerged forward (ms)": _num(c.get("unmerged_latency_ms"), ",.2f"),
                    "merged forward (ms)": _num(c.get("merged_latency_ms"), ",.2f"),
                    "quantization rel. error": _num(c.get("quantization_rel_error"), ".3g"),
                    "note": c.get("merge_note")})
    return out


RENDER_JS = """var FIGS={};function drawPlot(el){var f=FIGS[el.id];if(!f||el.dataset.drawn)return;el.dataset.drawn=1;
Plotly.newPlot(el,f.data,f.layout,{responsive:true,displaylogo:false});}
function drawAll(){document.querySelectorAll('.plot').forEach(drawPlot);}
document.addEventListener('DOMContentLoaded',function(){var els=document.querySelectorAll('.plot');
if(!('IntersectionObserver' in window)){drawAll();return;}
var io=new IntersectionObserver(function(es){es.forEach(function(e){
if(e.isIntersecting){drawPlot(e.target);io.unobserve(e.target);}});},{rootMargin:'200px'});
els.forEach(function(el){io.observe(el);});});
window.addEventListener('load',function(){setTimeout(drawAll,0);});"""
SORT_JS = """function sortTable(id,col){var t=document.getElementById(id),b=t.tBodies[0],rows=Array.from(b.rows);
var asc=t.dataset.col==col&&t.dataset.dir!='asc';t.dataset.col=col;t.dataset.dir=asc?'asc':'desc';
rows.sort(function(a,c){var x=a.cells[col].textContent,y=c.cells[col].textContent,
nx=parseFloat(x.replace(/[,+]/g,'')),ny=parseFloat(y.replace(/[,+]/g,''));
var r=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?r:-r;});
rows.forEach(function(r){b.appendChild(r);});}"""
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1.5em;max-width:1320px;color:#222}
table{border-collapse:collapse;font-size:13px}.scroll{max-width:100%;overflow-x:auto}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap}
th{cursor:pointer;background:#f4f4f4;white-space:normal}
td.wrap,th.wrap{white-space:normal;overflow-wrap:anywhere;text-align:left;min-width:10em}
td:first-child{text-align:left}
#advice td{text-align:left;white-space:normal}footer{margin-top:3em;font-size:12px;color:#666}.plot{margin:1em 0}
.verdict{font-size:15px;line-height:1.6}.hint{color:#555;font-size:13px}select{max-width:100%}"""


def plotly_js() -> str:
    """plotly.js basic bundle shipped in peftprof/data/plotly (see its README for why not the full one)."""
    from importlib import resources

    return resources.files("peftprof").joinpath("data", "plotly", "plotly-basic.min.js").read_text(encoding="utf-8")


def render_html(records: list[dict], title: str) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    descriptions = dict.fromkeys((r.get("scenario") or {}).get("description", "") for r in records)
    parts += [f"<p>{html.escape(d)}</p>" for d in descriptions if d]
    unit, scale = unit_of(records)
    parts += ["<h2>Summary</h2>", verdict_html(records, fitting_gpus, unit, scale, error_pct),
              _table_html(display_rows(records, unit, scale), "summary"),
              "<h2>Timeline: memory through the step, and what is live at its peak</h2>",
              explain_html(records, COLORS, unit, scale),
              "<h2>What to change</h2>", advice_html(records, unit, scale),
              "<h2>Memory breakdown</h2>", _figure_html(_fig_breakdown(records), "breakdown"),
              "<h2>Estimate against measurement</h2>", _figure_html(_fig_scatter(records), "scatter")]
    sweeps = _fig_sweeps(records)
    if sweeps:
        parts.append("<h2>Sweeps</h2>")
        parts += [_figure_html(fig, f"sweep{i}") for i, (_, fig) in enumerate(sweeps)]
    parts.append(dist.section_html(records, unit, scale, _table_html, _figure_html))  # "" unless data-parallel
    parts.append(serving.section_html(records, unit, scale, _table_html, _figure_html))  # "" unless serving
    parts += ["<h2>Memory per phase</h2>", _figure_html(_fig_timeline(records), "timeline"),
              "<h2>PEFT checks</h2>", _table_html(check_rows(records), "checks")]
    prov = [dict(r["provenance"], variant=r["variant"]) for r in records if r.get("provenance")]
    footer = "estimates only (not measured)" if not prov else "; ".join(
        f"{k} {v}" for k, v in prov[0].items() if k in ("peftprof", "python", "torch", "transformers", "peft",
                                                        "bitsandbytes", "device", "device_name", "commit", "time"))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style><script>{plotly_js()}</script><script>{SORT_JS}{RENDER_JS}{EXPLAIN_JS}</script></head><body>"
            + "\n".join(parts) + f"<footer>Provenance: {html.escape(footer)}</footer></body></html>")


def render_markdown(records: list[dict]) -> str:
    """Two tables (summary, estimated breakdown) in the HTML report's unit: MiB when every peak is under 1 GiB."""
    unit, scale = unit_of(records)
    rows = summary_rows(records)
    lines = [f"| variant | status | estimated {unit} | measured {unit} | error % | tokens/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["variant"], r["status"], f"{r['estimated_peak_bytes'] / scale:,.2f}",
                 "-" if r["measured_peak_bytes"] is None else f"{r['measured_peak_bytes'] / scale:,.2f}",
                 "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}",
                 "-" if r["measured_tokens_per_s"] is None else f"{r['measured_tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    lines += ["", "| variant | " + " | ".join(CATEGORIES) + " |", "|---|" + "---:|" * len(CATEGORIES)]
    for r in records:
        b = r["estimate"]["breakdown"]
        lines.append(f"| {md_cell(r['variant'])} | "
                     + " | ".join(f"{(b.get(c) or 0) / scale:,.2f}" for c in CATEGORIES) + " |")
    ranks = dist.markdown_lines(records, unit, scale)  # [] unless data-parallel
    ranks += serving.markdown_lines(records, unit, scale)  # [] unless serving
    return "\n".join(lines) + f"\n\n(estimated breakdown, {unit})\n" + "".join(line + "\n" for line in ranks)


def render_csv(records: list[dict]) -> str:
    """One row per variant; memory in exact bytes (`*_bytes` columns), whatever the model's size."""
    import pandas as pd

    rows = []
    for r, s in zip(records, summary_rows(records), strict=True):
        row = dict(s)
        row.update({f"est_{c}_bytes": r["estimate"]["breakdown"].get(c) for c in CATEGORIES})
        m = _measured(r) or {}
        row.update({f"meas_{c}_bytes": (m.get("breakdown") or {}).get(c) for c in CATEGORIES})
        if any(dist.is_distributed(x) for x in records):
            row.update(dist.csv_columns(r))
        rows.append({k: csv_cell(v) for k, v in row.items()})
    return pd.DataFrame(rows, dtype=object).to_csv(index=False)  # object: byte counts stay integers beside blanks


# Fields the report reads besides the schema results.py checks: (dotted path, kind); null or absent is fine.
REPORT_FIELDS = (
    ("status", "string"), ("error", "object"), ("scenario", "object"), ("scenario.scenario", "string"),
    ("scenario.description", "string"), ("scenario.overrides", "object"),
    *((f"estimate.breakdown.{c}", "bytes") for c in CATEGORIES), ("estimate.device_bytes", "bytes"),
    ("estimate.predicted_tokens_per_s", "number"), ("estimate.n_trainable_params", "count"),
    ("measured", "object"), ("measured.peak_bytes", "bytes"), ("measured.tokens_per_s", "number"),
    ("measured.breakdown", "object"), *((f"measured.breakdown.{c}", "bytes") for c in CATEGORIES),
    ("measured.phases", "list"), ("checks", "object"), ("checks.identity_max_abs_diff", "number"),
    ("checks.merge_max_abs_diff", "number"), ("checks.unmerged_latency_ms", "number"),
    ("checks.merged_latency_ms", "number"), ("checks.quantization_rel_error", "number"), ("provenance", "object"),
)
_KINDS = {"string": "a string", "object": "an object", "list": "a list", "number": "a number",
          "count": "a whole number >= 0"}


def _kind_ok(value, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if isinstance(value, bool):
        return False
    if kind == "number":  # NaN is a number here (a diverged check); ints must convert to float
        return isinstance(value, float) or (isinstance(value, int) and abs(value) <= 10**18)
    return isinstance(value, int) and 0 <= value <= 10**18  # count


def field_problems(loc: Located) -> list[str]:
    """Every field of one record the report reads that has the wrong type (file, line, variant, field)."""
    prefix = f"{loc.path}: {loc.where}: variant {visible(loc.record['variant'])}"
    problems, wrong = [], set()
    for path, kind in REPORT_FIELDS:
        parent, _, key = path.rpartition(".")
        if parent in wrong:
            continue
        obj = loc.record
        for part in parent.split(".") if parent else ():
            obj = obj.get(part) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or obj.get(key) is None:
            continue
        value = obj[key]
        why = bytes_problem(value) if kind == "bytes" else None if _kind_ok(value, kind) else (
            f"{show(value)} is not {_KINDS[kind]}")
        if why:
            wrong.add(path)
            problems.append(f"{prefix}: {path}: {why}")
    for i, ph in enumerate(((loc.record.get("measured") or {}).get("phases") or [])
                           if "measured.phases" not in wrong and "measured" not in wrong else [], 1):
        if not isinstance(ph, dict) or not isinstance(ph.get("phase"), str):
            problems.append(f"{prefix}: measured.phases[{i}]: {show(ph)} is not an object with a \"phase\" string")
        elif ph.get("bytes") is not None and (why := bytes_problem(ph["bytes"])):
            problems.append(f"{prefix}: measured.phases[{i}].bytes: {why}")
    if "measured" not in wrong and "scenario" not in wrong:
        problems += dist.field_problems(loc.record, prefix)  # per-rank memory, host bytes
    for part in ("measured", "estimate"):  # the timeline and the peak's tensors (peftprof/timeline.py)
        obj = loc.record.get(part)
        if part in wrong or not isinstance(obj, dict):
            continue
        for key, check in (("timeline", timeline_problem), ("at_peak", at_peak_problem)):
            if obj.get(key) is not None and (why := check(obj[key])):
                problems.append(f"{prefix}: {part}.{key}: {why}")
    return problems


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_records(inputs, warn=_warn) -> list[dict]:
    """Records to report. Lines (or items) that are not results are skipped and each named through `warn`;
    the files are not modified (`peftprof run` sets such lines aside when it resumes). Unreadable files,
    records whose fields have the wrong types and a variant found twice among the runner results (or among the
    estimates): UserError naming every problem. A runner record and an estimate of one variant are both kept.
    A malformed `variant_index` is warned about and read as absent.
    Several inputs (the directories of a sharded sweep) merge into one run's order (results.merge_order)."""
    located: list[Located] = []
    problems: list[str] = []
    try:
        files = result_files(inputs)
    except UserError as e:
        raise UserError(e.problems) from None
    for f in files:
        try:
            good, bad = scan_results_file(f)
        except UserError as e:
            problems += e.problems
            continue
        if not good and not bad:
            warn(f"{f}: empty results file; skipped")
        for b in bad:
            warn(f"{f}: {b.where}: {b.reason}; skipped (the file is left as it is)")
        for loc in good:
            problems += field_problems(loc)
            if why := index_problem(loc.record):
                warn(f"{f}: {loc.where}: variant {visible(loc.record['variant'])}: {why}")
            located.append(loc)
    # runner results and estimate JSON of one variant are reported side by side; two of one kind are an error
    runs = [loc for loc in located if "status" in loc.record]
    problems += duplicate_problems(runs, "the inputs") + duplicate_problems(
        [loc for loc in located if "status" not in loc.record], "the inputs")
    if problems:
        raise UserError(problems)
    records = [loc.record for loc in merge_order(located, all(Path(p).is_dir() for p in inputs))]
    if not records:
        raise UserError(f"{', '.join(map(str, inputs))}: no results to report")
    return records


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_output(out: Path, inputs) -> None:
    """The report's path must be a file name that is none of the inputs."""
    if out.is_dir():
        raise UserError(f"{out}: is a directory; give the report a file name, e.g. -o {out / 'report.html'}")
    try:
        files = result_files(inputs)
    except UserError:
        return  # load_records says what is wrong with the inputs
    for f in files:
        if _same_file(out, f):
            raise UserError(f"{out}: is the input {f}; writing the report there would overwrite it "
                            "(give another -o)")


def write_records_report(records: list[dict], out: str | Path) -> Path:
    """An HTML report of records made in this process (`estimate --report`)."""
    out = Path(out)
    title = "peftprof report: " + ", ".join(dict.fromkeys(
        (r.get("scenario") or {}).get("scenario") or r["variant"] for r in records))
    try:
        write_atomic(out, render_html(records, title))
    except OSError as e:
        raise UserError(f"{out}: cannot write the report: {e.strerror or e}") from None
    return out


def write_report(inputs, out: str | Path, fmt: str = "html", warn=_warn) -> Path:
    out = Path(out)
    check_output(out, inputs)
    records = load_records(inputs, warn)
    title = "peftprof report: " + ", ".join(dict.fromkeys(
        (r.get("scenario") or {}).get("scenario") or r["variant"] for r in records))
    text = {"html": lambda: render_html(records, title), "markdown": lambda: render_markdown(records),
            "csv": lambda: render_csv(records)}[fmt]()
    try:
        write_atomic(out, text)
    except OSError as e:
        raise UserError(f"{out}: cannot write the report: {e.strerror or e}") from None
    return out
