"""sdxl_train.py end to end on the tiny SDXL model (issue 20 item 1).

Oracles: diffusers' own loaders (``StableDiffusionXLPipeline.from_single_file`` on the single file,
``from_pretrained`` on the Diffusers folder) read what we wrote; the same run saved both ways gives equal
weights; transformers' AdaFactor / torch's AdamW stepping after the whole backward give the same weights as
the fused steps inside it; what is frozen stays bit-identical to the base model.
"""
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import sdxl_train
from tests.training.full_train_helpers import assert_same, common_args, nan_loss_from_call, part, weights, write_config
from tests.training.test_train_matrix import _scalars
from tests.training.train_helpers import make_shapes_folder
from tools.make_tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
UNET, TE1, TE2 = "model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1."


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return write_tiny_model("sdxl", tmp_path_factory.mktemp("xl"))


@pytest.fixture
def ft_data(tmp_path):
    """Images in one folder and a metadata JSON with captions (keys = file stems)."""
    root = make_shapes_folder(tmp_path / "data", repeats=1, n=3)
    images = root / "1_sks shape"
    meta = {p.stem: {"caption": f"a sks shape, number {p.stem}"} for p in sorted(images.glob("*.png"))}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return images, path


def xl_args(model, out, steps, *extra):
    return common_args(model, out, steps, "--output_name", "xl", "--learning_rate", "1e-3", *extra)


def ft_args(model, data, out, steps, *extra):
    images, meta = data
    return xl_args(model, out, steps, "--train_data_dir", str(images), "--in_json", str(meta), *extra)


def _changed(saved, base, prefix):
    return [k for k, v in part(saved, prefix).items() if not torch.equal(v, base[k])]


def test_unet_only_single_file_and_diffusers_folder_load_in_diffusers_equally(tiny_xl, ft_data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    single, folder = tmp_path / "single", tmp_path / "folder"
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, single, 2, "--save_model_as", "safetensors"))
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, folder, 2, "--save_model_as", "diffusers"))
    saved, base = weights(single / "xl.safetensors"), weights(tiny_xl["safetensors"])
    assert _changed(saved, base, UNET) and not _changed(saved, base, TE1) and not _changed(saved, base, TE2)
    a = StableDiffusionXLPipeline.from_single_file(str(single / "xl.safetensors"), config=str(tiny_xl["diffusers"]),
                                                   local_files_only=True)
    b = StableDiffusionXLPipeline.from_pretrained(str(folder / "xl"), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    src = StableDiffusionXLPipeline.from_pretrained(str(tiny_xl["diffusers"]), local_files_only=True)
    assert any(not torch.equal(v, src.unet.state_dict()[k]) for k, v in a.unet.state_dict().items())


def test_dreambooth_folders_both_text_encoders_and_resume_bit_identically(tiny_xl, shapes_data, tmp_path):
    common = ["--train_data_dir", str(shapes_data), "--train_text_encoder", "--learning_rate_te1", "5e-4",
              "--learning_rate_te2", "2e-4", "--save_every_n_steps", "1", "--save_state", "--save_model_as",
              "safetensors"]
    straight, resumed, logs = tmp_path / "a", tmp_path / "b", tmp_path / "logs"
    sdxl_train.main(xl_args(tiny_xl["safetensors"], straight, 3, *common, "--logging_dir", str(logs)))
    saved, base = weights(straight / "xl.safetensors"), weights(tiny_xl["safetensors"])
    assert _changed(saved, base, UNET) and _changed(saved, base, TE2)
    te1 = _changed(saved, base, TE1)
    # TE1's output is its penultimate layer: the last layer and final norm stay frozen (sd-scripts)
    last = max(int(k.split(".layers.")[1].split(".")[0]) for k in part(base, TE1) if ".layers." in k)
    assert te1 and not any(".final_layer_norm." in k or f".layers.{last}." in k for k in te1), te1
    scalars = _scalars(logs)
    assert {"loss", "lr/unet", "lr/text_encoder1", "lr/text_encoder2"} <= set(scalars)
    assert scalars["lr/text_encoder1"] == pytest.approx([5e-4] * 3) and \
        scalars["lr/text_encoder2"] == pytest.approx([2e-4] * 3)
    sdxl_train.main(xl_args(tiny_xl["safetensors"], resumed, 3, *common, "--resume",
                            str(straight / "xl-step00000001-state")))
    assert_same(saved, weights(resumed / "xl.safetensors"))


def test_te2_rate_zero_keeps_te2_frozen(tiny_xl, ft_data, tmp_path):
    out = tmp_path / "out"
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, out, 1, "--train_text_encoder", "--learning_rate_te2",
                            "0", "--save_model_as", "safetensors"))
    saved, base = weights(out / "xl.safetensors"), weights(tiny_xl["safetensors"])
    assert _changed(saved, base, TE1) and not _changed(saved, base, TE2)


