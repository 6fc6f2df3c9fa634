"""The embedded default job: teach the shapes base model a new concept with a LoRA, and show it learned.

Steps (each one an ordinary command of this project, run in-process):

1. draw a DreamBooth dataset of the new concept (hearts in the base colours, captioned ``a red sks``)
   and regularisation images of the old world (``a red circle``...), with a dataset TOML;
2. ``train_network.py --config_file <out>/train_network.toml`` (a LoRA on the base model's U-Net);
3. ``gen_img.py`` before (base model) and after (``--network_weights``) on the same prompts and seeds;
4. judge every image with the strict judge (a shape or ``none``, library/shapes/judge.py), read it again
   with the independent cross-check (library/shapes/crosscheck.py), and write ``report.md`` /
   ``report.json`` (accuracies, agreement, disagreements), ``grid.png`` (before / after, the verdict
   under every image) and ``loss.png``.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import toml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from library.errors import UserError
from library.log import setup_logging_from_args
from library.sampling.gen_options import build_gen_parser
from library.sampling.gen_runner import run
from library.shapes import crosscheck
from library.shapes import judge as strict
from library.shapes import world
from library.shapes.evaluate import parse_prompt, prompt_of
from library.shapes.plots import image_grid, line_chart
from library.training import entry

logger = logging.getLogger(__name__)

TRIGGER = "sks"
DEFAULT_BASE = Path(__file__).resolve().parents[2] / "models" / "shapes-sd1.safetensors"


@dataclass
class DemoSettings:
    base_model: str = str(DEFAULT_BASE)
    steps: int = 5000
    images: int = 200  # concept images (hearts); as many regularisation images of the old world
    network_dim: int = 16
    conv_dim: int = 16  # LoRA on the 3x3 convolutions too (network_args conv_dim/conv_alpha): a new shape
    learning_rate: float = 1e-3
    prior_loss_weight: float = 2.0  # weight of the regularisation images (the old world) in the loss
    batch_size: int = 8
    prompts_per_color: int = 5  # new-concept prompts per colour (8 colours)
    heldout_prompts_per_pair: int = 8  # old world, the 5 pairs the base model never saw
    train_prompts_per_pair: int = 1  # old world, the 35 pairs it was trained on
    sample_steps: int = 20
    # classifier-free guidance: above ~3 the tiny base model draws lumpy outlines, and at 2 this LoRA's hearts
    # overshoot (clefts 1.5-3x the drawn depth); at 1.5 both worlds fall inside the judge's ranges (docs/demo.md)
    guidance_scale: float = 1.5
    seed: int = 0
    loss_options: dict = field(default_factory=lambda: {"min_snr_gamma": 5.0})
    extra_train_options: dict = field(default_factory=dict)


def write_toml(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml.dumps(values), encoding="utf-8")
    return path


def make_datasets(out: Path, s: DemoSettings) -> Path:
    """Concept images + regularisation images as DreamBooth folders, and the dataset TOML."""
    concept = world.generate(s.images, seed=1000 + s.seed, colors=world.MODEL_COLORS, shapes=(world.NEW_SHAPE,))
    world.write_dataset(concept, str(out / "data" / "concept"), "dreambooth", repeats=1, name=TRIGGER,
                        aliases={world.NEW_SHAPE: TRIGGER})
    reg = world.generate(s.images, seed=2000 + s.seed, colors=world.MODEL_COLORS, holdout=world.HELDOUT_PAIRS,
                         split="train")
    world.write_dataset(reg, str(out / "data" / "reg"), "dreambooth", repeats=1, name="shapes")
    path = out / "dataset.toml"
    text = f"""# dataset for the demo LoRA (sd-scripts dataset-config format)
[general]
enable_bucket = true
bucket_reso_steps = 16
min_bucket_reso = 32
max_bucket_reso = 96
caption_extension = ".caption"

[[datasets]]
resolution = 64
batch_size = {s.batch_size}

  [[datasets.subsets]]
  image_dir = {json.dumps((out / "data" / "concept" / f"1_{TRIGGER}").as_posix())}
  num_repeats = 1

  [[datasets.subsets]]
  image_dir = {json.dumps((out / "data" / "reg" / "1_shapes").as_posix())}
  is_reg = true
  num_repeats = 1
