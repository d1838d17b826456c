"""PEFT methods beyond LoRA/IA3/prompt/prefix tuning, and LoRA's options (DoRA, rsLoRA, modules_to_save,
target_parameters, several adapters): their trainable tensors, frozen adapter bytes and saved tensors per
adapted linear. memory.py and activations.py call these hooks; each returns the plain LoRA answer unchanged
where the option is off. Bytes throughout."""

from __future__ import annotations

from ..settings import Scenario


def analytic_gap(s: Scenario) -> str | None:
    """Why the analytic estimator cannot answer for this variant's PEFT settings (None: it can)."""
    m = s.peft
    if m.method in ("loha", "lokr", "vera", "oft"):
        return f"the analytic estimator does not model {m.method} yet"
    if m.use_dora or m.modules_to_save or m.target_parameters or m.num_adapters > 1:
        return "the analytic estimator does not model use_dora, modules_to_save, target_parameters or " \
               "num_adapters yet"
    return None


def trainable_tensors(m, a) -> tuple[int, ...] | None:
    """Element counts of every trainable tensor where this module models the method or option; None: the
    plain method (memory._trainable_tensors answers)."""
    return None


def frozen_adapter_bytes(s: Scenario) -> int:
    """Adapters resident but not trained (num_adapters - 1 of them)."""
    return 0


def linear_saves(s: Scenario, spec, saved: dict[str, int], in_key: str, T: int, act: int,
                 device: str) -> dict[str, int]:
    """Tensors one adapted linear saves for backward, given what the plain method saves (`saved`)."""
    return saved
