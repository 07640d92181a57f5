"""Fast tokenizer for ChatGLM2/3 and GLM-4, and the GLM chat format (one place for both).

`ChatGLMTokenizer` wraps a `tokenizers.Tokenizer` and gives the ids of the original tokenizers: the SentencePiece model
of ChatGLM2/3 and the tiktoken ranks of GLM-4. It loads `tokenizer.json`, or converts the original `tokenizer.model`
(the format is read from the file's content). Text is always text: control-token strings inside a string
("<|user|>", "sop") encode as ordinary characters, exactly as `sentencepiece.encode` / `tiktoken.encode` do; control
tokens come only from the chat functions (`build_chat_input`, `tokenize_conversation`, `apply_chat_template`).

    >>> tokenizer = AutoTokenizer.from_pretrained("path/to/chatglm3-6b", trust_remote_code=True)
    >>> tokenizer.encode("你好")
    [64790, 64792, 36474, 54591]
    >>> tokenizer.build_chat_input("你好")["input_ids"].tolist()
    [[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]]
"""

import base64
import codecs
import inspect
import json
import os
import re
import shutil

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BatchEncoding, PreTrainedTokenizerFast

ROLES = ("system", "user", "assistant", "observation")
IGNORE_INDEX = -100  # label of positions the loss skips (the cross-entropy default)

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


def _family(glm4):
    """The facts that differ between ChatGLM2/3 and GLM-4 tokenizers."""
    if glm4:
        return dict(prefix=("[gMASK]", "<sop>"), eos="<|endoftext|>", pad="<|endoftext|>", unk=None, bos=None)
    return dict(prefix=("[gMASK]", "sop"), eos="</s>", pad="<unk>", unk="<unk>", bos="<s>")


def chat_template(glm4=False):
    """The Jinja chat template, rendering the same text that `ChatGLMTokenizer.build_chat_input` encodes.

    A message is `<|role|>` + metadata + "\\n" + content. ChatGLM3 encodes metadata + "\\n" and the content
    separately, each with SentencePiece's dummy prefix; in one text, the " " written before a non-empty content is
    that prefix, so the text encodes to the same ids. GLM-4 has no dummy prefix.

        >>> chat_template()[:20]
        "{{- '[gMASK]sop' -}}"
    """
    prefix = "".join(_family(glm4)["prefix"])
    content = "{{- content -}}" if glm4 else "{%- if content -%}{{- ' ' ~ content -}}{%- endif -%}"
    return (
        f"{{{{- '{prefix}' -}}}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant', 'observation'] -%}"
        "{{- raise_exception('unknown role: ' ~ message['role']) -}}{%- endif -%}"
        "{%- if message['content'] is not string -%}"
        "{{- raise_exception('content must be a string; render tool calls with format_tool_call') -}}{%- endif -%}"
        "{%- set content = message['content'] -%}"
        "{%- if message['role'] == 'system' and message['tools'] is defined and message['tools'] is not none -%}"
        "{%- set content = content ~ '\\n' ~ (message['tools'] | tojson(indent=4)) -%}{%- endif -%}"
        "{{- '<|' ~ message['role'] ~ '|>' ~ (message['metadata'] or '') ~ '\\n' -}}"
        f"{content}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
    )


