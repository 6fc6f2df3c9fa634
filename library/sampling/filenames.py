"""Output file names and PNG text of generated images.

spec generation.md §4 (training sample images) and §9 (gen_img output files and PNG metadata).
"""
from __future__ import annotations

import os
import time
from typing import Any

TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"


def timestamp(when: float | None = None) -> str:
    """Local time as `YYYYmmddHHMMSS`, as upstream's `time.strftime(..., time.localtime())`."""
    return time.strftime(TIMESTAMP_FORMAT, time.localtime(when))


def sample_image_path(output_dir: str, output_name: str | None, enum: int, *, epoch: int | None = None,
                      steps: int = 0, seed: int | None = None, ts: str | None = None) -> str:
    """`<output_dir>/sample/<name>_<e{epoch:06d}|{steps:06d}>_<enum:02d>_<ts>[_<seed>].png`. spec §4.

    The `e…` form whenever an epoch is given (also `e000000` for `--sample_at_first`). Upstream drops the
    name prefix only for None; an empty name is treated the same here instead of giving a leading `_`.
    """
    prefix = f"{output_name}_" if output_name else ""
    counter = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
    seed_suffix = "" if seed is None else f"_{seed}"
    name = f"{prefix}{counter}_{enum:02d}_{ts or timestamp()}{seed_suffix}.png"
    return os.path.join(output_dir, "sample", name)


def hires_prefix(highres_fix: bool, first_stage: bool) -> str:
    """`0` for hires-fix 1st-stage images, `1` for the final ones, nothing without hires fix. spec §7."""
    if not highres_fix:
        return ""
    return "0" if first_stage else "1"


def gen_image_name(ts: str, index_in_batch: int, seed: int, prefix: str = "") -> str:
    """`im_<ts>_<hires prefix><i:03d>_<seed>.png`. spec §9."""
    return f"im_{ts}_{prefix}{index_in_batch:03d}_{seed}.png"


def sequential_image_name(global_index: int, prefix: str = "") -> str:
    """`--sequential_file_name`: `im_<hires prefix><global index + 1:06d>.png` (index is 0-based). spec §9."""
    return f"im_{prefix}{global_index + 1:06d}.png"


def original_image_name(source_path: str) -> str:
    """`--use_original_file_name` (img2img): the source image's stem + `.png`. spec §9."""
    return os.path.splitext(os.path.basename(source_path))[0] + ".png"


def gen_png_text(*, prompt: str, seed: int, sampler: str, steps: int, scale: float,
                 negative_prompt: str | None = None, negative_scale: float | None = None,
                 clip_prompt: str | None = None, raw_prompt: str | None = None,
                 sdxl_size: dict[str, Any] | None = None, guidance_scale: float | None = None) -> dict[str, str]:
    """The tEXt chunks gen_img writes, in its order. spec §9.

    `negative-prompt` is always written (`""` when none). `sdxl_size` (SDXL only) maps `original_height`,
    `original_width`, `original_height_negative`, `original_width_negative`, `crop_top`, `crop_left` to the
    per-batch values; each is written as `str()`, so an option that was not given reads `None`.
    `guidance_scale` (FLUX.1 dev) is written as `guidance-scale`.
    """
    text = {"prompt": prompt, "seed": str(seed), "sampler": sampler, "steps": str(steps), "scale": str(scale),
            "negative-prompt": negative_prompt or ""}
    if negative_scale is not None:
        text["negative-scale"] = str(negative_scale)
    if clip_prompt is not None:
        text["clip-prompt"] = clip_prompt
    if raw_prompt is not None:
        text["raw-prompt"] = raw_prompt
    if sdxl_size is not None:
        for key in ("original_height", "original_width", "original_height_negative",
                    "original_width_negative", "crop_top", "crop_left"):
            text[key.replace("_", "-")] = str(sdxl_size.get(key))
    if guidance_scale is not None:
        text["guidance-scale"] = str(guidance_scale)
    return text


# our sampler names as A1111 shows them in its `parameters` text (unlisted names are written as given)
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver++": "DPM++ 2M", "dpmsingle": "DPM++ SDE",
}


def a1111_parameters(*, prompt: str, negative_prompt: str | None, steps: int, sampler: str, scale: float,
                     seed: int, width: int, height: int, model: str | None = None,
                     guidance_scale: float | None = None) -> str:
    """A1111-style `parameters` PNG text, readable by common image browsers.

    `<prompt>\\nNegative prompt: <neg>\\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512,
    Model: name`; the negative line is left out when empty, as A1111 does, and `Model` without a model name.
    FLUX.1 dev's `guidance_scale` follows the CFG scale as Forge writes it (`Distilled CFG Scale: 3.5`).
    """
    fields = [f"Steps: {steps}", f"Sampler: {A1111_SAMPLER_NAMES.get(sampler, sampler)}",
              f"CFG scale: {scale}", f"Seed: {seed}", f"Size: {width}x{height}"]
    if guidance_scale is not None:
        fields.insert(3, f"Distilled CFG Scale: {guidance_scale}")
    if model:
        fields.append(f"Model: {model}")
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)
