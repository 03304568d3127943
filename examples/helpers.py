"""Plain Python the examples' `python` steps call."""

from __future__ import annotations


def text_stats(text: str, sentiment: str) -> dict:
    """Count words and characters of a model's answer and keep its classified sentiment."""
    words = text.split()
    return {"words": len(words), "characters": len(text), "sentiment": sentiment}


def tally(labels: list, only: str = "any") -> dict:
    """Count sentiments and topics of the classified messages (null: the model gave no answer)."""
    counts: dict = {"sentiment": {}, "topic": {}, "unanswered": 0}
    for label in labels:
        if label is None:
            counts["unanswered"] += 1
            continue
        if only != "any" and label["sentiment"] != only:
            continue
        for field in ("sentiment", "topic"):
            counts[field][label[field]] = counts[field].get(label[field], 0) + 1
    return counts
