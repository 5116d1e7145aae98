#!/bin/bash
# FlashAttention-4 on the GPU image, then benchmarks with it (after bench/carry.sh and bench/carry_flash4.sh).
# Two device calls, the second straight after the first (the machine is held ~30 s between calls):
#   1. carry [".fa4a"]:        bash bench/run_flash4.sh stash
#   2. carry [".fa4b", ".whl"]: bash bench/run_flash4.sh CMD...    e.g.
#        bash bench/run_flash4.sh python3 -m bench.wan_profile --backends _native_cudnn,flash4 --out $OUT
#      (.whl without its av wheel fits beside .fa4b; no benchmark here encodes video). Further calls on the
#      same warm machine need only .whl: the install stays in /tmp/site.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STASH=/tmp/fa4stash SITE=/tmp/site
if [ "${1:-}" = stash ]; then
  mkdir -p $STASH && cp .fa4a/* $STASH/ && ls $STASH
  exit
fi
if [ -f .fa4b/part.ab ]; then
  [ -f $STASH/part.aa ] || { echo "part 1 missing: run 'bash bench/run_flash4.sh stash' with .fa4a first, on this machine"; exit 3; }
  mkdir -p $SITE
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE \
    $STASH/*.whl .whl/*.whl 2>&1 | grep -v -i warn
  # after pip: its --upgrade replaces the nvidia_cutlass_dsl folder the library unpacks into
  cat $STASH/part.aa .fa4b/part.ab | xz -d | tar -xf - -C $SITE || exit 4
fi
# the package's .pth would add dsl_packages; a --target install is not a site directory
export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD
python3 -c "from flash_attn.cute import flash_attn_func" || exit 5
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
"$@"
