"""Atomic writes: nothing half-written, and finished files get ordinary permissions."""
import os
import stat

import pytest
import torch

from library.fileio import _process_umask, atomic_path, write_text_atomic
from library.models.checkpoint_io import save_state_dict


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_saved_safetensors_get_umask_permissions_not_0600(tmp_path):
    mask = os.umask(0o022)
    _process_umask.cache_clear()  # the umask is read once per process
    try:
        path = tmp_path / "m.safetensors"
        save_state_dict({"a": torch.zeros(2)}, str(path))  # safetensors itself creates 0600 files
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(mask)
        _process_umask.cache_clear()
