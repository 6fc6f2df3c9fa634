"""networks.dylora against formulas written out here: per-unit gradients at the drawn rank, the sqrt(dim/(b+unit))
factor, a plain LoRA outside training, LoRA's file layout, and the cut of networks/extract_lora_from_dylora.py."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import networks.dylora as dylora
import networks.lora as lora
from library.errors import UserError
from networks import extract_lora_from_dylora

from .helpers import text_encoder_arg


def _module(org, dim=4, alpha=2.0, unit=2):
    torch.manual_seed(0)
    m = dylora.DyLoRAModule("lora_unet_x", org, lora_dim=dim, alpha=alpha, unit=unit)
    with torch.no_grad():
        for b in m.lora_B:
            b.normal_()
    m.apply_to()
    return m


@pytest.mark.parametrize("drawn, rank", [(0, 0), (1, 0), (3, 2)])
def test_training_forward_and_which_units_get_gradients(monkeypatch, drawn, rank):
    org = nn.Linear(6, 5)
    m = _module(org)
    monkeypatch.setattr(random, "randint", lambda a, b: drawn)
    m.train()
    x = torch.randn(3, 6)
    down = torch.cat([a.detach() for a in m.lora_A])
    up = torch.cat([b.detach() for b in m.lora_B], 1)
    expected = F.linear(x, org.weight, org.bias) + x @ down.T @ up.T * (2.0 / 4) * math.sqrt(4 / (rank + 2))
    y = org(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    got = [i for i, a in enumerate(m.lora_A) if a.grad is not None]
    assert got == [rank, rank + 1] and [i for i, b in enumerate(m.lora_B) if b.grad is not None] == got


def test_outside_training_it_is_a_plain_lora():
    org = nn.Conv2d(3, 5, 3, padding=1)
    m = _module(org)
    m.eval()
    x = torch.randn(2, 3, 6, 6)
    up, down = m.factors()
    expected = F.conv2d(x, org.weight, org.bias, padding=1) + F.conv2d(F.conv2d(x, down, padding=1), up) * 0.5
    torch.testing.assert_close(org(x), expected, rtol=1e-5, atol=1e-5)


def test_file_layout_is_loras(tiny):
    models = tiny("sd1")
    dy = dylora.create_network(1.0, 4, 2.0, None, text_encoder_arg(models), models.unet, conv_dim="4", unit="2")
    plain = lora.create_network(1.0, 4, 2.0, None, text_encoder_arg(models), models.unet, conv_dim="4",
                                conv_alpha="2")
    assert [(k, v.shape) for k, v in dy.state_dict().items()] == [(k, v.shape) for k, v in plain.state_dict().items()]
    # and back: a state dict loads into the per-unit parameters
    sd = {k: torch.randn_like(v) if k.endswith("weight") else v for k, v in dy.state_dict().items()}
    dy.load_state_dict(sd)
    assert all(torch.equal(sd[k], v) for k, v in dy.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [({"unit": "3"}, "unit=3: must divide the rank 4"),
                                             ({"conv_dim": "2"}, "must equal --network_dim 4"),
                                             ({"rank_dropout": "0.1"}, "rank_dropout: not an option"),
                                             ({"neuron_dropout": 0.1}, "no dropout")])
def test_bad_options_are_named(tiny, kwargs, message):
    models = tiny("sd1")
    with pytest.raises(UserError, match=message):
        dylora.create_network(1.0, 4, 1.0, None, text_encoder_arg(models), models.unet, **kwargs)


def test_extracted_lora_is_the_first_units(tiny, tmp_path):
    models = tiny("sd1")
    net = dylora.create_network(1.0, 6, 3.0, None, text_encoder_arg(models), models.unet, unit="2")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    src = tmp_path / "dy.safetensors"
    net.save_weights(str(src), None, {"ss_network_dim": "6", "ss_training_comment": "c"})
    written = extract_lora_from_dylora.main(["--model", str(src), "--save_to", str(tmp_path / "cut.safetensors"),
                                             "--unit", "2"])
    assert [p.rsplit("/", 1)[1] for p in written] == ["cut-0002.safetensors", "cut-0004.safetensors"]
    full = load_file(str(src))
    cut = load_file(written[1])
    with safe_open(written[1], "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_training_comment"] == "split from DyLoRA, rank 6 to 4; c"
    assert "sshs_model_hash" in meta

    # the cut applied as a LoRA: W x + up[:, :4] @ down[:4] x · alpha / 4, written out for one U-Net layer
    fresh = tiny("sd1")
    applied, sd = lora.create_network_from_weights(1.0, written[1], None, text_encoder_arg(fresh), fresh.unet)
    applied.apply_to(text_encoder_arg(fresh), fresh.unet)
    applied.load_state_dict(sd)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = next(m.org_module for m in applied.unet_loras if m.lora_name == name)
    x = torch.randn(2, layer.in_features)
    down, up = full[f"{name}.lora_down.weight"][:4], full[f"{name}.lora_up.weight"][:, :4]
    assert torch.equal(cut[f"{name}.lora_down.weight"], down) and float(cut[f"{name}.alpha"]) == 3.0
    expected = F.linear(x, layer.weight, layer.bias) + x @ down.T @ up.T * (3.0 / 4)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_extract_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        extract_lora_from_dylora.main(["--model", str(tmp_path / "none.safetensors"), "--save_to", "x.safetensors",
                                       "--unit", "1"])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
