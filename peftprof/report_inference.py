"""The report's serving section (`[inference] enabled` records): latency against memory, one point per variant
(measured peak and latency where `peftprof run` measured them), and a table of the serving figures: KV cache
(estimated and measured), resident adapters, merged or not, latency per request and per generated token.
report.py calls `section_html` and `markdown_lines`; both return nothing when no record is a serving one."""

from __future__ import annotations

import html

from .textfmt import md_cell


def is_inference(r: dict) -> bool:
    return bool(((r.get("scenario") or {}).get("inference") or {}).get("enabled"))


def _measured(r: dict) -> dict:
    m = r.get("measured")
    return m if isinstance(m, dict) else {}


def _num(v, spec: str):
    return None if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, spec)


def _disk(r: dict) -> dict:
    """Offloading figures ([inference] max_memory): estimated and measured bytes on disk, disk reads per
    generated token (estimated) and per request (both); {} when neither the estimate nor the run has any."""
    est, m = r.get("estimate") or {}, _measured(r)
    if est.get("disk_bytes") is None and "disk" not in (m.get("placement_bytes") or {}):
        return {}
    return {"disk est.": est.get("disk_bytes"), "disk meas.": (m.get("placement_bytes") or {}).get("disk"),
            "disk reads/token est.": est.get("disk_read_bytes_per_token"),
            "disk reads/request est.": est.get("disk_read_bytes_per_request"),
            "disk reads/request meas.": m.get("disk_read_bytes_per_request")}


def serving_rows(records: list[dict], unit: str, scale: int) -> list[dict]:
    offloaded = any(_disk(r) for r in records if is_inference(r))
    rows = []
    for r in records:
        if not is_inference(r):
            continue
        inf = r["scenario"]["inference"]
        est, m = r.get("estimate") or {}, _measured(r)
        peak = m.get("peak_bytes") or est.get("peak_bytes")
        rows.append({
            "variant": r["variant"], "merged": "yes" if inf.get("merged") else "no",
            "new tokens": inf.get("max_new_tokens", 0),
            "adapters": m.get("n_adapters", (r["scenario"].get("peft") or {}).get("num_adapters")),
            f"peak ({unit})": _num(None if peak is None else peak / scale, ",.3f"),
            f"KV cache est. ({unit})": _num(None if est.get("kv_cache_bytes") is None
                                            else est["kv_cache_bytes"] / scale, ",.3f"),
            f"KV cache meas. ({unit})": _num(None if m.get("kv_cache_bytes") is None
                                             else m["kv_cache_bytes"] / scale, ",.3f"),
            "KV B/token/layer": est.get("kv_cache_bytes_per_token_per_layer"),
            "request ms": _num(m.get("latency_ms"), ",.1f"), "ms/token": _num(m.get("ms_per_token"), ",.2f"),
            "decode ms/token": _num(m.get("decode_ms_per_token"), ",.2f"),
            "tokens/s": _num(m.get("tokens_per_s"), ",.1f")})
        if offloaded:  # columns only where some variant offloads; bytes in the report's unit
            disk = _disk(r)
            rows[-1].update({f"{k} ({unit})": _num(None if disk.get(k) is None else disk[k] / scale, ",.3f")
                             for k in ("disk est.", "disk meas.", "disk reads/token est.", "disk reads/request est.",
                                       "disk reads/request meas.")})
    return rows


def fig_latency_memory(records: list[dict], unit: str, scale: int):
    """Measured latency per request (x) against peak memory (y): merged and unmerged variants as two series."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for merged in (False, True):
        pts = [(_measured(r).get("latency_ms"), _measured(r).get("peak_bytes"), r["variant"]) for r in records
               if is_inference(r) and bool(r["scenario"]["inference"].get("merged")) == merged]
        pts = [(x, y / scale, name) for x, y, name in pts if isinstance(x, (int, float)) and y]
        if pts:
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers",
                            name="merged" if merged else "unmerged", text=[html.escape(p[2]) for p in pts],
                            hovertemplate="%{text}<br>%{x:.1f} ms<br>%{y:.3f} " + unit + "<extra></extra>")
    if not fig.data:
        fig.add_annotation(text="not measured", showarrow=False, font_size=20)
    return fig.update_layout(xaxis_title="latency per request (ms, measured)", yaxis_title=f"peak ({unit})",
                             height=420)


def section_html(records, unit: str, scale: int, table_html, figure_html) -> str:
    """The HTML section, or "" when no record is a serving one (`table_html`, `figure_html`: report.py's)."""
    rows = serving_rows(records, unit, scale)
    if not rows:
        return ""
    return ("<h2>Serving: latency against memory</h2><p class='hint'>Forward-only requests ([inference]): "
            "batch_size prompts of seq_len tokens, then max_new_tokens greedy tokens with transformers' KV cache. "
            "Latency is the median request measured by <code>peftprof run</code>; the peak is the measured one "
            "(else the estimate). In the breakdown of these variants, activations are the KV cache and trainable "
            "the resident adapters. Offloaded variants ([inference] max_memory) add the bytes accelerate wrote to "
            "disk and the bytes read back from it per generated token and per request.</p>"
            + figure_html(fig_latency_memory(records, unit, scale), "serving") + table_html(rows, "serving-table"))


def markdown_lines(records, unit: str, scale: int) -> list[str]:
    rows = serving_rows(records, unit, scale)
    if not rows:
        return []
    keys = list(rows[0])
    lines = ["", "| " + " | ".join(keys) + " |", "|---|" + "---|" * (len(keys) - 1)]
    lines += ["| " + " | ".join(md_cell("-" if row[k] is None else str(row[k])) for k in keys) + " |" for row in rows]
    return lines + ["", f"(serving, {unit})"]
