"""`lmflow deploy`, `serve` and `worker`: specs on a schedule, here or on a work pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .main import cli


def _schedule_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--cron", "crons", multiple=True, metavar="LINE",
                     help="Run on this cron line (repeatable); replaces the spec's schedule."),
        click.option("--interval", "intervals", multiple=True, metavar="DURATION",
                     help="Run every so long, e.g. 15m (repeatable); replaces the spec's schedule."),
        click.option("--timezone", default=None, help="IANA time zone of --cron/--interval."),
    ]):
        fn = option(fn)
    return fn


def _cli_schedules(crons: tuple[str, ...], intervals: tuple[str, ...], timezone: str | None) -> tuple:
    """Schedules given on the command line, checked like a spec's `schedule:`."""
    from ..spec.schedules import schedules

    if not crons and not intervals:
        if timezone:
            raise click.UsageError("--timezone needs --cron or --interval")
        return ()
    entries = [{"cron": c} for c in crons] + [{"interval": i} for i in intervals]
    for entry in entries:
        if timezone:
            entry["timezone"] = timezone
    problems: list[str] = []
    found = schedules(entries, {}, lambda path, message, hint=None: problems.append(
        f"{'--cron' if 'cron' in entries[path[1]] else '--interval'} {message}"
        + (f" ({hint})" if hint else "")))
    if problems:
        raise click.UsageError("; ".join(problems))
    return found


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--pool", required=True, metavar="NAME",
              help="The Prefect process work pool (created if missing) whose workers run the specs.")
@_schedule_options
def deploy(specs: tuple[Path, ...], pool: str, crons: tuple[str, ...], intervals: tuple[str, ...],
           timezone: str | None) -> None:
    """Register each SPEC as a Prefect deployment on a work pool, with its schedule.

    Specs must be committed in a git repository: workers (`lmflow worker --pool NAME`) run them
    from their own checkout, by their path in the repository.
    """
    from ..prefect import deploy as deploying
    from ..prefect.server import configure_environment

    configure_environment()
    done = deploying.deploy(list(specs), pool=pool, schedules=_cli_schedules(crons, intervals, timezone))
    for target, deployment_id in done:
        when = ", ".join(s.describe() for s in target.schedules) or "no schedule (run it from the UI)"
        click.echo(f"deployed {target.name}/{target.name} ({target.spec_path} at "
                   f"{(target.version.get('commit') or target.version['sha256'])[:12]}) on pool "
                   f"'{pool}': {when} [{deployment_id}]")
        for note in target.notes:
            click.echo(f"  warning: {target.spec_path}: {note}", err=True)


@cli.command("serve")
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="Runs at once (default: no limit).")
@_schedule_options
def serve_specs(specs: tuple[Path, ...], limit: int | None, crons: tuple[str, ...],
                intervals: tuple[str, ...], timezone: str | None) -> None:
    """Serve each SPEC from this machine on its schedule until stopped.

    Prints a line when a run starts and when it ends. One Ctrl-C or SIGTERM stops it within
    seconds: the runs in progress are cancelled (a re-run reuses their finished steps).
    """
    from ..prefect import deploy as deploying
    from ..prefect.server import configure_environment

    choice = configure_environment()
    from ..prefect import serving  # (imports Prefect, which reads the environment just set)

    chosen = deploying.targets(list(specs), _cli_schedules(crons, intervals, timezone))
    if choice.url:
        deploying.note_shared(chosen, pool=None)
    for target in chosen:
        when = ", ".join(s.describe() for s in target.schedules) or "no schedule (run it from the UI)"
        click.echo(f"serving {target.name}: {when}", err=True)
        for note in target.notes:
            click.echo(f"  warning: {note}", err=True)
    if choice.url:
        click.echo(f"runs appear in {choice.url.removesuffix('/api')}; Ctrl-C stops serving", err=True)
    serving.serve(chosen, limit=limit, listener=_echo)


@cli.command()
@click.option("--pool", metavar="NAME", help="The work pool to take runs from.")
@click.option("--tasks", is_flag=True,
              help="Take the chunks of distributed maps (`distribute: true`) instead of whole runs.")
@click.option("--server", "servers", multiple=True, metavar="NAME=URL",
              help="With --tasks: the URL of the spec's server NAME on this machine (repeatable).")
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="This machine's checkout of the specs' repository (default: the one around here).")
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="Runs at once (with --tasks: chunks at once, default 2).")
def worker(pool: str | None, tasks: bool, servers: tuple[str, ...], repo: Path | None,
           limit: int | None) -> None:
    """Run deployments of a process work pool on this machine (Prefect's process worker), or with
    --tasks the chunks of distributed maps of any run (Prefect's task worker).

    Prints a line when a run (or a chunk) starts and when it ends. One Ctrl-C or SIGTERM stops it
    within seconds: the runs in progress are cancelled (a re-run reuses their finished steps); a
    chunk in progress starts no more items, and the run sends the rest to another worker.
    """
    from ..prefect.server import configure_environment
    from ..provenance import _git

    if tasks == (pool is not None):
        raise click.UsageError("give --pool NAME (whole runs) or --tasks (chunks of distributed maps)")
    if servers and not tasks:
        raise click.UsageError("--server maps a spec's server for the chunks this worker takes: use it "
                               "with --tasks")
    choice = configure_environment()
    if not choice.url:
        raise click.ClickException("no Prefect server to take runs from: start one with `lmflow server "
                                   "start` (or set PREFECT_API_URL to the shared one)")
    root = _git(repo or Path.cwd(), "rev-parse", "--show-toplevel")
    if root is None and not tasks:
        raise click.ClickException(f"{repo or Path.cwd()} is not in a git repository: give --repo, "
                                   "this machine's checkout of the specs' repository")
    where = Path(root) if root is not None else (repo or Path.cwd()).resolve()
    if tasks:
        from ..prefect import distributed  # (imports Prefect, which reads the environment set above)

        mapped = distributed.parse_servers(servers)
        folder = distributed.shared_folder()
        click.echo(f"task worker: chunks of distributed maps, specs from {where}, shared folder {folder}, "
                   f"Prefect at {choice.url.removesuffix('/api')}"
                   + "".join(f", server {name} = {url}" for name, url in mapped.items())
                   + "; Ctrl-C stops it", err=True)
        distributed.serve_chunks(where, mapped, limit or 2, lambda line: click.echo(line, err=True))
        return
    from ..prefect import serving  # (imports Prefect, which reads the environment set above)

    click.echo(f"worker for pool '{pool}': specs from {where}, runs in {choice.url.removesuffix('/api')}; "
               "Ctrl-C stops it", err=True)
    serving.work(pool, repo=where, limit=limit, listener=_echo)



def _echo(event: str, fields: dict[str, Any]) -> None:
    """What `serve` and `worker` report, as lines on stderr (like their start-up lines)."""
    from ..render import serving as lines

    if event == "run":
        click.echo(lines.run_line(fields["report"]), err=True)
    elif event == "stopping":
        click.echo(lines.stopping(fields["signal"], fields["runs"]), err=True)
    elif event == "stopped":
        click.echo(lines.stopped(), err=True)
    elif event == "warning":
        click.echo(f"warning: {fields['message']}", err=True)
