#!/usr/bin/env bash
# Production entry: check the environment and the model files, set the allocator options, print the
# plan, then exec the orchestrator (which starts one daemon per family per GPU and supervises them).
# Secrets are reported by name only, never by value. `bash startup.sh --check` stops after the plan.
set -uo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] && . .venv/bin/activate
PY=${PYTHON:-python}

problems=0
fail() { echo "startup: $*" >&2; problems=$((problems + 1)); }

for var in REDIS_URL SUPABASE_URL JOB_CALLBACK_SECRET; do
  [ -n "${!var:-}" ] || fail "$var is not set"
done
[ -n "${SUPABASE_SERVICE_ROLE_KEY:-${SUPABASE_SERVICE_KEY:-}}" ] || fail "SUPABASE_SERVICE_ROLE_KEY (or SUPABASE_SERVICE_KEY) is not set"

models=0
for var in SDXL_MODEL_PATH WAN_MODEL_PATH WAN_VACE_MODEL_PATH QWEN_INSTRUCT_MODEL_PATH QWEN_BASE_MODEL_PATH SDXL_CONFIG_PATH; do
  value=${!var:-}
  [ -n "$value" ] || continue
  [ "$var" = SDXL_CONFIG_PATH ] || models=$((models + 1))
  if [ "$value" != tiny ] && [ ! -e "$value" ]; then fail "$var=$value does not exist"; fi
done
[ "$models" -gt 0 ] || fail "no model path is set (SDXL_MODEL_PATH, WAN_MODEL_PATH / WAN_VACE_MODEL_PATH, QWEN_INSTRUCT_MODEL_PATH / QWEN_BASE_MODEL_PATH)"
case "${SDXL_MODEL_PATH:-}" in
  *.safetensors) [ -n "${SDXL_CONFIG_PATH:-}" ] || fail "SDXL_MODEL_PATH is a single file: SDXL_CONFIG_PATH must name its config folder" ;;
esac

if [ "$problems" -gt 0 ]; then
  echo "startup: $problems problem(s); not starting" >&2
  exit 2
fi

# Fragmentation from jobs of varying shapes is what turns a fitting plan into an OOM.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/genq/inductor}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv
"$PY" - <<'PYEOF' || exit 2
from redis import Redis
from schemas.settings import get_settings
s = get_settings()
Redis.from_url(s.redis_url.get_secret_value(), socket_connect_timeout=5).ping()
print(f"startup: redis reachable; storage={s.storage_backend} bucket={s.storage_bucket} callback={s.job_callback_url}")
PYEOF
"$PY" -m orchestrator plan || exit 2
[ "${1:-}" = --check ] && exit 0  # checks and plan only
exec "$PY" -m orchestrator
