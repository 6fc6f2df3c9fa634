"""Allowed ranges of numeric options: declared once, next to each option, checked wherever a value comes from.

An option group declares ``ranged(g.add_argument("--train_batch_size", type=int, ...), at_least(1))``
(the range travels on the argparse action).
``check_ranges(args, parser)`` then checks the final values (command line and ``--config_file`` merged,
or a namespace handed to ``train(args)``), and the dataset TOML schema looks up the range of the option
a dataset key mirrors (``batch_size`` -> ``--train_batch_size``) with ``range_of``. A value outside is
one ``UserError`` naming the option, the value and the range.

Zero or a negative number keeps the meaning sd-scripts gives it where it has one (``--noise_offset 0``
is off, ``--stop_text_encoder_training -1`` is "never"); a value that would crash upstream or train
nonsense (``--network_dim 0``, ``--train_batch_size 0``, ``--max_train_steps -5``) is refused.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Optional

from library.errors import UserError



@dataclass(frozen=True)
class Range:
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # what the edge values mean, e.g. "0 = off"

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)

        if self.lo is not None and self.hi is not None:
            text = f"from {num(self.lo)} to {num(self.hi)}"
            if self.lo_open or self.hi_open:
                text += f" ({'excluding ' + num(self.lo) if self.lo_open else ''}" \
                        f"{' and ' if self.lo_open and self.hi_open else ''}" \
                        f"{'excluding ' + num(self.hi) if self.hi_open else ''})"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        else:
            text = "any number"
        return f"{text}; {self.note}" if self.note else text


def at_least(lo: float, note: str = "") -> Range:
    return Range(lo=lo, note=note)


def above(lo: float, note: str = "") -> Range:
    return Range(lo=lo, lo_open=True, note=note)


def between(lo: float, hi: float, note: str = "", hi_open: bool = False) -> Range:
    return Range(lo=lo, hi=hi, hi_open=hi_open, note=note)


FRACTION = between(0, 1)
SEED = between(0, 2**32 - 1)  # numpy's seed range, which accelerate's set_seed feeds


def ranged(action: argparse.Action, allowed: Range) -> argparse.Action:
    """Attach ``allowed`` to an option just declared; returns the action."""
    action.value_range = allowed  # type: ignore[attr-defined]
    return action


def ranges_of(parser: argparse.ArgumentParser) -> dict[str, Range]:
    """``{dest: range}`` of every option of ``parser`` that declares one."""
    return {a.dest: a.value_range for a in parser._actions if getattr(a, "value_range", None) is not None}


def out_of_range(dest: str, value: Any, allowed: Range, where: str = "") -> str:
    """The one-line message for a value outside its range."""
    place = f" in {where}" if where else ""
    return f"--{dest} {value!r}{place} is out of range: it must be {allowed.describe()}"


def check_ranges(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Raise ``UserError`` for the first option of ``parser`` whose value in ``args`` is outside its range."""
    for action in parser._actions:
        allowed = getattr(action, "value_range", None)
        value = getattr(args, action.dest, None)
        if allowed is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item not in allowed:
                raise UserError(out_of_range(action.dest, item, allowed))
