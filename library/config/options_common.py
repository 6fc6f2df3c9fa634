"""Helpers shared by the option modules: titled ``--help`` sections."""
from __future__ import annotations

import argparse
from typing import Union

# an add_*_arguments function accepts a parser or an argument group of one
Container = Union[argparse.ArgumentParser, "argparse._ArgumentGroup"]


def section(parser: Container, title: str, description: str | None = None) -> Container:
    """A titled argument group when given a parser; the group itself when given a group.

    argparse cannot nest groups, so a caller that already made a group keeps its options in it.
    """
    if isinstance(parser, argparse.ArgumentParser):
        return parser.add_argument_group(title, description)
    return parser
