"""ss_* metadata (spec file-formats §b.1) and the base-model file hashes (§b.2)."""
import hashlib
import json
import os
import re
import subprocess

import pytest

from library.config.option_record import OptionRecord
from library.config.options import build_parser
from library.errors import UserError
from library.formats import metadata as md
from library.formats.model_hashes_files import legacy_file_hash, model_file_metadata, sha256_file
from library.formats.modelspec import build_modelspec

# The spec's key lists, as data (§b.1).
ALWAYS_KEYS = """ss_session_id ss_training_started_at ss_output_name ss_learning_rate ss_text_encoder_lr ss_unet_lr
ss_num_train_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs ss_gradient_checkpointing
ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps ss_lr_scheduler ss_network_module
ss_network_dim ss_network_alpha ss_network_dropout ss_mixed_precision ss_full_fp16 ss_v2 ss_base_model_version
ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_lowram ss_noise_offset ss_multires_noise_iterations
ss_multires_noise_discount ss_adaptive_noise_scale ss_zero_terminal_snr ss_training_comment
ss_sd_scripts_commit_hash ss_optimizer ss_max_grad_norm ss_caption_dropout_rate ss_caption_dropout_every_n_epochs
ss_caption_tag_dropout_rate ss_face_crop_aug_range ss_prior_loss_weight ss_min_snr_gamma ss_scale_weight_norms
ss_ip_noise_gamma ss_debiased_estimation ss_noise_offset_random_strength ss_ip_noise_gamma_random_strength
ss_loss_type ss_huber_schedule ss_huber_c""".split()
PER_SAVE_KEYS = ["ss_training_finished_at", "ss_steps", "ss_epoch"]
DATASET_CONFIG_KEYS = ["ss_datasets", "ss_tag_frequency", "ss_dataset_dirs"]
NO_CONFIG_KEYS = """ss_batch_size_per_device ss_total_batch_size ss_resolution ss_color_aug ss_flip_aug
ss_random_crop ss_shuffle_caption ss_enable_bucket ss_bucket_no_upscale ss_min_bucket_reso ss_max_bucket_reso
ss_keep_tokens ss_dataset_dirs ss_reg_dataset_dirs ss_tag_frequency ss_bucket_info""".split()
MODEL_FILE_KEYS = ["ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_name", "ss_vae_hash",
                   "ss_new_vae_hash"]
MINIMUM_KEYS = ["ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args"]

BUCKET_INFO = {"buckets": {0: {"resolution": (512, 512), "count": 10}, 3: {"resolution": (448, 576), "count": 2}},
               "mean_img_ar_error": 0.03125}


@pytest.fixture
def model_files(tmp_path):
    model, vae = tmp_path / "base model.safetensors", tmp_path / "vae.safetensors"
    model.write_bytes(os.urandom(0x100000 + 0x10000 + 777))
    vae.write_bytes(os.urandom(1000))
    return model, vae


def _args(script="train_network", extra=(), model="runwayml/sd15", vae=None):
    argv = ["--pretrained_model_name_or_path", str(model), "--network_module", "networks.lora",
            "--network_dim", "16", "--network_alpha", "8", "--resolution", "512", "--output_name", "mylora",
            "--learning_rate", "1e-4", "--unet_lr", "2e-4", "--face_crop_aug_range", "2.0,4.0", "--seed", "42",
            "--train_data_dir", "data", "--enable_bucket", "--max_train_steps", "300", *extra]
    if vae is not None:
        argv += ["--vae", str(vae)]
    return OptionRecord.of(build_parser(script).parse_args(argv))  # what the runner hands the metadata


def _db_dataset(**kw):
    subsets = [md.SubsetFacts(img_count=10, num_repeats=5, image_dir="/data/train/5_girl", class_tokens="girl",
                              shuffle_caption=True, keep_tokens=1),
               md.SubsetFacts(img_count=20, num_repeats=1, image_dir="/data/reg/1_person", class_tokens="person",
                              is_reg=True)]
    values = dict(kind="dreambooth", batch_size=2, num_train_images=50, num_reg_images=20, resolution=(512, 512),
                  enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024,
                  tag_frequency={"5_girl": {"girl": 10, "smile": 3}}, bucket_info=BUCKET_INFO, subsets=subsets)
    values.update(kw)
    return md.DatasetFacts(**values)


