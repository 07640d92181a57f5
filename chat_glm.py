"""The original ChatGLM chat API (chat, stream_chat) on top of transformers' public generate().

`ChatMixin` gives ChatGLMForConditionalGeneration the methods users of THUDM's code call (docs/architecture.md
section 6; its `quantize` lives in quantization_glm.py):

    >>> response, history = model.chat(tokenizer, "你好", history=[])
    >>> for response, history in model.stream_chat(tokenizer, "讲个笑话", history=history):
    ...     print(response)

Everything runs through `generate()`; streaming uses a `BaseStreamer` fed from a generate() thread. Tool calls
(docs/architecture.md section 5) are parsed by `parse_tool_call`, which accepts literals only and never evaluates
code.
"""

import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.streamers import BaseStreamer

from .compat_glm import CACHE_FIELD
from .tool_parser_glm import process_response

# ---------------------------------------------------------------------------------------------------------------
# Streaming plumbing around generate()


@dataclass
class ChatCache:
    """The KV cache of a conversation, as `stream_chat(..., return_past_key_values=True)` returns it.

    `cache` is the transformers Cache generate() filled; `token_ids` [1, n] are every token of the conversation
    so far, which generate() needs beside the cache to continue it. Continuing updates the cache in place;
    `copy.deepcopy` it first to branch a conversation.
    """

    cache: Cache
    token_ids: torch.LongTensor


class _TokenQueue(BaseStreamer):
    """Hands the ids generate() produces to another thread; the prompt (its first put) is skipped.

    The queue is bounded: when the consumer is `maxsize` steps behind, generate() waits inside put() (checking
    every 0.1 s whether the consumer has gone), so a stream nobody pulls from stops computing after at most
    `maxsize` + 1 more steps. Once `gone` is set, puts are dropped and the stopping criterion ends generate()."""

    def __init__(self, gone: threading.Event, maxsize: int = 2):
        self.queue = queue.Queue(maxsize)
        self.gone = gone
        self.prompt_seen = False

    def _put(self, item):
        while not self.gone.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self._put(value.reshape(-1).tolist())

    def end(self):
        self._put(None)


