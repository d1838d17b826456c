"""Fuzz the analytic estimator against the fake-tensor trace (which equals the CPU runner to the byte): random
tiny scenarios over families, methods, LoRA options, precisions, autocast, checkpointing, optimizers and target sets,
each answered by both estimators. The rule it checks: the analytic estimator answers within 5% of the trace or
refuses (AnalyticUnsupported: the CLI then answers from the trace); a traceback is a defect.

    .venv/bin/python benchmarks/fuzz_analytic.py [--seed 1] [--n 600] [--out benchmarks/results]

Writes fuzz_analytic.md (error by method, family, weights, options; the worst cases with their TOML) under --out.
Tiny vocabularies (100-2000) and 1-3 layers make layer-level terms count more than in the 150 scenarios of
accuracy.py, whose generator is narrower: this is where the analytic model's gaps show. About 1 s per scenario.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAMILIES = ["llama", "llama-gqa", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "opt"]
METHODS = ["lora"] * 4 + ["loha", "lokr", "vera", "oft", "xlora", "xlora", "ia3", "prompt_tuning", "prefix_tuning",
                          "full"]
TARGETS = {
    "default": {"qv": ["q_proj", "v_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"], "o": ["o_proj"]},
    "phi3": {"qv": ["qkv_proj"], "mlp": ["gate_up_proj", "down_proj"], "o": ["o_proj"]},
    "gpt2": {"qv": ["c_attn"], "mlp": ["c_fc"], "o": ["attn.c_proj"]},
    "opt": {"qv": ["q_proj", "v_proj"], "mlp": ["fc1", "fc2"], "o": ["out_proj"]},
}
SAVES = {"gpt2": [["lm_head"], ["wte", "lm_head"], ["wte"], ["ln_f"]],
         "default": [["lm_head"], ["embed_tokens", "lm_head"]]}


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def gen(rng: random.Random, i: int) -> tuple[str, str, dict]:
    """One random scenario: (name, TOML text, tags for the summary)."""
    fam = rng.choice(FAMILIES)
    mt = "llama" if fam.startswith("llama") else fam
    hidden = rng.choice([64, 96, 128, 160, 192])
    heads = hidden // 32
    layers = rng.randint(1, 3)
    vocab = rng.choice([100, 256, 500, 1000, 2000]) if fam != "phi3" else 32064  # Phi3Config pad_token_id 32000
    inter = rng.choice([2, 3, 4]) * hidden
    if mt == "gpt2":
        model = {"n_embd": hidden, "n_layer": layers, "n_head": heads, "vocab_size": vocab}
        if rng.random() < 0.3:
            model["n_inner"] = inter
    elif mt == "opt":
        model = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "ffn_dim": inter,
                 "vocab_size": vocab}
    else:
        kv = heads
        if fam == "llama-gqa" or (fam != "llama" and rng.random() < 0.5):
            divs = [d for d in range(1, heads) if heads % d == 0]
            kv = rng.choice(divs) if divs else heads
        model = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                 "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab, "head_dim": 32}
        if rng.random() < 0.3:
            model["tie_word_embeddings"] = rng.choice([True, False])
    model = {"model_type": mt, **model}
    method = rng.choice(METHODS)
    weights = rng.choice(["fp32", "bf16", "fp16", "nf4", "int8"])
    autocast = rng.choice(["none", "none", "bf16", "fp16"])
    ckpt = rng.choice(["none", "none", "full", "every_2"])
    opt = rng.choice(["adamw", "adamw", "adamw_8bit", "sgd"])
    tg = TARGETS.get(mt, TARGETS["default"])
    tchoice = rng.choice(["qv", "all", "mlp", "o", "none"])
    targets = "all-linear" if tchoice == "all" else tg.get(tchoice)
    peft = {"method": method}
    opts = []
    if method in ("lora", "xlora", "loha", "lokr", "vera", "oft"):
        peft["r"] = rng.choice([2, 4, 8]) if method == "oft" else rng.choice([4, 8, 16])
        if targets is not None:
            peft["target_modules"] = targets
    if method in ("lora", "xlora", "vera"):
        peft["dropout"] = rng.choice([0.0, 0.1])
    if method == "lora":
        if rng.random() < 0.35:
            peft["use_dora"] = True
        if rng.random() < 0.25:
            peft["use_rslora"] = True
        roll = rng.random()
        if roll < 0.25:
            peft["modules_to_save"] = rng.choice(SAVES.get(mt, SAVES["default"]))
        elif roll < 0.5:
            peft["num_adapters"] = rng.choice([2, 3])
            if rng.random() < 0.6:
                peft["combination"] = rng.choice(["linear", "cat", "svd"])
    if method in ("loha", "lokr", "vera", "oft") and rng.random() < 0.25:
        peft["modules_to_save"] = rng.choice(SAVES.get(mt, SAVES["default"]))
    if method == "xlora":
        peft["num_adapters"] = rng.choice([2, 3])
        peft["xlora_depth"] = rng.choice([1, 2])
        if peft["xlora_depth"] == 2:
            peft["xlora_size"] = rng.choice([32, 64])
        peft["layerwise_scalings"] = rng.random() < 0.4
        if rng.random() < 0.25:
            peft["use_rslora"] = True
    if method == "ia3" and targets is not None and rng.random() < 0.3:
        peft["target_modules"] = targets
    if method in ("prompt_tuning", "prefix_tuning"):
        peft["num_virtual_tokens"] = rng.choice([4, 8, 20])
    for k in ("use_dora", "use_rslora", "modules_to_save", "combination", "layerwise_scalings"):
        if peft.get(k):
            opts.append(k if k != "combination" else f"comb={peft[k]}")
    if peft.get("num_adapters", 1) > 1:
        opts.append(f"K={peft['num_adapters']}")
    if peft.get("dropout"):
        opts.append("dropout")
    prec = {"weights": weights}
    if autocast != "none":
        prec["autocast"] = autocast
    training = {"batch_size": rng.choice([1, 2]), "seq_len": rng.choice([16, 32, 64]), "optimizer": opt}
    if ckpt != "none":
        training["gradient_checkpointing"] = ckpt
    name = f"f{i:04d}"
    secs = {"model": model, "precision": prec, "peft": peft, "training": training,
            "run": {"steps": 1, "warmup_steps": 1}}
    text = f'name = "{name}"\n' + "".join(
        f"[{s}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in d.items()) for s, d in secs.items())
    tags = {"family": fam, "method": method, "weights": weights, "autocast": autocast, "ckpt": ckpt, "opt": opt,
            "targets": tchoice, "opts": opts}
    return name, text, tags


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def run_one(name: str, text: str, tmp: Path) -> dict:
    """Load one generated scenario and answer it with both estimators; the record says what happened."""
    from peftprof.errors import UserError
    from peftprof.estimate import AnalyticUnsupported, estimate
    from peftprof.scenario import load_scenario
    from peftprof.trace import trace_peak

    rec: dict = {}
    path = tmp / f"{name}.toml"
    path.write_text(text)
    try:
        s = load_scenario(path)[0]
    except UserError as e:
        return {"status": "loader", "why": str(e)[:300]}
    except Exception:  # noqa: BLE001  a loader traceback is a defect: recorded
        return {"status": "crash", "tb": traceback.format_exc()[-1500:]}
    rec["status"] = "ok"
    try:
        e = estimate(s, device="cpu")
        rec["est"], rec["est_bd"] = e["peak_bytes"], e["breakdown"]
    except AnalyticUnsupported as ex:
        rec["refused"] = str(ex).split(": ", 1)[-1][:200]
    except Exception:  # noqa: BLE001
        rec["status"], rec["tb"] = "crash", traceback.format_exc()[-1500:]
    try:
        signal.alarm(120)
        t = trace_peak(s)
        rec["trace"], rec["trace_bd"] = t["peak_bytes"], t.get("breakdown")
    except UserError as ex:
        rec["trace_refused"] = str(ex)[:200]
    except _Timeout:
        rec["trace_timeout"] = True
    except Exception:  # noqa: BLE001
        rec["status"], rec["tb"] = "crash", traceback.format_exc()[-1500:]
    finally:
        signal.alarm(0)
    return rec


def _quantile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def _row(label, recs):
    errs = [abs(r["err"]) * 100 for r in recs]
    return (f"| {label} | {len(errs)} | {statistics.median(errs):.2f}% | {_quantile(errs, 0.9):.2f}% | "
            f"{max(errs):.2f}% | {sum(e > 5 for e in errs)} |")


def summary(recs: list[dict], args, elapsed: float) -> list[str]:
    ok = [r for r in recs if r["status"] == "ok"]
    both = [r for r in ok if "est" in r and "trace" in r]
    for r in both:
        r["err"] = (r["est"] - r["trace"]) / r["trace"]
    crashes = [r for r in recs if r["status"] == "crash"]
    negative = [(r["name"], k, v) for r in both for k, v in r["est_bd"].items() if v < 0]
    lines = ["# Analytic estimator fuzzed against the trace", "",
             f"`benchmarks/fuzz_analytic.py --seed {args.seed} --n {args.n}`: {len(recs)} generated, "
             f"{len(recs) - len(ok) - len(crashes)} refused by the loader, {len(ok)} loaded: {len(both)} answered by "
             f"both estimators, {sum('refused' in r for r in ok)} refused by the analytic estimator (the trace "
             f"answers), {len(crashes)} tracebacks, {len(negative)} negative categories; {elapsed / 60:.1f} min.", "",
             "Error = |analytic - trace| / trace (the trace equals the CPU runner).", "",
             "| slice | n | median | p90 | max | over 5% |", "|---|---:|---:|---:|---:|---:|"]
    if both:
        lines.append(_row("all", both))
        for key in ("method", "family", "weights", "autocast", "ckpt", "targets"):
            for value in sorted({r[key] for r in both}):
                lines.append(_row(f"{key} = {value}", [r for r in both if r[key] == value]))
        for opt in sorted({o for r in both for o in r["opts"]}):
            lines.append(_row(f"option {opt}", [r for r in both if opt in r["opts"]]))
    lines += ["", "Why the analytic estimator refused (most common):", ""]
    for why, n in Counter(r["refused"] for r in ok if "refused" in r).most_common(12):
        lines.append(f"- {n} x {why}")
    if crashes:
        lines += ["", "Tracebacks (defects):", ""] + [f"- {r['name']}: `{r['tb'].strip().splitlines()[-1][:200]}`"
                                                      for r in crashes[:20]]
    if negative:
        lines += ["", "Negative categories (defects): " + ", ".join(f"{n} {k} {v:,}" for n, k, v in negative)]
    lines += ["", "Worst 10 (TOML below each):", ""]
    for r in sorted(both, key=lambda r: -abs(r["err"]))[:10]:
        diff = {k: r["est_bd"].get(k, 0) - (r["trace_bd"] or {}).get(k, 0)
                for k in set(r["est_bd"]) | set(r["trace_bd"] or {})}
        lines += [f"**{r['name']}** {r['err'] * 100:+.2f}% (analytic - trace by category: "
                  f"{ {k: v for k, v in sorted(diff.items()) if v} })", "", "```toml", r["toml"].rstrip(), "```", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    from peftprof.results import write_atomic

    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="peftprof-fuzz-"))
    started = time.perf_counter()
    recs = []
    for i in range(args.n):
        name, text, tags = gen(rng, args.seed * 10000 + i)
        rec = {"name": name, "toml": text, **tags, **run_one(name, text, tmp)}
        recs.append(rec)
        if "est" in rec and "trace" in rec:
            print(f"[{i + 1}/{args.n}] {name}: {(rec['est'] - rec['trace']) / rec['trace'] * 100:+.2f}%", file=sys.stderr)
    lines = summary(recs, args, time.perf_counter() - started)
    write_atomic(Path(args.out) / "fuzz_analytic.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
