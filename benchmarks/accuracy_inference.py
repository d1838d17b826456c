"""Serving accuracy: the analytic and trace estimates of `[inference]` requests against the CPU runner.

    .venv/bin/python benchmarks/accuracy_inference.py [--n 24] [--offload 4] [--seed 0] [--out benchmarks/results]

Generates tiny serving scenarios from a seed: llama shapes with MHA, GQA and MQA, mistral with a sliding window,
qwen2; fp32 and bf16 (and nf4/int8 for the trace, which the analytic estimate leaves to it); LoRA on attention,
MLP or all linears, merged or unmerged, one or three resident adapters, IA3 (merged or not), prompt tuning, the
bare base (full); a forward without
cache or greedy generation of 4-24 tokens. Then --offload tiny float llama/mistral/qwen2 models served with
accelerate's offloading (`[inference] max_memory`) at three caps each: everything kept, about half the layers on
disk, everything on disk. Each is served for real by `peftprof run`'s runner (run/infer.py) and compared with
both estimates: peak, KV cache, and for offloading the bytes on disk and read from disk. Writes
accuracy_inference.md under --out (accuracy_inference_offload.md with --n 0: the offloaded cases alone, ~4 min).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _scenario(rng: random.Random, i: int) -> str:
    family = rng.choice(["llama-mha", "llama-gqa", "llama-mqa", "mistral", "qwen2"])
    hidden = rng.choice([64, 128, 192, 256])
    heads = rng.choice([2, 4, 8])
    kv = {"llama-mha": heads, "llama-gqa": max(1, heads // 2), "llama-mqa": 1}.get(family, rng.choice([1, heads]))
    lines = [f'name = "serve-{i}"', "[model]", f'model_type = "{family.split("-")[0]}"', f"hidden_size = {hidden}",
             f"num_hidden_layers = {rng.choice([1, 2, 3])}", f"num_attention_heads = {heads}",
             f"num_key_value_heads = {kv}", f"intermediate_size = {rng.choice([2, 3, 4]) * hidden}",
             f"vocab_size = {rng.choice([500, 1000, 4000])}"]
    if family == "mistral":
        lines.append(f"sliding_window = {rng.choice([8, 16, 64])}")
    weights = rng.choice(["fp32", "fp32", "bf16", "bf16", "nf4", "int8"])
    lines += ["[precision]", f'weights = "{weights}"']
    if weights in ("nf4", "int8"):
        lines.append('compute_dtype = "bf16"')
    method = rng.choice(["lora", "lora", "lora", "full", "ia3", "prompt_tuning"])
    if method in ("full", "ia3") and weights in ("nf4", "int8"):  # the loader refuses these (docs/inference.md)
        method = "lora"
    lines += ["[peft]", f'method = "{method}"']
    merged = method == "ia3" and weights in ("fp32", "bf16") and rng.random() < 0.5
    if method == "prompt_tuning":
        lines.append(f"num_virtual_tokens = {rng.choice([4, 8])}")
    if method == "lora":
        targets = rng.choice(['["q_proj", "v_proj"]', '["up_proj", "down_proj"]', '"all-linear"'])
        adapters = rng.choice([1, 1, 3])
        lines += [f"r = {rng.choice([4, 8, 16])}", f"target_modules = {targets}"]
        if adapters > 1:
            lines.append(f"num_adapters = {adapters}")
        merged = adapters == 1 and rng.random() < 0.4
    new = rng.choice([0, 4, 12, 24])
    lines += ["[training]", f"batch_size = {rng.choice([1, 2, 3])}", f"seq_len = {rng.choice([16, 32, 48, 96])}",
              "[inference]", "enabled = true", f"max_new_tokens = {new}", f"merged = {str(merged).lower()}",
              "[run]", 'device = "cpu"', "steps = 1", "warmup_steps = 0"]
    return "\n".join(lines) + "\n"


def _offload_scenarios(rng: random.Random, i: int) -> list[str]:
    """One tiny float llama/mistral/qwen2 served with accelerate's offloading at three caps: one that keeps
    everything, one that keeps the embedding and about half the decoder layers (the cap less accelerate's reserve
    for the largest layer), one below a layer (everything on disk). Sizes from estimate/offload.py's tree."""
    from peftprof.estimate.offload import served_tree
    from peftprof.scenario import load_scenario

    family = rng.choice(["llama", "mistral", "qwen2"])
    hidden, layers = rng.choice([64, 128]), rng.choice([2, 3, 4])
    lines = [f'name = "offload-{i}"', "[model]", f'model_type = "{family}"', f"hidden_size = {hidden}",
             f"num_hidden_layers = {layers}", "num_attention_heads = 4", f"num_key_value_heads = {rng.choice([1, 2, 4])}",
             f"intermediate_size = {rng.choice([2, 3]) * hidden}", f"vocab_size = {rng.choice([500, 1000, 3000])}"]
    if family == "mistral":
        lines.append("sliding_window = 16")
    if rng.random() < 0.3:
        lines.append("tie_word_embeddings = true")
    lines += ["[precision]", f'weights = "{rng.choice(["fp32", "bf16"])}"']
    if rng.random() < 0.7:
        lines += ["[peft]", 'method = "lora"', "r = 8", 'target_modules = ["q_proj", "v_proj", "down_proj"]']
    else:
        lines += ["[peft]", 'method = "full"']
    lines += ["[training]", f"batch_size = {rng.choice([1, 2])}", f"seq_len = {rng.choice([16, 32])}",
              "[inference]", "enabled = true", f"max_new_tokens = {rng.choice([0, 4, 8])}", 'max_memory = "CAP"',
              "[run]", 'device = "cpu"', "steps = 1", "warmup_steps = 0"]
    text = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.toml"
        path.write_text(text.replace("CAP", "1GB"))
        s = load_scenario(path)[0]
    root, _ = served_tree(s)
    nodes = {}
    todo = [root]
    while todo:
        n = todo.pop()
        nodes[n.name.rsplit(".", 1)[-1] if "layers." not in n.name else "layer"] = n.size
        todo += list(n.children or ())
    layer, embed = nodes["layer"], nodes["embed_tokens"]
    half = embed + (layers // 2) * layer + max(layer, embed, nodes["lm_head"]) + 1000
    caps = [f"{root.size * 2 // 1000 + 1}KB", f"{half // 1000 + 1}KB", f"{max(1, min(layer, embed) // 2000)}KB"]
    return [text.replace('name = "offload-', f'name = "offload-{k}-').replace("CAP", cap)
            for k, cap in zip(("all", "half", "none"), caps, strict=True)]


def rel(a: float, b: float) -> float:
    return (a - b) / b


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offload", type=int, default=4, help="offloaded models, each at three max_memory caps")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    from peftprof.estimate import AnalyticUnsupported, estimate
    from peftprof.estimate.inference import inference_fields
    from peftprof.run.runner import run_variant
    from peftprof.scenario import load_scenario
    from peftprof.trace import trace_peak

    rng = random.Random(args.seed)
    rows, analytic_errs, trace_errs = [], [], []
    t_start = time.time()
    texts = [_scenario(rng, i) for i in range(args.n)]
    texts += [t for i in range(args.offload) for t in _offload_scenarios(rng, i)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts):
            path = Path(tmp) / f"serve-{i}.toml"
            path.write_text(text)
            s = load_scenario(path)[0]
            rec = run_variant(s, device="cpu")
            if rec["status"] != "ok":
                rows.append(f"| {i} | {_describe(s)} | {rec['status']}: {rec['error']['message'][:80]} | | | | | |")
                continue
            m = rec["measured"]
            try:
                a = estimate(s, device="cpu")
            except AnalyticUnsupported:
                a = None
            t = trace_peak(s)
            ea = None if a is None else rel(a["peak_bytes"], m["peak_bytes"])
            et = rel(t["peak_bytes"], m["peak_bytes"])
            trace_errs.append(abs(et))
            if ea is not None:
                analytic_errs.append(abs(ea))
            kv = m.get("kv_cache_bytes")
            est_kv = inference_fields(s).get("kv_cache_bytes")  # what both estimates report
            kv_ok = "-" if kv is None else "not estimated" if est_kv is None else (
                "equal" if est_kv == kv else f"{est_kv:,} (off by {est_kv - kv:+,})")
            disk = "-"
            if "placement_bytes" in m:  # offloading: disk bytes and disk reads of the request, measured = estimated?
                same = all(e is not None and e.get("disk_read_bytes_per_request") == m["disk_read_bytes_per_request"]
                           and e["placement_bytes"]["disk"] == m["placement_bytes"].get("disk", 0)
                           for e in (a, t["serving"]))
                disk = (f"{m['placement_bytes'].get('disk', 0):,} on disk, {m['disk_read_bytes_per_request']:,} read"
                        f" ({'both estimates equal' if same else 'ESTIMATES DIFFER'})")
            rows.append(f"| {i} | {_describe(s)} | {m['peak_bytes'] / 2**20:,.3f} | "
                        f"{'-' if ea is None else f'{ea * 100:+.2f}%'} | {et * 100:+.3f}% | "
                        f"{'-' if kv is None else f'{kv:,}'} | {kv_ok} | {disk} |")
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def summary(v):
        if not v:
            return "| - | - | - |"
        v = sorted(v)
        return (f"| {statistics.median(v) * 100:.2f}% | {v[int(0.9 * (len(v) - 1))] * 100:.2f}% | "
                f"{v[-1] * 100:.2f}% |")

    text = "\n".join([
        "# Serving accuracy (benchmarks/accuracy_inference.py)", "",
        f"{args.n} generated tiny serving scenarios and {args.offload} offloaded ones at three `max_memory` caps "
        f"each (everything kept, about half the layers on disk, everything on disk; seed {args.seed}), served for "
        "real on CPU by the runner "
        f"(run/infer.py), in {time.time() - t_start:,.0f} s, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        "Error = (estimate - measured) / measured tensor-level peak. The analytic serving estimate answers "
        "for float llama/mistral/qwen2 with plain LoRA or the bare base; the trace for the rest.", "",
        "| | n | median | p90 | max |", "|---|---:|---:|---:|---:|",
        f"| analytic peak | {len(analytic_errs)} " + summary(analytic_errs),
        f"| trace peak | {len(trace_errs)} " + summary(trace_errs), "",
        "| # | variant | measured MiB | analytic | trace | KV cache B (measured) | estimated KV cache | offload B |",
        "|---:|---|---:|---:|---:|---:|---|---|", *rows, ""])
    # the offloaded cases alone (--n 0): a file of their own, beside the main run's
    (out / ("accuracy_inference.md" if args.n else "accuracy_inference_offload.md")).write_text(text)
    print(text)
    return 0


def _describe(s) -> str:
    a, p, m, inf = s.model.arch, s.precision, s.peft, s.inference
    targets = m.target_modules if isinstance(m.target_modules, str) else "+".join(m.target_modules or ("default",))
    peft = {"full": "base", "lora": f"lora r{m.r} {targets}", "prompt_tuning": f"prompt {m.num_virtual_tokens}"}.get(
        m.method, m.method)
    if m.num_adapters > 1:
        peft += f" x{m.num_adapters}"
    if inf.max_memory:
        peft += f", max_memory {inf.max_memory}"
    return (f"{a.model_type} h{a.hidden_size} L{a.n_layers} {a.n_heads}/{a.n_kv_heads} heads "
            f"{p.weights} {peft}{' merged' if inf.merged else ''}, b{s.training.batch_size} x {s.training.seq_len}"
            f" + {inf.max_new_tokens} new")


if __name__ == "__main__":
    raise SystemExit(main())