class _StopWhenSet(StoppingCriteria):
    """Ends generation once the consumer of stream_chat has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _ReplyDecoder:
    """Generated ids -> assistant messages (`metadata + "\\n" + content`), in whole characters only.

    Stop tokens are dropped and <|assistant|> starts a new message. The content gets a decoder of its own, because
    the prompt format encodes metadata + "\\n" and the content separately (each with ChatGLM3's dummy prefix)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.assistant_id = tokenizer.get_command("<|assistant|>")
        self.stop_ids = set(tokenizer.stop_token_ids)
        self.messages = []
        self._start_message()

    def _start_message(self):
        self.messages.append("")
        self.metadata_done = False
        self.decoder = self.tokenizer.stream_decoder()

    def feed(self, ids):
        for token_id in ids:
            if token_id in self.stop_ids:
                continue
            if token_id == self.assistant_id:
                self.messages[-1] += self.decoder.flush()
                self._start_message()
                continue
            self.messages[-1] += self.decoder.push(token_id)
            if not self.metadata_done and "\n" in self.messages[-1]:
                self.metadata_done = True
                if self.messages[-1].endswith("\n"):
                    self.decoder = self.tokenizer.stream_decoder()

    def finish(self):
        self.messages[-1] += self.decoder.flush()


# ---------------------------------------------------------------------------------------------------------------


class ChatMixin:
    """`chat` and `stream_chat` for ChatGLMForConditionalGeneration, built on public generate()."""

    def _chat_prompt(self, tokenizer, query, history, role, past):
        """Prompt ids and mask: the whole conversation, or only the new turn after the ids `past` holds."""
        if past is None:
            input_ids = tokenizer.build_chat_input(query, history=history, role=role)["input_ids"]
        else:
            if getattr(self.config, "pre_seq_len", None):
                raise ValueError("continuing from past_key_values is not supported with a P-tuning v2 prefix")
            turn = tokenizer.build_chat_input(query, history=[], role=role)["input_ids"]
            prefix = len(tokenizer.get_prefix_tokens())
            input_ids = torch.cat((past.token_ids.to(turn.device), turn[:, prefix:]), dim=-1)
        input_ids = input_ids.to(self.device)
        return input_ids, torch.ones_like(input_ids)

    def _chat_generate_kwargs(self, tokenizer, prompt_length, max_length, do_sample, top_p, temperature,
                              generate_kwargs):
        """generate()'s arguments. `max_length` (prompt + reply) defaults to the model's context, seq_length; a
        prompt that leaves no room for a reply is refused, and one longer than the context gets a warning."""
        context = getattr(self.config, "seq_length", None)
        kwargs = dict(do_sample=do_sample, eos_token_id=list(tokenizer.stop_token_ids),
                      pad_token_id=tokenizer.pad_token_id)
        if do_sample:
            kwargs.update(top_p=top_p, temperature=temperature)
        if "max_new_tokens" not in generate_kwargs:
            kwargs["max_length"] = max_length = max_length or context
            if max_length is not None and prompt_length >= max_length:
                raise ValueError(f"the prompt (query and history) is {prompt_length} tokens, which leaves no room for "
                                 f"a reply within max_length={max_length}"
                                 f"{' (the model context, seq_length)' if max_length == context else ''}: shorten "
                                 "the query or the history, or pass a larger max_length or max_new_tokens")
        elif context is not None and prompt_length > context:
            warnings.warn(f"the prompt is {prompt_length} tokens, longer than the model's context (seq_length "
                          f"{context}); replies past it are not what the model was trained for", stacklevel=3)
        kwargs.update(generate_kwargs)
        return kwargs

    def chat(self, tokenizer, query: str, history=None, role: str = "user", max_length: Optional[int] = None,
             do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8, **generate_kwargs):
        """One turn: (response, history). `response` is the reply text, or a dict for a tool call or another
        channel (see `process_response`); `history` is a new list: the old one, the query as a `role` message,
        then the assistant message(s). Generation stops at any of `tokenizer.stop_token_ids`, or at `max_length`
        tokens of prompt and reply (default: the model's context, `config.seq_length`).

        Extra keyword arguments go to `generate()` (e.g. `max_new_tokens`, `logits_processor`, `num_beams`).

        Example:
            >>> response, history = model.chat(tokenizer, "你好", history=[])
            >>> response, history = model.chat(tokenizer, "晚上睡不着应该怎么办", history=history)
        """
        history = list(history or [])
        input_ids, attention_mask = self._chat_prompt(tokenizer, query, history, role, None)
        kwargs = self._chat_generate_kwargs(tokenizer, input_ids.shape[1], max_length, do_sample, top_p, temperature,
                                            generate_kwargs)
        output = self.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        decoder = _ReplyDecoder(tokenizer)
        decoder.feed(output[0, input_ids.shape[1]:].tolist())
        decoder.finish()
        return process_response(decoder.messages, history + [{"role": role, "content": query}])

    def stream_chat(self, tokenizer, query: str, history=None, role: str = "user",
                    past_key_values: Optional[ChatCache] = None, max_length: Optional[int] = None,
                    do_sample: bool = True,
                    top_p: float = 0.8, temperature: float = 0.8, return_past_key_values: bool = False,
                    **generate_kwargs):
        """Like `chat`, but yields (response_so_far, history) as the reply grows; the text never ends inside a
        character. A tool call is parsed in the last item only (before it, it shows as {"name", "content"}).

        With `return_past_key_values=True` it yields (response, history, past_key_values); the last item's
        `past_key_values` is a `ChatCache`, which continues the conversation when passed back with the next query,
        without running the model over it again: the same as re-encoding `history`. Earlier items carry None.

        Generation runs at most 3 steps ahead of the loop: stop pulling (break out of the loop, even while the
        generator object is still referenced) and generate() pauses within 3 steps; `close()` the generator, or let
        it be garbage-collected, to end generate() and its thread.

        Example:
            >>> past = None
            >>> for response, history, past in model.stream_chat(tokenizer, "你好", history, past_key_values=past,
            ...                                                   return_past_key_values=True):
            ...     print(response)
        """
        history = list(history or []) + [{"role": role, "content": query}]
        input_ids, attention_mask = self._chat_prompt(tokenizer, query, history[:-1], role, past_key_values)
        kwargs = self._chat_generate_kwargs(tokenizer, input_ids.shape[1], max_length, do_sample, top_p, temperature,
                                            generate_kwargs)
        cache = past_key_values.cache if past_key_values is not None else None
        if cache is None and return_past_key_values:
            cache = DynamicCache()
        if cache is not None:
            kwargs[CACHE_FIELD] = cache

        consumer_gone = threading.Event()
        streamer = _TokenQueue(consumer_gone)
        stopping = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        stopping.append(_StopWhenSet(consumer_gone))
        result = {}

        def run():
            try:
                result["sequences"] = self.generate(input_ids=input_ids, attention_mask=attention_mask,
                                                    streamer=streamer, stopping_criteria=stopping, **kwargs)
            except BaseException as error:  # re-raised in the consumer's thread
                result["error"] = error
            finally:
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        decoder = _ReplyDecoder(tokenizer)
        shown = None
        try:
            while (ids := streamer.queue.get()) is not None:
                decoder.feed(ids)
                if decoder.metadata_done and decoder.messages != shown:  # new text to show
                    shown = list(decoder.messages)
                    response, partial = process_response(shown, history, parse_tools=False)
                    yield (response, partial, None) if return_past_key_values else (response, partial)
            thread.join()
            if "error" in result:
                raise result["error"]
            decoder.finish()
            response, history = process_response(decoder.messages, history)
            if not return_past_key_values:
                yield response, history
                return
            sequences = result["sequences"]
            if sequences[0, -1].item() in decoder.stop_ids:
                sequences = sequences[:, :-1]  # the stop token is no part of the conversation
            yield response, history, ChatCache(cache=cache, token_ids=sequences)
        finally:
            consumer_gone.set()
            thread.join()
