"""The generic path (peftprof/families/generic.py) against real training: for model types outside the registry,
the trace estimate against the runner's CPU measurement of the same variant, and the Arch's parameter count
against transformers' own.

    .venv/bin/python benchmarks/generic_accuracy.py [--out benchmarks/results]

Tiny random configs (hidden 64, 2 layers) of dense, MoE, hybrid and recurrent causal LMs, each with a PEFT
setup (LoRA on peft's default or on all-linear, IA3, full fine-tuning, checkpointing, NF4). Writes
generic_accuracy.md under --out. About 70 s of CPU time (2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
CASES = [  # (model_type, config keys, scenario sections)
    ("falcon", dict(BASE, new_decoder_architecture=True, num_kv_heads=2), '[training]\ngradient_checkpointing = "full"'),
    ("falcon", dict(BASE), '[precision]\nweights = "nf4"\ndouble_quant = true'),
    ("gpt_neox", dict(BASE, intermediate_size=96), '[peft]\ntarget_modules = "all-linear"'),
    ("starcoder2", dict(BASE, num_key_value_heads=2, intermediate_size=96, bos_token_id=0, eos_token_id=0),
     '[peft]\ntarget_modules = ["q_proj", "c_fc"]\n[training]\ngradient_checkpointing = "every_2"'),
    ("olmo2", dict(BASE, num_key_value_heads=2, intermediate_size=96, pad_token_id=1, eos_token_id=0),
     '[peft]\nmethod = "ia3"\ntarget_modules = ["k_proj", "down_proj"]'),
    ("olmo2", dict(BASE, num_key_value_heads=2, intermediate_size=96, pad_token_id=1, eos_token_id=0),
     '[precision]\nweights = "nf4"\n[peft]\ntarget_modules = "all-linear"'),
    ("stablelm", dict(BASE, num_key_value_heads=2, intermediate_size=96), ""),
    ("cohere", dict(BASE, intermediate_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2),
     '[peft]\ntarget_modules = "all-linear"'),
    ("granite", dict(BASE, intermediate_size=96), '[peft]\nmethod = "full"'),
    ("smollm3", dict(BASE, num_key_value_heads=2, intermediate_size=96, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2), '[peft]\ntarget_modules = "all-linear"'),
    ("bloom", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=300), ""),
    ("gptj", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300, rotary_dim=8), ""),
    ("gpt_bigcode", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300), ""),
    ("phi", dict(BASE, intermediate_size=96), '[peft]\nmethod = "prompt_tuning"'),
    ("olmoe", dict(BASE, intermediate_size=48, num_experts=4, num_experts_per_tok=2, pad_token_id=1, eos_token_id=0),
     '[peft]\ntarget_modules = ["q_proj", "v_proj"]'),
    ("granitemoe", dict(BASE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
     '[peft]\ntarget_modules = ["q_proj", "v_proj"]'),
    ("mamba", dict(hidden_size=64, num_hidden_layers=2, vocab_size=300), '[peft]\ntarget_modules = ["in_proj"]'),
]


def scenario_text(model_type: str, keys: dict, rest: str) -> str:
    text = "[model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in {"model_type": model_type, **keys}.items())
    rest = rest + "\n" if rest else ""
    if "[precision]" not in rest:
        rest += '[precision]\nweights = "fp32"\n'
    if "[training]" in rest:
        rest = rest.replace("[training]\n", "[training]\nbatch_size = 2\nseq_len = 48\n")
    else:
        rest += "[training]\nbatch_size = 2\nseq_len = 48\n"
    return text + rest + "[run]\ndevice = \"cpu\"\nsteps = 1\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from peftprof import trace as trace_mod
    from peftprof.run.runner import run_variant
    from peftprof.scenario import load_scenario

    tmp = Path(tempfile.mkdtemp())
    trace_mod.CACHE_DIR = tmp / "cache"
    rows, worst = [], 0.0
    t0 = time.time()
    for i, (model_type, keys, rest) in enumerate(CASES):
        path = tmp / f"{i}-{model_type}.toml"
        path.write_text(scenario_text(model_type, keys, rest))
        (s,) = load_scenario(path)
        with torch.device("meta"):
            real = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**keys)).num_parameters()
        rec = run_variant(s, device="cpu", steps=1)
        setup = " ".join(line for line in rest.splitlines() if not line.startswith("[")) or "LoRA, peft's default"
        if rec["status"] != "ok":
            rows.append(f"| {model_type} | {setup} | {rec['status']}: {rec.get('error', {}).get('message', '')[:80]} "
                        "| | | | |")
            continue
        est, meas = rec["estimate"]["peak_bytes"], rec["measured"]["peak_bytes"]
        err = (est - meas) / meas * 100
        worst = max(worst, abs(err))
        rows.append(f"| {model_type} | {setup.replace('|', '/')} | {s.model.arch.n_params:,} | "
                    f"{'=' if s.model.arch.n_params == real else real} | {meas:,} | {est:,} | {err:+.3f}% |")
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    (out / "generic_accuracy.md").write_text(
        "# Generic path: trace against the runner\n\n"
        f"`benchmarks/generic_accuracy.py`, {datetime.now(timezone.utc):%Y-%m-%d}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}; {len(CASES)} variants in {time.time() - t0:.0f} s.\n"
        "Tiny random configs (hidden 64, 2 layers), batch 2 x 48, CPU. `params`: the Arch read off the module "
        "tree; `=`: equal to transformers' num_parameters().\n\n"
        "| model_type | setup | params | vs transformers | measured B | trace B | trace error |\n"
        "|---|---|---:|---|---:|---:|---:|\n" + "\n".join(rows) + f"\n\nLargest |trace error|: {worst:.3f}%.\n")
    print(f"wrote {out / 'generic_accuracy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
