"""Hints for error messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def nearest(word: object, choices: Iterable[object]) -> str | None:
    """The choice closest to `word`, when one is close enough to be a typo of it."""
    close = difflib.get_close_matches(str(word), sorted({str(c) for c in choices}), n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(word: object, choices: Iterable[object]) -> str | None:
    """"did you mean 'x'?" for a near miss, else the list of valid choices."""
    options = sorted({str(c) for c in choices})
    close = nearest(word, options)
    if close:
        return f"did you mean '{close}'?"
    return f"expected one of: {', '.join(options)}" if options else None
