"""The `lmflow` group, and `main`: the one place where errors become messages and exit codes."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from ..errors import LmflowError, Problem, SpecError


def parse_params(values: tuple[str, ...]) -> dict[str, str]:
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


NO_IMPORT = click.option(
    "--no-import", is_flag=True,
    help="Run none of the spec's Python: check its modules' functions by reading their source. "
         "Without it, the modules the spec names are imported (their top-level code runs; no "
         "function is called), as a run imports them.")


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
