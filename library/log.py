"""Logging set-up shared by every script (sd-scripts' --console_log_* options)."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

import torch

_configured = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test capture and redirection swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: str | None = None, log_file: str | None = None, simple: bool = False) -> None:
    """Configure the root logger once.

    Rich output on a terminal; a plain ``LEVEL name: message`` format when ``simple`` is set, when
    writing to a file, or when stderr is not a TTY (CI logs stay readable).
    """
    global _configured
    if _configured:
        return
    _configured = True
    lvl = getattr(logging, (level or "INFO").upper())
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        simple = True
    elif not simple and sys.stderr.isatty():
        try:
            from rich.logging import RichHandler  # optional package

            handler = RichHandler(show_path=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = _StderrHandler()
            simple = True
    else:
        handler = _StderrHandler()
        simple = True
    if simple:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.setLevel(lvl)
    root.addHandler(handler)
    # third-party chatter at INFO drowns our own lines
    for noisy in ("diffusers", "transformers", "accelerate", "PIL", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    quiet_known_warnings()


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


def quiet_known_warnings() -> None:
    """Drop third-party warnings that fire on correct use (we cast frozen models on purpose)."""
    _quiet_deepspeed_probe()
    drop = _DropMessages("that should be kept in float32")
    for name in ("diffusers.models.modeling_utils", "diffusers"):
        logging.getLogger(name).addFilter(drop)
    try:
        from diffusers.utils import logging as dlog  # start-up (diffusers: ~2 s)

        dlog.get_logger("diffusers.models.modeling_utils").addFilter(drop)
    except ImportError:
        pass


def _quiet_deepspeed_probe() -> None:
    """accelerate imports DeepSpeed whenever it is installed, and DeepSpeed then warns "Setting accelerator
    to CPU" on every machine without a GPU, in every run, DeepSpeed used or not. On such a machine CPU is
    the answer its probe would reach anyway, so it is given up front (only when nobody chose already)."""
    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return

    others = (torch.cuda.is_available(), getattr(torch, "xpu", None) is not None and torch.xpu.is_available(),
              torch.backends.mps.is_available(), importlib.util.find_spec("torch_npu") is not None,
              importlib.util.find_spec("habana_frameworks") is not None)
    if not any(others):
        os.environ["DS_ACCELERATOR"] = "cpu"


def add_logging_arguments(parser) -> None:
    """sd-scripts' ``add_logging_arguments`` (spec cli-options §1)."""
    parser.add_argument("--console_log_level", type=str, default=None,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="console log level (default INFO)")
    parser.add_argument("--console_log_file", type=str, default=None,
                        help="write the log to this file instead of the console")
    parser.add_argument("--console_log_simple", action="store_true",
                        help="plain log lines (no rich formatting)")


def setup_logging_from_args(args) -> None:
    setup_logging(getattr(args, "console_log_level", None), getattr(args, "console_log_file", None),
                  getattr(args, "console_log_simple", False))
