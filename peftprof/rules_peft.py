"""[peft]: the keys each PEFT method takes and the rules between them and the rest of a variant (owned by the
PEFT-methods work).

`check` sees the valid keys of every section of one variant as mutable dicts (problems in `c`; keys that do
not apply to this variant go to `cond` and are dropped)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .schema import Collector, Key
from .settings import METHODS

SCHEMA: dict[str, Key] = {
    "method": Key("choice", choices=METHODS),
    "r": Key("int", 1, 65536),
    "alpha": Key("float", 0, 1e6, lo_open=True),
    "dropout": Key("float", 0, 1, hi_open=True),
    "target_modules": Key("targets"),
    "num_virtual_tokens": Key("int", 1, 65536),
    "use_dora": Key("bool"),
    "use_rslora": Key("bool"),
    "modules_to_save": Key("names"),
    "target_parameters": Key("names"),
    "num_adapters": Key("int", 1, 1024),
}
# which PEFT keys apply to which method (a key set for another method is "not applicable")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora", "modules_to_save",
             "target_parameters", "num_adapters")
PEFT_KEYS_BY_METHOD = {
    "full": (), "lora": LORA_KEYS, "ia3": ("target_modules",),
    "prompt_tuning": ("num_virtual_tokens",), "prefix_tuning": ("num_virtual_tokens",),
    "loha": ("r", "alpha", "dropout", "target_modules"), "lokr": ("r", "alpha", "dropout", "target_modules"),
    "vera": ("r", "dropout", "target_modules"), "oft": ("r", "dropout", "target_modules"),
}


@dataclass
class Parts:
    """The valid keys of one variant's sections, before they become settings (rules may change them)."""

    prec: dict = field(default_factory=dict)
    peft: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    dist: dict = field(default_factory=dict)
    inf: dict = field(default_factory=dict)


def check(c: Collector, cond: Collector, parts: Parts, model) -> None:
    """Rules of the newer [peft] keys against the other sections."""
