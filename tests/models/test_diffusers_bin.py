"""Diffusers folders written with .bin weights (convert_model.py without --use_safetensors) load in diffusers.

Oracle: diffusers' own ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.from_pretrained``, which
finds each part by the file names diffusers and transformers look for; every weight must equal the source.
The text encoders used to be written as ``model.bin``, which transformers does not read.
"""
import pytest
import torch

import convert_model
from library.models.loading import load_models
from tests.models.helpers import all_parts, assert_state_dicts_equal


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_bin_folder_loads_in_diffusers_pipeline(tiny_models, tmp_path, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    src = tiny_models[family]["safetensors"]
    out = tmp_path / "bin"
    convert_model.main([str(src), str(out)])  # no --use_safetensors: .bin files
    names = {p.relative_to(out).as_posix() for p in out.rglob("*.bin")}
    want = {"unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin"}
    if family == "sdxl":
        want.add("text_encoder_2/pytorch_model.bin")
    assert names == want and not list(out.rglob("*.safetensors"))
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(out), torch_dtype=torch.float32)
    ours = load_models(str(src))
    for (name, a), (_, b) in zip(all_parts(ours), all_parts(pipe)):
        assert_state_dicts_equal(a, b)