def test_text_encoder_output_cache_memory_and_disk_train_like_no_cache(tiny_xl, ft_data, tmp_path):
    runs = {"none": [], "memory": ["--cache_text_encoder_outputs"],
            "disk": ["--cache_text_encoder_outputs_to_disk"]}
    out = {}
    for name, extra in runs.items():
        sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, tmp_path / name, 2, "--save_model_as", "safetensors",
                                *extra))
        out[name] = weights(tmp_path / name / "xl.safetensors")
    images = sorted(ft_data[0].glob("*.png"))
    assert all((p.parent / (p.stem + "_te_outputs.npz")).exists() for p in images)
    for name in ("memory", "disk"):
        for k, v in part(out["none"], UNET).items():
            torch.testing.assert_close(out[name][k], v, atol=1e-6, rtol=1e-5, msg=f"{name} {k}")


def test_block_lr_zero_freezes_a_block_and_logs_block_rates(tiny_xl, ft_data, tmp_path):
    lrs = ["1e-3"] * 23
    lrs[22] = "0"  # out: conv_norm_out / conv_out (LDM out.0 / out.2)
    out, logs = tmp_path / "out", tmp_path / "logs"
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, out, 2, "--block_lr", ",".join(lrs), "--save_model_as",
                            "safetensors", "--logging_dir", str(logs)))
    saved, base = weights(out / "xl.safetensors"), weights(tiny_xl["safetensors"])
    changed = _changed(saved, base, UNET)
    assert changed and not any(k.startswith(UNET + "out.") for k in changed)
    assert any(k.startswith(UNET + "output_blocks.8.") for k in changed)
    scalars = _scalars(logs)
    assert "lr/block21" in scalars and "lr/block22" not in scalars


@pytest.mark.parametrize("fused,optimizer", [
    (["--fused_backward_pass"], ["--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=False",
                                 "scale_parameter=False", "warmup_init=False"]),
    (["--fused_optimizer_groups", "4"], ["--optimizer_type", "AdamW"]),
])
def test_fused_steps_train_like_the_plain_step(tiny_xl, ft_data, tmp_path, fused, optimizer):
    """Without clipping, the step inside backward is the plain step, bit for bit (text encoders too)."""
    common = ["--save_model_as", "safetensors", "--max_grad_norm", "0", "--train_text_encoder",
              "--learning_rate_te2", "2e-4", *optimizer]
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, tmp_path / "plain", 2, *common))
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, tmp_path / "fused", 2, *common, *fused))
    assert_same(weights(tmp_path / "plain" / "xl.safetensors"), weights(tmp_path / "fused" / "xl.safetensors"))


def test_fused_optimizer_groups_resume_bit_identically(tiny_xl, ft_data, tmp_path):
    common = ["--fused_optimizer_groups", "3", "--save_every_n_steps", "1", "--save_state", "--save_model_as",
              "safetensors", "--lr_scheduler", "cosine"]
    a, b = tmp_path / "a", tmp_path / "b"
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, a, 3, *common))
    assert len(list((a / "xl-step00000001-state").glob("optimizer*"))) == 3
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, b, 3, *common, "--resume",
                            str(a / "xl-step00000001-state")))
    assert_same(weights(a / "xl.safetensors"), weights(b / "xl.safetensors"))


