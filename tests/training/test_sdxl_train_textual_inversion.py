"""sdxl_train_textual_inversion.py end to end on the tiny SDXL model (issue 20 item 2).

Oracles: diffusers' ``load_textual_inversion`` (once per tokenizer / encoder pair) reads the ``clip_l`` /
``clip_g`` file and its text encoders then give what ours give; the trained encoders of the state folder show
that only the new rows moved, in both tables; upstream v0.8.7's parser lists the options.
"""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gen_img
import sdxl_train_textual_inversion
from library.config.options import build_parser
from tests.training.full_train_helpers import assert_same, common_args, doc_example, nan_loss_from_call, weights
from tools.make_tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 49408  # CLIP vocabulary of both tiny encoders, as of the real ones
WIDTHS = {"clip_l": 32, "clip_g": 64}  # tiny TE1 / TE2 widths (real: 768 / 1280)


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return write_tiny_model("sdxl", tmp_path_factory.mktemp("xl_ti"))


def ti_args(model, data, out, steps, *extra):
    return common_args(model, out, steps, "--train_data_dir", str(data), "--token_string", "sks",
                       "--init_word", "shape", "--learning_rate", "1e-2", *extra)


def _sdxl_context(models, prompt_ids):
    """Our training conditioning (TE1 hidden_states[-2] | TE2 hidden_states[-2], TE2 pooled) of (1, 77) ids."""
    from library.training.objective.conditioning import encode_sdxl

    te1, te2 = models.text_encoders
    with torch.no_grad():
        return encode_sdxl(te1, te2, prompt_ids[0][:, None], prompt_ids[1][:, None], None)


def test_both_encoders_train_and_diffusers_reads_the_file(tiny_xl, shapes_data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from library.models.loading import load_models
    from library.sampling.textual_inversion import load_textual_inversion

    out = tmp_path / "out"
    sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, out, 2,
                                              "--num_vectors_per_token", "2", "--save_model_as", "safetensors",
                                              "--save_state_on_train_end", "--optimizer_args", "weight_decay=0.1"))
    assert sorted(p.name for p in out.iterdir()) == ["sks-state", "sks.run.json", "sks.safetensors"]
    with safe_open(str(out / "sks.safetensors"), "pt") as f:
        meta, emb = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    # the SDXL embedding layout A1111 and ComfyUI read: exactly clip_l (TE1 width) and clip_g (TE2 width)
    assert {k: tuple(v.shape) for k, v in emb.items()} == {k: (2, w) for k, w in WIDTHS.items()}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"

    # the state folder holds both prepared encoders: old rows bit-identical (weight decay undone), the rest frozen,
    # the new rows moved away from --init_word's vector in both tables
    base = load_models(str(tiny_xl["safetensors"]))
    shape_id = base.tokenizers[0].encode("shape", add_special_tokens=False)[0]
    for key, state_file, te in (("clip_l", "model.safetensors", base.text_encoders[0]),
                                ("clip_g", "model_1.safetensors", base.text_encoders[1])):
        trained, before = load_file(str(out / "sks-state" / state_file)), te.state_dict()
        table = next(k for k in trained if k.endswith("token_embedding.weight"))
        assert torch.equal(trained[table][:VOCAB], before[table])
        assert trained.keys() == before.keys()  # TE2's q/k/v (one packed tensor in the file) saved apart
        assert all(torch.equal(trained[k], before[k]) for k in before if k != table)
        assert torch.equal(trained[table][VOCAB:], emb[key])  # the file holds exactly the trained rows
        assert not torch.equal(emb[key][0], before[table][shape_id])

    # oracle: diffusers loads clip_l into (tokenizer, text_encoder) and clip_g into (tokenizer_2, text_encoder_2)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_xl["diffusers"]), local_files_only=True)
    pipe.load_textual_inversion(emb["clip_l"], token="sks", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token="sks", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    theirs_ids = []
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        prompt = pipe.maybe_convert_prompt("a photo of sks", tok)  # "sks" -> "sks sks_1"
        theirs_ids.append(tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    with torch.no_grad():
        h1 = pipe.text_encoder(theirs_ids[0], output_hidden_states=True).hidden_states[-2]
        out2 = pipe.text_encoder_2(theirs_ids[1], output_hidden_states=True)
    theirs_ctx, theirs_pool = torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds

    # ours: the file loaded the way gen_img loads it (token = file stem), then the training conditioning
    ours = load_models(str(tiny_xl["diffusers"]))
    replacers = load_textual_inversion("sdxl", ours.text_encoders, ours.tokenizers, [str(out / "sks.safetensors")])
    ours_ids = []
    for tok, rep in zip(ours.tokenizers, replacers):
        ids = rep(tok("a photo of sks", add_special_tokens=False).input_ids)  # "sks" -> sks, sks1
        ours_ids.append(torch.tensor([[tok.bos_token_id, *ids, tok.eos_token_id]
                                      + [tok.pad_token_id] * (75 - len(ids))]))
    for a, b in zip(ours_ids, theirs_ids):
        assert a.tolist() == b.tolist()
    ctx, pool = _sdxl_context(ours, ours_ids)
    torch.testing.assert_close(ctx, theirs_ctx, atol=1e-5, rtol=0)
    torch.testing.assert_close(pool, theirs_pool, atol=1e-5, rtol=0)


def test_gen_img_uses_the_embedding(tiny_xl, tmp_path):
    """gen_img --textual_inversion_embeddings with an SDXL file: the vectors reach the image (changing them
    changes the pixels; the prompt and seed stay the same)."""
    import numpy as np
    from PIL import Image

    pixels = []
    for i, scale in enumerate((1.0, -1.0)):
        folder = tmp_path / f"emb{i}"
        folder.mkdir()
        g = torch.Generator().manual_seed(3)
        save_file({k: torch.randn(1, w, generator=g) * 5 * scale for k, w in WIDTHS.items()},
                  str(folder / "sks.safetensors"))
        paths = gen_img.main(["--ckpt", str(tiny_xl["diffusers"]), "--outdir", str(tmp_path / f"out{i}"), "--W", "64",
                              "--H", "64", "--steps", "2", "--seed", "1", "--prompt", "a photo of sks",
                              "--textual_inversion_embeddings", str(folder / "sks.safetensors")])
        pixels.append(np.asarray(Image.open(paths[0]), dtype=np.int16))
    assert np.abs(pixels[0] - pixels[1]).max() > 0


def test_sample_images_use_the_trained_vectors(tiny_xl, shapes_data, tmp_path):
    """Sample images during training: only the embedding trains, so the same prompt and seed giving other pixels
    after training than before means the sampler saw the new vectors (both encoders, "sks" -> "sks sks1")."""
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    out = tmp_path / "out"
    sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, out, 2, "--num_vectors_per_token",
                                              "2", "--learning_rate", "0.5", "--sample_prompts", str(prompts),
                                              "--sample_at_first", "--sample_every_n_steps", "2"))
    images = sorted((out / "sample").glob("*.png"))
    assert len(images) == 2, images
    before, after = (np.asarray(Image.open(p), dtype=np.int16) for p in images)
    assert np.abs(before - after).max() > 0


