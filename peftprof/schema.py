"""Schema of scenario keys: what kind of value each key takes and how a problem is collected. Shared by the
loader (scenario.py) and the rules of each section (rules_*.py); no torch, no click."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import Problem, show
from .sweep import closest

POLICY_EVERY = re.compile(r"every_([1-9][0-9]*)")  # ASCII digits only: "²".isdigit() but int("²") fails
_fmt = show  # a value as the user wrote it in TOML/JSON (true, "text", 3), cut when long
_closest = closest


@dataclass(frozen=True)
class Key:
    """Schema of one key: kind ('int', 'float', 'bool', 'choice', 'str'), bounds, choices."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    lo_open: bool = False
    hi_open: bool = False
    text: str = ""  # what is allowed, where the kind alone does not say it

    def allowed(self) -> str:
        if self.text:
            return self.text
        if self.kind == "str":
            return "a string"
        if self.kind == "choice":
            return " | ".join(str(c) for c in self.choices)
        if self.kind == "bool":
            return "true | false"
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        hi = "" if self.hi is None else f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        kind = "integer" if self.kind == "int" else "number"
        return " and ".join(x for x in (f"{kind} {lo}".strip(), hi) if x)


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def check_value(key: Key, value) -> str | None:
    """Returns a problem message or None. Bools are not integers here; NaN and inf are rejected."""
    if key.kind == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {_fmt(value)}"
    if key.kind == "choice":
        return None if (value in key.choices and type(value) is type(key.choices[0])) else \
            f"unknown value {_fmt(value)}{_closest(str(value), map(str, key.choices))}"
    if key.kind == "str":
        return None if isinstance(value, str) else f"must be a string, got {_fmt(value)}"
    if key.kind in ("int", "float"):
        ok_type = isinstance(value, int) if key.kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            return f"must be {'an integer' if key.kind == 'int' else 'a number'}, got {_fmt(value)}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        if key.lo is not None and (value <= key.lo if key.lo_open else value < key.lo):
            return f"out of range: {_fmt(value)}"
        if key.hi is not None and (value >= key.hi if key.hi_open else value > key.hi):
            return f"out of range: {_fmt(value)}"
        return None
    if key.kind == "targets":
        if value == "all-linear":
            return None
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return None
        return f"must be \"all-linear\" or a non-empty list of module names, got {_fmt(value)}"
    if key.kind == "names":
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            if len(set(value)) < len(value):
                return f"lists a name twice: {_fmt(value)}"
            return None
        return f"must be a non-empty list of names, got {_fmt(value)}"
    if key.kind == "ints":  # a list of sizes (ResNet hidden_sizes, depths)
        if isinstance(value, list) and value and all(type(v) is int and 1 <= v <= 10_000_000 for v in value):
            return None
        return f"must be a non-empty list of integers from 1 to 10,000,000, got {_fmt(value)}"
    if key.kind == "policy":
        if value in ("none", "full"):
            return None
        if isinstance(value, str) and POLICY_EVERY.fullmatch(value):
            return None
        if isinstance(value, str) and value.startswith("every_"):
            return (f"{_fmt(value)}: the k of every_k must be a whole number >= 1 in the digits 0-9, "
                    "with no leading zero")
        return f"unknown value {_fmt(value)}"
    raise AssertionError(key.kind)


def allowed_text(key: Key) -> str:
    if key.kind == "targets":
        return "\"all-linear\" or a list of module names"
    if key.kind == "names":
        return "a list of names"
    if key.kind == "policy":
        return "none | full | every_1, every_2, every_3 ... (every k-th decoder layer)"
    return key.allowed()


@dataclass
class Collector:
    file: str
    problems: list[Problem] = field(default_factory=list)

    def add(self, section, key, message, allowed=None, variant=None):
        self.problems.append(Problem(file=self.file, section=section, key=key, message=message, allowed=allowed,
                                     variant=variant))


@dataclass
class Parts:
    """The valid keys of one variant's sections, before they become settings (rules may change them)."""

    prec: dict = field(default_factory=dict)
    peft: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    dist: dict = field(default_factory=dict)
    inf: dict = field(default_factory=dict)
