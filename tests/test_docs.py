"""The documentation's examples run as printed: the README's quick-start Python snippet and chat.py tool-call demo,
and docs/chat.md's tool-call example, each in a fresh process, against a tiny model trained to replay the
conversations they show (the main job's model gives the same answers; its own run is too slow for a test)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, glm, tiny_config, train_to_replay

from glm_train.data import builtin

README = (ROOT / "README.md").read_text()
CHAT_DOC = (ROOT / "docs" / "chat.md").read_text()
DOC_TOOLS = [{"name": "get_weather", "description": "查询天气",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
DOC_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
DEMO = [
    [{"role": "user", "content": "What is 23 plus 58?"}, {"role": "assistant", "content": "81"}],
    [{"role": "system", "content": builtin.SYSTEM_PROMPT, "tools": [builtin.WEATHER_TOOL]},
     {"role": "user", "content": "杭州今天天气如何？"},
     {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='杭州')\n```"}],
    [{"role": "system", "content": DOC_SYSTEM, "tools": DOC_TOOLS}, {"role": "user", "content": "北京天气怎么样"},
     {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"},
     {"role": "observation", "content": '{"weather": "晴"}'}, {"role": "assistant", "content": "北京今天晴"}],
]
ENV = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": "",
       "PYTHONIOENCODING": "utf-8"}


def code_blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A tiny model that greedy decoding makes replay DEMO, saved as a Hub folder named like the main job's."""
    corpus = [text for _, metadata, content in (p for c in DEMO for p in glm.tokenization.chat_parts(c))
              for text in (metadata, content)]
    tokenizer = glm.tokenization.train_glm_tokenizer(corpus * 20, vocab_size=400)
    model = train_to_replay(DEMO, tokenizer, tiny_config(padded_vocab_size=416, seq_length=512), 300, 0.01)
    root = tmp_path_factory.mktemp("docs")
    folder = root / "output" / "glm-skills"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return root


def run_python(code, cwd):
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_readme_quick_start_python_snippet(demo_folder):
    snippet = next(block for block in code_blocks(README, "python") if '"output/glm-skills"' in block)
    lines = run_python(snippet, cwd=demo_folder).strip().splitlines()
    assert lines == ["81", "{'name': 'get_weather', 'parameters': {'city': '杭州'}}"]


def test_readme_quick_start_chat_commands(demo_folder):
    commands = next(block for block in code_blocks(README, "bash") if "chat.py output/glm-skills" in block)
    for line in commands.strip().splitlines():
        words = shlex.split(line.split("#")[0])
        if words[:2] == ["bash", "scripts/run.sh"]:  # the environment is this one; chat.py is the repository's
            words = [sys.executable, str(ROOT / "chat.py"), *words[4:]]
            query = "杭州今天天气如何？" if "--tools" in words else "What is 23 plus 58?"
            result = subprocess.run(words, cwd=demo_folder, env=ENV, input=query + "\n", capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            expected = '[tool call] get_weather({"city": "杭州"})' if "--tools" in words else "GLM: 81"
            assert expected in result.stdout, result.stdout
        else:  # writes weather.json
            subprocess.run(line, shell=True, cwd=demo_folder, check=True)
    assert json.loads((demo_folder / "weather.json").read_text()) == [builtin.WEATHER_TOOL]


def test_chat_doc_tool_call_example(demo_folder):
    snippet = next(block for block in code_blocks(CHAT_DOC, "python") if "get_weather(**response" in block)
    claimed = re.search(r"# response == (.*)", snippet).group(1)
    preamble = (
        "import json\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "path = 'output/glm-skills'\n"
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n"
        "model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()\n"
        "def get_weather(city):\n"
        "    return {'weather': '晴'}\n"
    )
    # The example's calls, greedy and bounded so the tiny model answers as trained
    body = snippet.replace("history)\n", "history, do_sample=False, max_new_tokens=40)\n").replace(
        'role="observation")', 'role="observation", do_sample=False, max_new_tokens=40)')
    body = body.replace(f"# response == {claimed}", f"assert response == {claimed}, response")
    out = run_python(preamble + body + "print(json.dumps(response, ensure_ascii=False))\n", cwd=demo_folder)
    assert json.loads(out.strip().splitlines()[-1]) == "北京今天晴"
