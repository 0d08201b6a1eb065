"""`dr`: the command line. Each command parses, runs one flow, and prints the result.

One module per area registers its commands on the shared `app` (dr/cli/core.py); the import
order below is the order `dr --help` lists them in. Command modules import only typer and the
small `dr.output`/`dr.config` at load time; a command's body imports what it runs.
"""

from dr.cli import configuration, local, building_blocks, scenarios, tables, extensions, runs, operations, fleet  # noqa: F401,E402  (registration)
from dr.cli.core import app, main

__all__ = ["app", "main"]
