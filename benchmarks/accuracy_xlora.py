"""Accuracy of the analytic X-LoRA model (peftprof/estimate/xlora.py) against the trace, which equals the CPU
runner to the byte for X-LoRA (tests/test_xlora.py).

    .venv/bin/python benchmarks/accuracy_xlora.py [--seed 0] [--n 24] [--out benchmarks/results]

Random tiny variants: llama (hidden 64, MHA/GQA, MLP 160 or 256) and gpt2 (hidden 64), fp32/bf16/fp16, K 2-4,
classifier depth 1-3 (width 16 or 128), layerwise gates on/off, dropout 0/0.1, q/v (peft's default) or all-linear,
batch 1-3, seq 16-64, 1-3 layers, vocab 500 (logits dominate) or 32 (activations and the experts' moments dominate).
Writes accuracy_xlora.md under --out: per variant the relative peak error, both peak phases and the per-category
differences (analytic - trace, bytes).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def variant_text(rng: random.Random) -> str:
    model, vocab = rng.choice(["llama", "llama", "llama", "gpt2"]), rng.choice([500, 32])
    layers = rng.choice([1, 2, 3])
    if model == "llama":
        arch = (f'model_type = "llama"\nhidden_size = 64\nnum_hidden_layers = {layers}\nnum_attention_heads = 4\n'
                f'num_key_value_heads = {rng.choice([4, 2])}\nintermediate_size = {rng.choice([160, 256])}\n'
                f'vocab_size = {vocab}\n')
    else:
        arch = f'model_type = "gpt2"\nn_embd = 64\nn_layer = {layers}\nn_head = 4\nvocab_size = {vocab}\nn_positions = 256\n'
    depth = rng.choice([1, 2, 3])
    peft = (f'method = "xlora"\nr = 4\nnum_adapters = {rng.choice([2, 3, 4])}\nxlora_depth = {depth}\n'
            + (f'xlora_size = {rng.choice([16, 128])}\n' if depth > 1 else '')
            + ('layerwise_scalings = true\n' if rng.random() < 0.5 else '')
            + ('dropout = 0.1\n' if rng.random() < 0.5 else '')
            + ('target_modules = "all-linear"\n' if rng.random() < 0.5 else ''))
    text = (f'[model]\n{arch}[precision]\nweights = "{rng.choice(["fp32", "bf16", "fp16"])}"\n[peft]\n{peft}'
            f'[training]\nbatch_size = {rng.choice([1, 2, 3])}\nseq_len = {rng.choice([16, 32, 64])}\n'
            '[run]\ndevice = "cpu"\nsteps = 1\nwarmup_steps = 1\n')
    return text


def main() -> None:
    from peftprof.estimate import estimate
    from peftprof.scenario import load_scenario
    from peftprof.trace import trace_peak

    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows, errs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            text = variant_text(rng)
            path = Path(tmp) / f"v{i}.toml"
            path.write_text(text)
            (s,) = load_scenario(path)
            traced, out = trace_peak(s), estimate(s, device="cpu")
            err = (out["peak_bytes"] - traced["peak_bytes"]) / traced["peak_bytes"]
            errs.append(abs(err))
            diff = {c: v - traced["breakdown"].get(c, 0) for c, v in out["breakdown"].items()
                    if v != traced["breakdown"].get(c, 0)}
            desc = text.split("[training]")[0].replace("\n", "; ").replace("[model]; ", "")
            rows.append(f"| {err * 100:+.2f}% | {traced['peak_phase']} / {out['peak_phase']} | {desc} "
                        f"{text.split('[training]')[1].split('[run]')[0].strip().replace(chr(10), '; ')} | {diff} |")
            print(rows[-1], flush=True)
    summary = f"{args.n} variants (seed {args.seed}): |error| median {statistics.median(errs) * 100:.2f}%, " \
              f"max {max(errs) * 100:.2f}%"
    print(summary)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "accuracy_xlora.md").write_text(
        "# X-LoRA: analytic against the trace (= the CPU runner)\n\n"
        "`.venv/bin/python benchmarks/accuracy_xlora.py` (benchmarks/accuracy_xlora.py).\n\n" + summary + "\n\n"
        "| peak error | phase trace / analytic | variant | differences (analytic - trace, B) |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
