#!/bin/bash
# One device call: the production stack on full-size random-weight models (bench/stack.py).
#   device tool:  command "bash bench/run_stack.sh", carry [".whl", ".redis"]   (about 9 minutes)
#   this machine: PYTHON=.venv/bin/python bash bench/run_stack.sh --tiny       (tiny models on the CPU)
# Extra arguments go to bench/stack.py (e.g. --scenarios 48GB, --skip overlap). Everything lands in
# $OUT: stack.json (written after every stage), memory.json, build.log, orchestrator-<scenario>.log,
# status-<scenario>.txt and this script's output as stack.log.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results/stack}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
exec 3>&1 4>&2 > >(tee -a "$OUT/stack.log") 2>&1  # the setup's output: shown and logged
LIMIT_S=${STACK_LIMIT_S:-590}  # the device tool's 10 minutes, less a margin to hand $OUT back

# 1. Carried wheels (cp312 manylinux / pure Python): only for the interpreter they were made for.
if ls .whl/*.whl >/dev/null 2>&1 && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi

# 2. The carried redis-server (Debian 12 build) with the shared libraries a stock image may lack.
if [ -f .redis/redis-bundle.tar.xz ]; then
  mkdir -p /tmp/genq-redis && tar -xJf .redis/redis-bundle.tar.xz -C /tmp/genq-redis || exit 1
  export GENQ_REDIS_SERVER=/tmp/genq-redis/redis-server GENQ_REDIS_LIB=/tmp/genq-redis/lib
  if LD_LIBRARY_PATH=$GENQ_REDIS_LIB ldd "$GENQ_REDIS_SERVER" | grep "not found"; then
    echo "run_stack: the carried redis-server misses the libraries above" >&2
    exit 1
  fi
fi

# 3. Preflight: every module the stack imports, before any minute is spent building models.
"$PY" - <<'EOF' || exit 1
import importlib, importlib.metadata as md, sys
import PIL.features
for name in ("torch", "diffusers", "transformers", "accelerate", "rq", "redis", "supabase", "storage3", "httpx",
             "pydantic", "pydantic_settings", "tenacity", "av", "pynvml", "ftfy", "filelock", "numpy",
             "uploader", "memory", "orchestrator", "consumers.daemon", "consumers.images", "consumers.videos",
             "consumers.chat", "pipelines.sdxl", "pipelines.wan", "pipelines.chat", "bench.full_models"):
    importlib.import_module(name)
assert PIL.features.check("webp"), "Pillow lacks WebP (thumbnails)"
import av, torch
av.codec.Codec("libx264", "w")  # the MP4 encoder
print("preflight ok: python", sys.version.split()[0], {d: md.version(d) for d in (
    "torch", "diffusers", "transformers", "accelerate", "tokenizers", "huggingface_hub", "pillow", "rq", "redis",
    "supabase", "pydantic", "av")}, "cuda", torch.cuda.is_available())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
df -h /tmp | tail -1

# 4. The stack, inside what is left of the limit.
BUDGET=$((LIMIT_S - SECONDS - 10))
echo "run_stack: $SECONDS s of setup; bench.stack budget ${BUDGET} s"
exec 1>&3 2>&4  # from here the log gets the stack's whole output, the screen a filtered copy
timeout --kill-after=10 $((BUDGET + 15)) "$PY" -m bench.stack --budget-s "$BUDGET" "$@" 2>&1 | tee -a "$OUT/stack.log" \
  | grep -vE "Warning|warn\(|it/s\]|s/it\]" | cut -c1-600
echo "run_stack: done after $SECONDS s (exit ${PIPESTATUS[0]})"
