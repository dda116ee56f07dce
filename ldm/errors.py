"""The one exception the library raises for bad input.

A command prints it as one line (``<command>: error: <message>``) and exits with status 2; the
message names the file, flag, shape or dtype at fault. It is a ``ValueError``, so library callers that
catch ``ValueError`` keep working.
"""

from __future__ import annotations

import sys


class InputError(ValueError):
    """Bad input: a missing or foreign file, a flag out of range, a model that does not fit."""


def command_main(name: str, build_parser, run, argv: list[str] | None = None) -> int:
    """A command's ``main``: parse ``argv``, ``run(args)``; an InputError is one line, exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
