#!/usr/bin/env bash
# Sets up the environment if needed, then runs the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
GLM_REQUIREMENTS="${GLM_REQUIREMENTS:-requirements-test.txt}" source scripts/env.sh
set -euo pipefail
# The optional extras the tests cover too (torchao, for model.quantize), in a folder of their own: tests put it on
# sys.path themselves, and a plain process in this environment sees what a user's requirements.txt install has.
export GLM_EXTRAS="$VIRTUAL_ENV/extras"
if [ ! -f "$GLM_EXTRAS/.complete" ]; then
  pip install -q --no-deps --target "$GLM_EXTRAS" -r requirements-quantize.txt && touch "$GLM_EXTRAS/.complete"
fi
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
exec python -m pytest -q -rs "${@:-tests}"  # -rs: say why each skipped test skipped
