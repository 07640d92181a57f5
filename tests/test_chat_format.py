"""The chat format as other programs meet it: rendered text tokenized by engines (our tokenizer's defaults, a plain
PreTrainedTokenizerFast, the `tokenizers` library), transformers' assistant masks, OpenAI-format messages, TRL's
SFTTrainer, peft's PrefixTuning, a `--to native` folder loaded without remote code, and the tokenizer's independence
from state left by earlier calls."""

import json
import random
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import ROOT, glm, tiny_config
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from text_helpers import TOOLS, random_conversation
from text_helpers import glm3, glm4, glm4_folder, sp, sp_model, trained  # noqa: F401  (fixtures)

tg = glm.tokenization
TRANSFORMERS_4 = transformers.__version__.startswith("4.")
def conversations(tokenizer, n, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        yield random_conversation(rng, tokenizer.is_glm4, end=["user", "assistant", "observation"][i % 3])


@pytest.fixture(params=["glm3", "glm4", "trained"])
def family(request, tmp_path):
    """A tokenizer, and its saved tokenizer.json loaded by consumers without our code."""
    tokenizer = request.getfixturevalue(request.param)
    tokenizer.save_pretrained(tmp_path)
    plain = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=tokenizer.chat_template,
                                    eos_token=tokenizer.eos_token)
    return tokenizer, plain, Tokenizer.from_file(str(tmp_path / "tokenizer.json")), tmp_path


def expected_ids(tokenizer, same):
    """The ids of a GLM-format conversation: build_chat_input's prompt when it ends with a user or observation
    turn, else tokenize_conversation's (eos after the last reply). Also whether a generation prompt follows."""
    if same[-1]["role"] == "assistant":
        return tokenizer.tokenize_conversation(same)["input_ids"], False
    last = same[-1]
    return tokenizer.build_chat_input(last["content"], same[:-1], last["role"])["input_ids"][0].tolist(), True


def test_rendered_text_gives_the_same_ids_to_every_consumer(family):
    tokenizer, plain, raw, _ = family
    for messages, tools, same in conversations(tokenizer, 90):
        ids, prompt = expected_ids(tokenizer, same)
        assert tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt,
                                             return_dict=False) == ids
        if not prompt:
            assert tokenizer.tokenize_conversation(messages, tools=tools)["input_ids"] == ids
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt, tokenize=False)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
        assert plain(text, add_special_tokens=False)["input_ids"] == ids, text
        assert raw.encode(text, add_special_tokens=False).ids == ids, text
        # A consumer rendering the template itself (transformers' own apply_chat_template) gets the same text
        assert plain.apply_chat_template(tg._template_messages(messages, tokenizer.is_glm4), tools=tools,
                                         add_generation_prompt=prompt, tokenize=False) == text


