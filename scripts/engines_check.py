"""Run a model folder in llama.cpp (llama-cpp-python) and chatglm.cpp (chatglm-cpp) and compare with our code.

Each engine gets the folder through its own stock converter and is used the way its documentation shows; for every
prompt the check compares prompt ids and greedy tokens with ours, and chat replies with our `model.chat()` reply
(the original API, whose `process_response` strips the text):

  llama.cpp    plain completion        `[gMASK]sop` + text, tokenized with control-token parsing on
               chat, our template      the GGUF's chat template rendered by us, tokenized by llama.cpp
               chat, llama.cpp's own   `llama_chat_apply_template` (the C++ formatter llama-cli and llama-server
                                       use without --jinja) on the GGUF's template
               create_chat_completion  llama-cpp-python's default handler (the GGUF's Jinja template): prompt ids;
                                       with stop_token_ids given to that handler: greedy tokens and reply text
  chatglm.cpp  plain + chat            `Pipeline.tokenizer.encode` / `apply_chat_template` ids, `Pipeline.chat`
                                       (stream=True, for the token ids) tokens and reply

Both engines build from source (scripts/install_engines.sh, about 7 + 4.5 minutes on 2 cores the first time, then
cached in ~/.cache/glm-hf-engines). scripts/engines_check.sh installs them and runs this file:

    bash scripts/engines_check.sh output/glm-skills                 # both engines
    bash scripts/engines_check.sh output/glm-skills --engines llama.cpp

Prints one OK/DIFF line per comparison and exits non-zero when any differs. SKIP, with the reason, stands for a
chatglm.cpp chat whose reply would contain padding-row ids or bytes that are not UTF-8: an untrained model's output,
which chatglm.cpp cannot decode. An engine that was asked for and cannot be imported is an error, not a skip.
tests/test_engines.py runs it on each folder kind (CI builds both engines).
"""

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import convert_glm  # noqa: E402
import engine_converters  # noqa: E402

PROMPTS = ["你好", "What is 12 + 30?", "北京今天天气怎么样？"]
SYSTEM = "You are a helpful assistant. 回答要简短。"
# (history, query): each prompt alone, then a second turn under a system prompt
CONVERSATIONS = [([], query) for query in PROMPTS] + [
    ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[0]},
      {"role": "assistant", "metadata": "", "content": "你好！"}], PROMPTS[1])]
ENGINES = ("llama.cpp", "chatglm.cpp")


class Ours:
    """Our side of every comparison: the folder loaded through transformers with trust_remote_code."""

    def __init__(self, folder, new_tokens):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                          dtype=torch.float32).eval()
        self.new_tokens = new_tokens
        self.stops = list(self.tokenizer.stop_token_ids)
        self.vocabulary = len(self.tokenizer.get_vocab())  # ids from here to padded_vocab_size are padding rows
        self._greedy, self._replies = {}, {}  # both engines compare with the same runs of ours

    def greedy(self, ids):
        """Up to new_tokens greedy tokens after `ids`, up to and including the first stop token."""
        if tuple(ids) not in self._greedy:
            with torch.no_grad():
                out = self.model.generate(torch.tensor([ids]), max_new_tokens=self.new_tokens, do_sample=False,
                                          eos_token_id=self.stops, pad_token_id=self.tokenizer.pad_token_id)
            self._greedy[tuple(ids)] = trim(out[0, len(ids):].tolist(), self.stops)
        return self._greedy[tuple(ids)]

    def reply(self, query, history):
        """model.chat()'s reply text (greedy, new_tokens at most)."""
        key = (query, repr(history))
        if key not in self._replies:
            self._replies[key] = self.model.chat(self.tokenizer, query, history=history, do_sample=False,
                                                 max_new_tokens=self.new_tokens)[0]
        return self._replies[key]

    def conversations(self):
        """(messages for the engines, query, history for model.chat) per chat case."""
        for history, query in CONVERSATIONS:
            yield [{k: m[k] for k in ("role", "content")} for m in history] + [
                {"role": "user", "content": query}], query, history

    def chat_ids(self, query, history):
        return self.tokenizer.build_chat_input(query, history=history)["input_ids"][0].tolist()


def report(results, name, ok, detail=""):
    results.append(ok)
    print(f"{'OK ' if ok else 'DIFF'} {name}{': ' + detail if detail else ''}", flush=True)


