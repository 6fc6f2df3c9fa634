"""tools/cache_latents.py writes the npz files training reuses (spec utilities §14, dataset-config §10)."""
from __future__ import annotations

import numpy as np
import pytest

from library.config.dataset_blueprint import SubsetParams
from library.data.latent_cache import cache_latents, is_cache_valid
from tests.data.dataset_helpers import build, db_params, make_folder
from tools import cache_latents as tool
from tools.make_tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_tiny_model("sd1", tmp_path_factory.mktemp("model"), formats=("safetensors",))["safetensors"])


def _config(tmp_path, folder):
    config = tmp_path / "dataset.toml"
    config.write_text(f"""
[general]
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
[[datasets]]
resolution = 64
batch_size = 2
[[datasets.subsets]]
image_dir = '{folder}'
flip_aug = true
""", encoding="utf-8")
    return config


def test_writes_the_files_training_reuses(model, tmp_path):
    folder = make_folder(tmp_path / "1_x", [(64, 64), (48, 96), (96, 64)])
    config = _config(tmp_path, folder)
    options = tmp_path / "options.toml"
    options.write_text(f"pretrained_model_name_or_path = '{model}'\ncache_latents_to_disk = true\n"
                       f"dataset_config = '{config}'\nvae_batch_size = 2\n", encoding="utf-8")
    tool.main(["--config_file", str(options)])
    npz = sorted(folder.glob("*.npz"))
    assert len(npz) == 3

    # the trainer's dataset accepts every file as it is: nothing left to encode
    subset = SubsetParams(image_dir=str(folder), flip_aug=True)
    group = build([db_params([subset], resolution=(64, 64), batch_size=2)])
    for info in group.image_infos():
        assert is_cache_valid(info.path.rsplit(".", 1)[0] + ".npz", info.bucket, True, False)

    def never(images):
        raise AssertionError("training re-encoded a cached image")

    cache_latents(group, never, vae_batch_size=2, to_disk=True)
    stamps = {p: p.stat().st_mtime_ns for p in npz}
    tool.main(["--config_file", str(options), "--skip_existing"])
    assert {p: p.stat().st_mtime_ns for p in npz} == stamps
    with np.load(npz[0]) as data:
        assert {"latents", "latents_flipped", "original_size", "crop_ltrb"} <= set(data.files)


def test_requires_cache_latents_to_disk(model, tmp_path, capsys):
    folder = make_folder(tmp_path / "1_x", [(64, 64)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        tool.main(["--pretrained_model_name_or_path", model, "--dataset_config", str(_config(tmp_path, folder))])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--cache_latents_to_disk" in err[0]
    assert not list(folder.glob("*.npz"))
