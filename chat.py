"""Chat with a GLM model folder in the terminal, the reply streaming as it is generated.

    python chat.py PATH                       # a folder written by train.py, or a THUDM checkpoint with our code
    python chat.py PATH --tools tools.json    # a system message declaring these tools; tool calls are shown
    echo "你好" | python chat.py PATH --greedy # works through a pipe: one message per line

Type a message and Enter. `clear` starts a new conversation, `stop` (or end of input) quits. After a tool call, the
next line you type is the tool's result, sent back to the model as an `observation` message.
"""

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# ChatGLM3's system prompt for tool use (its tool-calling demo).
TOOLS_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
HELP = "Type a message; 'clear' starts over, 'stop' quits."


def shown_text(response) -> str:
    """What the terminal shows for a (possibly partial) reply: the text, or a channel's name and content."""
    if isinstance(response, str):
        return response
    return f"[{response['name']}]\n{response.get('content', '')}"


def describe_tool_call(call: dict) -> str:
    """One line for a parsed tool call, or the parser's error."""
    if call["parameters"] is None:
        return f"[tool call {call['name']}: not understood ({call['error']})]"
    return f"[tool call] {call['name']}({json.dumps(call['parameters'], ensure_ascii=False)})"


def read_tools(parser, path):
    """The --tools file's list of tool descriptions, or a parser error naming the file (and line and column)."""
    try:
        with open(path, encoding="utf-8") as file:
            tools = json.load(file)
    except OSError as error:
        parser.error(f"--tools {path}: {error.strerror}")
    except UnicodeDecodeError as error:
        parser.error(f"--tools {path}: not UTF-8 ({error.reason} at byte {error.start})")
    except json.JSONDecodeError as error:
        parser.error(f"--tools {path} line {error.lineno} column {error.colno}: malformed JSON: {error.msg}")
    if not isinstance(tools, list):
        parser.error(f"--tools {path}: expected a JSON list of tool descriptions, got a {type(tools).__name__}")
    return tools


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="model folder (config, weights, tokenizer and code files)")
    parser.add_argument("--tools", help="JSON file with a list of tool descriptions for the system message")
    parser.add_argument("--system", help=f"system message (default with --tools: {TOOLS_SYSTEM!r})")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--max-length", type=int, help="most tokens in the conversation (default: the model's "
                        "context, seq_length in config.json)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="weight-only int4/int8 (model.quantize)")
    args = parser.parse_args(argv)

    tools = read_tools(parser, args.tools) if args.tools else None
    tokenizer = AutoTokenizer.from_pretrained(args.path, trust_remote_code=True)
    start = []
    if args.tools or args.system:
        start = [{"role": "system", "content": args.system if args.system is not None else TOOLS_SYSTEM}]
    if tools is not None:
        start[0]["tools"] = tools
        try:  # the tokenizer's own check of the format, before the model loads
            tokenizer.build_chat_input("", history=start)
        except ValueError as error:
            parser.error(f"--tools {args.tools}: {error}")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.path, trust_remote_code=True, dtype=dtype).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    if args.quantize:
        model.quantize(args.quantize)
    sampling = dict(do_sample=not args.greedy, top_p=args.top_p, temperature=args.temperature,
                    max_length=args.max_length)

    print(HELP, flush=True)
    history, past, role = list(start), None, "user"
    while True:
        print("\nObservation: " if role == "observation" else "\nUser: ", end="", flush=True)
        line = sys.stdin.readline()
        query = line.rstrip("\r\n")
        if not line or query.strip() == "stop":
            break
        if query.strip() == "clear":
            history, past, role = list(start), None, "user"
            print("(new conversation)", flush=True)
            continue
        print("\nGLM: ", end="", flush=True)
        printed = ""
        for response, history, new_past in model.stream_chat(tokenizer, query, history, role=role,
                                                              past_key_values=past, return_past_key_values=True,
                                                              **sampling):
            text = shown_text(response) if not (isinstance(response, dict) and "parameters" in response) else printed
            if text.startswith(printed):
                print(text[len(printed):], end="", flush=True)
                printed = text
        past = new_past  # the conversation's KV cache: the next turn encodes only its own tokens
        print(flush=True)
        role = "user"
        if isinstance(response, dict) and "parameters" in response:
            print(describe_tool_call(response), flush=True)
            role = "observation"


if __name__ == "__main__":
    main()