def _facts(datasets, **kw):
    values = dict(family="sd1", num_train_images=50, num_reg_images=20, num_batches_per_epoch=25, num_epochs=12,
                  optimizer_name="torch.optim.adamw.AdamW(weight_decay=0.1)", datasets=datasets,
                  session_id=1234, training_started_at=1712495272.5)
    values.update(kw)
    return md.TrainingFacts(**values)


def test_every_key_without_dataset_config(model_files):
    model, vae = model_files
    args = _args(extra=["--network_args", "conv_dim=4", "conv_alpha=1"], model=model, vae=vae)
    meta = md.build_training_metadata(args, _facts([_db_dataset()]))
    assert set(meta) == set(ALWAYS_KEYS + NO_CONFIG_KEYS + MODEL_FILE_KEYS + ["ss_network_args"])
    assert all(isinstance(v, str) for v in meta.values())
    expected = {
        "ss_session_id": "1234", "ss_training_started_at": "1712495272.5", "ss_output_name": "mylora",
        "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0002", "ss_text_encoder_lr": "None",
        "ss_num_batches_per_epoch": "25", "ss_num_epochs": "12", "ss_max_train_steps": "300",
        "ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_network_dropout": "None", "ss_v2": "False",
        "ss_base_model_version": "sd_v1", "ss_clip_skip": "None", "ss_seed": "42", "ss_full_fp16": "False",
        "ss_face_crop_aug_range": "(2.0, 4.0)", "ss_resolution": "(512, 512)", "ss_enable_bucket": "True",
        "ss_min_bucket_reso": "256", "ss_total_batch_size": "1", "ss_batch_size_per_device": "1",
        "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.1)", "ss_mixed_precision": "no",
        "ss_sd_model_name": "base model.safetensors", "ss_vae_name": "vae.safetensors",
    }
    assert {k: meta[k] for k in expected} == expected
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_girl": {"n_repeats": 5, "img_count": 10}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 20}}
    assert json.loads(meta["ss_tag_frequency"]) == {"5_girl": {"girl": 10, "smile": 3}}
    assert json.loads(meta["ss_bucket_info"]) == {
        "buckets": {"0": {"resolution": [512, 512], "count": 10}, "3": {"resolution": [448, 576], "count": 2}},
        "mean_img_ar_error": 0.03125}


def test_commit_hash():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__), capture_output=True,
                              check=True).stdout.decode().strip()
    except (OSError, subprocess.CalledProcessError):
        head = "(unknown)"
    md.project_commit_hash.cache_clear()  # cached per process; commits may land while tests run
    assert md.project_commit_hash() == head
    assert head == "(unknown)" or re.fullmatch(r"[0-9a-f]{40}", head)


def test_total_batch_size_and_cache_latents():
    args = _args(extra=["--train_batch_size", "4", "--gradient_accumulation_steps", "3", "--cache_latents_to_disk"])
    meta = md.build_training_metadata(args, _facts([_db_dataset()], num_processes=2, model_files={}))
    assert meta["ss_total_batch_size"] == "24"
    assert meta["ss_cache_latents"] == "True"
    assert "ss_sd_model_name" not in meta  # model_files given by the caller are used as is


def test_hub_model_id_has_name_only():
    meta = md.build_training_metadata(_args(model="runwayml/stable-diffusion-v1-5"), _facts([_db_dataset()]))
    assert meta["ss_sd_model_name"] == "runwayml/stable-diffusion-v1-5"
    assert not {"ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_name"} & set(meta)


@pytest.mark.parametrize("extra, expected", [
    ([], None),  # no --network_args: no key
    (["--network_args", "conv_dim=4"], {"conv_dim": "4", "dropout": None}),
    (["--network_args", "conv_dim=4", "--network_dropout", "0.1"], {"conv_dim": "4", "dropout": 0.1}),
    (["--network_args", "dropout=0.2", "--network_dropout", "0.1"], {"dropout": "0.2"}),  # the user's wins
    (["--network_args", "conv_dim=4", "--dim_from_weights", "--network_dropout", "0.1"], {"conv_dim": "4"}),
    (["--network_args", "preset=a=b"], {"preset": "a=b", "dropout": None}),
])
def test_network_args(extra, expected):
    meta = md.build_training_metadata(_args(extra=extra), _facts([_db_dataset()]))
    if expected is None:
        assert "ss_network_args" not in meta
    else:
        assert json.loads(meta["ss_network_args"]) == expected
        assert list(json.loads(meta["ss_network_args"]).items()) == list(expected.items())


