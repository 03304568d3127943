"""`lmflow runs` and `lmflow runs show`: the history in Prefect."""

from __future__ import annotations

import json

import click

from .main import cli


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
        return ["[OPTIONS] [SPEC] | show RUN [--item STEP[N]] [--json]"]


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
    from ..prefect import history
    from ..render.history import runs_table

    found = history.list_runs(ctx.meta.get("lmflow.runs.spec"), limit=limit)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in found], indent=2, default=str))
    else:
        click.echo(runs_table(found))


@runs.command("show")
@click.argument("run_ref", metavar="RUN")
@click.option("--item", "item_ref", metavar="STEP[N]",
              help="Show one map item (e.g. each[12], or 12 in a run with one map): its status, output "
                   "or error, answered by, and a failed item's options, from the run's journal.")
@click.option("--json", "as_json", is_flag=True, help="Print the run (or the item) as JSON.")
def runs_show(run_ref: str, item_ref: str | None, as_json: bool) -> None:
    """Every step of RUN (its name or flow run id, or a unique prefix): status, time, attempts,
    answered by, errors; the run's params, spec version and its page in the UI."""
    from ..prefect import history
    from ..render.history import item_text, run_text

    found = history.show_run(run_ref)
    if item_ref is not None:
        from ..engine.records import journaled_item

        item = journaled_item(found.name, item_ref)
        click.echo(json.dumps({"run": found.name, **item}, indent=2, default=str) if as_json
                   else item_text(found, item))
        return
    from ..engine.records import journaled_chunks

    chunks = journaled_chunks(found.name)  # a distributed map's workers, from this machine's journal
    if as_json:
        click.echo(json.dumps({**found.as_dict(), **({"chunks": chunks} if chunks else {})}, indent=2,
                              default=str))
        return
    click.echo(run_text(found))
    for step, workers in chunks.items():
        click.echo(f"{step}: chunks taken by " + ", ".join(f"{w} ({n})" for w, n in workers.items()))
