#!/usr/bin/env bash
# Convert a model folder with llama.cpp's stock converter and compare llama.cpp's prompt ids and greedy tokens with
# ours (scripts/engines_check.py). The first run builds llama-cpp-python from source (scripts/install_engines.sh,
# about 7 minutes on 2 cores) into ~/.cache/glm-hf-engines/llama-cpp-python-0.3.36; later runs reuse it.
#   bash scripts/engines_check.sh output/glm-skills
set -euo pipefail
cd "$(dirname "$0")/.."
GLM_REQUIREMENTS=requirements-test.txt source scripts/env.sh
target="$(bash scripts/install_engines.sh)"
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 python scripts/engines_check.py "$@"
