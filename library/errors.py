"""User-facing errors: one clear line, exit code 2, no traceback."""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import logging
import sys
from typing import Callable, Iterator, NoReturn, Optional, TypeVar

from library.interrupts import EXIT_SIGINT, Interrupted, handled_signals

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input the user can fix (missing file, wrong option, corrupt checkpoint).

    The message is printed as one line naming the file or option; the process exits with 2.
    """

    exit_code = EXIT_BAD_INPUT


class NonFiniteError(UserError):
    """Training produced a NaN / Inf: the message names where, the step and the likely remedy; exit code 3.

    A separate code lets scripts that drive training (sweeps, schedulers) tell a diverged run from bad input.
    """

    exit_code = EXIT_NON_FINITE


class SaveError(UserError, OSError):
    """An output could not be written (disk full, file size limit, no permission, read-only file system).

    Also an ``OSError`` (with the original ``errno``), so code that already handles a failed write goes on
    handling it; the message names the file and what went wrong, and the trainers add the last good checkpoint.
    """

    def __init__(self, message: str, errno: Optional[int] = None, filename: Optional[str] = None):
        super().__init__(message)
        self.message, self.errno, self.filename = message, errno, filename

    def __str__(self) -> str:
        return self.message

    def with_note(self, note: str) -> "SaveError":
        """The same error with ``; note`` appended (e.g. the last good checkpoint)."""
        return SaveError(f"{self.message}; {note}", self.errno, self.filename)


@contextlib.contextmanager
def one_line_argparse_errors() -> Iterator[None]:
    """While a script's ``main`` runs, a command-line error from argparse (unknown option, bad value, missing
    argument) is one ``error:`` line pointing to ``--help``, exit code 2, instead of the whole usage text."""
    original = argparse.ArgumentParser.error

    def error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
        parser.exit(EXIT_BAD_INPUT, f"error: {message} (see {parser.prog} --help)\n")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


# what went wrong, in the words a user searches for
OS_ERROR_WORDS = {
    errno.ENOSPC: "no space left on device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (over the file size limit: see `ulimit -f`, or the file system's maximum)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (a failing disk or network file system)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def describe_os_error(e: OSError) -> Optional[str]:
    """``"FILE: what went wrong"`` for an ``OSError`` a user can fix (disk full, permissions, ...), else None."""
    words = OS_ERROR_WORDS.get(e.errno or -1)
    if words is None:
        return None
    return f"{e.filename}: {words}" if e.filename else words


def exit_on_user_error(main: F) -> F:
    """Decorate a script's ``main``: a ``UserError`` becomes one ``error:`` line on stderr and exit code 2;
    Ctrl-C / SIGTERM become one ``interrupted`` line and exit code 130 / 143 (library/interrupts.py); a
    failed write that escaped the atomic-write layer is one line too. Never a traceback for these."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with handled_signals(), one_line_argparse_errors():
            try:
                return main(*args, **kwargs)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(e.exit_code)
            except Interrupted as e:
                print(e.message, file=sys.stderr)
                sys.exit(e.exit_code)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                sys.exit(EXIT_SIGINT)
            except OSError as e:
                line = describe_os_error(e)
                if line is None:  # not an environment problem the user can fix: keep the traceback
                    raise
                print(f"error: {line}", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)

    return wrapper  # type: ignore[return-value]
