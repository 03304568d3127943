"""The steps of a spec: kinds, options, references between steps, controls and their order.

`StepsChecker` checks one list of steps where it stands (`Scope`): the spec's top level, or a
list that a kind holds (`Step.holds`, the loop's checkpoints), which the kind validates through
`Nest` in its `check_nested`. References between steps become dependencies (`graph` orders them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Problem
from ..steps import CheckContext, kinds
from ..steps.base import Holds, Step
from . import graph, templates
from .hints import suggest as _suggest
from .loader import Document, PathT, format_path
from .model import ModelConfig, Policy, StepSpec
from .policy import step_policy, with_params
from .schema import COMMON_STEP_KEYS

#: keys about a map's items: only with foreach
_ITEM_KEYS = ("parallel", "on_item_error", "grain", "distribute")
#: keys of a step that only a top-level step has (a held list runs in the order written)
_TOP_LEVEL_ONLY = ("foreach", "parallel", "on_item_error", "grain", "distribute", "after")


def _field_problem(schema: dict[str, Any] | None, field_path: tuple) -> str | None:
    """Why `field_path` cannot exist in an output with this schema (None if it can)."""
    walked = "output"
    for part in field_path:
        if not isinstance(schema, dict):
            return None
        if isinstance(part, int):
            if schema.get("type") not in (None, "array"):
                return f"{walked} is {schema.get('type')}, not a list"
            schema = schema.get("items")
        else:
            props = schema.get("properties")
            if schema.get("type") not in (None, "object"):
                return f"{walked} is {schema.get('type')}, it has no field '{part}'"
            if props is not None and part not in props and not schema.get("additionalProperties"):
                hint = _suggest(part, props)
                return f"{walked} has no field '{part}' in its response_schema ({hint})"
            schema = (props or {}).get(part)
        walked += f"[{part}]" if isinstance(part, int) else f".{part}"
    return None


@dataclass
class Scope:
    """Where a list of steps stands: the spec's top level, or a list a step holds."""

    base: PathT = ("steps",)
    #: the step that holds this list, and what its kind offers it (None: the top level)
    holder: str | None = None
    holds: Holds | None = None
    #: top-level steps a held step may refer to, and their output schemas
    outer: dict[str, dict | None] = field(default_factory=dict)
    #: where a held step's references to top-level steps go: the holding step's own dependencies
    outer_deps: list[str] = field(default_factory=list)
    #: every id given so far, anywhere in the spec (ids are unique across held lists too)
    taken: dict[str, PathT] = field(default_factory=dict)
    #: per holding step: the models and servers its held steps use, and whether they change them
    resources: dict[str, tuple[list[str], list[str], bool]] = field(default_factory=dict)
    #: a held step's id -> the id of the step that holds it
    parents: dict[str, str] = field(default_factory=dict)
    #: a holding step's id -> its kind
    holding: dict[str, str] = field(default_factory=dict)
    #: the most tokens each model may be loaded with, where the spec says (`CheckContext.context_lengths`)
    contexts: dict[str, int] = field(default_factory=dict)
    #: the top-level steps with foreach (maps): they have `steps.ID.items`
    maps: set[str] = field(default_factory=set)


@dataclass
class _Parsed:
    """A step whose kind is known and whose options are a mapping."""

    i: int
    raw: dict[str, Any]
    kind: str
    options: dict[str, Any]

    @property
    def id(self) -> str:
        return self.raw["id"]


