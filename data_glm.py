"""Data for train.py: built-in generated skill data, loading any `datasets` source, checks, tokenization, batching.

Two modes:
- pretraining: a text column, tokenized once with `datasets.map` and packed into `block_size` blocks (every token
  is a target);
- SFT: a conversations column (`conversations` or `messages`) in the ChatGLM3 format (system with tools, user,
  assistant, tool calls, observation) or OpenAI's (assistant `tool_calls` with `content: null`, role `tool`, a
  `tools` column), tokenized with `tokenizer.tokenize_conversation`, which sets the labels of everything except assistant replies (and
  the stop token after each) to -100.

Example:
    >>> import data_glm
    >>> train, heldout = data_glm.skill_splits(n_train=100, n_heldout=10, seed=0)
    >>> train[0]["conversations"][-1]["role"]
    'assistant'
"""

import json
import os
import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------------------------
# Built-in generated data: bilingual arithmetic and a weather tool call, verifiable by exact match.

WEATHER_TOOL = {"name": "get_weather", "parameters": {"city": {"type": "string"}}}
SYSTEM_PROMPT = "Use tools when needed."
CITIES = [
    ("Beijing", "北京"), ("Shanghai", "上海"), ("Guangzhou", "广州"), ("Shenzhen", "深圳"), ("Hangzhou", "杭州"),
    ("Chengdu", "成都"), ("Wuhan", "武汉"), ("Xi'an", "西安"), ("Nanjing", "南京"), ("Tianjin", "天津"),
    ("Chongqing", "重庆"), ("Suzhou", "苏州"), ("Qingdao", "青岛"), ("Dalian", "大连"), ("Xiamen", "厦门"),
    ("Harbin", "哈尔滨"), ("Kunming", "昆明"), ("Lhasa", "拉萨"), ("Tokyo", "东京"), ("Paris", "巴黎"),
    ("London", "伦敦"), ("Berlin", "柏林"), ("Rome", "罗马"), ("Madrid", "马德里"), ("Moscow", "莫斯科"),
    ("Cairo", "开罗"), ("Sydney", "悉尼"), ("Toronto", "多伦多"), ("Seoul", "首尔"), ("Singapore", "新加坡"),
]
WEATHER_TEMPLATES = {
    "en": ["What's the weather in {city}?", "How is the weather in {city} today?",
           "Check the weather for {city}, please."],
    "zh": ["{city}天气怎么样？", "帮我查一下{city}的天气。", "{city}今天天气如何？"],
}
ADDITION_TEMPLATES = {"en": "What is {a} plus {b}?", "zh": "{a}+{b}等于多少？"}
CONDITIONS = {"en": ["sunny", "cloudy", "rainy", "windy"], "zh": ["晴", "多云", "小雨", "有风"]}


def addition_conversation(a: int, b: int, lang: str) -> list:
    """'What is 12 plus 35?' / '12+35等于多少？' answered with the bare sum."""
    return [
        {"role": "user", "content": ADDITION_TEMPLATES[lang].format(a=a, b=b)},
        {"role": "assistant", "content": str(a + b)},
    ]


def weather_conversation(city_index: int, template_index: int, lang: str, rng: random.Random) -> list:
    """System message with the weather tool, a request, the tool call, its observation and the final answer."""
    city = CITIES[city_index][0 if lang == "en" else 1]
    condition = rng.randrange(len(CONDITIONS[lang]))
    temperature = rng.randrange(-5, 36)
    observation = json.dumps({"weather": CONDITIONS["en"][condition], "temperature": temperature})
    answer = (f"{city}: {CONDITIONS['en'][condition]}, {temperature}°C" if lang == "en"
              else f"{city}：{CONDITIONS['zh'][condition]}，{temperature}°C")
    return [
        {"role": "system", "content": SYSTEM_PROMPT, "tools": [WEATHER_TOOL]},
        {"role": "user", "content": WEATHER_TEMPLATES[lang][template_index].format(city=city)},
        {"role": "assistant", "metadata": WEATHER_TOOL["name"],
         "content": f"```python\ntool_call(city={city!r})\n```"},
        {"role": "observation", "content": observation},
        {"role": "assistant", "content": answer},
    ]


