"""Print the environment facts a bug report needs (docs/beyond-sd-scripts.md §5).

    python tools/debug_report.py            # readable text, paste it into the report
    python tools/debug_report.py --json     # the same as JSON

Python, OS, accelerators (name, memory, compute capability), the versions of torch and of the optional
packages this project uses, this project's git commit, accelerate's default config and the environment
variables that change behaviour. Nothing secret: no tokens, no paths outside the listed variables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/x.py` from anywhere

from library.training.extras.receipts import environment_facts, package_versions, project_version  # noqa: E402

ENV_VARS = ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
            "ACCELERATE_CONFIG_FILE", "ACCELERATE_MIXED_PRECISION", "OMP_NUM_THREADS", "WORLD_SIZE")


def accelerate_config() -> dict | None:
    """accelerate's default config file (``accelerate config``), if one exists."""
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:
        return None
    path = os.environ.get("ACCELERATE_CONFIG_FILE", default_config_file)
    if not os.path.isfile(path):
        return None
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            return {"path": path, **(yaml.safe_load(f) or {})}
    except Exception as e:  # a broken config file is itself a fact worth reporting
        return {"path": path, "error": str(e).splitlines()[0]}


def collect() -> dict:
    return {"environment": environment_facts(), "packages": package_versions(), "project": project_version(),
            "accelerate_config": accelerate_config(),
            "env": {name: os.environ[name] for name in ENV_VARS if name in os.environ}}


def as_text(report: dict) -> str:
    lines = []
    for section, content in report.items():
        lines.append(f"[{section}]")
        if not isinstance(content, dict):
            lines.append(f"  {content}")
            continue
        for key, value in content.items():
            lines.append(f"  {key}: {'not installed' if value is None and section == 'packages' else value}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2, default=str) if args.json else as_text(report))


if __name__ == "__main__":
    main()
