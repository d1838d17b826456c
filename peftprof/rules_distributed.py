"""[distributed]: keys and the rules between them and the rest of a variant (owned by the distributed work).

`check` sees the valid keys of every section of one variant as mutable dicts (problems in `c`; keys that do
not apply to this variant go to `cond` and are dropped)."""

from __future__ import annotations

from .schema import Collector, Key
from .settings import STRATEGIES

SCHEMA: dict[str, Key] = {
    "world_size": Key("int", 1, 65536),
    "strategy": Key("choice", choices=STRATEGIES),
    "cpu_offload": Key("bool"),
}


def check(c: Collector, cond: Collector, parts, model) -> None:
    """Rules of [distributed] against the other sections. `parts`: rules_peft.Parts."""
