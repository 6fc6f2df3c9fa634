"""--config_file / --output_config (spec cli-options §14, §15) and our stricter checks."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from library.config.config_file import flatten_sections, parse_args_with_config
from library.config.options import SCRIPTS, build_parser
from library.errors import UserError


def _parse(tmp_path: Path, toml_text: str, argv: list[str] = (), script: str = "train_network", name="c.toml"):
    path = tmp_path / name
    path.write_text(toml_text, encoding="utf-8")
    return parse_args_with_config(build_parser(script), ["--config_file", str(path), *argv])


def _output_config(script: str, argv: list[str], path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args_with_config(build_parser(script), [*argv, "--config_file", str(path), "--output_config"])
    assert e.value.code == 0


ROUND_TRIP_ARGV = {
    "train_network": ["--learning_rate", "1e-4", "--network_args", "conv_dim=4", "conv_alpha=1",
                      "--resolution", "768,512", "--shuffle_caption", "--dataset_config", "d.toml",
                      "--network_alpha", "8", "--base_weights_multiplier", "0.5", "1", "--max_token_length", "225",
                      "--lr_scheduler_power", "2", "--optimizer_args", "weight_decay=0.01", "--caption_extension",
                      ".txt", "--save_precision", "fp16", "--network_module", "networks.lora", "--network_dim", "16"],
    "sdxl_train_network": ["--cache_text_encoder_outputs", "--network_train_unet_only", "--mixed_precision", "bf16",
                           "--noise_offset", "0.0357", "--keep_tokens_separator", "|||"],
    "train_db": ["--reg_data_dir", "reg", "--prior_loss_weight", "0.5", "--stop_text_encoder_training", "-1",
                 "--save_model_as", "diffusers_safetensors", "--zero_stage", "3"],
    "fine_tune": ["--in_json", "meta.json", "--dataset_repeats", "10", "--train_text_encoder", "--use_safetensors",
                  "--face_crop_aug_range", "2.0,4.0"],
    "train_textual_inversion": ["--token_string", "mychar", "--init_word", "girl", "--num_vectors_per_token", "4",
                                "--use_object_template", "--save_model_as", "safetensors"],
    "sdxl_train_textual_inversion": ["--token_string", "mychar", "--num_vectors_per_token", "2", "--weights",
                                     "start.safetensors", "--mixed_precision", "bf16", "--no_half_vae"],
    "sdxl_train": ["--block_lr", ",".join(["1e-6"] * 22 + ["0"]), "--train_text_encoder", "--learning_rate_te1",
                   "1e-6", "--fused_optimizer_groups", "4", "--save_model_as", "diffusers", "--no_half_vae"],
    "train_controlnet": ["--conditioning_data_dir", "cond", "--controlnet_model_name_or_path", "cn.safetensors",
                         "--save_model_as", "diffusers_safetensors", "--min_snr_gamma", "5"],
    "sdxl_train_control_net_lllite": ["--conditioning_data_dir", "cond", "--cond_emb_dim", "32", "--network_dim", "64",
                                      "--network_dropout", "0.1", "--cache_text_encoder_outputs", "--no_half_vae"],
    "flux_train_network": ["--network_module", "networks.lora_flux", "--ae", "ae.safetensors", "--clip_l", "c.sft",
                           "--t5xxl", "t5.sft", "--apply_t5_attn_mask", "--guidance_scale", "1.0",
                           "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582",
                           "--model_prediction_type", "raw", "--t5xxl_max_token_length", "256"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_round_trip_through_output_config(tmp_path, script):
    """Parsing a command line equals parsing the TOML that --output_config wrote for it (DESIGN.md)."""
    argv = ROUND_TRIP_ARGV[script]
    direct = parse_args_with_config(build_parser(script), argv)
    _output_config(script, argv, tmp_path / "out")
    from_file = parse_args_with_config(build_parser(script), ["--config_file", str(tmp_path / "out")])
    assert from_file.config_file == str(tmp_path / "out")  # upstream: path without extension
    a, b = vars(direct), vars(from_file)
    a.pop("config_file"), b.pop("config_file")
    assert a == b
    assert {k: type(v) for k, v in a.items()} == {k: type(v) for k, v in b.items()}


def test_output_config_writes_only_non_defaults_and_no_secrets(tmp_path, caplog):
    path = tmp_path / "cfg.toml"
    with caplog.at_level(logging.WARNING):
        _output_config("train_network", ["--learning_rate", "2e-6", "--seed", "3", "--wandb_api_key", "K",
                                         "--huggingface_token", "T"], path)
    text = path.read_text(encoding="utf-8")
    assert text.strip() == "seed = 3"  # learning_rate equals its default; secrets dropped
    assert "not written" in caplog.text and "wandb_api_key" in caplog.text and "huggingface_token" in caplog.text


def test_output_config_refuses_to_overwrite(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text("seed = 1\n", encoding="utf-8")
    with pytest.raises(UserError, match="already exists"):
        parse_args_with_config(build_parser("train_network"), ["--seed", "2", "--config_file", str(path),
                                                               "--output_config"])
    assert path.read_text(encoding="utf-8") == "seed = 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.toml"]  # no partial/temporary file left


def test_output_config_without_config_file_is_an_error():
    with pytest.raises(UserError, match="--output_config needs --config_file"):
        parse_args_with_config(build_parser("train_network"), ["--output_config"])


def test_precedence_command_line_over_file_over_default(tmp_path):
    args = _parse(tmp_path, "learning_rate = 1e-3\nmax_train_steps = 10\n", ["--max_train_steps", "20"])
    assert args.max_train_steps == 20  # command line wins
    assert args.learning_rate == 1e-3  # file beats default
    assert args.train_batch_size == 1  # default
    # the command line wins even when it repeats the default
    assert _parse(tmp_path, "train_batch_size = 4\n", ["--train_batch_size", "1"], name="d.toml").train_batch_size == 1


def test_toml_extension_appended(tmp_path):
    (tmp_path / "x.toml").write_text("seed = 7\n", encoding="utf-8")
    args = parse_args_with_config(build_parser("train_network"), ["--config_file", str(tmp_path / "x")])
    assert args.seed == 7


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=r"config file not found: .*nope\.toml"):
        parse_args_with_config(build_parser("train_network"), ["--config_file", str(tmp_path / "nope")])


def test_sections_are_flattened_later_wins_deeper_tables_are_values():
    data = {"seed": 1, "model": {"v2": True, "seed": 2}, "training": {"seed": 3, "sub": {"a": 1}}}
    assert flatten_sections(data) == {"seed": 3, "v2": True, "sub": {"a": 1}}


def test_sections_in_a_file(tmp_path):
    text = "[model]\npretrained_model_name_or_path = \"m.safetensors\"\n[training]\nmax_train_steps = 5\n"
    args = _parse(tmp_path, text)
    assert args.pretrained_model_name_or_path == "m.safetensors" and args.max_train_steps == 5


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    with pytest.raises(UserError) as e:
        _parse(tmp_path, "[optimizer]\nlearning_rat = 1e-4\n", name="x.toml")
    msg = str(e.value)
    assert "unknown key 'learning_rat'" in msg and "x.toml" in msg and "did you mean 'learning_rate'?" in msg


def test_option_of_another_script_is_a_warning_naming_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        args = _parse(tmp_path, "network_dim = 4\nlearning_rate_te1 = 1e-5\n", script="train_db")
    assert not hasattr(args, "network_dim") and not hasattr(args, "learning_rate_te1")
    assert "key 'network_dim' in" in caplog.text and "is an option of" in caplog.text
    assert "train_network.py" in caplog.text and "not of train_db.py: ignored" in caplog.text
    assert "sdxl_train.py" in caplog.text  # learning_rate_te1 belongs to sdxl_train.py


def test_front_end_keys_are_ignored_with_one_warning(tmp_path, caplog):
    """kohya_ss writes epoch / noise_offset_type, lora-scripts lr_restart_cycles: bookkeeping keys of no
    sd-scripts script; one warning lists them all, the run goes on."""
    with caplog.at_level(logging.WARNING):
        args = _parse(tmp_path, 'epoch = 10\nnoise_offset_type = "Original"\n[optimizer]\nlr_restart_cycles = 1\n'
                                "learning_rate = 1e-4\n")
    warnings = [r.getMessage() for r in caplog.records if "options of no sd-scripts script" in r.getMessage()]
    assert len(warnings) == 1 and all(k in warnings[0] for k in ("epoch", "noise_offset_type", "lr_restart_cycles"))
    assert args.learning_rate == 1e-4 and not hasattr(args, "epoch")


@pytest.mark.parametrize("key,close", [("learning_rat", "learning_rate"), ("Learning_Rate", "learning_rate"),
                                       ("netwrok_dim", "network_dim"), ("max_trian_steps", "max_train_steps"),
                                       ("optimiser_type", "optimizer_type"), ("sed", "seed")])
def test_typo_of_an_option_is_an_error(tmp_path, key, close):
    with pytest.raises(UserError, match=f"unknown key '{key}' in .*; did you mean '{close}'"):
        _parse(tmp_path, f"{key} = 1\n")


def test_edit_distance_is_the_textbook_one():
    """Oracle: distances worked out by hand (optimal string alignment: a swap of neighbours counts 1, "ca" -> "abc" is 3)."""
    from library.config.config_rules import edit_distance

    for a, b, d in [("kitten", "sitting", 3), ("learning_rat", "learning_rate", 1), ("netwrok", "network", 1),
                    ("abc", "abc", 0), ("", "abc", 3), ("epoch", "seed", 5), ("ca", "abc", 3)]:
        assert edit_distance(a, b, 10) == d, (a, b)
    assert edit_distance("abcdef", "uvwxyz", 2) == 3  # stopped early: "more than the limit"


@pytest.mark.parametrize("text,attr,expected", [
    ("persistent_data_loader_workers = 1\n", "persistent_data_loader_workers", True),
    ("shuffle_caption = 0\n", "shuffle_caption", False),
    ('reg_data_dir = ""\n', "reg_data_dir", None),
    ('vae = ""\n', "vae", None),
    ("max_token_length = 75\n", "max_token_length", None),
    ('dynamo_backend = "no"\n', "dynamo_backend", "no"),
    ("max_train_epochs = 10.0\n", "max_train_epochs", 10),
    ('network_args = ""\n', "network_args", None),
])
def test_values_upstream_accepts_through_its_config_path(tmp_path, text, attr, expected):
    args = _parse(tmp_path, text)
    assert getattr(args, attr) == expected and type(getattr(args, attr)) is type(expected)


def test_empty_string_keeps_its_meaning_where_the_default_is_not_unset(tmp_path):
    assert _parse(tmp_path, 'caption_extension = ""\n').caption_extension == ""


def test_string_converted_like_the_command_line(tmp_path):
    args = _parse(tmp_path, 'learning_rate = "1e-4"\nnetwork_alpha = 4\nmax_train_steps = "12"\n')
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)
    assert args.network_alpha == 4.0 and isinstance(args.network_alpha, float)
    assert args.max_train_steps == 12


@pytest.mark.parametrize("text,match", [
    ('learning_rate = "fast"\n', "'learning_rate' in .*c.toml must be a number, got 'fast'"),
    ("max_train_steps = 1.5\n", "'max_train_steps' in .* must be an integer"),
    ("output_name = 3\n", "'output_name' in .* must be a string"),
    ("seed = true\n", "'seed' in .* must be an integer"),
    ('shuffle_caption = "yes"\n', "'shuffle_caption' in .* is a flag: write true or false"),
    ("shuffle_caption = 2\n", "is a flag"),
    ('mixed_precision = "fp32"\n', r"'mixed_precision' in .*: invalid choice 'fp32' \(choose from 'no', 'fp16', 'bf16'\)"),
    ("max_token_length = 100\n", "invalid choice 100"),
    ('network_args = [1, 2]\n', "'network_args' in .* must be a string"),
    ("max_token_length = 76\n", "invalid choice 76"),
    ("max_train_steps = 2.5\n", "must be an integer"),
])
def test_wrong_type_or_choice(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        _parse(tmp_path, text)


def test_flags_and_lists(tmp_path):
    args = _parse(tmp_path, 'shuffle_caption = true\nflip_aug = false\nnetwork_args = "conv_dim=4"\n'
                            "base_weights_multiplier = [1.0, 0.5]\n")
    assert args.shuffle_caption is True and args.flip_aug is False
    assert args.network_args == ["conv_dim=4"]  # scalar wrapped into a list
    assert args.base_weights_multiplier == [1.0, 0.5]


@pytest.mark.parametrize("value,expected", [("512", "512"), ('"768,512"', "768,512"), ("[768, 512]", "768,512")])
def test_resolution_int_string_or_array(tmp_path, value, expected):
    assert _parse(tmp_path, f"resolution = {value}\n").resolution == expected


def test_dataset_config_becomes_path(tmp_path):
    assert _parse(tmp_path, 'dataset_config = "d.toml"\n').dataset_config == Path("d.toml")


def test_invalid_toml(tmp_path):
    with pytest.raises(UserError, match="not a valid UTF-8 TOML"):
        _parse(tmp_path, "seed = = 1\n")


def test_secret_on_command_line_warns_without_wandb(caplog):
    with caplog.at_level(logging.INFO):
        parse_args_with_config(build_parser("train_network"), ["--huggingface_token", "hf_x", "--output_dir", "/abs/out"])
    assert "--huggingface_token is given on the command line" in caplog.text
    assert "--output_dir is an absolute path" in caplog.text


def test_no_secret_no_wandb_is_quiet(caplog):
    with caplog.at_level(logging.INFO):
        parse_args_with_config(build_parser("train_network"), ["--output_dir", "/abs/out"])
    assert "absolute path" not in caplog.text


def test_secret_in_file_is_not_warned_but_wandb_from_file_checks_paths(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        args = _parse(tmp_path, 'wandb_api_key = "K"\nlog_with = "wandb"\n', ["--vae", "/abs/vae.safetensors"])
    assert args.wandb_api_key == "K"
    assert "given on the command line" not in caplog.text
    assert "--vae is an absolute path" in caplog.text and "--config_file is on the command line" in caplog.text


def test_user_error_exits_2_with_one_line(tmp_path, capsys):
    from library.errors import exit_on_user_error

    (tmp_path / "c.toml").write_text("learning_rat = 1\n", encoding="utf-8")

    @exit_on_user_error
    def main():
        parse_args_with_config(build_parser("train_network"), ["--config_file", str(tmp_path / "c.toml")])

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'learning_rate'?" in err


def _upstream_read_config(parser, path: Path):
    """sd-scripts v0.8.7's read_config_from_file, step by step (spec cli-options §14): load, flatten the
    top-level tables, make a Namespace, parse an empty command line into it. No conversion, no checks."""
    import argparse

    import toml

    data = toml.load(str(path))
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return parser.parse_args([], namespace=argparse.Namespace(**flat))


@pytest.mark.parametrize("script", SCRIPTS)
def test_output_config_is_read_by_upstreams_unconverting_reader(tmp_path, script):
    """Upstream converts nothing, so what we write must already have the command line's types (resolution
    a string, floats as floats, lists as arrays) for upstream to see the same options."""
    argv = ROUND_TRIP_ARGV[script]
    direct = parse_args_with_config(build_parser(script), argv)
    _output_config(script, argv, tmp_path / "out")
    upstream = _upstream_read_config(build_parser(script), tmp_path / "out.toml")
    # Path values come back as strings, as from upstream's own --output_config; its code takes either
    a = {k: str(v) if isinstance(v, Path) else v for k, v in vars(direct).items()}
    b = vars(upstream)
    assert a == b
    assert {k: type(v) for k, v in a.items()} == {k: type(v) for k, v in b.items()}
