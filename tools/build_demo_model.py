#!/usr/bin/env python
"""Assemble the untrained base model of the shapes demo as one SD1 LDM ``.safetensors`` file.

    python tools/build_demo_model.py --vae models/shapes_vae --out models/shapes-sd1-init.safetensors

Parts: the trained tiny VAE (a Diffusers folder written by tools/train_tiny_vae.py), a fresh tiny SD1
U-Net (random init, trained afterwards with fine_tune.py) and a tiny random CLIP text encoder (it stays
frozen: the U-Net learns to read its outputs), with the real SD1 tokenizer. GroupNorm group counts other
than 32 are recorded in the file's metadata (``sdt.unet.norm_num_groups`` / ``sdt.vae.norm_num_groups``)
and read back by the loader.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise UserError(f"--{name} {text!r}: want a comma list of integers") from None


def unet_config(channels: tuple[int, ...], layers_per_block: int, norm_groups: int, context_dim: int,
                attn_levels: int) -> dict:
    """A tiny SD1 U-Net: cross-attention on the first ``attn_levels`` levels (SD1: all but the last)."""
    n = len(channels)
    down = tuple("CrossAttnDownBlock2D" if i < attn_levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if i < attn_levels else "UpBlock2D" for i in reversed(range(n)))
    return dict(sample_size=8, block_out_channels=channels, layers_per_block=layers_per_block,
                down_block_types=down, up_block_types=up, cross_attention_dim=context_dim,
                attention_head_dim=8, norm_num_groups=norm_groups)


def unmix_text_encoder(te) -> None:
    """Zero every residual branch (attention out_proj, MLP fc2) so token i's output is
    LayerNorm(token_embedding + position_embedding): it no longer depends on the other words.

    Why: with a random, frozen, causal encoder the vector of ``circle`` in ``a red circle`` depends on
    ``red``, and the padding tokens after the prompt summarise the whole prompt, so a U-Net trained on 20
    colour x shape pairs memorises pairs and cannot draw an unseen pair. With separate word vectors it
    composes. The weights are still an ordinary CLIP text encoder (any loader reads them), and a LoRA on
    the text encoder can learn mixing again (out_proj / fc2 have gradients)."""
    import torch

    with torch.no_grad():
        for layer in te.text_model.encoder.layers if hasattr(te, "text_model") else te.encoder.layers:
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()


def build(vae_dir: str, out: str, seed: int = 0, channels=(32, 64, 64), layers_per_block: int = 1,
          norm_groups: int = 8, text_width: int = 32, text_layers: int = 3, attn_levels: int | None = None,
          dtype: str = "fp32", text_mixing: str = "none"):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from library.models.bundle import SDModels
    from library.models.saving import save_ldm_checkpoint
    from library.models.tiny import _text_config
    from library.models.tokenizers import load_tokenizers

    if any(c % 8 for c in channels) or any(c % norm_groups for c in channels):
        raise UserError(f"--unet_channels {channels}: each must be a multiple of 8 and of --norm_groups")
    try:
        vae = AutoencoderKL.from_pretrained(vae_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"--vae {vae_dir}: not a Diffusers AutoencoderKL folder ({e})") from None
    torch.manual_seed(seed)
    attn_levels = len(channels) - 1 if attn_levels is None else attn_levels
    unet = UNet2DConditionModel(**unet_config(tuple(channels), layers_per_block, norm_groups, text_width, attn_levels))
    te = CLIPTextModel(_text_config(text_width, text_layers, "quick_gelu"))
    if text_mixing == "none":
        unmix_text_encoder(te)
    for m in (unet, vae, te):
        m.eval()
    models = SDModels("sd1", unet, vae, [te], load_tokenizers("sd1"))
    save_ldm_checkpoint(models, out, dtype=torch.float16 if dtype == "fp16" else None,
                        metadata={"sdt.demo": "shapes base model (untrained U-Net)"})
    return models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="trained tiny VAE, Diffusers folder (tools/train_tiny_vae.py --out)")
    p.add_argument("--out", required=True, help="output .safetensors (LDM single file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random U-Net and text encoder (default 0)")
    p.add_argument("--unet_channels", default="32,64,64", help="U-Net block_out_channels (default %(default)s)")
    p.add_argument("--layers_per_block", type=int, default=1, help="U-Net layers per block (default 1)")
    p.add_argument("--attn_levels", type=int, default=None,
                   help="levels with cross-attention, from the top (default: all but the last, like SD1)")
    p.add_argument("--norm_groups", type=int, default=8, help="U-Net GroupNorm groups (default 8)")
    p.add_argument("--text_width", type=int, default=32, help="CLIP text encoder width = cross_attention_dim (default 32)")
    p.add_argument("--text_layers", type=int, default=3, help="CLIP text encoder layers (default 3)")
    p.add_argument("--text_mixing", choices=["none", "random"], default="none",
                   help="none (default): text encoder outputs depend on each word alone (residual branches "
                        "zeroed), so the U-Net can compose colour and shape; random: a plain random CLIP")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="saved dtype (default fp32)")
    add_logging_arguments(p)
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    if not args.out.lower().endswith(".safetensors"):
        raise UserError(f"--out {args.out}: want a .safetensors file (norm-group metadata needs it)")
    m = build(args.vae, args.out, args.seed, _ints(args.unet_channels, "unet_channels"), args.layers_per_block,
              args.norm_groups, args.text_width, args.text_layers, args.attn_levels, args.precision, args.text_mixing)
    n = {k: sum(p.numel() for p in mod.parameters()) for k, mod in
         (("unet", m.unet), ("vae", m.vae), ("text_encoder", m.text_encoders[0]))}
    print(f"saved {args.out}: " + ", ".join(f"{k} {v:,}" for k, v in n.items()) + " parameters")


if __name__ == "__main__":
    main()
