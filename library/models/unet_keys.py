"""U-Net and VAE key tables: Diffusers module paths <-> original (LDM) paths (spec file-formats §f)."""
from __future__ import annotations

from typing import Iterable, Mapping

from .key_rules import KeyRule, check_bijective, rules_from_renamer

_RESNET_INNER = {  # Diffusers ResnetBlock2D -> LDM ResBlock
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_VAE_RESNET_INNER = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN_INNER = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_block_map(config: Mapping) -> dict[str, tuple[str, str]]:
    """Diffusers block prefix -> (LDM block prefix, block kind) for a U-Net config.

    Works for any number of levels and ``layers_per_block`` (tiny test models use the real layout).
    """
    lpb = config["layers_per_block"]
    n = len(config["block_out_channels"])
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    m: dict[str, tuple[str, str]] = {
        "time_embedding.linear_1": ("time_embed.0", "plain"), "time_embedding.linear_2": ("time_embed.2", "plain"),
        "conv_in": ("input_blocks.0.0", "plain"), "conv_norm_out": ("out.0", "plain"), "conv_out": ("out.2", "plain"),
        "add_embedding.linear_1": ("label_emb.0.0", "plain"), "add_embedding.linear_2": ("label_emb.0.2", "plain"),
        "mid_block.resnets.0": ("middle_block.0", "resnet"), "mid_block.attentions.0": ("middle_block.1", "plain"),
        "mid_block.resnets.1": ("middle_block.2", "resnet"),
    }
    for i in range(n):
        for j in range(lpb):
            idx = (lpb + 1) * i + j + 1
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{idx}.0", "resnet")
            if down_attn[i]:
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{idx}.1", "plain")
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(lpb + 1) * (i + 1)}.0.op", "plain")
        for j in range(lpb + 1):
            idx = (lpb + 1) * i + j
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{idx}.0", "resnet")
            if up_attn[i]:
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{idx}.1", "plain")
        if i < n - 1:
            # the upsampler sits after the attention when the block has one: `.2.conv`, else `.1.conv`
            m[f"up_blocks.{i}.upsamplers.0.conv"] = (
                f"output_blocks.{(lpb + 1) * i + lpb}.{2 if up_attn[i] else 1}.conv", "plain")
    return m


def _split_prefix(key: str, block_map: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in block_map:
            return head, ".".join(parts[cut:])
    return None


def _rename_inner(rest: str, inner: Mapping[str, str]) -> str:
    for src in sorted(inner, key=len, reverse=True):
        if rest.startswith(src + "."):
            return inner[src] + rest[len(src):]
    return rest


def unet_rules(model_keys: Iterable[str], config: Mapping) -> list[KeyRule]:
    """Rules for every tensor of a Diffusers ``UNet2DConditionModel`` with this config."""
    block_map = unet_block_map(config)

    def rename(k: str) -> str:
        split = _split_prefix(k, block_map)
        if split is None:
            raise KeyError(f"U-Net key {k!r} has no LDM counterpart")
        head, rest = split
        ldm_head, kind = block_map[head]
        if kind == "resnet":
            rest = _rename_inner(rest, _RESNET_INNER)
        return f"{ldm_head}.{rest}"

    # SD2/SDXL files store proj_in/proj_out as 2-D Linear, SD1 as 1x1 conv; the model's own module type
    # decides, and "squeeze" lets a 2-D model read a 4-D file (older SD2 conversions) too.
    def kind_of(k: str) -> str:
        return "squeeze" if (".proj_in.weight" in k or ".proj_out.weight" in k) and config.get("use_linear_projection") else "copy"

    rules = rules_from_renamer(model_keys, rename, kind_of)
    check_bijective(rules)
    return rules


def vae_block_map(config: Mapping) -> dict[str, tuple[str, str]]:
    """Diffusers AutoencoderKL block prefix -> (LDM prefix, kind)."""
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    m: dict[str, tuple[str, str]] = {
        "encoder.conv_in": ("encoder.conv_in", "plain"), "encoder.conv_out": ("encoder.conv_out", "plain"),
        "encoder.conv_norm_out": ("encoder.norm_out", "plain"),
        "decoder.conv_in": ("decoder.conv_in", "plain"), "decoder.conv_out": ("decoder.conv_out", "plain"),
        "decoder.conv_norm_out": ("decoder.norm_out", "plain"),
        "quant_conv": ("quant_conv", "plain"), "post_quant_conv": ("post_quant_conv", "plain"),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", "resnet")
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", "resnet")
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", "attn")
    for i in range(n):
        for j in range(lpb):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", "resnet")
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", "plain")
        # decoder levels are numbered from the bottom in LDM
        for j in range(lpb + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", "resnet")
        if i < n - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", "plain")
    return m


def vae_rules(model_keys: Iterable[str], config: Mapping) -> list[KeyRule]:
    """Rules for every tensor of a Diffusers ``AutoencoderKL``; attention q/k/v/proj_out are 1x1 convs in LDM."""
    block_map = vae_block_map(config)
    rules = []
    for k in model_keys:
        split = _split_prefix(k, block_map)
        if split is None:
            raise KeyError(f"VAE key {k!r} has no LDM counterpart")
        head, rest = split
        ldm_head, kind = block_map[head]
        if kind == "resnet":
            rest = _rename_inner(rest, _VAE_RESNET_INNER)
        elif kind == "attn":
            rest = _rename_inner(rest, _VAE_ATTN_INNER)
        rule_kind = "conv1x1" if kind == "attn" and rest.endswith(".weight") and not rest.startswith("norm.") else "copy"
        rules.append(KeyRule((k,), f"{ldm_head}.{rest}", rule_kind))
    check_bijective(rules)
    return rules
