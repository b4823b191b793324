#!/usr/bin/env bash
# GPU speed check for one lent H100/H200, under 8 minutes all told: nvidia-smi, then bench/gpu_speed.py
# (images/s and peak memory of resnet20/resnet56 at 32x32: CE step, teacher forward, online KD, cached views;
# fp32 vs bf16 + channels_last, torch.compile off/on) under a hard 450 s limit. Results are written after
# every measurement, so a run cut short still leaves ${OUT:-bench/results}/gpu_speed.json with its rows.
#   bash bench/gpu_check.sh                       # extra arguments go to gpu_speed.py: --configs fp32,bf16_cl
set -euo pipefail
cd "$(dirname "$0")/.."
python=python
if [ -x .venv/bin/python ]; then
  python=.venv/bin/python
  export PATH="$PWD/.venv/bin:$PATH"
fi
nvidia-smi || echo "gpu_check: nvidia-smi failed or is missing; gpu_speed.py says whether CUDA works" >&2
out="${OUT:-bench/results}"
mkdir -p "$out"
timeout 450 "$python" bench/gpu_speed.py --out "$out/gpu_speed.json" "$@"
