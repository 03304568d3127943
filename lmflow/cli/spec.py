"""`lmflow validate`, `plan` and `schema`: a spec read, checked and shown, nothing run."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import SpecError
from .main import NO_IMPORT, cli, parse_params


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path))
@NO_IMPORT
def validate(specs: tuple[Path, ...], no_import: bool) -> None:
    """Check specs; report every problem as file:line:col: path: message (hint).

    The Python modules a spec names are imported to check them (see --no-import)."""
    from ..spec import validate_files

    problems = validate_files(specs, import_code=not no_import)
    if problems:
        raise SpecError(problems)
    click.echo(f"ok: {len(specs)} spec{'s' if len(specs) != 1 else ''} valid")


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE")
@NO_IMPORT
def plan(spec: Path, params: tuple[str, ...], no_import: bool) -> None:
    """Show the steps a run would execute, in order, with their policies.

    The Python modules the spec names are imported to check them (see --no-import)."""
    from ..render.report import plan as render_plan
    from ..spec import load_spec

    click.echo(render_plan(load_spec(spec, parse_params(params), import_code=not no_import)))


@cli.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editors: `# yaml-language-server: $schema=...`)."""
    from ..spec import spec_schema

    click.echo(json.dumps(spec_schema(), indent=2))
