#!/usr/bin/env bash
# train.py through `accelerate launch`, one process (the GPU if there is one, else the CPU), inside the repository's
# environment (made once, as by main.sh), from any shell: every launcher value is given, so accelerate prints no
# notice about defaults, and --quiet leaves a refusal as train.py's one line instead of the launcher's traceback.
#   bash scripts/train.sh --model_name_or_path output/glm-skills --train_file chats.jsonl
# Several processes or an engine: bash scripts/run.sh accelerate launch --config_file accelerate_configs/... train.py
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/env.sh"
set -euo pipefail
device_flag="--cpu"
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then device_flag=""; fi
exec accelerate launch --quiet $device_flag --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no --num_cpu_threads_per_process "$(nproc)" "$root/train.py" "$@"
