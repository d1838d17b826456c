#!/usr/bin/env bash
# Wheels the GPU machine lacks, for benchmarks/gpu_check.sh: the device image has CUDA torch, transformers
# and peft of other versions and no bitsandbytes (/work/.library/device/KINDS.md). Fetches the versions this
# project is tested with, for its Python 3.12, into .whl/ (git-ignored; ~58 MB, under the 64 MiB the device
# tool carries). Run here, then call the device tool with carry [".whl"] and `bash benchmarks/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=$(.venv/bin/python -c "import bitsandbytes, peft, transformers as t
print(f'bitsandbytes=={bitsandbytes.__version__} peft=={peft.__version__} transformers=={t.__version__}')")
rm -rf .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl $versions
ls -l .whl
# the device tool carries at most 64 MiB of ignored paths in all
size=$(du -sb .whl | cut -f1)
if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
  echo ".whl/ is $size B: too close to the device tool's 64 MiB carry limit" >&2
  exit 1
fi
