"""`lmflow models` and `lmflow probe`: what a model server has loaded, and what a model really holds."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from .main import cli


class BackendName(click.ParamType):
    """A registered backend that can do what the command needs (read from the registry only
    when the option is used: `lmflow --help` loads no backend)."""

    name = "backend"

    def __init__(self, fits: Callable[[Any], bool], needs: str):
        self.fits = fits
        self.needs = needs

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from ..backends import backend_classes

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
    from ..backends import create_backend
    from ..spec.model import ServerConfig

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
    from ..backends import create_backend
    from ..spec.model import ServerConfig

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
    from .. import probe as probing
    from ..render import probe as text

    if list_only:
        entries = probing.registry()
        if as_json:
            click.echo(json.dumps(entries, indent=2))
        for e in entries if not as_json else []:
            click.echo(text.registry_line(e))
        return
    if not model:
        raise click.UsageError("give a MODEL key, or --list")
    from ..backends import create_backend
    from ..spec.model import ModelConfig, ServerConfig

    def show(attempt: Any) -> None:
        if not as_json:
            click.echo(text.attempt_line(attempt), err=True)

    def show_trial(t: Any) -> None:
        if not as_json:
            click.echo(text.trial_line(t), err=True)

    from ..backends import backend_class

    runs_itself = backend_class(backend).owns_server
    config = ServerConfig(name="probe", backend=backend, url=None if runs_itself else url)
    with create_backend(config) as server:
        report = probing.measure(server, ModelConfig(alias="probe", key=model), minimum=minimum,
                                 maximum=maximum, granularity=granularity, fresh=fresh,
                                 load_only=load_only, on_attempt=show, on_trial=show_trial)
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2, default=str))
        return
    click.echo(text.loadable_line(model, report, granularity))
    if not load_only and report.loadable_max:
        click.echo(text.working_table(model, report))
        chart = probing.save_chart(report)
        if chart:
            click.echo(text.chart_line(chart))
