import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A two-layer llama that trains in well under a second on CPU (shared by the runner and report tests).
TINY_MODEL = '''[model]
model_type = "llama"
hidden_size = 64
num_hidden_layers = 2
num_attention_heads = 4
intermediate_size = 160
vocab_size = 1000
[precision]
weights = "fp32"
'''
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture
def write_scenario(tmp_path):
    """Write a scenario file and return its path."""

    def write(text: str, name: str = "s.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def trace_marking_xlora_classifier(monkeypatch, s):
    """Trace `s` (an X-LoRA variant) and mark where its classifier is called in the tracked step, which ends
    X-LoRA's no-grad scaling pass: (trace_peak's result, the step's tracker, the tracker's event count at each
    classifier call)."""
    from peft.tuners.xlora.classifier import XLoraClassifier

    from peftprof.run import probe as probe_mod
    from peftprof.trace import trace_peak

    probes, marks = [], []
    tracking, forward = probe_mod.CpuProbe.tracking, XLoraClassifier.forward
    monkeypatch.setattr(probe_mod.CpuProbe, "tracking", lambda self, reg: (probes.append(self), tracking(self, reg))[1])

    def marked(self, *args, **kwargs):
        tracker = getattr(probes[-1], "tracker", None) if probes else None
        if tracker is not None:
            marks.append(len(tracker.events))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(XLoraClassifier, "forward", marked)
    out = trace_peak(s)
    return out, probes[-1].tracker, marks
