"""Regional LoRA (networks/lora_regional.py) against sd-scripts v0.8.7's formulas written out here by hand:
the mask size table, an all-zero region = the whole image, module roles by name, masked deltas, the
cross-attention query repeat and mask-weighted blend of the sub-prompts, and the text-encoder LoRA per sub-prompt.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

import networks.lora as lora
from networks.lora_modules import LoRAModule
from networks.lora_regional import RegionState, build_mask_table, mask_sizes, module_role, region_mask

from .helpers import randomize_up, token_ids


def test_mask_size_table_written_out():
    assert mask_sizes(512, 512) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    # 200x120 -> latent 15x25: odd sizes add the even size, halving rounds up
    assert mask_sizes(200, 120) == [(15, 25), (16, 26), (8, 13), (8, 14), (4, 7), (4, 8), (2, 4)]
    # Deep Shrink adds int(size * ratio) after each level
    assert mask_sizes(512, 512, 0.5) == [(64, 64), (32, 32), (32, 32), (16, 16), (16, 16), (8, 8), (8, 8), (4, 4)]


def test_mask_table_is_bilinear_resize_keyed_by_area():
    mask = torch.zeros(16, 24)
    mask[:, :12] = 1.0
    # latent 4x6; 2x3 (+2x4, odd); 1x2 (+2x2); 1x1 (+2x2)
    table = build_mask_table(mask, 48, 32, torch.float32, "cpu")
    assert sorted(table) == [1, 2, 4, 6, 8, 24]
    # align_corners=False bilinear 16x24 -> 4x6: output column x samples source (x + 0.5)·4 − 0.5, i.e. between
    # columns 9-10 (all 1) for x = 2 and 13-14 (all 0) for x = 3
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]] * 4)
    torch.testing.assert_close(table[24][0, 0], expected)
    assert table[24].shape == (1, 1, 4, 6)


def test_all_zero_region_means_whole_image(tiny):
    torch.testing.assert_close(region_mask(torch.zeros(8, 8)), torch.ones(8, 8))
    half = torch.zeros(8, 8)
    half[:4] = 0.5
    torch.testing.assert_close(region_mask(half), half)
    models = tiny("sd1")
    net = lora.create_network(1.0, 4, 4.0, None, models.text_encoders[0], models.unet)
    net.set_region(0, True, torch.zeros(64, 64))
    assert all(bool((m.region.mask == 1).all()) for m in net.unet_loras)


@pytest.mark.parametrize("name, role", [
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text"),  # SDXL (upstream misses it: docs/gen_img.md)
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "sub_prompt"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", "sub_prompt"),
    ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "plain"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q", "query"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0", "out"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "regional"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "regional"),
])
def test_module_roles_by_name(name, role):
    assert module_role(name) == role


def _lora(name: str, org: nn.Module, seed: int, multiplier: float = 0.8) -> LoRAModule:
    torch.manual_seed(seed)
    m = LoRAModule(name, org, multiplier=multiplier, lora_dim=2, alpha=1.0)
    with torch.no_grad():
        m.lora_up.weight.normal_()
    m.apply_to()
    return m


def _delta(m: LoRAModule, x: torch.Tensor) -> torch.Tensor:
    """up(down(x)) · multiplier · alpha/rank, for a Linear module, by hand."""
    return x @ m.lora_down.weight.T @ m.lora_up.weight.T * m.multiplier * (1.0 / 2)


def _states(masks, batch, n_sub, width, height):
    shared = {}
    states = []
    for i, mask in enumerate(masks):
        s = RegionState(i, i == len(masks) - 1, region_mask(mask))
        s.set_generation(batch, n_sub, width, height, shared, torch.float32, "cpu")
        states.append(s)
    return states


def test_conv_and_time_emb_deltas():
    """Conv deltas times the mask at the activation's size; areas without a table entry 1/N; time_emb unmasked."""
    mask = torch.zeros(32, 32)
    mask[:, :16] = 1.0
    (state,) = _states([mask], 2, 2, 64, 64)  # table: 8x8, 4x4, 2x2, 1x1
    conv = nn.Conv2d(3, 4, 3, padding=1)
    m = _lora("lora_unet_down_blocks_0_resnets_0_conv1", conv, 0)
    m.region = state
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        base = F.conv2d(x, conv.weight, conv.bias, padding=1)
        delta = F.conv2d(F.conv2d(x, m.lora_down.weight, padding=1), m.lora_up.weight) * 0.8 * 0.5
        m8 = F.interpolate(mask[None, None], (8, 8), mode="bilinear")
        torch.testing.assert_close(conv(x), base + delta * m8, rtol=1e-5, atol=1e-5)
        x5 = torch.randn(2, 3, 5, 5)  # area 25 is not in the table: delta / N
        base5 = F.conv2d(x5, conv.weight, conv.bias, padding=1)
        delta5 = F.conv2d(F.conv2d(x5, m.lora_down.weight, padding=1), m.lora_up.weight) * 0.8 * 0.5
        torch.testing.assert_close(conv(x5), base5 + delta5 / 2, rtol=1e-5, atol=1e-5)
    lin = nn.Linear(5, 6)
    t = _lora("lora_unet_down_blocks_0_resnets_0_time_emb_proj", lin, 1)
    t.region = state
    e = torch.randn(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(lin(e), F.linear(e, lin.weight, lin.bias) + _delta(t, e), rtol=1e-5, atol=1e-5)


def _hand_attention(q, k, v, heads):
    """softmax(q kᵀ / √d) v per head, rows paired one to one."""
    b, tq, c = q.shape
    d = c // heads
    qh = q.reshape(b, tq, heads, d).transpose(1, 2)
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.reshape(b, v.shape[1], heads, d).transpose(1, 2)
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ vh).transpose(1, 2).reshape(b, tq, c)


