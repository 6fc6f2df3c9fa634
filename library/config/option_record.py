"""``OptionRecord``: a run's resolved options, read-only.

The record is what gets written down about a run (``ss_*`` metadata, modelspec, receipts, trackers) and what
a third-party network plug-in's ``prepare_network(args)`` receives; behaviour below the runner reads typed
settings sections instead (``library/training/settings``). Attribute access mirrors the option names, so the
record reads like the parsed options it was made from, but nothing can change it.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping


class OptionRecord(Mapping[str, Any]):
    """Immutable mapping of option name -> value, with attribute access (``record.learning_rate``)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    @classmethod
    def of(cls, options: Any) -> "OptionRecord":
        """From parsed options (an argparse result or any object with ``__dict__``) or a mapping."""
        return options if isinstance(options, OptionRecord) else cls(options if isinstance(options, Mapping)
                                                                     else vars(options))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no option {name!r} in this record") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the option record is read-only (tried to set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the option record is read-only (tried to delete {name!r})")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"OptionRecord({len(self._values)} options)"

    def __reduce__(self):  # picklable (data-loader workers may receive objects holding it)
        return (OptionRecord, (self._values,))
