#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU (well under 10 minutes on an H100/H200):
# runs the quickstart and the shipped QLoRA 7B scenario on CUDA with the real runner (allocator counters per
# phase + NVML sampler), the analytic CUDA estimate for the same variants, and the probe's overhead on CUDA
# (step time with the allocator probe against without), so the CUDA terms (context, cuBLAS workspace,
# reserved) and the <= 3% overhead target can be checked against measurement.
# On the device tool's machine: prepare with benchmarks/gpu_wheels.sh here, then run with carry [".whl"].
# Results: $OUT (when set, the device tool's output folder) or benchmarks/results/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
$PY -c "import torch, transformers, peft, bitsandbytes as b; assert torch.cuda.is_available(), 'no CUDA device'
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee "$out/device.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/device.txt" || true
status=0
# one failing part never loses the others: each writes its own file
$PY -m peftprof.cli run scenarios/quickstart.toml --device cuda --out "$out" --no-report --quiet --force \
  > "$out/quickstart.txt" 2>&1 || status=1
$PY -m peftprof.cli run scenarios/qlora-7b.toml --device cuda --out "$out" --no-report --quiet --force --steps 3 \
  > "$out/qlora-7b.txt" 2>&1 || status=1
$PY -m peftprof.cli estimate scenarios/quickstart.toml scenarios/qlora-7b.toml --device cuda --format json \
  > "$out/estimates.json" 2>&1 || status=1
$PY benchmarks/accuracy.py --overhead cuda > "$out/overhead.txt" 2>&1 || status=1
$PY -m peftprof.cli report "$out"/*.jsonl --format markdown -o "$out/summary.md" 2>&1 || status=1
tail -n 3 "$out"/*.txt
echo "results in $out (status $status)"
exit $status
