#!/usr/bin/env bash
# Builds llama-cpp-python (llama.cpp's inference library) once into its own cached folder, outside every
# virtual environment: ~/.cache/glm-hf-engines/llama-cpp-python-0.3.36 (GLM_ENGINES_CACHE overrides the parent).
# It compiles llama.cpp from the PyPI source distribution: measured 7m24s on the 2-core Intel Xeon VM (load ~2);
# later calls return at once. tests/test_engines.py runs llama.cpp inference when this folder is complete.
# Needs an active environment with pip (scripts/env.sh), cmake and a C++ compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${GLM_ENGINES_CACHE:-$HOME/.cache/glm-hf-engines}/llama-cpp-python-0.3.36"
if [ ! -f "$target/.complete" ]; then
  echo "building llama-cpp-python 0.3.36 into $target (once; about 7 minutes on 2 cores)" >&2
  rm -rf "$target"
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" \
    pip install -q --no-deps --target "$target" -r scripts/requirements-engines.txt
  touch "$target/.complete"
fi
echo "$target"
