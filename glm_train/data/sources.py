"""Step 1 of the data path: rows from a source, read as written and checked before anything else runs.

Sources: the built-in generated data, local files (`--train_file`: .txt .json .jsonl .csv .parquet) and any
`datasets.load_dataset` source (`--dataset_name`: a Hub name, or a local folder of such files). Local JSON is read by
`read_json_rows` (strings stay strings, every row has a file and line) wherever it comes from, a `--dataset_name`
folder included; every row is checked (`check_rows`) before a tokenizer is trained on it.

Two modes, from the columns: pretraining (a text column) and SFT (a conversations column, `conversations` or
`messages`, in ChatGLM3's format or OpenAI's).
"""

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import InputError


def conversation_texts(rows, column: str = "conversations"):
    """Every string a conversation's tokens come from (contents, metadata, tool JSON, rendered tool calls): a
    tokenizer-training corpus. Any format tokenize_conversation takes (ChatGLM3's, OpenAI's)."""
    for index, row in enumerate(rows):
        for _, metadata, content in _chat_parts(row, column, index):
            yield content
            if metadata:
                yield metadata


def row_tools(row):
    """A row's `tools` column (TRL's convention: a list of tool descriptions, or its JSON text), or None. Raises
    ValueError for text that is not JSON, or a value that is no list of JSON objects."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise InputError(f"not JSON ({error.msg} at character {error.pos}): {tools!r:.60}") from None
    tools = _drop_nulls(tools)
    if tools is not None:
        if not isinstance(tools, list):
            raise InputError(f"expected a list of tool descriptions, got {type(tools).__name__}: {tools!r:.60}")
        for number, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise InputError(f"tools[{number}] must be a JSON object (a function schema), got "
                                 f"{type(tool).__name__}: {tool!r:.40}")
    return tools


def _chat_parts(row, column, index):
    from local_glm import glm

    try:
        return glm.tokenization.chat_parts(conversation_of(row[column]), row_tools(row))
    except ValueError as error:
        raise InputError(f"malformed conversation in row {index}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Loading

EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def data_files_builder(paths):
    """The `datasets` builder name for local files, from their extension (txt, json, jsonl, csv, parquet)."""
    kinds = set()
    for path in paths:
        extension = os.path.splitext(path)[1].lower()
        if extension not in EXTENSIONS:
            raise InputError(f"{path}: unsupported file type {extension!r}; use one of {sorted(EXTENSIONS)}")
        kinds.add(EXTENSIONS[extension])
    if len(kinds) != 1:
        raise InputError(f"data files must share one type, got {sorted(kinds)}")
    return kinds.pop()


def _read_utf8(path):
    """A file's text: UTF-8 (a byte order mark dropped), invalid bytes refused naming the line and offset."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise InputError(f"{path} line {line}: invalid UTF-8 (byte {data[error.start]:#04x} at offset "
                         f"{error.start}); the file must be UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_text_rows(path):
    """Rows of a .txt file, one per line with its line break ({"text": line}), as datasets' text builder makes them
    (split at \\n after universal newlines), read as UTF-8 with a byte order mark dropped. Returns (rows, labels)."""
    text = _read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text)
    return [{"text": line} for line in lines], [f"{path} line {number}" for number in range(1, len(lines) + 1)]


def read_csv_rows(path):
    """Rows of a .csv file with a header line: every value a string as written (datasets' csv builder, through
    pandas, turns "146" into 146 and empty fields into None). A row whose field count differs from the header's,
    or broken quoting, is refused naming the file and 1-based line. Returns (rows, labels)."""
    import csv
    import io

    reader = csv.reader(io.StringIO(_read_utf8(path), newline=""), strict=True)
    rows, labels, header = [], [], None
    line = 1
    try:
        for record in reader:
            start, line = line, reader.line_num + 1
            if header is None:
                header = record
                if len(set(header)) != len(header) or not all(header):
                    raise InputError(f"{path} line {start}: the header needs distinct, non-empty column names, got "
                                     f"{header}")
                continue
            if not record:
                continue
            if len(record) != len(header):
                raise InputError(f"{path} line {start}: {len(record)} fields where the header has {len(header)} "
                                 f"({', '.join(header)}); quote fields that hold commas")
            rows.append(dict(zip(header, record)))
            labels.append(f"{path} line {start}")
    except csv.Error as error:
        raise InputError(f"{path} line {reader.line_num}: malformed CSV: {error}") from None
    return rows, labels


