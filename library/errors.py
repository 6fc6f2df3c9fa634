"""User-facing errors: one clear line, exit code 2, no traceback."""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, TypeVar

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


def exit_on_user_error(main: F) -> F:
    """Decorate a script's ``main`` so a ``UserError`` becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)

    return wrapper  # type: ignore[return-value]
