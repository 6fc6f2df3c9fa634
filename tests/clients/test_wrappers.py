"""The Python entry points that wrapper notebooks import (kohya-colab's pattern), run end to end.

kohya-colab (hollowstrawberry/kohya-colab, train_network_wrapper.py / train_network_xl_wrapper.py) runs
``setup_parser()`` -> ``parser.parse_args()`` -> ``library.train_util.read_config_from_file(args, parser)``
-> ``NetworkTrainer().train(args)`` (older notebooks: ``train_network.train(args)``). The wrappers here are
written in that pattern; the oracle for the result is safetensors' own reader and the networks' key names.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]

WRAPPERS = {
    "class": """
        from {module} import setup_parser, {cls}
        from library.train_util import read_config_from_file

        parser = setup_parser()
        args = parser.parse_args()
        args = read_config_from_file(args, parser)
        trainer = {cls}()
        trainer.train(args)
        print("WRAPPER DONE")
    """,
    "function": """
        from {module} import setup_parser, train
        from library.train_util import read_config_from_file

        parser = setup_parser()
        args = parser.parse_args()
        args = read_config_from_file(args, parser)
        train(args)
        print("WRAPPER DONE")
    """,
}


def _write_configs(tmp_path: Path, model: Path, data: Path, extra: str = "",
                   shuffle: bool = True) -> tuple[Path, Path]:
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(textwrap.dedent(f"""\
        [general]
        resolution = 64
        shuffle_caption = {str(shuffle).lower()}
        keep_tokens = 1
        caption_extension = ".caption"

        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{(data / '2_sks shape').as_posix()}"
        num_repeats = 2
        """), encoding="utf-8")
    config = tmp_path / "training.toml"
    config.write_text(textwrap.dedent(f"""\
        [model_arguments]
        pretrained_model_name_or_path = "{model.as_posix()}"

        [additional_network_arguments]
        network_module = "networks.lora"
        network_dim = 4
        network_alpha = 2
        unet_lr = 1e-3
        text_encoder_lr = 5e-4

        [optimizer_arguments]
        optimizer_type = "AdamW"
        lr_scheduler = "cosine_with_restarts"
        lr_scheduler_num_cycles = 1

        [training_arguments]
        max_train_steps = 2
        train_batch_size = 1
        seed = 42
        max_token_length = 225
        max_data_loader_n_workers = 0
        persistent_data_loader_workers = false
        save_precision = "fp16"
        mixed_precision = "no"
        output_dir = "{(tmp_path / 'out').as_posix()}"
        output_name = "wrapped"
        save_model_as = "safetensors"
        console_log_simple = true
        {extra}
        """), encoding="utf-8")
    return config, dataset


def _run_wrapper(tmp_path: Path, code: str, *argv: str) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(textwrap.dedent(code), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(wrapper), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("module,cls,family,style", [
    ("train_network", "NetworkTrainer", "sd1", "class"),
    ("train_network", "NetworkTrainer", "sd1", "function"),
    ("sdxl_train_network", "SdxlNetworkTrainer", "sdxl", "class"),
])
def test_kohya_colab_wrapper_trains(tmp_path, tiny_models, image_folder, module, cls, family, style):
    model = tiny_models[family]["safetensors"]
    extra = 'network_train_unet_only = true\ncache_text_encoder_outputs = true' if family == "sdxl" else ""
    config, dataset = _write_configs(tmp_path, model, image_folder, extra, shuffle=family != "sdxl")
    code = WRAPPERS[style].format(module=module, cls=cls)
    result = _run_wrapper(tmp_path, code, f"--dataset_config={dataset}", f"--config_file={config}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WRAPPER DONE" in result.stdout
    out = tmp_path / "out" / "wrapped.safetensors"
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        dtypes = {str(f.get_tensor(k).dtype) for k in keys}
    assert meta["ss_max_train_steps"] == "2" and meta["ss_network_dim"] == "4" and meta["ss_seed"] == "42"
    assert dtypes == {"torch.float16"}  # save_precision from the file
    prefix = "lora_unet_input_blocks_" if family == "sdxl" else "lora_unet_down_blocks_"
    assert any(k.startswith(prefix) for k in keys)
    if family == "sd1":
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)


def test_wrapper_bad_input_raises_user_error_for_the_wrapper_to_print(tmp_path, tiny_models, image_folder):
    """Wrappers catch BaseException and print the traceback's last 'XxxError:' line: a UserError surfaces
    there as one readable line, and the process does not die inside train()."""
    config, dataset = _write_configs(tmp_path, tiny_models["sd1"]["safetensors"], image_folder,
                                     'optimizer_type = "AdamWW"')
    config.write_text(config.read_text(encoding="utf-8").replace('optimizer_type = "AdamW"\n', ""), encoding="utf-8")
    code = textwrap.dedent(WRAPPERS["class"]).format(module="train_network", cls="NetworkTrainer").replace(
        "trainer.train(args)", "try:\n    trainer.train(args)\nexcept Exception as e:\n"
        "    print('CAUGHT', type(e).__name__, e)")
    result = _run_wrapper(tmp_path, code, f"--dataset_config={dataset}", f"--config_file={config}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CAUGHT UserError" in result.stdout and "AdamWW" in result.stdout
    assert not (tmp_path / "out" / "wrapped.safetensors").exists()


def test_read_config_from_file_precedence_and_output_config(tmp_path, monkeypatch):
    """Command line > file > default, as upstream; a namespace not from sys.argv is laid over the file."""
    import train_network
    from library.train_util import read_config_from_file

    cfg = tmp_path / "c.toml"
    cfg.write_text("learning_rate = 1e-4\nnetwork_dim = 8\nepoch = 3\n", encoding="utf-8")
    parser = train_network.setup_parser()
    monkeypatch.setattr(sys, "argv", ["w.py", "--config_file", str(cfg), "--network_dim", "16"])
    args = read_config_from_file(parser.parse_args(), parser)
    assert (args.learning_rate, args.network_dim, args.max_train_steps) == (1e-4, 16, 1600)
    assert not hasattr(args, "epoch")  # a front-end key: dropped with a warning
    # built in a notebook, not from sys.argv
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])
    args = read_config_from_file(parser.parse_args(["--config_file", str(cfg), "--seed", "5"]), parser)
    assert (args.learning_rate, args.network_dim, args.seed) == (1e-4, 8, 5)
    # --output_config writes and ends the process with 0, as upstream
    out = tmp_path / "written.toml"
    monkeypatch.setattr(sys, "argv", ["w.py"])
    with pytest.raises(SystemExit) as e:
        read_config_from_file(parser.parse_args(["--config_file", str(out), "--output_config", "--seed", "9"]),
                              parser)
    assert e.value.code == 0 and out.read_text(encoding="utf-8").strip() == "seed = 9"


def test_train_fills_missing_options_with_defaults(monkeypatch):
    """A namespace built by hand (only some attributes) gets the script's defaults for the rest."""
    from library.compat import trainers
    from library.training import entry

    seen = {}
    monkeypatch.setattr(entry, "run_script", lambda script, args: seen.update(script=script, args=args))
    import train_db

    train_db.train(argparse.Namespace(learning_rate=1e-5, prior_loss_weight=0.5))
    args = seen["args"]
    assert seen["script"] == "train_db" and args.learning_rate == 1e-5 and args.prior_loss_weight == 0.5
    assert args.max_train_steps == 1600 and args.save_model_as is None  # defaults of train_db's parser
    with pytest.raises(Exception, match="did you mean 'learning_rate'"):
        trainers.train_script("train_db", argparse.Namespace(learning_rat=1e-5))


