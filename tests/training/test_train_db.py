"""train_db.py end to end on the tiny SD1 model (issue "other trainers" §2, §5; spec cli-options §7, §12 D)."""
import os

import pytest
import torch
from safetensors import safe_open

import train_db
from tests.training.full_train_helpers import TE, UNET, assert_same, common_args, part, weights, write_config
from tests.training.train_helpers import make_shapes_folder


def db_args(model, data, out, steps, *extra):
    return common_args(model, out, steps, "--train_data_dir", str(data), "--output_name", "db",
                       "--learning_rate", "1e-3", *extra)


@pytest.fixture
def reg_data(tmp_path):
    return make_shapes_folder(tmp_path / "reg", repeats=1, n=2, name="shape")


def test_trains_with_reg_images_and_diffusers_reads_the_file(tiny_sd, shapes_data, reg_data, tmp_path):
    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_models

    out = tmp_path / "out"
    train_db.main(db_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 3, "--reg_data_dir", str(reg_data),
                          "--prior_loss_weight", "0.5", "--save_model_as", "safetensors", "--save_every_n_steps", "2",
                          "--metadata_title", "my model"))
    assert sorted(os.listdir(out)) == ["db-step00000002.run.json", "db-step00000002.safetensors", "db.run.json",
                                       "db.safetensors"]  # beside each model: its run receipt (<name>.run.json, docs/beyond-sd-scripts.md)
    path = out / "db.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.title"] == "my model"
    assert all(k.startswith("modelspec.") for k in meta)  # full checkpoints carry only modelspec (§b.3)
    ours = load_models(str(path)).unet.state_dict()
    base = load_models(str(tiny_sd["sd1"]["safetensors"])).unet.state_dict()
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_sd["sd1"]["diffusers"]),
                                                    local_files_only=True)
    theirs = pipe.unet.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert any(not torch.equal(ours[k], base[k]) for k in ours)  # training happened
    saved, src = weights(path), weights(tiny_sd["sd1"]["safetensors"])
    assert any(not torch.equal(v, src[k]) for k, v in part(saved, TE).items())  # TE trained the whole run


def test_ckpt_epoch_step_source_extras_and_text_encoder_stop(tiny_sd, tmp_path):
    """A .ckpt source with EMA keys and stored epoch/global_step; None save format = .ckpt like the source."""
    data = make_shapes_folder(tmp_path / "data", repeats=1, n=2)
    src = tmp_path / "src.ckpt"
    sd = weights(tiny_sd["sd1"]["safetensors"])
    extras = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int32)}
    torch.save({"state_dict": {**sd, **extras}, "epoch": 5, "global_step": 100}, src)
    out = tmp_path / "out"
    # 2 batches per epoch, 2 epochs: step save at 3 (epoch index 1), epoch save after epoch 1, final save
    train_db.main(db_args(src, data, out, 0, "--max_train_epochs", "2", "--save_every_n_epochs", "1",
                          "--save_every_n_steps", "3", "--stop_text_encoder_training", "1"))
    models = sorted(n for n in os.listdir(out) if not n.endswith(".run.json"))  # beside each model: its run receipt (<name>.run.json, docs/beyond-sd-scripts.md)
    assert models == ["db-000001.ckpt", "db-step00000003.ckpt", "db.ckpt"]
    stored = {name: torch.load(str(out / name), map_location="cpu", weights_only=True) for name in models}
    assert (stored["db-000001.ckpt"]["epoch"], stored["db-000001.ckpt"]["global_step"]) == (6, 102)
    assert (stored["db-step00000003.ckpt"]["epoch"], stored["db-step00000003.ckpt"]["global_step"]) == (6, 103)
    assert (stored["db.ckpt"]["epoch"], stored["db.ckpt"]["global_step"]) == (6, 104)
    final = stored["db.ckpt"]["state_dict"]
    for k, v in extras.items():
        assert torch.equal(final[k], v) and final[k].dtype == v.dtype
    # the text encoder stopped after step 1: unchanged from step 2 on, but different from the base
    te_epoch1, te_final = part(stored["db-000001.ckpt"]["state_dict"], TE), part(final, TE)
    assert_same(te_epoch1, te_final)
    assert any(not torch.equal(v, sd[k]) for k, v in te_final.items())
    assert any(not torch.equal(v, stored["db-000001.ckpt"]["state_dict"][k]) for k, v in part(final, UNET).items())


def test_diffusers_source_gives_diffusers_folder(tiny_sd, shapes_data, tmp_path):
    """Folder source + no --save_model_as -> Diffusers folder that diffusers loads; -1 never trains the TE."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    base = tiny_sd["sd1"]["diffusers"]
    train_db.main(db_args(base, shapes_data, out, 2, "--use_safetensors", "--stop_text_encoder_training", "-1",
                          "--learning_rate_te", "1e-3"))
    assert (out / "db" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "db" / "scheduler" / "scheduler_config.json").read_text() == \
        (base / "scheduler" / "scheduler_config.json").read_text()  # the source folder is the reference
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "db"), local_files_only=True)
    ref = StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True)
    assert_same(pipe.text_encoder.state_dict(), ref.text_encoder.state_dict())
    unet, ref_unet = pipe.unet.state_dict(), ref.unet.state_dict()
    assert any(not torch.equal(unet[k], ref_unet[k]) for k in unet)


def test_resume_continues_bit_identically(tiny_sd, shapes_data, tmp_path):
    """4 straight steps == 2 steps + save_state + resume + 2 steps (U-Net and TE, two LR groups)."""
    common = ["--save_every_n_steps", "2", "--save_state", "--learning_rate_te", "5e-4", "--save_model_as",
              "safetensors", "--stop_text_encoder_training", "3"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_db.main(db_args(tiny_sd["sd1"]["safetensors"], shapes_data, straight, 4, *common))
    state = straight / "db-step00000002-state"
    assert (state / "model.safetensors").exists() and (state / "model_1.safetensors").exists()  # U-Net, TE
    train_db.main(db_args(tiny_sd["sd1"]["safetensors"], shapes_data, resumed, 4, *common, "--resume", str(state)))
    assert_same(weights(straight / "db.safetensors"), weights(resumed / "db.safetensors"))


def test_config_file_and_no_token_padding(tiny_sd, shapes_data, tmp_path):
    out = tmp_path / "out"
    args = db_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 1, "--no_token_padding", "--save_model_as",
                   "safetensors")
    cfg = write_config(args, tmp_path / "db.toml")
    train_db.main(["--config_file", str(cfg)])
    assert (out / "db.safetensors").exists()


@pytest.mark.parametrize("bad,msg", [
    (["--no_token_padding", "--max_token_length", "150"], "--no_token_padding"),
    (["--save_model_as", "pt"], "--save_model_as"),
    (["--full_fp16"], "--full_fp16"),
])
def test_bad_options_exit_2(tiny_sd, shapes_data, tmp_path, capsys, bad, msg):
    with pytest.raises(SystemExit) as e:
        train_db.main(db_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1, *bad))
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
