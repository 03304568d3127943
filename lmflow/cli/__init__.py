"""The `lmflow` command: thin commands over the library, one module per group of commands.

`main` (cli/main.py) is the one place where errors become messages and exit codes; each
other module registers its commands on the `cli` group when imported, below.
"""

from . import cache, deploy, models, run, runs, server, spec, testing  # noqa: F401 - they register
from .main import cli, main

__all__ = ["cli", "main"]