def skill_splits(n_train: int = 20000, n_heldout: int = 200, seed: int = 0, tool_fraction: float = 0.3):
    """Generated training conversations and a held-out set that shares no (question, language) with them.

    Held-out items are whole questions never seen in training: addition pairs (a, b) held out in both languages, and
    (city, template, language) combinations held out for the tool call. Each held-out row has `conversations`
    (ending with the reply to verify) and `kind` ("addition" or "tool_call").
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    n_heldout_add = n_heldout - n_heldout // 3
    heldout_pairs, train_pairs = pairs[:n_heldout_add], pairs[n_heldout_add:]
    combos = [(c, t, lang) for c in range(len(CITIES)) for t in range(3) for lang in ("en", "zh")]
    rng.shuffle(combos)
    n_heldout_tool = n_heldout // 3
    heldout_combos, train_combos = combos[:n_heldout_tool], combos[n_heldout_tool:]

    heldout = [{"conversations": addition_conversation(a, b, rng.choice(("en", "zh"))), "kind": "addition"}
               for a, b in heldout_pairs]
    heldout += [{"conversations": weather_conversation(*combo, rng)[:3], "kind": "tool_call"}
                for combo in heldout_combos]
    train = []
    for _ in range(n_train):
        if rng.random() < tool_fraction:
            train.append({"conversations": weather_conversation(*rng.choice(train_combos), rng)})
        else:
            a, b = rng.choice(train_pairs)
            train.append({"conversations": addition_conversation(a, b, rng.choice(("en", "zh")))})
    return train, heldout


def conversation_texts(rows, column: str = "conversations"):
    """Every string a conversation's tokens come from (contents, metadata, tool JSON, rendered tool calls): a
    tokenizer-training corpus. Any format tokenize_conversation takes (ChatGLM3's, OpenAI's)."""
    for index, row in enumerate(rows):
        for _, metadata, content in _chat_parts(row, column, index):
            yield content
            if metadata:
                yield metadata


def _row_tools(row):
    """A row's `tools` column (TRL's convention: a list, or its JSON text), or None."""
    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) else _drop_nulls(tools)


def _chat_parts(row, column, index):
    from local_glm import glm

    try:
        return glm.tokenization.chat_parts(conversation_of(row[column]), _row_tools(row))
    except ValueError as error:
        raise ValueError(f"malformed conversation in row {index}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Loading

EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def data_files_builder(paths):
    """The `datasets` builder name for local files, from their extension (txt, json, jsonl, csv, parquet)."""
    kinds = set()
    for path in paths:
        extension = os.path.splitext(path)[1].lower()
        if extension not in EXTENSIONS:
            raise ValueError(f"{path}: unsupported file type {extension!r}; use one of {sorted(EXTENSIONS)}")
        kinds.add(EXTENSIONS[extension])
    if len(kinds) != 1:
        raise ValueError(f"data files must share one type, got {sorted(kinds)}")
    return kinds.pop()


def read_json_rows(path):
    """Rows of a .json / .jsonl file as written: strings stay strings, numbers numbers (datasets' json builder
    gives a column whose type varies across rows a Json feature and decodes every value: '"quoted"' -> quoted,
    "146" -> 146). Returns (rows, labels), labels naming each row's place ("chats.jsonl line 7").

    A .json file is a JSON array of row objects, or JSON lines; a .jsonl file is JSON lines (blank lines skipped).
    Raises ValueError naming the file and line for invalid UTF-8, a malformed line or a row that is not an object.
    """
    name = path
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path} line {line}: invalid UTF-8 (byte {data[error.start]:#04x} at offset "
                         f"{error.start}); the file must be UTF-8") from None
    del data
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte order mark
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {error.lineno} column {error.colno}: malformed JSON: {error.msg}") from None
        labels = [f"{name} row {i}" for i in range(len(rows))]
    else:
        rows, labels = [], []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} column {error.colno}: malformed JSON line: "
                                 f"{error.msg}") from None
            labels.append(f"{name} line {number}")
    for row, label in zip(rows, labels):
        if not isinstance(row, dict):
            raise ValueError(f"{label}: expected a JSON object (one row), got {type(row).__name__}")
    return rows, labels


def _json_dataset(path):
    """A Dataset of a JSON file's rows: str values as they are, any other value as its JSON text (Arrow cannot
    hold values whose type varies across rows; conversation_of decodes it again)."""
    import datasets

    rows, labels = read_json_rows(path)
    if not rows:
        raise ValueError(f"empty dataset: {path} has no rows")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    encoded = {column: [None if row.get(column) is None else row[column] if isinstance(row[column], str)
                        else json.dumps(row[column], ensure_ascii=False) for row in rows] for column in columns}
    features = datasets.Features({column: datasets.Value("string") for column in columns})
    return datasets.Dataset.from_dict(encoded, features=features), (rows, labels)


def load_raw(args):
    """A DatasetDict (or IterableDatasetDict with --streaming) with `train` and, when given, `validation`.
    Local JSON files are read by read_json_rows; `raw.json_rows` maps a split to (rows as read, their places in
    the file), for check_rows."""
    import datasets

    row_labels = {}
    if args.dataset_name is not None:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming)
    else:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        for path in files.values():
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                raise ValueError(f"empty dataset: {path} is empty")
        builder = data_files_builder([f for f in files.values()])
        if builder == "json":
            splits = {}
            for split, path in files.items():
                splits[split], row_labels[split] = _json_dataset(path)
            raw = datasets.DatasetDict(splits)
            if args.streaming:
                raw = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in raw.items()})
        else:
            kwargs = {"keep_linebreaks": True} if builder == "text" else {}
            raw = datasets.load_dataset(builder, data_files=files, streaming=args.streaming, **kwargs)
    if "train" not in raw:
        raise ValueError(f"dataset has no 'train' split (splits: {sorted(raw.keys())})")
    raw.json_rows = row_labels
    return raw


def check_rows(raw, mode: str, text_column: str, conversations_column: str, max_rows=None):
    """Every row of every split, before a tokenizer is trained or anything tokenized: the text column holds
    strings (pretraining), or the conversations column holds well-formed conversations (SFT). Raises ValueError
    naming the file and line (local JSON) or the split and row, and what is wrong. Streams are not checked here
    (tokenize_sft still checks each row as it comes)."""
    import datasets

    json_rows = getattr(raw, "json_rows", {})
    column = text_column if mode == "pretrain" else conversations_column
    for split in list(raw):
        dataset = raw[split]
        if split in json_rows:  # the values as the file holds them (the Dataset holds them as JSON text)
            rows, labels = json_rows[split]
        elif isinstance(dataset, datasets.IterableDataset):
            continue
        else:
            rows, labels = dataset.select_columns([c for c in (column, "tools") if c in dataset.column_names]), None
        total = len(labels) if labels else len(dataset)
        count = total if max_rows is None or split != "train" else min(max_rows, total)
        for index, row in zip(range(count), rows):
            value = row.get(column)
            where = labels[index] if labels else f"{split} split row {index}"
            if mode == "pretrain":
                if not isinstance(value, str):
                    raise ValueError(f"{where}: text column {column!r} must be a string, got "
                                     f"{type(value).__name__}: {value!r:.80}")
            else:
                try:
                    check_messages(conversation_of(value), _row_tools(row))
                except ValueError as error:
                    raise ValueError(f"malformed conversation in {where}: {error}") from None


def check_messages(messages, tools=None):
    """The conversation format (GLM_SPEC.md section 5, and OpenAI's tool_calls / role tool) without a tokenizer:
    what tokenize_conversation would refuse, and at least one assistant message to learn from."""
    from local_glm import glm

    if not isinstance(messages, list) or not messages:
        raise ValueError(f"expected a non-empty list of messages, got {messages!r:.80}")
    glm.tokenization.chat_parts(messages, tools)
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ValueError("no assistant message, nothing to learn")


def carve_validation(raw, percentage: int, seed: int):
    """Split `validation_split_percentage` percent of train off as validation when the source has none."""
    import datasets

    if "validation" in raw:
        return raw
    if isinstance(raw, datasets.IterableDatasetDict):
        # A stream has no length: the first rows become validation, the rest train.
        n = max(1, percentage * 10)
        return datasets.IterableDatasetDict({"train": raw["train"].skip(n), "validation": raw["train"].take(n)})
    train = raw["train"]
    if len(train) < 2:
        raise ValueError(f"the train split has {len(train)} row(s): too few to carve a validation split; "
                         "give --validation_file or more data")
    split = train.train_test_split(test_size=max(1, len(train) * percentage // 100), seed=seed, shuffle=True)
    return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})


# Where conversations are found when --conversations_column is not given: ChatGLM3 datasets' name, then OpenAI's / TRL's.
CONVERSATION_COLUMNS = ("conversations", "messages")


def find_conversations_column(column_names, requested=None):
    """The conversations column: `requested` (--conversations_column), else the first of CONVERSATION_COLUMNS in
    the data (else "conversations", for detect_mode's message)."""
    if requested is not None:
        return requested
    return next((name for name in CONVERSATION_COLUMNS if name in (column_names or [])), CONVERSATION_COLUMNS[0])


def detect_mode(column_names, text_column: str, conversations_column: str, mode: str = "auto") -> str:
    """'pretrain' or 'sft' from the requested mode or the columns present; names the column that is missing."""
    columns = list(column_names or [])
    if mode == "pretrain" or (mode == "auto" and text_column in columns):
        if text_column not in columns:
            raise ValueError(f"missing column: text column {text_column!r} not in dataset columns {columns}")
        return "pretrain"
    if mode == "sft" or (mode == "auto" and conversations_column in columns):
        if conversations_column not in columns:
            raise ValueError(f"missing column: conversations column {conversations_column!r} not in dataset "
                             f"columns {columns}")
        return "sft"
    raise ValueError(f"missing column: neither text column {text_column!r} nor conversations column "
                     f"{conversations_column!r} is in dataset columns {columns} (see --text_column, "
                     "--conversations_column)")


def conversation_of(value):
    """A conversations-column value as a list of messages: as it is (nulls that Arrow added dropped), or decoded
    from JSON text (how local JSON files are held, and a column of JSON strings from any source)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"the conversation is a string but not JSON ({error.msg})") from None
    return _drop_nulls(value)


def _drop_nulls(value):
    """Arrow gives every message every key seen in the column (absent ones as None); drop those again."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def check_conversation(messages, row: int):
    """What the tokenizer does not check: a conversation is a non-empty list with something to learn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"malformed conversation in row {row}: expected a non-empty list of messages, "
                         f"got {messages!r:.80}")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ValueError(f"malformed conversation in row {row}: no assistant message, nothing to learn")


# ---------------------------------------------------------------------------------------------------------------
# Tokenization (once, through datasets.map, cached next to the source data)

def tokenize_sft(dataset, tokenizer, conversations_column: str, block_size: int, num_proc=None, streaming=False):
    """input_ids and labels (-100 outside assistant replies) per conversation, truncated to block_size."""

    def tokenize(row, index):
        try:
            messages = conversation_of(row[conversations_column])
            encoded = tokenizer.tokenize_conversation(messages, max_length=block_size, tools=_row_tools(row))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"malformed conversation in row {index}: {error}") from None
        check_conversation(messages, index)
        return {"input_ids": encoded["input_ids"], "labels": encoded["labels"]}

    kwargs = {} if streaming else {"num_proc": num_proc, "desc": "tokenizing conversations"}
    return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names, **kwargs)


# Pretraining texts are tokenized in pieces of at most this many characters, so the memory of tokenizing (about 40
# bytes per character while tokenizers and Python hold the ids) is bounded by a batch of pieces, not by the longest
# line: one 50 MB line without newlines becomes 12,800 pieces of one document.
TEXT_PIECE_CHARS = 4096


def text_pieces(text: str, limit: int = TEXT_PIECE_CHARS):
    """`text` cut into pieces of at most `limit` characters: after the last newline in the window, else before the
    last space, else at the limit. Joined they give the text back."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind("\n", start, end) + 1
        if cut <= start:
            cut = text.rfind(" ", start + 1, end)
            if cut <= start:
                cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def split_long_texts(batch, column: str):
    """A batched map: each text row becomes its pieces (text_pieces), `continues` True on all but a document's
    last piece, so packing puts no eos between the pieces of one document."""
    texts, continues = [], []
    for text in batch[column]:
        pieces = list(text_pieces(text))
        texts += pieces
        continues += [True] * (len(pieces) - 1) + [False]
    return {column: texts, "continues": continues}


@dataclass
class Collator:
    """Right-pads a list of {"input_ids", "labels"} rows into tensors; padded labels are -100."""

    pad_token_id: int

    def __call__(self, rows):
        if isinstance(rows, dict):  # datasets' __getitems__ may hand over columns
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of a seeded per-epoch shuffle, starting at a given micro-batch (for resume).

    Global batch g (of per_device_batch_size * num_processes rows) is split across processes in rank order, so any
    number of processes sees the same global batches. The order depends only on (seed, epoch).
    """

    def __init__(self, num_rows, per_device_batch_size, num_processes, process_index, seed, epoch=0,
                 start=0, shuffle=True):
        self.num_rows, self.batch = num_rows, per_device_batch_size
        self.num_processes, self.process_index = num_processes, process_index
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start, shuffle

    def global_batches(self):
        return self.num_rows // (self.batch * self.num_processes)

    def __len__(self):
        return max(0, self.global_batches() - self.start)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        size = self.batch * self.num_processes
        for g in range(self.start, self.global_batches()):
            first = g * size + self.process_index * self.batch
            yield order[first:first + self.batch]


# ---------------------------------------------------------------------------------------------------------------
# Packed SFT rows (train.py --packing): several conversations per row, position_ids restarting at each


def pack_sft(dataset, block_size: int):
    """Concatenate tokenized conversations ({"input_ids", "labels"}) into rows of at most block_size tokens, in
    order (a conversation never straddles two rows), with "position_ids" restarting at 0 for each conversation. The
    model's mask keeps each conversation to itself (transformers' masking_utils detects restarting position_ids
    when no attention mask is given; flash attention derives cu_seqlens from them). A conversation's first label is
    set to -100, as no token of the row before it may learn to predict it: the same targets as the padded rows."""

    def pack(batch):
        rows, row = [], {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            if row["input_ids"] and len(row["input_ids"]) + len(ids) > block_size:
                rows.append(row)
                row = {"input_ids": [], "labels": [], "position_ids": []}
            row["input_ids"] += list(ids)
            row["labels"] += [IGNORE_INDEX] + list(labels[1:])
            row["position_ids"] += list(range(len(ids)))
        if row["input_ids"]:
            rows.append(row)
        return {key: [r[key] for r in rows] for key in ("input_ids", "labels", "position_ids")}

    return dataset.map(pack, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                       desc=f"packing conversations into rows of {block_size}")


@dataclass
class PackedCollator(Collator):
    """Collator for pack_sft rows: also right-pads position_ids with 0 (each pad then stands alone) and returns no
    attention mask, so that the model builds the per-conversation mask from position_ids."""

    def __call__(self, rows):
        if isinstance(rows, dict):
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        batch = super().__call__(rows)
        positions = torch.zeros_like(batch["input_ids"])
        for i, row in enumerate(rows):
            positions[i, :len(row["position_ids"])] = torch.as_tensor(row["position_ids"])
        del batch["attention_mask"]
        batch["position_ids"] = positions
        return batch
