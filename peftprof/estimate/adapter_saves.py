"""Analytic coverage of the PEFT methods and LoRA options other than plain LoRA and DoRA (LoHa, LoKr, VeRA, OFT,
modules_to_save, target_parameters, cat's combined adapter): why the analytic estimator cannot answer, and the
tensors one adapted linear saves for backward. peft_methods.py calls these hooks; each returns the plain answer
unchanged where the method or option is off. Bytes throughout.
"""

from __future__ import annotations

from ..settings import Scenario

TRACE_ONLY_METHODS = ("loha", "lokr", "vera", "oft")


def analytic_gap(s: Scenario) -> str | None:
    """Why the analytic estimator cannot answer for this variant's method or LoRA option (None: it can)."""
    m = s.peft
    if m.method == "lora" and m.combination == "cat":
        from .peft_methods import combined_rank  # (peft_methods.py imports this module)

        return (f"the analytic estimator does not model the saved tensors of cat's rank-{combined_rank(m)} combined "
                "adapter")
    if m.method in TRACE_ONLY_METHODS:
        return f"the analytic estimator does not model {m.method}'s saved tensors"
    if m.modules_to_save:
        return "the analytic estimator does not model modules_to_save (full trainable copies beside the adapter)"
    if m.target_parameters:
        return "the analytic estimator does not model target_parameters (LoRA on parameters)"
    return None


def linear_saves(s: Scenario, spec, saved: dict[str, int], in_key: str, T: int, act: int,
                 device: str) -> dict[str, int]:
    """Tensors one adapted linear saves for backward under this method, given what plain LoRA saves (`saved`);
    `saved` itself where the method is plain LoRA or DoRA (peft_methods.linear_saves adds DoRA's)."""
    return saved
