"""`lmflow run` and `lmflow rerun`: a spec run, its table and its record."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..spec.model import Spec

from .main import cli, parse_params
from .server import announce


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Override a param (repeatable).")
@click.option("--refresh", is_flag=True, help="Recompute cached steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the run result as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show Prefect's own log lines.")
@click.option("--max-parallel", type=click.IntRange(1, 256), default=None, metavar="N",
              help="Steps and map items running at once (default: the spec's defaults.max_parallel, else 4).")
def run(spec: Path, params: tuple[str, ...], refresh: bool, as_json: bool, verbose: bool,
        max_parallel: int | None) -> None:
    """Compile SPEC into a Prefect flow and run it.

    The run uses PREFECT_API_URL when set, else the lmflow server, which it starts in the
    background when none runs (it stops after an idle hour, LMFLOW_PREFECT_SERVER_IDLE; `lmflow
    server stop` ends it). LMFLOW_PREFECT_SERVER=temporary: a temporary server per run instead.
    """
    from .. import load_spec
    from ..prefect.server import configure_environment

    values = parse_params(params)
    loaded = load_spec(spec, values)  # a wrong spec starts no Prefect server
    # no server running: start the managed one for this and later runs (a setting keeps the
    # temporary server per run); before Prefect is imported, which reads its settings once
    configure_environment(verbose, start=True, announce=announce)
    _run_and_report(loaded, values, refresh, as_json, verbose, max_parallel)


def _run_and_report(spec: Path | Spec, params: dict[str, Any] | None, refresh: bool, as_json: bool,
                    verbose: bool, max_parallel: int | None) -> None:
    """What `lmflow run` and `lmflow rerun` print: progress, the table, every failure; exit 1 on one."""
    from .. import run as run_spec
    from ..render import report

    progress = report.Progress(sys.stderr) if not as_json else None
    finished: list[Any] = []

    def listen(event: str, data: dict[str, Any]) -> None:
        if event == "run_finished":
            finished.append(data["result"])
        if progress is not None:
            progress.event(event, data)
        elif event in ("warning", "cache_error"):  # on stderr also with --json: stdout stays pure JSON
            where = f"{data['step']}: " if data.get("step") else ""
            click.echo(f"  warning: {where}{data['message']}", err=True)

    try:
        result = run_spec(spec, params, refresh_cache=refresh, listener=listen,
                          verbose=verbose, max_parallel=max_parallel)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM: what was done, then the exit code
        if progress is not None:
            progress.close()
        if finished:
            with contextlib.suppress(OSError):  # a closed stdout must not hide the exit code
                click.echo(report.table(finished[0]), err=True)
                click.echo(f"error: {finished[0].error}\nrun record: {finished[0].record_path}", err=True)
        raise
    finally:
        if progress is not None:
            progress.close()
    if as_json:
        from ..engine.outputs import write_json

        write_json(sys.stdout, {**asdict(result), "errors": result.errors()})  # a map's output row by row
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        click.echo(report.table(result))
        click.echo(report.footer(result))
    if not result.ok:
        for failure in result.failures:  # every failed step, in the spec's order
            click.echo(f"error: step '{failure.step}' failed"
                       + (f" after {failure.attempts} attempts" if failure.attempts > 1 else "")
                       + f": {failure.message}", err=True)
        if result.error:  # the flow itself stopped (also after steps failed)
            click.echo(f"error: run failed: {result.error}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--current", is_flag=True, help="Run the spec as it is now, also when it changed since RUN.")
@click.option("--refresh", is_flag=True, help="Recompute cached steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the run result as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show Prefect's own log lines.")
def rerun(run_ref: str, current: bool, refresh: bool, as_json: bool, verbose: bool) -> None:
    """Run RUN again: the spec version it ran (from git when the file has changed since), its params
    and max_parallel."""
    from ..prefect import history
    from ..prefect.server import configure_environment

    configure_environment(verbose)  # what -v asks, before the history's client imports Prefect
    with history.rerun_target(run_ref, current=current) as target:
        click.echo(f"lmflow: rerun of {target.run.name}: {target.version}", err=True)
        _run_and_report(target.spec_path, target.params, refresh, as_json, verbose, target.max_parallel)