def read_json_rows(path):
    """Rows of a .json / .jsonl file as written: strings stay strings, numbers numbers (datasets' json builder
    gives a column whose type varies across rows a Json feature and decodes every value: '"quoted"' -> quoted,
    "146" -> 146). Returns (rows, labels), labels naming each row's place ("chats.jsonl line 7").

    A .json file is a JSON array of row objects, or JSON lines; a .jsonl file is JSON lines (blank lines skipped).
    Raises ValueError naming the file and line for invalid UTF-8, a malformed line or a row that is not an object.
    """
    name = path
    text = _read_utf8(path)
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{path} line {error.lineno} column {error.colno}: malformed JSON: {error.msg}") from None
        labels = [f"{name} row {i}" for i in range(len(rows))]
    else:
        rows, labels = [], []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise InputError(f"{path} line {number} column {error.colno}: malformed JSON line: "
                                 f"{error.msg}") from None
            labels.append(f"{name} line {number}")
    for row, label in zip(rows, labels):
        if not isinstance(row, dict):
            raise InputError(f"{label}: expected a JSON object (one row), got {type(row).__name__}")
    if _SURROGATE_ESCAPE.search(text):  # only \\uD800-\\uDFFF escapes can make one; a valid pair is one character
        for row, label in zip(rows, labels):
            _check_surrogates(row, label)
    return rows, labels


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_surrogates(value, label, key=None):
    """Refuse a lone surrogate anywhere in a row (docs/tokenizer.md: it is no character and UTF-8 cannot hold it)."""
    if isinstance(value, str):
        match = re.search("[\ud800-\udfff]", value)
        if match:
            raise InputError(f"{label}{f' column {key!r}' if key else ''}: a lone surrogate U+{ord(match.group()):04X} "
                             f"(the escape \\u{ord(match.group()):04x} without its pair) at character {match.start()}: "
                             "not a character; fix or drop it in the file")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_surrogates(name, label, key)
            _check_surrogates(item, label, key or name)
    elif isinstance(value, list):
        for item in value:
            _check_surrogates(item, label, key)


READERS = {"json": read_json_rows, "text": read_text_rows, "csv": read_csv_rows}


def _local_dataset(paths, read_rows):
    """A Dataset of local files' rows (read by `read_rows`): str values as they are, any other value as its JSON text
    (Arrow cannot hold values whose type varies across rows; conversation_of decodes it again). Returns it with
    (rows as read, their places)."""
    import datasets

    rows, labels = [], []
    for path in paths:
        more, places = read_rows(path)
        rows += more
        labels += places
    if not rows:
        raise InputError(f"empty dataset: {', '.join(paths)} has no rows")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    encoded = {column: [None if row.get(column) is None else row[column] if isinstance(row[column], str)
                        else json.dumps(row[column], ensure_ascii=False) for row in rows] for column in columns}
    features = datasets.Features({column: datasets.Value("string") for column in columns})
    return datasets.Dataset.from_dict(encoded, features=features), (rows, labels)


@dataclass
class Source:
    """A source's splits (`train`, and `validation` where it has one) and, for local JSON, each split's rows as the
    files hold them with their places ("chats.jsonl line 7"), which check_rows reports."""

    splits: object
    places: dict = field(default_factory=dict)


