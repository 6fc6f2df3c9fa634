"""Atomic file and folder writes: a kill or a failed write never leaves a half-written output.

A write that fails because of the machine (disk full, file size limit, no permission, read-only file
system) becomes :class:`~library.errors.SaveError`: one line naming the file and what went wrong, exit
code 2. The temporary is removed on every failure path; temporaries of a killed process (``.NAME.XXXX.tmp``,
``NAME.saving``) are recognised by :func:`clean_stale_temporaries` at the next run into the folder.
"""
from __future__ import annotations

import contextlib
import errno as errno_codes
import functools
import logging
import os
import re
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from library.errors import OS_ERROR_WORDS as _WORDS, SaveError

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".saving"  # a folder several processes write before it is renamed (state folders)
_OLD_SUFFIX = ".old"  # the previous version of a replaced folder, during the swap
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp(?P<old>\.old)?$")
# writers that are not Python file objects report the OS error in their message
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|Os \{ code: (\d+)|\[Errno (\d+)\]")
_WRITE_FAILED_TEXT = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def write_failure(e: BaseException, folder: str | os.PathLike) -> Optional[tuple[str, Optional[int]]]:
    """``(what went wrong, errno)`` when ``e``, raised while writing into ``folder``, is an I/O failure;
    None for anything else (a bug must keep its traceback)."""
    if isinstance(e, OSError):  # other OS errors (a missing input read while saving) keep their own handling
        return (_WORDS[e.errno], e.errno) if e.errno in _WORDS else None
    text = str(e)
    found = _OS_ERROR_IN_TEXT.search(text)
    if found:
        code = int(next(g for g in found.groups() if g))
        return _WORDS.get(code, os.strerror(code)), code
    if any(marker in text for marker in _WRITE_FAILED_TEXT):
        return _guess_write_failure(folder)
    return None


def _guess_write_failure(folder: str | os.PathLike) -> tuple[str, Optional[int]]:
    """A writer that lost the errno (torch.save's C++ stream): the two usual causes, checked."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 1 << 20:
            return _WORDS[errno_codes.ENOSPC], errno_codes.ENOSPC
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"{_WORDS[errno_codes.EFBIG]}; the limit is {soft} bytes", errno_codes.EFBIG
    return "the write failed (disk full or a file size limit?)", None


@contextlib.contextmanager
def save_errors(path: str | os.PathLike, staging: Optional[str] = None) -> Iterator[None]:
    """Turn an I/O failure inside the block into :class:`SaveError` naming ``path`` (and, for a folder
    written at ``staging``, the file inside it that failed)."""
    try:
        yield
    except SaveError:
        raise
    except Exception as e:
        found = write_failure(e, os.path.dirname(os.path.abspath(path)) or ".")
        if found is None:
            raise
        words, code = found
        inner = getattr(e, "filename", None)
        where = ""
        if staging and isinstance(inner, str) and os.path.abspath(inner).startswith(os.path.abspath(staging) + os.sep):
            where = f" (writing {os.path.relpath(inner, staging)})"
        raise SaveError(f"cannot save {path}{where}: {words}", code, str(path)) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only if the block succeeds.

    Works for files and for folders (a folder target replaces an existing one only at the end). On any
    failure, an interrupt included, the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    with save_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)  # the caller creates a file or a folder at this name
    try:
        with save_errors(path, staging=tmp):
            yield tmp
            if os.path.isdir(tmp):
                replace_folder(tmp, str(path))
            else:
                if path.is_dir():
                    shutil.rmtree(path)
                _umask_permissions(tmp)
                os.replace(tmp, path)
    finally:
        remove_path(tmp)


def replace_folder(new: str, target: str) -> None:
    """Rename the finished folder ``new`` onto ``target``; an old ``target`` is moved aside first and put
    back if the swap fails, so ``target`` is never lost."""
    if not os.path.exists(target):
        os.replace(new, target)
        return
    old = new + _OLD_SUFFIX
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_path(path: str) -> None:
    """Remove a file or a folder tree if it exists (cleanup: never raises)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(path)


def temporary_target(name: str) -> Optional[tuple[str, bool]]:
    """``(target name, is the moved-aside old version)`` when ``name`` is a temporary of this module."""
    m = _TEMP_NAME.match(name)
    if m:
        return m.group("target"), bool(m.group("old"))
    for suffix, old in ((STAGING_SUFFIX, False), (_OLD_SUFFIX, True)):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], old
    return None


def clean_stale_temporaries(folder: str | os.PathLike, belongs: Callable[[str], bool]) -> list[str]:
    """Remove the temporaries a killed process left in ``folder`` for targets ``belongs`` accepts; a
    moved-aside old version whose target is missing (killed mid-swap) is put back instead. Returns the
    names handled. Call it only while no other process can be writing these targets (the run lock)."""
    handled = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        names = sorted(os.listdir(folder))
        for name in names:
            found = temporary_target(name)
            if found is None or not belongs(found[0]):
                continue
            target, old = found
            path, target_path = os.path.join(folder, name), os.path.join(folder, target)
            if old and not os.path.exists(target_path):
                os.replace(path, target_path)
                logger.info("restored %s from %s, left by a run that was stopped while replacing it",
                            target_path, name)
            else:
                remove_path(path)
                logger.info("removed %s, left unfinished by a run that was stopped while saving", path)
            handled.append(name)
    return handled


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