class StepsChecker:
    """Checks one list of steps in its scope and turns it into `StepSpec`s in running order."""

    def __init__(self, doc: Document, spec_dir: Path, params: dict[str, Any],
                 models: dict[str, ModelConfig], defaults: Policy, problems: list[Problem],
                 server_names: Iterable[str] = ("default",), scope: Scope | None = None):
        self.doc, self.spec_dir, self.params, self.models = doc, spec_dir, params, models
        self.defaults, self.problems, self.server_names = defaults, problems, tuple(server_names)
        self.scope = scope or Scope()
        self.registered: dict[str, Step] = kinds()
        #: root -> what a holding kind offers under it (`loop` -> the loop's Holds)
        self.holders = {k.holds.root: k.holds for k in self.registered.values() if k.holds}
        self.spec_ids: set[str] = set()
        self.output_schemas: dict[str, dict | None] = {}
        self.prepared: dict[str, dict] = {}
        self.deps: dict[str, list[str]] = {}
        self.position: dict[str, int] = {}

    @property
    def nested(self) -> bool:
        return self.scope.holder is not None

    def check(self, raw_steps: Any) -> list[StepSpec]:
        if not isinstance(raw_steps, list):
            return []
        parsed, duplicates = self._kinds(raw_steps)
        self._prepare(parsed, duplicates)
        # a step whose id is taken is reported once, above: its references would be to the other step
        parsed = [p for p in parsed if p.i not in duplicates]
        self.position = {p.id: n for n, p in enumerate(parsed)}
        controls = {p.id: self._controls(p) for p in parsed}
        if self.nested:
            order = [p.id for p in parsed]
        else:
            as_tuples = [(p.i, p.raw, p.kind, p.options) for p in parsed]
            graph.explicit_and_state_order(self.doc, as_tuples, self.prepared, self.models, self.registered,
                                           self.spec_ids, self.deps, self.problems, self.scope.resources)
            order = graph.order(self.doc, as_tuples, self.deps, self.problems)
        steps = []
        for p in parsed:
            if p.id not in self.prepared:
                continue
            control = controls[p.id]
            fields = with_params(self.doc, self.scope.base + (p.i,), p.raw, self.params, self.problems)
            steps.append(StepSpec(
                id=p.id, kind=p.kind, options=self.prepared[p.id],
                policy=step_policy(fields, self.defaults),
                index=p.i, description=p.raw.get("description"),
                depends_on=tuple(self.deps.get(p.id, ())),
                foreach=control.get("foreach"), when=control.get("when"),
                parallel=fields.get("parallel") if isinstance(fields.get("parallel"), int) else None,
                on_item_error=p.raw.get("on_item_error", "fail"), grain=p.raw.get("grain", "auto"),
                distribute=p.raw["distribute"] if isinstance(p.raw.get("distribute"), bool) else None,
                nested=control.get("nested"), held=control.get("held", ()), parent=self.scope.holder,
            ))
        by_id = {s.id: s for s in steps}
        return [by_id[s] for s in order if s in by_id]

    # ------------------------------------------------------------ kinds and options

    def _kinds(self, raw_steps: list) -> tuple[list[_Parsed], set[int]]:
        """Each step's kind; ids given twice; what a held list may not have."""
        doc, scope, base = self.doc, self.scope, self.scope.base
        self.spec_ids = {s["id"] for s in raw_steps if isinstance(s, dict) and isinstance(s.get("id"), str)}
        if not self.nested:
            scope.maps.update(s["id"] for s in raw_steps if isinstance(s, dict)
                              and isinstance(s.get("id"), str) and "foreach" in s)
        parsed: list[_Parsed] = []
        duplicates: set[int] = set()  # positions of steps whose id an earlier step has
        for i, raw in enumerate(raw_steps):
            if not isinstance(raw, dict):
                continue
            step_id = raw.get("id")
            if isinstance(step_id, str):
                if step_id in scope.taken:
                    earlier = scope.taken[step_id]
                    line = doc.position(earlier)[0]
                    self.problems.append(doc.problem(
                        base + (i, "id"), f"duplicate step id '{step_id}', first given at "
                        f"{format_path(earlier[:-1])}" + (f" (line {line})" if line else ""),
                        "step ids must be unique: rename one"))
                    duplicates.add(i)
                scope.taken.setdefault(step_id, base + (i, "id"))
            present = [k for k in raw if k in self.registered]
            if len(present) != 1:
                if len(present) > 1:
                    self.problems.append(doc.problem(base + (i, present[1]),
                                                     f"a step has one kind, found {', '.join(present)}",
                                                     "split it into several steps", key=True))
                elif not [k for k in raw if k not in COMMON_STEP_KEYS]:
                    self.problems.append(doc.problem(base + (i,), "step has no kind",
                                                     f"add one of: {', '.join(self.registered)}"))
                continue
            kind = present[0]
            if scope.holds is not None:
                group = scope.holds.group
                for key in _TOP_LEVEL_ONLY:
                    if key in raw:
                        self.problems.append(doc.problem(
                            base + (i, key), f"'{key}' is not available in a {group}",
                            f"a {group}'s steps run one after another, in the order written", key=True))
                inner = self.registered[kind].holds
                if inner is not None:
                    self.problems.append(doc.problem(base + (i, kind),
                                                     f"a {kind} cannot run inside a {group}",
                                                     inner.not_nested or None, key=True))
                    continue
            if not isinstance(raw[kind], dict) or not isinstance(step_id, str):
                continue
            parsed.append(_Parsed(i, raw, kind, raw[kind]))
        return parsed, duplicates

    def _prepare(self, parsed: list[_Parsed], duplicates: set[int]) -> None:
        """Each kind's own checks, then its prepared options and output schema."""
        # options that failed the schema are not prepared (their templates are not checked)
        broken = {p.path for p in self.problems}
        for p in parsed:
            kind = self.registered[p.kind]
            prefix = format_path(self.scope.base + (p.i, p.kind))
            kind_problems = list(kind.check(p.options, self._context(p)))
            self.problems.extend(kind_problems)
            if (kind_problems or p.i in duplicates
                    or any(b == prefix or b.startswith(prefix + ".") for b in broken)):
                continue
            own = kind.holds.options if kind.holds else ()  # parsed by its check_nested, not prepared
            options = {k: v for k, v in p.options.items() if k not in own}
            self.prepared[p.id] = kind.prepare(options, self.spec_dir)
            output = kind.output_schema(self.prepared[p.id], self.spec_dir)
            self.output_schemas[p.id] = {"type": "array", "items": output} if "foreach" in p.raw else output

    def _context(self, p: _Parsed) -> CheckContext:
        def problem(sub: PathT, message: str, hint: str | None = None, *, key: bool = False) -> Problem:
            return self.doc.problem(self.scope.base + (p.i, p.kind) + tuple(sub), message, hint, key=key)

        return CheckContext(spec_dir=self.spec_dir, model_aliases=tuple(self.models), problem=problem,
                            server_names=self.server_names, context_lengths=self.scope.contexts)

    # ------------------------------------------------------------ references and controls

    def _controls(self, p: _Parsed) -> dict[str, Any]:
        """The step's references (its dependencies), its foreach, when, and what it holds."""
        doc, base, raw = self.doc, self.scope.base, p.raw
        self.deps[p.id] = []
        mapped = "foreach" in raw
        self._template_refs(p, self.prepared.get(p.id, {}), base + (p.i, p.kind), item_allowed=True)
        control: dict[str, Any] = {}
        if mapped and not self.nested:
            control["foreach"] = graph.foreach_source(doc, p.i, raw["foreach"], self.spec_dir, self.problems)
            source = control["foreach"]
            if source is not None and (source.source == "value" or "${{" in source.value):
                self._template_refs(p, raw["foreach"], ("steps", p.i, "foreach"), item_allowed=False)
            if raw.get("distribute") is True and raw.get("grain") == "item":
                self.problems.append(doc.problem(
                    ("steps", p.i, "grain"), "a distributed map travels in chunks, not item by item",
                    "remove grain (chunks sized for the map), or give the items per chunk, e.g. grain: 200"))
        elif not self.nested and any(k in raw for k in _ITEM_KEYS):
            key = next(k for k in _ITEM_KEYS if k in raw)
            self.problems.append(doc.problem(("steps", p.i, key),
                                             f"'{key}' applies to the items of a foreach",
                                             "add foreach: to this step, or remove it", key=True))
        if "when" in raw:
            roots = ("params", "steps") + (("item", "index") if mapped else ()) \
                + ((self.scope.holds.root,) if self.scope.holds else ())
            control["when"] = self._condition(base + (p.i, "when"), raw["when"], roots,
                                              lambda *ref: self._depend(p, *ref))
        kind = self.registered[p.kind]
        if kind.holds is not None:
            self.scope.holding[p.id] = p.kind
            nest = _Nest(self, p, kind.holds)
            control["nested"] = kind.check_nested(p.options, nest)
            control["held"] = tuple(nest.held)
            self.scope.resources[p.id] = nest.resources()
        return control

    def _condition(self, path: PathT, raw: Any, roots: tuple[str, ...], depend: Any) -> Any:
        defined_in = {root: h.defined_in for root, h in self.holders.items()}
        return graph.condition(self.doc, path, raw, roots, depend, self.problems, defined_in)

    def _template_refs(self, p: _Parsed, value: Any, path: PathT, *, item_allowed: bool) -> None:
        for sub, expr in templates.iter_templates(value):
            try:
                ref = templates.parse_ref(expr)
            except templates.TemplateError as exc:
                self.problems.append(self.doc.problem(path + sub, str(exc)))
                continue
            if not item_allowed and ref.root in ("item", "index"):
                self.problems.append(self.doc.problem(path + sub, f"'{ref.text}': foreach cannot refer to "
                                                      "its own items", "refer to params or steps"))
                continue
            self._depend(p, path + sub, ref.root, ref.parts, ref.text)

    def _depend(self, p: _Parsed, path: PathT, root: str, parts: tuple, text: str, offset: int | None = None,
                *, inside: Holds | None = None) -> None:
        """Check one reference found at `path` in step `p` and record the dependency it makes;
        `inside`: the reference is in the step's own nested part (a loop's `until`)."""
        where = graph.at(self.doc, path, offset)
        holds = inside or self.scope.holds
        if root in ("item", "index") and "foreach" not in p.raw:
            self.problems.append(where(f"'{text}': {root} is only defined in a step with foreach",
                                       "add foreach: to this step, or refer to params or steps"))
        elif root in self.holders and (holds is None or holds.root != root):
            self.problems.append(where(f"'{text}': {root} is only defined in {self.holders[root].defined_in}",
                                       "refer to params or steps"))
        elif root in self.holders and (not parts or parts[0] not in self.holders[root].fields):
            fields = self.holders[root].fields
            self.problems.append(where(f"'{text}': a {root} reference is {root}.FIELD",
                                       _suggest(str(parts[0]), fields) if parts else
                                       "fields: " + ", ".join(fields)))
        elif root == "params" and parts and parts[0] not in self.params:
            self.problems.append(where(f"unknown parameter '{parts[0]}'",
                                       _suggest(parts[0], self.params) or "declare it under params"))
        elif root == "steps" and (len(parts) < 2 or parts[1] not in templates.STEP_FIELDS):
            self.problems.append(where(f"'{text}': a step reference is steps.ID.output[.field...]",
                                       "a map's items are steps.ID.items"))
        elif root == "steps":
            self._depend_on_step(p, where, str(parts[0]), parts, text)

    def _depend_on_step(self, p: _Parsed, where: Any, target: str, parts: tuple, text: str) -> None:
        scope, schemas = self.scope, self.output_schemas
        if target == p.id:
            self.problems.append(where(f"step '{p.id}' refers to its own output"))
            return
        if target in self.spec_ids:
            if self.nested and self.position.get(target, -1) > self.position[p.id]:
                group = scope.holds.group if scope.holds else "list"
                self.problems.append(where(f"step '{target}' runs later in this {group}",
                                           f"a {group}'s steps run in the order written"))
                return
            if not self.nested and target not in self.deps[p.id]:
                self.deps[p.id].append(target)
        elif target in scope.outer:
            schemas = scope.outer
            if target not in scope.outer_deps:
                scope.outer_deps.append(target)
        else:
            known = self.spec_ids | set(scope.outer)
            self.problems.append(where(f"unknown step '{target}'", self._inside_held(target)
                                       or _suggest(target, known - {p.id})))
            return
        if parts[1] == "items":
            if target not in scope.maps:
                self.problems.append(where(f"'{text}': step '{target}' has no foreach: only a map has items",
                                           f"refer to its output, steps.{target}.output"))
            return
        why = _field_problem(schemas.get(target), tuple(parts[2:]))
        if why:
            self.problems.append(where(f"{text}: {why}"))

    def _inside_held(self, target: str) -> str | None:
        """A hint for a reference to a step another step holds, or from a held step to its holder."""
        scope = self.scope
        if target == scope.holder and scope.holds is not None:
            return scope.holds.sees_holder or None
        holder = scope.parents.get(target)
        if holder is None:
            return None
        kind = self._kind_of(holder)
        holds = kind.holds if kind else None
        if holds is None:
            return None
        if holder == scope.holder:
            return (f"'{target}' belongs to another {holds.group}: a {holds.group} sees its own steps, the "
                    f"top-level steps and {holds.root}.*")
        return (f"'{target}' is a step of {kind.kind} '{holder}''s {holds.group}: "
                + holds.from_outside.format(holder=holder))

    def _kind_of(self, step_id: str) -> Step | None:
        kind = self.scope.holding.get(step_id)
        return self.registered[kind] if kind else None


