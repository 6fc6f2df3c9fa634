"""FLUX.1 LoRA against diffusers: ``FluxPipeline.load_lora_weights`` reads our files with every key used and
gives our outputs; our loader reads diffusers' own (PEFT) FLUX LoRA files and gives PEFT's outputs.

diffusers' kohya-FLUX converter splits ``single_blocks.N.linear1`` by the released widths (3072 x 3 + 12288), so
on the tiny model the file for diffusers leaves linear1 out (``network_reg_dims`` rank 0, upstream's own option);
the split of linear1 is checked at the released widths on diffusers' converter directly. diffusers 0.42.1 also
drops embedder modules (``in_dims``: its converter writes them without the ``transformer.`` prefix), so the file
for diffusers has none; our loader's handling of them is tested in test_lora_flux.py.
"""
from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

from library.formats.flux_metadata import flux_lora_metadata
from networks import lora_flux
from networks.lora_flux_targets import transformer_targets
from networks.lora_fused import split_rows
from tests.networks.flux_helpers import (assert_same_deltas, pipeline, randomize, run_transformer, save_peft_lora,
                                         tiny_flux_models)

ARGS = dict(network_reg_dims=r"single_blocks_\d+_linear1=0")


@torch.no_grad()
def clip_out(clip_l) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 4])
    return clip_l(ids).last_hidden_state


def test_diffusers_reads_our_file_with_every_key(tmp_path):
    m = tiny_flux_models()
    network = lora_flux.create_network(1.0, 4, 2.0, m.ae, [m.clip_l, m.t5xxl], m.transformer, **ARGS)
    randomize(network)
    path = tmp_path / "ours.safetensors"
    network.save_weights(str(path), None, flux_lora_metadata("dev", 4, 2.0, ARGS, {}))

    # diffusers: every module of the file becomes PEFT layers (a fused one: one per part) with our deltas
    ref = tiny_flux_models()
    pipeline(ref).load_lora_weights(str(path))
    assert_same_deltas(network, ((m.transformer, ref.transformer), (m.clip_l, ref.clip_l)))
    assert len(network.unet_loras) == 2 * 10 + 2 * 2 and len(network.text_encoder_loras) == 18

    # ... and its outputs are ours: hooks on diffusers' layers, and our merge into the weights
    ours = tiny_flux_models()
    net2, sd = lora_flux.create_network_from_weights(1.0, str(path), ours.ae, [ours.clip_l, ours.t5xxl],
                                                     ours.transformer)
    net2.apply_to([ours.clip_l, ours.t5xxl], ours.transformer)
    net2.load_weights(str(path))
    want = run_transformer(ref.transformer)
    assert (want - run_transformer(tiny_flux_models().transformer)).abs().max() > 1e-3
    torch.testing.assert_close(run_transformer(ours.transformer), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clip_out(ours.clip_l), clip_out(ref.clip_l), rtol=1e-4, atol=1e-5)
    merged = tiny_flux_models()
    merger, sd = lora_flux.create_network_from_weights(1.0, str(path), merged.ae, [merged.clip_l, merged.t5xxl],
                                                       merged.transformer)
    merger.merge_to([merged.clip_l, merged.t5xxl], merged.transformer, sd)
    torch.testing.assert_close(run_transformer(merged.transformer), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clip_out(merged.clip_l), clip_out(ref.clip_l), rtol=1e-4, atol=1e-5)


def test_linear1_split_at_released_widths():
    """single_blocks.N.linear1 at 3072 wide: our targets' split equals diffusers' converter's, part by part."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(num_layers=1, num_single_layers=1)
    target = {t.lora_name: t for t in transformer_targets(flux)}["lora_unet_single_blocks_0_linear1"]
    assert [layer.out_features for layer in target.layers] == [3072, 3072, 3072, 12288]
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 3072, generator=gen), torch.randn(21504, 4, generator=gen)
    sd = {"lora_unet_single_blocks_0_linear1.lora_down.weight": down,
          "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
          "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(2.0)}
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    ours = split_rows(up @ down * 0.5, list(target.layers))
    for part, delta in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ours):
        key = f"transformer.single_transformer_blocks.0.{part}"
        torch.testing.assert_close(theirs[f"{key}.lora_B.weight"] @ theirs[f"{key}.lora_A.weight"], delta,
                                   rtol=1e-4, atol=1e-4)


def test_our_loader_reads_diffusers_format(tmp_path):
    """A PEFT LoRA on diffusers' layers (own rank per part, not shared), saved by FluxPipeline.save_lora_weights."""
    ref = tiny_flux_models()
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "attn.add_k_proj", "ff.net.2", "norm1.linear",
               "proj_out", "x_embedder", "context_embedder"]
    targets = [t for t in targets if t != "proj_out"] + ["single_transformer_blocks.0.proj_out"]
    path = save_peft_lora(ref.transformer, targets, tmp_path)
    want = run_transformer(ref.transformer)

    ours = tiny_flux_models()
    assert (want - run_transformer(ours.transformer)).abs().max() > 1e-3
    network, sd = lora_flux.create_network_from_weights(1.0, str(path), ours.ae, [ours.clip_l, ours.t5xxl],
                                                        ours.transformer)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in sd  # fused from to_q, to_k, to_v, proj_mlp
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (9, 64)  # 3 parts x rank 3
    network.apply_to([ours.clip_l, ours.t5xxl], ours.transformer)
    network.load_weights(str(path))
    torch.testing.assert_close(run_transformer(ours.transformer), want, rtol=1e-4, atol=1e-5)

    merged = tiny_flux_models()
    merger, sd = lora_flux.create_network_from_weights(1.0, str(path), merged.ae, [merged.clip_l, merged.t5xxl],
                                                       merged.transformer)
    merger.merge_to([merged.clip_l, merged.t5xxl], merged.transformer, sd)
    torch.testing.assert_close(run_transformer(merged.transformer), want, rtol=1e-4, atol=1e-5)