"""
    path.write_text(text, encoding="utf-8")
    return path


def write_train_config(out: Path, dataset_toml: Path, s: DemoSettings) -> Path:
    options = {
        "pretrained_model_name_or_path": s.base_model,
        "dataset_config": dataset_toml.as_posix(),
        "output_dir": (out / "lora").as_posix(),
        "output_name": f"{TRIGGER}_heart",
        "save_model_as": "safetensors",
        "network_module": "networks.lora",
        "network_dim": s.network_dim,
        "network_alpha": s.network_dim,
        "network_train_unet_only": True,
        **({"network_args": [f"conv_dim={s.conv_dim}", f"conv_alpha={s.conv_dim}"]} if s.conv_dim else {}),
        "learning_rate": s.learning_rate,
        "optimizer_type": "AdamW",
        "lr_scheduler": "cosine",
        "lr_warmup_steps": min(50, s.steps // 10),
        "prior_loss_weight": s.prior_loss_weight,
        "max_train_steps": s.steps,
        "cache_latents": True,
        "mixed_precision": "no",
        "max_data_loader_n_workers": 0,
        "seed": s.seed,
        "logging_dir": (out / "logs").as_posix(),
        "log_prefix": "demo",
    }
    options.update(s.loss_options)
    options.update(s.extra_train_options)
    return write_toml(out / "train_network.toml", options)


def write_prompts(out: Path, s: DemoSettings) -> tuple[Path, dict[str, str]]:
    """One prompt file for before and after: the new concept in every colour, then every old pair."""
    sizes = world.SIZES
    lines, groups = [], {}
    concept_pairs = [(c, TRIGGER) for c in world.MODEL_COLORS]
    for line in world.prompt_lines(concept_pairs, s.prompts_per_color, seed=100 + s.seed, sizes=sizes):
        lines.append(line)
        groups[line] = "new concept"
    for split, label, per_pair in (("holdout", "old, held-out pairs", s.heldout_prompts_per_pair),
                                   ("train", "old, training pairs", s.train_prompts_per_pair)):
        pairs = world.split_pairs(world.MODEL_COLORS, world.BASE_SHAPES, world.HELDOUT_PAIRS, split)
        for line in world.prompt_lines(pairs, per_pair, seed=200 + s.seed, sizes=sizes):
            lines.append(line)
            groups[line] = label
    # gen_img batches consecutive prompts of one size: group the sizes (stable, so the order is kept within one)
    lines.sort(key=lambda line: line.split(" --w ")[1].split(" --d ")[0])
    path = out / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, groups


def generate(out_dir: Path, prompts: Path, s: DemoSettings, lora: Path | None = None) -> list[str]:
    argv = ["--ckpt", s.base_model, "--from_file", str(prompts), "--outdir", str(out_dir), "--steps",
            str(s.sample_steps), "--sampler", "euler_a", "--scale", str(s.guidance_scale), "--seed", str(s.seed),
            "--batch_size", "8", "--console_log_simple"]
    if lora is not None:
        argv += ["--network_module", "networks.lora", "--network_weights", str(lora), "--network_mul", "1.0"]
    args = build_gen_parser().parse_args(argv)  # what gen_img.py's main does, without importing the script
    setup_logging_from_args(args)
    return run(args)


def judge_image(path: str, prompt: str) -> dict:
    """The strict judge's verdict on one image, the independent cross-check's, and what the prompt wanted."""
    want_color, want_shape = parse_prompt(prompt, aliases={TRIGGER: world.NEW_SHAPE})
    with Image.open(path) as im:
        # the judge may answer any colour the model knows, so a drift to a neighbouring hue counts as wrong
        v = strict.judge(im, colors=world.MODEL_COLORS)
        check = crosscheck.read_shape(im).shape
    return {"path": path, "prompt": prompt.split(" --")[0], "want_color": want_color, "want_shape": want_shape,
            "shape": v.shape, "color": v.color, "check": check, "reason": v.reason,
            "color_ok": v.color == want_color, "shape_ok": v.shape == want_shape,
            "ok": v.color == want_color and v.shape == want_shape}


def summarize(records: Sequence[dict]) -> dict:
    """Colour, shape and prompt accuracy, the share of ``none`` verdicts, and accuracy per prompt."""
    n = max(len(records), 1)
    per_prompt: dict[str, list[int]] = {}
    for r in records:
        per_prompt.setdefault(r["prompt"], []).append(int(r["ok"]))
    return {"n": len(records), "color_accuracy": sum(r["color_ok"] for r in records) / n,
            "shape_accuracy": sum(r["shape_ok"] for r in records) / n,
            "prompt_accuracy": sum(r["ok"] for r in records) / n,
            "none_rate": sum(r["shape"] == "none" for r in records) / n,
            "per_prompt": {k: sum(v) / len(v) for k, v in sorted(per_prompt.items())}}


def agreement(records: Sequence[dict]) -> dict:
    """How often the judge and the independent cross-check name the same shape (or both ``none``)."""
    differ = [{"path": r["path"], "prompt": r["prompt"], "judge": r["shape"], "check": r["check"]}
              for r in records if r["shape"] != r["check"]]
    return {"n": len(records), "agreement": 1 - len(differ) / max(len(records), 1), "disagreements": differ}


def judge(paths: Sequence[str], groups: dict[str, str]) -> dict:
    """Strict-judge summaries per prompt group (new concept, held-out pairs, training pairs) and overall,
    the agreement with the cross-check, and every image's verdict (``images``)."""
    records = [judge_image(p, prompt_of(p) or "") for p in paths]
    group_of = {line.split(" --")[0]: g for line, g in groups.items()}
    by_group: dict[str, list] = {}
    for r in records:
        by_group.setdefault(group_of.get(r["prompt"], "other"), []).append(r)
    return ({g: summarize(rs) for g, rs in by_group.items()}
            | {"all": summarize(records), "crosscheck": agreement(records), "images": records})


