"""One run per output name: ``<output_dir>/.<output_name>.lock`` while a trainer runs.

A second run that would write the same names stops with exit code 2 naming the other process (pid, host,
start time), before any model is loaded; ``--dry_run`` checks the same without taking the lock. A lock
whose process is gone from this host (a killed run) is stale: it is replaced, and the temporaries that
run left behind are cleaned up. Under a multi-process launch only the main process (RANK 0) locks.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

from library.errors import UserError
from library.fileio import clean_stale_temporaries, save_errors
from library.training.loop import output_names as names

logger = logging.getLogger(__name__)

_held: Optional[str] = None  # the lock file this process holds
_made_folders: list[str] = []  # folders the lock created, deepest first (removed again if the run wrote nothing)
_atexit_registered = False


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: float  # time.time() when the run took the lock
    process_start: Optional[str] = None  # /proc start time of pid: tells a reused pid from the owner

    @classmethod
    def me(cls) -> "LockOwner":
        return cls(os.getpid(), socket.gethostname(), time.time(), _process_start(os.getpid()))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, started {when}"

    def alive(self) -> bool:
        """False only when we can tell the owner is gone: same host, and no such process (or a reused pid)."""
        if self.host != socket.gethostname():
            return True  # another machine sharing the folder: we cannot look, so assume it runs
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's live process
        now = _process_start(self.pid)
        return not (self.process_start and now and now != self.process_start)


def lock_path(args: argparse.Namespace) -> str:
    """``<output_dir>/.<output_name>.lock`` (``last`` when --output_name is not given, sd-scripts' final name)."""
    return os.path.join(args.output_dir or ".", f".{names.last_name(args.output_name)}.lock")


def is_main_process() -> bool:
    """RANK (or LOCAL_RANK) 0, or no launcher at all: the process that saves, and so the one that locks."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return rank.strip() in ("", "0")


def hold(args: argparse.Namespace) -> None:
    """Take this run's lock (``--dry_run``: only check that no live run holds it). Call it once the output
    folder has been checked and before any model loads; :func:`releasing` frees it when the run ends."""
    if not is_main_process():
        return
    path = lock_path(args)
    if getattr(args, "dry_run", False):
        _raise_if_live(path, _read(path))
        return
    _acquire(path)
    out = args.output_dir or "."
    clean_stale_temporaries(out, _belongs_to(names.last_name(args.output_name), out))


@contextlib.contextmanager
def releasing() -> Iterator[None]:
    """Run a trainer; the lock it took (if any) is removed when it ends, however it ends."""
    try:
        yield
    finally:
        release()


def release() -> None:
    """Remove the lock this process holds (only if it is still ours)."""
    global _held, _made_folders
    path, _held, made, _made_folders = _held, None, _made_folders, []
    if path is None:
        return
    owner = _read(path)
    if owner is not None and owner.pid == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)
    for folder in made:  # a run that stopped before saving anything leaves no empty output folder
        try:
            os.rmdir(folder)
        except OSError:
            break


def _acquire(path: str) -> None:
    global _held, _atexit_registered, _made_folders
    me = LockOwner.me()
    with save_errors(path):
        _made_folders = _missing_folders(os.path.dirname(os.path.abspath(path)))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        for _ in range(3):  # a stale lock is replaced; racing starters each try again
            if _create(path, me):
                _held = path
                if not _atexit_registered:  # a run that never reaches `releasing` (a runner called directly)
                    atexit.register(release)
                    _atexit_registered = True
                return
            owner = _read(path)
            _raise_if_live(path, owner)
            logger.info("replacing the stale lock %s (%s)", path,
                        f"{owner.describe()}, no longer running" if owner else "unreadable")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    raise UserError(f"{path}: cannot take the run lock (other runs keep starting with this output name)")


def _missing_folders(folder: str) -> list[str]:
    missing = []
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _create(path: str, owner: LockOwner) -> bool:
    """Write the lock complete under a private name, then link it into place: never a half-written lock."""
    tmp = f"{path}.{owner.pid}.writing"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(owner), f)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _read(path: str) -> Optional[LockOwner]:
    try:
        with open(path, encoding="utf-8") as f:
            return LockOwner(**json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        logger.warning("%s is not a lock this project wrote; treating it as stale", path)
        return None


def _raise_if_live(path: str, owner: Optional[LockOwner]) -> None:
    if owner is None or owner.pid == os.getpid() or not owner.alive():
        return  # no lock, our own (an earlier in-process run), or a killed run's
    raise UserError(f"another run is writing the same output names: {owner.describe()} holds {path}; wait for it "
                    "to finish or choose another --output_name / --output_dir (delete the lock file only if that "
                    "run is gone)")


def _belongs_to(output_name: str, folder: str):
    """Names of this output name's files (``NAME.ext``, ``NAME-...``); not those of another live run whose
    name merely starts the same way (``NAME-v2``)."""
    others = [n for n in _live_lock_names(folder) if n != output_name and n.startswith(output_name)]

    def belongs(target: str) -> bool:
        mine = target == output_name or target.startswith((output_name + "-", output_name + "."))
        return mine and not any(target == o or target.startswith((o + "-", o + ".")) for o in others)

    return belongs


def _live_lock_names(folder: str) -> list[str]:
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            m = re.match(r"^\.(.+)\.lock$", entry)
            owner = _read(os.path.join(folder, entry)) if m else None
            if owner is not None and owner.alive():
                found.append(m.group(1))
    return found


def _process_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