def test_network_args_without_equals():
    with pytest.raises(UserError, match="--network_args 'conv_dim'"):
        md.network_kwargs(["conv_dim"], None, False)
    assert md.network_kwargs(None, 0.25, False) == {"dropout": 0.25}  # what create_network gets without args


@pytest.mark.parametrize("family, vpred, expected", [("sd1", False, "sd_v1"), ("sd1", True, "sd_v1_v"),
                                                     ("sd2", False, "sd_v2"), ("sd2", True, "sd_v2_v"),
                                                     ("sdxl", False, "sdxl_base_v1-0")])
def test_base_model_version(family, vpred, expected):
    assert md.base_model_version(family, vpred) == expected


def test_sdxl_metadata():
    args = _args("sdxl_train_network")
    meta = md.build_training_metadata(args, _facts([_db_dataset()], family="sdxl"))
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"


def _config_datasets():
    ft = md.DatasetFacts(
        kind="finetuning", batch_size=4, num_train_images=30, num_reg_images=0, resolution=(768, 512),
        tag_frequency={"meta.json": {"cat": 4}, "5_girl": {"ignored": 1}}, bucket_info=None,
        subsets=[md.SubsetFacts(img_count=30, num_repeats=1, image_dir="/ft/imgs", metadata_file="/ft/meta.json")])
    cn = md.DatasetFacts(
        kind="controlnet", batch_size=1, num_train_images=8, num_reg_images=0, resolution=(512, 512),
        enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024, tag_frequency={"cn_dir": {"x": 1}},
        bucket_info=BUCKET_INFO, subsets=[md.SubsetFacts(img_count=8, num_repeats=1, image_dir="/cn/cn_dir")])
    db2 = _db_dataset(batch_size=1, subsets=[md.SubsetFacts(img_count=3, num_repeats=2, image_dir="/other/5_girl")],
                      tag_frequency={"5_girl": {"other": 9}})
    return [_db_dataset(), ft, cn, db2]


def test_dataset_config_json():
    args = _args(extra=["--dataset_config", "ds.toml"])
    meta = md.build_training_metadata(args, _facts(_config_datasets()))
    assert set(meta) == set(ALWAYS_KEYS + DATASET_CONFIG_KEYS + ["ss_sd_model_name"])
    db, ft, cn, db2 = json.loads(meta["ss_datasets"])
    assert db == {
        "is_dreambooth": True, "batch_size_per_device": 2, "num_train_images": 50, "num_reg_images": 20,
        "resolution": [512, 512], "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 1024,
        "tag_frequency": {"5_girl": {"girl": 10, "smile": 3}},
        "bucket_info": json.loads(json.dumps(BUCKET_INFO)),
        "subsets": [
            {"img_count": 10, "num_repeats": 5, "color_aug": False, "flip_aug": False, "random_crop": False,
             "shuffle_caption": True, "keep_tokens": 1, "keep_tokens_separator": "", "secondary_separator": None,
             "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None, "image_dir": "5_girl",
             "class_tokens": "girl", "is_reg": False},
            {"img_count": 20, "num_repeats": 1, "color_aug": False, "flip_aug": False, "random_crop": False,
             "shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "", "secondary_separator": None,
             "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None, "image_dir": "1_person",
             "class_tokens": "person", "is_reg": True}]}
    assert ft["is_dreambooth"] is False and ft["resolution"] == [768, 512]
    assert ft["subsets"][0]["image_dir"] == "imgs" and ft["subsets"][0]["metadata_file"] == "meta.json"
    assert "class_tokens" not in ft["subsets"][0] and "is_reg" not in ft["subsets"][0]
    # ControlNet rule: only batch size, resolution and image counts are real
    assert cn == {"is_dreambooth": False, "batch_size_per_device": 1, "num_train_images": 8, "num_reg_images": 0,
                  "resolution": [512, 512], "enable_bucket": False, "min_bucket_reso": None,
                  "max_bucket_reso": None, "tag_frequency": {}, "bucket_info": None, "subsets": []}
    assert db2["subsets"][0]["image_dir"] == "5_girl"
    # first dataset using a dir wins; the ControlNet dataset contributes nothing
    assert json.loads(meta["ss_tag_frequency"]) == {"5_girl": {"girl": 10, "smile": 3}, "meta.json": {"cat": 4}}
    # reg subsets excluded, duplicates suffixed, ControlNet subsets invisible
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_girl": {"n_repeats": 5, "img_count": 10},
                                                   "meta.json": {"n_repeats": 1, "img_count": 30},
                                                   "5_girl (2)": {"n_repeats": 2, "img_count": 3}}


