"""One preflight before any model loads, shared by the real run and --dry_run (issue 15 items 1, 4, 9).

Each case runs a trainer's ``main`` in-process with the model loader replaced by a tripwire: the run must
end with exit code 2 and one ``error:`` line (no traceback) before the loader is ever called, and
``--dry_run`` must give the same answer.
"""
from __future__ import annotations

import sys

import pytest

import sdxl_train_network
import train_db
import train_network
from tests.training.train_helpers import base_args, make_shapes_folder
from tools.make_tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    return {fam: write_tiny_model(fam, root)["safetensors"] for fam in ("sd1", "sdxl")}


@pytest.fixture
def data(tmp_path):
    return make_shapes_folder(tmp_path / "data", repeats=2, n=3)


@pytest.fixture
def tripwire(monkeypatch):
    """Fail the test if a model is loaded (the preflight must stop the run first)."""
    import library.models.loading as loading
    from library.sampling import gen_setup  # imported before patching: each binds the real function at import
    from library.training.runners import run_common

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    real = loading.load_models
    # every module that bound the name (imports are at module top), restored after the test
    for module in {loading, gen_setup, run_common,
                   *[m for m in list(sys.modules.values()) if getattr(m, "load_models", None) is real]}:
        monkeypatch.setattr(module, "load_models", boom)


def _expect_exit_2(script, argv, capsys, *needles):
    for extra in ([], ["--dry_run"]):
        with pytest.raises(SystemExit) as e:
            script.main([*argv, *extra])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert e.value.code == 2, err
        assert len(lines) == 1 and "Traceback" not in err, err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("extra,needles", [
    (["--network_dim", "0"], ["--network_dim 0", ">= 1"]),
    (["--network_dim", "-1"], ["--network_dim -1", ">= 1"]),
    (["--train_batch_size", "0"], ["--train_batch_size 0", ">= 1"]),
    (["--learning_rate", "-1"], ["--learning_rate -1.0", ">= 0"]),
    (["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps 0"]),
    (["--network_dropout", "2"], ["--network_dropout 2.0", "from 0 to 1"]),
    (["--max_train_steps", "-5"], ["--max_train_steps -5", ">= 0"]),
    (["--max_train_steps", "0"], ["--max_train_steps 0 trains nothing"]),
    (["--max_train_epochs", "-1"], ["--max_train_epochs -1"]),
    (["--lr_warmup_steps", "-3", "--lr_scheduler", "cosine"], ["--lr_warmup_steps -3", "negative"]),
    (["--caption_dropout_rate", "1.5"], ["--caption_dropout_rate 1.5", "from 0 to 1"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--min_timestep", "2000"], ["--min_timestep 2000", "from 0 to 1000"]),
    (["--output_name", ""], ["--output_name is empty"]),
])
def test_out_of_range_options(tiny, data, tmp_path, tripwire, capsys, extra, needles):
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2, *extra), capsys, *needles)


def test_out_of_range_from_config_file_and_dataset_toml(tiny, data, tmp_path, tripwire, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[training]\ngradient_accumulation_steps = 0\n", encoding="utf-8")
    _expect_exit_2(train_network, [*base_args(tiny["sd1"], data, tmp_path / "out", 2), "--config_file", str(cfg)],
                   capsys, "--gradient_accumulation_steps 0")
    ds = tmp_path / "ds.toml"
    ds.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 0\n[[datasets.subsets]]\n"
                  f"image_dir = '{(data / '2_sks shape').as_posix()}'\n", encoding="utf-8")
    argv = [a for a in base_args(tiny["sd1"], data, tmp_path / "out", 2) if a != str(data)]
    argv.remove("--train_data_dir")
    _expect_exit_2(train_network, [*argv, "--dataset_config", str(ds)], capsys, "batch_size = 0", ">= 1",
                   "--train_batch_size")


@pytest.mark.parametrize("extra,needles", [
    (["--optimizer_type", "AdamWW"], ["--optimizer_type AdamWW", "did you mean AdamW"]),
    (["--optimizer_type", "AdamW8bit"], ["needs bitsandbytes", "pip install bitsandbytes"]),
    (["--use_8bit_adam"], ["needs bitsandbytes"]),
    (["--xformers"], ["--xformers needs xformers"]),
    (["--log_with", "wandb"], ["--log_with wandb needs wandb"]),
    (["--lr_scheduler", "cosine_restarts"], ["--lr_scheduler cosine_restarts: unknown scheduler"]),
    (["--lr_scheduler_type", "nowhere.Sched"], ["--lr_scheduler_type nowhere.Sched: class not found"]),
    (["--network_module", "no_such_module"], ["--network_module no_such_module"]),
    (["--network_args", "conv_dim"], ["--network_args item 'conv_dim' is not key=value"]),
    (["--optimizer_args", "weight_decay"], ["--optimizer_args: expected key=value"]),
])
def test_packages_and_plugins_resolve_before_loading(tiny, data, tmp_path, tripwire, capsys, extra, needles):
    pytest.importorskip("torch")
    for module, option in (("wandb", "--log_with"), ("xformers", "--xformers"), ("bitsandbytes", "bitsandbytes")):
        if option in " ".join(extra + needles):
            import importlib.util

            if importlib.util.find_spec(module) is not None:
                pytest.skip(f"{module} is installed here")
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2, *extra), capsys, *needles)


