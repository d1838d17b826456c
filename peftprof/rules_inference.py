"""[inference]: keys and the rules between them and the rest of a variant (owned by the inference work).

`check` sees the valid keys of every section of one variant as mutable dicts (problems in `c`; keys that do
not apply to this variant go to `cond` and are dropped)."""

from __future__ import annotations

from .schema import Collector, Key

SCHEMA: dict[str, Key] = {
    "enabled": Key("bool"),
    "merged": Key("bool"),
    "max_new_tokens": Key("int", 0, 1_000_000),
    "max_memory": Key("str", text="accelerate's size string, e.g. \"2GiB\" or \"512MB\" (\"\": no offloading)"),
}


def check(c: Collector, cond: Collector, parts, model) -> None:
    """Rules of [inference] against the other sections. `parts`: rules_peft.Parts."""