def test_config_file_ckpt_by_default_from_a_single_file(tiny_xl, ft_data, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(ft_args(tiny_xl["safetensors"], ft_data, out, 1), tmp_path / "xl.toml")
    sdxl_train.main(["--config_file", str(cfg)])
    stored = torch.load(str(out / "xl.ckpt"), map_location="cpu", weights_only=True)
    assert stored["global_step"] == 1 and any(k.startswith(UNET) for k in stored["state_dict"])


@pytest.mark.parametrize("bad,msg", [
    (["--v2"], "--v2"),
    (["--weighted_captions"], "--weighted_captions"),
    (["--train_text_encoder", "--cache_text_encoder_outputs"], "--cache_text_encoder_outputs"),
    (["--block_lr", "1e-6,1e-6"], "23"),
    (["--learning_rate", "0"], "nothing to train"),
    (["--fused_backward_pass"], "AdaFactor"),
    (["--fused_backward_pass", "--optimizer_type", "AdaFactor", "--gradient_accumulation_steps", "2"],
     "--gradient_accumulation_steps"),
    (["--fused_optimizer_groups", "2", "--mixed_precision", "fp16"], "fp16"),
    (["--fused_optimizer_groups", "2", "--check_grads"], "--check_grads"),
    (["--fused_optimizer_groups", "2", "--fused_backward_pass", "--optimizer_type", "AdaFactor"], "exclude"),
    (["--fused_optimizer_groups", "0"], "--fused_optimizer_groups"),
    (["--learning_rate_te1", "-1"], "--learning_rate_te1"),
])
def test_bad_options_are_one_line_before_loading(tiny_xl, ft_data, tmp_path, capsys, bad, msg):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, out, 1, *bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and msg in err[-1] and err[-1].startswith("error:"), err
    assert not out.exists()


def test_sd1_model_is_refused(tiny_sd, ft_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sdxl_train.main(ft_args(tiny_sd["sd1"]["safetensors"], ft_data, tmp_path / "out", 1))
    assert e.value.code == 2 and "SD1" in capsys.readouterr().err


# --- the options every trainer shares (docs/beyond-sd-scripts.md) -------------------------------------------

def test_dry_run_prints_the_plan_without_output(tiny_xl, ft_data, tmp_path, capsys):
    out = tmp_path / "out"
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, out, 5, "--dry_run", "--train_text_encoder"))
    text = capsys.readouterr().out
    assert "dry run of sdxl_train.py" in text and "total steps: 5" in text and "estimated peak" in text
    assert not out.exists()
    # both encoders train in float32: their weights count 4 bytes each, and their gradients are counted
    assert re.search(r"weights text_encoder_2 \([\d.]+M x 4 B\)", text), text
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, out, 5, "--dry_run", "--fused_backward_pass",
                            "--optimizer_type", "AdaFactor"))
    assert "--fused_backward_pass: freed one parameter at a time" in capsys.readouterr().out


