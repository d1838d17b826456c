"""Scenario sweeps: check the `[sweep]` table, expand it into variants, merge the variants' problems.

Used by `scenario.load_scenario`; problems go into its collector (`add(section, key, message, allowed,
variant)`), so a sweep problem is reported together with every other problem of the file.
"""

from __future__ import annotations

import itertools
import json
import math

from .errors import show

MAX_VARIANTS = 10_000


def _canonical(value):
    """What a sweep value means, for spotting repeats: 4 and 4.0 are one number (bools are not numbers),
    and a list of target modules is a set (peft matches each name; order and repeats do not matter)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)  # 4 == 4.0 and hash(4) == hash(4.0)
    if isinstance(value, list):
        return ("list", frozenset(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("table", json.dumps(value, sort_keys=True, default=str))
    return (type(value).__name__, value)


def _unique_values(add, dotted: str, values: list) -> list:
    """The axis's values with repeats dropped; each repeat is a problem (its variants would be measured
    twice, and under the same name the summary and the gate would see two rows for one record)."""
    groups: dict[object, list] = {}
    for v in values:
        groups.setdefault(_canonical(v), []).append(v)
    for same in groups.values():
        if len(same) == 1:
            continue
        spellings = list(dict.fromkeys(show(v) for v in same))
        if len(spellings) == 1:
            times = "twice" if len(same) == 2 else f"{len(same)} times"
            add("sweep", dotted, f"the value {spellings[0]} is listed {times}", "each value once")
        else:
            add("sweep", dotted, f"the values {' and '.join(spellings)} are the same value", "each value once")
    return [same[0] for same in groups.values()]


def sweep_axes(add, raw, sections: tuple, keys_of) -> tuple[list[tuple[str, list]], bool]:
    """The valid axes of a `[sweep]` table and whether the whole table was valid. `keys_of(section)`
    gives the keys a section accepts. A bad axis is reported and left out; a sweep that expands to too
    many variants is reported and not expanded."""
    if raw is None:
        return [], True
    if not isinstance(raw, dict):
        add("sweep", None, "must be a table of \"section.key\" = [values]")
        return [], False
    axes, ok = [], True
    for dotted, values in raw.items():
        section, _, key = dotted.partition(".")
        if isinstance(values, dict):  # sweep.peft.r = [...] parses as a nested table
            add("sweep", dotted, "quote dotted keys: \"section.key\" = [values]")
        elif section not in sections:
            add("sweep", dotted, f"unknown section {show(section)}", ", ".join(f"{s}.<key>" for s in sections))
        elif key not in keys_of(section):
            keys = keys_of(section)
            add("sweep", dotted, f"unknown key {show(key)} in [{section}]{closest(key, keys)}", ", ".join(keys))
        elif not isinstance(values, list) or not values:
            add("sweep", dotted, f"must be a non-empty list of values, got {show(values)}")
        else:
            axes.append((dotted, _unique_values(add, dotted, values)))  # without its repeats: as meant
            continue
        ok = False
    n = math.prod(len(v) for _, v in axes) if axes else 1
    if n > MAX_VARIANTS:
        add("sweep", None, f"expands to {n:,} variants", f"at most {MAX_VARIANTS:,}")
        return [], False
    return axes, ok


def closest(name: str, options) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def value_label(value) -> str:
    if isinstance(value, list):
        return ",".join(map(value_label, value))
    return json.dumps(value) if isinstance(value, bool) else str(value)


def expand(name: str, base: dict, axes: list[tuple[str, list]]):
    """Yields (variant name, variant's raw sections, overrides) for the cartesian product of the axes."""
    combos = itertools.product(*[[(k, v) for v in values] for k, values in axes])
    for combo in combos:
        variant_raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        for dotted, value in combo:
            section, _, key = dotted.partition(".")
            if section not in variant_raw and section == "model":
                continue  # reported as the missing [model] section
            if not isinstance(variant_raw.get(section, {}), dict):
                continue  # reported as "must be a table"
            variant_raw.setdefault(section, {})[key] = value
        vname = name + ("[" + ",".join(f"{k}={value_label(v)}" for k, v in combo) + "]" if combo else "")
        yield vname, variant_raw, tuple(combo)


def collect_problems(add, results, names: list[str], conditional: bool = True) -> None:
    """A problem in every variant is reported once; one in some variants names them. A not-applicable
    key is an error only when it applies to no variant at all; that is only known when the whole sweep
    is valid (`conditional`)."""
    n = len(results)
    seen: dict[tuple, list[str]] = {}
    for (_, problems, _), vname in zip(results, names, strict=True):
        for p in problems:
            seen.setdefault((p.section, p.key, p.message, p.allowed), []).append(vname)
    for (section, key, message, allowed), variants in seen.items():
        variant = None if len(variants) == n else ", ".join(variants[:3]) + (
            f" and {len(variants) - 3} more" if len(variants) > 3 else "")
        add(section, key, message, allowed, variant or None)
    if not conditional:
        return
    cond_counts: dict[tuple, int] = {}
    for _, _, cond in results:
        for p in cond:
            cond_counts[(p.section, p.key, p.message)] = cond_counts.get((p.section, p.key, p.message), 0) + 1
    reported = set()
    for (section, key, message) in cond_counts:
        if (section, key) in reported:
            continue
        if all(any(p.section == section and p.key == key for p in cond) for _, _, cond in results):
            reported.add((section, key))
            add(section, key, message)
