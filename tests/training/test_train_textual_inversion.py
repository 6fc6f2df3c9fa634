"""train_textual_inversion.py end to end on the tiny SD1 model (issue "other trainers" §4, §5; spec §12 T)."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_textual_inversion
from library.training.methods import ti_tokens
from tests.training.full_train_helpers import assert_same, common_args, write_config

VOCAB = 49408  # CLIP vocabulary of the tiny model, as of the real one


def ti_args(model, data, out, steps, *extra):
    return common_args(model, out, steps, "--train_data_dir", str(data), "--token_string", "sks",
                       "--init_word", "shape", "--learning_rate", "1e-2", *extra)


def _trained_text_encoder(diffusers_dir, state_dir, n_tokens):
    """Our trained TE, as the state folder holds it (the prepared model of train_textual_inversion)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(str(diffusers_dir), subfolder="text_encoder")
    base = {k: v.clone() for k, v in te.state_dict().items()}
    te.resize_token_embeddings(VOCAB + n_tokens, mean_resizing=False)
    te.load_state_dict(load_file(str(state_dir / "model.safetensors")))
    return te.eval(), base


def test_only_new_rows_train_and_diffusers_reads_the_embedding(tiny_sd, shapes_data, tmp_path):
    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_models

    out = tmp_path / "out"
    train_textual_inversion.main(ti_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2,
                                         "--num_vectors_per_token", "2", "--save_model_as", "safetensors",
                                         "--save_state_on_train_end", "--optimizer_args", "weight_decay=0.1"))
    # output_name defaults to the token; beside the model its run receipt (docs/beyond-sd-scripts.md)
    assert sorted(os.listdir(out)) == ["sks-state", "sks.run.json", "sks.safetensors"]
    with safe_open(str(out / "sks.safetensors"), "pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["emb_params"] and tuple(f.get_tensor("emb_params").shape) == (2, 32)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.title"] == "sks"
    te, base = _trained_text_encoder(tiny_sd["sd1"]["diffusers"], out / "sks-state", 2)
    trained = te.state_dict()
    emb = "embeddings.token_embedding.weight"
    assert torch.equal(trained[emb][:VOCAB], base[emb])  # every old row bit-identical (weight decay undone)
    assert all(torch.equal(trained[k], base[k]) for k in base if k != emb)  # the rest of the TE is frozen
    shape_id = load_models(str(tiny_sd["sd1"]["safetensors"])).tokenizers[0].encode("shape", add_special_tokens=False)
    assert not torch.equal(trained[emb][VOCAB], base[emb][shape_id[0]])  # the new rows trained from init_word

    tok = load_models(str(tiny_sd["sd1"]["safetensors"])).tokenizers[0]
    tok.add_tokens(["sks", "sks1"])
    ids = torch.tensor([tok("a photo of sks sks1", padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        ours = te(ids)[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd["sd1"]["diffusers"]), local_files_only=True)
    pipe.load_textual_inversion(str(out / "sks.safetensors"), token="sks")
    prompt = pipe.maybe_convert_prompt("a photo of sks", pipe.tokenizer)
    their_ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert their_ids.tolist() == ids.tolist()
    with torch.no_grad():
        theirs = pipe.text_encoder(their_ids)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_templates_pt_file_and_weights_continue(tiny_sd, shapes_data, tmp_path):
    """Object templates, a .pt file that diffusers reads, and --weights (a 1-D vector) to continue."""
    from diffusers import StableDiffusionPipeline

    first = tmp_path / "first"
    train_textual_inversion.main(ti_args(tiny_sd["sd1"]["safetensors"], shapes_data, first, 1, "--use_object_template",
                                         "--output_name", "emb"))
    saved = torch.load(str(first / "emb.pt"), weights_only=True)
    assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (1, 32)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd["sd1"]["diffusers"]), local_files_only=True)
    pipe.load_textual_inversion(str(first / "emb.pt"), token="sks")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[VOCAB], saved["emb_params"][0])
    one_d = tmp_path / "one_d.safetensors"
    save_file({"emb_params": saved["emb_params"][0].contiguous()}, str(one_d))
    # learning rate 0: continuing from --weights must give back exactly those vectors
    again = tmp_path / "again"
    train_textual_inversion.main(ti_args(tiny_sd["sd1"]["safetensors"], shapes_data, again, 1, "--weights",
                                         str(one_d), "--learning_rate", "0", "--output_name", "emb"))
    assert_same(saved, torch.load(str(again / "emb.pt"), weights_only=True))


