"""Run a trainer script under ``accelerate launch`` and record, per rank, what it writes and which
validation items it evaluates (for tests/training/test_multiprocess_extras.py).

    accelerate launch ... tests/training/mp_probe.py <PROBE_DIR> <script.py> <trainer args...>

``<PROBE_DIR>/rank<N>.jsonl`` gets one line per written file (``{"write": path}``: ``open`` for writing,
``os.replace``/``os.rename`` targets, safetensors' ``save_file``, ``torch.save``) and one per validation pass
(``{"validation": [captions evaluated by this rank]}``).
"""
import builtins
import json
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for ``library``
PROBE_DIR, SCRIPT = sys.argv[1], sys.argv[2]
_LOG = os.path.join(PROBE_DIR, f"rank{os.environ.get('RANK', '0')}.jsonl")
_open, _replace, _rename = builtins.open, os.replace, os.rename


def _record(entry: dict) -> None:
    with _open(_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def _path(p) -> str:
    return os.path.abspath(os.fsdecode(p))


def _probe_open(file, mode="r", *a, **k):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        _record({"write": _path(file)})
    return _open(file, mode, *a, **k)


def _probe_replace(src, dst, *a, **k):
    _record({"write": _path(dst)})
    return _replace(src, dst, *a, **k)


def _probe_rename(src, dst, *a, **k):
    _record({"write": _path(dst)})
    return _rename(src, dst, *a, **k)


builtins.open, os.replace, os.rename = _probe_open, _probe_replace, _probe_rename

import safetensors.torch  # noqa: E402  (patched before anything binds save_file)

_save_file = safetensors.torch.save_file


def _probe_save_file(tensors, filename, *a, **k):
    _record({"write": _path(filename)})
    return _save_file(tensors, filename, *a, **k)


safetensors.torch.save_file = _probe_save_file

import torch  # noqa: E402  (torch.save writes a path from C++, past the patched open)

_torch_save = torch.save


def _probe_torch_save(obj, f, *a, **k):
    if isinstance(f, (str, bytes, os.PathLike)):
        _record({"write": _path(f)})
    return _torch_save(obj, f, *a, **k)


torch.save = _probe_torch_save

from library.training.extras import validation  # noqa: E402

_run = validation.Validator.run


class _Recording:
    """The validation group, noting the captions of every batch this rank takes."""

    def __init__(self, group, seen: list):
        self.group, self.seen = group, seen

    def __getitem__(self, k):
        batch = self.group[k]
        self.seen.extend(batch["captions"])
        return batch


def _probe_run(self, method):
    seen: list = []
    group, self.group = self.group, _Recording(self.group, seen)
    try:
        return _run(self, method)
    finally:
        self.group = group
        _record({"validation": seen})


validation.Validator.run = _probe_run
sys.argv = [SCRIPT, *sys.argv[3:]]
runpy.run_path(SCRIPT, run_name="__main__")
