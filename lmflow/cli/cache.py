"""`lmflow cache stats|clear`: the response cache."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .main import cli


@cli.group()
def cache() -> None:
    """The response cache (answers of prompt steps with response_cache on)."""


def _cache_dir(spec: Path | None) -> str | None:
    """The cache folder a spec uses (its response_cache.dir), else lmflow's default."""
    if spec is None:
        return None
    from ..spec import load_spec

    config = load_spec(spec).response_cache
    return config.directory if config else None


@cache.command("stats")
@click.option("--spec", type=click.Path(path_type=Path), help="Use this spec's response_cache.dir.")
@click.option("--json", "as_json", is_flag=True)
def cache_stats(spec: Path | None, as_json: bool) -> None:
    """Entries and size of the response cache."""
    from .. import cache as response_cache

    directory = _cache_dir(spec)
    try:
        info = response_cache.describe(directory)
    except Exception as exc:  # noqa: BLE001 - a corrupt cache is reported, not a traceback
        raise click.ClickException(f"the response cache at {directory or response_cache.default_directory()} "
                                   f"is unreadable ({type(exc).__name__}: {exc}): `lmflow cache clear` "
                                   "removes it") from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    limit = f" of {info['size_limit'] / 1e6:g} MB" if info.get("size_limit") else ""
    click.echo(f"{info['directory']}: {info['entries']} answers, {info['bytes'] / 1e6:.2f} MB{limit}")


@cache.command("clear")
@click.option("--spec", type=click.Path(path_type=Path), help="Use this spec's response_cache.dir.")
def cache_clear(spec: Path | None) -> None:
    """Remove every cached answer (also a cache that is corrupt)."""
    from .. import cache as response_cache

    directory = _cache_dir(spec)
    removed = response_cache.clear(directory)
    click.echo(f"removed {removed} answers from {directory or response_cache.default_directory()}")
