"""``--dry_run``: build the dataset and the plan, print them, load no model (docs/beyond-sd-scripts.md §4).

Prints images per subset (repeats, regularization balancing, validation hold-out), a bucket table per
dataset (resolution, images, with repeats, upscaled, cropped), the step arithmetic of the real run
(the same ``LoopPlan``), when samples, saves and validation happen, and a rough peak-memory estimate
(``memory_estimate``, ``flux_memory_estimate``). Every number comes from the code the real run uses, so they agree.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Optional

from library.data.dataset import build_dataset_group, scan_mode
from library.training.loop import output_names as names
from library.training.runners.flux_memory_estimate import caching_note, estimate_flux
from library.training.runners.memory_estimate import GIB, estimate
from library.training.runners.run_common import build_data
from library.training.settings import LoopPlan, LoopSettings, loop_plan

logger = logging.getLogger(__name__)

TRAINER_KIND = {"train_network": "network", "sdxl_train_network": "network", "train_db": "full",
                "fine_tune": "full", "train_textual_inversion": "ti",
                "sdxl_train_textual_inversion": "ti", "sdxl_train": "full"}
TRAINER_KIND.update(train_controlnet="full", sdxl_train_control_net_lllite="network")  # ControlNet < a U-Net: bound


def report(args: argparse.Namespace, loop: LoopSettings, script: str, sdxl: bool = False,
           family: Optional[str] = None) -> None:
    """Build datasets and plan, print the report (main process only); returns None, loads no model.
    ``family``: the model family when the options do not say it (``flux``: ``flux_memory_estimate``)."""
    group, params = build_data(args, script, sdxl)  # the real run's own step: the same checks, the same answer
    vgroup = build_dataset_group(params, [], part="validation", seed=args.seed, max_train_steps=args.max_train_steps,
                                 max_token_length=args.max_token_length,
                                 scan=scan_mode(bool(getattr(args, "verify_images", False))))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    plan = loop_plan(loop, -(-len(group) // processes))
    if os.environ.get("RANK", "0") != "0":
        return None
    lines = [f"dry run of {script}.py: nothing was loaded onto a device", ""]
    lines += dataset_lines(group, vgroup)
    lines += plan_lines(plan, processes)
    lines += schedule_lines(args, plan, vgroup is not None)
    family = family or ("sdxl" if sdxl else ("sd2" if args.v2 else "sd1"))
    if family == "flux":
        lines += flux_memory_lines(args, group)
    else:
        lines += memory_lines(args, family, TRAINER_KIND[script], group)
    print("\n".join(lines))
    return None


def dataset_lines(group, vgroup) -> list[str]:
    lines = ["datasets"]
    for d in group.datasets:
        reso = "x".join(map(str, d.resolution)) if d.resolution else "train_resolution"
        lines.append(f"  dataset {d.index}: {d.style}, batch size {d.params.batch_size}, resolution {reso}, "
                     f"buckets {'on' if d.bucketed else 'off'}")
        for subset, count in zip(d.subsets, d.img_counts):
            where = subset.image_dir or subset.metadata_file
            kind = "regularization" if subset.is_reg else "train"
            lines.append(f"    {kind} subset {where}: {count} images x {subset.num_repeats} repeats "
                         f"= {count * subset.num_repeats}")
        if d.num_reg_images:
            balanced = sum(i.num_repeats for i in d.images if i.is_reg)
            lines.append(f"    regularization balancing: {d.num_reg_images} regularization images (with repeats) "
                         f"-> {balanced} used, to match {d.num_train_images} train images")
        lines += bucket_table(d)
    if vgroup is not None:
        for d in vgroup.datasets:
            held = ", ".join(f"{s.image_dir or s.metadata_file}: {n}" for s, n in zip(d.subsets, d.img_counts))
            lines.append(f"  validation (dataset {d.index}): {len(d.images)} images held out ({held}), "
                         f"{len(d)} batches")
    return lines + [""]


def bucket_table(dataset) -> list[str]:
    """Per bucket: distinct images, images with repeats, how many were upscaled and cropped to fit."""
    rows: dict[tuple[int, int], list[int]] = {}
    for info in dataset.images:
        row = rows.setdefault(tuple(info.bucket), [0, 0, 0, 0])
        row[0] += 1
        row[1] += info.num_repeats
        w, h = info.image_size or info.resized_size
        rw, rh = info.resized_size or (w, h)
        row[2] += int(rw > w or rh > h)
        row[3] += int((rw, rh) != tuple(info.bucket))
    lines = [f"    {'bucket':>11} {'images':>7} {'w/repeats':>10} {'upscaled':>9} {'cropped':>8}"]
    for (w, h), (n, rep, up, crop) in sorted(rows.items()):
        lines.append(f"    {f'{w}x{h}':>11} {n:>7} {rep:>10} {up:>9} {crop:>8}")
    return lines


def plan_lines(plan: LoopPlan, processes: int) -> list[str]:
    steps_per_epoch = math.ceil(plan.batches_per_epoch / plan.grad_accum)
    return ["plan", f"  processes: {processes}", f"  batches per epoch (per process): {plan.batches_per_epoch}",
            f"  gradient accumulation steps: {plan.grad_accum}", f"  steps per epoch: {steps_per_epoch}",
            f"  epochs: {plan.num_epochs}", f"  total steps: {plan.max_train_steps}", ""]


def _listing(values: list[int], prefix: str) -> str:
    if not values:
        return f"{prefix}: none"
    shown = ", ".join(str(v) for v in values[:8])
    return f"{prefix} {shown}{', ...' if len(values) > 8 else ''} ({len(values)} in all)"


def schedule_lines(args: argparse.Namespace, plan: LoopPlan, validating: bool) -> list[str]:
    total, epochs = plan.max_train_steps, plan.num_epochs
    lines = ["schedule"]
    every_epochs = names.save_every_n_epochs_from_ratio(epochs, getattr(args, "save_n_epoch_ratio", None),
                                                        args.save_every_n_epochs)
    step_saves = [s for s in range(1, total + 1) if names.should_save_step(s, args.save_every_n_steps)]
    epoch_saves = [e for e in range(1, epochs + 1) if names.should_save_epoch(e, every_epochs, epochs)]
    lines.append(f"  saves: {_listing(step_saves, 'at steps')}; {_listing(epoch_saves, 'after epochs')}; "
                 "and at the end")
    lines.append(f"  sample images: {_sample_schedule(args, total, epochs)}")
    if validating:
        v_steps = getattr(args, "validate_every_n_steps", None)
        v_epochs = getattr(args, "validate_every_n_epochs", None)
        if not v_steps and not v_epochs:
            v_epochs = 1
        parts = [_listing([s for s in range(1, total + 1) if s % v_steps == 0], "at steps")] if v_steps else []
        if v_epochs:
            parts.append(_listing([e for e in range(1, epochs + 1) if e % v_epochs == 0], "after epochs"))
        lines.append(f"  validation: {'; '.join(parts)}")
    return lines + [""]


def _sample_schedule(args: argparse.Namespace, total: int, epochs: int) -> str:
    if not getattr(args, "sample_prompts", None):
        return "never (no --sample_prompts)"
    parts = ["before training"] if getattr(args, "sample_at_first", False) else []
    if args.sample_every_n_epochs:
        parts.append(_listing([e for e in range(1, epochs + 1) if e % args.sample_every_n_epochs == 0],
                              "after epochs"))
    elif args.sample_every_n_steps:
        parts.append(_listing([s for s in range(1, total + 1) if s % args.sample_every_n_steps == 0], "at steps"))
    return "; ".join(parts) or "never"


def memory_lines(args: argparse.Namespace, family: str, trainer: str, group) -> list[str]:
    latent_px = max((w * h // 64 for d in group.datasets for (w, h) in d.buckets.resos), default=64 * 64)
    batch = max(d.params.batch_size for d in group.datasets)
    rows = estimate(args, family, trainer, latent_px, batch)
    lines = [f"peak accelerator memory estimate ({family}; rough model, see docs/beyond-sd-scripts.md)"]
    lines += [f"  {label:<70} {size / GIB:8.2f} GiB" for label, size in rows]
    return lines


def flux_memory_lines(args: argparse.Namespace, group) -> list[str]:
    """FLUX.1: image tokens are the 2x2 patches of the 8x smaller latents, (W / 16) x (H / 16)."""
    tokens = max(((w // 16) * (h // 16) for d in group.datasets for (w, h) in d.buckets.resos), default=64 * 64)
    batch = max(d.params.batch_size for d in group.datasets)
    rows = estimate_flux(args, tokens, batch)
    lines = ["peak accelerator memory estimate (flux; rough model, see docs/flux.md)"]
    lines += [f"  {label:<70} {size / GIB:8.2f} GiB" for label, size in rows]
    note = caching_note(args)
    return lines + ([note] if note else [])