def test_finished_conversations_end_with_eos_and_masks_match_labels(family):
    tokenizer, plain, _, _ = family
    for messages, tools, _ in conversations(tokenizer, 60, seed=1):
        if messages[-1]["role"] != "assistant":
            continue
        expected = tokenizer.tokenize_conversation(messages, tools=tools)
        assert expected["input_ids"][-1] == tokenizer.eos_token_id
        mask = [int(label != -100) for label in expected["labels"]]
        ours = tokenizer.apply_chat_template(messages, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
        assert ours["input_ids"] == expected["input_ids"] and ours["assistant_masks"] == mask
        # transformers' own mask from the template's {% generation %} markers, on a tokenizer without our code.
        # 4.57 maps spans to tokens with char_to_token, which misses the second of two tokens on one character
        # (ChatGLM3's dummy-prefix "▁" and the "\n" of an empty reply); 5.x checks each token's overlap.
        if TRANSFORMERS_4:
            continue
        theirs = plain.apply_chat_template(tg._template_messages(messages, tokenizer.is_glm4), tools=tools,
                                           tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == expected["input_ids"] and theirs["assistant_masks"] == mask


def test_assistant_masks_in_padded_batches(glm3):
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
             [{"role": "user", "content": "a longer question here"}, {"role": "assistant", "content": "ok"}]]
    batch = glm3.apply_chat_template(chats, return_dict=True, return_assistant_tokens_mask=True, padding=True,
                                     return_tensors="pt")
    for row, chat in enumerate(chats):
        labels = glm3.tokenize_conversation(chat)["labels"]
        n = len(labels)
        assert batch["assistant_masks"][row, -n:].tolist() == [int(x != -100) for x in labels]
        assert batch["assistant_masks"][row, :-n].sum() == 0 and batch["attention_mask"][row].sum() == n


def test_chat_helpers_ignore_padding_and_truncation_left_on_the_tokenizer(glm3):
    messages = [{"role": "system", "content": "be brief", "tools": TOOLS}, {"role": "user", "content": "北京天气如何"},
                {"role": "assistant", "content": "晴"}]
    before = (glm3.build_chat_input("天气", messages)["input_ids"].tolist(), glm3.tokenize_conversation(messages),
              glm3.encode_batch_ids(["a b c d e f", "你好"]),
              glm3.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    glm3(["short", "a much longer text than the other one"], padding="max_length", max_length=40)
    glm3("some text that gets cut", truncation=True, max_length=3)
    glm3.padding_side = "right"
    try:
        after = (glm3.build_chat_input("天气", messages)["input_ids"].tolist(), glm3.tokenize_conversation(messages),
                 glm3.encode_batch_ids(["a b c d e f", "你好"]),
                 glm3.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    finally:
        glm3.padding_side = "left"
    assert after == before
    assert len(before[0][0]) > 3 and glm3.pad_token_id not in before[0][0]


def test_template_errors_are_template_errors(glm3):
    from jinja2 import TemplateError

    plain = PreTrainedTokenizerFast(tokenizer_object=glm3.backend_tokenizer, chat_template=glm3.chat_template)
    bad = [{"role": "robot", "content": "x"}]
    for render in (lambda: glm3.apply_chat_template(bad, tokenize=False),
                   lambda: plain.apply_chat_template(bad, tokenize=False)):
        with pytest.raises(TemplateError, match="robot"):
            render()
    with pytest.raises(ValueError, match="message 1: tool call arguments are not valid JSON"):
        glm3.build_chat_input("q", [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{not json"}}]}])


def _as_parts(text):
    """OpenAI's content parts for `text`, cut in two where it can be."""
    cut = len(text) // 2
    return [{"type": "text", "text": text[:cut]}, {"type": "text", "text": text[cut:]}]


def test_openai_content_parts_render_as_their_joined_text(family):
    tokenizer, _, _, _ = family
    for messages, tools, _ in conversations(tokenizer, 30, seed=2):
        if messages[-1]["role"] != "assistant":
            continue
        parted = [{**m, "content": _as_parts(m["content"])} if isinstance(m.get("content"), str) and m["content"]
                  and m["role"] in ("system", "user", "assistant") else m for m in messages]
        assert parted != messages
        assert tokenizer.tokenize_conversation(parted, tools=tools) == tokenizer.tokenize_conversation(messages,
                                                                                                    tools=tools)
        assert tokenizer.apply_chat_template(parted, tools=tools, tokenize=False) == \
            tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    # A tool's result that is a JSON list stays the JSON of that list.
    observation = [{"role": "user", "content": "x"}, {"role": "tool", "content": [{"temp": 20}]}]
    assert tokenizer.build_chat_input("y", observation)["input_ids"].tolist() == \
        tokenizer.build_chat_input("y", [observation[0], {"role": "tool", "content": '[{"temp": 20}]'}])[
            "input_ids"].tolist()


@pytest.mark.parametrize("messages, tools, error", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None,
     "message 0: content part 0 is 'image_url': only text parts"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], None, "message 0: content part 0 is 'text'"),
    ([{"role": "user", "content": "hi"}], [1, 2], r"tools\[0\] must be a JSON object \(a function schema\)"),
    ([{"role": "system", "content": "s", "tools": ["f"]}, {"role": "user", "content": "hi"}], None,
     r"message 0: tools\[0\] must be a JSON object"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "\ud83d", "content": "x"}], None,
     r"message 1: metadata holds a lone surrogate U\+D83D at character 0"),
])
def test_malformed_parts_tools_and_surrogates_name_the_culprit(glm3, messages, tools, error):
    for call in (lambda: glm3.apply_chat_template(messages, tools=tools, return_dict=False),
                 lambda: glm3.apply_chat_template(messages, tools=tools, tokenize=False),
                 lambda: glm3.tokenize_conversation(messages, tools=tools)):
        with pytest.raises(ValueError, match=error):
            call()


def test_trl_probes_find_tool_support_and_trained_stop_token(glm3):
    from trl.chat_template_utils import is_chat_template_stop_token_trained, supports_tool_calling

    assert supports_tool_calling(glm3)
    assert is_chat_template_stop_token_trained(glm3)


def test_trl_sft_trainer_trains_on_tokenize_conversation_labels(trained, tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    rng = random.Random(3)
    # OpenAI's form, as TRL datasets hold it (arguments as JSON text; Arrow would unify dicts' keys)
    rows = [random_conversation(rng, False, end="assistant", forms=["openai-json-string"]) for _ in range(12)]
    dataset = datasets.Dataset.from_list([{"messages": json.loads(json.dumps(m)), "tools": json.dumps(t)}
                                          for m, t, _ in rows])
    config = tiny_config(padded_vocab_size=512, eos_token_id=trained.eos_token_id, pad_token_id=trained.pad_token_id)
    torch.manual_seed(0)
    model = glm.ChatGLMForConditionalGeneration(config)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                     assistant_only_loss=True, report_to="none", logging_steps=1, save_strategy="no",
                     use_cpu=True, bf16=False, dataloader_num_workers=0, max_length=None)  # fp32, as train.py here
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=trained)
    for row, (messages, tools, _) in zip(trainer.train_dataset, rows):
        expected = trained.tokenize_conversation(messages, tools=tools)
        # TRL turns the template's assistant mask into labels: exactly our fine-tuning labels, ending with eos
        assert row["input_ids"] == expected["input_ids"] and row["labels"] == expected["labels"]
        assert [x for x in row["labels"] if x != -100][-1] == trained.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for i in range(2):
        expected = trained.tokenize_conversation(rows[i][0], tools=rows[i][1])["labels"]
        labels = batch["labels"][i].tolist()
        real = [x for x in labels if x != -100]
        assert real == [x for x in expected if x != -100] and real[-1] == trained.eos_token_id  # the model learns to stop
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)


