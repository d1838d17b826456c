"""Accuracy and speed benchmark: analytic and trace estimates against CPU measurements of real training.

    .venv/bin/python benchmarks/accuracy.py [--n 80] [--seed 0] [--no-run] [--speed-only] [--out benchmarks/results]

Generates scenarios from a seed (architectures shaped like llama MHA/GQA, mistral, qwen2, gpt2, opt; every
PEFT method, precision, checkpointing policy, attention and optimizer; from the 61st on, under bf16 or fp16
autocast), trains each for real on CPU with
the runner, and compares the analytic and trace estimates with the measured tensor-level peak, in total
and per category; lists published GPU figures beside the analytic CUDA estimate (published.py).
Writes accuracy.md (tables), accuracy.jsonl (runner records with both estimates) and
accuracy.html (the reporter) under --out. `--no-run` compares analytic against trace only (fast; the trace
equals the CPU measurement, tests/test_runner.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_TOKEN_PARAMS = 4e9  # tokens per step x parameters: keeps a real CPU run (steps + checks) to seconds on 2 cores


def _categories() -> tuple[str, ...]:
    from peftprof.results import CATEGORIES

    return tuple(c for c in CATEGORIES if c != "overhead")  # no CUDA terms on CPU


def _arch(rng: random.Random) -> tuple[str, str, int]:
    """(TOML model lines, family, parameter count estimate, layers)."""
    family = rng.choice(["llama", "llama-gqa", "mistral", "qwen2", "gpt2", "opt"])
    hidden = rng.choice([64, 128, 256, 384, 512, 768, 1024])
    head_dim = rng.choice([32, 64]) if hidden >= 128 else 32
    heads = hidden // head_dim
    layers = rng.randint(1, 8)
    vocab = rng.randint(1000, 50000)
    inter = rng.choice([2, 3, 4]) * hidden + rng.choice([0, 32, 64])
    params = layers * 12 * hidden * hidden + 2 * vocab * hidden
    if family == "gpt2":
        text = f'model_type = "gpt2"\nn_embd = {hidden}\nn_layer = {layers}\nn_head = {heads}\nvocab_size = {vocab}\n' \
               f'n_positions = 1024\n'
    elif family == "opt":
        text = (f'model_type = "opt"\nhidden_size = {hidden}\nnum_hidden_layers = {layers}\n'
                f'num_attention_heads = {heads}\nffn_dim = {4 * hidden}\nvocab_size = {vocab}\n'
                f'max_position_embeddings = 1024\n'
                f'do_layer_norm_before = {str(rng.random() < 0.7).lower()}\n')
    else:
        kv = heads if family == "llama" else max(1, heads // rng.choice([2, 4]) if heads % 4 == 0 else heads)
        model_type = "llama" if family.startswith("llama") else family
        tied = str(rng.random() < 0.3).lower()
        text = (f'model_type = "{model_type}"\nhidden_size = {hidden}\nnum_hidden_layers = {layers}\n'
                f'num_attention_heads = {heads}\nnum_key_value_heads = {kv}\nintermediate_size = {inter}\n'
                f'vocab_size = {vocab}\nmax_position_embeddings = 1024\ntie_word_embeddings = {tied}\n')
    return text, family, params, layers


N_PLAIN = 60  # the first 60 scenarios of a seed: no autocast (the benchmark before issue #13, unchanged)
AUTOCAST_WEIGHTS = ("fp32", "bf16", "nf4", "int8", "fp4")  # int4 (quanto) under autocast is not profiled here
AUTOCAST_METHODS = ("lora", "lora", "full", "ia3", "prompt_tuning", "prefix_tuning")


def generate(n: int, seed: int) -> list[tuple[str, str]]:
    """n (name, TOML text) scenarios that run on CPU, reproducible from the seed. The first N_PLAIN run without
    autocast (as before issue #13, so earlier results stay comparable); the rest run under bf16 or fp16 autocast
    (issue #13), drawn from their own random stream, cycling methods and precisions so that any 20 of them
    cover every method, precision, checkpointing policy and optimizer."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    while len(out) < min(n, N_PLAIN):
        made = _scenario(rng, len(out))
        if made:
            out.append(made)
    amp_rng = random.Random(seed + 1_000_003)
    while len(out) < min(n, N_PLAIN + N_AMP):
        made = _scenario(amp_rng, len(out), amp_index=len(out) - N_PLAIN)
        if made:
            out.append(made)
    fam_rng = random.Random(seed + 2_000_029)
    while len(out) < n:
        out.append(_family_scenario(fam_rng, len(out), len(out) - N_PLAIN - N_AMP))
    return out


N_AMP = 20  # scenarios 60-79: autocast (issue #13); from the 80th on, the families of issue #14
NEW_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")
FAMILY_METHODS = ("lora", "full", "ia3", "lora", "prompt_tuning", "prefix_tuning", "lora")
PHI3_TARGETS = '["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]'
QWEN2_MOE_TARGETS = '["q_proj", "v_proj", "gate_proj", "down_proj"]'
ATTENTION_TARGETS = '["q_proj", "k_proj", "v_proj", "o_proj"]'
FAMILY_WEIGHTS = ("fp32", "bf16", "nf4", "int8", "fp4", "bf16", "fp32", "nf4")


def _family_model(rng: random.Random, family: str) -> tuple[str, int]:
    """(TOML model lines, layers) of a tiny random config of one of issue #14's families."""
    hidden = rng.choice([64, 128, 192, 256])
    head_dim = rng.choice([16, 32, 48, 64])
    heads = rng.choice([2, 4])
    kv = rng.choice([1, heads // 2, heads]) or 1
    layers = rng.randint(1, 4)
    vocab = 32064 + rng.randint(0, 2000) if family == "phi3" else rng.randint(1000, 40000)
    inter = rng.choice([2, 3, 4]) * hidden + rng.choice([0, 32])
    lines = [f'model_type = "{family}"', f"hidden_size = {hidden}", f"num_hidden_layers = {layers}",
             f"num_attention_heads = {heads}", f"num_key_value_heads = {kv}", f"vocab_size = {vocab}",
             "max_position_embeddings = 2048", f"intermediate_size = {inter}"]
    if family != "phi3":  # phi3 derives head_dim from hidden / heads
        lines.append(f"head_dim = {head_dim}")
    if family in ("gemma2", "gemma3_text"):
        lines.append(f"sliding_window = {rng.choice([4096, 64])}")
        lines.append(f"tie_word_embeddings = {str(rng.random() < 0.7).lower()}")
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        experts = rng.choice([4, 8])
        key = "num_local_experts" if family == "mixtral" else "num_experts"
        lines += [f"{key} = {experts}", f"num_experts_per_tok = {rng.choice([1, 2])}",
                  f"output_router_logits = {str(rng.random() < 0.5).lower()}"]
        if family != "mixtral":
            lines.append(f"moe_intermediate_size = {rng.choice([32, 64, 96])}")
        if family == "qwen2_moe":
            lines.append(f"shared_expert_intermediate_size = {rng.choice([64, 128, 256])}")
    return "\n".join(lines) + "\n", layers


def _family_scenario(rng: random.Random, index: int, k: int) -> tuple[str, str]:
    """Issue #14: scenario k of the new families, cycling family, method and weights (every 7 cover each family;
    under bf16/fp16 autocast one in four). peft has no default targets for phi3 and the MoE families: LoRA and
    IA3 get explicit attention (and shared-expert) targets there; prompt/prefix tuning go to families with
    defaults."""
    family = NEW_FAMILIES[k % len(NEW_FAMILIES)]
    method = FAMILY_METHODS[(k // len(NEW_FAMILIES)) % len(FAMILY_METHODS)]
    weights = FAMILY_WEIGHTS[k % len(FAMILY_WEIGHTS)]
    if method.endswith("_tuning") and family in ("phi3", "qwen2_moe", "qwen3_moe"):
        method = "lora"
    if method == "full" and weights not in ("fp32", "bf16"):
        weights = "bf16"
    model, layers = _family_model(rng, family)
    policy = "none" if method == "prefix_tuning" else rng.choice(["none", "full", "every_2"])
    if policy == "every_2" and layers < 2:
        policy = "full"
    batch, seq = rng.choice([1, 2, 4]), rng.choice([32, 64, 128, 256])
    lines = [f"[model]\n{model}", "[precision]", f'weights = "{weights}"']
    if weights not in ("fp32", "bf16"):
        lines.append(f'compute_dtype = "{rng.choice(["fp32", "bf16"])}"')
    if weights in ("fp4", "nf4"):
        lines.append(f"double_quant = {str(rng.random() < 0.5).lower()}")
    if k % 4 == 3 and not (weights == "bf16" and method.endswith("_tuning")):
        lines.append(f'autocast = "{rng.choice(["bf16", "fp16"])}"')
    lines += ["[peft]", f'method = "{method}"']
    targets = {"phi3": PHI3_TARGETS, "qwen2_moe": QWEN2_MOE_TARGETS}.get(family, ATTENTION_TARGETS)
    if method == "lora":
        lines += [f"r = {rng.choice([4, 8, 16])}", f"dropout = {rng.choice([0.0, 0.05])}",
                  f"target_modules = {targets}"]
    if method == "ia3" and family in ("phi3", "mixtral", "qwen2_moe", "qwen3_moe"):
        lines.append(f"target_modules = {targets}")
    if method in ("prompt_tuning", "prefix_tuning"):
        lines.append("num_virtual_tokens = 10")
    attention = "eager" if family == "gemma2" else rng.choice(["sdpa", "eager"])
    lines += ["[training]", f"batch_size = {batch}", f"seq_len = {seq}",
              f'optimizer = "{rng.choice(["adamw", "adamw_8bit", "sgd"])}"',
              f'gradient_checkpointing = "{policy}"', f'attention = "{attention}"',
              "[run]", 'device = "cpu"', "steps = 1", "warmup_steps = 1"]
    name = f"acc{index:03d}-{family}-{method}-{weights}"
    return name, f'name = "{name}"\n' + "\n".join(lines) + "\n"


def _scenario(rng: random.Random, index: int, amp_index: int | None = None) -> tuple[str, str] | None:
    """One generated scenario (None: the draw does not fit the CPU budget; draw again). With `amp_index`, an
    autocast scenario: method and weights cycle (AUTOCAST_METHODS, AUTOCAST_WEIGHTS), the rest is drawn."""
    model, family, params, layers = _arch(rng)
    if amp_index is None:
        method = rng.choice(["lora", "lora", "ia3", "prompt_tuning", "prefix_tuning", "full"])
        weights = rng.choice(["fp32", "bf16"]) if method == "full" else rng.choice(
            ["fp32", "bf16", "int8", "int4", "fp4", "nf4"])
    else:
        method = AUTOCAST_METHODS[amp_index % len(AUTOCAST_METHODS)]
        weights = AUTOCAST_WEIGHTS[amp_index % len(AUTOCAST_WEIGHTS)]
        if method == "full" and weights not in ("fp32", "bf16"):
            weights = "fp32" if amp_index % 2 else "bf16"
    policy = "none" if method == "prefix_tuning" else rng.choice(["none", "full", "every_2"])
    if policy == "every_2" and layers < 2:
        policy = "full"
    batch, seq = rng.choice([1, 2, 4, 8]), rng.choice([16, 32, 64, 128, 256, 512, 1024])
    while batch * seq > 2048 or batch * seq * params > MAX_TOKEN_PARAMS:
        if batch > 1:
            batch //= 2
        else:
            seq //= 2
    if seq < 16:
        return None
    lines = [f"[model]\n{model}", "[precision]", f'weights = "{weights}"']
    if weights not in ("fp32", "bf16"):
        lines.append(f'compute_dtype = "{rng.choice(["fp32", "bf16"])}"')
    if weights in ("fp4", "nf4"):
        lines.append(f"double_quant = {str(rng.random() < 0.5).lower()}")
    if amp_index is not None:
        # bf16 weights with prompt/prefix tuning: autocast must match them (scenario.py _check_autocast)
        autocast = "bf16" if weights == "bf16" and method.endswith("_tuning") else rng.choice(["bf16", "bf16", "fp16"])
        lines.append(f'autocast = "{autocast}"')
    lines += ["[peft]", f'method = "{method}"']
    if method == "lora":
        lines += [f"r = {rng.choice([1, 2, 4, 8, 16, 32, 64, 128])}", f"alpha = {rng.choice([8, 16, 32])}",
                  f"dropout = {rng.choice([0.0, 0.0, 0.05, 0.1])}"]
        if rng.random() < 0.5:
            lines.append('target_modules = "all-linear"')
    if method in ("prompt_tuning", "prefix_tuning"):
        lines.append(f"num_virtual_tokens = {rng.choice([5, 10, 20])}")
        if method == "prompt_tuning" and seq + 20 > 1024:
            seq = 512
    lines += ["[training]", f"batch_size = {batch}", f"seq_len = {seq}",
              f'optimizer = "{rng.choice(["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd"])}"',
              f'gradient_checkpointing = "{policy}"', f'attention = "{rng.choice(["sdpa", "eager"])}"',
              "[run]", 'device = "cpu"', "steps = 1", "warmup_steps = 1"]
    amp = "" if amp_index is None else "-amp"
    name = f"acc{index:03d}-{family}-{method}-{weights}{amp}"
    return name, f'name = "{name}"\n' + "\n".join(lines) + "\n"


def load(name: str, text: str, tmp: Path):
    from peftprof.scenario import load_scenario

    path = tmp / f"{name}.toml"
    path.write_text(text)
    (s,) = load_scenario(path)
    return s


def rel(a: float, b: float) -> float:
    return (a - b) / b if b else 0.0


def summarise(values: list[float]) -> str:
    if not values:
        return "- | - | -"
    v = sorted(abs(x) for x in values)
    p90 = v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))]
    return f"{statistics.median(v) * 100:.2f}% | {p90 * 100:.2f}% | {v[-1] * 100:.2f}%"


def speed_figures() -> list[str]:
    """Analytic estimate of a 1,000-variant sweep; tracker overhead on a CPU training step."""
    import tempfile

    from peftprof.estimate import estimate
    from peftprof.scenario import load_scenario

    lines = []
    tmp = Path(tempfile.mkdtemp())
    (tmp / "sweep.toml").write_text('[model]\npreset = "llama-3-8b"\n[peft]\ntarget_modules = "all-linear"\n[sweep]\n'
                                    '"peft.r" = [1,2,4,8,16,32,64,128,256,512]\n'
                                    '"training.seq_len" = [128,256,512,1024,2048,3072,4096,5120,6144,8192]\n'
                                    '"training.batch_size" = [1,2,3,4,5,6,7,8,9,10]\n')
    t0 = time.perf_counter()
    variants = load_scenario(tmp / "sweep.toml")
    t1 = time.perf_counter()
    for v in variants:
        estimate(v, device="cuda")
    t2 = time.perf_counter()
    lines.append(f"- Analytic estimate of a {len(variants):,}-variant sweep: {t2 - t1:.3f} s "
                 f"(+ {t1 - t0:.3f} s to load and validate the sweep); target < 1 s.")
    lines += overhead_lines("cpu")
    lines.append("- The runner times untracked steps and tracks one extra step, so measured tokens/s carry no "
                 "tracker overhead; the overhead is the tracked step's extra wall time. Python dispatch costs a fixed "
                 "time per aten op, so the overhead shrinks as ops grow: it matters only for toy models.")
    lines.append("- CUDA overhead: not measured here (no GPU); `benchmarks/gpu_check.sh` measures it. On CUDA the "
                 "runner reads the caching allocator's counters (no per-op Python): one synchronize per phase "
                 "boundary and the NVML sampler thread.")
    return lines


def overhead_lines(device: str) -> list[str]:
    """Probe overhead against a step with no probe: benchmarks/overhead.py (also runnable alone)."""
    from overhead import overhead_lines as measure  # benchmarks/overhead.py

    return measure(device)


def tail_sections() -> list[str]:
    from published import section  # benchmarks/published.py

    return ["", "## Speed", ""] + speed_figures() + [""] + section()


def rewrite_speed(path: Path) -> int:
    from peftprof.results import write_atomic

    head = path.read_text().split("\n## Speed\n")[0]
    write_atomic(path, head + "\n".join(tail_sections()) + "\n")
    print(path.read_text().split("\n## Speed\n")[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-run", action="store_true", help="analytic against trace only")
    ap.add_argument("--start", type=int, default=0,
                    help="measure only the scenarios from this index on (80: the families of issue #14)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--rescore", action="store_true",
                    help="keep the measurements of --out's accuracy.jsonl (same --n and --seed) and re-compute only "
                         "the estimates: the runner's numbers do not depend on the estimator's code")
    ap.add_argument("--speed-only", action="store_true",
                    help="re-measure the speed and published sections of an existing accuracy.md, keep the rest")
    ap.add_argument("--overhead", choices=["cpu", "cuda"],
                    help="only the probe overhead, on this device (= benchmarks/overhead.py --device)")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    if args.speed_only:
        return rewrite_speed(Path(args.out) / "accuracy.md")
    if args.overhead:
        print("\n".join(overhead_lines(args.overhead)))
        return 0
    import tempfile

    import peft
    import torch
    import transformers

    from peftprof.estimate import estimate
    from peftprof.results import write_atomic, write_jsonl
    from peftprof.run.runner import run_variant
    from peftprof.trace import trace_peak

    out_dir = Path(args.out)
    tmp = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    rows, records = [], []
    stored = {}
    if args.rescore:
        import json

        with open(out_dir / "accuracy.jsonl") as f:
            stored = {r["variant"]: r for r in (json.loads(line) for line in f if line.strip())}
    for i, (name, text) in enumerate(generate(args.n, args.seed)):
        if i < args.start:
            continue
        s = load(name, text, tmp)
        analytic = estimate(s, device="cpu")
        traced = None if s.precision.weights == "int4" else trace_peak(s)
        if args.no_run:
            measured = traced
            rec = None
        elif args.rescore:
            rec = stored[name]
            rec["estimate"] = analytic
            measured = rec["measured"] if rec["status"] == "ok" else None
        else:
            rec = run_variant(s, device="cpu")
            measured = rec["measured"] if rec["status"] == "ok" else None
        row = {"variant": name, "family": s.model.arch.model_type, "method": s.peft.method, "weights": s.precision.weights,
               "autocast": s.precision.autocast, "status": rec["status"] if rec
               else "traced", "analytic": analytic["peak_bytes"], "measured": measured and measured["peak_bytes"],
               "trace": traced and traced["peak_bytes"]}
        if measured:
            row["analytic_err"] = rel(analytic["peak_bytes"], measured["peak_bytes"])
            row["trace_err"] = None if traced is None else rel(traced["peak_bytes"], measured["peak_bytes"])
            row["category_err"] = {
                c: (analytic["breakdown"][c] - measured["breakdown"].get(c, 0)) / measured["peak_bytes"]
                for c in _categories()}
        rows.append(row)
        if rec is not None:
            # the measured record has its own timeline; the allocator stream is input to the CUDA simulation
            rec["trace_estimate"] = None if traced is None else {
                k: v for k, v in traced.items() if k not in ("alloc_stream", "timeline", "at_peak")}
            records.append(rec)
        print(f"[{i + 1}/{args.n}] {name}: analytic {row.get('analytic_err', 0) * 100:+.2f}%"
              + ("" if row.get("trace_err") is None else f", trace {row['trace_err'] * 100:+.3f}%"), file=sys.stderr)
    elapsed = time.perf_counter() - started
    ok = [r for r in rows if "analytic_err" in r]
    reference = "the trace (equal to CPU measurements)" if args.no_run else "the CPU runner tensor-level peak"
    lines = [f"# Estimator accuracy ({datetime.now(timezone.utc):%Y-%m-%d})", "",
             f"`benchmarks/accuracy.py --n {args.n} --seed {args.seed}{' --no-run' if args.no_run else ''}"
             f"{f' --start {args.start}' if args.start else ''}`: "
             f"{len(rows)} generated scenarios, {len(ok)} measured, "
             + ("the measurements kept from accuracy.jsonl and the estimates re-computed (`--rescore`) "
                if args.rescore else "") + f"in {elapsed / 60:.1f} min on "
             f"{__import__('os').cpu_count()} cores. torch {torch.__version__}, "
             f"transformers {transformers.__version__}, peft {peft.__version__}. Reference: {reference}.",
             "", "Error = (estimate - measured) / measured. Category errors are relative to the measured peak.", "",
             "| | median | p90 | max |", "|---|---:|---:|---:|",
             f"| analytic peak | {summarise([r['analytic_err'] for r in ok])} |",
             f"| trace peak | {summarise([r['trace_err'] for r in ok if r.get('trace_err') is not None])} |"]
    for c in _categories():
        lines.append(f"| analytic {c} | {summarise([r['category_err'][c] for r in ok])} |")
    for key in ("family", "method", "weights", "autocast"):
        lines += ["", f"By {key} (analytic peak):", "", f"| {key} | n | median | p90 | max |",
                  "|---|---:|---:|---:|---:|"]
        for value in sorted({r[key] for r in ok}):
            errs = [r["analytic_err"] for r in ok if r[key] == value]
            lines.append(f"| {value} | {len(errs)} | {summarise(errs)} |")
    lines += ["", "Per scenario:", "", "| variant | status | measured MiB | analytic | trace |",
              "|---|---|---:|---:|---:|"]
    for r in rows:
        m = "-" if not r["measured"] else f"{r['measured'] / 2**20:.1f}"
        a = "-" if "analytic_err" not in r else f"{r['analytic_err'] * 100:+.2f}%"
        t = "-" if r.get("trace_err") is None else f"{r['trace_err'] * 100:+.3f}%"
        lines.append(f"| {r['variant']} | {r['status']} | {m} | {a} | {t} |")
    lines += tail_sections()
    write_atomic(out_dir / "accuracy.md", "\n".join(lines) + "\n")
    if records:
        write_jsonl(out_dir / "accuracy.jsonl", records)
        from peftprof.report import write_report

        write_report([out_dir / "accuracy.jsonl"], out_dir / "accuracy.html")
    print("\n".join(lines[:20 + 2 * len(_categories())]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
