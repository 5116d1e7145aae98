#!/bin/bash
# One device call: install the carried wheels, record the software, then run the named benchmarks.
#   bash bench/run_device.sh smoke sdxl qwen wan gemv      (each name: smoke | sdxl | qwen | wan | gemv)
#   BENCH_ARGS="--attention auto" bash bench/run_device.sh qwen     (extra arguments for each benchmark)
# Per-benchmark wall limits keep the whole call inside the device tool's 10 minutes; each writes
# $OUT/<name>.json after every stage, so a cut-off run still returns its figures.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, diffusers, transformers; print('versions', torch.__version__, diffusers.__version__, transformers.__version__, torch.cuda.get_device_name())" || exit 1
limit() { case $1 in sdxl) echo ${SDXL_S:-520};; qwen) echo ${QWEN_S:-290};; wan) echo ${WAN_S:-270};; gemv) echo ${GEMV_S:-240};; *) echo 120;; esac; }
for name in "$@"; do
  if [ "$name" = smoke ]; then
    for b in sdxl qwen wan; do
      timeout 120 python3 -m bench.$b --tiny --runs 1 --device cpu --out /tmp/smoke 2>&1 | grep -E '^\[(skip|done)|SUMMARY|Error' | cut -c1-300 || exit 1
      python3 -c "import json,sys; d=json.load(open('/tmp/smoke/${b}_tiny.json')); sys.exit(1 if d['errors'] else 0)" || { echo "smoke $b failed"; exit 1; }
    done
    continue
  fi
  s=$(limit "$name")
  timeout "$s" python3 -m bench."$name" $BENCH_ARGS --budget-s $((s - 50)) --out "$OUT" 2>&1 | tee "$OUT/$name.log" | grep -vE "Warning|warn\(" | cut -c1-700
done
