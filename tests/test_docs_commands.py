"""Every `lmflow ...` command quoted in README.md, docs/*.md and the comments of specs/ and
examples/ works as quoted, so the docs cannot drift from the code.

How a quoted command is checked, from the repo root (the README is read there, and the specs'
comments write paths from it: `lmflow run specs/x.yaml`):
- its subcommands exist, and every option it quotes is in that command's `--help`;
- it parses as the shell would pass it (options, their types and choices), placeholders
  replaced by the stand-ins below;
- `validate` and `plan` are run as quoted; `run` is run as `plan` with the same spec and params
  (plan takes the same -p and rejects unknown ones). A synopsis (`[-p k=v]`, `start | stop`)
  is only parsed, never run.

What counts as quoted (`pytest -s -k found` prints the list):
- Markdown: inline code spans starting with `lmflow `, and lines of fenced blocks starting
  with `lmflow `;
- comments (YAML files, fenced blocks): `#   lmflow ...` (indented, as the specs write a
  command), `# lmflow SUBCOMMAND ...`, `(lmflow SUBCOMMAND ...)` and code spans; not prose
  such as `# lmflow runs llama-server itself`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from conftest import ROOT, lmflow_in_process

from lmflow.cli import cli

SUBCOMMANDS = set(cli.commands)

#: the docs' placeholders and what stands in for them. `...` is in the README's spec block,
#: which is examples/quickstart.yaml.
PLACEHOLDERS = {
    "SPEC": "examples/quickstart.yaml", "spec.yaml": "examples/quickstart.yaml",
    "A.yaml": "examples/quickstart.yaml", "B.yaml": "examples/classify.yaml",
    "...": "examples/quickstart.yaml",
    "MODEL": "smollm2-135m-instruct", "KEY": "smollm2-135m-instruct", "URL": "http://127.0.0.1:1234",
    "N": "4", "F": "lmstudio.yaml", "PATH": ".",
}

#: commands quoted as not existing; keep this short
SKIP = {
    "lmflow run --resume RUN_ID": "quoted as not built (docs/notes.md)",
}


@dataclass(frozen=True)
class Quoted:
    where: str  # file:line, from the repo root
    text: str  # whitespace collapsed, a table's `\|` read as `|`

    @property
    def args(self) -> list[str]:
        """The words after `lmflow`, as a shell passes them (no trailing comment, no `&`)."""
        return [w for w in shlex.split(self.text, comments=True) if w != "&"][1:]

    @property
    def synopsis(self) -> bool:
        """A form with placeholders (`[-p k=v]`, `start | stop`, `--max N`): parsed, never run."""
        return any(re.search(r"[][|]", w) or w == "k=v" or re.fullmatch(r"[A-Z][A-Z_]*", w)
                   for w in self.args)


SPAN = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"lmflow\s+(\S+)")


def is_command(text: str) -> bool:
    return COMMAND.match(text) is not None


def in_comment(line: str) -> Iterator[str]:
    """The commands quoted in the `#` comment of a line (YAML, or a shell or YAML fenced block)."""
    comment = re.search(r"(?:^|\s)#(.*)$", line)
    if not comment:
        return
    text = comment[1]
    whole = re.match(r"(\s*)(lmflow\s.*)", text)
    if whole and (len(whole[1]) > 1 or COMMAND.match(whole[2])[1] in SUBCOMMANDS):
        yield whole[2]
    for m in re.finditer(r"\((lmflow\s+[^)]*)\)", text):
        if COMMAND.match(m[1])[1] in SUBCOMMANDS:
            yield m[1]
    yield from (m[1] for m in SPAN.finditer(text) if is_command(m[1]))


def in_markdown(text: str) -> Iterator[tuple[int, str]]:
    prose, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
        elif fenced:
            shell = re.match(r"\s*(?:\$\s+)?(lmflow\s.*)", line)
            spans = [m[1] for m in SPAN.finditer(line) if is_command(m[1])]  # in sample output
            yield from ((n, c) for c in ([shell[1]] if shell else [*in_comment(line)] or spans))
            prose.append("")  # keeps the line numbers of the code spans below
        else:
            prose.append(line)
    joined = "\n".join(prose)
    for m in SPAN.finditer(joined):  # a span may continue on the next line
        if is_command(m[1]):
            yield joined.count("\n", 0, m.start()) + 1, m[1]


def in_yaml(text: str) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(text.splitlines(), 1):
        yield from ((n, c) for c in in_comment(line))


Extractor = Callable[[str], Iterator[tuple[int, str]]]


def documents() -> list[tuple[Path, Extractor]]:
    markdown = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    yaml = sorted(p for folder in ("specs", "examples") for pattern in ("*.yaml", "*.yml")
                  for p in (ROOT / folder).rglob(pattern))
    return [(p, in_markdown) for p in markdown] + [(p, in_yaml) for p in yaml]


def quoted() -> list[Quoted]:
    found = []
    for path, extract in documents():
        for n, text in sorted(extract(path.read_text())):
            text = " ".join(text.replace("\\|", "|").split())
            found.append(Quoted(f"{path.relative_to(ROOT)}:{n}", text))
    return found


QUOTED = quoted()
CHECKED = [q for q in QUOTED if q.text not in SKIP]


def words(q: Quoted) -> list[str]:
    """The arguments after `lmflow`, optional parts' brackets dropped, placeholders replaced."""
    args = [w.strip("[]") if q.synopsis else w for w in q.args]
    return [PLACEHOLDERS.get(w, re.sub(r":PORT\b", ":1234", w)) for w in args if w]


