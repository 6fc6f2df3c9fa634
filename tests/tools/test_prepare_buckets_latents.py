"""finetune/prepare_buckets_latents.py: buckets, train_resolution, npz the trainer uses (spec utilities §6)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from finetune import prepare_buckets_latents as pbl
from library.config.dataset_blueprint import DatasetParams, SubsetParams
from library.data.buckets import BucketSet
from library.data.latent_cache import is_cache_valid
from tests.data.dataset_helpers import build, write_image
from tools.make_tiny_model import write_tiny_model

SIZES = {"a": (64, 64), "b": (96, 48), "c": (48, 80)}
BUCKET_ARGS = ["--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
               "--bucket_reso_steps", "32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_tiny_model("sd1", tmp_path_factory.mktemp("model"), formats=("safetensors",))["safetensors"])


@pytest.fixture
def data(tmp_path):
    images = tmp_path / "imgs"
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        write_image(images / f"{name}.png", w, h, seed=i)
    in_json = tmp_path / "in.json"
    in_json.write_text(json.dumps({"a": {"caption": "cat"}, "b": {"caption": "dog"}}), encoding="utf-8")
    return images, in_json, tmp_path / "out.json"


def test_train_resolution_and_npz_used_by_training(model, data):
    images, in_json, out_json = data
    pbl.main([str(images), str(in_json), str(out_json), model, "--flip_aug", "--batch_size", "2", *BUCKET_ARGS])
    meta = json.loads(out_json.read_text(encoding="utf-8"))
    buckets = BucketSet((64, 64), True, False, 32, 128, 32)
    for name, size in SIZES.items():
        bucket = buckets.select(size).bucket
        assert meta[name]["train_resolution"] == [bucket[0], bucket[1]]
        assert is_cache_valid(str(images / f"{name}.npz"), bucket, flip_aug=True, alpha_mask=False)
        with np.load(images / f"{name}.npz") as npz:
            assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "latents_flipped"}
            assert npz["original_size"].tolist() == list(size)
    assert meta["a"]["caption"] == "cat" and "caption" not in meta["c"]  # entries kept / created

    # the fine-tuning dataset takes buckets from train_resolution and latents from the npz: no VAE needed
    subset = SubsetParams(image_dir=str(images), metadata_file=str(out_json), flip_aug=True)
    group = build([DatasetParams(style="finetuning", batch_size=1, subsets=[subset])])
    for info in group.image_infos():
        assert info.latents_npz == str(images / f"{info.key}.npz")
        assert info.bucket == tuple(meta[info.key]["train_resolution"])
    batch = group[0]
    assert batch["images"] is None and batch["latents"] is not None


def test_skip_existing_keeps_valid_files(model, data):
    images, in_json, out_json = data
    argv = [str(images), str(in_json), str(out_json), model, *BUCKET_ARGS]
    pbl.main(argv)
    stamps = {p.name: p.stat().st_mtime_ns for p in images.glob("*.npz")}
    latents = np.load(images / "a.npz")["latents"]
    pbl.main(argv + ["--skip_existing"])
    assert {p.name: p.stat().st_mtime_ns for p in images.glob("*.npz")} == stamps
    pbl.main(argv + ["--skip_existing", "--flip_aug"])  # flipped latents now required: re-encoded
    with np.load(images / "a.npz") as npz:
        assert "latents_flipped" in npz.files
        np.testing.assert_array_equal(npz["latents"], latents)  # fixed seed: same sample


def test_full_path_recursive_mirrors_sub_folders(model, tmp_path):
    images = tmp_path / "imgs"
    write_image(images / "sub" / "x.png", 64, 64)
    in_json = tmp_path / "in.json"
    in_json.write_text("{}", encoding="utf-8")
    out_json = tmp_path / "out.json"
    pbl.main([str(images), str(in_json), str(out_json), model, "--full_path", "--recursive", *BUCKET_ARGS,
              "--mixed_precision", "bf16"])
    key = str(images / "sub" / "x.png")
    assert json.loads(out_json.read_text(encoding="utf-8"))[key]["train_resolution"] == [64, 64]
    assert (images / "sub" / "x.npz").is_file()


@pytest.mark.parametrize("change,needle", [
    ({"in_json": "missing.json"}, "missing.json"),
    ({"extra": ["--max_resolution", "64x64"]}, "--max_resolution"),
    ({"model": "nomodel.safetensors"}, "nomodel"),
])
def test_bad_input_exits_2_and_writes_nothing(model, data, capsys, change, needle):
    images, in_json, out_json = data
    in_path = str(images.parent / change["in_json"]) if "in_json" in change else str(in_json)
    model_path = str(images.parent / change["model"]) if "model" in change else model
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        pbl.main([str(images), in_path, str(out_json), model_path, *BUCKET_ARGS, *change.get("extra", [])])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0]
    assert not out_json.exists() and not list(images.glob("*.npz"))
