#!/usr/bin/env bash
# Convert a model folder with llama.cpp's stock converter and compare llama.cpp's prompt ids and greedy tokens with
# ours (scripts/engines_check.py). Not run in CI: the first run builds llama-cpp-python from source, 10-20 minutes on
# 2 cores (CMAKE_ARGS is passed through), into ~/.cache/glm-hf-engines/llama-cpp-python-0.3.36; later runs reuse it.
#   bash scripts/engines_check.sh output/glm-skills
set -euo pipefail
cd "$(dirname "$0")/.."
GLM_REQUIREMENTS=requirements-test.txt source scripts/env.sh
target="${GLM_ENGINES_CACHE:-$HOME/.cache/glm-hf-engines}/llama-cpp-python-0.3.36"
if [ ! -f "$target/.complete" ]; then
  echo "building llama-cpp-python 0.3.36 into $target (once; 10-20 minutes on 2 cores)" >&2
  rm -rf "$target"
  pip install --no-deps --target "$target" -r scripts/requirements-engines.txt
  touch "$target/.complete"
fi
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 python scripts/engines_check.py "$@"
