"""Run receipts: ``<output_name>.run.json`` beside every saved model (docs/beyond-sd-scripts.md §5).

A receipt says how a file was made: the resolved options (secrets removed), the seed, the versions of
the libraries and of this project (git commit), and a fingerprint of the dataset: a SHA-256 over every
image's path relative to its subset folder, file size and caption, in a fixed order. Two runs with the
same fingerprint trained on the same files with the same captions. ``environment_facts`` is shared
with ``tools/debug_report.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata as importlib_metadata
from typing import Any, Iterable, Mapping, Optional

import torch

from library.fileio import write_text_atomic

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "Pillow", "tokenizers",
            "bitsandbytes", "xformers", "lycoris-lora", "prodigyopt", "lion-pytorch", "dadaptation",
            "deepspeed", "wandb", "tensorboard", "onnxruntime", "onnxruntime-gpu")
CORE = ("torch", "diffusers", "transformers", "accelerate", "safetensors")
# option names whose values are credentials; any name containing one of these words is dropped
SECRET_WORDS = ("token", "api_key", "apikey", "password", "secret")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECEIPT_SUFFIX = ".run.json"


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, Optional[str]]:
    """Installed version of each package, None when it is not installed."""
    out = {}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def project_version() -> dict[str, Any]:
    """This project's git commit and whether the working tree had changes (None outside a git checkout)."""
    def git(*argv: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", PROJECT_ROOT, *argv], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "modified": bool(status) if status is not None else None}


def environment_facts() -> dict[str, Any]:
    """Python, OS, accelerators and library versions: what a bug report or a receipt needs."""
    facts: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                             "machine": platform.machine(), "torch_cuda": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available(), "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            facts["devices"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                     "capability": f"{p.major}.{p.minor}"})
    mps = getattr(torch.backends, "mps", None)
    facts["mps_available"] = bool(mps and mps.is_available())
    return facts


def scrub(config: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON values with every credential removed (names containing a SECRET_WORDS word)."""
    out = {}
    for key, value in sorted(config.items()):
        if any(word in key.lower() for word in SECRET_WORDS):
            continue
        out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else \
            [v if isinstance(v, (str, int, float, bool)) else str(v) for v in value] \
            if isinstance(value, (list, tuple)) else str(value)
    return out


def dataset_fingerprint(groups: Iterable) -> str:
    """SHA-256 over (dataset, subset folder name, relative path, size, caption) of every image, sorted."""
    rows = []
    for part, group in enumerate(groups):
        if group is None:
            continue
        for d, dataset in enumerate(group.datasets):
            for info in dataset.images:
                subset = dataset.subsets[info.subset]
                base = subset.image_dir or os.path.dirname(subset.metadata_file or "") or ""
                rel = os.path.relpath(info.path, base) if base and os.path.isabs(info.path) == os.path.isabs(base) \
                    else os.path.basename(info.path)
                size = os.path.getsize(info.path) if os.path.exists(info.path) else -1
                rows.append(json.dumps([part, d, info.is_reg, rel.replace(os.sep, "/"), size, info.caption]))
    digest = hashlib.sha256()
    for row in sorted(rows):
        digest.update(row.encode("utf-8") + b"\n")
    return digest.hexdigest()


def build_receipt(options: Mapping[str, Any], script: str, fingerprint: str, num_images: dict[str, int]
                  ) -> dict[str, Any]:
    """The receipt's content (without the per-save part)."""
    return {"format": "sd-trainer-run-receipt/1", "script": script, "seed": options.get("seed"),
            "config": scrub(dict(options)), "versions": package_versions(CORE), "project": project_version(),
            "environment": environment_facts(), "dataset": {"fingerprint": fingerprint, **num_images}}


class ReceiptWriter:
    """Checkpointer companion: ``<stem>.run.json`` beside every saved model, written atomically."""

    def __init__(self, receipt: dict[str, Any]):
        self.receipt = receipt

    def after_save(self, stem: str, ext: str, event: str, epoch: int, global_step: int) -> None:
        content = {**self.receipt, "saved": {"file": os.path.basename(stem + ext), "event": event,
                                             "epoch": epoch, "global_step": global_step}}
        write_text_atomic(stem + RECEIPT_SUFFIX, json.dumps(content, indent=2, ensure_ascii=False))

    def paths(self, stem: str, ext: str) -> list[str]:
        return [stem + RECEIPT_SUFFIX]