def test_bucket_manager_matches_the_dataset_buckets():
    """library.train_util.BucketManager (kohya-colab counts steps with it) puts images where the dataset does."""
    from library.data.buckets import BucketSet
    from library.train_util import BucketManager

    sizes = [(640, 480), (480, 640), (512, 512), (1000, 300), (300, 1000), (777, 555)]
    manager = BucketManager(False, (512, 512), 256, 1024, 64)
    manager.make_buckets()
    ours = BucketSet(resolution=(512, 512), min_size=256, max_size=1024, steps=64)
    for i, (w, h) in enumerate(sizes):
        reso, resized, err = manager.select_bucket(w, h)
        manager.add_image(reso, f"img{i}")
        choice = ours.add_image(f"img{i}", (w, h))
        assert (reso, resized) == (choice.bucket, choice.resized)
        assert err == pytest.approx(reso[0] / reso[1] - w / h)
    manager.sort()
    assert manager.resos == ours.resos and manager.buckets == ours.buckets
    no_up = BucketManager(True, (512, 512), None, None, 64)
    assert no_up.select_bucket(300, 200)[0] == (256, 192)  # never upscaled: cropped to multiples of 64


# Scripts kept under upstream's name only to refuse in one line (docs/compatibility.md, "Not supported").
REFUSED_SCRIPTS = {"train_textual_inversion_XTI"}


def _upstream_scripts():
    import json

    data = json.loads((ROOT / "library" / "config" / "sd_scripts_options.json").read_text(encoding="utf-8"))
    return sorted(data["scripts"].items())


@pytest.mark.parametrize("script,dests", _upstream_scripts(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_provided_script_has_setup_parser_with_upstreams_options(script, dests):
    """GUIs and wrappers import ``setup_parser`` from sd-scripts' scripts: every script we provide under an
    upstream name has one, and its parser knows every option upstream v0.8.7's parser has (the list was
    taken from upstream's own parsers: library/config/sd_scripts_options.json)."""
    import importlib

    if not (ROOT / f"{script}.py").exists():
        pytest.skip(f"{script}.py is not provided yet")
    if script in REFUSED_SCRIPTS:
        pytest.skip(f"{script}.py only refuses (tests/tools/test_unsupported_scripts.py)")
    parser = importlib.import_module(script.replace("/", ".")).setup_parser()
    ours = {action.dest for action in parser._actions}
    assert not set(dests) - ours, sorted(set(dests) - ours)
