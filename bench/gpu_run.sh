#!/bin/bash
# The GPU run of bench/speed.py (tunesmith vs plain HF vs Unsloth), from the repo root on the GPU machine:
#   bash bench/gpu_run.sh [speed.py flags, e.g. --rows qwen2.5-7b:lora --steps 10]
# Needs the git-ignored, carried folders .gpu/unsloth-site and .gpu/tok/qwen (see bench/README.md).
# Results (JSON + markdown table + logs) go to $OUT; the table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
site=$PWD/.gpu/unsloth-site
# tunesmith and HF get from the Unsloth folder only what the image lacks (bitsandbytes, pydantic), not Unsloth
hf=/tmp/bench-hf-site
rm -rf "$hf" && mkdir -p "$hf"
for p in $($PY -c 'import importlib.util as u, sys; print(*[p for p in sys.argv[1:] if u.find_spec(p) is None])' \
           bitsandbytes pydantic pydantic_core annotated_types typing_inspection); do
  ln -s "$site/$p" "$site/$p"-*.dist-info "$hf/"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
$PY bench/speed.py --out "$OUT" --unsloth-site "$site" --hf-site "$hf" --tok .gpu/tok/qwen "$@" 2>&1 | tee "$OUT/run.log"
