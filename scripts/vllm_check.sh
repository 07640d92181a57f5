#!/usr/bin/env bash
# The vLLM checks (tests/vllm_check.py, docs/serving.md): a tiny model trained in WORKDIR (default a temporary
# folder) with our greedy tokens, in the test environment; then vLLM's offline engine and its OpenAI server on it, in
# vLLM's cached environment (scripts/install_vllm.sh makes it once). Not part of scripts/test.sh (vLLM pins
# transformers <5.20); .ci/run runs it after the test suite (about 4 minutes, docs/serving.md).
#   bash scripts/vllm_check.sh [WORKDIR] [--only offline|plugin|server]
set -euo pipefail
cd "$(dirname "$0")/.."
vllm_env="$(bash scripts/install_vllm.sh)"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then work="$1"; shift; else work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
(GLM_REQUIREMENTS=requirements-test.txt source scripts/env.sh && python tests/vllm_check.py "$work" --only prepare)
"$vllm_env/bin/python" tests/vllm_check.py "$work" "$@"
