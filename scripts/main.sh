#!/usr/bin/env bash
# The main job: set up the environment if needed, train a small GLM from scratch on the built-in bilingual chat
# data (train.py with no data flags), then load the saved folder through AutoModel and chat with it.
# Extra arguments go to train.py (see `python train.py --help`), e.g. --resume_from_checkpoint latest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/train.sh "$@"
