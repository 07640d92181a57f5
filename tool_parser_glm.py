"""How a GLM reply becomes a message: its content, or a tool call with typed arguments; for `model.chat` and for
vLLM's OpenAI server, from this one file (docs/serving.md, "Exact tool calls on vLLM: the glm tool-parser plugin").

`process_response` and `parse_tool_call` are what `model.chat` returns (chat_glm.py imports them; docs/chat.md):
ChatGLM3's fenced `tool_call(city="北京", days=3)`, whose values must be Python literals, and GLM-4's JSON object,
parsed without evaluating any code. `reply_message` and `ReplyStream` turn a served reply (decoded text, whole or in
pieces) into OpenAI's message with them.

The same file is a vLLM tool-parser plugin. Every folder we save carries it (chat_glm.py imports it, so
`save_pretrained` copies it; train.py and convert_glm.py copy it too):

    python -m vllm.entrypoints.openai.api_server --model FOLDER --trust-remote-code \\
        --enable-auto-tool-choice --tool-parser-plugin FOLDER/tool_parser_glm.py --tool-call-parser glm

Loaded that way (vLLM imported it), it registers `GlmToolParser` as the tool parser "glm". It needs nothing but the
standard library otherwise. Written against vLLM 0.32's plugin interface (docs/serving.md says which versions).
"""

import ast
import json
import re
import sys

# A fenced block (```python ... ```); the closing fence may be missing when generation stopped early.
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.S)


# ---------------------------------------------------------------------------------------------------------------
# Tool calls


def _literal_tool_call(source: str) -> dict:
    """The keyword arguments of `tool_call(a=1, b="x")`, each of which must be a Python literal."""
    call = ast.parse(source, mode="eval").body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError("expected a single tool_call(name=value, ...) expression")
    if call.args:
        raise ValueError("tool_call takes keyword arguments only")
    parameters = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise ValueError("tool_call does not take **kwargs")
        if keyword.arg in parameters:
            raise ValueError(f"argument {keyword.arg!r} given twice")
        # literal_eval takes constants and containers of constants only: no names, calls or attributes.
        try:
            value = ast.literal_eval(keyword.value)
        except ValueError:
            raise ValueError(f"argument {keyword.arg!r} is not a literal: {ast.unparse(keyword.value)[:200]}")
        parameters[keyword.arg] = _json_value(value, keyword.arg)
    return parameters


