#!/usr/bin/env bash
# Convert a model folder with llama.cpp's and chatglm.cpp's stock converters and compare both engines' prompt ids,
# greedy tokens and chat replies with ours (scripts/engines_check.py). The first run builds llama-cpp-python and
# chatglm-cpp from source (scripts/install_engines.sh, about 7 + 4.5 minutes on 2 cores) into
# ~/.cache/glm-hf-engines; later runs reuse them.
#   bash scripts/engines_check.sh output/glm-skills [--engines llama.cpp|chatglm.cpp]
set -euo pipefail
cd "$(dirname "$0")/.."
GLM_REQUIREMENTS=requirements-test.txt source scripts/env.sh
targets="$(bash scripts/install_engines.sh | sed -n 1,2p | paste -sd:)"  # the two Python bindings
PYTHONPATH="$targets${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 python scripts/engines_check.py "$@"