class _Nest:
    """What a holding kind's `check_nested` validates its steps and conditions with (`Nest`)."""

    def __init__(self, checker: StepsChecker, p: _Parsed, holds: Holds):
        self.checker, self.p, self.holds = checker, p, holds
        self.spec_dir = checker.spec_dir
        self.base: PathT = checker.scope.base + (p.i, p.kind)
        self.held: list[StepSpec] = []

    def steps(self, path: tuple, raw: Any) -> tuple[StepSpec, ...]:
        outer = self.checker
        inner = Scope(base=self.base + tuple(path), holder=self.p.id, holds=self.holds,
                      outer={s: outer.output_schemas.get(s) for s in outer.spec_ids if s != self.p.id},
                      outer_deps=outer.deps[self.p.id], taken=outer.scope.taken, parents=outer.scope.parents,
                      holding=outer.scope.holding, contexts=outer.scope.contexts, maps=outer.scope.maps)
        steps = StepsChecker(outer.doc, outer.spec_dir, outer.params, outer.models, outer.defaults,
                             outer.problems, outer.server_names, inner).check(raw)
        for s in steps:
            outer.scope.parents[s.id] = self.p.id
        self.held += steps
        return tuple(steps)

    def condition(self, path: tuple, raw: Any) -> Any:
        if not isinstance(raw, str):
            return None
        return self.checker._condition(self.base + tuple(path), raw, ("params", "steps", self.holds.root),
                                       lambda *ref: self.checker._depend(self.p, *ref, inside=self.holds))

    def problem(self, path: tuple, message: str, hint: str | None = None) -> None:
        self.checker.problems.append(self.checker.doc.problem(self.base + tuple(path), message, hint))

    def resources(self) -> tuple[list[str], list[str], bool]:
        """The models and servers the held steps use, and whether any changes them."""
        aliases: list[str] = []
        servers: list[str] = []
        changes = False
        for s in self.held:
            kind = self.checker.registered[s.kind]
            aliases += [a for a in kind.models(s.options) if a not in aliases]
            servers += [x for x in kind.servers(s.options) if x not in servers]
            changes = changes or kind.changes_state
        return aliases, servers, changes


