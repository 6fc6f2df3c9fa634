"""Ctrl-C (SIGINT) and SIGTERM: one line, exit code 128 + signal (130 / 143), never a traceback.

Every script's ``main`` runs inside :func:`handled_signals` (through ``library.errors.exit_on_user_error``):
a signal raises :class:`Interrupted`, so ``finally`` blocks run and the atomic-write layer removes its
temporary files. Inside :func:`graceful_stop` (the training loop with ``--save_state``) the first Ctrl-C
only sets a flag: the loop finishes the current optimizer step, saves a resumable state and then stops;
a second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator, Optional

logger = logging.getLogger(__name__)

EXIT_SIGINT = 128 + signal.SIGINT  # 130, the shell's code for a Ctrl-C'd command
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class Interrupted(BaseException):
    """A signal asked the process to stop. A ``BaseException``, like ``KeyboardInterrupt``, so that no
    ``except Exception`` on the way up swallows it."""

    def __init__(self, signum: int, message: str = "interrupted"):
        super().__init__(message)
        self.signum, self.message = int(signum), message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def with_message(self, message: str) -> "Interrupted":
        return Interrupted(self.signum, message)


class _State:
    owner_pid: Optional[int] = None  # the process whose handlers these are (forked children inherit them)
    graceful = False
    requested: Optional[int] = None


def _handler(signum: int, frame) -> None:
    if os.getpid() != _State.owner_pid:
        # a forked child (a DataLoader worker) inherited this handler: behave as if it had none
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _State.graceful and signum == signal.SIGINT and _State.requested is None:
        _State.requested = signum
        logger.warning("Ctrl-C: finishing the current step, then saving a resumable state and stopping "
                       "(press Ctrl-C again to stop at once)")
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handled_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` while the block runs (main thread only; a handler
    someone else installed is left alone)."""
    if threading.current_thread() is not threading.main_thread() or _State.owner_pid == os.getpid():
        yield  # not possible here, or already handled by an outer main
        return
    previous = {}
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        current = signal.getsignal(signum)
        if current is default:
            previous[signum] = signal.signal(signum, _handler)
    _State.owner_pid, _State.graceful, _State.requested = os.getpid(), False, None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _State.owner_pid, _State.graceful, _State.requested = None, False, None


@contextlib.contextmanager
def graceful_stop(enabled: bool) -> Iterator[None]:
    """While the block runs, a first Ctrl-C sets :func:`stop_requested` instead of stopping at once."""
    _State.graceful, _State.requested = bool(enabled) and _State.owner_pid == os.getpid(), None
    try:
        yield
    finally:
        _State.graceful = False


def stop_requested() -> bool:
    """True after a graceful Ctrl-C: the caller should save what it needs and raise :func:`stop_now`."""
    return _State.requested is not None


def stop_now() -> Interrupted:
    """The :class:`Interrupted` that ends a run after a graceful stop (raise it)."""
    return Interrupted(_State.requested or signal.SIGINT)
