"""Fast tokenizer for ChatGLM2/3 and GLM-4, and the GLM chat format (one place for both).

`ChatGLMTokenizer` wraps a `tokenizers.Tokenizer` and gives the ids of the original tokenizers: the SentencePiece model
of ChatGLM2/3 and the tiktoken ranks of GLM-4. It loads `tokenizer.json`, or converts the original `tokenizer.model`
(the format is read from the file's content). Like every Hub tokenizer, `tokenizer(text)` turns control-token
strings ("<|user|>") into control tokens (split_special_tokens=False), so a chat rendered to text by
`apply_chat_template(..., tokenize=False)` encodes to the prompt's ids wherever it is tokenized (engines, eval
harnesses, a plain `PreTrainedTokenizerFast`). The chat functions (`build_chat_input`, `tokenize_conversation`,
`apply_chat_template(tokenize=True)`, and so `model.chat`) keep control strings typed inside messages as text;
`tokenizer(text, split_special_tokens=True)` does the same for plain text, as `sentencepiece.encode` does.

    >>> tokenizer = AutoTokenizer.from_pretrained("path/to/chatglm3-6b", trust_remote_code=True)
    >>> tokenizer.encode("你好")
    [64790, 64792, 36474, 54591]
    >>> tokenizer.build_chat_input("你好")["input_ids"].tolist()
    [[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]]
"""

import base64
import codecs
import contextlib
import inspect
import json
import math
import os
import re
import shutil

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BatchEncoding, PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

# In try: transformers' trust_remote_code import check skips it (jinja2 comes with transformers' chat templates).
try:
    from jinja2 import TemplateError as _TemplateError
except ImportError:
    _TemplateError = ValueError

ROLES = ("system", "user", "assistant", "observation")
IGNORE_INDEX = -100  # label of positions the loss skips (the cross-entropy default)
# from_pretrained options that transformers 5 keeps among a tokenizer's init kwargs; a saved folder holds none.
LOAD_TIME_KEYS = ("is_local", "local_files_only", "cache_dir", "force_download", "proxies", "token", "revision",
                  "subfolder", "trust_remote_code", "_commit_hash", "use_auth_token")

# ChatGLM2/3: SentencePiece pieces first (<unk> <s> </s>, 256 byte pieces, learned pieces), then these nine.
GLM3_CONTROL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)  # fmt: skip
GLM3_RESERVED_PIECES = ("<unk>", "<s>", "</s>") + tuple(f"<0x{byte:02X}>" for byte in range(256))
# GLM-4: the tiktoken ranks first, then these fourteen.
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

SPACE = "\u2581"  # SentencePiece's "▁": stands for a space, and starts every encoded text (the dummy prefix)
_MARK = "\ue000"  # private-use character that marks a control-token string from user data as text, see _mark
_TIKTOKEN_FIRST_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n")


class ChatFormatError(ValueError, *((_TemplateError,) if _TemplateError is not ValueError else ())):
    """A conversation the GLM chat format cannot render. A ValueError, and a jinja2 TemplateError (what the
    template's raise_exception raises), so callers that probe templates (TRL) catch it either way."""


def _family(glm4):
    """The facts that differ between ChatGLM2/3 and GLM-4 tokenizers."""
    if glm4:
        return dict(prefix=("[gMASK]", "<sop>"), eos="<|endoftext|>", pad="<|endoftext|>", unk=None, bos=None)
    return dict(prefix=("[gMASK]", "sop"), eos="</s>", pad="<unk>", unk="<unk>", bos="<s>")


# The template's Jinja, written once for both families: PREFIX, EOS and the two family-specific pieces are filled
# in by chat_template(). Each rendered message is <|role|> + metadata + "\n" + content; every assistant output (its
# metadata line and content, the role token of the message after it, the final eos) is inside {% generation %}, so
# return_assistant_tokens_mask gives tokenize_conversation's labels.
_TEMPLATE = """
{%- macro py_value(v) -%}
  {%- if v is none -%}None
  {%- elif v is boolean -%}{{ 'True' if v else 'False' }}
  {%- elif v is string or v is number -%}{{ v | tojson }}
  {%- elif v is mapping -%}{{ '{' }}{%- for k, x in v.items() -%}{{ k | tojson }}: {{ py_value(x) }}{{ ', ' if not loop.last }}{%- endfor -%}{{ '}' }}
  {%- elif v is iterable -%}[{%- for x in v -%}{{ py_value(x) }}{{ ', ' if not loop.last }}{%- endfor -%}]
  {%- else -%}{{ raise_exception('tool call arguments must be JSON values') }}
  {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(parts=[], prev='') -%}
{%- if tools -%}
  {%- if messages and messages[0]['role'] == 'system' -%}
    {%- if messages[0]['tools'] is defined and messages[0]['tools'] -%}
      {{- raise_exception('tools are given twice: in tools= and in the system message') -}}
    {%- endif -%}
    {%- set messages = [dict(messages[0], tools=tools)] + messages[1:] -%}
  {%- else -%}
    {%- set messages = [{'role': 'system', 'content': tools | tojson(indent=4)}] + messages -%}
  {%- endif -%}
{%- endif -%}
{%- for message in messages -%}
  {%- set role = 'observation' if message['role'] == 'tool' else message['role'] -%}
  {%- if role not in ['system', 'user', 'assistant', 'observation'] -%}
    {{- raise_exception('unknown role: ' ~ message['role']) -}}
  {%- endif -%}
  {%- set content = message['content'] if message['content'] is defined and message['content'] is not none else '' -%}
  {%- if role == 'observation' and content is not string -%}{%- set content = content | tojson -%}{%- endif -%}
  {%- if content is not string -%}
    {{- raise_exception('content must be a string (tool calls go in tool_calls)') -}}
  {%- endif -%}
  {%- if role == 'system' and message['tools'] is defined and message['tools'] is not none -%}
    {%- set content = content ~ '\\n' ~ (message['tools'] | tojson(indent=4)) -%}
  {%- endif -%}
  {%- set metadata = message['metadata'] if message['metadata'] is defined and message['metadata'] else '' -%}
  {%- set calls = message['tool_calls'] if role == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] else [] -%}
  {%- if not calls or content or metadata -%}
    {%- set ns.parts = ns.parts + [[role, metadata, content]] -%}
  {%- endif -%}
  {%- for call in calls -%}
    {%- set function = call['function'] if call['function'] is defined else call -%}
    {%- set arguments = function['arguments'] if function['arguments'] is defined else {} -%}
    TOOL_CALL
    {%- set ns.parts = ns.parts + [['assistant', function['name'], body]] -%}
  {%- endfor -%}
{%- endfor -%}
{{- PREFIX -}}
{%- for role, metadata, content in ns.parts -%}
  {%- if ns.prev == 'assistant' -%}
    {%- generation -%}{{- '<|' ~ role ~ '|>' -}}{%- endgeneration -%}
  {%- else -%}
    {{- '<|' ~ role ~ '|>' -}}
  {%- endif -%}
  {%- if role == 'assistant' -%}
    {%- generation -%}{{- metadata ~ '\\n' -}}CONTENT{%- endgeneration -%}
  {%- else -%}
    {{- metadata ~ '\\n' -}}CONTENT
  {%- endif -%}
  {%- set ns.prev = role -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {%- if ns.prev == 'assistant' -%}
    {%- generation -%}{{- '<|assistant|>' -}}{%- endgeneration -%}
  {%- else -%}
    {{- '<|assistant|>' -}}
  {%- endif -%}
{%- elif ns.prev == 'assistant' -%}
  {%- generation -%}{{- EOS -}}{%- endgeneration -%}
{%- endif -%}
"""
_GLM3_TOOL_CALL = """
    {%- if arguments is string -%}
      {{- raise_exception('ChatGLM3 tool calls need arguments as a dict, not a JSON string') -}}
    {%- endif -%}
    {%- set call_ns = namespace(text='') -%}
    {%- for key, value in arguments.items() -%}
      {%- set call_ns.text = call_ns.text ~ (', ' if not loop.first else '') ~ key ~ '=' ~ py_value(value) -%}
    {%- endfor -%}
    {%- set body = '```python\\ntool_call(' ~ call_ns.text ~ ')\\n```' -%}"""
