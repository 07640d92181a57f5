#!/usr/bin/env bash
# Builds the two C++ inference engines our folders are checked against, once each, into cached folders outside
# every virtual environment (GLM_ENGINES_CACHE overrides the parent, ~/.cache/glm-hf-engines):
#   llama-cpp-python-0.3.36  llama.cpp's Python binding, compiled from the PyPI source distribution
#                            (measured 7m24s on the 2-core Intel Xeon VM, load ~2)
#   chatglm-cpp-0.4.2        chatglm.cpp's Python binding (its last release, 2024); its CMakeLists predates
#                            cmake 4, which refuses it unless CMAKE_POLICY_VERSION_MINIMUM=3.5 is set
#   llama-jinja-render-0.3.36 scripts/llama_jinja_render.cpp compiled against llama.cpp's own Jinja engine from the
#                            same sdist (common/jinja: what llama-server renders chat templates with; about 25 s)
# Later calls return at once. Prints the three folders, one per line (the two Python bindings first).
# tests/test_engines.py runs each engine whose folder is complete. Needs an active environment with pip
# (scripts/env.sh), cmake and a C++ compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${GLM_ENGINES_CACHE:-$HOME/.cache/glm-hf-engines}"
build() {  # build NAME-VERSION PIP-ARGS...
  local target="$cache/$1"; shift
  if [ ! -f "$target/.complete" ]; then
    echo "building $(basename "$target") into $target (once)" >&2
    rm -rf "$target"
    local start=$SECONDS
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" CMAKE_POLICY_VERSION_MINIMUM=3.5 \
      pip install -q --no-deps --target "$target" "$@"
    echo "built $(basename "$target") in $((SECONDS - start)) s" >&2
    touch "$target/.complete"
  fi
  echo "$target"
}
CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" \
  build llama-cpp-python-0.3.36 -r scripts/requirements-engines.txt
build chatglm-cpp-0.4.2 chatglm-cpp==0.4.2
renderer="$cache/llama-jinja-render-0.3.36"
if [ ! -f "$renderer/.complete" ]; then
  echo "building llama.cpp's Jinja renderer into $renderer (once)" >&2
  sources="$(python tests/engine_converters.py --jinja-sources)"
  mkdir -p "$renderer"
  g++ -std=c++17 -O1 -I"$sources/common" -I"$sources/ggml/include" -I"$sources/vendor" \
    scripts/llama_jinja_render.cpp "$sources"/common/jinja/*.cpp "$sources/common/json.cpp" \
    "$sources/common/unicode.cpp" -o "$renderer/llama_jinja_render"
  touch "$renderer/.complete"
fi
echo "$renderer"
