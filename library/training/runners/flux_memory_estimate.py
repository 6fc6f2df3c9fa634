"""A rough estimate of peak accelerator memory of a FLUX.1 LoRA run for ``--dry_run`` (docs/flux.md).

The model, written out so that users can judge it (the SD model is ``memory_estimate``; its optimizer table is
shared):
* weights, per part, from the safetensors headers (nothing is loaded): the transformer (a BFL file, or a Diffusers
  folder's ``transformer/``, every shard), CLIP-L, T5-XXL and the AE. A header that cannot be read counts as the
  released FLUX.1-dev part, counted once from the released configs by building the models on the meta device.
  Frozen parts are kept in the mixed-precision dtype (float32 with ``--mixed_precision no``), the AE in float32
  with ``--no_half_vae``; ``--fp8_base`` / ``--fp8_base_unet`` keep every 2-D transformer weight (the Linear
  weights) in 1 byte, the rest of the transformer in the training dtype; T5-XXL stays in the training dtype (our
  run does not store it in fp8). Parts parked in CPU memory while training count 0: the AE with
  ``--cache_latents``, T5-XXL with ``--cache_text_encoder_outputs``, CLIP-L too when it does not train
  (``--network_train_unet_only``). The caching itself runs with every part on the device: its peak can be higher.
* ``--blocks_to_swap K``: K // 2 double and (K - K // 2) x 2 single blocks live in CPU memory (sd-scripts' split);
  one block of each swapped kind is added back as the transfer's headroom (the block being brought in).
* the LoRA: rank x (in + out) per adapted layer, from the same header shapes (BFL's fused ``qkv`` / ``linear1``
  are one module); its weights, gradients and optimizer states as in ``memory_estimate``.
* activations, per sample, counted from the architecture (diffusers' blocks with a LoRA, SDPA attention whose
  backward keeps O(tokens) memory): tokens T = (W / 16) x (H / 16) image tokens of the largest bucket + the T5
  tokens (``--t5xxl_max_token_length``, 512 dev / 256 schnell), width D. A double block keeps for backward 20
  tensors of T x D in the activation dtype (its input, the LayerNorm output and the modulated input, q, k and v
  into attention, the attention output, the projected output, the residual, the second LayerNorm and modulation,
  the MLP's 4 D pre-GELU and 4 D post-GELU tensors, the MLP output) plus q and k as float32 copies (the RMS
  norm's upcast): ``DOUBLE_ACT``; a single block 16 + the same 2 float32 (its input, LayerNorm, modulated input,
  the 4 D MLP input, q, k, v, the 5 D concatenation into ``linear2``, its output): ``SINGLE_ACT``.
  tests/training/test_flux_memory_estimate.py measures what autograd keeps (``saved_tensors_hooks``) on a tiny
  FLUX.1 with a LoRA at batch 2: 6% more than these counts (the rank-4 LoRA intermediates weigh more at width
  64, and at batch > 1 each stream's attention output is copied once more), within the test's 10%.
  With ``--gradient_checkpointing`` every block keeps only its input (T x D) and one block is recomputed at a time
  (its full count); without it every block keeps its full count. With fp8 weights each Linear whose input needs
  a gradient also keeps its weight upcast to the training dtype: every block's without checkpointing, one block's
  with it. Not modelled: the embedders and the final layer (a few T x D), gradients in flight, fragmentation.
* fixed: 0.6 GiB for the CUDA context and allocator slack (``memory_estimate.FIXED_BYTES``).
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

from library.models.flux_config import bfl_prefix
from library.models.flux_keys import flux_rules
from library.sampling.flux_text import t5_max_length
from library.training.memory.block_swap import flux_block_split
from library.training.runners.memory_estimate import (DTYPE_BYTES, FIXED_BYTES, OPTIMIZER_STATE_BYTES, _gradient_row,
                                                      _header_shapes, _numel)
from networks.lora_flux_targets import IN_GROUPS, PREFIX_CLIP, PREFIX_FLUX, PREFIX_T5

PARTS = ("transformer", "clip_l", "t5xxl", "ae")
FOLDERS = {"transformer": "transformer", "clip_l": "text_encoder", "t5xxl": "text_encoder_2", "ae": "vae"}
# tensors of T x D each block keeps for backward: (in the activation dtype, always float32); see the docstring
DOUBLE_ACT = (20, 2)
SINGLE_ACT = (16, 2)
MOD_LAYERS = ("img_mod.lin", "txt_mod.lin", "modulation.lin")  # their input (the time embedding) needs no gradient
# the released FLUX.1-dev parts (diffusers / transformers configs), counted on the meta device when a header is absent
FLUX_DEV_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
T5_XXL_CONFIG = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                     tie_word_embeddings=False)
CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
FLUX_AE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                      layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                      use_post_quant_conv=False)
_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.")
_CLIP_LORA = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.\w+\.weight$")
_T5_LORA = re.compile(r"^encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.w[io]\w*)\.weight$")


@dataclass
class FluxShapes:
    """Tensor shapes per part (the transformer in BFL names, without prefix) and whether each came from a file."""

    shapes: dict[str, dict[str, tuple]]
    from_header: dict[str, bool]


# ---------------------------------------------------------------- shapes: headers, else the released sizes

@functools.lru_cache(maxsize=None)
def released_shapes(part: str) -> dict[str, tuple]:
    """Shapes of the released FLUX.1-dev ``part``, from its config built on the meta device (no weights)."""
    import torch  # start-up (torch: ~1 s)

    with torch.device("meta"):
        if part == "transformer":
            from diffusers import FluxTransformer2DModel  # start-up (diffusers: ~2 s)
            sd = FluxTransformer2DModel(**FLUX_DEV_CONFIG).state_dict()
            return _bfl_from_diffusers({k: tuple(v.shape) for k, v in sd.items()})
        if part == "t5xxl":
            from transformers import T5Config, T5EncoderModel  # start-up (transformers: ~1 s)
            model = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
        elif part == "clip_l":
            from transformers import CLIPTextConfig, CLIPTextModel  # start-up (transformers: ~1 s)
            model = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        else:
            from diffusers import AutoencoderKL  # start-up (diffusers: ~2 s)
            model = AutoencoderKL(**FLUX_AE_CONFIG)
        return {k: tuple(p.shape) for k, p in model.named_parameters()}  # a tied embedding once, as T5 files


def _bfl_from_diffusers(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Diffusers ``FluxTransformer2DModel`` shapes as the BFL tensors they pack into (fused qkv / linear1)."""
    out = {}
    for rule in flux_rules(shapes):
        first = shapes[rule.model_keys[0]]
        rows = sum(shapes[k][0] for k in rule.model_keys) if len(rule.model_keys) > 1 else first[0]
        out[rule.ldm_key] = (rows, *first[1:])
    return out


