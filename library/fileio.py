"""Atomic file and folder writes: a kill during a save never leaves a half-written output."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only if the block succeeds.

    Works for files and for folders (a folder target replaces an existing one only at the end).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # the caller creates a file or a folder at this name
    try:
        yield tmp
        if os.path.isdir(tmp):
            if path.exists():
                old = f"{tmp}.old"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            if path.is_dir():
                shutil.rmtree(path)
            _umask_permissions(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def _umask_permissions(file: str) -> None:
    """Give a finished file the permissions a plain ``open()`` would (0666 minus the umask).

    Some writers (safetensors >= 0.8 among them) create their files 0600; on a shared machine a saved
    model would then be unreadable by the group, unlike every other output."""
    with contextlib.suppress(OSError):
        os.chmod(file, 0o666 & ~_process_umask())


@functools.lru_cache(maxsize=1)
def _process_umask() -> int:
    # reading the umask means setting it; doing that once (first save, normally before any upload thread
    # exists) keeps other threads' file creations from ever seeing a zero umask
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