def test_per_save_keys_and_epoch_rules():
    full = md.build_training_metadata(_args(), _facts([_db_dataset()]))
    spec = build_modelspec("sd1", False, "lora", timestamp=1.0, output_name="mylora")
    assert md.ss_epoch_value("step", 2, 5) == 2  # 0-based current epoch
    assert md.ss_epoch_value("epoch", 2, 5) == 3  # epoch + 1
    assert md.ss_epoch_value("final", 4, 5) == 5  # number of epochs
    with pytest.raises(ValueError):
        md.ss_epoch_value("middle", 1, 2)
    saved = md.metadata_for_save(full, global_step=150, epoch=3, no_metadata=False, modelspec=spec,
                                 finished_at=1712500000.25)
    assert set(saved) == set(full) | set(PER_SAVE_KEYS) | set(spec)
    assert (saved["ss_steps"], saved["ss_epoch"], saved["ss_training_finished_at"]) == ("150", "3", "1712500000.25")
    assert "ss_steps" not in full  # the run's dict is not mutated


def test_no_metadata_minimum_set():
    full = md.build_training_metadata(_args(extra=["--network_args", "conv_dim=4"]), _facts([_db_dataset()]))
    spec = build_modelspec("sd1", False, "lora", timestamp=1.0)
    saved = md.metadata_for_save(full, global_step=1, epoch=1, no_metadata=True, modelspec=spec)
    assert set(saved) == set(MINIMUM_KEYS) | set(spec)
    assert {k: saved[k] for k in MINIMUM_KEYS} == {k: full[k] for k in MINIMUM_KEYS}
    without_args = md.build_training_metadata(_args(), _facts([_db_dataset()]))
    assert set(md.minimum_metadata(without_args)) == set(MINIMUM_KEYS) - {"ss_network_args"}


def test_build_minimum_network_metadata():
    meta = md.build_minimum_network_metadata(False, "sd_v1", "networks.lora", "Dynamic", "Dynamic", None)
    assert meta == {"ss_network_module": "networks.lora", "ss_network_dim": "Dynamic",
                    "ss_network_alpha": "Dynamic", "ss_v2": "False", "ss_base_model_version": "sd_v1"}
    meta = md.build_minimum_network_metadata(None, None, "networks.lora", 8, 4.0, {"conv_dim": "4"})
    assert meta == {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
                    "ss_network_args": '{"conv_dim": "4"}'}


def test_file_hashes_against_hashlib(model_files):
    model, vae = model_files
    data = model.read_bytes()
    assert legacy_file_hash(model) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert sha256_file(model) == hashlib.sha256(data).hexdigest()
    # a file shorter than the offset hashes the empty read, as A1111 does
    assert legacy_file_hash(vae) == hashlib.sha256(b"").hexdigest()[:8]
    assert sha256_file(vae) == hashlib.sha256(vae.read_bytes()).hexdigest()
    meta = model_file_metadata(str(model), str(vae))
    assert meta == {"ss_sd_model_hash": legacy_file_hash(model), "ss_new_sd_model_hash": sha256_file(model),
                    "ss_sd_model_name": "base model.safetensors", "ss_vae_hash": legacy_file_hash(vae),
                    "ss_new_vae_hash": sha256_file(vae), "ss_vae_name": "vae.safetensors"}


def test_file_hash_errors(tmp_path):
    assert legacy_file_hash(tmp_path / "missing") == "NOFILE"
    assert sha256_file(tmp_path / "missing") == "NOFILE"
    assert legacy_file_hash(tmp_path) == "IsADirectory"
    assert sha256_file(tmp_path) == "IsADirectory"
    folder = tmp_path / "sd15-diffusers"
    folder.mkdir()
    assert model_file_metadata(str(folder), None) == {"ss_sd_model_hash": "IsADirectory",
                                                      "ss_new_sd_model_hash": "IsADirectory",
                                                      "ss_sd_model_name": "sd15-diffusers"}