def test_resume_continues_bit_identically(tiny_xl, shapes_data, tmp_path):
    common = ["--save_every_n_steps", "2", "--save_state", "--num_vectors_per_token", "2"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, straight, 3, *common))
    sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, resumed, 3, *common, "--resume",
                                              str(straight / "sks-step00000002-state")))
    a = torch.load(str(straight / "sks.pt"), weights_only=True)
    assert sorted(a) == ["clip_g", "clip_l"]  # .pt: torch.save of the same dict
    assert_same(a, torch.load(str(resumed / "sks.pt"), weights_only=True))


def test_weights_continue_and_templates(tiny_xl, shapes_data, tmp_path):
    """--weights reads an SDXL file (1-D vectors too); at learning rate 0 training gives them back exactly."""
    g = torch.Generator().manual_seed(0)
    start = {k: torch.randn(w, generator=g) for k, w in WIDTHS.items()}  # 1-D: one vector each
    save_file(start, str(tmp_path / "start.safetensors"))
    out = tmp_path / "out"
    sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, out, 1, "--use_object_template",
                                              "--weights", str(tmp_path / "start.safetensors"), "--learning_rate",
                                              "0", "--output_name", "emb", "--save_model_as", "safetensors"))
    assert_same(weights(out / "emb.safetensors"), {k: v[None] for k, v in start.items()})


def test_validation_ema_receipts_and_dry_run(tiny_xl, shapes_data, tmp_path, capsys):
    from tests.training.test_train_matrix import _scalars

    out, logs = tmp_path / "out", tmp_path / "logs"
    sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, out, 3, "--validation_split",
                                              "0.34", "--validate_every_n_steps", "1", "--ema", "--ema_decay", "0.5",
                                              "--save_model_as", "safetensors", "--logging_dir", str(logs)))
    scalars = _scalars(logs)
    assert {"loss", "lr", "loss/validation", "ema/decay"} <= set(scalars)
    assert sorted(p.name for p in out.iterdir()) == ["sks-ema.safetensors", "sks.run.json", "sks.safetensors"]
    model, ema = weights(out / "sks.safetensors"), weights(out / "sks-ema.safetensors")
    assert model.keys() == ema.keys() == set(WIDTHS) and all(not torch.equal(model[k], ema[k]) for k in model)
    receipt = json.loads((out / "sks.run.json").read_text(encoding="utf-8"))
    assert receipt["script"] == "sdxl_train_textual_inversion"

    dry = tmp_path / "dry"
    sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, dry, 5, "--dry_run"))
    text = capsys.readouterr().out
    assert "dry run of sdxl_train_textual_inversion.py" in text and re.search(r"^\s*total steps: 5$", text, re.M)
    assert not dry.exists()


