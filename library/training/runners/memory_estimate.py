"""A rough estimate of peak accelerator memory for ``--dry_run`` (docs/beyond-sd-scripts.md §4).

The model, documented so that users can judge it (expect +-30%, more with unusual options):
* weights: parameter count x bytes of the dtype each part is kept in (frozen parts in the mixed-precision
  dtype, trained parts in float32 unless --full_fp16/--full_bf16, the VAE in float32 with --no_half_vae,
  the U-Net in 1 byte with --fp8_base). Counts come from the checkpoint's safetensors header (nothing is
  loaded), or from the real SD1/SD2/SDXL sizes for a .ckpt.
* gradients: trained parameters x their dtype; optimizer states: bytes per trained parameter by optimizer
  (AdamW 8, 8-bit Adam 2, Lion 4, SGD 4, Prodigy 16, ...); EMA: 4 bytes per trained parameter on the GPU.
* activations: per sample and per latent pixel (image pixels / 64) 0.9 MiB in 16-bit, 0.27 MiB with
  --gradient_checkpointing, doubled in float32. These factors are back-of-envelope values derived from
  commonly reported VRAM use of SD1.5 LoRA training at 512 px and SDXL at 1024 px with SDPA attention;
  they were NOT measured by this project (no GPU in its CI): treat the activation row as the roughest.
* fixed: 0.6 GiB for the CUDA context and allocator slack.
A network's size is rank x (in + out) over the linear layers of the U-Net's transformer blocks and the
text encoders' attention/MLP layers (kohya LierLa), from the same header.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from safetensors import safe_open

GIB = 2**30
MIB = 2**20
# parameters of the real models (millions): used when a checkpoint's header cannot be read cheaply
KNOWN_PARAMS = {
    "sd1": {"unet": 859.52e6, "text_encoder": 123.06e6, "vae": 83.65e6},
    "sd2": {"unet": 865.91e6, "text_encoder": 340.39e6, "vae": 83.65e6},
    "sdxl": {"unet": 2567.46e6, "text_encoder": 123.06e6, "text_encoder_2": 694.66e6, "vae": 83.65e6},
}
LORA_PARAMS_PER_RANK = {"sd1": 0.59e6, "sd2": 0.63e6, "sdxl": 2.85e6}  # same layers, real models
LDM_PREFIXES = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text_encoder",
                "conditioner.embedders.0.": "text_encoder", "conditioner.embedders.1.": "text_encoder_2"}
DIFFUSERS_FOLDERS = ("unet", "text_encoder", "text_encoder_2", "vae")
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "pagedadamw": 8, "pagedadamw8bit": 2, "pagedadamw32bit": 8,
                         "lion": 4, "lion8bit": 1, "pagedlion8bit": 1, "sgdnesterov": 4, "sgdnesterov8bit": 1,
                         "adafactor": 1, "prodigy": 16, "dadaptation": 12, "dadaptadam": 12, "dadaptlion": 4,
                         "dadaptsgd": 4, "dadaptadagrad": 8, "dadaptadan": 16, "dadaptadanip": 16}
ACT_MIB_PER_LATENT_PIXEL = {False: 0.9, True: 0.27}  # by gradient checkpointing, 16-bit activations
FIXED_BYTES = int(0.6 * GIB)
DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}


@dataclass
class ModelShapes:
    """Parameter counts per component and the LoRA-eligible (in, out) pairs per component."""

    params: dict[str, float]
    lora_pairs: dict[str, list[tuple[int, int]]]
    from_header: bool


def read_shapes(path: Optional[str], family: str) -> ModelShapes:
    """Counts from a .safetensors file or a Diffusers folder's headers; the real sizes otherwise."""
    shapes: dict[str, dict[str, tuple]] = {}
    try:
        if path and os.path.isfile(path) and path.endswith(".safetensors"):
            shapes = _grouped(_header_shapes(path), ldm=True)
        elif path and os.path.isdir(path):
            for folder in DIFFUSERS_FOLDERS:
                files = [f for f in sorted(os.listdir(os.path.join(path, folder)))
                         if f.endswith(".safetensors")] if os.path.isdir(os.path.join(path, folder)) else []
                if files:
                    shapes[folder] = _header_shapes(os.path.join(path, folder, files[0]))
    except (OSError, ValueError):
        shapes = {}
    if not shapes:
        return ModelShapes(dict(KNOWN_PARAMS[family]), {}, False)
    params = {part: float(sum(_numel(s) for s in sd.values())) for part, sd in shapes.items()}
    pairs = {part: [(s[1], s[0]) for k, s in sd.items() if _lora_target(part, k, s)] for part, sd in shapes.items()}
    return ModelShapes(params, pairs, True)


def _header_shapes(path: str) -> dict[str, tuple]:
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _grouped(flat: dict[str, tuple], ldm: bool) -> dict[str, dict[str, tuple]]:
    out: dict[str, dict[str, tuple]] = {}
    for key, shape in flat.items():
        part = next((name for prefix, name in LDM_PREFIXES.items() if key.startswith(prefix)), None)
        if part is not None:
            out.setdefault(part, {})[key] = shape
    return out


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _lora_target(part: str, key: str, shape: tuple) -> bool:
    """Linear (or 1x1 conv) weights of the layers kohya's LierLa LoRA wraps."""
    if not key.endswith("weight") or len(shape) not in (2, 4) or (len(shape) == 4 and shape[2:] != (1, 1)):
        return False
    if part == "unet":
        return "transformer_blocks" in key or "proj_in" in key or "proj_out" in key
    if part.startswith("text_encoder"):
        return any(word in key for word in ("self_attn", "mlp", ".attn.", "in_proj"))
    return False


