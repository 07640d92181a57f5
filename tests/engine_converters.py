"""The stock converters of llama.cpp and chatglm.cpp, fetched from PyPI (the only network the tests use) and cached.

llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and `gguf-py`) is vendored in llama-cpp-python's
source distribution; chatglm.cpp's `convert.py` is in chatglm-cpp's. `pip download` fetches the sdist without building
anything (build-time only: metadata), the converter files are extracted to
~/.cache/glm-hf-converters/<package>-<version> (GLM_CONVERTERS_CACHE overrides the folder).

    python tests/engine_converters.py          # fetch both, print where they are
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP = ("llama-cpp-python", "0.3.36")  # vendors llama.cpp; its convert_hf_to_gguf.py has ChatGLMModel
CHATGLM_CPP = ("chatglm-cpp", "0.4.2")  # the last release (2024)
CACHE = Path(os.environ.get("GLM_CONVERTERS_CACHE", Path.home() / ".cache" / "glm-hf-converters"))
# What to keep from each sdist (paths inside its top folder) and how pip prepares its metadata without a build:
# llama-cpp-python's backend (scikit-build-core) comes as a wheel into pip's isolated environment; chatglm-cpp's
# setuptools metadata runs in this environment (an isolated one would fetch cmake).
# "llama-cpp-python-jinja" is the same sdist's Jinja engine (what llama-server renders chat templates with), for
# scripts/llama_jinja_render.cpp.
_MEMBERS = {"llama-cpp-python": ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                                 "vendor/llama.cpp/gguf-py/"),
            "llama-cpp-python-jinja": ("vendor/llama.cpp/common/jinja/", "vendor/llama.cpp/common/json.cpp",
                                       "vendor/llama.cpp/common/json.h", "vendor/llama.cpp/common/unicode.cpp",
                                       "vendor/llama.cpp/common/unicode.h", "vendor/llama.cpp/vendor/nlohmann/",
                                       "vendor/llama.cpp/ggml/include/", "vendor/llama.cpp/LICENSE"),
            "chatglm-cpp": ("chatglm_cpp/convert.py",)}
_ISOLATED = {"llama-cpp-python": True, "chatglm-cpp": False}


class Unavailable(RuntimeError):
    """The registry could not be reached or gave no source distribution."""


def fetch(package, version, part=""):
    """The cached folder holding `package`'s converter files (or another `part` of its sdist, a key of _MEMBERS
    after the package name), fetched on first use."""
    folder = CACHE / f"{package}{part}-{version}"
    if (folder / ".complete").exists():
        return folder
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", package, "--quiet",
                   "-d", download, f"{package}=={version}"]
        if not _ISOLATED[package]:
            command.insert(4, "--no-build-isolation")
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        archives = list(Path(download).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise Unavailable(f"pip download {package}=={version} failed: {(result.stderr or result.stdout)[-800:]}")
        with tarfile.open(archives[0]) as archive:
            top = archive.getmembers()[0].name.split("/")[0]
            prefixes = [f"{top}/{member}" for member in _MEMBERS[package + part]]
            members = [m for m in archive.getmembers() if m.isfile() and any(
                m.name == p or (p.endswith("/") and m.name.startswith(p)) for p in prefixes)]
            for member in members:
                member.name = member.name[len(top) + 1:].removeprefix("vendor/llama.cpp/")
            folder.mkdir(parents=True, exist_ok=True)
            archive.extractall(folder, members=members, filter="data")
    (folder / ".complete").write_text(f"{package}=={version}\n")
    return folder


def llama_cpp_converter():
    """Path of llama.cpp's convert_hf_to_gguf.py (it puts its own gguf-py first on sys.path)."""
    return fetch(*LLAMA_CPP) / "convert_hf_to_gguf.py"


def llama_cpp_jinja_sources():
    """The folder holding llama.cpp's Jinja engine sources (common/jinja, common/json, common/unicode, nlohmann,
    ggml's headers) from the same llama-cpp-python sdist."""
    return fetch(*LLAMA_CPP, part="-jinja")


def chatglm_cpp_converter():
    """Path of chatglm.cpp's chatglm_cpp/convert.py."""
    return fetch(*CHATGLM_CPP) / "chatglm_cpp" / "convert.py"


if __name__ == "__main__":
    if sys.argv[1:] == ["--jinja-sources"]:  # scripts/install_engines.sh
        print(llama_cpp_jinja_sources())
    else:
        print(llama_cpp_converter())
        print(chatglm_cpp_converter())
