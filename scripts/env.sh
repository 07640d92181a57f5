#!/usr/bin/env bash
# Source me: makes (once) and activates a virtual environment for this repository.
# It lives outside the clone, keyed by the requirements file, so CI and fresh clones reuse it.
#   GLM_REQUIREMENTS  requirements file to install (default: requirements.txt)
#   GLM_VENV_ROOT     where environments are kept (default: ~/.cache/glm-hf-venvs)
set -e
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_req="${GLM_REQUIREMENTS:-$_root/requirements.txt}"
_key="$(cat "$_req" "$_root/requirements.txt" | sha256sum | cut -c1-16)-py$(python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')"
_venv="${GLM_VENV_ROOT:-$HOME/.cache/glm-hf-venvs}/$_key"
if [ ! -f "$_venv/.complete" ]; then
  echo "setting up $_venv from $(basename "$_req") (once)"
  rm -rf "$_venv"
  python3 -m venv "$_venv"
  "$_venv/bin/pip" install -q --upgrade pip
  # The CPU build from local disk first, so the open torch requirement is already met.
  "$_venv/bin/pip" install -q "torch==${GLM_TORCH_VERSION:-2.13.0}"
  (cd "$(dirname "$_req")" && "$_venv/bin/pip" install -q -r "$(basename "$_req")")
  touch "$_venv/.complete"
fi
# shellcheck disable=SC1091
source "$_venv/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
set +e
