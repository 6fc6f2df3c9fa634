"""``modelspec.*`` metadata (Stability AI model spec 1.0.0) as sd-scripts writes it, spec file-formats §b.3."""
from __future__ import annotations

import datetime
import time
from typing import Any, Mapping, Optional, Sequence, Union

FAMILIES = ("sd1", "sd2", "sdxl", "flux-dev", "flux-schnell")
FLUX_FAMILIES = ("flux-dev", "flux-schnell")  # sd-scripts' FLUX trainers (newer than v0.8.7): flux-1-dev/lora ...
KINDS = ("lora", "textual-inversion", "checkpoint")

SPEC_VERSION = "1.0.0"
IMPL_GENERATIVE_MODELS = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"

_TITLE_PREFIX = {"lora": "LoRA", "textual-inversion": "TextualInversion", "checkpoint": "Checkpoint"}

Resolution = Union[None, int, str, Sequence[int]]


def architecture(family: str, v_parameterization: bool, kind: str) -> str:
    """``modelspec.architecture``: base id, plus ``/lora`` or ``/textual-inversion`` for adapters (§b.3)."""
    _check(family, kind)
    if family in FLUX_FAMILIES:
        arch = "flux-1-" + family.split("-")[1]
    elif family == "sdxl":
        arch = "stable-diffusion-xl-v1-base"
    elif family == "sd2":
        arch = "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    return arch if kind == "checkpoint" else f"{arch}/{kind}"


def implementation(family: str, kind: str) -> str:
    """Stability's repo for checkpoints, TI and SDXL LoRA; ``diffusers`` for SD1/SD2 LoRA (§b.3); BFL's for FLUX."""
    _check(family, kind)
    if family in FLUX_FAMILIES:
        return IMPL_FLUX
    return IMPL_DIFFUSERS if kind == "lora" and family != "sdxl" else IMPL_GENERATIVE_MODELS


def resolution_text(resolution: Resolution, family: str, v_parameterization: bool) -> str:
    """``"WxH"`` from ``--resolution`` (int, ``"S"``, ``"W,H"`` or a pair); default 1024/768/512 (§b.3)."""
    if resolution is None:
        # the resolution lives in the dataset config then: upstream falls back to the family's native size
        if family == "sdxl" or family in FLUX_FAMILIES:
            resolution = 1024
        elif family == "sd2" and v_parameterization:
            resolution = 768
        else:
            resolution = 512
    if isinstance(resolution, str):
        resolution = tuple(int(r) for r in resolution.split(","))
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if len(resolution) == 1:
        resolution = (resolution[0], resolution[0])
    return f"{resolution[0]}x{resolution[1]}"


def build_modelspec(
    family: str,
    v_parameterization: bool,
    kind: str,
    *,
    resolution: Resolution = None,
    title: Optional[str] = None,
    output_name: Optional[str] = None,
    timestamp: Optional[float] = None,
    author: Optional[str] = None,
    description: Optional[str] = None,
    license: Optional[str] = None,
    tags: Optional[str] = None,
    merged_from: Optional[str] = None,
    min_timestep: Optional[int] = None,
    max_timestep: Optional[int] = None,
    clip_skip: Optional[int] = None,
) -> dict[str, str]:
    """All ``modelspec.*`` keys of §b.3 for one saved file; optional keys are omitted when None.

    ``family`` is ``sd1``/``sd2``/``sdxl``, ``kind`` one of ``lora``/``textual-inversion``/``checkpoint``.
    """
    _check(family, kind)
    if timestamp is None:
        timestamp = time.time()
    if title is None:
        # `is not None` as upstream: an empty --metadata_title stays empty
        title = output_name if output_name is not None else f"{_TITLE_PREFIX[kind]}@{timestamp}"
    meta: dict[str, str] = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture(family, v_parameterization, kind),
        "modelspec.implementation": implementation(family, kind),
        "modelspec.title": title,
        "modelspec.resolution": resolution_text(resolution, family, v_parameterization),
    }
    optional = {"modelspec.description": description, "modelspec.author": author}
    meta.update({k: v for k, v in optional.items() if v is not None})
    # seconds resolution, local time, no timezone: upstream drops the fraction before formatting
    meta["modelspec.date"] = datetime.datetime.fromtimestamp(int(timestamp)).isoformat()
    optional = {"modelspec.license": license, "modelspec.tags": tags, "modelspec.merged_from": merged_from}
    meta.update({k: v for k, v in optional.items() if v is not None})
    if family not in FLUX_FAMILIES:  # sd-scripts writes no prediction type for flow-matching FLUX
        meta["modelspec.prediction_type"] = "v" if v_parameterization else "epsilon"
    if min_timestep is not None or max_timestep is not None:
        low = 0 if min_timestep is None else min_timestep
        high = 1000 if max_timestep is None else max_timestep
        meta["modelspec.timestep_range"] = f"{low},{high}"
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    return meta


def family_from_options(options: Mapping[str, Any], sdxl: bool = False) -> str:
    """``sdxl`` for the SDXL scripts, else ``sd2`` with ``--v2``, else ``sd1``."""
    if sdxl:
        return "sdxl"
    return "sd2" if options.get("v2", False) else "sd1"


def trained_resolution(group: Any) -> Optional[tuple[int, int]]:
    """(width, height) the datasets were trained at: a dataset config's own ``resolution`` (or the
    ``--resolution`` it fell back to), the largest by area when datasets differ; None when no dataset has one
    (fine-tuning buckets taken from ``train_resolution`` metadata).

    sd-scripts writes ``--resolution`` here, so a LoRA trained at 64 px through ``--dataset_config`` claimed 512x512.
    """
    sizes = [tuple(d.params.resolution) for d in getattr(group, "datasets", [])
             if getattr(getattr(d, "params", None), "resolution", None) is not None]
    return max(sizes, key=lambda wh: (wh[0] * wh[1], wh)) if sizes else None


def modelspec_from_options(options: Mapping[str, Any], family: str, kind: str,
                        timestamp: Optional[float] = None, resolution: Resolution = None) -> dict[str, str]:
    """``build_modelspec`` fed from sd-scripts options (``--metadata_*``, ``--resolution``, ...), §b.3.

    ``resolution``: what was actually trained (:func:`trained_resolution`); ``--resolution`` when None.
    """

    def get(name: str) -> Any:
        return options.get(name)

    return build_modelspec(
        family, bool(get("v_parameterization")), kind,
        resolution=resolution if resolution is not None else get("resolution"), title=get("metadata_title"), output_name=get("output_name"),
        timestamp=timestamp, author=get("metadata_author"), description=get("metadata_description"),
        license=get("metadata_license"), tags=get("metadata_tags"),
        min_timestep=get("min_timestep"), max_timestep=get("max_timestep"), clip_skip=get("clip_skip"),
    )


def _check(family: str, kind: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if kind not in KINDS:
        raise ValueError(f"unknown modelspec kind {kind!r}; expected one of {KINDS}")
