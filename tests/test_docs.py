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


# ---------------------------------------------------------------------------------------------------------------
# Every shell command in README.md and docs/ runs as printed from a fresh shell: through scripts/, which set up and
# enter the repository's environment (a plain `python` or `accelerate` fails outside it).

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What runs in a shell as printed: the scripts, or an external tool that docs/engines.md says how to get.
RUNS_AS_PRINTED = re.compile(r"^((\w+=\S+ )*bash scripts/\w+\.sh|printf .* \| bash scripts/\w+\.sh|echo |C=|"
                             r"llama-cli |--|train\.py |\\)")


def shell_commands():
    """(file, line) of every command line of the docs' bash blocks, continuation lines included."""
    for path in DOCS:
        for block in code_blocks(path.read_text(), "bash"):
            for line in block.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    yield path.name, line.strip()


def test_every_documented_command_goes_through_the_scripts():
    commands = list(shell_commands())
    assert len(commands) > 30  # the docs' commands are found
    assert [c for c in commands if not RUNS_AS_PRINTED.match(c[1])] == []


def fresh_shell_env(tmp_path):
    """A new terminal's environment: no virtual environment active, nothing of this process's. GLM_REQUIREMENTS
    names the test environment, which holds requirements.txt and more, so that the scripts enter it instead of
    building the runtime one a user's first run builds."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ["HOME"], "HF_HUB_OFFLINE": "1",
           "GLM_REQUIREMENTS": "requirements-test.txt"}
    env.update({k: os.environ[k] for k in ("GLM_VENV_ROOT", "GLM_EXTRAS") if k in os.environ})
    return env


def test_a_second_first_run_waits_for_the_setup_in_progress(tmp_path):
    """Two first runs at once (scripts/main.sh and scripts/test.sh in two terminals): the second waits on the
    environment's lock, then enters what the first made instead of removing it mid-install."""
    env = {**fresh_shell_env(tmp_path), "GLM_VENV_ROOT": str(tmp_path / "venvs")}
    venv = subprocess.run(["python3", "scripts/venv_path.py", "requirements-test.txt"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert venv.startswith(str(tmp_path / "venvs")) and re.search(r"-tf\d+\.\d+", venv)  # keyed by the release
    (tmp_path / "venvs").mkdir()
    # The first run: holds the lock while it "installs", then leaves a finished environment.
    first = subprocess.Popen(["bash", "-c", f'exec 9>"{venv}.lock"; flock 9; echo locked; sleep 3; '
                              f'mkdir -p "{venv}/bin"; echo "export VIRTUAL_ENV={venv} MADE_BY_FIRST=1" > '
                              f'"{venv}/bin/activate"; touch "{venv}/.complete"'], stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline() == "locked\n"
    second = subprocess.run(["bash", "-c", 'source scripts/env.sh; echo "$VIRTUAL_ENV $MADE_BY_FIRST"'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert first.wait() == 0
    assert "waiting for another setup" in second.stderr and "setting up" not in second.stderr, second.stderr
    assert second.stdout.strip() == f"{venv} 1"


def documented(path, prefix):
    """The documented command line that starts with `prefix`, split as a shell splits it (comment dropped)."""
    line = next(c for name, c in shell_commands() if name == path and c.startswith(prefix))
    return shlex.split(line, comments=True)


@pytest.fixture(scope="module")
def skills_folder(tmp_path_factory, workspace):
    """A small saved model in output/glm-skills of a fresh folder, and a chats.jsonl of 40 conversations."""
    import shutil

    root = tmp_path_factory.mktemp("user")
    shutil.copytree(workspace / "base", root / "output" / "glm-skills")
    lines = (workspace / "chats.jsonl").read_text().splitlines()[:40]
    (root / "chats.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_documented_small_data_fine_tune_runs_as_printed(skills_folder):
    """README's fine-tune of the main job's folder, from the user's folder (scripts/train.sh by its path): a new
    folder named after the base, the base untouched, no launcher notice, and the few-steps notice."""
    root = skills_folder
    before = {p: p.read_bytes() for p in (root / "output" / "glm-skills").iterdir()}
    command = documented("README.md", "bash scripts/train.sh --model_name_or_path output/glm-skills")
    command[1] = str(ROOT / command[1])
    result = subprocess.run(command + ["--block_size", "128"], cwd=root, env=fresh_shell_env(root),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "output" / "glm-skills-finetuned" / "model.safetensors").is_file()
    assert {p: p.read_bytes() for p in (root / "output" / "glm-skills").iterdir()} == before
    assert "were not passed to `accelerate launch`" not in result.stderr
    assert "note: this run makes only 5 optimizer step(s)" in result.stdout  # 38 rows at 8 a step: 4 full, 6 left


def test_documented_conversion_runs_as_printed(skills_folder, tmp_path):
    command = documented("engines.md", "bash scripts/run.sh python convert_glm.py --to native")
    command[-2:] = [str(skills_folder / "output" / "glm-skills"), str(tmp_path / "native")]
    result = subprocess.run(command, cwd=ROOT, env=fresh_shell_env(tmp_path), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == "glm"


def test_rerunning_the_main_job_is_refused_in_one_line(tmp_path):
    """bash scripts/main.sh a second time: the folder holds a finished run. One line says so and how to go on; no
    traceback (train.py's or the launcher's); nothing changes."""
    out = tmp_path / "glm-skills"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "config.json").write_text("{}")
    command = documented("README.md", "bash scripts/main.sh")
    result = subprocess.run(command + ["--output_dir", str(out)], cwd=ROOT, env=fresh_shell_env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: --output_dir {out} is not empty") and "--overwrite_output_dir" in last
    assert result.stderr.count("is not empty") == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
