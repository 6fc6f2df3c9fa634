"""Shared helpers for trainer end-to-end tests: a tiny model and a generated DreamBooth folder."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
from PIL import Image


def make_shapes_folder(root: Path, repeats: int = 1, n: int = 4, name: str = "sks shape", sizes=None) -> Path:
    """``root/<repeats>_<name>/`` with n coloured-square PNGs and .caption files; returns ``root``."""
    folder = root / f"{repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = sizes or [(64, 64)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        a = np.zeros((h, w, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(f"a {name}, number {i}", encoding="utf-8")
    return root


def base_args(model: Path, data: Path, out: Path, steps: int = 4, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
            "--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "4", "--max_train_steps", str(steps), "--learning_rate", "1e-3",
            "--seed", "7", "--max_data_loader_n_workers", "0", "--console_log_simple", *extra]


def free_port() -> int:
    """A TCP port nothing listens on now. Multi-process tests run side by side under xdist, so a fixed rendezvous
    port (accelerate's and torchrun's default 29500, or one derived from the pid) collides: EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