def test_templates_replace_captions(tiny_sd, shapes_data):
    """The dataset's replacement hook gives every sample a random template of the joined tokens."""
    from library.config.dataset_blueprint import dataset_params_from_args
    from library.config.options import build_parser
    from library.data.dataset import build_dataset_group
    from library.models.loading import load_models

    args = build_parser("train_textual_inversion").parse_args(["--train_data_dir", str(shapes_data),
                                                                "--resolution", "64"])
    tok = load_models(str(tiny_sd["sd1"]["safetensors"])).tokenizers[0]
    strings = ti_tokens.token_strings("sks", 3)
    ti_tokens.add_tokens(tok, strings)
    group = build_dataset_group(dataset_params_from_args(args, "train_textual_inversion"), [tok], seed=1,
                                max_train_steps=1, max_token_length=None)
    replacement, prompt = ti_tokens.caption_replacement(strings, False, True)
    group.add_replacement(*replacement)
    group.set_current_epoch(1)
    captions = [c for i in range(len(group)) for c in group[i]["captions"]]
    styles = {t.format("sks sks1 sks2") for t in ti_tokens.STYLE_TEMPLATES}
    assert captions and all(c in styles for c in captions)
    assert prompt == ("sks", "sks sks1 sks2")
    assert len(ti_tokens.OBJECT_TEMPLATES) == 27 and len(ti_tokens.STYLE_TEMPLATES) == 19


def test_resume_continues_bit_identically(tiny_sd, shapes_data, tmp_path):
    common = ["--save_every_n_steps", "2", "--save_state", "--num_vectors_per_token", "2"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_textual_inversion.main(ti_args(tiny_sd["sd1"]["safetensors"], shapes_data, straight, 3, *common))
    train_textual_inversion.main(ti_args(tiny_sd["sd1"]["safetensors"], shapes_data, resumed, 3, *common,
                                         "--resume", str(straight / "sks-step00000002-state")))
    assert_same(torch.load(str(straight / "sks.pt"), weights_only=True),
                torch.load(str(resumed / "sks.pt"), weights_only=True))


def test_config_file(tiny_sd, shapes_data, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(ti_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 1, "--use_style_template"),
                       tmp_path / "ti.toml")
    train_textual_inversion.main(["--config_file", str(cfg)])
    assert (out / "sks.pt").exists()


@pytest.mark.parametrize("bad,msg", [
    (["--token_string", "a"], "already exists"),  # every single byte is a CLIP token
    (["--use_object_template", "--use_style_template"], "exclude each other"),
    (["--num_vectors_per_token", "0"], "--num_vectors_per_token"),
    (["--caption_dropout_rate", "0.1"], "--caption_dropout_rate"),  # T has no caption dropout (spec §3)
])
def test_bad_options_exit_2(tiny_sd, shapes_data, tmp_path, capsys, bad, msg):
    with pytest.raises(SystemExit) as e:
        train_textual_inversion.main(ti_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1, *bad))
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sdxl_model_is_refused(shapes_data, tmp_path, capsys):
    fake = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1),
               "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(1)}, str(fake))
    with pytest.raises(SystemExit) as e:
        train_textual_inversion.main(ti_args(fake, shapes_data, tmp_path / "o", 1))
    assert e.value.code == 2 and "sdxl_train_textual_inversion" in capsys.readouterr().err


def test_weights_with_wrong_vector_count_exit_2(tiny_sd, shapes_data, tmp_path, capsys):
    w = tmp_path / "w.safetensors"
    save_file({"emb_params": torch.zeros(3, 32)}, str(w))
    with pytest.raises(SystemExit) as e:
        train_textual_inversion.main(ti_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1,
                                             "--weights", str(w)))
    assert e.value.code == 2 and "--weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