def trim(tokens, stops):
    """Tokens up to and including the first stop token."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1]
    return tokens


def check_llama_cpp(folder, ours, tmp, results):
    from llama_cpp import Llama, llama_chat_format
    from llama_cpp import llama_cpp as low_level

    tokenizer = ours.tokenizer
    refusals = convert_glm.llama_cpp_refusals(folder)
    if refusals:  # what stops the converter, with the fix, instead of its own error
        report(results, "llama.cpp converts the folder", False, "; ".join(refusals))
        return
    gguf = Path(tmp) / "model.gguf"
    # The converter's GPT-2 vocabulary path asks transformers' trust_remote_code question: answer it as a user.
    converted = subprocess.run([sys.executable, str(engine_converters.llama_cpp_converter()), str(folder),
                                "--outfile", str(gguf), "--outtype", "f32"], input="y\n" * 4, text=True,
                               capture_output=True)
    if converted.returncode != 0:  # e.g. a byte-level vocabulary llama.cpp has no pre-tokenizer hash for
        reason = [line for line in (converted.stdout + converted.stderr).splitlines() if line.strip()][-1:]
        report(results, "llama.cpp converts the folder", False,
               f"convert_hf_to_gguf.py refused it: {' '.join(reason)}")
        return
    llm = Llama(str(gguf), n_ctx=0, verbose=False, type_k=0, type_v=0)  # the trained context, f32 KV cache
    sample = dict(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0)

    def engine_greedy(ids):
        generated = []
        llm.reset()
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            generated.append(token)
            if token in ours.stops or llm.token_eos() == token or len(generated) == ours.new_tokens:
                break
        return generated

    prefix = "".join(tokenizer.convert_ids_to_tokens(tokenizer.get_prefix_tokens()))
    for query in PROMPTS:
        ids = tokenizer.encode(query)
        theirs = llm.tokenize((prefix + query).encode(), add_bos=True, special=True)
        report(results, f"llama.cpp plain {query!r} ids", theirs == ids)
        report(results, f"llama.cpp plain {query!r} greedy", engine_greedy(theirs) == ours.greedy(ids))

    template = llm.metadata["tokenizer.chat_template"]
    # with no chat_format given, llama-cpp-python formats chats with the GGUF's template (its Jinja2ChatFormatter)
    report(results, "llama-cpp-python picks the GGUF's chat template", llm.chat_format == "chat_template.default",
           f"chat_format {llm.chat_format!r}")
    # The documented way to end a ChatGLM turn (docs/engines.md): the same Jinja formatter over the GGUF's template,
    # told the ids that end a turn, looked up in the GGUF. llama.cpp itself ends generation at </s> only, and
    # stop strings cannot match <|user|>: its detokenizer renders control tokens as "".
    stop_ids = [llm.token_eos()] + [llm.tokenize(t.encode(), add_bos=False, special=True)[0]
                                    for t in ("<|user|>", "<|observation|>")]
    report(results, "llama.cpp stop ids", sorted(stop_ids) == sorted(ours.stops), f"{stop_ids} vs {ours.stops}")
    stopping = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token,
        stop_token_ids=stop_ids).to_chat_handler()
    for messages, query, history in ours.conversations():
        ids = ours.chat_ids(query, history)
        name = f"llama.cpp chat {len(messages)} messages, last {query!r}"
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        theirs = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        report(results, f"{name}: our template's text, llama.cpp's ids", theirs == ids)

        # llama.cpp's built-in formatter for this template (it recognises ChatGLM3 by "[gMASK]sop")
        array = (low_level.llama_chat_message * len(messages))(*[
            low_level.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
        buffer = ctypes.create_string_buffer(8192)
        length = low_level.llama_chat_apply_template(template.encode(), array, len(messages), True, buffer, 8192)
        builtin = buffer.raw[:length].decode() if length > 0 else f"<error {length}>"
        theirs = llm.tokenize(builtin.encode(), add_bos=False, special=True)
        report(results, f"{name}: llama_chat_apply_template ids", theirs == ids, "" if theirs == ids else
               f"{builtin!r} vs {rendered!r}")

        llm.chat_handler = None  # the default: the GGUF's template through llama-cpp-python's Jinja formatter
        response = llm.create_chat_completion(messages=messages, max_tokens=1, **sample)
        prompt = list(llm.input_ids[:response["usage"]["prompt_tokens"]])
        report(results, f"{name}: create_chat_completion prompt ids", prompt == ids)

        if not history and query == PROMPTS[1]:  # the default handler on a whole reply (shown, not compared)
            default = llm.create_chat_completion(messages=messages, max_tokens=ours.new_tokens, **sample)
            print(f"note: default handler: finish {default['choices'][0]['finish_reason']!r}, "
                  f"{default['usage']['completion_tokens']} tokens, {default['choices'][0]['message']['content']!r}")
        llm.chat_handler = stopping
        response = llm.create_chat_completion(messages=messages, max_tokens=ours.new_tokens, **sample)
        expected = ours.greedy(ids)
        stopped = bool(expected) and expected[-1] in ours.stops
        finish = response["choices"][0]["finish_reason"]
        # the tokens llama.cpp evaluated after the prompt: every generated token, except perhaps the last (the
        # max_tokens-th, or an end-of-generation token, is sampled and never fed back)
        tokens = [int(t) for t in llm.input_ids[response["usage"]["prompt_tokens"]:llm.n_tokens]]
        same = tokens == expected[:len(tokens)] and len(tokens) >= len(expected) - 1
        report(results, f"{name}: create_chat_completion greedy", same and finish == ("stop" if stopped else "length"),
               f"{tokens} + 1 vs {expected}, finish {finish}")
        text = response["choices"][0]["message"]["content"]
        reply = ours.reply(query, history)
        # llama-cpp-python drops bytes that are not UTF-8 (errors="ignore"); ours show them as U+FFFD, as the
        # original's SentencePiece decode does. Only untrained models emit such byte sequences.
        report(results, f"{name}: create_chat_completion reply, stripped",
               text.strip() == reply.replace("\ufffd", "").strip(),
               f"{text.strip()!r} vs {reply!r}")
    llm.close()


def check_chatglm_cpp(folder, ours, tmp, results):
    import chatglm_cpp

    tokenizer = ours.tokenizer
    model_bin = Path(tmp) / "model.bin"
    subprocess.run([sys.executable, "-m", "chatglm_cpp.convert", "-i", str(folder), "-t", "f32", "-o",
                    str(model_bin)], check=True, capture_output=True, text=True)
    pipeline = chatglm_cpp.Pipeline(str(model_bin))
    config = pipeline.model.config
    family = "ChatGLM4" if tokenizer.is_glm4 else "ChatGLM3"
    report(results, "chatglm.cpp model type and stop ids", config.model_type_name == family and
           sorted([config.eos_token_id, *config.extra_eos_token_ids]) == sorted(ours.stops),
           f"{config.model_type_name}, {[config.eos_token_id, *config.extra_eos_token_ids]}")
    for query in PROMPTS:
        ids = tokenizer.encode(query)
        report(results, f"chatglm.cpp plain {query!r} ids", pipeline.tokenizer.encode(query, 512) == ids)
    for messages, query, history in ours.conversations():
        ids = ours.chat_ids(query, history)
        name = f"chatglm.cpp chat {len(messages)} messages, last {query!r}"
        chat_messages = [chatglm_cpp.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        report(results, f"{name}: apply_chat_template ids", pipeline.tokenizer.apply_chat_template(
            chat_messages, 512) == ids)
        expected = ours.greedy(ids)
        # Two outputs chatglm.cpp cannot decode, which only untrained weights produce: padding-row ids (its decoder
        # crashes, SIGSEGV) and bytes that are not UTF-8 (Pipeline.chat raises UnicodeDecodeError)
        padding = [t for t in expected if t >= ours.vocabulary]
        if padding or "\ufffd" in tokenizer.decode(expected):
            why = (f"padding-row ids {padding} (the vocabulary ends at {ours.vocabulary - 1})" if padding else
                   "bytes that are not UTF-8")
            print(f"SKIP {name}: greedy and reply: our greedy output has {why}, which chatglm.cpp cannot decode",
                  flush=True)
            continue
        chunks = list(pipeline.chat(chat_messages, max_new_tokens=ours.new_tokens, max_context_length=512,
                                    do_sample=False, stream=True))
        tokens = [t for chunk in chunks for t in chunk.token_ids]
        report(results, f"{name}: greedy", tokens == expected, f"{tokens} vs {expected}")
        text = pipeline.merge_streaming_messages(chunks).content
        reply = ours.reply(query, history)
        report(results, f"{name}: reply", text == reply, f"{text!r} vs {reply!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--new_tokens", type=int, default=20)
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated, from {', '.join(ENGINES)} (default: both)")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        parser.error(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    modules = {"llama.cpp": "llama_cpp", "chatglm.cpp": "chatglm_cpp"}
    for engine in engines:
        try:
            __import__(modules[engine])
        except ImportError as error:
            sys.exit(f"--engines {engine}: cannot import {modules[engine]} ({error}); build it with "
                     "bash scripts/install_engines.sh and run this through scripts/engines_check.sh")
    ours = Ours(args.folder, args.new_tokens)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if "llama.cpp" in engines:
            check_llama_cpp(args.folder, ours, tmp, results)
        if "chatglm.cpp" in engines:
            check_chatglm_cpp(args.folder, ours, tmp, results)
    failed = results.count(False)
    print(f"{len(results) - failed} of {len(results)} equal", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