def test_missing_and_wrong_family_model_files(tiny, data, tmp_path, tripwire, capsys):
    missing = tmp_path / "nope.safetensors"
    _expect_exit_2(train_network, base_args(missing, data, tmp_path / "out", 2), capsys,
                   "--pretrained_model_name_or_path", "nope.safetensors", "no such file")
    _expect_exit_2(train_network, base_args(tiny["sdxl"], data, tmp_path / "out", 2), capsys,
                   "is an SDXL model; train_network.py trains SD 1.x / 2.x models: use sdxl_train_network.py")
    _expect_exit_2(sdxl_train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2), capsys,
                   "is an SD1 model, but this needs an SDXL model")
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model", encoding="utf-8")
    _expect_exit_2(train_network, base_args(text, data, tmp_path / "out", 2), capsys, "notes.safetensors",
                   "not a readable safetensors file")
    for option in ("--vae", "--sample_prompts", "--resume", "--network_weights", "--dataset_config"):
        _expect_exit_2(train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2, option,
                                                str(tmp_path / "missing.x")), capsys, option, "missing.x")


def test_output_folder_that_cannot_be_created(tiny, data, tmp_path, tripwire, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, blocker / "out", 2), capsys,
                   "--output_dir", "cannot be created")
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, blocker, 2), capsys,
                   "--output_dir", "is a file, expected a folder")


def test_output_folder_not_writable(tiny, data, tmp_path, tripwire, capsys, monkeypatch):
    """Made unwritable by a failing probe (as root, chmod does not stop writes)."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2), capsys,
                   "--output_dir", "not writable", "Permission denied")


def test_short_disk_is_a_warning_with_both_numbers(tiny, data, tmp_path, monkeypatch, caplog):
    import logging
    import shutil
    from collections import namedtuple

    from library.config.options import build_parser
    from library.training.runners.preflight import check_output

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1024))
    args = build_parser("train_network").parse_args(base_args(tiny["sd1"], data, tmp_path / "out", 2))
    with caplog.at_level(logging.WARNING):
        check_output(args, "train_network")
    assert "0.0 MiB free" in caplog.text and "need about" in caplog.text


def test_train_db_checks_its_own_options(tiny, data, tmp_path, tripwire, capsys):
    argv = [a for a in base_args(tiny["sd1"], data, tmp_path / "out", 2) if not a.startswith("--network")
            and a not in ("networks.lora", "4")]
    _expect_exit_2(train_db, [*argv, "--stop_text_encoder_training", "-2"], capsys,
                   "--stop_text_encoder_training -2", ">= -1")


def test_every_numeric_training_option_declares_a_range():
    """Ranges are declared next to the options; the few numeric options without one are listed here with
    the reason (any value has a meaning)."""
    from library.config.options import SCRIPTS, build_parser

    free = {"adaptive_noise_scale": "negative values lower the offset (upstream clamps the sum at 0)",
            "base_weights_multiplier": "a negative multiplier subtracts a LoRA",
            "sample_every_n_steps": "<= 0 disables sampling with a warning, as upstream",
            "sample_every_n_epochs": "<= 0 disables sampling with a warning, as upstream",
            "max_token_length": "choices", "zero_stage": "choices"}
    for script in SCRIPTS:
        for action in build_parser(script)._actions:
            if action.type in (int, float) and action.dest not in free:
                assert getattr(action, "value_range", None) is not None, (script, action.dest)


def test_network_weights_for_another_family_or_unreadable(tiny, data, tmp_path, tripwire, capsys):
    """Checked from the file's header before the base model loads (networks/lora_family.py)."""
    from safetensors.torch import save_file
    import torch

    sdxl_lora = tmp_path / "xl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(sdxl_lora))
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2, "--network_weights",
                                            str(sdxl_lora)), capsys, "xl.safetensors", "SDXL", "SD1")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello", encoding="utf-8")
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2, "--base_weights", str(text)),
                   capsys, "--base_weights", "notes.safetensors")


def test_vae_and_resume_state_checked_before_loading(tiny, data, tmp_path, tripwire, capsys):
    from safetensors.torch import save_file
    import torch

    not_vae = tmp_path / "lora_as_vae.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(not_vae))
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2, "--vae", str(not_vae)),
                   capsys, "--vae", "no VAE tensors")
    state = tmp_path / "state"
    state.mkdir()
    (state / "train_state.json").write_text('{"global_step": 3, "epo', encoding="utf-8")  # cut short
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2, "--resume", str(state)),
                   capsys, "train_state.json is damaged")
    (state / "train_state.json").write_text('{"global_step": 3, "current_epoch": 1}', encoding="utf-8")
    _expect_exit_2(train_network, base_args(tiny["sd1"], data, tmp_path / "out", 2, "--resume", str(state)),
                   capsys, "random_states_0.pkl is missing", "--resume_inexact")
