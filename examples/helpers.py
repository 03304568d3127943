"""Plain Python the quickstart's `python` step calls."""

from __future__ import annotations


def text_stats(text: str, sentiment: str) -> dict:
    """Count words and characters of a model's answer and keep its classified sentiment."""
    words = text.split()
    return {"words": len(words), "characters": len(text), "sentiment": sentiment}