def read_losses(log_dir: Path, tag: str = "loss/current") -> tuple[list[int], list[float]]:
    """Per-step training loss from the tensorboard event files of a run."""

    steps, values = [], []
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                steps.append(e.step)
                values.append(e.value)
    return steps, values


def _moving_average(values: Sequence[float], k: int = 50) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= k:
            total -= values[i - k]
        out.append(total / min(i + 1, k))
    return out


def _grid_columns(before: Sequence[str], groups: dict[str, str]) -> list[int]:
    """Columns of the grid: the first image of each new-concept prompt, then of each held-out pair."""
    prompts = [(prompt_of(p) or "").split(" --")[0] for p in before]
    group_of = {line.split(" --")[0]: g for line, g in groups.items()}
    picked, seen = [], set()
    for wanted in ("new concept", "old, held-out pairs"):
        for i, text in enumerate(prompts):
            if group_of.get(text) == wanted and text not in seen:
                picked.append(i)
                seen.add(text)
    return picked


def write_figures(out: Path, before: Sequence[str], after: Sequence[str], groups: dict[str, str],
                  losses: tuple[list[int], list[float]], verdicts: tuple[Sequence[dict], Sequence[dict]]) -> dict:
    """grid.png (before / after, the judge's verdict under every image: green = matches the prompt) and
    loss.png. ``verdicts`` are the ``images`` records of ``judge`` for before and after, in path order."""
    picked = _grid_columns(before, groups)
    rows, captions = [], []
    for paths, records in zip((before, after), verdicts):
        by_path = {r["path"]: r for r in records}
        rows.append([Image.open(paths[i]) for i in picked])
        captions.append([(f"{by_path[paths[i]]['color']} {by_path[paths[i]]['shape']}", by_path[paths[i]]["ok"])
                         for i in picked])
    col_labels = [by_path[after[i]]["prompt"][2:] for i in picked]
    files = {"grid": str(image_grid(rows, out / "grid.png", row_labels=["before", "after"],
                                    col_labels=col_labels, cell=96, captions=captions))}
    steps, values = losses
    if values:
        series = {"loss": (steps, values), "moving average (50)": (steps, _moving_average(values, 50))}
        files["loss"] = str(line_chart(series, out / "loss.png", title="LoRA training loss (train_network.py)",
                                       xlabel="step", ylabel="loss", faint=("loss",)))
    return files


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _agreement_lines(result: dict) -> list[str]:
    lines = ["## Cross-check", "",
             "A second method that shares no code with the judge (library/shapes/crosscheck.py: frame-colour "
             "background, flood-fill mask, IoU against each shape's own rasterisation) reads every image again.", ""]
    for when in ("before", "after"):
        c = result[when]["crosscheck"]
        lines.append(f"- {when}: the two agree on {_pct(c['agreement'])} of {c['n']} images "
                     f"({len(c['disagreements'])} differ)")
    for when in ("before", "after"):
        differ = result[when]["crosscheck"]["disagreements"]
        if differ:
            lines += ["", f"Disagreements, {when} (image: prompt -> judge / cross-check):", ""]
            lines += [f"- `{Path(d['path']).name}`: {d['prompt']} -> {d['judge']} / {d['check']}" for d in differ]
    return lines + [""]


