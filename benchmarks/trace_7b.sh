#!/usr/bin/env bash
# Trace estimate of the shipped 7B QLoRA scenario: wall time and peak RSS (targets: < 2 min, < 2 GB on our
# 2-core CI machine). Writes benchmarks/results/trace_7b.txt. Run from the repository root after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/trace_7b.txt
export PEFTPROF_CACHE=$(mktemp -d)   # measure a cold trace, not the cache
{
  echo "# peftprof estimate scenarios/qlora-7b.toml --method trace ($(date -u +%F), $(nproc) cores)"
  .venv/bin/python -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
  /usr/bin/time -f "wall_s %e
peak_rss_kb %M" .venv/bin/peftprof estimate scenarios/qlora-7b.toml --method trace --device cuda 2>&1
} | tee "$out"
rm -rf "$PEFTPROF_CACHE"
