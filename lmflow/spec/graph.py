"""The step graph: `foreach` sources, `when` conditions, ordering beyond data references, cycles.

`steps.StepsChecker` finds each step's references; the functions here turn
the rest of a step's controls into dependencies and problems with positions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import Problem
from . import templates
from .hints import suggest as _suggest
from .loader import Document, PathT
from .model import Foreach, ModelConfig


def explicit_and_state_order(doc: Document, parsed: list, prepared: dict[str, dict],
                              models: dict[str, ModelConfig], registered: dict[str, Any], spec_ids: set[str],
                              deps: dict[str, list[str]], problems: list[Problem],
                              nested: dict[str, tuple[list[str], list[str], bool]] | None = None) -> None:
    """Dependencies beyond data references: `after: [ids]`, and the written order around steps
    that change a model's or a server's state (a prompt written after `load_model` runs after it;
    an `unload_model` runs after the prompts written before it). A loop uses what the steps of
    its checkpoints use (`nested`: loop id -> model aliases, servers, whether they change them)."""
    last_change: dict[tuple[str, str], str] = {}
    users_since: dict[tuple[str, str], list[str]] = {}
    for i, raw, kind_name, _options in parsed:
        step_id = raw["id"]
        after = raw.get("after")
        for j, target in enumerate(after if isinstance(after, list) else []):
            if target == step_id:
                problems.append(doc.problem(("steps", i, "after", j),
                                            f"step '{step_id}' cannot come after itself"))
            elif target not in spec_ids:
                problems.append(doc.problem(("steps", i, "after", j), f"unknown step '{target}'",
                                            _suggest(target, spec_ids - {step_id})))
            elif target not in deps[step_id]:
                deps[step_id].append(target)
        kind = registered[kind_name]
        options = prepared.get(step_id)
        if options is None:
            continue
        if nested and step_id in nested:
            aliases, servers, changes_state = nested[step_id]
        else:
            aliases = [a for a in kind.models(options) if isinstance(a, str)]
            servers, changes_state = kind.servers(options), kind.changes_state
        changed = {("model", a) for a in aliases} | {("server", s) for s in servers}
        used = changed | {("server", models[a].server) for a in aliases if a in models}
        for resource in used:
            earlier = last_change.get(resource)
            if earlier is not None and earlier not in deps[step_id] and earlier != step_id:
                deps[step_id].append(earlier)
        if changes_state:
            for resource in changed:
                for user in users_since.pop(resource, []):
                    if user not in deps[step_id] and user != step_id:
                        deps[step_id].append(user)
                last_change[resource] = step_id
        for resource in used - (changed if changes_state else set()):
            users_since.setdefault(resource, []).append(step_id)


def at(doc: Document, path: PathT, offset: int | None) -> Any:
    """problem(message, hint) at `path`, moved `offset` characters into its value when known."""
    def problem(message: str, hint: str | None = None) -> Problem:
        found = doc.problem(path, message, hint)
        if offset is None or found.line is None:
            return found
        line = doc.lines[found.line - 1] if found.line <= len(doc.lines) else ""
        quoted = 1 if line[found.col - 1:found.col] in ("'", '"') else 0
        return dataclasses.replace(found, col=(found.col or 1) + quoted + offset)
    return problem


def foreach_source(doc: Document, i: int, raw: Any, spec_dir: Path,
                   problems: list[Problem]) -> Foreach | None:
    """The source of a map; a dataset file must exist and be JSONL, JSON or CSV (a path that holds a
    reference, `{file: "${{ params.dataset }}"}`, is checked when the step starts)."""
    path = ("steps", i, "foreach")
    if isinstance(raw, list):
        return Foreach("value", raw)
    if isinstance(raw, str):
        if not templates.is_whole_reference(raw):
            problems.append(doc.problem(path, f"foreach {raw!r} is neither a list nor one reference",
                                        "e.g. foreach: ${{ steps.split.output }} or {file: data.jsonl}"))
            return None
        return Foreach("value", raw)
    if isinstance(raw, dict) and isinstance(raw.get("file"), str):
        from ..datasets import FORMATS

        name = raw["file"]
        if "${{" in name:  # its path comes from params or a step: checked when the step starts
            return Foreach("file", name)
        if Path(name).suffix.lower() not in FORMATS:
            problems.append(doc.problem(path + ("file",), f"cannot read {name} as a dataset",
                                        f"use one of: {', '.join(FORMATS)} (one object per row)"))
        elif not (spec_dir / name).is_file():
            problems.append(doc.problem(path + ("file",), f"file not found: {name}",
                                        "paths are relative to the spec's folder"))
        return Foreach("file", name)
    if isinstance(raw, dict) and isinstance(raw.get("glob"), str):
        return Foreach("glob", raw["glob"])
    return None  # the schema reports it


def condition(doc: Document, path: PathT, raw: Any, roots: tuple[str, ...], depend: Any,
              problems: list[Problem], defined_in: dict[str, str] | None = None) -> Any:
    """A parsed condition (its references become dependencies), or a constant bool;
    `defined_in`: where each root a kind offers is defined (`loop` -> "a loop's checkpoint and
    until"), for the hint when a condition uses it elsewhere."""
    from .expressions import ExpressionError, parse_expression

    if isinstance(raw, bool) or not isinstance(raw, str):
        return raw if isinstance(raw, bool) else None
    try:
        expression = parse_expression(raw, roots)
    except ExpressionError as exc:
        hint = None
        if "item" not in roots and ("item" in str(exc) or "index" in str(exc)):
            hint = "item and index are only defined in a step with foreach"
        else:
            hint = next((f"{root} is only defined in {where}" for root, where in (defined_in or {}).items()
                         if root not in roots and root in str(exc)), None)
        problems.append(at(doc, path, exc.offset)(f"invalid condition: {exc.message}", hint))
        return None
    for ref in expression.references:
        text = ".".join([ref.root, *map(str, ref.path)])
        depend(path, ref.root, ref.path, text, ref.offset)
    return expression


def order(doc: Document, parsed: list, deps: dict[str, list[str]],
           problems: list[Problem]) -> list[str]:
    """Topological order that keeps the written order where dependencies allow; finds cycles."""
    index = {raw["id"]: i for i, raw, _k, _o in parsed}
    state: dict[str, int] = {}  # 1 = visiting, 2 = done
    order: list[str] = []
    reported: set[frozenset] = set()

    def visit(node: str, stack: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = stack[stack.index(node):] + [node]
            key = frozenset(cycle)
            if key not in reported:
                reported.add(key)
                problems.append(doc.problem(("steps", index[node], "id"),
                                            "dependency cycle: " + " -> ".join(cycle),
                                            "each step uses the output of the next one: break the cycle"))
            return
        state[node] = 1
        for dep in deps.get(node, ()):
            if dep in index:
                visit(dep, stack + [node])
        state[node] = 2
        order.append(node)

    for _i, raw, _k, _o in parsed:
        visit(raw["id"], [])
    return order

