"""The original ChatGLM chat API (chat, stream_chat, quantize) on top of transformers' public generate()."""


class ChatMixin:
    """Adds `chat`, `stream_chat` and `quantize` to ChatGLMForConditionalGeneration (filled in by issue #5)."""
