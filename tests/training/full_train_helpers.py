"""Helpers for the train_db / fine_tune / train_textual_inversion end-to-end tests."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from library.training.objective import diffusion_step


def common_args(model: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """Options every trainer test uses: tiny model, 64 px, fixed seed, no worker processes."""
    return ["--pretrained_model_name_or_path", str(model), "--resolution", "64", "--output_dir", str(out),
            "--max_train_steps", str(steps), "--seed", "7", "--max_data_loader_n_workers", "0",
            "--console_log_simple", *extra]


def write_config(args: list[str], path: Path) -> Path:
    """The same options as a sectioned ``--config_file`` TOML (flags -> true, numbers as numbers)."""
    lines, i = [], 0
    while i < len(args):
        key = args[i][2:]
        if i + 1 == len(args) or args[i + 1].startswith("--"):
            lines.append(f"{key} = true")
            i += 1
            continue
        value = args[i + 1]
        try:
            float(value)
            lines.append(f"{key} = {value}")
        except ValueError:
            lines.append(f"{key} = {json.dumps(value)}")
        i += 2
    path.write_text("[model]\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .ckpt/.pt file (a ``state_dict`` wrapper is unwrapped)."""
    if str(path).endswith(".safetensors"):
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return obj["state_dict"] if "state_dict" in obj else obj


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def part(sd: dict, prefix: str) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


UNET = "model.diffusion_model."
TE = "cond_stage_model."


def doc_example(doc: Path, swaps: dict, dest: Path, toml_start: str = "") -> tuple[Path, str]:
    """A docs page's worked example: its first ```toml block (the one starting with ``toml_start``) written to
    ``dest`` with the keys in ``swaps`` replaced (None drops the key), and its ``accelerate launch`` command."""
    text = doc.read_text(encoding="utf-8")
    toml_text = re.search(r"```toml\n(" + re.escape(toml_start) + r".*?)```", text, re.S).group(1)
    command = re.search(r"```bash\n(accelerate launch .*?)```", text, re.S).group(1)
    lines = []
    for line in toml_text.splitlines():
        key = line.split("=")[0].strip()
        if key in swaps:
            if swaps[key] is not None:
                lines.append(f"{key} = {json.dumps(swaps[key])}")
            continue
        lines.append(line)
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest, command


def nan_loss_from_call(monkeypatch, first_bad: int) -> None:
    """Make the loss NaN from the ``first_bad``-th loss computation on (the non-finite guard's tests)."""
    original, calls = diffusion_step.reduce_and_weight, {"n": 0}

    def nan_from(*args):
        calls["n"] += 1
        loss = original(*args)
        return loss * float("nan") if calls["n"] >= first_bad else loss

    monkeypatch.setattr(diffusion_step, "reduce_and_weight", nan_from)
