"""Plain-code answers for when no model can give one (the last link of a fallback chain)."""

import re


def coach_advice(request):
    """Mutation advice from the numbers in the state alone: low diversity -> raise mutation."""
    text = request["messages"][-1]["content"]
    found = re.search(r"diversity\s+([0-9.]+)", text)
    diversity = float(found.group(1)) if found else 0.5
    mutation = "raise" if diversity < 0.4 else "lower" if diversity > 0.8 else "keep"
    return {"mutation": mutation, "advice": f"heuristic: diversity {diversity:.2f}, {mutation} mutation"}


def ticket_summary(tickets, replies):
    """Count extracted tickets by urgency; tickets the models could not read are null."""
    counts = {"low": 0, "medium": 0, "high": 0, "unread": 0}
    for ticket in tickets:
        counts[ticket["urgency"] if ticket else "unread"] += 1
    return {"tickets": len(tickets), "by_urgency": counts, "replies": len(replies)}