def report_markdown(result: dict) -> str:
    b, a = result["before"], result["after"]
    lines = ["# Demo: a LoRA teaches the shapes model a new concept", "",
             f"Base model `{result['base_model']}`; LoRA `{result['lora']}` trained for {result['steps']} steps "
             f"in {result['train_seconds']:.0f} s (`python train_network.py --config_file {result['train_config']}`).",
             f"The new concept is the `{world.NEW_SHAPE}` shape, prompted with the trigger word `{TRIGGER}` "
             f"(`a red {TRIGGER}`); the base model never saw a {world.NEW_SHAPE}.", "",
             "| prompts | images | prompt accuracy before | after | colour after | shape after | `none` after |",
             "|---|---|---|---|---|---|---|"]
    for g in ("new concept", "old, held-out pairs", "old, training pairs", "all"):
        if g in a:
            lines.append(f"| {g} | {a[g]['n']} | {_pct(b.get(g, {}).get('prompt_accuracy', 0.0))} | "
                         f"**{_pct(a[g]['prompt_accuracy'])}** | {_pct(a[g]['color_accuracy'])} | "
                         f"{_pct(a[g]['shape_accuracy'])} | {_pct(a[g]['none_rate'])} |")
    lines += ["", "A prompt counts as right when the strict judge (library/shapes/judge.py, no learned model) names "
              "both its colour and its shape. The judge answers `none` unless one shape is clearly there "
              "(calibration: docs/demo.md); `grid.png` shows its verdict under every image.", ""]
    lines += _agreement_lines(result)
    lines += ["Files: `grid.png` (before / after, same seeds), `loss.png`, `before/`, `after/`, `report.json`, "
              "`train_network.toml`, `dataset.toml`, `lora/`.", ""]
    if result.get("loss_first") is not None:
        lines.insert(4, f"Training loss (mean of the first / last 50 steps): {result['loss_first']:.4f} -> "
                        f"{result['loss_last']:.4f}.")
    return "\n".join(lines)


def run_demo(out: str | Path, settings: DemoSettings | None = None) -> dict:
    """Run the whole job into ``out`` and return the report (also written as report.json / report.md)."""
    s = settings or DemoSettings()
    out = Path(out)
    if not Path(s.base_model).is_file():
        raise UserError(f"--base_model {s.base_model}: file not found (the repository ships models/shapes-sd1.safetensors)")
    out.mkdir(parents=True, exist_ok=True)
    # a rerun into the same folder starts clean: old images would be judged again and old tensorboard events
    # would be drawn into the new loss curve
    for stale in ("before", "after", "logs"):
        shutil.rmtree(out / stale, ignore_errors=True)
    t0 = time.perf_counter()
    dataset_toml = make_datasets(out, s)
    config = write_train_config(out, dataset_toml, s)
    prompts, groups = write_prompts(out, s)

    logger.info("generating 'before' images with the base model")
    before = generate(out / "before", prompts, s)
    logger.info("training the LoRA: train_network.py --config_file %s", config)
    t_train = time.perf_counter()
    entry.trainer_main("train_network", ["--config_file", str(config)])  # train_network.py's main
    train_seconds = time.perf_counter() - t_train
    lora = out / "lora" / f"{TRIGGER}_heart.safetensors"
    logger.info("generating 'after' images with the LoRA")
    after = generate(out / "after", prompts, s, lora=lora)

    losses = read_losses(out / "logs")
    result = {
        "base_model": s.base_model, "lora": str(lora), "steps": s.steps, "train_config": str(config),
        "train_seconds": train_seconds, "before": judge(before, groups), "after": judge(after, groups),
        "loss_first": sum(losses[1][:50]) / max(1, len(losses[1][:50])) if losses[1] else None,
        "loss_last": sum(losses[1][-50:]) / max(1, len(losses[1][-50:])) if losses[1] else None,
    }
    result["files"] = write_figures(out, before, after, groups, losses,
                                    (result["before"]["images"], result["after"]["images"]))
    result["seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_markdown(result), encoding="utf-8")
    return result
