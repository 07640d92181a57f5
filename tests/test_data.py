"""glm_train/data: every source read as written and checked row by row (file and line named), SFT labels exactly
the replies, pretraining pieces, the built-in data's held-out split."""

import json
import re

import pytest
import torch
from conftest import glm, tiny_config
from train_helpers import common, losses, write_jsonl

import train
from glm_train import data
from glm_train.data import batches, builtin, preprocess, sources


def test_sft_labels_are_exactly_the_replies_and_their_stop_tokens(workspace):
    tokenizer = glm.ChatGLMTokenizer.from_pretrained(workspace / "base")
    conversation = builtin.weather_conversation(0, 0, "en", __import__("random").Random(0))
    dataset = __import__("datasets").Dataset.from_list([{"conversations": conversation}])
    row = preprocess.tokenize_sft(dataset, tokenizer, "conversations", block_size=256)[0][0]  # the whole conversation
    ids, labels = row["input_ids"], row["labels"]
    assistant, user, observation = (tokenizer.get_command(f"<|{r}|>") for r in ("assistant", "user", "observation"))
    # Expected from the spec: after each <|assistant|>, everything up to and including the next stop token.
    expected, inside = [], False
    for token in ids:
        if inside:
            expected.append(token)
            inside = token not in (tokenizer.eos_token_id, user, observation)
        else:
            expected.append(-100)
            inside = token == assistant
    assert labels == expected
    replies = [tokenizer.decode([t for t in labels if t != -100])]
    assert "tool_call(city='Beijing')" in replies[0] and "Beijing: " in replies[0]
    assert sum(t in (tokenizer.eos_token_id, observation) for t in labels) == 2
    # The loss counts exactly these targets (shifted by one).
    batch = batches.Collator(tokenizer.pad_token_id)([row, {"input_ids": ids[:5], "labels": labels[:5]}])
    assert int((batch["labels"][:, 1:] != -100).sum()) == sum(t != -100 for t in labels[1:])


def test_builtin_heldout_is_disjoint_from_training():
    train_rows, heldout = builtin.skill_splits(n_train=5000, n_heldout=150, seed=0)
    seen = {json.dumps(r["conversations"][:-1] if len(r["conversations"]) == 2 else r["conversations"][:2],
                       ensure_ascii=False) for r in train_rows}
    for row in heldout:
        assert json.dumps(row["conversations"][:-1], ensure_ascii=False) not in seen