_GLM4_TOOL_CALL = "{%- set body = arguments if arguments is string else arguments | tojson -%}"


def chat_template(glm4=False):
    """The Jinja chat template, rendering the same text that `ChatGLMTokenizer.build_chat_input` encodes.

    A message is `<|role|>` + metadata + "\\n" + content. ChatGLM3 encodes metadata + "\\n" and the content
    separately, each with SentencePiece's dummy prefix; in one text, the " " written before a non-empty content is
    that prefix, so the text encodes to the same ids. GLM-4 has no dummy prefix. Besides the GLM message format it
    takes the transformers conventions: `tools=` (added to the system message, or as one), OpenAI's role `tool`
    (an observation) and assistant `tool_calls` (each rendered as the family's tool-call message). A conversation
    that ends with an assistant message ends with eos, and assistant output is marked with `{% generation %}`.

        >>> chat_template()[-30:]
        "{%- endgeneration -%}{%- endif -%}"
    """
    family = _family(glm4)
    content = "{{- content -}}" if glm4 else "{%- if content -%}{{- ' ' ~ content -}}{%- endif -%}"
    template = (_TEMPLATE.replace("TOOL_CALL", (_GLM4_TOOL_CALL if glm4 else _GLM3_TOOL_CALL).strip())
                .replace("PREFIX", repr("".join(family["prefix"]))).replace("EOS", repr(family["eos"]))
                .replace("CONTENT", content))
    # One line: whitespace between tags is trimmed anyway, and a saved tokenizer_config.json stays compact.
    return "".join(line.strip() for line in template.strip().splitlines())


# transformers' response parsing (`response_template`, read by `tokenizer.parse_response`, `get_response_parser`,
# pipelines, `transformers serve` and vLLM's `hf` tool parser): a reply, the text after the prompt's last
# <|assistant|>, becomes an OpenAI message. Its first line is the metadata: empty for an answer (the content follows,
# without the format's "\n" and ChatGLM3's dummy-prefix space), else the name of the tool called, whose arguments
# follow. Only features vLLM 0.32's copy of the parser also has are relied on, except `value_parser_by` (transformers
# >= 5.25; vLLM ignores it and reads every value with the fallback). docs/serving.md lists what it cannot express.
_NAME_LINE = r"\A[ \t]*(?P<function>\S[^\n]*?)[ \t]*\n"
# An answer: an empty metadata line; or, at the end of a reply without any newline, the whole text (as
# process_response reads it).
_CONTENT_OPEN = r"\A(?:[ \t]*\n\s*|(?=[^\n]*\Z))"
_JSON_STRING = r'"(?:[^"\\\n]|\\.)*"'
_PY_STRING = r"'(?:[^'\\\n]|\\.)*'"
# A value of ChatGLM3's tool_call(key=value, ...): a string, a number, a constant, or a bracketed container
# (recursive, strings inside skipped whole); anything else up to the next "," or ")" is caught too, so that it is
# not silently dropped.
_PY_VALUE = (r"(?P<value>(?P<kind>True|False)\b|(?P<kind>')" + _PY_STRING[1:] + "|" + _JSON_STRING
             + r"|-?\d[\w.+-]*|(?P<bracket>[\[{(](?:[^\[\]{}()\"']|" + _JSON_STRING + "|" + _PY_STRING
             + r"|(?&bracket))*[\]})])|[^,()\s][^,()]*)")


def response_template(glm4=False):
    """The family's response-parsing schema, which `ChatGLMTokenizer` carries and `save_pretrained` writes into
    tokenizer_config.json (so do `convert_glm.py --to native` folders).

        >>> tokenizer.parse_response('get_weather\\n{"city": "北京"}', prefix="")   # GLM-4
        {'role': 'assistant', 'tool_calls': [{'type': 'function', 'function': {'name': 'get_weather',
         'arguments': {'city': '北京'}}}]}
    """
    stops = ["<|endoftext|>" if glm4 else "</s>", "<|user|>", "<|observation|>"]  # stop_token_ids, when kept
    if glm4:
        # The JSON object, also inside a ``` fence (as parse_tool_call takes it); text that is no JSON comes back as
        # the arguments string, as OpenAI's API may return it, rather than failing the whole reply.
        # (Either a fence line or the first character of the JSON decides the opening, so that a stream never
        # commits to "no fence" before it has seen which.)
        opening, stops = _NAME_LINE + r"(?:[ \t]*```[^\n]*\n|(?=\s*[^`\s]))", stops + ["```"]
        arguments = {"content": "json", "content_args": {"allow_non_json": True}}
    else:
        opening = _NAME_LINE
        # tool_call(a=1, b="x") inside a ```python fence: each key=value pair, each value JSON (a Python literal
        # that is also JSON), True/False, None, or a single-quoted string without escapes.
        tag = r"(?<=tool_call\(\s*|,\s*)(?P<key>[A-Za-z_]\w*)\s*=\s*(?:(?P<kind>None)\b(?=\s*[,)])|" + _PY_VALUE + ")"
        arguments = {"content": "xml-inline", "content_args": {
            "tag_pattern": tag,
            "value_parser": {"name": "json", "args": {"allow_non_json": True}},
            "value_parser_by": {"group": "kind", "parsers": {
                "None": None, "True": {"name": "bool"}, "False": {"name": "bool"},
                "'": {"name": "json", "args": {"string_delims": [["'", "'"]], "allow_non_json": True}}}}}}
    return {
        "start_anchor": "<|assistant|>",
        "defaults": {"role": "assistant"},
        "fields": {
            "content": {"open_pattern": _CONTENT_OPEN, "close": stops[:3], "content": "text"},
            "tool_calls": {
                "open_pattern": opening, "close": stops, "repeats": True, **arguments,
                "transform": {"type": "function", "function": {"name": "{function}", "arguments": "{content}"}},
            },
        },
    }


