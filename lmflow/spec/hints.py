"""Hints for error messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def suggest(word: object, choices: Iterable[object]) -> str | None:
    """"did you mean 'x'?" for a near miss, else the list of valid choices."""
    options = sorted({str(c) for c in choices})
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"expected one of: {', '.join(options)}" if options else None