def _folder_files(folder: str) -> list[str]:
    """A Diffusers component folder's weight files: the shards its index names, else its one safetensors file."""
    names = sorted(os.listdir(folder))
    for index in (n for n in names if n.endswith(".safetensors.index.json")):
        with open(os.path.join(folder, index), encoding="utf-8") as f:
            return [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    files = [n for n in names if n.endswith(".safetensors")]
    plain = [n for n in files if n in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
    return [os.path.join(folder, n) for n in (plain or files)]


def _part_shapes(part: str, path: Optional[str]) -> Optional[dict[str, tuple]]:
    """One part's shapes from its file or (model or component) folder; None when there is nothing to read."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isdir(path):
        sub = os.path.join(path, FOLDERS[part])
        folder = sub if os.path.isdir(sub) else path
        files = _folder_files(folder)
        if not files:
            return None
        shapes = {k: s for f in files for k, s in _header_shapes(f).items()}
        return _bfl_from_diffusers(shapes) if part == "transformer" else shapes
    if not path.endswith(".safetensors"):
        return None
    shapes = _header_shapes(path)
    if part == "transformer":
        prefix = bfl_prefix(shapes)
        if prefix is None:
            return None
        shapes = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    return shapes


def read_flux_shapes(args) -> FluxShapes:
    """Every part's shapes from ``args``' files (``--clip_l`` etc. override the folder's parts)."""
    model = getattr(args, "pretrained_model_name_or_path", None)
    model = str(model) if model else None
    folder = model if model and os.path.isdir(model) else None
    shapes, found = {}, {}
    for part in PARTS:
        own = getattr(args, part, None) if part != "transformer" else model
        try:
            got = _part_shapes(part, str(own) if own else folder)
        except (OSError, ValueError, KeyError):
            got = None
        found[part] = got is not None
        shapes[part] = got if got is not None else released_shapes(part)
    return FluxShapes(shapes, found)


# ---------------------------------------------------------------- the estimate

def _block_of(key: str) -> Optional[tuple[str, int]]:
    m = _BLOCK.match(key)
    return (m.group(1), int(m.group(2))) if m else None


def transformer_bytes(shapes: dict[str, tuple], wbytes: int, fp8: bool) -> dict:
    """Bytes of the transformer: ``{"double": [per block], "single": [per block], "rest": n}``."""
    out: dict = {"double": {}, "single": {}, "rest": 0}
    for key, shape in shapes.items():
        b = _numel(shape) * (1 if fp8 and len(shape) == 2 else wbytes)
        where = _block_of(key)
        if where is None:
            out["rest"] += b
        else:
            out[where[0]][where[1]] = out[where[0]].get(where[1], 0) + b
    out["double"] = [out["double"][i] for i in sorted(out["double"])]
    out["single"] = [out["single"][i] for i in sorted(out["single"])]
    return out


def lora_params(args, shapes: FluxShapes) -> float:
    """rank x (in + out) over the layers networks.lora_flux adapts, named and ranked as it does from the BFL
    names: block Linears of the kinds and indices ``--network_args`` selects, the embedders with ``in_dims``, CLIP-L
    unless --network_train_unet_only, T5-XXL with ``train_t5xxl``; ``network_reg_dims`` and the ``*_dim`` ranks."""
    from networks.lora_flux_options import parse_block_selection, parse_flux_options  # start-up (networks: torch)

    kwargs = dict(a.split("=", 1) for a in (getattr(args, "network_args", None) or []) if "=" in a)
    opts = parse_flux_options({k.strip(): v.strip() for k, v in kwargs.items()})
    rank = getattr(args, "network_dim", None) or 4
    tshapes = shapes.shapes["transformer"]
    counts = {kind: 1 + max((w[1] for w in map(_block_of, tshapes) if w and w[0] == kind), default=-1)
              for kind in ("double", "single")}
    keep = {"all": ("double", "single"), "double": ("double",), "single": ("single",)}[opts.train_blocks]
    chosen = {kind: [kind in keep] * n for kind, n in counts.items()}
    for kind, selection, key in (("double", opts.double_indices, "train_double_block_indices"),
                                 ("single", opts.single_indices, "train_single_block_indices")):
        if selection is not None and kind in keep:
            chosen[kind] = parse_block_selection(selection, counts[kind], key)
    layers: list[tuple[str, tuple, Optional[int]]] = []  # (lora name, shape, in_dims group)
    if not getattr(args, "network_train_text_encoder_only", False):
        for key, shape in tshapes.items():
            if len(shape) != 2 or not key.endswith(".weight"):
                continue
            module, where = key[: -len(".weight")], _block_of(key)
            group = next((g for g, names in enumerate(IN_GROUPS) if module in names), None)
            if (where and chosen[where[0]][where[1]]) or (not where and group is not None and opts.in_dims):
                layers.append((f"{PREFIX_FLUX}_{module}", shape, None if where else group))
    if not getattr(args, "network_train_unet_only", False):
        layers += [(f"{PREFIX_CLIP}_{k[:-7]}", s, None) for k, s in shapes.shapes["clip_l"].items()
                   if len(s) == 2 and _CLIP_LORA.search(k)]
        if opts.train_t5xxl:
            layers += [(f"{PREFIX_T5}_{k[:-7]}", s, None) for k, s in shapes.shapes["t5xxl"].items()
                       if len(s) == 2 and _T5_LORA.match(k)]
    return float(sum(_rank(name.replace(".", "_"), group, opts, rank) * (s[0] + s[1]) for name, s, group in layers))


def _rank(name: str, group: Optional[int], opts, rank: int) -> int:
    """networks.lora_flux's choice: a matching ``network_reg_dims`` first, then ``in_dims`` for an embedder,
    the ``*_dim`` of a transformer layer's type, else ``--network_dim`` (0: no module)."""
    for pattern, dim in opts.reg_dims:
        if re.search(pattern, name):
            return dim
    if group is not None:
        return opts.in_dims[group]
    if name.startswith(PREFIX_FLUX):
        for parts, dim in opts.type_dims:
            if all(p in name for p in parts):
                return dim
    return rank


def _parked(args) -> dict[str, bool]:
    te_cached = bool(getattr(args, "cache_text_encoder_outputs", False))
    return {"transformer": False, "ae": bool(getattr(args, "cache_latents", False)), "t5xxl": te_cached,
            "clip_l": te_cached and bool(getattr(args, "network_train_unet_only", False))}


def activation_bytes(tokens: int, hidden: int, num_double: int, num_single: int, abytes: int,
                     checkpointing: bool) -> int:
    """Per sample: every block's input with checkpointing plus one block recomputed, else every block in full."""
    double = tokens * hidden * (DOUBLE_ACT[0] * abytes + DOUBLE_ACT[1] * 4)
    single = tokens * hidden * (SINGLE_ACT[0] * abytes + SINGLE_ACT[1] * 4)
    if checkpointing:
        return (num_double + num_single) * tokens * hidden * abytes + max(double, single)
    return num_double * double + num_single * single


def _upcast_weights(shapes: dict[str, tuple], abytes: int, checkpointing: bool) -> int:
    """fp8: the upcast copies of the Linear weights backward keeps (all blocks' or the largest block's)."""
    per_block: dict[tuple[str, int], int] = {}
    for key, shape in shapes.items():
        where = _block_of(key)
        if where and len(shape) == 2 and not any(f".{m}." in f".{key}" for m in MOD_LAYERS):
            per_block[where] = per_block.get(where, 0) + _numel(shape) * abytes
    return (max(per_block.values(), default=0) if checkpointing else sum(per_block.values()))


def estimate_flux(args, image_tokens: int, batch_size: int, shapes: Optional[FluxShapes] = None) -> list[tuple]:
    """``[(label, bytes)]``, the last row the total; ``image_tokens``: (W / 16) x (H / 16) of the largest bucket."""
    shapes = shapes or read_flux_shapes(args)
    mp = getattr(args, "mixed_precision", "no") or "no"
    wbytes = DTYPE_BYTES.get(mp, 4)
    fp8 = bool(getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False))
    parked = _parked(args)
    tshapes = shapes.shapes["transformer"]
    tb = transformer_bytes(tshapes, wbytes, fp8)
    nd, ns = len(tb["double"]), len(tb["single"])
    rows = []
    total_t = tb["rest"] + sum(tb["double"]) + sum(tb["single"])
    n_t = sum(_numel(s) for s in tshapes.values())
    label = f"weights transformer ({n_t / 1e6:.1f}M, {'fp8 Linear weights' if fp8 else f'{wbytes} B'})"
    swap = int(getattr(args, "blocks_to_swap", None) or 0)
    if swap:
        sd, ss = flux_block_split(swap, nd, ns)  # more than the model allows was refused before the dry run
        gone = sum(tb["double"][nd - sd:]) + sum(tb["single"][ns - ss:])
        headroom = (max(tb["double"]) if sd else 0) + (max(tb["single"]) if ss else 0)
        label += f"; --blocks_to_swap {swap}: {sd} double + {ss} single in CPU memory, 1 of each in transfer"
        total_t += headroom - gone
    rows.append((label, total_t))
    for part in ("clip_l", "t5xxl", "ae"):
        n = sum(_numel(s) for s in shapes.shapes[part].values())
        b = 4 if part == "ae" and getattr(args, "no_half_vae", False) else wbytes
        src = "" if shapes.from_header[part] else ", FLUX.1-dev size"
        if parked[part]:
            rows.append((f"weights {part} ({n / 1e6:.1f}M{src}; in CPU memory while training)", 0))
        else:
            rows.append((f"weights {part} ({n / 1e6:.1f}M x {b} B{src})", int(n * b)))
    full16 = getattr(args, "full_fp16", False) or getattr(args, "full_bf16", False)
    trained = lora_params(args, shapes)
    nb = wbytes if full16 else 4
    rows.append((f"weights network ({trained / 1e6:.2f}M x {nb} B)", int(trained * nb)))
    rows.append(_gradient_row(args, trained, nb))
    opt = (getattr(args, "optimizer_type", "") or "AdamW").lower()
    sb = OPTIMIZER_STATE_BYTES.get(opt, 8)
    rows.append((f"optimizer states {opt} ({sb} B per trained value)", int(trained * sb)))
    ckpt = bool(getattr(args, "gradient_checkpointing", False))
    hidden = tshapes["img_in.weight"][0]
    text = t5_max_length(getattr(args, "t5xxl_max_token_length", None),
                         "dev" if "guidance_in.in_layer.weight" in tshapes else "schnell")
    tokens = image_tokens + text
    act = activation_bytes(tokens, hidden, nd, ns, wbytes, ckpt) * batch_size
    rows.append((f"activations (batch {batch_size}, {image_tokens} image + {text} text tokens, width {hidden}, "
                 f"checkpointing {ckpt})", int(act)))
    if fp8:
        rows.append((f"fp8: Linear weights upcast for backward ({'one block' if ckpt else 'every block'})",
                     _upcast_weights(tshapes, wbytes, ckpt)))
    rows.append(("CUDA context and allocator slack", FIXED_BYTES))
    rows.append(("estimated peak", sum(r[1] for r in rows)))
    return rows


def caching_note(args) -> Optional[str]:
    """A line when caching runs with parts on the device that training parks (a higher peak is possible)."""
    parked = [p for p, yes in _parked(args).items() if yes]
    if not parked:
        return None
    return (f"  (while caching, {', '.join(parked)} are on the device as well: before training the peak can be "
            "higher than this)")
