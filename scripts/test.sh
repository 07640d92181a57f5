#!/usr/bin/env bash
# Sets up the environment if needed, then runs the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
GLM_REQUIREMENTS="${GLM_REQUIREMENTS:-requirements-test.txt}" source scripts/env.sh
set -euo pipefail
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
exec python -m pytest -q "${@:-tests}"