@pytest.mark.parametrize("batch, n_sub", [(1, 2), (2, 3)])
def test_cross_attention_blend_matches_upstream(batch, n_sub):
    """Two networks on a cross-attention: query LoRAs masked then repeated per sub-prompt (last network), key/value
    LoRAs on their own sub-prompt's context rows, outputs blended Σ m_k·o_k/(Σm + 1e-4) + Σ m_k·Δout_k; a third
    sub-prompt without a network has mask 0; uncond rows keep the plain output (no out LoRA)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, bias=False)
    attn.set_processor(AttnProcessor2_0())
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_"
    layers = {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out_0": attn.to_out[0]}
    masks = [torch.zeros(32, 32), torch.zeros(32, 32)]
    masks[0][:, :20] = 1.0
    masks[1][:, 12:] = 0.5
    states = _states(masks, batch, n_sub, 32, 32)  # latent 4x4: 16 query tokens
    nets = []
    for j, state in enumerate(states):  # network order = hook order, as networks are applied in order
        mods = {key: _lora(prefix + key, layer, seed=10 * j + i) for i, (key, layer) in enumerate(layers.items())}
        for m in mods.values():
            m.region = state
        nets.append(mods)
    h = torch.randn(2 * batch, 16, 8)  # [uncond (B), cond (B)]
    ctx = torch.randn(batch + batch * n_sub, 5, 6)  # [uncond (B), sub-prompts (B·N)]
    with torch.no_grad():
        got = attn(h, encoder_hidden_states=ctx)
        m_tok = [F.interpolate(states[j].mask[None, None], (4, 4), mode="bilinear").reshape(1, 16, 1)
                 for j in range(2)]
        q = F.linear(h, attn.to_q.weight) + sum(m_tok[j] * _delta(nets[j]["to_q"], h) for j in range(2))
        q_rows = [q[i] for i in range(batch)] + [q[batch + i] for i in range(batch) for _ in range(n_sub)]
        q = torch.stack(q_rows)
        k = F.linear(ctx, attn.to_k.weight)
        v = F.linear(ctx, attn.to_v.weight)
        for i in range(batch):
            for j in range(2):  # sub-prompt j of image i: network j's key/value LoRA
                r = batch + i * n_sub + j
                k[r] = k[r] + _delta(nets[j]["to_k"], ctx[r])
                v[r] = v[r] + _delta(nets[j]["to_v"], ctx[r])
        a = _hand_attention(q, k, v, heads=2)
        o = F.linear(a, attn.to_out[0].weight, attn.to_out[0].bias)
        zero = torch.zeros_like(m_tok[0])
        mk = [m_tok[0], m_tok[1]] + [zero] * (n_sub - 2)
        total = sum(mk) + 1e-4
        rows = [o[i] for i in range(batch)]
        for i in range(batch):
            mixed = sum(mk[j][0] * o[batch + i * n_sub + j] for j in range(n_sub)) / total[0]
            mixed = mixed + sum(mk[j][0] * _delta(nets[j]["to_out_0"], a[batch + i * n_sub + j]) for j in range(2))
            rows.append(mixed)
        expected = torch.stack(rows)
    assert got.shape == h.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _merged_text_encoder(te, net):
    """A copy of the text encoder with ``W + m·(α/r)·up@down`` of every text-encoder module, by hand."""
    merged = copy.deepcopy(te)
    names = dict(merged.named_modules())
    for m in net.text_encoder_loras:
        path = next(n for n, mod in te.named_modules() if mod is m.org_module)
        with torch.no_grad():
            names[path].weight += m.multiplier * m.scale * (m.lora_up.weight @ m.lora_down.weight)
    return merged


def test_text_encoder_lora_per_sub_prompt(tiny):
    """Rows [negative, image 0 sub 0, sub 1, sub 2, image 1 ...]: network k's text-encoder LoRA acts on sub-prompt
    k only; negatives and sub-prompts without a network see the plain encoder."""
    models = tiny("sd1")
    te = models.text_encoders[0]
    plain = copy.deepcopy(te)
    nets = []
    for j in range(2):
        net = lora.create_network(0.9, 4, 4.0, None, te, models.unet)
        randomize_up(net, seed=j, std=0.3)
        nets.append(net)
    merged = [_merged_text_encoder(te, net) for net in nets]
    for j, net in enumerate(nets):
        net.apply_to(te, models.unet)
        net.set_region(j, j == 1, torch.ones(64, 64))
        net.set_current_generation(2, 3, 64, 64, {})
    ids = token_ids(batch=2 + 6, seed=3)
    with torch.no_grad():
        got = te(ids).last_hidden_state
        for r in range(ids.shape[0]):
            sub = (r - 2) % 3 if r >= 2 else None
            oracle = merged[sub] if sub in (0, 1) else plain
            torch.testing.assert_close(got[r], oracle(ids[r:r + 1]).last_hidden_state[0], rtol=1e-4, atol=1e-5)
    for net in nets:  # leaving regional mode: both networks on every row again
        net.set_region(0, True, None)
    with torch.no_grad():
        assert not torch.allclose(te(ids).last_hidden_state[0], plain(ids[:1]).last_hidden_state[0])
