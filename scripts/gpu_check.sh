#!/usr/bin/env bash
# The GPU half of the compile/speed work (docs/performance.md, "GPU"), as one command for a machine with a CUDA GPU
# and torch + transformers installed (a lent device machine has both; nothing is installed or downloaded here):
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else /tmp/gpu_check
#
# 1. the parity check on the GPU: ours against native GlmForCausalLM in fp32 and bf16 (logits, and greedy tokens of
#    eager, static-cache and compiled generate());
# 2. benchmarks/bench_model.py --device cuda on the small and ~1B configs, sections gen1, compiled and longctx:
#    bf16, sdpa, compiled static-cache decode (mode reduce-overhead: CUDA graphs) against native eager and native
#    compiled; the target is compiled >= 2x native's default eager generate().
# Each step has its own time limit so that the whole run stays under about 9 minutes; the output folder gets the
# logs and the benchmark's JSON. GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (a dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu_check}}"
device="${GPU_CHECK_DEVICE:-cuda}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0

echo "== versions and device"
"$python" - "$device" <<'EOF' 2>&1 | tee "$out/versions.txt"
import sys

import torch
import transformers

device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU (set GPU_CHECK_DEVICE=cpu for a dry run on the CPU)")
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

echo "== parity on $device (fp32 and bf16)"
timeout 240 "$python" benchmarks/gpu_parity.py --device "$device" 2>&1 | tee "$out/parity.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== bench_model on $device"
configs="small,1b"
[ "$device" = cpu ] && configs="small"
timeout 300 "$python" benchmarks/bench_model.py --device "$device" --configs "$configs" --repeats 3 --new-tokens 128 \
  --sections gen1,compiled,longctx --json "$out/bench_model.json" 2>&1 | tee "$out/bench_model.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