def _ours_and_native_folders(tokenizer, tmp_path):
    """A tiny random GLM saved as our folder (tmp_path/ours) and as transformers' GlmForCausalLM with the same weights
    (tmp_path/native): what TRL's trainers load, policy and reference alike."""
    from transformers import GlmForCausalLM

    import convert_glm

    config = tiny_config(padded_vocab_size=512, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    ours = glm.ChatGLMForConditionalGeneration(config)
    native = GlmForCausalLM(convert_glm.glm_config_to_native(config))
    native.load_state_dict(convert_glm.glm_to_native_state_dict(ours.state_dict(), config), strict=False)
    ours.save_pretrained(tmp_path / "ours")
    native.save_pretrained(tmp_path / "native")


def _trl_args(config_class, tmp_path, name, **extra):
    return config_class(output_dir=str(tmp_path / f"run-{name}"), per_device_train_batch_size=4, learning_rate=1e-3,
                        report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, bf16=False,
                        dataloader_num_workers=0, seed=0, trust_remote_code=True, **extra)


def test_trl_dpo_trainer_on_our_folder_equals_it_on_native_glm(trained, tmp_path):
    """TRL 1.16's DPOTrainer given our saved folder (trust_remote_code, the reference model loaded from the same
    folder as TRL does) on a conversational preference dataset: its prompt/chosen/rejected ids are our chat template's
    (the completion ending with eos), and the DPO losses, log-probabilities and rewards of three steps equal those of
    the same run on transformers' GlmForCausalLM with converted weights."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    rng = random.Random(4)

    def text():
        return " ".join(rng.choice(["你好", "天气", "hello", "world", "模型", "model", "北京", "晴"])
                        for _ in range(rng.randint(1, 6)))

    rows = [{"prompt": [{"role": "user", "content": text()}], "chosen": [{"role": "assistant", "content": text()}],
             "rejected": [{"role": "assistant", "content": text()}]} for _ in range(8)]
    _ours_and_native_folders(trained, tmp_path)
    logs = {}
    for name in ("ours", "native"):
        trainer = DPOTrainer(model=str(tmp_path / name), args=_trl_args(DPOConfig, tmp_path, name, max_steps=3),
                             train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=trained)
        if name == "ours":
            assert type(trainer.model).__name__ == "ChatGLMForConditionalGeneration"
            for row, source in zip(trainer.train_dataset, rows):
                for side in ("chosen", "rejected"):
                    expected = trained.tokenize_conversation(source["prompt"] + source[side])
                    assert row["prompt_ids"] + row[f"{side}_ids"] == expected["input_ids"]
                    assert row[f"{side}_ids"][-1] == trained.eos_token_id
        trainer.train()
        logs[name] = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs["ours"]) == len(logs["native"]) == 3
    keys = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins")
    for a, b in zip(logs["ours"], logs["native"]):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)
    assert logs["ours"][-1]["loss"] < logs["ours"][0]["loss"]  # it learns the preference


def test_trl_grpo_trainer_on_our_folder_equals_it_on_native_glm(trained, tmp_path):
    """TRL 1.16's GRPOTrainer on our saved folder: it samples completions with our generate() from our chat template's
    prompts, scores them with a reward function on the decoded text, and trains. Two steps give the rewards (so the
    same sampled text), KL and losses of the same run on transformers' GlmForCausalLM."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    rng = random.Random(5)
    words = ["你好", "天气", "hello", "world", "模型", "model", "北京", "晴"]
    rows = [{"prompt": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(3))}]}
            for _ in range(8)]
    _ours_and_native_folders(trained, tmp_path)

    def reward(completions, **kwargs):  # conversational completions: [{"role": "assistant", "content": text}]
        return [len(completion[0]["content"]) / 10 for completion in completions]

    logs = {}
    for name in ("ours", "native"):
        args = _trl_args(GRPOConfig, tmp_path, name, max_steps=2, num_generations=4, max_completion_length=8,
                         beta=0.1)
        trainer = GRPOTrainer(model=str(tmp_path / name), reward_funcs=reward, args=args,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=trained)
        if name == "ours":
            assert type(trainer.model).__name__ == "ChatGLMForConditionalGeneration"
        trainer.train()
        logs[name] = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs["ours"]) == len(logs["native"]) == 2
    for a, b in zip(logs["ours"], logs["native"]):
        for key in ("reward", "reward_std", "kl", "loss", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
    assert logs["ours"][0]["reward_std"] > 0 and logs["ours"][1]["kl"] > 0  # varied samples; the policy moved


def test_peft_prefix_tuning_runs_and_generates():
    import peft
    from transformers import GlmForCausalLM
    from transformers.cache_utils import DynamicCache

    import convert_glm

    config = tiny_config()
    torch.manual_seed(0)
    model = glm.ChatGLMForConditionalGeneration(config).eval()
    native = GlmForCausalLM(convert_glm.glm_config_to_native(config)).eval()
    native.load_state_dict(convert_glm.glm_to_native_state_dict(model.state_dict(), config), strict=False)
    prefix_config = dict(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ours = peft.get_peft_model(model, peft.PrefixTuningConfig(**prefix_config))
    theirs = peft.get_peft_model(native, peft.PrefixTuningConfig(**prefix_config))
    theirs.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    ids = torch.randint(3, config.padded_vocab_size, (2, 6))
    mask = torch.ones_like(ids)
    out = ours(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {name for name, p in ours.named_parameters() if p.grad is not None}
    assert grads and all("prompt_encoder" in name for name in grads)
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        # Our model attending the prefix's key/values itself, and transformers' own GLM under the same prefix
        cache = ours.get_prompt(batch_size=2)
        cache = cache if isinstance(cache, DynamicCache) else DynamicCache.from_legacy_cache(cache)
        direct = model(input_ids=ids, attention_mask=torch.ones(2, 10, dtype=torch.long), past_key_values=cache)
        torch.testing.assert_close(logits, direct.logits)
        torch.testing.assert_close(logits, theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(model(input_ids=ids).logits, logits)  # the prefix changes the output
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        generated = ours.generate(**kwargs)
        assert generated.shape[1] > 6 and torch.equal(generated, theirs.generate(**kwargs))


def test_config_dict_has_standard_names_beside_the_original_keys():
    config = tiny_config(num_layers=3, multi_query_group_num=4, layernorm_epsilon=1e-6, seq_length=512)
    saved = config.to_dict()
    standard = dict(num_hidden_layers=3, num_key_value_heads=4, head_dim=8, intermediate_size=96, vocab_size=128,
                    max_position_embeddings=512, rms_norm_eps=1e-6)
    assert {k: saved[k] for k in standard} == standard
    assert (saved["num_layers"], saved["multi_query_group_num"], saved["kv_channels"]) == (3, 4, 8)
    assert glm.ChatGLMConfig(**saved).to_dict() == saved
    with pytest.raises(ValueError, match="num_layers=5 and num_hidden_layers=3 disagree"):
        glm.ChatGLMConfig(**{**saved, "num_layers": 5})


def test_saved_tokenizer_config_is_what_a_hub_repo_holds(glm3, tmp_path):
    glm3.save_pretrained(tmp_path / "first")
    AutoTokenizer.from_pretrained(tmp_path / "first", trust_remote_code=True).save_pretrained(tmp_path / "second")
    for folder in ("first", "second"):
        config = json.loads((tmp_path / folder / "tokenizer_config.json").read_text())
        assert not set(config) & set(tg.LOAD_TIME_KEYS), folder
        assert config["split_special_tokens"] is False and config["chat_template"] == glm3.chat_template


def test_native_folder_tokenizer_loads_without_remote_code(glm3, tmp_path):
    config = tiny_config(padded_vocab_size=64896, seq_length=512)
    torch.manual_seed(0)
    glm.ChatGLMForConditionalGeneration(config).save_pretrained(tmp_path / "glm")
    glm3.save_pretrained(tmp_path / "glm")
    for to, src, dst in (("native", "glm", "native"), ("glm", "native", "back")):
        subprocess.run([sys.executable, str(ROOT / "convert_glm.py"), "--to", to, str(tmp_path / src),
                        str(tmp_path / dst)], check=True, capture_output=True, timeout=300)
    native = json.loads((tmp_path / "native" / "tokenizer_config.json").read_text())
    assert "auto_map" not in native and not (tmp_path / "native" / "tokenization_glm.py").exists()
    plain = AutoTokenizer.from_pretrained(tmp_path / "native")  # no trust_remote_code
    assert plain.model_max_length == 512 and plain.padding_side == "left"
    back = AutoTokenizer.from_pretrained(tmp_path / "back", trust_remote_code=True)
    assert type(back).__name__ == "ChatGLMTokenizer"
    for messages, tools, _ in conversations(glm3, 30, seed=4):
        prompt = messages[-1]["role"] != "assistant"
        ids = glm3.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt, return_dict=False)
        theirs = plain.apply_chat_template(tg._template_messages(messages, False), tools=tools,
                                           add_generation_prompt=prompt, tokenize=True, return_dict=False)
        assert theirs == ids
        assert back.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt, return_dict=False) == ids
