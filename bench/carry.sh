#!/bin/bash
# Builds what the device runs carry (both ignored by git, carried with carry [".whl", ".redis"]):
#   .whl/   cp312 manylinux wheels of everything genq imports that the GPU image lacks (it has torch,
#           transformers, tokenizers, huggingface_hub, numpy, Pillow, safetensors), versions as in .venv
#   .redis/ redis-server with the shared libraries it links (this machine's Debian 12 build)
# Run from the repository root after scripts/bootstrap.sh; about a minute, ~55 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
pinned() {  # name==version of each package as installed in .venv
  "$PIP" freeze | grep -iE "^($(echo "$@" | tr ' ' '|'))==" 
}
PACKAGES="diffusers accelerate importlib_metadata zipp rq redis croniter python-dateutil six click supabase storage3
 postgrest realtime supabase-auth supabase-functions httpx httpcore h11 h2 hpack hyperframe anyio idna certifi deprecation
 PyJWT websockets pydantic pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types typing_extensions
 tenacity av nvidia-ml-py ftfy wcwidth yarl multidict propcache strenum truststore lazy-importer httpx2 httpcore2 cryptography
 cffi pycparser"
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2046
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $(pinned $PACKAGES) ${EXTRA_WHEELS:-}
mkdir -p .redis /tmp/genq-rb/lib
cp "$(command -v redis-server)" /tmp/genq-rb/
ldd "$(command -v redis-server)" | awk '/=> \// {print $3}' | grep -vE "/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so" \
  | xargs -I{} cp -L {} /tmp/genq-rb/lib/
tar -cJf .redis/redis-bundle.tar.xz -C /tmp/genq-rb .
rm -rf /tmp/genq-rb
du -sh .whl .redis
