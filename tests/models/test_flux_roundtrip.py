"""FLUX.1 conversion: BFL files <-> Diffusers folder, bit-exact; diffusers' and transformers' loaders as oracles."""
import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import convert_model
from library.models.flux_loading import load_clip_l, load_flux_ae, load_flux_models, load_t5xxl
from tests.models.helpers import assert_state_dicts_equal


def _files(paths) -> list[str]:
    return ["--ae", str(paths["ae"]), "--clip_l", str(paths["clip_l"]), "--t5xxl", str(paths["t5xxl"]),
            "--tokenizer_cache_dir", str(paths["tokenizer_cache_dir"])]


def _assert_files_equal(a, b):
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))[:5]
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:3]


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_bfl_file_to_diffusers_and_back_is_bit_exact(tiny_flux, tmp_path, name):
    paths = tiny_flux[name]
    folder, back = tmp_path / "diffusers", tmp_path / "back.safetensors"
    convert_model.main([str(paths["transformer"]), str(folder), "--use_safetensors", *_files(paths)])
    convert_model.main([str(folder), str(back)])
    _assert_files_equal(paths["transformer"], back)


@pytest.mark.parametrize("name", ["dev", "schnell"])
@torch.no_grad()
def test_diffusers_pipeline_loads_our_folder(tiny_flux, tmp_path, name):
    """FluxPipeline.from_pretrained reads the folder convert_model writes; every part equals our file loaders."""
    paths = tiny_flux[name]
    folder = tmp_path / "diffusers"
    convert_model.main([str(paths["transformer"]), str(folder), "--use_safetensors", *_files(paths)])
    pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True)
    ours = load_flux_models(str(paths["transformer"]), ae=str(paths["ae"]), clip_l=str(paths["clip_l"]),
                            t5xxl=str(paths["t5xxl"]), tokenizer_cache_dir=str(paths["tokenizer_cache_dir"]))
    for mine, theirs in ((ours.transformer, pipe.transformer), (ours.ae, pipe.vae), (ours.clip_l, pipe.text_encoder),
                         (ours.t5xxl, pipe.text_encoder_2)):
        assert_state_dicts_equal(mine, theirs)
    assert pipe.transformer.config.guidance_embeds == (name == "dev")
    assert pipe.tokenizer_2("a red circle").input_ids == ours.tokenizers[1]("a red circle").input_ids
    # the whole pipeline runs on the tiny parts (a smoke check of the folder, not of our sampler)
    out = pipe("a red circle", height=32, width=32, num_inference_steps=1, max_sequence_length=8, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_written_folder_loads_as_the_files(tiny_flux, name):
    """Both tiny layouts are the same weights: the folder through our folder path, the files through ours."""
    paths = tiny_flux[name]
    a = load_flux_models(str(paths["diffusers"]))
    b = load_flux_models(str(paths["transformer"]), ae=str(paths["ae"]), clip_l=str(paths["clip_l"]),
                         t5xxl=str(paths["t5xxl"]), tokenizer_cache_dir=str(paths["tokenizer_cache_dir"]))
    for (_, x), (_, y) in zip(a.parts(), b.parts()):
        assert_state_dicts_equal(x, y)
    assert a.name == b.name == name and a.is_schnell == (name == "schnell")


def test_ae_matches_diffusers_single_file_loader(tiny_flux):
    paths = tiny_flux["dev"]
    theirs = AutoencoderKL.from_single_file(str(paths["ae"]), config=str(paths["diffusers"]), subfolder="vae",
                                            local_files_only=True)
    ours = load_flux_ae(str(paths["ae"]))
    assert_state_dicts_equal(ours, theirs)
    assert (ours.config.latent_channels, ours.config.scaling_factor, ours.config.shift_factor) == (16, 0.3611, 0.1159)
    assert not ours.config.use_quant_conv and not ours.config.use_post_quant_conv


def test_text_encoder_files_and_folders_agree(tiny_flux):
    """CLIP-L and T5 files (as sd-scripts' clip_l / t5xxl_fp16 files) load as transformers loads the folder."""
    paths = tiny_flux["dev"]
    assert_state_dicts_equal(load_clip_l(str(paths["clip_l"])), load_clip_l(str(paths["diffusers"])))
    t5 = load_t5xxl(str(paths["t5xxl"]))
    assert_state_dicts_equal(t5, load_t5xxl(str(paths["diffusers"])))
    stored = load_file(str(paths["t5xxl"]))
    assert "encoder.embed_tokens.weight" not in stored  # stored once, as HF saves drop the tied copy
    assert t5.encoder.embed_tokens.weight is t5.shared.weight


def test_save_precision_applies_to_the_bfl_file(tiny_flux, tmp_path):
    out = tmp_path / "half.safetensors"
    convert_model.main([str(tiny_flux["dev"]["transformer"]), str(out), "--save_precision_as", "bf16",
                        "--metadata", "{'title': 'tiny'}"])
    src, half = load_file(str(tiny_flux["dev"]["transformer"])), load_file(str(out))
    assert src.keys() == half.keys()
    assert all(torch.equal(half[k], src[k].to(torch.bfloat16)) for k in src)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["title"] == "tiny"