def _py_literal(value):
    """A JSON value written as a Python literal whose strings are JSON strings (what the template's py_value
    writes): tool_call(city="北京", days=3, ok=True, x=None)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_py_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    raise ValueError(f"tool call arguments must be JSON values, got {type(value).__name__} {value!r:.40}")


def format_tool_call(name, parameters, glm4=False):
    """Render a tool call into the (metadata, content) of the family's tool-call message.

    ChatGLM3 writes a Python call in a fenced block (each value a Python literal, strings as JSON strings), GLM-4
    writes the JSON object. `parameters` is a dict, or (OpenAI's form) a string holding a JSON object.

        >>> format_tool_call("get_weather", {"city": "北京", "days": 3})
        ('get_weather', '```python\\ntool_call(city="北京", days=3)\\n```')
        >>> format_tool_call("get_weather", {"city": "北京"}, glm4=True)
        ('get_weather', '{"city": "北京"}')
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a non-empty string name, got {name!r}")
    if isinstance(parameters, str):
        if glm4:
            if not isinstance(_json_object(parameters), dict):
                raise ValueError(f"tool call arguments must be a JSON object, got {parameters!r:.60}")
            return name, parameters  # as written, so the text equals what the template renders
        parameters = _json_object(parameters)
    if not isinstance(parameters, dict):
        raise ValueError(f"tool call parameters must be a dict, got {type(parameters).__name__}")
    if glm4:
        return name, json.dumps(parameters, ensure_ascii=False)
    for key in parameters:
        if not (isinstance(key, str) and key.isidentifier()):
            raise ValueError(f"tool call parameter names must be Python identifiers, got {key!r}")
    arguments = ", ".join(f"{key}={_py_literal(value)}" for key, value in parameters.items())
    return name, f"```python\ntool_call({arguments})\n```"


def _json_object(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"tool call arguments are not valid JSON ({error}): {text!r:.60}") from None


def _tool_call_fields(call):
    """(name, arguments) of one OpenAI-style tool call: {"type": "function", "function": {"name", "arguments"}},
    or {"name", "arguments"}."""
    if not isinstance(call, dict):
        raise ValueError(f"a tool call must be a dict, got {type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, dict):
        raise ValueError(f"a tool call's 'function' must be a dict, got {type(function).__name__}")
    return function.get("name"), function.get("arguments", {})


def _format_message(index, message, glm4):
    """One message as the [(role, metadata, content)] it renders to: a system message's tools appended to its
    content, role `tool` as an observation, a parsed reply dict or each OpenAI tool call as a tool-call message."""
    if not isinstance(message, dict):
        raise ChatFormatError(f"message {index}: expected a dict, got {type(message).__name__}")
    role, content, metadata = message.get("role"), message.get("content"), message.get("metadata") or ""
    role = "observation" if role == "tool" else role
    if role not in ROLES:
        raise ChatFormatError(f"message {index}: unknown role {message.get('role')!r}, expected one of "
                              f"{ROLES + ('tool',)}")
    if not isinstance(metadata, str):
        raise ChatFormatError(f"message {index}: metadata must be a string, got {type(metadata).__name__}")
    calls = message.get("tool_calls") if role == "assistant" else None
    try:
        if role != "observation" or _is_parts(content):  # a tool's result may be a JSON list of its own
            content = content_text(content)
        if role == "assistant" and isinstance(content, dict):
            # A reply that model.chat parsed: a tool call, or another channel's {"name", "content"}.
            if "parameters" in content:
                metadata, content = format_tool_call(content.get("name"), content["parameters"], glm4)
            else:
                metadata, content = content.get("name"), content.get("content")
                if not (isinstance(metadata, str) and isinstance(content, str)):
                    raise ValueError("a dict reply needs a 'name' and 'parameters' or 'content'")
        if content is None and (calls or role == "observation"):
            content = ""
        if role == "observation" and isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        if not isinstance(content, str):
            raise ValueError(f"content must be a string, got {type(content).__name__}")
        if role == "system" and message.get("tools") is not None:
            content += "\n" + json.dumps(_tool_schemas(message["tools"]), indent=4, ensure_ascii=False)
        if calls is not None and not isinstance(calls, (list, tuple)):
            raise ValueError(f"tool_calls must be a list, got {type(calls).__name__}")
        parts = [(role, metadata, content)] if not calls or content or metadata else []
        for call in calls or ():
            parts.append(("assistant", *format_tool_call(*_tool_call_fields(call), glm4=glm4)))
        for _, part_metadata, part_content in parts:
            check_surrogates(part_metadata, "metadata")
            check_surrogates(part_content, "content")
    except ValueError as error:
        raise ChatFormatError(f"message {index}: {error}") from None
    return parts


def content_text(content):
    """A message's content as text: a string as it is, or OpenAI's content parts ([{"type": "text", "text": ...}],
    as OpenAI's API and TRL send them) joined; a part of another type (an image) cannot be rendered by a text
    model and is refused naming it."""
    if not isinstance(content, (list, tuple)):
        return content
    texts = []
    for number, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content part {number} is {kind!r}: only text parts ({{'type': 'text', 'text': "
                             "...}) can be rendered")
        texts.append(part["text"])
    return "".join(texts)


def _is_parts(content):
    return isinstance(content, (list, tuple)) and bool(content) and all(
        isinstance(part, dict) and "type" in part for part in content)


def _tool_schemas(tools):
    """Tools as JSON: Python functions become their JSON schema, as transformers' apply_chat_template does. Each
    tool is a JSON object (OpenAI's {"type": "function", "function": {...}} or ChatGLM3's {"name", ...})."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list, got {type(tools).__name__}")
    for number, tool in enumerate(tools):
        if not (isinstance(tool, dict) or callable(tool)):
            raise ValueError(f"tools[{number}] must be a JSON object (a function schema) or a Python function, "
                             f"got {type(tool).__name__}: {tool!r:.40}")
    if any(callable(tool) for tool in tools):
        from transformers.utils import get_json_schema

        return [get_json_schema(tool) if callable(tool) else tool for tool in tools]
    return list(tools)


def chat_parts(messages, tools=None, glm4=False):
    """A conversation checked and flattened into the [(role, metadata, content)] messages the chat template
    renders (one place for the format; the tokenizer encodes these, train.py collects their text).

    `tools` (the transformers `tools=` argument) go into the first system message (after its content and a
    newline, as a system message's own `tools`), or make a system message of their own holding their JSON. Errors are `ChatFormatError` naming the message index.

        >>> chat_parts([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
        ...             "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}])
        [('user', '', 'hi'), ('assistant', 'f', '```python\\ntool_call(x=1)\\n```')]
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"messages must be a list of dicts, got {type(messages).__name__}")
    numbered = list(enumerate(messages))
    if tools is not None:
        first = messages[0] if messages else None
        if isinstance(first, dict) and first.get("role") == "system":
            if first.get("tools"):
                raise ChatFormatError("tools are given twice: in tools= and in the system message")
            numbered[0] = (0, {**first, "tools": tools})
        else:
            # A system message of its own holds just the tools' JSON.
            schemas = json.dumps(_tool_schemas(tools), indent=4, ensure_ascii=False)
            numbered.insert(0, ("tools=", {"role": "system", "content": schemas}))
    return [part for index, message in numbered for part in _format_message(index, message, glm4)]


def _template_messages(messages, glm4):
    """The messages as the template takes them: our own reply dicts rendered to text, and (ChatGLM3) JSON-string
    tool-call arguments parsed, so the Jinja template only meets the standard forms."""
    prepared = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), (list, tuple)) and (
                message.get("role") not in ("tool", "observation") or _is_parts(message["content"])):
            message = {**message, "content": content_text(message["content"])}
        if isinstance(message, dict) and message.get("role") == "assistant":
            message = dict(message)
            if isinstance(message.get("content"), dict):
                reply = _format_message(0, {**message, "tool_calls": None}, glm4)[0]
                message["metadata"], message["content"] = reply[1], reply[2]
            if message.get("tool_calls") and not glm4:
                message["tool_calls"] = [
                    {"function": {"name": name, "arguments": _json_object(arguments)
                                  if isinstance(arguments, str) else arguments}}
                    for name, arguments in map(_tool_call_fields, message["tool_calls"])
                ]
        if isinstance(message, dict) and message.get("role") == "system" and message.get("tools") is not None:
            message = {**message, "tools": _tool_schemas(message["tools"])}
        prepared.append(message)
    return prepared


# ---------------------------------------------------------------------------------------------------------------
# Building the `tokenizers` pipelines


def _regex_class(chars):
    """An Oniguruma character class body matching exactly `chars`, as code-point ranges."""
    ranges = []
    for code in sorted(map(ord, chars)):
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)


def _glm3_split_pattern(pieces):
    """Pre-tokenizer pattern that cuts text only where SentencePiece's BPE can never merge across.

    SentencePiece runs BPE over the whole text. No ChatGLM piece has "▁" after another character, so cutting before
    a "▁" that follows a character gives the same ids while keeping BPE words short (linear time on multi-megabyte
    text with spaces). ASCII characters in no multi-character piece (digits, newline, tab, control characters)
    never merge either, so lines and digit runs are cut off too. (Not every such character: a class of thousands
    of code points slows the regex by a third.)
    """
    multi = [piece for piece in pieces if len(piece) > 1]
    if any(re.search(f"[^{SPACE}]{SPACE}", piece) for piece in multi):
        raise ValueError("unsupported SentencePiece model: a piece has '▁' after another character")
    mergeable = set("".join(multi))
    lone = [chr(code) for code in range(128) if chr(code) not in mergeable and chr(code) != " "]
    return f"{SPACE}*[^{SPACE}{_regex_class(lone)}]+|{SPACE}+"


def _added(tokens, single_word=()):
    return [AddedToken(t, special=True, normalized=False, single_word=t in single_word) for t in tokens]


def _finish(tokenizer, specials, prefix, eos):
    """Add the special tokens and the [gMASK] sop prefix (no BOS; a pair also gets EOS, as the original did)."""
    tokenizer.add_special_tokens(specials)
    ids = {token: tokenizer.token_to_id(token) for token in (*prefix, eos)}
    head = " ".join(prefix)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{head} $A", pair=f"{head} $A $B {eos}", special_tokens=list(ids.items())
    )
    return tokenizer


def _glm3_normalizer():
    """SentencePiece's normalization for ChatGLM: the dummy prefix, then spaces as "▁" (nothing else changes)."""
    return normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])


