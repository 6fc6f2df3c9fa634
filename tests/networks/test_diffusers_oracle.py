"""Independent oracle: diffusers' own kohya-LoRA loader must read our files and compute what we compute.

A pipeline from the tiny Diffusers folder loads our saved LoRA with ``load_lora_weights`` (diffusers'
kohya -> PEFT conversion); its U-Net and text encoder(s) must match our network applied at
multiplier 1 on our own copy of the same weights, and every one of our modules must become a PEFT layer.
"""
from __future__ import annotations

import logging
import types

import pytest
import torch

import networks.lora as lora
from tools.make_tiny_model import write_tiny_model

from .helpers import randomize_up, token_ids, unet_inputs


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    return {fam: write_tiny_model(fam, root, formats=("diffusers",))["diffusers"] for fam in ("sd1", "sd2", "sdxl")}


def _our_models(folder, family):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    tes = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")]
    if family == "sdxl":
        tes.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))
    return unet, tes


def _peft_layer_count(module) -> int:
    return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0)


@pytest.mark.parametrize("family, conv_dim", [("sd1", None), ("sd1", "3"), ("sd2", None), ("sd2", "3"),
                                              ("sdxl", None), ("sdxl", "3")])
def test_diffusers_load_lora_weights_matches(folders, tmp_path, caplog, family, conv_dim):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = str(folders[family])
    unet, tes = _our_models(folder, family)
    te_arg = tes if family == "sdxl" else tes[0]
    kwargs = {"conv_dim": conv_dim, "conv_alpha": "1.5"} if conv_dim else {}
    net = lora.create_network(1.0, 4, 2.0, None, te_arg, unet, **kwargs)
    randomize_up(net, seed=3)
    net.apply_to(te_arg, unet)
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path), None, {"ss_network_dim": "4"})

    pipe_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = pipe_cls.from_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    problems = [r.getMessage() for r in caplog.records if "unexpected" in r.getMessage().lower()
                or "not found" in r.getMessage().lower() or "missing" in r.getMessage().lower()]
    assert not problems
    pipe_tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    assert _peft_layer_count(pipe.unet) == len(net.unet_loras)
    assert sum(_peft_layer_count(te) for te in pipe_tes) == len(net.text_encoder_loras)

    args, kw = unet_inputs(types.SimpleNamespace(unet=unet))
    with torch.no_grad():
        ours, theirs = unet(*args, **kw).sample, pipe.unet(*args, **kw).sample
        net.set_multiplier(0.0)
        base = unet(*args, **kw).sample
        te_base = [te(token_ids()).last_hidden_state for te in tes]
        net.set_multiplier(1.0)
        assert (ours - base).abs().max() > 1e-3
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        for te, pipe_te, before in zip(tes, pipe_tes, te_base):
            mine = te(token_ids()).last_hidden_state
            assert (mine - before).abs().max() > 1e-3
            torch.testing.assert_close(pipe_te(token_ids()).last_hidden_state, mine, rtol=0, atol=1e-5)