def format_tool_call(name, parameters, glm4=False):
    """Render a parsed tool call back into the (metadata, content) that the model wrote.

    ChatGLM3 writes a Python call in a fenced block (each value as a Python literal), GLM-4 writes JSON.

        >>> format_tool_call("get_weather", {"city": "北京", "days": 3})
        ('get_weather', "```python\\ntool_call(city='北京', days=3)\\n```")
        >>> format_tool_call("get_weather", {"city": "北京"}, glm4=True)
        ('get_weather', '{"city": "北京"}')
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a non-empty string name, got {name!r}")
    if not isinstance(parameters, dict):
        raise ValueError(f"tool call parameters must be a dict, got {type(parameters).__name__}")
    if glm4:
        return name, json.dumps(parameters, ensure_ascii=False)
    for key in parameters:
        if not (isinstance(key, str) and key.isidentifier()):
            raise ValueError(f"tool call parameter names must be Python identifiers, got {key!r}")
    arguments = ", ".join(f"{key}={value!r}" for key, value in parameters.items())
    return name, f"```python\ntool_call({arguments})\n```"


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
    """Raise TypeError naming the type unless `text` is a str, a list of str, or a list of lists of str."""
    for item in text if isinstance(text, (list, tuple)) else [text]:
        for piece in item if isinstance(item, (list, tuple)) else [item]:
            if not isinstance(piece, str):
                raise TypeError(f"{name} must be a str or a list of str, got {type(piece).__name__}")


def _mark(obj, pattern):
    """Prefix each control-token string (and each marker) in user data with the marker, recursively."""
    if isinstance(obj, str):
        return pattern.sub(lambda match: _MARK + match.group(0), obj)
    if isinstance(obj, dict):
        return {_mark(key, pattern): _mark(value, pattern) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(value, pattern) for value in obj]
    return obj


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
        kwargs.setdefault("split_special_tokens", True)  # text is text, see the module docstring
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
        self._specials = {token.content: i for i, token in self.added_tokens_decoder.items() if token.special}
        self._aliases = {"<eos>": family["eos"], "<pad>": family["pad"], "<unk>": family["unk"], "<bos>": family["bos"]}
        self._prefix_ids = [self._specials[token] for token in family["prefix"]]
        controls = "|".join(map(re.escape, sorted(self._specials, key=len, reverse=True)))
        self._user_control_re = re.compile(f"{controls}|{_MARK}")
        self._template_control_re = re.compile(f"{_MARK}({controls}|{_MARK})|({controls})")

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

    def _encode_texts(self, texts):
        """Ids of each text, control-token strings as text and no prefix."""
        backend = self.backend_tokenizer
        before, backend.encode_special_tokens = backend.encode_special_tokens, True
        try:
            return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before

    def get_command(self, token):
        """The id of a control token, as the original API: `get_command("<|user|>")` -> 64795; also "<eos>",
        "<pad>", "<unk>", "<bos>" (ChatGLM3 only)."""
        token_id = self._specials.get(self._aliases.get(token, token))
        if token_id is None:
            raise KeyError(f"{token!r} is not a control token of this tokenizer")
        return token_id

    def encode_batch_ids(self, texts, add_special_tokens=True):
        """Token ids of many texts at once: the fastest way to tokenize a corpus.

        The same ids as `self(texts)["input_ids"]`, encoded in parallel by `tokenizers` without the character
        offsets that `__call__` has it compute (about 1.4x faster on 4 MB of text; see benchmarks/bench_tokenizer.py).

        Example:
            >>> tokenizer.encode_batch_ids(["你好", "hello"])
            [[64790, 64792, 36474, 54591], [64790, 64792, 24954]]
        """
        texts = list(texts)
        _check_text(texts, "texts")
        backend = self.backend_tokenizer
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

    def _format_message(self, index, message):
        """Check one message; return its role, metadata, content (a tool call rendered as text) and tools."""
        if not isinstance(message, dict):
            raise ValueError(f"message {index}: expected a dict, got {type(message).__name__}")
        role, content, metadata = message.get("role"), message.get("content"), message.get("metadata") or ""
        if role not in ROLES:
            raise ValueError(f"message {index}: unknown role {role!r}, expected one of {ROLES}")
        if not isinstance(metadata, str):
            raise ValueError(f"message {index}: metadata must be a string, got {type(metadata).__name__}")
        if role == "assistant" and isinstance(content, dict):
            # A reply that model.chat parsed: a tool call, or another channel's {"name", "content"}.
            if "parameters" in content:
                try:
                    metadata, content = format_tool_call(content.get("name"), content["parameters"], self.is_glm4)
                except ValueError as error:
                    raise ValueError(f"message {index}: {error}") from None
            else:
                metadata, content = content.get("name"), content.get("content")
                if not (isinstance(metadata, str) and isinstance(content, str)):
                    raise ValueError(f"message {index}: a dict reply needs a 'name' and 'parameters' or 'content'")
        if not isinstance(content, str):
            raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
        return role, metadata, content, message.get("tools") if role == "system" else None

    def _messages_ids(self, messages):
        """Per message: <|role|> + encode(metadata + "\\n") + encode(content), checked and encoded in one batch."""
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
        formatted = [self._format_message(index, message) for index, message in enumerate(messages)]
        texts = []
        for _, metadata, content, tools in formatted:
            if tools is not None:
                content += "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
            texts += [metadata + "\n", content]
        encoded = self._encode_texts(texts) if texts else []
        return [
            [self.get_command(f"<|{formatted[i][0]}|>")] + encoded[2 * i] + encoded[2 * i + 1]
            for i in range(len(formatted))
        ]

    def build_single_message(self, role, metadata, message):
        """`<|role|>` + encode(metadata + "\\n") + encode(message), no prefix tokens.

        >>> tokenizer.build_single_message("user", "", "你好")
        [64795, 30910, 13, 36474, 54591]
        """
        return self._messages_ids([{"role": role, "metadata": metadata, "content": message}])[0]

    def build_chat_input(self, query, history=None, role="user"):
        """The prompt for the model's reply, as the original ChatGLM3 API: [gMASK] sop, each history message, the
        query as a `role` message, then <|assistant|>. History items are {"role", "content"[, "metadata", "tools"]};
        an assistant content may be a parsed tool call {"name", "parameters"}.

        >>> tokenizer.build_chat_input("你好")["input_ids"].tolist()
        [[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]]
        """
        messages = [*(history or []), {"role": role, "content": query}]
        ids = self.get_prefix_tokens()
        for message_ids in self._messages_ids(messages):
            ids += message_ids
        ids.append(self.get_command("<|assistant|>"))
        return BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * len(ids)]}, tensor_type="pt")

    def tokenize_conversation(self, messages, max_length=None):
        """Ids and labels for supervised fine-tuning.

        Labels are IGNORE_INDEX (-100) except on each assistant reply (its metadata line and content, after its
        <|assistant|> token) and on the token that stops it: the next message's role token, or an eos appended
        when the conversation ends with a reply. Truncated on the right to `max_length`.

            >>> out = tokenizer.tokenize_conversation([{"role": "user", "content": "hi"},
            ...                                        {"role": "assistant", "content": "hello"}])
            >>> sorted(out)
            ['input_ids', 'labels']
        """
        if not messages:
            raise ValueError("messages must be a non-empty list")
        input_ids = self.get_prefix_tokens()
        labels = [IGNORE_INDEX] * len(input_ids)
        previous = None
        for message, ids in zip(messages, self._messages_ids(messages)):
            role = message["role"]
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
        """transformers' apply_chat_template, with the ids of `build_chat_input`.

        The template's control tokens become control tokens; the same strings inside messages stay text: they are
        marked before rendering, and the rendered text is encoded piece by piece. Messages are checked and tool-call
        dicts rendered as in `build_chat_input`. With tokenize=False the text is returned; tokenizing that text
        yourself needs split_special_tokens=False and treats control strings typed by users as control tokens.

            >>> tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
            ...                               return_dict=False)
            [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
        """
        if tools is not None:
            raise ValueError("put tools in the system message: {'role': 'system', 'content': ..., 'tools': [...]}")
        if return_assistant_tokens_mask:
            raise ValueError("use tokenize_conversation(messages) for training labels")
        kwargs.pop("sanitize_control_tokens", None)  # transformers 5 option; always done here
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        chats = []
        for chat in conversation if batched else [conversation]:
            formatted = [self._format_message(index, message) for index, message in enumerate(chat)]
            chats.append([
                {"role": role, "metadata": metadata, "content": content, **({} if tools is None else {"tools": tools})}
                for role, metadata, content, tools in formatted
            ])
        if not tokenize:
            texts = super().apply_chat_template(chats, documents=documents, tokenize=False, **kwargs)
            return texts if batched else texts[0]
        chats = [_mark(chat, self._user_control_re) for chat in chats]
        texts = super().apply_chat_template(chats, documents=documents, tokenize=False, **kwargs)
        ids = [self._encode_rendered(text) for text in texts]
        if truncation and max_length is not None:
            ids = [x[:max_length] if self.truncation_side == "right" else x[-max_length:] for x in ids]
        if not (_RETURN_DICT_DEFAULT if return_dict is None else return_dict):
            if return_tensors is not None:
                return BatchEncoding({"input_ids": ids}, tensor_type=return_tensors)["input_ids"]
            return ids if batched else ids[0]
        inputs = {"input_ids": ids if batched or return_tensors else ids[0]}
        kwargs = tokenizer_kwargs or {}
        return self.pad(inputs, padding=padding, max_length=max_length, return_tensors=return_tensors, **kwargs)

    def _encode_rendered(self, text):
        """Encode a chat rendered from marked messages: control strings are control tokens, marked ones text."""
        chunks, controls, parts, position = [], [], [], 0
        for match in self._template_control_re.finditer(text):
            parts.append(text[position : match.start()])
            if _MARK in parts[-1]:
                raise ValueError("the chat template split a marked control token; it must write message strings whole")
            if match.group(1) is not None:
                parts.append(match.group(1))
            else:
                chunks.append("".join(parts))
                controls.append(self._specials[match.group(2)])
                parts = []
            position = match.end()
        chunks.append("".join(parts) + text[position:])
        ids = []
        for chunk_ids, control in zip(self._encode_texts(chunks), [*controls, None]):
            ids += chunk_ids if control is None else [*chunk_ids, control]
        return ids

    def save_pretrained(self, save_directory, **kwargs):
        """Save tokenizer.json and tokenizer_config.json (auto_map and the chat template inside), this file for
        trust_remote_code, and the original tokenizer.model when there is one (engines such as chatglm.cpp read it)."""
        kwargs.setdefault("save_jinja_files", False)  # the template inside tokenizer_config.json, as Hub repos have it
        files = super().save_pretrained(save_directory, **kwargs)
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
    except RuntimeError:
        if bad:
            raise bad[0] from None
        raise
    folder = tempfile.mkdtemp(prefix="glm-tokenizer-")
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as file:
        file.write(model.getvalue())
    tokenizer = ChatGLMTokenizer(vocab_file=path)  # converts it: tokenizer.json gets the model's ids
    weakref.finalize(tokenizer, shutil.rmtree, folder, ignore_errors=True)  # save_pretrained copies the file
    return tokenizer
