"""The report's explaining parts: the verdict at the top, the memory timeline of each variant, what is live at
its peak, and what to change (peftprof/advise.py). report.py assembles the page.

Timelines and peak tables are drawn in the browser from one compact JSON object (one entry per variant with a
timeline), so a 100-variant report stays small: values in the report's unit to 4 significant digits (the
peak's exact bytes are kept for its label). User strings reach the page as follows: HTML text through
html.escape; strings in figures pre-escaped with `pl` (plotly's pseudo-HTML); table cells filled by the
script through textContent; the JSON itself with <, >, & and / escaped, so nothing in it can end the script
element.
"""

from __future__ import annotations

import html
import json

from .results import CATEGORIES

GIB, MIB = 1 << 30, 1 << 20
PHASE_COLORS = {"forward": "rgba(76,120,168,0.08)", "backward": "rgba(228,87,86,0.08)",
                "optimizer": "rgba(84,162,75,0.10)", "steady": "rgba(120,120,120,0.06)"}
OVERLAY_DEFAULT = 5  # timelines overlaid at first: the variants with the largest peaks


def pl(text) -> str:
    """A string for a plotly label (its pseudo-HTML shown as text); the same rule as report._pl."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def script_json(obj) -> str:
    """JSON safe inside a <script> element."""
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("/", "\\u002f")


def unit_of(records) -> tuple[str, int]:
    """One unit for the whole report: MiB when every peak is under 1 GiB, else GiB."""
    peaks = [peak_of(r)[0] for r in records]
    return ("GiB", GIB) if max(peaks, default=0) >= GIB else ("MiB", MIB)


def measured(r: dict) -> dict | None:
    m = r.get("measured")
    return m if isinstance(m, dict) and m.get("peak_bytes") else None


def peak_of(r: dict) -> tuple[int, str, dict]:
    """(peak bytes, 'measured' | 'estimated', breakdown): the measurement when there is one."""
    m = measured(r)
    if m:
        return m["peak_bytes"], "measured", m.get("breakdown") or {}
    return r["estimate"]["peak_bytes"], "estimated", r["estimate"]["breakdown"]


def source_of(r: dict) -> tuple[dict | None, dict | None, str]:
    """(timeline, at_peak, label): the measured step's when there is one, else the trace's."""
    m = measured(r) or {}
    if m.get("timeline"):
        return m["timeline"], m.get("at_peak"), "measured"
    e = r["estimate"]
    if e.get("timeline"):
        return e["timeline"], e.get("at_peak"), f"estimated ({e.get('method', 'trace')})"
    return None, None, ""


def biggest_category(breakdown: dict) -> tuple[str | None, int]:
    items = [(c, breakdown.get(c) or 0) for c in CATEGORIES]
    c, n = max(items, key=lambda kv: kv[1], default=(None, 0))
    return (c, n) if n else (None, 0)


def fmt_bytes(n, unit: str, scale: int) -> str:
    return "" if n is None else f"{n / scale:,.3f}"


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


# --- the verdict ---

def verdict_html(records, fitting_gpus, unit: str, scale: int, error_pct) -> str:
    n = len(records)
    n_meas = sum(1 for r in records if measured(r))
    failed = [r for r in records if r.get("status") in ("oom", "error")]
    peaks = sorted(((peak_of(r)[0], i) for i, r in enumerate(records)), reverse=True)
    top_bytes, top_i = peaks[0]
    top = records[top_i]
    _, how, breakdown = peak_of(top)
    cat, cat_bytes = biggest_category(breakdown)
    items = [f"{n} variant{'s' if n != 1 else ''}: {n_meas} measured, {n - n_meas} estimated only"
             + (f"; {len(failed)} failed (out of memory or error, see the status column)" if failed else "") + "."]
    line = (f"Largest peak: <b>{html.escape(top['variant'])}</b> (#{top_i + 1}), {top_bytes / scale:,.3f} {unit} "
            f"{how}")
    if cat:
        line += f"; its biggest category is <b>{cat}</b>, {cat_bytes / scale:,.3f} {unit} ({cat_bytes / top_bytes:.0%})"
    items.append(line + ".")
    if n > 1:
        low_bytes, low_i = peaks[-1]
        items.append(f"Smallest peak: {html.escape(records[low_i]['variant'])} (#{low_i + 1}), "
                     f"{low_bytes / scale:,.3f} {unit}.")
    chosen = {r["estimate"].get("gpu") for r in records} - {None}
    if len(chosen) == 1:
        gpu = chosen.pop()
        fit = sum(1 for r in records if gpu in fitting_gpus(r))
        items.append(f"On <b>{html.escape(str(gpu))}</b>: {fit} of {n} fit" + (
            "; what to change for the others is below." if fit < n else "."))
    smallest_fit = fitting_gpus(top)
    items.append("The largest fits " + (f"<b>{html.escape(smallest_fit[0])}</b> and larger GPUs of the catalogue."
                                        if smallest_fit else "<b>no GPU</b> of the catalogue."))
    errs = sorted(abs(e) for e in (error_pct(r) for r in records) if e is not None)
    if errs:
        items.append(f"Estimate against measurement: median |error| {errs[len(errs) // 2]:.2f}%, "
                     f"largest {errs[-1]:.2f}%.")
    return "<ul class='verdict'>" + "".join(f"<li>{t}</li>" for t in items) + "</ul>"


# --- timelines and the peak's tensors (drawn by EXPLAIN_JS) ---

def _shape(s) -> str:
    return "" if not isinstance(s, list) else "[" + ", ".join(str(v) for v in s) + "]"


def explain_data(records, unit: str, scale: int) -> dict:
    out = []
    for i, r in enumerate(records):
        tl, ap, label = source_of(r)
        if not tl:
            continue
        ap = ap or {}
        out.append({
            "i": i + 1, "t": r["variant"], "n": pl(r["variant"]), "src": label, "ne": tl.get("n_events"),
            "x": tl["x"], "y": {c: [_sig(b / scale) for b in v] for c, v in tl["bytes"].items()},
            "ph": [[p["phase"], p["start"], p["end"]] for p in tl.get("phases") or []],
            "pk": [tl["peak"].get("x"), tl["peak"]["bytes"], tl["peak"].get("phase")], "nt": tl.get("note") or "",
            "top": [[t["bytes"], t.get("category"), _shape(t.get("shape")), t.get("dtype"), t.get("module"),
                     t.get("allocated_in")] for t in ap.get("top_tensors") or []],
            "mod": [[g.get("module"), g["bytes"], g.get("n_tensors"), biggest_category(g.get("by_category") or {})[0]]
                    for g in ap.get("by_module") or []],
            "lay": [[g.get("layer"), g["bytes"], g.get("n_tensors"), biggest_category(g.get("by_category") or {})[0]]
                    for g in ap.get("by_layer") or []],
            "live": ap.get("live_bytes"),
        })
    return {"unit": unit, "scale": scale, "cats": list(CATEGORIES), "v": out}


def explain_html(records, colors: dict, unit: str, scale: int) -> str:
    data = explain_data(records, unit, scale)
    if not data["v"]:
        return ("<p>No timeline: it comes from a tracked step, <code>peftprof run</code> (measured) or "
                "<code>peftprof estimate --method trace --report</code> (estimated).</p>")
    by_peak = sorted(range(len(data["v"])), key=lambda k: -data["v"][k]["pk"][1])
    chosen = set(by_peak[:OVERLAY_DEFAULT])
    options = "".join(f"<option value='{k}'>#{v['i']} {html.escape(v['t'])} ({html.escape(v['src'])})</option>"
                      for k, v in enumerate(data["v"]))
    overlay = "".join(f"<option value='{k}'{' selected' if k in chosen else ''}>#{v['i']} {html.escape(v['t'])}"
                      f"</option>" for k, v in enumerate(data["v"]))
    data["colors"] = colors
    data["pc"] = PHASE_COLORS
    tables = "".join(
        f"<h3>{title}</h3><div class='scroll'><table id='{tid}' class='peak'><thead><tr>"
        + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead><tbody></tbody></table></div>"
        for title, tid, heads in (
            ("Largest tensors live at the peak", "top-tensors",
             (f"size ({unit})", "category", "shape", "dtype", "module that created it", "allocated in")),
            ("By module", "by-module", ("module", f"live at the peak ({unit})", "tensors", "largest category")),
            ("By decoder layer", "by-layer", ("layer", f"live at the peak ({unit})", "tensors", "largest category"))))
    sweep = ("" if len(data["v"]) < 2 else
             "<h3>Timelines overlaid</h3><p class='hint'>Total live memory against the share of the step's "
             "allocation events; choose variants (Ctrl/Shift-click):</p>"
             f"<select id='tl-overlay' multiple size='{min(6, len(data['v']))}'>{overlay}</select>"
             "<div id='tl-overlay-plot' class='plot'></div>")
    return (f"<p><label>Variant: <select id='tl-variant'>{options}</select></label></p>"
            "<div id='tl-plot' class='plot'></div><p id='tl-peak' class='hint'></p>" + tables + sweep
            + f"<script>var TL={script_json(data)};</script>")


EXPLAIN_JS = r"""function tlFig(k){var v=TL.v[k],d=[],sh=[],an=[];
TL.cats.forEach(function(c){if(!v.y[c])return;d.push({type:'scatter',x:v.x,y:v.y[c],name:c,stackgroup:'one',
mode:'lines',line:{width:0.5,color:TL.colors[c]},fillcolor:TL.colors[c],
hovertemplate:'%{y:.4g} '+TL.unit+'<extra>'+c+'</extra>'});});
if(v.pk[0]!==null){d.push({type:'scatter',x:[v.pk[0]],y:[v.pk[1]/TL.scale],mode:'markers+text',name:'peak',
text:['peak '+fmtB(v.pk[1])],textposition:'top center',marker:{size:11,symbol:'x',color:'#000'},hoverinfo:'text'});}
v.ph.forEach(function(p){sh.push({type:'rect',xref:'x',yref:'paper',x0:p[1]-0.5,x1:p[2]+0.5,y0:0,y1:1,line:{width:0},
fillcolor:TL.pc[p[0]]||'rgba(0,0,0,0.04)',layer:'below'});an.push({x:(p[1]+p[2])/2,y:1.02,xref:'x',yref:'paper',
text:p[0],showarrow:false,font:{size:11,color:'#555'}});});
return {data:d,layout:{title:{text:'Memory through the step: '+v.n+' ('+v.src+')'},height:460,shapes:sh,annotations:an,
xaxis:{title:{text:'allocation events of the step, in order'}},yaxis:{title:{text:TL.unit}},legend:{traceorder:'normal'},
margin:{t:70}}};}
function fmtB(b){return (b/TL.scale).toLocaleString('en-US',{minimumFractionDigits:3,maximumFractionDigits:3})+' '+TL.unit;}
function fillTable(id,rows){var b=document.querySelector('#'+id+' tbody');b.textContent='';rows.forEach(function(r){
var tr=document.createElement('tr');r.forEach(function(c){var td=document.createElement('td');
td.textContent=(c===null||c===undefined)?'':c;td.style.textAlign=/^[0-9.,]+$/.test(td.textContent)?'right':'left';
tr.appendChild(td);});b.appendChild(tr);});}
function tlShow(k){var v=TL.v[k],f=tlFig(k),el=document.getElementById('tl-plot');FIGS['tl-plot']=f;
if(el.dataset.drawn)Plotly.react(el,f.data,f.layout);
var big=v.top.length?v.top[0]:null;document.getElementById('tl-peak').textContent=(v.pk[0]===null)?'':
'Peak '+fmtB(v.pk[1])+' in '+v.pk[2]+', at event '+v.pk[0]+' of '+v.ne+'.'+(big?' The largest tensor live then: '+
big[1]+' '+big[3]+big[2]+' from '+big[4]+', '+fmtB(big[0])+'.':'')+(v.nt?' '+v.nt:'');
var q=function(b){return (b/TL.scale).toFixed(3);};
fillTable('top-tensors',v.top.map(function(t){return [q(t[0]),t[1],t[2],t[3],t[4],t[5]];}));
fillTable('by-module',v.mod.map(function(g){return [g[0],q(g[1]),g[2],g[3]];}));
fillTable('by-layer',v.lay.map(function(g){
return [g[0]===null?'none (outside the layers, or made by autograd in backward)':g[0],q(g[1]),g[2],g[3]];}));}
function tlOverlay(){var s=document.getElementById('tl-overlay');if(!s)return;var d=[];
Array.from(s.selectedOptions).forEach(function(o){var v=TL.v[+o.value],n=v.x.length,tot=[],xs=[];
for(var j=0;j<n;j++){var t=0;for(var c in v.y)t+=v.y[c][j];tot.push(t);xs.push(100*v.x[j]/Math.max(1,v.ne));}
d.push({type:'scatter',mode:'lines',x:xs,y:tot,name:'#'+v.i,hovertext:v.n,
hovertemplate:'%{hovertext}<br>%{y:.4g} '+TL.unit+'<extra></extra>'});});
var f={data:d,layout:{title:{text:'Total live memory, selected variants'},height:420,xaxis:{title:{text:'% of the step'}},
yaxis:{title:{text:TL.unit}}}},el=document.getElementById('tl-overlay-plot');FIGS['tl-overlay-plot']=f;
if(el.dataset.drawn)Plotly.react(el,f.data,f.layout);}
document.addEventListener('DOMContentLoaded',function(){if(typeof TL==='undefined')return;
var s=document.getElementById('tl-variant');s.addEventListener('change',function(){tlShow(+s.value);});tlShow(0);
var o=document.getElementById('tl-overlay');if(o){o.addEventListener('change',tlOverlay);tlOverlay();}});"""


# --- what to change ---

def advice_html(records, unit: str, scale: int) -> str:
    from .advise import ADVISE_HEADROOM, advise_record

    rows = []
    for i, r in enumerate(records):
        a = r.get("advice") if isinstance(r.get("advice"), dict) else advise_record(r)
        if not a or not a.get("needed"):
            continue
        head = (f"#{i + 1} {r['variant']}", str(a["target"]), fmt_bytes(a["need_bytes"], unit, scale))
        if not a["changes"]:
            rows.append((*head, "no single change fits: combine them", "", "", ""))
        for c in a["changes"]:
            speed = "" if c.get("speed_change_pct") is None else f"{c['speed_change_pct']:+.1f}"
            rows.append((*head, c["change"], fmt_bytes(c["need_bytes"], unit, scale), speed, c.get("note") or ""))
    if not rows:
        return ("<p>Every variant fits its target with at least "
                f"{ADVISE_HEADROOM:.0%} to spare (its --gpu, its --max-memory, or else the smallest catalogue GPU "
                "that holds it): nothing to change.</p>")
    heads = ("variant", "target", f"needs ({unit})", "single change that fits", f"then needs ({unit})",
             "speed change (%)", "note")
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (f"<p class='hint'>For each variant that does not fit its target, or fits with less than "
            f"{ADVISE_HEADROOM:.0%} to spare: the smallest single changes that fit, from the analytic estimator "
            "(peftprof/advise.py). The target is the variant's --gpu, else its --max-memory, else the largest "
            "catalogue GPU it does not fit. Speed is predicted from FLOPs.</p><div class='scroll'><table id='advice'>"
            "<thead><tr>" + "".join(f"<th>{h}</th>" for h in heads) + f"</tr></thead><tbody>{body}</tbody></table></div>")
