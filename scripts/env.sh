#!/usr/bin/env bash
# Source me: makes (once) and activates a virtual environment for this repository.
# It lives outside the clone, keyed by the requirements files and the newest transformers release they allow, so CI
# and fresh clones reuse it until either changes.
#   GLM_REQUIREMENTS  requirements file to install (default: requirements.txt; the tests use requirements-test.txt)
#   GLM_VENV_ROOT     where environments are kept (default: ~/.cache/glm-hf-venvs)
# `bash scripts/run.sh COMMAND ...` runs one command inside the same environment.
set -e
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_req="${GLM_REQUIREMENTS:-$_root/requirements.txt}"
case "$_req" in /*) ;; *) _req="$_root/$_req" ;; esac
# The folder: a hash of the requirements files and the newest transformers release they allow (scripts/venv_path.py).
_venv="$(python3 "$_root/scripts/venv_path.py" "$_req")"
mkdir -p "$(dirname "$_venv")"
# One setup at a time: a second first run (scripts/main.sh and scripts/test.sh started together) waits here, then
# finds the environment made.
exec {_lock}>"$_venv.lock"
if ! flock -n "$_lock"; then
  echo "waiting for another setup of $_venv to finish..." >&2
  flock "$_lock"
fi
if [ ! -f "$_venv/.complete" ]; then
  echo "setting up a virtual environment (once) in $_venv from $(basename "$_req"):" >&2
  echo "  the CPU build of torch ${GLM_TORCH_VERSION:-2.13.0}, then $(grep -v '^\s*#' "$_req" | grep -v '^\s*$' | tr '\n' ' ')" >&2
  echo "  (about 3-5 minutes for requirements.txt, 6-10 for requirements-test.txt on 2 cores)" >&2
  rm -rf "$_venv"
  python3 -m venv "$_venv"
  "$_venv/bin/pip" install -q --upgrade pip
  # The CPU build from local disk first, so the open torch requirement is already met.
  echo "  installing torch..." >&2
  "$_venv/bin/pip" install -q "torch==${GLM_TORCH_VERSION:-2.13.0}"
  echo "  installing the rest..." >&2
  (cd "$(dirname "$_req")" && "$_venv/bin/pip" install -q -r "$(basename "$_req")")
  touch "$_venv/.complete"
  echo "  done; enter it in a shell with: source $_venv/bin/activate (or use scripts/run.sh)" >&2
fi
flock -u "$_lock"
exec {_lock}>&-
# shellcheck disable=SC1091
source "$_venv/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
set +e
