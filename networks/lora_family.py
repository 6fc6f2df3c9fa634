"""Which model a LoRA or embedding file was made for, read from tensor names and shapes only.

A file is checked before any model work so that a LoRA for another family fails with one line instead of
being silently ignored (its keys match nothing) or crashing mid-run. Reading costs one header: safetensors
headers are parsed here (no tensor is read, and a truncated or non-safetensors file is named as such);
``.ckpt``/``.pt`` pickles have no header and are loaded weights-only. No model is built or imported.

Family rules (spec file-formats §a.1, pitfall 1):
* SDXL: ``lora_te1_``/``lora_te2_`` text encoders, U-Net under LDM paths ``lora_unet_input_blocks_…``,
  ``lora_unet_middle_block_…``, ``lora_unet_output_blocks_…``.
* SD1/SD2: ``lora_te_``, U-Net under Diffusers paths ``lora_unet_down_blocks_…``/``mid_block``/``up_blocks``.
* FLUX.1: BFL transformer paths ``lora_unet_double_blocks_…``/``single_blocks``/embedders, T5 ``lora_te3_`` (its
  CLIP-L is ``lora_te1_`` as SDXL's; a file of CLIP-L modules only reads as SDXL); diffusers' FLUX layout
  (``transformer.…lora_A.weight``) too.
* SD2 vs SD1, first from the shapes (text-encoder width or U-Net cross-attention width 1024 vs 768, or an
  OpenCLIP-depth text encoder with more than 12 layers), else from metadata (``ss_base_model_version``,
  ``ss_v2``, ``modelspec.architecture``). Files of tiny test models carry neither: they stay ``sd1/sd2``,
  and the shape checks against the loaded model decide.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

from library.errors import UserError
from library.formats.tensor_file import Shape, TensorFile, read_tensor_file  # noqa: F401  (re-exported)

SD1, SD2, SDXL, FLUX = "sd1", "sd2", "sdxl", "flux"
SD1_OR_SD2 = "sd1/sd2"  # an SD LoRA whose file cannot tell SD1 from SD2
FAMILY_NAMES = {SD1: "SD1", SD2: "SD2", SDXL: "SDXL", SD1_OR_SD2: "SD1/SD2", FLUX: "FLUX.1"}

_SDXL_NAME = re.compile(r"^lora_(te1|te2)_|^lora_unet_(input_blocks|middle_block|output_blocks)_")
_SD_NAME = re.compile(r"^lora_te_|^lora_unet_(down_blocks|mid_block|up_blocks)_")
# FLUX.1 (sd-scripts' lora_flux): BFL transformer paths and T5 (lora_te3_); its CLIP-L is lora_te1_ as SDXL's TE1
_FLUX_NAME = re.compile(r"^lora_te3_|^lora_unet_(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|"
                        r"guidance_in|final_layer)(_|$)")
_NOT_FLUX = re.compile(r"^lora_te_|^lora_te2_|^lora_unet_(down_blocks|mid_block|up_blocks|input_blocks|middle_block|"
                       r"output_blocks)_")
_TE_LAYER = re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_")
_WIDTHS = {768: SD1, 1024: SD2}  # CLIP ViT-L vs OpenCLIP ViT-H: text width = U-Net cross-attention width
_SD1_LAYERS = 12


def _fmt(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"



# ------------------------------------------------------------------------------ LoRA family

def _sd_variant(tf: TensorFile) -> str:
    """SD1 or SD2 from shapes (decisive for real models), else from metadata, else undecided."""
    for name, parts in tf.modules().items():
        down = parts.get("lora_down.weight")
        if down is None or len(down) < 2:
            continue
        if name.startswith("lora_te_") or name.endswith("_attn2_to_k") or name.endswith("_attn2_to_v"):
            if down[1] in _WIDTHS:
                return _WIDTHS[down[1]]
    layers = [int(m.group(1)) for name in tf.modules() if (m := _TE_LAYER.match(name))]
    if layers and max(layers) >= _SD1_LAYERS:
        return SD2  # OpenCLIP-H: 23 layers; CLIP-L: 12
    meta = tf.metadata
    base = meta.get("ss_base_model_version", "")
    if base.startswith("sd_v2"):
        return SD2
    if base.startswith("sd_v1"):
        return SD1
    if meta.get("ss_v2") in ("True", "False") and not base.startswith("sdxl"):
        return SD2 if meta["ss_v2"] == "True" else SD1
    arch = meta.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-v2"):
        return SD2
    if arch.startswith("stable-diffusion-v1"):
        return SD1
    return SD1_OR_SD2


def family_of(tf: TensorFile, option: str = "--network_weights", require_known: bool = True) -> str | None:
    """``sd1``, ``sd2``, ``sdxl`` or ``sd1/sd2`` of a LoRA's tensors; names of two families are an error, and so
    are names of none unless not ``require_known`` (then None: tools without a model accept any names)."""
    names = list(tf.modules())
    where = f"{option} {tf.path}"
    if not names and _is_diffusers_flux(tf):
        return FLUX
    flux = next((n for n in names if _FLUX_NAME.match(n)), None)
    if flux:
        other = next((n for n in names if _NOT_FLUX.match(n)), None)
        if other:
            raise UserError(f"{where}: mixes FLUX.1 module names ({flux}) with SD ones ({other}): not a LoRA of one "
                            "model")
        return FLUX
    sdxl = next((n for n in names if _SDXL_NAME.match(n)), None)
    sd = next((n for n in names if _SD_NAME.match(n)), None)
    if sdxl and sd:
        raise UserError(f"{where}: mixes SDXL module names ({sdxl}) with SD1/SD2 ones ({sd}): not a LoRA of one "
                        "model")
    if sdxl:
        return SDXL
    if sd:
        return _sd_variant(tf)
    if not require_known:
        return None
    sample = ", ".join(list(tf.shapes)[:3]) or "no tensors"
    raise UserError(f"{where}: not a kohya LoRA file (no lora_unet_/lora_te_ module names; first keys: {sample})")


def _is_diffusers_flux(tf: TensorFile) -> bool:
    """diffusers' FLUX LoRA layout: PEFT ``lora_A`` / ``lora_B`` keys under ``transformer.`` (diffusers' SD LoRAs
    use ``unet.``)."""
    keys = list(tf.shapes)
    return any(k.startswith("transformer.") and ".lora_A." in k for k in keys)


def lora_file_family(path: str | os.PathLike, option: str = "--network_weights") -> str:
    """The model family a LoRA file was made for: ``sd1``, ``sd2``, ``sdxl``, or ``sd1/sd2`` when it cannot tell."""
    return family_of(read_tensor_file(path, option), option)


def families_agree(file_family: str, model_family: str) -> bool:
    """Whether a file of ``file_family`` may be used with a ``model_family`` model (``sd1/sd2`` fits either)."""
    return bool(set(file_family.split("/")) & set(model_family.split("/")))


def check_family(tf: TensorFile, model_family: str, option: str = "--network_weights", kind: str = "LoRA",
                 against: str | None = None) -> str:
    """``UserError`` naming both families unless ``tf`` suits ``model_family``; returns the file's family.

    The message ends with ``against`` (default: "the model is <family>")."""
    family = family_of(tf, option) if kind == "LoRA" else embedding_family(tf, option)
    if not families_agree(family, model_family):
        if family == FLUX and against is not None:  # a merge tool's hint names another SD tool: not for FLUX
            against = ("this tool handles SD1/SD2/SDXL LoRAs only (FLUX.1 LoRAs: networks/flux_merge_lora.py merges "
                       "them, --network_module networks.lora_flux reads them)")
        against = against or f"the model is {FAMILY_NAMES.get(model_family, model_family)}"
        article = "a" if family == FLUX else "an"
        raise UserError(f"{option} {tf.path} is {article} {FAMILY_NAMES[family]} {kind} but {against}")
    return family


def check_lora_matches(path: str | os.PathLike, model_family: str, option: str = "--network_weights") -> str:
    """Header-only check that a LoRA suits a ``model_family`` (``sd1``/``sd2``/``sdxl``) model; returns its family.

    Cheap enough to run before any model is loaded.
    """
    return check_family(read_tensor_file(path, option), model_family, option)


def check_file_for_family(path: str | os.PathLike, model_family: str,
                          option: str = "--network_weights") -> str | None:
    """Preflight form of :func:`check_lora_matches`: the file must be readable, and a file with kohya module
    names must suit ``model_family``; other names pass (a plug-in's own format: the network checks it)."""
    tf = read_tensor_file(path, option)
    if family_of(tf, option, require_known=False) is None:
        return None
    return check_family(tf, model_family, option)


def check_same_family(paths: Iterable[str], option: str = "--models", expected: str | None = None,
                      against: str | None = None) -> list[TensorFile]:
    """LoRA inputs of one tool: readable, of one family (and of ``expected`` if given; ``against`` ends that
    message), and of equal widths where their modules overlap."""
    files = [read_tensor_file(p, option) for p in paths]
    first: tuple[TensorFile, str] | None = None
    for tf in files:
        family = family_of(tf, option, require_known=False)
        if family is None:
            continue  # names of no known model: nothing to compare
        if expected:
            check_family(tf, expected, option, against=against)
        if first is not None and not families_agree(family, first[1]):
            raise UserError(f"{option} {tf.path} is an {FAMILY_NAMES[family]} LoRA but {first[0].path} is "
                            f"{FAMILY_NAMES[first[1]]}: use LoRAs of one model family")
        if first is None or "/" in first[1]:
            first = (tf, family)  # compare with the most specific family seen (sd1/sd2 fits either)
    _check_widths_agree(files, option)
    return files


def _io_dims(parts: Mapping[str, Shape]) -> tuple[int, int] | None:
    """(input width, output width) a module's factors imply, when it has both kohya factors."""
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None or len(down) < 2 or len(up) < 1:
        return None
    return down[1], up[0]


def _check_widths_agree(files: list[TensorFile], option: str) -> None:
    seen: dict[str, tuple[TensorFile, Mapping[str, Shape]]] = {}
    for tf in files:
        for name, parts in sorted(tf.modules().items()):
            if _io_dims(parts) is None:
                continue
            if name not in seen:
                seen[name] = (tf, parts)
                continue
            other, other_parts = seen[name]
            for key in ("lora_down.weight", "lora_up.weight"):
                dim = 1 if key == "lora_down.weight" else 0
                a, b = parts[key], other_parts[key]
                if a[dim] != b[dim] or a[2:] != b[2:]:
                    raise UserError(f"{option} {tf.path}: tensor {name}.{key} has shape {_fmt(a)} but "
                                    f"{other.path} has {_fmt(b)}: LoRAs of models of other widths")


# ------------------------------------------------------------------------------ against a model

def check_fits_layers(tf: TensorFile, layer_shapes: Mapping[str, Shape], model_family: str,
                      option: str = "--network_weights") -> int:
    """The LoRA's modules against the model's layers (``{LoRA module name: weight shape}``).

    Every module with kohya factors that names a layer must fit its widths (the tensor and both shapes are
    named otherwise); a file none of whose modules names a layer is an error, since it would change nothing.
    A partial match (e.g. no text-encoder modules for this model) is fine. Returns the matched count.
    """
    check_family(tf, model_family, option)
    modules = tf.modules()
    matched = sorted(name for name in modules if name in layer_shapes)  # sorted: the same report every run
    if not matched:
        raise UserError(f"{option} {tf.path}: none of its {len(modules)} modules names a layer of this "
                        f"{FAMILY_NAMES[model_family]} model (e.g. {next(iter(modules), '-')}): it would be ignored")
    for name in matched:
        error = _layer_fit_error(name, modules[name], tuple(layer_shapes[name]))
        if error:
            raise UserError(f"{option} {tf.path}: {error}: a LoRA for a model of other widths")
    return len(matched)


def _layer_fit_error(name: str, parts: Mapping[str, Shape], weight: Shape) -> str | None:
    if _io_dims(parts) is None:
        return None  # another plug-in's tensors (LyCORIS …): only the name is checked
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    kernel = weight[2:] if len(weight) == 4 and weight[2:] != (1, 1) else None
    bad_down = down[1] != weight[1] or (kernel is not None and tuple(down[2:]) != kernel)
    if bad_down:
        return f"tensor {name}.lora_down.weight has shape {_fmt(down)} but the model's layer weight is {_fmt(weight)}"
    if up[0] != weight[0]:
        return f"tensor {name}.lora_up.weight has shape {_fmt(up)} but the model's layer weight is {_fmt(weight)}"
    return None


def check_fits_network(tf: TensorFile, network_shapes: Mapping[str, Shape], option: str = "--network_weights") -> int:
    """A file's tensors against a built network's state dict (what ``load_weights`` will copy into).

    Shared tensors must have equal shapes (the tensor and both shapes are named); a file sharing no tensor
    with the network is an error (it would load nothing). Returns the number of shared tensors.
    """
    shared = sorted(k for k in tf.shapes if k in network_shapes)
    if not shared:
        raise UserError(f"{option} {tf.path}: none of its {len(tf.shapes)} tensors belongs to the network "
                        f"(e.g. {next(iter(tf.shapes), '-')}): nothing would be loaded")
    for key in shared:
        have, want = tf.shapes[key], tuple(network_shapes[key])
        if have == want:
            continue
        rank_only = len(have) == len(want) and _differs_only_in_rank(key, have, want)
        hint = ("the file's rank differs: set --network_dim / conv_dim to it, or use --dim_from_weights"
                if rank_only else "a LoRA for a model of other widths")
        raise UserError(f"{option} {tf.path}: tensor {key} has shape {_fmt(have)} but the network's is "
                        f"{_fmt(want)}: {hint}")
    return len(shared)


def _differs_only_in_rank(key: str, have: Shape, want: Shape) -> bool:
    rank_dim = 0 if key.endswith("lora_down.weight") else 1 if key.endswith("lora_up.weight") else None
    if rank_dim is None:
        return False
    return all(a == b for i, (a, b) in enumerate(zip(have, want)) if i != rank_dim)


def model_family_of(text_encoder, unet) -> str:
    """``sd1``/``sd2``/``sdxl``/``flux`` of loaded models, for networks built without the model bundle.

    FLUX.1: a FLUX transformer in the U-Net's place; SDXL: two text encoders or a size-conditioned U-Net; SD2: an
    OpenCLIP text encoder (GELU), SD1 CLIP's QuickGELU (the real models' activations, which the tiny test models
    follow).
    """
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    config = getattr(unet, "config", None)
    if config is not None and "num_single_layers" in config:  # diffusers' FluxTransformer2DModel
        return FLUX
    if len(encoders) > 1 or (config is not None and config.get("addition_embed_type") == "text_time"):
        return SDXL
    te_config = getattr(encoders[0], "config", None) if encoders else None
    return SD2 if getattr(te_config, "hidden_act", None) == "gelu" else SD1


# ------------------------------------------------------------------------------ embeddings

def embedding_family(tf: TensorFile, option: str = "--textual_inversion_embeddings") -> str:
    """SDXL (``clip_l`` + ``clip_g``), else SD1/SD2 by the vector width (768/1024), else ``sd1/sd2``."""
    keys = set(tf.shapes)
    if {"clip_l", "clip_g"} & keys:
        return SDXL
    if not tf.shapes:
        raise UserError(f"{option} {tf.path}: not an embedding file (no tensors)")
    shape = next(iter(tf.shapes.values()))
    return _WIDTHS.get(shape[-1], SD1_OR_SD2) if shape else SD1_OR_SD2


def check_embedding_matches(path: str | os.PathLike, model_family: str,
                            option: str = "--textual_inversion_embeddings") -> str:
    """Header-only check that an embedding suits a ``model_family`` model; returns its family."""
    return check_family(read_tensor_file(path, option), model_family, option, kind="embedding")