def test_validation_ema_receipts_and_samples(tiny_xl, shapes_data, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a sks shape --w 64 --h 64 --d 3 --s 2\n", encoding="utf-8")
    out, logs = tmp_path / "out", tmp_path / "logs"
    sdxl_train.main(xl_args(tiny_xl["safetensors"], out, 2, "--train_data_dir", str(shapes_data), "--save_model_as",
                            "safetensors", "--validation_split", "0.34", "--validate_every_n_steps", "1", "--ema",
                            "--ema_decay", "0.5", "--ema_device", "cpu", "--logging_dir", str(logs),
                            "--sample_prompts", str(prompts), "--sample_every_n_steps", "2"))
    assert {"loss/validation", "ema/decay", "loss"} <= set(_scalars(logs))
    assert sorted(p.name for p in out.iterdir()) == ["sample", "xl-ema.safetensors", "xl.run.json",
                                                     "xl.safetensors"]
    receipt = json.loads((out / "xl.run.json").read_text(encoding="utf-8"))
    assert receipt["script"] == "sdxl_train" and receipt["steps"]["max_train_steps"] == 2
    model, ema = weights(out / "xl.safetensors"), weights(out / "xl-ema.safetensors")
    assert model.keys() == ema.keys() and any(not torch.equal(model[k], ema[k]) for k in model)
    assert [p.name.endswith("_3.png") for p in (out / "sample").iterdir()] == [True]


def test_nan_loss_exits_3_and_keeps_the_last_good_file(tiny_xl, ft_data, tmp_path, monkeypatch, capsys):
    nan_loss_from_call(monkeypatch, 2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, out, 3, "--save_every_n_steps", "1",
                                "--save_model_as", "safetensors", "--fused_optimizer_groups", "2"))
    assert e.value.code == 3 and "in the loss at step 2" in capsys.readouterr().err
    step1 = weights(out / "xl-step00000001.safetensors")
    assert all(math.isfinite(v.float().sum()) for v in step1.values())


def test_hub_upload_of_the_saved_model(tiny_xl, ft_data, tmp_path, monkeypatch):
    from library.training.extras import hub_upload
    from tests.training.test_hub_upload import HUB, FakeHub

    hub = FakeHub()
    monkeypatch.setattr(hub_upload, "HfApi", hub.Api)
    sdxl_train.main(ft_args(tiny_xl["safetensors"], ft_data, tmp_path / "out", 1, "--save_model_as", "safetensors",
                            *HUB))
    assert [c[:4] for c in hub.uploads()] == [("upload_file", "me/repo", None, "loras/xl.safetensors")]
    assert os.path.exists(tmp_path / "out" / "xl.safetensors")


def test_docs_config_example_trains(tiny_xl, ft_data, tmp_path):
    """The worked example of docs/sdxl_train.md (fused AdaFactor, TE-output cache), tiny model and data swapped in;
    then its text-encoder variant."""
    doc = (ROOT / "docs" / "sdxl_train.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", doc, re.S)
    assert "sdxl_train.py --config_file" in re.search(r"```bash\n(.*?)```", doc, re.S).group(1)
    images, meta = ft_data
    swaps = {"pretrained_model_name_or_path": str(tiny_xl["safetensors"]), "train_data_dir": str(images),
             "in_json": str(meta), "output_dir": str(tmp_path / "out"), "resolution": "64,64", "max_train_steps": 1,
             "mixed_precision": "no", "full_bf16": None, "max_data_loader_n_workers": 0, "enable_bucket": None,
             "bucket_reso_steps": None, "save_every_n_steps": None,
             "lr_warmup_steps": None}  # one step: a warm-up would start it at rate 0
    lines = []
    for line in blocks[0].splitlines():
        key = line.split("=")[0].strip()
        if key in swaps:
            if swaps[key] is not None:
                lines.append(f"{key} = {json.dumps(swaps[key])}")
            continue
        lines.append(line)
    cfg = tmp_path / "sdxl_ft.toml"
    cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sdxl_train.main(["--config_file", str(cfg)])
    saved, base = weights(tmp_path / "out" / "my_sdxl.safetensors"), weights(tiny_xl["safetensors"])
    assert _changed(saved, base, UNET) and not _changed(saved, base, TE1)
    te_lines = [ln for ln in lines if not ln.startswith("cache_text_encoder_outputs")] + blocks[1].splitlines()
    te_lines = [ln.replace('"my_sdxl"', '"my_sdxl_te"') for ln in te_lines]
    cfg.write_text("\n".join(te_lines) + "\n", encoding="utf-8")
    sdxl_train.main(["--config_file", str(cfg)])
    saved = weights(tmp_path / "out" / "my_sdxl_te.safetensors")
    assert _changed(saved, base, TE1) and not _changed(saved, base, TE2)