def _json_value(value, where: str):
    """`value` if it is a JSON value (dict with str keys, list, str, int, finite float, bool, None), recursively;
    tuples become lists (a Python literal's natural spelling of a JSON array). Anything else that literal_eval
    makes (set, bytes, complex, Ellipsis, inf from 1e999) raises ValueError naming the argument."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"argument {where!r} is {value}, not a JSON number")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ValueError(f"argument {where!r} has a non-string key: JSON object keys are strings")
        return {key: _json_value(item, f"{where}.{key}") for key, item in value.items()}
    raise ValueError(f"argument {where!r} is a {type(value).__name__}, not a JSON value")


def parse_tool_call(name: str, text: str) -> dict:
    """A tool-call reply as {"name", "parameters"}; never raises and never runs code.

    `name` is the reply's first line, `text` the rest. ChatGLM3 writes the arguments as a fenced
    `tool_call(city="北京", days=3)` whose values must be Python literals; GLM-4 writes a JSON object.
    A call that does not parse comes back as {"name", "parameters": None, "content": text, "error": reason},
    so the reply is never lost.

    Example:
        >>> parse_tool_call("get_weather", '```python\\ntool_call(city="北京")\\n```')
        {'name': 'get_weather', 'parameters': {'city': '北京'}}
        >>> parse_tool_call("get_weather", '{"city": "北京"}')
        {'name': 'get_weather', 'parameters': {'city': '北京'}}
    """
    name = name.strip()
    body = text.strip()
    fenced = _FENCE.search(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        if body.startswith("tool_call"):
            parameters = _literal_tool_call(body)
        else:
            parameters = json.loads(body, parse_constant=_reject_constant)  # NaN / Infinity are not JSON
            if not isinstance(parameters, dict):
                raise ValueError(f"arguments must be a JSON object, got {type(parameters).__name__}")
    # Whatever the model wrote (deep nesting, huge numbers, bad syntax), the reply must survive.
    except Exception as error:  # noqa: BLE001
        return {"name": name, "parameters": None, "content": text, "error": f"{type(error).__name__}: {error}"}
    return {"name": name, "parameters": parameters}


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON value")


def _tools_enabled(history) -> bool:
    return any(message.get("role") == "system" and message.get("tools") for message in history)


def _process(messages, history, tools):
    history = list(history)
    response = ""
    for message in [messages] if isinstance(messages, str) else messages:
        metadata, content = message.split("\n", 1) if "\n" in message else ("", message)
        name = metadata.strip()
        if not name:
            content = content.strip()  # as the original's process_response (and what engines' users should do)
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        if not name:
            response = content
        elif tools:
            response = parse_tool_call(name, content)
        else:
            response = {"name": name, "content": content}
    return response, history


def process_response(messages, history, parse_tools=True):
    """The reply and the history extended by it, from the assistant message(s) of one generation.

    `messages` is one decoded assistant message, `metadata + "\\n" + content`, or a list of them (the model may
    open another message with <|assistant|> before it stops). Each becomes a history item {"role": "assistant",
    "metadata", "content"} and the reply is the last one: its content when the metadata line is empty; when it names
    a tool and a system message declares `tools`, `parse_tool_call`'s {"name", "parameters"} dict; otherwise another
    channel's message (ChatGLM3's code interpreter), {"name": metadata, "content": content}, as the original API.
    A new history list is returned; the caller's is not changed. `parse_tools=False` (stream_chat's partial
    replies) leaves a tool call's arguments as text.

    Example:
        >>> process_response("\\n你好", [])
        ('你好', [{'role': 'assistant', 'metadata': '', 'content': '你好'}])
    """
    return _process(messages, history, parse_tools and _tools_enabled(history))


# ---------------------------------------------------------------------------------------------------------------
# A served reply as an OpenAI message

ASSISTANT = "<|assistant|>"
# The family's stop tokens as decoded text, in case a server keeps the one that ended generation. Named here, not
# imported, since vLLM loads this file alone; tests/test_tool_parser.py keeps them equal to the tokenizers'.
STOP_TEXTS = ("<|user|>", "<|observation|>", "<|endoftext|>", "</s>")


def _messages(text):
    """The assistant messages of one generation's decoded text (special tokens kept): split at <|assistant|>,
    without a trailing stop token."""
    for stop in STOP_TEXTS:
        if text.endswith(stop):
            text = text[: -len(stop)]
            break
    return text.split(ASSISTANT)


def reply_message(text, tools_enabled):
    """OpenAI's message of a served reply, as `process_response` reads it: {"content": str or None,
    "tool_calls": [{"name", "arguments"}]} with `arguments` a JSON string.

    `text` is the generation decoded with its special tokens; `tools_enabled` says whether the request declared
    tools (and did not ask for tool_choice "none"). A tool call whose arguments do not parse (parse_tool_call's
    error), or any other channel's message, comes back whole as content (without surrounding whitespace): nothing
    is lost or evaluated.

    Example:
        >>> reply_message(" \\n 79", tools_enabled=False)
        {'content': '79', 'tool_calls': []}
        >>> reply_message('get_weather\\n ```python\\ntool_call(flags=[True, None])\\n```', tools_enabled=True)
        {'content': None, 'tool_calls': [{'name': 'get_weather', 'arguments': '{"flags": [true, null]}'}]}
    """
    messages = _messages(text)
    response, _ = _process(messages, [], tools_enabled)
    if isinstance(response, str):
        return {"content": response, "tool_calls": []}
    if response.get("parameters") is not None:
        arguments = json.dumps(response["parameters"], ensure_ascii=False)
        return {"content": None, "tool_calls": [{"name": response["name"], "arguments": arguments}]}
    # as generated (without surrounding whitespace): a call that did not parse, another channel's message
    return {"content": messages[-1].strip(), "tool_calls": []}


class ReplyStream:
    """`reply_message` fed piece by piece: `feed` returns the content to send now, `finish` the rest of the message.

    Content streams as it comes (without the format's leading newline and ChatGLM3's dummy-prefix space, and without
    trailing whitespace, as `process_response` strips it); a message whose first line names a tool is held until
    `finish`, which returns it as `reply_message` reads the whole text. What `feed` and `finish` return, joined, is
    `reply_message(whole text)`'s content, except after a second <|assistant|> (content already sent stays sent).

    Example:
        >>> stream = ReplyStream(tools_enabled=False)
        >>> [stream.feed(piece) for piece in [" ", "\\n", " 7", "9 "]], stream.finish()
        (['', '', '7', '9'], {'content': '', 'tool_calls': []})
    """

    def __init__(self, tools_enabled):
        self.tools_enabled = tools_enabled
        self._recent = ""  # the last characters fed, where <|assistant|> may have begun
        self._new_message()

    def _new_message(self):
        self._pieces = []  # the current message as fed (finish reads it whole)
        self._mode = "head"  # "head" until its metadata line ends, then "content" (streamed) or "held" (a tool's)
        self._tail = ""  # content not sent yet: trailing whitespace, or the beginning of a special token
        self._started = False  # whether a non-whitespace character of the content came
        self._stopped = False  # whether a stop token's text came (if the server keeps it): nothing after is content
        self._sent = 0  # characters of the message's stripped content returned so far

    def feed(self, piece):
        # Each piece is looked at once (the tail held back is a few characters), so a long reply costs linear time.
        window = self._recent + piece
        self._recent = window[-(len(ASSISTANT) - 1):]
        if ASSISTANT in window:  # the model opened another message; it is the reply
            self._new_message()
            piece = window.rsplit(ASSISTANT, 1)[1]
        self._pieces.append(piece)
        if self._mode == "head":
            if "\n" not in piece:
                return ""
            metadata, piece = "".join(self._pieces).split("\n", 1)
            self._mode = "held" if metadata.strip() else "content"  # a tool's message waits for finish
        if self._mode == "held" or self._stopped:
            return ""
        text = self._tail + piece
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        for stop in STOP_TEXTS:
            if stop in text:
                text, self._stopped = text.split(stop, 1)[0], True
        ready = text.rstrip()  # trailing whitespace waits: more text may follow it
        for marker in STOP_TEXTS + (ASSISTANT,):  # and so does a special token's beginning
            for length in range(min(len(marker) - 1, len(ready)), 0, -1):
                if ready.endswith(marker[:length]):
                    ready = ready[:-length].rstrip()
                    break
        self._tail = text[len(ready):]
        self._sent += len(ready)
        return ready

    def finish(self):
        whole = reply_message("".join(self._pieces), self.tools_enabled)
        if whole["tool_calls"] or self._sent == 0:
            return whole
        return {"content": whole["content"][self._sent:], "tool_calls": []}


# ---------------------------------------------------------------------------------------------------------------
# The vLLM plugin (vLLM 0.32's ToolParser interface), defined only when vLLM imported this file


def _define_vllm_parser():
    # In a try block, which transformers' remote-code import check skips: loading a model never requires vLLM.
    try:
        from vllm.entrypoints.generate.base.protocol import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                              ExtractedToolCallInformation, FunctionCall, ToolCall)
        from vllm.renderers.chat_utils import make_tool_call_id
        from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager
    except ImportError as error:
        raise ImportError(f"tool_parser_glm.py is written for vLLM 0.32's tool-parser interface, which this vLLM "
                          f"lacks ({error}); docs/serving.md") from error

    def tools_enabled(request):
        return bool(getattr(request, "tools", None)) and getattr(request, "tool_choice", None) != "none"

    class GlmToolParser(ToolParser):
        """`--tool-call-parser glm`: replies of ChatGLM3 and GLM-4 through `reply_message` / `ReplyStream`, so a
        served reply is what `model.chat` returns (content without the format's newline; typed tool calls).

        It also gives the content of replies without a tool call (vLLM calls it for every reply), which is why it
        declares `engine_based_streaming`: vLLM then takes the content from it, whole and streamed, and calls
        `finish_streaming` at the end of a stream, where a held tool call is released."""

        engine_based_streaming = True

        def __init__(self, tokenizer, tools=None):
            super().__init__(tokenizer, tools)
            self._stream = None

        def adjust_request(self, request):
            request = super().adjust_request(request)
            request.skip_special_tokens = False  # <|assistant|> separates the messages of one reply
            return request

        def extract_tool_calls(self, model_output, request):
            message = reply_message(model_output, tools_enabled(request))
            calls = [ToolCall(id=make_tool_call_id(), function=FunctionCall(**call))
                     for call in message["tool_calls"]]
            return ExtractedToolCallInformation(tools_called=bool(calls), tool_calls=calls,
                                                content=message["content"])

        def extract_tool_calls_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                         current_token_ids, delta_token_ids, request):
            if self._stream is None:
                self._stream = ReplyStream(tools_enabled(request))
            piece = self._stream.feed(delta_text)
            return DeltaMessage(content=piece) if piece else None

        def finish_streaming(self):
            if self._stream is None:
                return None
            message, self._stream = self._stream.finish(), None
            calls = [DeltaToolCall(index=i, id=make_tool_call_id(), type="function",
                                   function=DeltaFunctionCall(**call)) for i, call in enumerate(message["tool_calls"])]
            if calls:
                return DeltaMessage(tool_calls=calls)
            return DeltaMessage(content=message["content"]) if message["content"] else None

    ToolParserManager.register_module("glm", module=GlmToolParser)
    return GlmToolParser


if "vllm.tool_parsers.abstract_tool_parser" in sys.modules:  # imported by vLLM's --tool-parser-plugin
    GlmToolParser = _define_vllm_parser()
