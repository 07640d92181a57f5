#!/usr/bin/env bash
# The main job: set up the environment if needed, train a small GLM from scratch on the built-in bilingual chat
# data (train.py with no data flags), then load the saved folder through AutoModel and chat with it.
# Extra arguments go to train.py (see `python train.py --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
device_flag="--cpu"
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then device_flag=""; fi
# Every launcher value given, so accelerate prints no notice about defaults.
exec accelerate launch $device_flag --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --num_cpu_threads_per_process "$(nproc)" train.py "$@"
