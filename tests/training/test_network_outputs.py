"""What train_network writes and says about the network (issue 15 item 10).

* ``modelspec.resolution`` is the resolution actually trained: a ``--dataset_config``'s own ``resolution``
  (sd-scripts writes ``--resolution``, i.e. the 512x512 default, there). Oracle: the config's value.
* The "LoRA modules" log line counts what trains: with ``--network_train_unet_only`` the text encoder is
  "not trained" and the U-Net count equals the modules in the saved file (read back with safetensors).
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

from safetensors import safe_open

import train_network
from library.formats.modelspec import trained_resolution
from tests.training.train_helpers import base_args


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_modelspec_resolution_from_dataset_config(tiny_sd, shapes_data, tmp_path):
    config = tmp_path / "dataset.toml"
    image_dir = next(p for p in shapes_data.iterdir() if p.is_dir())
    config.write_text(f'[[datasets]]\nresolution = [64, 48]\nbatch_size = 1\nenable_bucket = false\n\n'
                      f'[[datasets.subsets]]\nimage_dir = "{image_dir.as_posix()}"\nnum_repeats = 1\nrandom_crop = true\n',
                      encoding="utf-8")
    out = tmp_path / "out"
    argv = base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 1)
    # no --train_data_dir / --resolution: the dataset config alone says what is trained
    i = argv.index("--train_data_dir")
    del argv[i:i + 4]
    train_network.main([*argv, "--dataset_config", str(config)])
    meta = _metadata(out / "lora.safetensors")
    assert meta["modelspec.resolution"] == "64x48"
    assert '"resolution": [64, 48]' in meta["ss_datasets"]  # the same dataset, as ss_datasets records it


def test_trained_resolution_picks_the_largest_dataset():
    def ds(res):
        return SimpleNamespace(params=SimpleNamespace(resolution=res))

    group = SimpleNamespace(datasets=[ds((64, 64)), ds(None), ds((96, 48)), ds((48, 80))])
    assert trained_resolution(group) == (96, 48)  # 4608 px > 4096 > 3840
    assert trained_resolution(SimpleNamespace(datasets=[ds(None)])) is None


def test_module_count_log_counts_only_what_trains(tiny_sd, shapes_data, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="networks.lora"):
        train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 1,
                                     "--network_train_unet_only"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA modules:")]
    with safe_open(str(out / "lora.safetensors"), framework="pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
    assert names and all(n.startswith("lora_unet_") for n in names)
    assert lines == [f"LoRA modules: text encoder not trained, U-Net {len(names)}"]


def test_full_model_modelspec_resolution_from_dataset_config(tiny_sd, shapes_data, tmp_path):
    """train_db / fine_tune checkpoints record the dataset config's resolution too (not --resolution)."""
    import train_db

    config = tmp_path / "dataset.toml"
    image_dir = next(p for p in shapes_data.iterdir() if p.is_dir())
    config.write_text(f'[[datasets]]\nresolution = [64, 48]\nbatch_size = 1\nenable_bucket = false\n\n'
                      f'[[datasets.subsets]]\nimage_dir = "{image_dir.as_posix()}"\nnum_repeats = 1\nrandom_crop = true\n',
                      encoding="utf-8")
    out = tmp_path / "out"
    train_db.main(["--pretrained_model_name_or_path", str(tiny_sd["sd1"]["safetensors"]), "--dataset_config",
                   str(config), "--output_dir", str(out), "--output_name", "db", "--max_train_steps", "1",
                   "--seed", "1", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors"])
    assert _metadata(out / "db.safetensors")["modelspec.resolution"] == "64x48"
