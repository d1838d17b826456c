#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU (well under 10 minutes on an H100/H200):
# runs the shipped QLoRA scenario and a LoRA variant of the tiny model on CUDA with the real runner
# (allocator counters per phase + NVML sampler), and the analytic estimate for the same variants, so the
# CUDA terms (context, cuBLAS workspace, reserved) can be checked against measurement.
# Results: $OUT (when set, the device tool's output folder) or benchmarks/results/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
PY=${PY:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/device.txt" || true
$PY -m peftprof.cli run scenarios/qlora-7b.toml --device cuda --out "$out" --no-report --quiet --force --steps 3 \
  2>&1 | tee "$out/qlora-7b.txt"
$PY -m peftprof.cli run scenarios/quickstart.toml --device cuda --out "$out" --no-report --quiet --force \
  2>&1 | tee "$out/quickstart.txt"
$PY -m peftprof.cli estimate scenarios/qlora-7b.toml scenarios/quickstart.toml --device cuda --format json \
  > "$out/estimates.json"
$PY -m peftprof.cli report "$out"/*.jsonl --format markdown -o "$out/summary.md"
echo "results in $out"
