#!/bin/bash
# Builds what a device call needs for FlashAttention-4 (GENQ_WAN_ATTENTION=flash4) on the GPU image
# (torch 2.11+cu130, Python 3.12). Its CUDA 13 library wheel is 92 MB, past the device tool's 64 MiB a
# call, so it travels unpacked and xz-compressed (61 MiB) in two parts, over two back-to-back calls on
# one warm machine (bench/run_flash4.sh says how):
#   .fa4a/  part 1 of the library, and the small wheels (flash-attn-4, nvidia-cutlass-dsl and its base
#           libraries, quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext)          ~50 MiB
#   .fa4b/  part 2 of the library                                                    ~21 MiB
# Both are ignored by git. Run from the repository root; about 4 minutes (most of it xz).
set -euo pipefail
cd "$(dirname "$0")/.."
FA4=${FA4_VERSION:-4.0.0b36}
DSL=${CUTLASS_DSL_VERSION:-4.8.1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$tmp/whl" "flash-attn-4==$FA4" "nvidia-cutlass-dsl==$DSL" \
  "nvidia-cutlass-dsl-libs-base==$DSL" "nvidia-cutlass-dsl-libs-core==$DSL" "nvidia-cutlass-dsl-libs-cu13==$DSL" \
  "quack-kernels==0.6.5" "apache-tvm-ffi==0.1.15.post2" "torch-c-dlpack-ext==0.1.5"
mkdir -p "$tmp/libs"
(cd "$tmp/libs" && python3 -m zipfile -e "$tmp"/whl/nvidia_cutlass_dsl_libs_cu13-*.whl .)
rm "$tmp"/whl/nvidia_cutlass_dsl_libs_cu13-*.whl
tar -cf - -C "$tmp/libs" . | xz -T0 -9 > "$tmp/libs.tar.xz"
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
split -b 40M "$tmp/libs.tar.xz" "$tmp/part."
mv "$tmp/part.aa" "$tmp"/whl/*.whl .fa4a/
mv "$tmp/part.ab" .fa4b/
du -sh .fa4a .fa4b