def folder_files(folder):
    """The data files of a local folder given as --dataset_name, per split, found as datasets.load_dataset finds
    them (train*/validation*/... names, else every file is train); {} when it holds none of EXTENSIONS."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except FileNotFoundError:
        return {}
    files = {str(split): sorted(paths) for split, paths in found.items()}
    if not any(os.path.splitext(p)[1].lower() in EXTENSIONS for paths in files.values() for p in paths):
        return {}
    return files


def load_source(dataset_name=None, dataset_config_name=None, train_file=None, validation_file=None,
                streaming=False) -> Source:
    """The splits of --dataset_name or --train_file/--validation_file (a Dataset each, or IterableDataset when
    streaming). Local JSON, under either flag, goes through read_json_rows: strings stay strings."""
    import datasets

    if train_file is not None:
        files = {"train": [train_file], **({"validation": [validation_file]} if validation_file else {})}
    elif os.path.isdir(dataset_name) and dataset_config_name is None and folder_files(dataset_name):
        files = folder_files(dataset_name)
    else:
        return Source(_with_train(datasets.load_dataset(dataset_name, dataset_config_name, streaming=streaming)))
    for path in (p for paths in files.values() for p in paths):
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise InputError(f"empty dataset: {path} is empty")
    builder = data_files_builder([p for paths in files.values() for p in paths])
    if builder not in READERS:  # parquet: typed columns, read by datasets
        return Source(_with_train(datasets.load_dataset(builder, data_files=files, streaming=streaming)))
    splits, places = {}, {}
    for split, paths in files.items():
        splits[split], places[split] = _local_dataset(paths, READERS[builder])
    raw = datasets.DatasetDict(splits)
    if streaming:
        raw = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in raw.items()})
    return Source(_with_train(raw), places)


def _with_train(raw):
    if "train" not in raw:
        raise InputError(f"dataset has no 'train' split (splits: {sorted(raw.keys())})")
    return raw


def check_rows(source: Source, mode: str, text_column: str, conversations_column: str, max_rows=None):
    """Every row of every split, before a tokenizer is trained or anything tokenized: the text column holds
    strings (pretraining), or the conversations column holds well-formed conversations (SFT). Raises ValueError
    naming the file and line (local JSON) or the split and row, and what is wrong. Streams are not checked here
    (tokenize_sft still checks each row as it comes)."""
    import datasets

    raw, json_rows = source.splits, source.places
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
        any_text = False
        for index, row in zip(range(count), rows):
            value = row.get(column)
            where = labels[index] if labels else f"{split} split row {index}"
            if mode == "pretrain":
                if not isinstance(value, str):
                    raise InputError(f"{where}: text column {column!r} must be a string, got "
                                     f"{type(value).__name__}: {value!r:.80}")
                any_text = any_text or not value.isspace() and value != ""
                continue
            if value is None:
                other = next((name for name in CONVERSATION_COLUMNS if name != column and row.get(name) is not None),
                             None)
                raise InputError(f"{where}: no conversation in column {column!r}"
                                 + (f" (this row has {other!r}: every row must use the same column; see "
                                    "--conversations_column)" if other else ""))
            try:
                tools = row_tools(row)
            except ValueError as error:
                raise InputError(f"{where}: column 'tools': {error}") from None
            try:
                check_messages(conversation_of(value), tools)
            except ValueError as error:
                raise InputError(f"malformed conversation in {where}: {error}") from None
        if mode == "pretrain" and count and not any_text:
            files = _PLACE.sub("", labels[0]) + ", " if labels else ""
            raise InputError(f"no text to train on: every row of text column {column!r} in the {split} split "
                             f"({files}{count} rows) is empty or whitespace")


_PLACE = re.compile(r" (line|row) \d+$")  # "data.jsonl line 7" -> "data.jsonl"


def check_messages(messages, tools=None):
    """The conversation format (docs/architecture.md section 5, and OpenAI's tool_calls / role tool) without a tokenizer:
    what tokenize_conversation would refuse, and at least one assistant message to learn from."""
    from local_glm import glm

    if not isinstance(messages, list) or not messages:
        raise InputError(f"expected a non-empty list of messages, got {messages!r:.80}")
    glm.tokenization.chat_parts(messages, tools)
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise InputError("no assistant message, nothing to learn")


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
            raise InputError(f"missing column: text column {text_column!r} not in dataset columns {columns}")
        return "pretrain"
    if mode == "sft" or (mode == "auto" and conversations_column in columns):
        if conversations_column not in columns:
            raise InputError(f"missing column: conversations column {conversations_column!r} not in dataset "
                             f"columns {columns}")
        return "sft"
    raise InputError(f"missing column: neither text column {text_column!r} nor conversations column "
                     f"{conversations_column!r} is in dataset columns {columns} (see --text_column, "
                     "--conversations_column)")


def conversation_of(value):
    """A conversations-column value as a list of messages: as it is (nulls that Arrow added dropped), or decoded
    from JSON text (how local JSON files are held, and a column of JSON strings from any source)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise InputError(f"the conversation is a string but not JSON ({error.msg})") from None
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
        raise InputError(f"malformed conversation in row {row}: expected a non-empty list of messages, "
                         f"got {messages!r:.80}")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise InputError(f"malformed conversation in row {row}: no assistant message, nothing to learn")


