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
