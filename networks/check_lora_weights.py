#!/usr/bin/env python
"""Print the LoRA tensors of a file with their shapes and magnitudes (spec utilities §11).

Output: ``number of LoRA modules: N`` (N counts ``lora_up`` and ``lora_down`` keys, two per module),
then one line per key ``key,(d0-d1-…),mean(|w|),min(|w|)``. With ``-s`` the other keys (alphas, ...)
follow and ``number of all modules: M`` is printed (M = all keys). Deviation: sd-scripts' ``-s`` lists
the LoRA keys a second time (a faulty filter); here every key appears once. Values are printed as
plain numbers (sd-scripts printed ``tensor(...)``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python networks/x.py` from anywhere

import torch  # noqa: E402

from library.errors import exit_on_user_error  # noqa: E402
from library.log import add_logging_arguments, setup_logging_from_args  # noqa: E402
from library.formats.lora_io import load_state_dict_file  # noqa: E402

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=str, help="LoRA file (.safetensors, .ckpt or .pt)")
    p.add_argument("-s", "--show_all_keys", action="store_true",
                   help="also list the non-LoRA keys (alphas, ...) and print the total number of keys")
    add_logging_arguments(p)
    return p


setup_parser = build_parser  # sd-scripts' name for it (wrappers import it)


def tensor_line(key: str, value: torch.Tensor) -> str:
    """``key,(d0-d1-…),mean(|w|),min(|w|)`` (shape as sd-scripts: the tuple with ``, `` → ``-``)."""
    shape = str(tuple(value.shape)).replace(", ", "-")
    magnitude = value.float().abs()
    if magnitude.numel() == 0:
        return f"{key},{shape},nan,nan"
    return f"{key},{shape},{float(magnitude.mean())},{float(magnitude.min())}"


def report_lines(sd: dict[str, torch.Tensor], show_all_keys: bool) -> list[str]:
    """The lines the tool prints, in file order."""
    lora_keys = [k for k in sd if "lora_up" in k or "lora_down" in k]
    keys = list(lora_keys)
    lines = [f"number of LoRA modules: {len(lora_keys)}"]
    if show_all_keys:
        chosen = set(lora_keys)
        keys += [k for k in sd if k not in chosen]
        lines.append(f"number of all modules: {len(keys)}")
    lines += [tensor_line(k, sd[k]) for k in keys]
    return lines


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging_from_args(args)
    logger.info("loading: %s", args.file)
    for line in report_lines(load_state_dict_file(args.file), args.show_all_keys):
        print(line)


if __name__ == "__main__":
    main()
