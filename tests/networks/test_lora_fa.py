"""networks.lora_fa: LoRA's file layout and forward, with the down projection frozen at its N(0, 2/(in+r)) draw."""
from __future__ import annotations

import math

import torch

import networks.lora as lora
import networks.lora_fa as lora_fa

from .helpers import text_encoder_arg, token_ids, unet_inputs


def test_same_names_and_shapes_as_lora(tiny):
    models = tiny("sd1")
    fa = lora_fa.create_network(1.0, 4, 2.0, None, text_encoder_arg(models), models.unet, conv_dim="2")
    plain = lora.create_network(1.0, 4, 2.0, None, text_encoder_arg(models), models.unet, conv_dim="2")
    assert {k: v.shape for k, v in fa.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_only_up_trains_and_down_keeps_its_draw(tiny):
    models = tiny("sd1")
    torch.manual_seed(0)
    net = lora_fa.create_network(1.0, 4, 4.0, None, text_encoder_arg(models), models.unet)
    net.apply_to(text_encoder_arg(models), models.unet)
    groups = net.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    trained = [p for g in groups for p in g["params"]]
    ups = [m.lora_up.weight for m in net.text_encoder_loras + net.unet_loras]
    assert len(trained) == len(ups) and all(any(p is u for u in ups) for p in trained)
    downs = {m.lora_name: m.lora_down.weight.detach().clone() for m in net.text_encoder_loras + net.unet_loras}

    opt = torch.optim.AdamW(groups)
    for _ in range(2):
        ctx = models.text_encoders[0](token_ids(2, 77)).last_hidden_state
        args, kwargs = unet_inputs(models)
        loss = models.unet(args[0], args[1], ctx, **kwargs).sample.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    for m in net.text_encoder_loras + net.unet_loras:
        assert torch.equal(m.lora_down.weight, downs[m.lora_name]) and m.lora_down.weight.grad is None
    assert any(m.lora_up.weight.abs().sum() > 0 for m in net.unet_loras)


def test_down_init_is_the_papers_normal():
    layer = torch.nn.Linear(2048, 64)
    torch.manual_seed(0)
    m = lora_fa.LoRAFAModule("lora_unet_x", layer, lora_dim=16)
    std = float(m.lora_down.weight.std())
    assert abs(std - math.sqrt(2.0 / (2048 + 16))) < 0.02 * std
    assert float(m.lora_up.weight.detach().abs().sum()) == 0.0


def test_max_norm_scales_up_only(tiny):
    layer = torch.nn.Linear(6, 5)
    m = lora_fa.LoRAFAModule("lora_unet_x", layer, lora_dim=2, alpha=2.0)
    with torch.no_grad():
        m.lora_up.weight.fill_(3.0)
    down = m.lora_down.weight.detach().clone()
    net = torch.nn.Module()
    net.text_encoder_loras, net.unet_loras = [], [m]
    keys, _, max_norm = lora.LoRANetwork.apply_max_norm_regularization(net, 0.5, "cpu")
    assert keys == 1 and torch.equal(m.lora_down.weight, down)
    assert abs(float((m.lora_up.weight @ m.lora_down.weight).detach().norm()) - 0.5) < 1e-5 and abs(max_norm - 0.5) < 1e-5
