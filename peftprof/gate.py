"""CI regression gate: compare current results with a baseline, per variant and per memory category."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .results import CATEGORIES
from .results import read_results, write_atomic

GIB = 1 << 30


@dataclass
class VariantDiff:
    variant: str
    status: str  # ok | regression | over_budget | improved | added | removed
    baseline_bytes: int | None = None
    current_bytes: int | None = None
    change_pct: float | None = None
    categories: dict[str, int] = field(default_factory=dict)  # current - baseline
    reason: str = ""


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def settings_changes(base: dict, cur: dict) -> list[str]:
    """Resolved settings that differ, e.g. 'training.seq_len 2048 -> 4096'."""
    skip = ("name", "source", "description", "overrides", "not_applicable")
    b = {k: v for k, v in _flatten(base.get("scenario")).items() if not k.startswith(skip)}
    c = {k: v for k, v in _flatten(cur.get("scenario")).items() if not k.startswith(skip)}
    return [f"{k} {json.dumps(b.get(k))} -> {json.dumps(c.get(k))}" for k in sorted(set(b) | set(c))
            if b.get(k) != c.get(k)]


def _numbers(rec: dict, metric: str, path: str) -> tuple[int, dict, int]:
    """(peak, breakdown, budget figure) of one record for the chosen metric."""
    if metric == "measured":
        m = rec.get("measured")
        if not isinstance(m, dict) or not m.get("peak_bytes"):
            raise UserError(f"{path}: variant {rec['variant']} has no measurement (status "
                            f"{rec.get('status', 'estimate only')}); use --metric estimated")
        return m["peak_bytes"], m.get("breakdown") or {}, m.get("nvml_peak_bytes") or m["peak_bytes"]
    e = rec["estimate"]
    return e["peak_bytes"], e["breakdown"], e.get("device_bytes", e["peak_bytes"])


def compare(current: list[dict], baseline: list[dict], *, tolerance: float, budget: int | None, metric: str,
            current_path: str = "CURRENT", baseline_path: str = "BASELINE") -> list[VariantDiff]:
    base = {r["variant"]: r for r in baseline}
    cur = {r["variant"]: r for r in current}
    out = []
    for name, rec in cur.items():
        peak, breakdown, budget_need = _numbers(rec, metric, current_path)
        over = budget is not None and budget_need > budget
        if name not in base:
            d = VariantDiff(variant=name, status="added", current_bytes=peak)
            if over:
                d.status, d.reason = "over_budget", f"needs {budget_need / GIB:.2f} GiB of a {budget / GIB:.2f} GiB budget"
            out.append(d)
            continue
        b_peak, b_breakdown, _ = _numbers(base[name], metric, baseline_path)
        cats = {c: int(breakdown.get(c, 0) or 0) - int(b_breakdown.get(c, 0) or 0) for c in CATEGORIES}
        d = VariantDiff(variant=name, status="ok", baseline_bytes=b_peak, current_bytes=peak,
                        change_pct=(peak - b_peak) / b_peak * 100 if b_peak else None,
                        categories={c: v for c, v in cats.items() if v})
        grew = max(cats, key=cats.get)
        changes = settings_changes(base[name], rec)
        cause = f"{grew} {cats[grew] / GIB:+.2f} GiB" + (f": {'; '.join(changes[:3])}" if changes else "")
        if peak > b_peak * (1 + tolerance):
            d.status, d.reason = "regression", cause
        elif over:
            d.status = "over_budget"
            d.reason = f"needs {budget_need / GIB:.2f} GiB of a {budget / GIB:.2f} GiB budget" + (
                f"; {cause}" if cats[grew] > 0 else "")
        elif peak < b_peak * (1 - tolerance):
            d.status = "improved"
            shrank = min(cats, key=cats.get)
            d.reason = f"{shrank} {cats[shrank] / GIB:+.2f} GiB"
        if over and d.status == "regression":
            d.reason += f"; over the {budget / GIB:.2f} GiB budget"
        out.append(d)
    for name, rec in base.items():
        if name not in cur:
            out.append(VariantDiff(variant=name, status="removed", baseline_bytes=_numbers(rec, metric, baseline_path)[0]))
    return out


def failed(diffs: list[VariantDiff], strict: bool, exact: bool = False) -> bool:
    """Regressions and budget overruns fail; --strict adds added/removed; --exact fails on any change
    (a category that moved, an improvement), for baselines that must be updated on purpose."""
    bad = {"regression", "over_budget"} | ({"added", "removed"} if strict or exact else set())
    if exact and any(d.status == "improved" or d.categories for d in diffs):
        return True
    return any(d.status in bad for d in diffs)


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def render(diffs: list[VariantDiff], fmt: str, *, tolerance: float, strict: bool, exact: bool = False) -> str:
    verdict = "FAIL" if failed(diffs, strict, exact) else "PASS"
    if fmt == "json":
        return json.dumps({"result": verdict.lower(), "tolerance": tolerance, "variants": [asdict(d) for d in diffs]},
                          indent=2)
    rows = [[d.variant, d.status, _gib(d.baseline_bytes), _gib(d.current_bytes),
             "-" if d.change_pct is None else f"{d.change_pct:+.2f}%", d.reason] for d in diffs]
    headers = ["variant", "status", "baseline GiB", "current GiB", "change", "why"]
    summary = (f"{verdict}: {sum(d.status == 'regression' for d in diffs)} regressed, "
               f"{sum(d.status == 'over_budget' for d in diffs)} over budget, "
               f"{sum(d.status == 'improved' for d in diffs)} improved, {sum(d.status == 'added' for d in diffs)} added, "
               f"{sum(d.status == 'removed' for d in diffs)} removed (tolerance {tolerance * 100:g}%)")
    moved = [d.variant for d in diffs if d.categories and d.status == "ok"]
    if moved:
        summary += f"; {len(moved)} changed within tolerance"
    if fmt == "markdown":
        def cell(x):
            return str(x).replace("|", "\\|")

        lines = [f"**peftprof gate: {summary}**", "", "| " + " | ".join(headers) + " |",
                 "|---|---|---:|---:|---:|---|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    from .textfmt import table

    return table(headers, rows) + "\n" + summary


def load(paths: list[str], label: str) -> list[dict]:
    records = read_results(paths)
    names = [r["variant"] for r in records]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{label}: variant {dupes[0]!r} appears more than once")
    return records


def update_baseline(current: list[dict], baseline_path: str) -> None:
    """Write CURRENT as the new baseline (a JSON list, like `estimate --format json`), atomically."""
    write_atomic(baseline_path, json.dumps(current, indent=1, sort_keys=True) + "\n")