def _glm3_tokenizer(pieces, merges):
    """ChatGLM2/3's pipeline: byte-fallback BPE, dummy prefix, spaces as "▁", then the nine control tokens."""
    if tuple(pieces[: len(GLM3_RESERVED_PIECES)]) != GLM3_RESERVED_PIECES:
        raise ValueError("expected <unk> <s> </s> and the byte pieces <0x00>..<0xFF> at ids 0..258")
    vocab = {piece: index for index, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = _glm3_normalizer()
    pattern = Regex(_glm3_split_pattern(pieces[len(GLM3_RESERVED_PIECES) :]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern, behavior="isolated")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # "sop"/"eop" are also English substrings ("Aesop"): when a caller turns control-token matching on
    # (split_special_tokens=False), match them only as whole words.
    specials = _added(GLM3_RESERVED_PIECES[:3]) + _added(GLM3_CONTROL_TOKENS, single_word=("sop", "eop"))
    return _finish(tokenizer, specials, _family(False)["prefix"], "</s>")


def _sentencepiece_to_tokenizer(model_bytes):
    """Convert ChatGLM2/3's SentencePiece model. SentencePiece merges the adjacent pair whose union has the best
    score; BPE merges ranked by that score (derived from the pieces, as tiktoken-to-HF converters do) agree."""
    # Inside try: transformers' trust_remote_code import check skips these, so tokenizer.json needs no sentencepiece.
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise ImportError("converting ChatGLM's tokenizer.model needs `pip install sentencepiece protobuf`") from error

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if not (
        spec.model_type == spec.BPE
        and spec.byte_fallback
        and norm.name == "identity"
        and norm.add_dummy_prefix
        and not norm.remove_extra_whitespaces
        and norm.escape_whitespaces
        and not spec.treat_whitespace_as_suffix
    ):
        raise ValueError("unsupported SentencePiece model: expected ChatGLM's byte-fallback BPE conventions")
    pieces = [piece.piece for piece in proto.pieces]
    normal = {piece.piece: (-piece.score, index) for index, piece in enumerate(proto.pieces) if piece.type == 1}
    merges = []
    for piece in sorted(normal, key=normal.get):
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in normal and b in normal]
        merges += sorted(splits, key=lambda ab: (normal[ab[0]][1], normal[ab[1]][1]))
    return _glm3_tokenizer(pieces, merges)


def _bytes_to_unicode():
    """GPT-2's printable stand-in character for each byte (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {byte: chr(byte) for byte in printable} | {byte: chr(256 + n) for n, byte in enumerate(others)}


def _tiktoken_to_tokenizer(ranks_text):
    """Convert a GLM-4 tiktoken ranks file (`base64(bytes) rank` per line) into byte-level BPE.

    tiktoken merges the adjacent pair whose union has the lowest rank, and emits a pre-token that is itself in the
    ranks as one token (BPE's `ignore_merges`); merges are ranked by the rank of their union."""
    ranks = {}
    for line in ranks_text.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tiktoken ranks must be 0..n-1, each once")
    byte_char = _bytes_to_unicode()
    as_text = {token: "".join(byte_char[b] for b in token) for token in ranks}
    merges = []
    for token in sorted(ranks, key=ranks.get):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in ranks and b in ranks]
        merges += [(as_text[a], as_text[b]) for a, b in sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))]
    vocab = {as_text[token]: rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return _finish(tokenizer, _added(GLM4_SPECIAL_TOKENS), _family(True)["prefix"], "<|endoftext|>")


def convert_tokenizer_model(path):
    """Build the `tokenizers.Tokenizer` for an original GLM `tokenizer.model`: ChatGLM2/3's SentencePiece model
    (needs `sentencepiece` and `protobuf`) or GLM-4's tiktoken ranks (needs nothing), told apart by content.

        >>> convert_tokenizer_model("chatglm3-6b/tokenizer.model").get_vocab_size()
        64798
    """
    with open(path, "rb") as file:
        data = file.read()
    if _TIKTOKEN_FIRST_LINE.match(data):
        return _tiktoken_to_tokenizer(data.decode("utf-8"))
    return _sentencepiece_to_tokenizer(data)


def _check_text(text, name="text"):
    """Raise TypeError naming the type unless `text` is a str, a list of str, or a list of lists of str, and
    ValueError for a lone surrogate in it (see `check_surrogates`)."""
    for item in text if isinstance(text, (list, tuple)) else [text]:
        for piece in item if isinstance(item, (list, tuple)) else [item]:
            if not isinstance(piece, str):
                raise TypeError(f"{name} must be a str or a list of str, got {type(piece).__name__}")
            check_surrogates(piece, name)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_surrogates(text, name="text"):
    """Refuse a lone surrogate (U+D800-U+DFFF: valid in JSON's \\ud800 and in Python strings, but no character, and
    not encodable as UTF-8). Nothing is replaced: the ValueError names the place and the code point, so the data
    can be fixed at its source (docs/tokenizer.md)."""
    match = _SURROGATE.search(text)
    if match:
        raise ValueError(f"{name} holds a lone surrogate U+{ord(match.group()):04X} at character {match.start()} "
                         "(not a character; UTF-8 cannot encode it): fix or drop it in the source text")


def _mark(obj, pattern):
    """Prefix each control-token string (and each marker) in user data with the marker, recursively."""
    if isinstance(obj, str):
        return pattern.sub(lambda match: _MARK + match.group(0), obj)
    if isinstance(obj, dict):
        return {_mark(key, pattern): _mark(value, pattern) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(value, pattern) for value in obj]
    return obj


def _overlap_mask(token_spans, generation_spans):
    """1 for each token whose text overlaps a {% generation %} span, else 0 (both lists in text order)."""
    mask, index = [], 0
    for start, end in token_spans:
        while index < len(generation_spans) and start >= generation_spans[index][1]:
            index += 1
        inside = index < len(generation_spans) and end > generation_spans[index][0]
        mask.append(int(inside))
    return mask


# transformers 4.x returns a list of ids from apply_chat_template by default, 5.x a BatchEncoding: keep each one's.
_RETURN_DICT_DEFAULT = inspect.signature(PreTrainedTokenizerFast.apply_chat_template).parameters["return_dict"].default


class SentencePieceTokenizer:
    """What ChatGLM2/3's original `tokenizer.tokenizer` (its SPTokenizer) offered converters: `sp_model`, a
    `sentencepiece.SentencePieceProcessor` of the tokenizer.model, `special_tokens` (control token -> id), `n_words`,
    `bos_id`, `eos_id`, `pad_id`. Checked against tokenizer.json so a converter never reads a mismatched file."""

    def __init__(self, model_file, special_tokens, backend=None):
        try:
            import sentencepiece
        except ImportError as error:
            raise ImportError("tokenizer.tokenizer of a ChatGLM3 tokenizer needs `pip install sentencepiece`") \
                from error

        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.n_words = self.sp_model.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id()
        self.special_tokens = {token: i for token, i in special_tokens.items() if i >= self.n_words}
        if backend is not None:
            pieces = [self.sp_model.id_to_piece(i) for i in range(self.n_words)]
            if pieces != [backend.id_to_token(i) for i in range(self.n_words)] or sorted(self.special_tokens.values()) \
                    != list(range(self.n_words, self.n_words + len(self.special_tokens))):
                raise ValueError(f"{model_file} does not match tokenizer.json: the pieces differ")


def _tiktoken_encoding(ranks_file, specials, n_ranks):
    """GLM-4's original `tokenizer.tokenizer`: a tiktoken.Encoding of the ranks file and the special tokens."""
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError as error:
        raise ImportError("tokenizer.tokenizer of a GLM-4 tokenizer needs `pip install tiktoken`") from error

    ranks = load_tiktoken_bpe(str(ranks_file))
    if len(ranks) != n_ranks:
        raise ValueError(f"{ranks_file} has {len(ranks)} ranks but tokenizer.json {n_ranks} tokens")
    specials = {token: i for token, i in specials.items() if i >= n_ranks}
    return tiktoken.Encoding("glm4", pat_str=GLM4_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


class ChatGLMTokenizer(PreTrainedTokenizerFast):
    """Fast tokenizer for ChatGLM2/3 and GLM-4, with the original chat API.

        >>> tokenizer = ChatGLMTokenizer.from_pretrained("path/with/tokenizer.model")  # or tokenizer.json
        >>> tokenizer.encode("\\n", add_special_tokens=False)
        [30910, 13]
        >>> tokenizer.stop_token_ids
        [2, 64795, 64797]
    """

    vocab_files_names = {"vocab_file": "tokenizer.model", "tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file=None, tokenizer_file=None, tokenizer_object=None, **kwargs):
        if tokenizer_object is None and tokenizer_file is None:
            if vocab_file is None:
                raise ValueError("ChatGLMTokenizer needs tokenizer.json or the original tokenizer.model")
            tokenizer_object = convert_tokenizer_model(vocab_file)
            # The Hub's tokenizer_config.json lists some control tokens as plain text; the conversion defines them.
            kwargs.pop("added_tokens_decoder", None)
        # Rendered chat text tokenizes to control tokens, as engines and eval harnesses expect; our own chat paths
        # keep control strings typed inside messages as text whatever this says (see the module docstring).
        kwargs.setdefault("split_special_tokens", False)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(tokenizer_file=tokenizer_file, tokenizer_object=tokenizer_object, **kwargs)
        self.vocab_file = vocab_file
        self.is_glm4 = self.backend_tokenizer.token_to_id("<sop>") is not None
        family = _family(self.is_glm4)
        for name in ("eos", "pad", "unk"):
            if family[name] is not None and getattr(self, f"{name}_token") is None:
                setattr(self, f"{name}_token", family[name])
        # llama.cpp adds at most one BOS. gguf's SpecialVocab (in its converter) reads the template's first token,
        # [gMASK], as that BOS unless bos_token and cls_token name another one; then the GGUF says "add no BOS" and
        # prompts carry the whole prefix (the chat template writes it). The tokens follow RoBERTa (<s>) and GPT-2
        # (<|endoftext|>); the ids of encode() do not change. See docs/engines.md.
        for name in ("bos", "cls"):
            if getattr(self, f"{name}_token") is None:
                setattr(self, f"{name}_token", "<|endoftext|>" if self.is_glm4 else "<s>")
        if self.chat_template is None:
            self.chat_template = chat_template(self.is_glm4)
        # transformers 5.25 reads and saves it (4.57 has no response parsing: the attribute is then unused).
        if getattr(self, "response_template", None) is None:
            self.response_template = response_template(self.is_glm4)
        self._specials = {token.content: i for i, token in self.added_tokens_decoder.items() if token.special}
        self._aliases = {"<eos>": family["eos"], "<pad>": family["pad"], "<unk>": family["unk"], "<bos>": family["bos"]}
        self._prefix_ids = [self._specials[token] for token in family["prefix"]]
        controls = "|".join(map(re.escape, sorted(self._specials, key=len, reverse=True)))
        self._user_control_re = re.compile(f"{controls}|{_MARK}")
        self._template_control_re = re.compile(f"{_MARK}({controls}|{_MARK})|({controls})")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As PreTrainedTokenizerBase.from_pretrained; a truncated or damaged tokenizer file of a local folder is
        named (the JSON parser's own error names no file)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            folder = pretrained_model_name_or_path
            if not (isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder)):
                raise
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                path = os.path.join(folder, name)
                try:
                    if os.path.isfile(path):
                        with open(path, encoding="utf-8") as f:
                            json.load(f)
                except ValueError as damaged:
                    raise OSError(f"{path} is damaged (truncated?): {damaged}; copy or download it again") from error
            raise

    @classmethod
    def convert_to_native_format(cls, **kwargs):
        # transformers 5 calls this before __init__ to convert vocab files with its own converters; this class
        # converts the GLM files itself, so it takes the arguments unchanged.
        return kwargs

    # -- plain encoding --------------------------------------------------------------------------------------------

    def __call__(self, text=None, *args, **kwargs):
        if text is not None or kwargs.get("text_target") is None:
            _check_text(text)
        return super().__call__(text, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        _check_text(text)
        return super().encode(text, *args, **kwargs)

    @contextlib.contextmanager
    def _plain_backend(self, encode_special_tokens):
        """The backend with no padding or truncation (an earlier `tokenizer(..., padding=True)` or `truncation=True`
        leaves them set on it) and the given control-token matching; restored afterwards."""
        backend = self.backend_tokenizer
        padding, truncation, special = backend.padding, backend.truncation, backend.encode_special_tokens
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = encode_special_tokens
        try:
            yield backend
        finally:
            backend.encode_special_tokens = special
            if padding is not None:
                backend.enable_padding(**padding)
            if truncation is not None:
                backend.enable_truncation(**truncation)

    def _encode_texts(self, texts, offsets=False):
        """Ids of each text (or its `tokenizers.Encoding`s, with offsets), control-token strings as text and no
        prefix."""
        with self._plain_backend(encode_special_tokens=True) as backend:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
        return encodings if offsets else [encoding.ids for encoding in encodings]

    def get_command(self, token):
        """The id of a control token, as the original API: `get_command("<|user|>")` -> 64795; also "<eos>",
        "<pad>", "<unk>", "<bos>" (ChatGLM3 only)."""
        token_id = self._specials.get(self._aliases.get(token, token))
        if token_id is None:
            raise KeyError(f"{token!r} is not a control token of this tokenizer")
        return token_id

    def encode_batch_ids(self, texts, add_special_tokens=True, split_special_tokens=None):
        """Token ids of many texts at once: the fastest way to tokenize a corpus.

        The same ids as `self(texts)["input_ids"]`, encoded in parallel by `tokenizers` without the character
        offsets that `__call__` has it compute (about 1.4x faster on 4 MB of text; see benchmarks/bench_tokenizer.py).
        `split_special_tokens=True` keeps control-token strings in the texts as text (train.py does, for corpora).

        Example:
            >>> tokenizer.encode_batch_ids(["你好", "hello"])
            [[64790, 64792, 36474, 54591], [64790, 64792, 24954]]
        """
        if isinstance(texts, str):  # a str is one text, not a batch of characters
            raise TypeError("texts must be a list of str (a batch); for one text use encode_batch_ids([text])")
        texts = list(texts)
        _check_text(texts, "texts")
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        with self._plain_backend(encode_special_tokens=split) as backend:
            # encode_batch_fast (tokenizers >= 0.21) skips the offsets; the ids are those of encode_batch.
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [encoding.ids for encoding in encode(texts, add_special_tokens=add_special_tokens)]

    def get_prefix_tokens(self):
        """[gMASK] sop (GLM-4: [gMASK] <sop>), the ids that start every prompt, as the original API."""
        return list(self._prefix_ids)

    def stream_decoder(self, skip_special_tokens=True):
        """A `StreamDecoder` for this tokenizer (for code that holds a tokenizer loaded with trust_remote_code)."""
        return StreamDecoder(self, skip_special_tokens)

    @property
    def stop_token_ids(self):
        """Ids that end a reply: eos, <|user|>, <|observation|> ([2, 64795, 64797] for ChatGLM3)."""
        return [self.eos_token_id, self.get_command("<|user|>"), self.get_command("<|observation|>")]

    # -- what converters read from the original tokenizers -----------------------------------------------------------
    # llama.cpp's convert_hf_to_gguf.py and chatglm.cpp's convert.py load a folder with AutoTokenizer and then read the
    # original tokenizers' internals. This is that surface, documented in docs/engines.md; normal use never builds it.

    @property
    def tokenizer(self):
        """The original tokenizer's inner object, built on first use from the folder's tokenizer.model.

        ChatGLM2/3: a `SentencePieceTokenizer` (`.sp_model` is a `sentencepiece.SentencePieceProcessor`, plus
        `special_tokens`, `n_words`, `bos_id`, `eos_id`, `pad_id`); GLM-4: a `tiktoken.Encoding`. Needs sentencepiece
        or tiktoken, and the tokenizer.model this tokenizer was made from."""
        if getattr(self, "_original_tokenizer", None) is None:
            if not (self.vocab_file and os.path.isfile(self.vocab_file)):
                raise ValueError(
                    "tokenizer.tokenizer (read by llama.cpp's and chatglm.cpp's converters) needs the original "
                    "tokenizer.model beside tokenizer.json; this tokenizer has none"
                )
            specials = {token.content: i for i, token in self.added_tokens_decoder.items()}
            if self.is_glm4:
                n_ranks = self.backend_tokenizer.get_vocab_size(with_added_tokens=False)
                self._original_tokenizer = _tiktoken_encoding(self.vocab_file, specials, n_ranks)
            else:
                self._original_tokenizer = SentencePieceTokenizer(self.vocab_file, specials, self.backend_tokenizer)
        return self._original_tokenizer

    def _convert_id_to_token(self, index):
        # The original ChatGLM3 tokenizer's method, which llama.cpp's converter calls for every row of the padded
        # embedding: "" for ids past the vocabulary, as the original returned (the base class returns None).
        token = self.backend_tokenizer.id_to_token(int(index))
        return "" if token is None else token

    # -- the chat format -------------------------------------------------------------------------------------------

    def _messages_ids(self, messages, tools=None):
        """Per rendered message: <|role|> + encode(metadata + "\\n") + encode(content) (see `chat_parts`), with
        the role of each and the ids, checked and encoded in one batch."""
        parts = chat_parts(messages, tools, self.is_glm4)
        texts = [text for _, metadata, content in parts for text in (metadata + "\n", content)]
        encoded = self._encode_texts(texts) if texts else []
        return [(role, [self.get_command(f"<|{role}|>")] + encoded[2 * i] + encoded[2 * i + 1])
                for i, (role, _, _) in enumerate(parts)]

    def build_single_message(self, role, metadata, message):
        """`<|role|>` + encode(metadata + "\\n") + encode(message), no prefix tokens.

        >>> tokenizer.build_single_message("user", "", "你好")
        [64795, 30910, 13, 36474, 54591]
        """
        return self._messages_ids([{"role": role, "metadata": metadata, "content": message}])[0][1]

    def build_chat_input(self, query, history=None, role="user"):
        """The prompt for the model's reply, as the original ChatGLM3 API: [gMASK] sop, each history message, the
        query as a `role` message, then <|assistant|>. History items are {"role", "content"[, "metadata", "tools"]};
        an assistant content may be a parsed tool call {"name", "parameters"}; OpenAI's `tool_calls` and role
        `tool` work too. Independent of any padding or truncation set on the tokenizer by an earlier call.

        >>> tokenizer.build_chat_input("你好")["input_ids"].tolist()
        [[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]]
        """
        messages = [*(history or []), {"role": role, "content": query}]
        ids = self.get_prefix_tokens()
        for _, message_ids in self._messages_ids(messages):
            ids += message_ids
        ids.append(self.get_command("<|assistant|>"))
        return BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * len(ids)]}, tensor_type="pt")

    def tokenize_conversation(self, messages, max_length=None, tools=None):
        """Ids and labels for supervised fine-tuning.

        Labels are IGNORE_INDEX (-100) except on each assistant reply (its metadata line and content, after its
        <|assistant|> token) and on the token that stops it: the next message's role token, or an eos appended
        when the conversation ends with a reply. Truncated on the right to `max_length`. The same ids and label
        positions as `apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)`.

            >>> out = tokenizer.tokenize_conversation([{"role": "user", "content": "hi"},
            ...                                        {"role": "assistant", "content": "hello"}])
            >>> sorted(out)
            ['input_ids', 'labels']
        """
        if not messages:
            raise ChatFormatError("messages must be a non-empty list")
        input_ids = self.get_prefix_tokens()
        labels = [IGNORE_INDEX] * len(input_ids)
        previous = None
        for role, ids in self._messages_ids(messages, tools):
            input_ids += ids
            labels.append(ids[0] if previous == "assistant" else IGNORE_INDEX)
            labels += ids[1:] if role == "assistant" else [IGNORE_INDEX] * (len(ids) - 1)
            previous = role
        if previous == "assistant":
            input_ids.append(self.eos_token_id)
            labels.append(self.eos_token_id)
        return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}

    def apply_chat_template(
        self,
        conversation,
        tools=None,
        documents=None,
        chat_template=None,
        add_generation_prompt=False,
        continue_final_message=False,
        *,
        tokenize=True,
        padding=False,
        truncation=False,
        max_length=None,
        return_tensors=None,
        return_dict=None,
        return_assistant_tokens_mask=False,
        tokenizer_kwargs=None,
        **kwargs,
    ):
        """transformers' apply_chat_template, with the ids of `build_chat_input` / `tokenize_conversation`.

        With tokenize=False the text is returned: encoding it with this tokenizer's defaults (or a plain
        `PreTrainedTokenizerFast` on tokenizer.json, as engines do) gives the same ids, except that control-token
        strings users typed inside messages then become control tokens. With tokenize=True those stay text: they are
        marked before rendering and the rendered text is encoded piece by piece. `return_assistant_tokens_mask=True`
        marks the tokens `tokenize_conversation` trains on. Bad messages raise `ChatFormatError`.

            >>> tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
            ...                               return_dict=False)
            [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
        """
        kwargs.pop("sanitize_control_tokens", None)  # transformers 5 option; always done here when tokenizing
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        chats = [list(chat) for chat in (conversation if batched else [conversation])]
        for chat in chats:
            chat_parts(chat, tools, self.is_glm4)  # checks every message, naming the bad one
        chats = [_template_messages(chat, self.is_glm4) for chat in chats]
        options = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
        if not tokenize:
            texts = super().apply_chat_template(chats, tools=tools, documents=documents, chat_template=chat_template,
                                                tokenize=False, **options, **kwargs)
            return texts if batched else texts[0]
        return_dict = _RETURN_DICT_DEFAULT if return_dict is None else return_dict
        if return_assistant_tokens_mask and (continue_final_message or not return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs return_dict=True and no continue_final_message")
        texts, spans = render_jinja_template(
            conversations=[_mark(chat, self._user_control_re) for chat in chats],
            tools=_mark(tools, self._user_control_re), documents=documents,
            chat_template=self.get_chat_template(chat_template, tools),
            return_assistant_tokens_mask=return_assistant_tokens_mask, **options,
            **{**self.special_tokens_map, **kwargs},
        )
        encoded = [self._encode_rendered(text) for text in texts]
        ids = [token_ids for token_ids, _ in encoded]
        masks = [_overlap_mask(token_spans, generation) for (_, token_spans), generation in zip(encoded, spans)] \
            if return_assistant_tokens_mask else None
        if truncation and max_length is not None:
            cut = (lambda x: x[:max_length]) if self.truncation_side == "right" else (lambda x: x[-max_length:])
            ids = [cut(x) for x in ids]
            masks = masks and [cut(x) for x in masks]
        if not return_dict:
            if return_tensors is not None:
                return BatchEncoding({"input_ids": ids}, tensor_type=return_tensors)["input_ids"]
            return ids if batched else ids[0]
        inputs = {"input_ids": ids if batched or return_tensors else ids[0]}
        out = self.pad(inputs, padding=padding, max_length=max_length, **(tokenizer_kwargs or {}))
        if masks is not None:
            width = [len(x) for x in (out["input_ids"] if batched or return_tensors else [out["input_ids"]])]
            left = self.padding_side == "left"
            masks = [[0] * (w - len(m)) + m if left else m + [0] * (w - len(m)) for m, w in zip(masks, width)]
            out["assistant_masks"] = masks if batched or return_tensors else masks[0]
        if return_tensors:
            out.convert_to_tensors(return_tensors)
        return out

    def _encode_rendered(self, text):
        """Encode a chat rendered from marked messages: control strings are control tokens, marked ones text.
        Returns the ids and each token's (start, end) in `text`."""
        chunks, controls, position = [[]], [], 0  # a chunk: (piece of plain text, where it starts in `text`)
        for match in self._template_control_re.finditer(text):
            piece = text[position : match.start()]
            if _MARK in piece:
                raise ValueError("the chat template split a marked control token; it must write message strings whole")
            chunks[-1].append((piece, position))
            if match.group(1) is not None:
                chunks[-1].append((match.group(1), match.start(1)))
            else:
                controls.append((self._specials[match.group(2)], match.span(2)))
                chunks.append([])
            position = match.end()
        chunks[-1].append((text[position:], position))
        ids, spans = [], []
        encodings = self._encode_texts(["".join(piece for piece, _ in chunk) for chunk in chunks], offsets=True)
        for chunk, encoding, control in zip(chunks, encodings, [*controls, None]):
            where = [start + i for piece, start in chunk for i in range(len(piece))]  # chunk index -> text index
            ids += encoding.ids
            for start, end in encoding.offsets:
                first = where[start] if start < len(where) else len(text)
                spans.append((first, where[end - 1] + 1 if end > start else first + 1))
            if control is not None:
                ids.append(control[0])
                spans.append(control[1])
        return ids, spans

    def save_pretrained(self, save_directory, **kwargs):
        """Save tokenizer.json and tokenizer_config.json (auto_map and the chat template inside), this file for
        trust_remote_code, and the original tokenizer.model when there is one (engines such as chatglm.cpp read it).
        Options of the load that wrote this tokenizer (`local_files_only`, ...) are not written."""
        kwargs.setdefault("save_jinja_files", False)  # the template inside tokenizer_config.json, as Hub repos have it
        files = super().save_pretrained(save_directory, **kwargs)
        config_file = os.path.join(save_directory, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as file:
                config = json.load(file)
            if any(key in config for key in LOAD_TIME_KEYS):
                for key in LOAD_TIME_KEYS:
                    config.pop(key, None)
                with open(config_file, "w", encoding="utf-8") as file:
                    file.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        if self.vocab_file and os.path.isfile(self.vocab_file):
            target = os.path.join(save_directory, "tokenizer.model")
            if not os.path.exists(target) or not os.path.samefile(self.vocab_file, target):
                shutil.copyfile(self.vocab_file, target)
            files = (*files, target)
        return files


ChatGLMTokenizer.register_for_auto_class("AutoTokenizer")


# ---------------------------------------------------------------------------------------------------------------
# Streaming decode and training


class StreamDecoder:
    """Text of a growing id sequence, released only in whole characters (no U+FFFD from a split character).

    Byte-fallback pieces of one emoji or rare CJK character arrive as several ids; their bytes are held until the
    character is complete. The pieces pushed so far join to `tokenizer.decode(ids, skip_special_tokens=...)`.

        >>> stream = StreamDecoder(tokenizer)
        >>> [stream.push(i) for i in tokenizer.encode("𠀋", add_special_tokens=False)]  # "▁" + 4 byte pieces
        ['', '', '', '', '𠀋']
    """

    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tokenizer = tokenizer
        added = tokenizer.added_tokens_decoder
        self._added_ids = set(added)
        self._skip_ids = {i for i, token in added.items() if token.special} if skip_special_tokens else set()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._byte_of = {char: byte for byte, char in _bytes_to_unicode().items()} if tokenizer.is_glm4 else None
        self._strip_space = not tokenizer.is_glm4  # decode drops the dummy prefix's leading space once

    def _bytes(self, token_id):
        token = None if token_id in self._skip_ids else self.tokenizer.convert_ids_to_tokens(token_id)
        if token is None:  # skipped, or an id past the vocabulary (the model's padded rows)
            return b""
        if token_id in self._added_ids:
            return token.encode()
        if self._byte_of is not None:
            return bytes(self._byte_of[char] for char in token)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace(SPACE, " ").encode()

    def push(self, ids):
        """Add the new ids (an int or a list) and return the text they complete."""
        ids = [ids] if isinstance(ids, int) else ids
        text = self._utf8.decode(b"".join(self._bytes(token_id) for token_id in ids))
        if self._strip_space and text:
            text, self._strip_space = text[1:] if text[0] == " " else text, False
        return text

    def flush(self):
        """End of stream: bytes of an unfinished character come out as U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _train_sentencepiece(sentencepiece, lines, model_writer, vocab_size, show_progress):
    """SentencePiece BPE with the trainer settings of chatglm3-6b's tokenizer.model (read from its trainer_spec)."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model_writer, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus has fewer possible pieces than asked for
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_by_unicode_script=True,
        split_by_whitespace=True, split_by_number=True, max_sentencepiece_length=16, character_coverage=0.9999,
        max_sentence_length=1 << 20, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1,
        minloglevel=0 if show_progress else 2,
    )


def train_glm_tokenizer(texts, vocab_size, min_frequency=2, show_progress=False):
    """Train a ChatGLM3-style tokenizer the way THUDM trained theirs: SentencePiece BPE with byte fallback, split
    digits, the dummy prefix, identity normalizer and no whitespace folding (the settings of chatglm3-6b's
    tokenizer.model), <unk> <s> </s> and <0x00>..<0xFF> at ids 0..258, then the learned pieces, then the nine control
    tokens. The returned tokenizer saves that tokenizer.model beside the tokenizer.json converted from it (the same
    ids), so engines that read the SentencePiece model (llama.cpp, chatglm.cpp) take the folder.

    `texts` is any iterable of strings (or of lists of strings), e.g. a `datasets` column, split into lines for
    training (newlines are byte pieces, as in ChatGLM3); `vocab_size` bounds the whole vocabulary, control tokens
    included (a small corpus may give fewer pieces). `min_frequency` is kept from the earlier trainer; SentencePiece
    has no frequency floor, so only its default 2 is accepted. Needs `sentencepiece`.

        >>> tokenizer = train_glm_tokenizer(["hello world", "你好，世界"] * 50, vocab_size=300)
        >>> tokenizer.convert_ids_to_tokens(len(tokenizer) - 1)
        '<|observation|>'
    """
    import io
    import tempfile
    import weakref

    try:
        import sentencepiece
    except ImportError as error:
        raise ImportError("training a GLM tokenizer needs `pip install sentencepiece protobuf`") from error

    learned = vocab_size - len(GLM3_CONTROL_TOKENS)
    if learned <= len(GLM3_RESERVED_PIECES):
        raise ValueError(f"vocab_size must exceed {len(GLM3_RESERVED_PIECES) + len(GLM3_CONTROL_TOKENS)}")
    if min_frequency != 2:
        raise ValueError("min_frequency: SentencePiece's BPE trainer has no frequency floor; leave it at 2")

    bad = []  # a TypeError inside the iterator reaches us wrapped in sentencepiece's RuntimeError

    def lines():
        for item in texts:
            try:
                _check_text(item, "each training text")
            except TypeError as error:
                bad.append(error)
                raise
            for text in [item] if isinstance(item, str) else item:
                yield from (line for line in text.split("\n") if line.strip())

    model = io.BytesIO()
    try:
        _train_sentencepiece(sentencepiece, lines(), model, learned, show_progress)
    except RuntimeError as error:
        if bad:
            raise bad[0] from None
        found = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(error))
        if found:  # each character kept as a piece needs a row: say which setting is too small
            need = int(found.group(2)) - int(found.group(1)) + vocab_size
            raise ValueError(f"vocab_size {vocab_size} is too small for the training texts' characters: it needs at "
                             f"least {need} (train.py: --tokenizer_vocab_size)") from None
        raise
    folder = tempfile.mkdtemp(prefix="glm-tokenizer-")
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as file:
        file.write(model.getvalue())
    tokenizer = ChatGLMTokenizer(vocab_file=path)  # converts it: tokenizer.json gets the model's ids
    weakref.finalize(tokenizer, shutil.rmtree, folder, ignore_errors=True)  # save_pretrained copies the file
    return tokenizer
