"""Import this repository's Hub code files (configuration_glm, modeling_glm and its siblings, tokenization_glm) from
a checkout.

The files use relative imports, as transformers' trust_remote_code requires, so they are imported here as the
package `glm_hf` rooted at this folder. Registering the classes for the Auto* factories makes `save_pretrained`
write `auto_map` and copy the code files, so every saved folder is a complete Hub repository.

Example:
    >>> from local_glm import glm
    >>> config = glm.ChatGLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16,
    ...                            ffn_hidden_size=128, padded_vocab_size=100)
    >>> model = glm.ChatGLMForConditionalGeneration(config)
"""

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "glm_hf"
CODE_FILES = ("configuration_glm.py", "modeling_glm.py", "chat_glm.py", "compat_glm.py", "quantization_glm.py",
              "tokenization_glm.py", "tool_parser_glm.py")


def _load():
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = package
    configuration = importlib.import_module(f"{PACKAGE}.configuration_glm")
    modeling = importlib.import_module(f"{PACKAGE}.modeling_glm")
    namespace = types.SimpleNamespace(configuration=configuration, modeling=modeling)
    for module in (configuration, modeling):
        for name in getattr(module, "__all__", ()) or [n for n in dir(module) if n.startswith("ChatGLM")]:
            setattr(namespace, name, getattr(module, name))
    namespace.ChatGLMConfig = configuration.ChatGLMConfig
    if (ROOT / "tokenization_glm.py").exists():
        tokenization = importlib.import_module(f"{PACKAGE}.tokenization_glm")
        namespace.tokenization = tokenization
        namespace.ChatGLMTokenizer = tokenization.ChatGLMTokenizer
        tokenization.ChatGLMTokenizer.register_for_auto_class("AutoTokenizer")

    configuration.ChatGLMConfig.register_for_auto_class()
    modeling.ChatGLMForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
    modeling.ChatGLMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    return namespace


glm = _load()
