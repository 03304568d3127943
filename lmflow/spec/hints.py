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


def known_keys(word: object, keys: Iterable[object], shown: int = 20) -> str:
    """What an object that lacks the key `word` has: "keys: a, b; did you mean 'x'?" (the first
    `shown` keys, in order, and the closest one), or "it has no keys"."""
    names = sorted({str(k) for k in keys})
    if not names:
        return "it has no keys"
    listed = ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")
    close = nearest(word, names[:1000])  # (a typo's match among more is not worth the time)
    return f"keys: {listed}" + (f"; did you mean '{close}'?" if close else "")
