#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU (well under 10 minutes on an H100/H200):
# a preflight (a real bitsandbytes NF4 kernel forward + backward on CUDA, NVML found by the device's UUID), then
# the quickstart and the shipped QLoRA 7B scenario on CUDA with the real runner (allocator peaks per phase + NVML
# sampler), the analytic CUDA estimate for the same variants, and the probe's overhead on CUDA
# (benchmarks/overhead.py: a step with no probe against the same step with it), so the CUDA terms (context,
# cuBLAS workspace, reserved) and the <= 3% overhead target can be checked against measurement, and the caching
# allocator's own record of the quickstart's first variant (torch.cuda.memory._record_memory_history from the
# process's first CUDA allocation, _dump_snapshot) for the replay test of the allocator simulation
# (tests/test_allocator.py test_recorded_snapshots_replay_exactly, peftprof/estimate/allocator_replay.py).
# On the device tool's machine: prepare with benchmarks/gpu_wheels.sh here, then run with carry [".whl"].
# Results ($OUT when set, the device tool's output folder, else benchmarks/results/gpu/), 8 files:
#   device.txt  preflight and nvidia-smi        log.txt        every part's stderr and progress
#   quickstart.jsonl, qlora-7b.jsonl  runner records   estimates.json  analytic CUDA estimates (stdout only)
#   overhead.txt  probe overhead                summary.md     the reporter's markdown of both runs
#   snapshot-quickstart.pickle  torch memory snapshot (no stack frames) of one quickstart variant, in-process
# PREFLIGHT_DEVICE=cpu runs the preflight's kernel part on CPU (a dry run of the script's Python).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
log="$out/log.txt"
: > "$log"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$log" 2>&1 || { echo "installing .whl/ failed (see $log)" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi

# Preflight: fail early, with one clear line, when the stack cannot run a 4-bit CUDA kernel or NVML is absent.
PREFLIGHT_DEVICE=${PREFLIGHT_DEVICE:-cuda} $PY - > "$out/device.txt" 2>> "$log" <<'EOF'
import os
import sys


def fail(what, e=None):
    print(f"preflight failed: {what}" + (f": {type(e).__name__}: {e}" if e is not None else ""), file=sys.stderr)
    sys.exit(1)


device = os.environ["PREFLIGHT_DEVICE"]
try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import peft
    import torch
    import transformers
except Exception as e:
    fail("import", e)
if device == "cuda" and not torch.cuda.is_available():
    fail(f"torch {torch.__version__} sees no CUDA device")
print(torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", "torch", torch.__version__,
      "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bnb.__version__)
try:  # an NF4 weight with double quantization, as QLoRA stores it; forward and backward through matmul_4bit
    torch.manual_seed(0)
    w = torch.randn(256, 128, device=device, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.randn(8, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = bnb.matmul_4bit(x, packed, quant_state=state)
    y.float().square().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    w_hat = F.dequantize_4bit(packed, state)
    err = ((y.detach() - x.detach() @ w_hat.t()).abs().max() / y.detach().abs().max()).item()
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all(), "no finite input grad"
    assert err < 0.02, f"matmul_4bit differs from dequantize + matmul by {err:.3g} (relative)"
    assert packed.device.type == device and state.absmax.device.type == device, "quantized off the device"
except Exception as e:
    fail(f"bitsandbytes 4-bit kernel on {device}", e)
print(f"bitsandbytes NF4 matmul_4bit forward+backward on {device}: ok (max relative difference {err:.2e})")
if device == "cuda":
    from peftprof.run.probe import NvmlMemory

    nvml = NvmlMemory(torch.cuda.get_device_properties(torch.cuda.current_device()))
    if nvml.handle is None:
        fail(f"pynvml: {nvml.note}")
    print(f"NVML: {nvml.lookup}, {nvml.read():,} B used (v2, as nvidia-smi)")
    nvml.shutdown()
EOF
if [ $? -ne 0 ]; then
  tail -n 1 "$log" >&2
  exit 1
fi
if [ "${PREFLIGHT_DEVICE:-cuda}" != cuda ]; then
  cat "$out/device.txt"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/device.txt" 2>> "$log" || true

status=0
part() {  # part NAME SECONDS COMMAND...: stdout and stderr to the log, a time limit, an exit line
  local name=$1 limit=$2
  shift 2
  echo "== $name" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc" >> "$log"
  [ $rc -eq 0 ] || status=1
}
# One failing part never loses the others. The time limits add up to 555 s, so with the preflight the whole
# script stays inside the device tool's 600 s per command. The runs write to a scratch folder (the runner
# leaves lock files beside its results) and only their .jsonl files are copied to $out.
runs=$(mktemp -d)
part quickstart 120 $PY -m peftprof.cli run scenarios/quickstart.toml --device cuda --out "$runs" --no-report \
  --quiet --force
part qlora-7b 190 $PY -m peftprof.cli run scenarios/qlora-7b.toml --device cuda --out "$runs" --no-report --quiet \
  --force --steps 3
cp "$runs"/*.jsonl "$out"/ 2>> "$log" || status=1
echo "== estimates" >> "$log"
timeout 45 $PY -m peftprof.cli estimate scenarios/quickstart.toml scenarios/qlora-7b.toml --device cuda \
  --format json > "$out/estimates.json" 2>> "$log" || status=1
echo "== overhead" >> "$log"
timeout 110 $PY benchmarks/overhead.py --device cuda > "$out/overhead.txt" 2>> "$log" || status=1
part summary 30 $PY -m peftprof.cli report "$out"/*.jsonl --format markdown -o "$out/summary.md"
# The allocator's record of one variant in this process (history on before anything touches CUDA), then its replay
# through the simulation: the segments and peak reserved must match exactly (the test suite replays it again).
part snapshot 60 $PY - "$out/snapshot-quickstart.pickle" <<'EOF'
import sys

import torch

torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None, stacks="python")
from peftprof.estimate.allocator_replay import replay_snapshot  # noqa: E402
from peftprof.run.runner import run_variant  # noqa: E402
from peftprof.scenario import load_scenario  # noqa: E402

variant = load_scenario("scenarios/quickstart.toml")[0]
record = run_variant(variant, device="cuda")
print(variant.name, record["status"], "max reserved", torch.cuda.max_memory_reserved())
torch.cuda.memory._dump_snapshot(sys.argv[1])
out = replay_snapshot(torch.cuda.memory._snapshot())
print("replay match:", out["match"], "peak reserved recorded", out["recorded_peak_reserved_bytes"], "simulated",
      out["simulated_peak_reserved_bytes"], "first difference", out["first_segment_difference"])
sys.exit(0 if out["match"] else 1)
EOF
grep "^== " "$log"
cat "$out/overhead.txt"
echo "results in $out (status $status)"
exit $status