def estimate(args, family: str, trainer: str, max_latent_pixels: int, batch_size: int) -> list[tuple[str, int]]:
    """``[(label, bytes)]`` per component, the last one the total. ``trainer``: network|full|ti."""
    shapes = read_shapes(getattr(args, "pretrained_model_name_or_path", None), family)
    mp = getattr(args, "mixed_precision", "no") or "no"
    wbytes = DTYPE_BYTES.get(mp, 4)
    full16 = getattr(args, "full_fp16", False) or getattr(args, "full_bf16", False)
    trained = _trained_params(args, family, trainer, shapes)
    rows = []
    for part, n in sorted(shapes.params.items()):
        b = wbytes
        if part == "vae" and getattr(args, "no_half_vae", False):
            b = 4
        elif part == "unet" and getattr(args, "fp8_base", False):
            b = 1
        elif trainer == "full" and part in _full_trained_parts(args, shapes):
            b = wbytes if full16 else 4
        elif trainer == "ti" and part.startswith("text_encoder"):  # SDXL: both encoders' tables train
            b = wbytes if full16 else 4
        rows.append((f"weights {part} ({n / 1e6:.1f}M x {b} B)", int(n * b)))
    if trainer == "network":
        tb = wbytes if full16 else 4
        rows.append((f"weights network ({trained / 1e6:.2f}M x {tb} B)", int(trained * tb)))
    tb = wbytes if full16 else 4
    rows.append(_gradient_row(args, trained, tb))
    opt = (getattr(args, "optimizer_type", "") or "AdamW").lower()
    sb = OPTIMIZER_STATE_BYTES.get(opt, 8)
    rows.append((f"optimizer states {opt} ({sb} B per trained value)", int(trained * sb)))
    if getattr(args, "ema", False) and getattr(args, "ema_device", "gpu") == "gpu":
        rows.append(("EMA (float32)", int(trained * 4)))
    ckpt = bool(getattr(args, "gradient_checkpointing", False))
    act = ACT_MIB_PER_LATENT_PIXEL[ckpt] * MIB * max_latent_pixels * batch_size * (2 if mp == "no" else 1)
    rows.append((f"activations (batch {batch_size}, {max_latent_pixels} latent px, checkpointing {ckpt})", int(act)))
    rows.append(("CUDA context and allocator slack", FIXED_BYTES))
    rows.append(("estimated peak", sum(b for _, b in rows)))
    return rows


def _gradient_row(args, trained: float, tb: int) -> tuple[str, int]:
    """All trained values' gradients, or (sdxl_train's fused step) about one optimizer's share of them: the
    hooks free each gradient as soon as it is used (bench/sdxl_fused_memory.py measures the real figure)."""
    if getattr(args, "fused_backward_pass", False):
        return "gradients (--fused_backward_pass: freed one parameter at a time)", 0
    groups = getattr(args, "fused_optimizer_groups", None)
    if groups:
        return f"gradients (--fused_optimizer_groups {groups}: ~1/{groups} at a time)", int(trained * tb / groups)
    return f"gradients ({trained / 1e6:.2f}M x {tb} B)", int(trained * tb)


def _full_trained_parts(args, shapes: "ModelShapes") -> list[str]:
    """What a whole-model trainer trains. sdxl_train: the U-Net while --learning_rate > 0, and with
    --train_text_encoder each encoder whose rate (--learning_rate_te1 / _te2, default --learning_rate) is > 0."""
    if hasattr(args, "learning_rate_te1"):
        lr = getattr(args, "learning_rate", 0) or 0
        parts = ["unet"] if lr > 0 else []
        if getattr(args, "train_text_encoder", False):
            for part, own in (("text_encoder", args.learning_rate_te1), ("text_encoder_2", args.learning_rate_te2)):
                if (own if own is not None else lr) > 0:
                    parts.append(part)
        return [p for p in parts if p in shapes.params]
    return ["unet"] + (["text_encoder"] if _trains_te(args, "full") else [])


def _trains_te(args, trainer: str) -> bool:
    if trainer == "full":
        stop = getattr(args, "stop_text_encoder_training", None)
        return bool(getattr(args, "train_text_encoder", False)) or (hasattr(args, "stop_text_encoder_training")
                                                                    and (stop is None or stop >= 0))
    return not getattr(args, "network_train_unet_only", False)


def _trained_params(args, family: str, trainer: str, shapes: ModelShapes) -> float:
    """How many values train: the whole U-Net (+TE), the embedding matrix, or the network."""
    if trainer == "full":
        return sum(shapes.params.get(part, 0.0) for part in _full_trained_parts(args, shapes))
    if trainer == "ti":
        # the whole input-embedding matrix of every text encoder trains
        return 49408.0 * {"sd1": 768, "sdxl": 768 + 1280}.get(family, 1024)
    rank = getattr(args, "network_dim", None) or 4
    parts = ["unet"] if getattr(args, "network_train_unet_only", False) else \
        [p for p in shapes.params if p != "vae"]
    if getattr(args, "network_train_text_encoder_only", False):
        parts = [p for p in parts if p != "unet"]
    if not shapes.lora_pairs:
        return LORA_PARAMS_PER_RANK[family] * rank
    return float(sum(rank * (i + o) for p in parts for i, o in shapes.lora_pairs.get(p, [])))
