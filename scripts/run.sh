#!/usr/bin/env bash
# Runs one command inside the repository's environment (made once, as by main.sh), e.g.
#   bash scripts/run.sh python chat.py output/glm-skills
# GLM_REQUIREMENTS=requirements-test.txt selects the test environment instead.
set -euo pipefail
source "$(dirname "$0")/env.sh"
set -euo pipefail
exec "$@"
