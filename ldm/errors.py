"""The one exception the library raises for bad input.

A command prints it as one line (``<command>: error: <message>``) and exits with status 2; the
message names the file, flag, shape or dtype at fault. It is a ``ValueError``, so library callers that
catch ``ValueError`` keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: a missing or foreign file, a flag out of range, a model that does not fit."""
