"""The trace estimator on the largest models: a 70B dense model and Mixtral-8x7B, QLoRA (targets: each under
2 minutes and 2 GiB peak RSS on our 2-core, 24 GiB machine). Each case runs in its own process (peak RSS is
per process), cold (a fresh PEFTPROF_CACHE). Writes benchmarks/results/trace_large.txt.

    .venv/bin/python benchmarks/trace_large.py            # all cases
    .venv/bin/python benchmarks/trace_large.py mixtral    # the cases whose name contains "mixtral"
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "trace_large.txt"
TARGET_S, TARGET_RSS_GIB = 120, 2.0

QLORA = """
[model]
preset = "{preset}"
[precision]
weights = "nf4"
double_quant = true
compute_dtype = "bf16"
[peft]
method = "lora"
r = 16
target_modules = "all-linear"
[training]
batch_size = 1
seq_len = 2048
gradient_checkpointing = "full"
"""
CASES = {f"{preset}-qlora": QLORA.replace("{preset}", preset) for preset in ("llama-3.1-70b", "mixtral-8x7b")}

NOTES = {
    "mixtral-8x7b-qlora": "weights: transformers 5 keeps Mixtral's experts as 3-D nn.Parameters, which bitsandbytes' "
                          "Linear replacement does not quantize and peft's prepare_model_for_kbit_training upcasts to "
                          "fp32 (45.1B x 4 B); only the attention linears are nf4.",
}

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from peftprof.scenario import load_scenario
from peftprof.trace import trace_peak
(s,) = load_scenario(sys.argv[1])
out = trace_peak(s)
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024,
                  "peak_bytes": out["peak_bytes"], "peak_phase": out["peak_phase"], "breakdown": out["breakdown"]}))
"""


def run_case(name: str, text: str) -> dict:
    """Trace one scenario in a fresh process with a cold cache: wall and CPU time, peak RSS, the traced peak
    (benchmarks/trace_fsdp_70b.py uses it too)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.toml"
        path.write_text(text)
        env = dict(os.environ, PEFTPROF_CACHE=tmp)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=1800)
        elapsed = time.perf_counter() - t0
    if proc.returncode:
        return {"name": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "process_s": elapsed}
    return {"name": name, "process_s": elapsed, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv: list[str]) -> int:
    import bitsandbytes
    import peft
    import torch
    import transformers

    chosen = {n: t for n, t in CASES.items() if not argv or any(a in n for a in argv)}
    lines = [f"# benchmarks/trace_large.py ({time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} cores; "
             f"targets: < {TARGET_S} s and < {TARGET_RSS_GIB} GiB peak RSS per case)",
             f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__} "
             f"bitsandbytes {bitsandbytes.__version__}"]
    ok = True
    for name, text in chosen.items():
        r = run_case(name, text)
        if "error" in r:
            lines.append(f"{name}: error: {r['error']}")
            ok = False
            continue
        gib = 1 << 30
        met = r["process_s"] < TARGET_S and r["peak_rss_bytes"] / gib < TARGET_RSS_GIB
        ok &= met
        parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in r["breakdown"].items() if v)
        lines.append(f"{name}: process {r['process_s']:.1f} s (trace {r['wall_s']:.1f} s), peak RSS "
                     f"{r['peak_rss_bytes'] / gib:.2f} GiB -> {'met' if met else 'MISSED'}; traced peak "
                     f"{r['peak_bytes'] / gib:.2f} GiB ({r['peak_phase']}): {parts}")
        lines.append("  scenario: " + " ".join(x for x in text.strip().splitlines() if not x.startswith("[")))
        if name in NOTES:
            lines.append("  note: " + NOTES[name])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