def test_nan_loss_exits_3_and_keeps_the_last_good_file(tiny_xl, shapes_data, tmp_path, monkeypatch, capsys):
    nan_loss_from_call(monkeypatch, 2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, out, 3,
                                                  "--save_every_n_steps", "1"))
    assert e.value.code == 3 and "in the loss at step 2" in capsys.readouterr().err
    assert sorted(weights(out / "sks-step00000001.pt")) == ["clip_g", "clip_l"]


@pytest.mark.parametrize("bad,msg", [
    (["--v2"], "--v2"),
    (["--use_object_template", "--use_style_template"], "exclude each other"),
    (["--token_string", "a"], "already exists"),
    (["--caption_dropout_rate", "0.1"], "--caption_dropout_rate"),  # T's parser: no caption dropout
    (["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs"),  # not an option of this script upstream
])
def test_bad_options_exit_2_without_output(tiny_xl, shapes_data, tmp_path, capsys, bad, msg):
    with pytest.raises(SystemExit) as e:
        sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, tmp_path / "o", 1, *bad))
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_files_exit_2_before_training(tiny_xl, tiny_sd, shapes_data, tmp_path, capsys):
    # an SD 1.x model is refused by its header, before any model loads
    with pytest.raises(SystemExit) as e:
        sdxl_train_textual_inversion.main(ti_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1))
    assert e.value.code == 2 and "needs an SDXL model" in capsys.readouterr().err
    # --weights: an SD 1.x file (no clip_l / clip_g), one half only, a wrong vector count
    cases = {"sd.safetensors": ({"emb_params": torch.zeros(1, 32)}, "neither 'clip_l' nor 'clip_g'"),
             "half.safetensors": ({"clip_l": torch.zeros(1, 32)}, "clip_g is missing"),
             "three.safetensors": ({"clip_l": torch.zeros(3, 32), "clip_g": torch.zeros(3, 64)},
                                   "clip_l holds 3 vectors, but --num_vectors_per_token is 1")}
    for name, (tensors, msg) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(SystemExit) as e:
            sdxl_train_textual_inversion.main(ti_args(tiny_xl["safetensors"], shapes_data, tmp_path / "o", 1,
                                                      "--weights", str(tmp_path / name)))
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err, name
        assert "loading SDXL checkpoint" not in err, name  # refused before any model loads
        assert not (tmp_path / "o").exists()


def test_help_lists_every_upstream_option():
    """Upstream's setup_parser() is train_textual_inversion's, unchanged: the v0.8.7 list (taken from upstream's
    own parsers) is in ours, and ours is exactly train_textual_inversion.py's."""
    data = json.loads((ROOT / "library" / "config" / "sd_scripts_options.json").read_text(encoding="utf-8"))
    ours = build_parser("sdxl_train_textual_inversion")
    dests = {a.dest for a in ours._actions}
    assert set(data["scripts"]["sdxl_train_textual_inversion"]) <= dests
    assert dests == {a.dest for a in build_parser("train_textual_inversion")._actions}
    text = sdxl_train_textual_inversion.setup_parser().format_help()
    assert text.startswith("usage: sdxl_train_textual_inversion.py")
    for dest in data["scripts"]["sdxl_train_textual_inversion"]:
        assert f"--{dest}" in text, dest


def test_docs_config_example_trains(tiny_xl, shapes_data, tmp_path):
    """The worked example of docs/sdxl_train_textual_inversion.md, with the tiny model and data swapped in."""
    swaps = {"pretrained_model_name_or_path": str(tiny_xl["safetensors"]), "train_data_dir": str(shapes_data),
             "output_dir": str(tmp_path / "out"), "resolution": "64,64", "max_train_steps": 1,
             "sample_prompts": None, "sample_every_n_epochs": None, "mixed_precision": "no", "xformers": None,
             "max_data_loader_n_workers": 0, "enable_bucket": None, "bucket_reso_steps": None}
    cfg, command = doc_example(ROOT / "docs" / "sdxl_train_textual_inversion.md", swaps, tmp_path / "ti.toml")
    toml_text = cfg.read_text(encoding="utf-8")
    assert "sdxl_train_textual_inversion.py --config_file" in command
    sdxl_train_textual_inversion.main(["--config_file", str(tmp_path / "ti.toml")])
    name = re.search(r'output_name = "(\w+)"', toml_text).group(1)
    assert sorted(weights(tmp_path / "out" / f"{name}.safetensors")) == ["clip_g", "clip_l"]
    assert shlex.split(command)[:3] == ["accelerate", "launch", "sdxl_train_textual_inversion.py"]


def test_wrapper_class_trains(tiny_xl, shapes_data, tmp_path):
    """Wrappers build the namespace with setup_parser() and call the trainer class (library/compat/trainers.py)."""
    args = sdxl_train_textual_inversion.setup_parser().parse_args(
        ti_args(tiny_xl["safetensors"], shapes_data, tmp_path / "out", 1))
    path = sdxl_train_textual_inversion.SdxlTextualInversionTrainer().train(args)
    assert sorted(weights(Path(path))) == ["clip_g", "clip_l"]
