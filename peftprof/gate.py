"""CI regression gate: compare current results with a baseline, per variant and per memory category."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .results import CATEGORIES, Located, bytes_problem, duplicate_problems, merge_order, read_checked, show, write_atomic
from .textfmt import md_cell, visible

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


def _name(rec: dict) -> str:
    return visible(rec["variant"])


def _opt_bytes(d: dict, key: str, field_name: str, problems: list[str], prefix: str) -> None:
    """An optional byte count: absent or null, else a valid byte count."""
    v = d.get(key)
    if v is not None and (why := bytes_problem(v)):
        problems.append(f"{prefix}: {field_name}: {why}")


def _breakdown_problems(bd, field_name: str, prefix: str, problems: list[str]) -> None:
    if bd is None:
        return
    if not isinstance(bd, dict):
        problems.append(f"{prefix}: {field_name}: {show(bd)} is not an object of byte counts per category")
        return
    for c in CATEGORIES:  # a category that is absent or null counts as 0 bytes
        _opt_bytes(bd, c, f"{field_name}.{c}", problems, prefix)


def field_problems(loc: Located, metric: str) -> list[str]:
    """Every value of one record the gate would read for `metric` and cannot compare (docs/gate.md)."""
    rec, problems = loc.record, []
    prefix = f"{loc.path}: {loc.where}: variant {_name(rec)}"
    sc = rec.get("scenario")
    if sc is not None and not isinstance(sc, dict):
        problems.append(f"{prefix}: scenario: {show(sc)} is not an object of resolved settings")
    if metric == "measured":
        m = rec.get("measured")
        peak = m.get("peak_bytes") if isinstance(m, dict) else None
        if peak is None or (peak == 0 and not bytes_problem(peak)):
            return problems + [f"{loc.path}: {loc.where}: variant {_name(rec)} has no measurement (status "
                               f"{visible(show(rec.get('status', 'estimate only')))}); use --metric estimated"]
        _opt_bytes(m, "peak_bytes", "measured.peak_bytes", problems, prefix)
        _opt_bytes(m, "nvml_peak_bytes", "measured.nvml_peak_bytes", problems, prefix)
        _breakdown_problems(m.get("breakdown"), "measured.breakdown", prefix, problems)
        return problems
    est = rec["estimate"]
    _opt_bytes(est, "peak_bytes", "estimate.peak_bytes", problems, prefix)  # present: results.py checks that
    _opt_bytes(est, "device_bytes", "estimate.device_bytes", problems, prefix)
    _breakdown_problems(est["breakdown"], "estimate.breakdown", prefix, problems)
    return problems


def _numbers(rec: dict, metric: str) -> tuple[int, dict, int]:
    """(peak, breakdown, budget figure) of one record checked by field_problems."""
    if metric == "measured":
        m = rec["measured"]
        return m["peak_bytes"], m.get("breakdown") or {}, m.get("nvml_peak_bytes") or m["peak_bytes"]
    e = rec["estimate"]
    d = e.get("device_bytes")
    return e["peak_bytes"], e["breakdown"], e["peak_bytes"] if d is None else d


def compare(current: list[dict], baseline: list[dict], *, tolerance: float, budget: int | None,
            metric: str) -> list[VariantDiff]:
    """Records read by `load` (every value checked for `metric`)."""
    base = {r["variant"]: r for r in baseline}
    cur = {r["variant"]: r for r in current}
    out = []
    for name, rec in cur.items():
        peak, breakdown, budget_need = _numbers(rec, metric)
        over = budget is not None and budget_need > budget
        if name not in base:
            d = VariantDiff(variant=name, status="added", current_bytes=peak)
            if over:
                d.status = "over_budget"
                d.reason = f"needs {budget_need / GIB:.2f} GiB of a {budget / GIB:.2f} GiB budget"
            out.append(d)
            continue
        b_peak, b_breakdown, _ = _numbers(base[name], metric)
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
            out.append(VariantDiff(variant=name, status="removed", baseline_bytes=_numbers(rec, metric)[0]))
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
               f"{sum(d.status == 'improved' for d in diffs)} improved, "
               f"{sum(d.status == 'added' for d in diffs)} added, "
               f"{sum(d.status == 'removed' for d in diffs)} removed (tolerance {tolerance * 100:g}%)")
    moved = [d.variant for d in diffs if d.categories and d.status == "ok"]
    if moved:
        summary += f"; {len(moved)} changed within tolerance"
    if fmt == "markdown":
        lines = [f"**peftprof gate: {summary}**", "", "| " + " | ".join(headers) + " |",
                 "|---|---|---:|---:|---:|---|"]
        lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    from .textfmt import table

    return table(headers, rows) + "\n" + summary


def _load(paths: list[str], label: str, metric: str, empty_ok: bool = False) -> tuple[list[dict], list]:
    """Records of one side, several files or directories merged (a sharded sweep: docs/sharding.md). No record
    at all is a problem unless `empty_ok`: a gate that compares nothing fails closed (docs/gate.md)."""
    from pathlib import Path

    located, problems = read_checked(paths)
    for loc in located:
        problems += field_problems(loc, metric)
    problems += duplicate_problems(located, label)
    if not located and not problems and not empty_ok:
        problems.append(f"{', '.join(map(str, paths))}: {label} holds no results (allowed: at least one variant; "
                        "a gate that compares nothing fails)")
    return [loc.record for loc in merge_order(located, all(Path(p).is_dir() for p in paths))], problems


def load(paths: list[str], label: str, metric: str = "estimated") -> list[dict]:
    """Records of CURRENT or BASELINE; UserError naming every value the gate cannot compare."""
    records, problems = _load(paths, label, metric)
    if problems:
        raise UserError(problems)
    return records


def load_inputs(current: list[str], baseline: str | None, metric: str,
                update: bool = False) -> tuple[list[dict], list[dict]]:
    """(CURRENT, BASELINE) records, with the problems of both reported together; no baseline: []. An empty
    BASELINE, or one that shares no variant with CURRENT, is accepted only with `update` (it is about to be
    written): otherwise the gate would compare nothing."""
    cur, problems = _load(current, "CURRENT", metric)
    base: list[dict] = []
    if baseline is not None:
        base, more = _load([baseline], "BASELINE", metric, empty_ok=update)
        problems += more
    if problems:
        raise UserError(list(dict.fromkeys(problems)))  # one file given as both: each problem once
    names = {r["variant"] for r in cur}
    if base and not update and not any(r["variant"] in names for r in base):
        raise UserError(f"{', '.join(map(str, current))} and {baseline}: no variant is on both sides (CURRENT "
                        f"{len(cur)}, e.g. {_name(cur[0])}; BASELINE {len(base)}, e.g. {_name(base[0])}) (allowed: "
                        "at least one variant in both, a gate that compares nothing fails; --update writes CURRENT "
                        "as the baseline)")
    return cur, base


def update_baseline(current: list[dict], baseline_path: str) -> None:
    """Write CURRENT as the new baseline (a JSON list, like `estimate --format json`), atomically."""
    try:
        write_atomic(baseline_path, json.dumps(current, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        raise UserError(f"{baseline_path}: cannot write the baseline: {e.strerror or e}") from None
