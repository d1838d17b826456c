"""Probe overhead: the same training step with no probe at all, with the runner's probe present but not
tracking (what the runner's timed steps carry), and tracked (the runner's one tracked step).

    .venv/bin/python benchmarks/overhead.py [--device cpu|cuda]

Runs the quickstart's first variant and a 1024-hidden fp32 llama (`mid`). The arms are interleaved round by
round (2 shared cores drift by +-20%) and compared as the median of per-round ratios. The no-probe arm
runs with no probe object alive (no sampler thread); a fresh probe is made for the other two arms of each
round and finished after them. Every step ends with a device synchronize, so times are whole.
CPU also times the step under an empty TorchDispatchMode: the floor any tensor-level tracker built on
torch's Python dispatch pays per aten op. Targets: tracked <= 15% on CPU, <= 3% on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {"cpu": 0.15, "cuda": 0.03}
MID = ('name = "mid"\n[model]\npreset = "tiny-llama"\nhidden_size = 1024\nnum_attention_heads = 16\n'
       'intermediate_size = 2752\n[precision]\nweights = "fp32"\n[training]\nbatch_size = 2\nseq_len = 512\n')


def paired(times: dict[str, list[float]], key: str) -> float:
    """Median over rounds of (arm / no-probe) - 1: robust to drift between rounds."""
    return statistics.median(b / a for a, b in zip(times["none"], times[key], strict=True)) - 1


def tracker_overhead(path, device: str = "cpu") -> list[str]:
    """Step time without a probe, with an idle probe and with a tracking probe, on a scenario's first variant."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from peftprof.run.build import build
    from peftprof.run.probe import NullProbe, make_probe
    from peftprof.run.step import registered_tensors, train_step
    from peftprof.scenario import load_scenario

    class EmptyMode(TorchDispatchMode):
        n_ops = 0

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False  # as MemoryTracker

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n_ops += 1
            return func(*args, **(kwargs or {}))

    s = load_scenario(path)[0]
    built = build(s, device)
    ids = torch.randint(0, s.model.arch.vocab_size, (s.training.batch_size, s.training.seq_len), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    built.model.train()

    def timed(probe, context) -> float:
        sync()
        t = time.perf_counter()
        with context:
            train_step(built, s, ids, probe, {})
        sync()
        return time.perf_counter() - t

    none = NullProbe()
    for _ in range(2):
        timed(none, contextlib.nullcontext())
    arms = ["none", "idle", "tracked"] + (["empty"] if device == "cpu" else [])
    times: dict[str, list[float]] = {a: [] for a in arms}
    n_ops = 0
    for _ in range(31 if s.model.arch.hidden_size < 512 else 7):
        times["none"].append(timed(none, contextlib.nullcontext()))
        if device == "cpu":
            mode = EmptyMode()
            times["empty"].append(timed(none, mode))
            n_ops = mode.n_ops
        probe = make_probe(device, vocab_size=s.model.arch.vocab_size)
        try:
            times["idle"].append(timed(probe, contextlib.nullcontext()))
            times["tracked"].append(timed(probe, probe.tracking(registered_tensors(built))))
        finally:
            extra = probe.finish()
    plain_s = statistics.median(times["none"])
    idle, tracked = paired(times, "idle"), paired(times, "tracked")
    target = TARGETS[device]
    verdict = "met" if tracked <= target else "missed"
    what = "Tracker" if device == "cpu" else "Allocator-probe"
    ops = f"{n_ops:,} aten ops/step, {plain_s / n_ops * 1e6:.0f} us per op; " if n_ops else ""
    line = (f"- {what} overhead on {device.upper()}, {s.name} ({ops}median of {len(times['none'])} interleaved "
            f"rounds): {plain_s * 1000:.1f} ms/step without a probe; {idle * 100:+.1f}% with the probe present "
            f"but idle (the runner's timed steps); {tracked * 100:+.1f}% tracked (target <= {target:.0%}: "
            f"{verdict}).")
    if device == "cpu":
        line += (f" The same step under an empty TorchDispatchMode, the floor of any tensor-level tracker built "
                 f"on torch's Python dispatch: {paired(times, 'empty') * 100:+.1f}%.")
    else:
        line += f" NVML: {extra.get('nvml_peak_bytes', extra.get('nvml_note'))}."
    return [line]


def overhead_lines(device: str) -> list[str]:
    """Probe overhead on the quickstart's first variant and on a 1024-hidden fp32 llama (`mid`)."""
    tmp = Path(tempfile.mkdtemp())
    (tmp / "mid.toml").write_text(MID)
    return tracker_overhead(ROOT / "scenarios" / "quickstart.toml", device) + tracker_overhead(tmp / "mid.toml", device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    print("\n".join(overhead_lines(args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
