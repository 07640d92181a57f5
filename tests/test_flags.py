"""glm_train/flags.py: every bad flag value refused at parse time naming the flag; the recipes' presets load."""


import pytest
from conftest import glm

from glm_train import flags, model


@pytest.mark.parametrize("given, named", [
    (["--block_size", "-5"], "--block_size -5"), (["--block_size", "0"], "--block_size 0"),
    (["--eval_steps", "0"], "--eval_steps 0"), (["--logging_steps", "0"], "--logging_steps 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
    (["--checkpointing_steps", "-1"], "--checkpointing_steps -1"),
    (["--max_grad_norm", "nan"], "--max_grad_norm nan"), (["--learning_rate=-1e-3"], "--learning_rate -0.001"),
    (["--learning_rate", "inf"], "--learning_rate inf"), (["--adam_beta1", "-0.1"], "--adam_beta1 -0.1"),
    (["--adam_beta2", "1.5"], "--adam_beta2 1.5"), (["--num_train_epochs", "0"], "--num_train_epochs 0.0"),
    (["--tokenizer_vocab_size", "100"], "--tokenizer_vocab_size 100"),
    (["--validation_split_percentage", "0"], "--validation_split_percentage 0"),
    (["--prefix_projection"], "--prefix_projection needs --pre_seq_len"),
    (["--lora_dropout", "0.1"], "--lora_alpha / --lora_dropout need --lora_r"),
    (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "--overwrite_output_dir"),
])
def test_bad_flag_is_refused_at_parse_time(given, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flags.parse_args(["--train_file", "x.txt", "--config_name", "tiny", *given])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_push_to_hub_while_offline_is_refused_before_anything_runs(capsys):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest.py sets HF_HUB_OFFLINE=1, as scripts/run.sh does
    with pytest.raises(SystemExit) as exit_info:
        flags.parse_args(["--train_file", "x.txt", "--config_name", "tiny", "--push_to_hub"])
    assert exit_info.value.code == 2
    assert "--push_to_hub uploads to the Hub, but HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_min_tokenizer_vocab_matches_the_tokenizer():
    tokenization = glm.tokenization
    assert flags.MIN_TOKENIZER_VOCAB == len(tokenization.GLM3_RESERVED_PIECES) + len(tokenization.GLM3_CONTROL_TOKENS) + 1
    with pytest.raises(ValueError):
        tokenization.train_glm_tokenizer(["a b"] * 10, vocab_size=flags.MIN_TOKENIZER_VOCAB - 1)


def test_presets_load_through_autoconfig():
    args = flags.parse_args(["--config_name", "chatglm3-6b", "--train_file", "x.txt"])
    config = model.load_config(config_name=args.config_name)
    assert (config.num_layers, config.padded_vocab_size, config.seq_length) == (28, 65024, 8192)
    args = flags.parse_args(["--config_name", "glm-4-9b", "--train_file", "x.txt"])
    assert model.load_config(config_name=args.config_name).rope_ratio == 500


@pytest.mark.parametrize("extra, message", [(["--streaming", "--max_train_steps", "1"], "--streaming"),
                                            (["--pre_seq_len", "4"], "--pre_seq_len")])
def test_train_packing_refuses_what_it_cannot_pack(extra, message, capsys):
    from glm_train import flags

    with pytest.raises(SystemExit):
        flags.parse_args(["--config_name", "tiny", "--packing", *extra])
    assert message in capsys.readouterr().err
