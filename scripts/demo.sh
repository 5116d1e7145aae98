#!/usr/bin/env bash
# Sets everything up from scratch (idempotent), then runs the end-to-end demo on CPU with tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
exec python scripts/demo.py "$@"