def expand(args: list[str], command: click.Command = cli,
           path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command, list[str]]]:
    """The commands `args` quote, with their own arguments: `server start | stop` is two."""
    if not isinstance(command, click.Group) or not args or args[0].startswith("-"):
        return [(path, command, [a for a in args if a != "|"])]
    names, rest = args[0].split("|"), args[1:]
    while rest[:1] == ["|"]:
        names, rest = names + rest[1].split("|"), rest[2:]
    found = []
    for name in filter(None, names):
        sub = command.commands.get(name)
        assert sub is not None, f"`lmflow {' '.join((*path, name))}`: no such command"
        found += expand(rest, sub, (*path, name))
    return found


def lmflow(*args: str) -> tuple[int, str, str]:
    out = lmflow_in_process(*args)
    return out.exit_code, out.stdout, out.stderr


def test_found() -> None:
    print(f"{len(QUOTED)} quoted lmflow commands:")
    for q in QUOTED:
        print(f"  {q.where}: {q.text}" + (f"  (skipped: {SKIP[q.text]})" if q.text in SKIP else ""))
    places = {q.where.split(":")[0] for q in QUOTED}
    assert {"README.md", "specs/extract-ticket.yaml", "examples/quickstart.yaml"} <= places
    assert set(SKIP) <= {q.text for q in QUOTED}, "a skip no longer needed: remove it"


@pytest.mark.parametrize("path_and_extract", documents(), ids=lambda d: str(d[0].relative_to(ROOT)))
def test_every_line_naming_a_subcommand_is_extracted(path_and_extract: tuple[Path, Extractor]) -> None:
    """A form of quoting the extractor does not know would silently go unchecked."""
    path, _ = path_and_extract
    name = str(path.relative_to(ROOT))
    lines = {int(q.where.rsplit(":", 1)[1]) for q in QUOTED if q.where.split(":")[0] == name}
    pattern = re.compile(rf"\blmflow ({'|'.join(SUBCOMMANDS)})\b(?![-\w.])")
    missed = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
              if pattern.search(line) and n not in lines]
    assert not missed, "not extracted:\n" + "\n".join(missed)


@pytest.mark.parametrize("q", CHECKED, ids=lambda q: f"{q.where} {q.text}")
def test_quoted_command_works(q: Quoted, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    for path, command, args in expand(words(q)):
        code, helptext, err = lmflow(*path, "--help")
        assert code == 0, err
        for option in (a.split("=", 1)[0] for a in args if a.startswith("-")):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helptext), \
                f"`lmflow {' '.join(path)}` has no option {option}"
        if not args:  # the command named in prose: that it exists is all it says
            continue
        try:  # bad options, types, choices
            ctx = command.make_context(f"lmflow {' '.join(path)}", list(args))
        except click.MissingParameter:
            if q.synopsis:  # `lmflow run --max-parallel N`: names an option of the command
                continue
            raise
        if q.synopsis or path[0] not in ("validate", "plan", "run"):
            continue
        if path[0] == "run":  # the same spec and params, nothing else
            params = [x for p in ctx.params["params"] for x in ("-p", p)]
            path, args = ("plan",), [str(ctx.params["spec"]), *params]
        code, out, err = lmflow(*path, *args)
        assert code == 0, f"`lmflow {' '.join((*path, *args))}` (as quoted: `{q.text}`) failed:\n{err}"


def test_plan_takes_the_params_of_run_and_rejects_unknown_ones() -> None:
    # what the check of a quoted `lmflow run` relies on; the spec's comment used to suggest this
    code, _, err = lmflow("plan", str(ROOT / "specs/extract-ticket.yaml"), "-p", "ticket_file=x.txt")
    assert code == 2 and "unknown parameter 'ticket_file'" in err
    code, out, _ = lmflow("plan", str(ROOT / "examples/quickstart.yaml"), "--param", "topic=the sea")
    assert code == 0 and "params: topic='the sea'" in out