def test_openai_format_rows_train_as_their_chatglm3_form(workspace, tmp_path):
    """A `messages` column with OpenAI's tool calls (content null, JSON-string arguments), role `tool` and a `tools`
    column trains exactly as the same conversations in the ChatGLM3 format."""
    import ast
    import re

    rows, _ = builtin.skill_splits(n_train=48, n_heldout=3, seed=1, tool_fraction=0.5)
    files = {"glm": tmp_path / "glm.jsonl", "openai": tmp_path / "openai.jsonl"}
    with open(files["glm"], "w") as glm_file, open(files["openai"], "w") as openai_file:
        for row in rows:
            chatglm3, openai, tools = [], [], None
            for message in row["conversations"]:
                call = re.search(r"tool_call\(city=(.+)\)", message["content"])
                if message["role"] == "assistant" and call:
                    arguments = {"city": ast.literal_eval(call.group(1))}
                    chatglm3.append({"role": "assistant", "metadata": "get_weather",
                                     "content": glm.tokenization.format_tool_call("get_weather", arguments)[1]})
                    openai.append({"role": "assistant", "content": None, "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}]})
                elif message["role"] == "observation":
                    chatglm3.append(message)
                    openai.append({"role": "tool", "tool_call_id": "call_0", "content": message["content"]})
                elif message["role"] == "system":
                    chatglm3.append(message)
                    openai.append({"role": "system", "content": message["content"]})
                    tools = json.dumps(message["tools"])
                else:
                    chatglm3.append(message)
                    openai.append(message)
            glm_file.write(json.dumps({"conversations": chatglm3}, ensure_ascii=False) + "\n")
            openai_file.write(json.dumps({"messages": openai, "tools": tools}, ensure_ascii=False) + "\n")
    for name, path in files.items():
        train.main(common(workspace, tmp_path / name, "--train_file", str(path), "--max_train_steps", "3",
                          "--per_device_train_batch_size", "8", "--block_size", "128"))
    assert losses(tmp_path / "glm") == losses(tmp_path / "openai") and len(losses(tmp_path / "glm")) == 3


GOOD = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("case, message", [
    ("malformed_line", r"data.jsonl line 2 column 2: malformed JSON line"),
    ("invalid_utf8", r"data.jsonl line 3: invalid UTF-8"),
    ("not_an_object", r"data.jsonl line 2: expected a JSON object"),
    ("content_int", r"malformed conversation in .*data.jsonl line 3: message 1: content must be a string, got int"),
    ("bad_role", r"data.jsonl line 2: message 0: unknown role 'robot'"),
    ("not_a_list", r"data.jsonl line 2: expected a non-empty list of messages"),
    ("no_assistant", r"data.jsonl line 2: no assistant message"),
    ("bad_tool_call", r"data.jsonl line 2: message 1: tool call parameters must be a dict, got list"),
    ("pretrain_number", r"data.jsonl line 2: text column 'text' must be a string, got int"),
    ("tools_not_json", r"data.jsonl line 2: column 'tools': not JSON \(Expecting value at character 0\)"),
    ("tools_numbers", r"data.jsonl line 2: column 'tools': tools\[0\] must be a JSON object \(a function schema\), "
                      "got int"),
    ("mixed_columns", r"data.jsonl line 2: no conversation in column 'conversations' \(this row has 'messages': "
                      "every row must use the same column"),
    ("lone_surrogate", r"data.jsonl line 2 column 'conversations': a lone surrogate U\+D800 \(the escape \\ud800 "
                       r"without its pair\) at character 2"),
    ("image_part", r"data.jsonl line 2: message 0: content part 1 is 'image_url': only text parts"),
])
def test_bad_file_or_row_is_named_before_any_write(workspace, tmp_path, case, message):
    path = tmp_path / "data.jsonl"
    line = {"malformed_line": "{bad json", "not_an_object": "[1, 2]",
            "bad_role": json.dumps({"conversations": [{"role": "robot", "content": "x"}]}),
            "not_a_list": json.dumps({"conversations": {"role": "user"}}),
            "no_assistant": json.dumps({"conversations": [{"role": "user", "content": "x"}]}),
            "bad_tool_call": json.dumps({"conversations": [{"role": "user", "content": "x"}, {
                "role": "assistant", "content": {"name": "get_weather", "parameters": ["北京"]}}]}),
            "tools_not_json": json.dumps({**GOOD, "tools": "get_weather(city)"}),
            "tools_numbers": json.dumps({**GOOD, "tools": [1, 2]}),
            "mixed_columns": json.dumps({"messages": GOOD["conversations"]}),
            "lone_surrogate": json.dumps({"conversations": [{"role": "user", "content": "ok\ud800"},
                                                            {"role": "assistant", "content": "x"}]}),
            "image_part": json.dumps({"conversations": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "a.png"}}]},
                {"role": "assistant", "content": "x"}]}),
            }.get(case)
    if case == "invalid_utf8":
        path.write_bytes((json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n").encode() + b'{"text": "\xff"}\n')
    elif case == "content_int":
        write_jsonl(path, [GOOD, GOOD, {"conversations": [{"role": "user", "content": "x"},
                                                          {"role": "assistant", "content": 146}]}])
    elif case == "pretrain_number":
        write_jsonl(path, [{"text": "fine"}, {"text": 146}])
    else:
        path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    out = tmp_path / "out"
    # From scratch (the tokenizer would be trained on these rows), so the check must come before that.
    argv = ["--config_name", str(workspace / "tiny.json"), "--train_file", str(path), "--output_dir", str(out),
            "--max_train_steps", "1", "--tokenizer_vocab_size", "400"]
    with pytest.raises(ValueError, match=message):
        train.main(argv)
    assert not out.exists()


def test_json_strings_stay_strings_and_dict_tool_calls_train(workspace, tmp_path):
    rows = [{"conversations": [{"role": "user", "content": '"quoted"'}, {"role": "assistant", "content": "146"}]},
            {"conversations": [{"role": "system", "content": "tools", "tools": [builtin.WEATHER_TOOL]},
                               {"role": "user", "content": "北京天气"},
                               {"role": "assistant", "content": {"name": "get_weather",
                                                                 "parameters": {"city": "北京", "days": 3}}},
                               {"role": "observation", "content": "{\"weather\": \"sunny\"}"},
                               {"role": "assistant", "content": "sunny"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows * 8)
    source = sources.load_source(train_file=str(path))
    sources.check_rows(source, "sft", "text", "conversations")
    # The conversations come back exactly as the file holds them (json.loads of each line is the reference).
    assert [sources.conversation_of(v) for v in source.splits["train"]["conversations"][:2]] == \
        [r["conversations"] for r in rows]
    tokenizer = glm.ChatGLMTokenizer.from_pretrained(workspace / "base")
    tokenized, _ = preprocess.tokenize_sft(source.splits["train"].select(range(2)), tokenizer, "conversations",
                                           block_size=256)
    for row, conversation in zip(tokenized, rows):
        assert row["input_ids"] == tokenizer.tokenize_conversation(conversation["conversations"])["input_ids"]
    texts = list(sources.conversation_texts(source.splits["train"].select(range(2))))
    assert '"quoted"' in texts and "146" in texts and '```python\ntool_call(city="北京", days=3)\n```' in texts
    # The dict form of a tool call trains a tokenizer from scratch end to end.
    out = tmp_path / "out"
    train.main(["--config_name", str(workspace / "tiny.json"), "--train_file", str(path), "--output_dir", str(out),
                "--max_train_steps", "1", "--tokenizer_vocab_size", "400", "--per_device_train_batch_size", "4",
                "--block_size", "128"])
    assert (out / "model.safetensors").exists()


def test_long_lines_are_cut_into_pieces_of_one_document():
    text = ("word " * 3000 + "\n") + "x" * 10000 + "中文" * 3000
    pieces = list(preprocess.text_pieces(text))
    assert "".join(pieces) == text and all(len(p) <= preprocess.TEXT_PIECE_CHARS for p in pieces)
    assert pieces[0].endswith(" ") is False and pieces[0].startswith("word")  # cut before a space
    assert any(p.endswith("\n") for p in pieces)  # cut after the newline
    split = preprocess.split_long_texts({"text": [text, "short"]}, "text")
    assert split["continues"] == [True] * (len(pieces) - 1) + [False, False]
    tokenizer = glm.tokenization.train_glm_tokenizer(["word x 中文"] * 50, vocab_size=300)
    docs = __import__("datasets").Dataset.from_dict({"input_ids": [[5, 6], [7], [8]],
                                                    "continues": [True, False, False]})
    packed = preprocess.pack_docs(docs, tokenizer.eos_token_id, 3)
    eos = tokenizer.eos_token_id
    assert packed["input_ids"] == [[5, 6, 7], [eos, 8, eos]]  # no eos inside the first document


def test_a_local_folder_as_dataset_name_keeps_strings_and_names_the_line(tmp_path):
    """--dataset_name with a local folder of JSONL files goes through the same reader as --train_file: its splits as
    datasets.load_dataset finds them (train*/validation* names), strings as strings, a bad row named by file and
    line. datasets' own json builder would give '"quoted"' back as quoted and "146" as the int 146."""
    rows = [{"conversations": [{"role": "user", "content": '"quoted"'}, {"role": "assistant", "content": "146"}]},
            {"conversations": [{"role": "user", "content": "7"}, {"role": "assistant", "content": "null"}]}]
    folder = tmp_path / "chats"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows * 3)
    write_jsonl(folder / "validation.jsonl", rows[:1])
    source = sources.load_source(dataset_name=str(folder))
    assert sorted(source.splits) == ["train", "validation"] and len(source.splits["train"]) == 6
    sources.check_rows(source, "sft", "text", "conversations")
    read = [sources.conversation_of(v) for v in source.splits["train"]["conversations"][:2]]
    assert read == [r["conversations"] for r in rows]  # json.loads of each line is the reference
    bad = {"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    write_jsonl(folder / "train.jsonl", rows + [bad])
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'train.jsonl'} line 3") + ".*unknown role 'robot'"):
        data.load_rows(dataset_name=str(folder))


def test_text_and_csv_files_are_read_as_written(tmp_path):
    """.txt: the rows of datasets' text builder (a line each, line breaks kept), a UTF-8 byte order mark dropped.
    .csv: every value the string the file holds (datasets' csv builder, through pandas, gives "146" as 146 and an
    empty field as None)."""
    import datasets

    text = "first line\r\nsecond\n\n  third, no newline"
    (tmp_path / "plain.txt").write_bytes(text.encode())
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    reference = datasets.load_dataset("text", data_files=str(tmp_path / "plain.txt"), keep_linebreaks=True,
                                      split="train")["text"]
    for name in ("plain.txt", "bom.txt"):
        assert sources.load_source(train_file=str(tmp_path / name)).splits["train"]["text"] == reference
    (tmp_path / "rows.csv").write_text('text,label\n146,"a, b"\n"multi\nline",\n007,"say ""hi"""\n',
                                       encoding="utf-8")
    source = sources.load_source(train_file=str(tmp_path / "rows.csv"))
    assert source.splits["train"].to_list() == [{"text": "146", "label": "a, b"}, {"text": "multi\nline", "label": ""},
                                                {"text": "007", "label": 'say "hi"'}]
    assert source.places["train"][1] == [f"{tmp_path / 'rows.csv'} line {n}" for n in (2, 3, 5)]


@pytest.mark.parametrize("name, content, message", [
    ("blank.txt", " \n\n\t\n", r"no text to train on: every row of text column 'text' in the train split \(.*blank.txt, "
                                 r"3 rows\) is empty or whitespace"),
    ("rows.csv", "text,label\nfine,1\nbad,2,3\n", r"rows.csv line 3: 3 fields where the header has 2 \(text, label\)"),
    ("rows.csv", 'text\nfine\n"never closed\n', r"rows.csv line 3: malformed CSV: unexpected end of data"),
    ("rows.csv", "text,text\na,b\n", r"rows.csv line 1: the header needs distinct, non-empty column names"),
    ("bad.txt", None, r"bad.txt line 2: invalid UTF-8 \(byte 0xff"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_bad_text_and_csv_files_are_named_before_any_write(workspace, tmp_path, name, content, message, streaming):
    path = tmp_path / name
    if content is None:
        path.write_bytes(b"good\n\xff\n")
    else:
        path.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    argv = common(workspace, out, "--train_file", str(path), "--max_train_steps", "1")
    with pytest.raises(ValueError, match=message):
        train.main(argv + ["--streaming"] * streaming)
    assert not out.exists()


def _chat(reply_words):
    return {"conversations": [{"role": "user", "content": "weather please"},
                              {"role": "assistant", "content": " ".join(["sunny"] * reply_words)}]}


def test_truncation_counts_what_it_cuts_and_refuses_rows_left_without_targets(workspace, tmp_path, capsys):
    tokenizer = glm.ChatGLMTokenizer.from_pretrained(workspace / "base")
    long = tokenizer.tokenize_conversation(_chat(40)["conversations"])
    prompt = long["labels"].index(next(label for label in long["labels"] if label != -100))  # tokens before targets
    path = tmp_path / "chats.jsonl"
    write_jsonl(path, [_chat(2), _chat(40), _chat(2), _chat(30)] * 3)
    # Every row keeps targets within 32 tokens; the long ones lose some: counted, named, and the run goes on.
    out = tmp_path / "cut"
    train.main(common(workspace, out, "--train_file", str(path), "--max_train_steps", "1",
                      "--validation_split_percentage", "25"))
    printed = capsys.readouterr().out
    note = re.search(r"note: truncation to --block_size 32 cut (\d+) of (\d+) rows of the train split short, losing "
                     r"(\d+) of (\d+) target tokens \(longest row: .*chats.jsonl line 2, (\d+) tokens\)", printed)
    assert note, printed
    assert (int(note[1]), int(note[2]), int(note[5])) == (6, 12, len(long["input_ids"]))
    # A block that ends before the first reply: no target left, refused before anything is written.
    out = tmp_path / "none"
    with pytest.raises(ValueError, match=rf"12 of 12 rows of the train split keep no target token within --block_size "
                                         rf"{prompt} \(first: .*chats.jsonl line 1, \d+ tokens\); the longest row is "
                                         rf".*chats.jsonl line 2 with {len(long['input_ids'])} tokens"):
        train.main(common(workspace, out, "--train_file", str(path), "--max_train_steps", "1", "--block_size",
                          str(prompt)))
    assert not out.exists()


@pytest.mark.parametrize("rows", [43, 40, 3])
def test_every_row_is_dealt_and_any_split_of_a_step_sees_the_same_rows(rows):
    """An epoch's last, shorter step is trained, not dropped; 1 process x 8 rows, 2 x 4, 2 x 2 x 2 accumulation and
    4 x 1 x 2 give the same rows in every optimizer step; an empty share becomes one padding token without target."""
    def steps(per_device, processes, accumulation):
        dealt = [list(batches.GlobalBatchSampler(rows, per_device, processes, rank, seed=5, epoch=1,
                                                 accumulation=accumulation)) for rank in range(processes)]
        count = len(dealt[0]) // accumulation
        return [sorted(i for rank in dealt for m in range(accumulation) for i in rank[accumulation * s + m])
                for s in range(count)]

    expected = steps(8, 1, 1)
    assert len(expected) == -(-rows // 8) and sorted(sum(expected, [])) == list(range(rows))  # each row once
    for split in [(4, 2, 1), (2, 2, 2), (1, 4, 2)]:
        assert steps(*split) == expected, split
    empty = batches.Collator(pad_token_id=0)([])
    assert empty["input_ids"].tolist() == [[0]] and empty["labels"].tolist() == [[-100]]
    packed_empty = batches.PackedCollator(pad_token_id=0)([])
    assert packed_empty["position_ids"].tolist() == [[0]] and packed_empty["labels"].tolist() == [[-100]]


def test_train_packing_gives_the_padded_runs_loss_sum_and_target_count():
    """train.py --packing: pack_sft rows through PackedCollator and token_loss_sum (what the training loop runs) give
    the loss sum and target count of the same conversations right-padded one per row."""
    import datasets

    from glm_train import loop
    from glm_train.data import batches, builtin, preprocess, sources

    rows, _ = builtin.skill_splits(n_train=24, n_heldout=2, seed=3)
    tokenizer = glm.tokenization.train_glm_tokenizer(list(sources.conversation_texts(rows)), vocab_size=500)
    tokenized, _ = preprocess.tokenize_sft(datasets.Dataset.from_list(rows), tokenizer, "conversations",
                                           block_size=96)
    packed = preprocess.pack_sft(tokenized, block_size=96)
    assert len(packed) < len(tokenized) and max(len(r) for r in packed["input_ids"]) <= 96
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in tokenized["input_ids"])
    config = tiny_config(padded_vocab_size=512, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(10)
    model = glm.ChatGLMForConditionalGeneration(config).eval()
    with torch.no_grad():
        padded_sum, padded_count = loop.token_loss_sum(
            model, batches.Collator(tokenizer.pad_token_id)(list(tokenized)))
        packed_batch = batches.PackedCollator(tokenizer.pad_token_id)(list(packed))
        assert "attention_mask" not in packed_batch
        packed_sum, packed_count = loop.token_loss_sum(model, packed_batch)
    assert int(packed_count) == int(padded_count) > 0
    torch.testing.assert_close(packed_sum, padded_sum, atol=1e-3, rtol=1e-5)
