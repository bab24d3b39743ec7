"""The ``meshlens`` command: a thin typer layer over the package's Python API.

Every command calls a package function with the same name and prints its result (``--json`` for
machines). One rule maps failures to exit codes for every command (:mod:`meshlens.cli.common`):
0 ok, 1 the data or the servers said no, 2 the command line or config is wrong, 130 interrupted.

Each command group lives in its own module and registers itself here; the modules import nothing
heavy at the top (pandas, altair, papermill... load inside the commands that use them), so
``meshlens --help`` starts in a fraction of a second. The reference of every command is
docs/cli.md, generated from this tree (``python -m meshlens.cli.reference``).
"""

from __future__ import annotations

import importlib
import sys

import typer

from meshlens.errors import MeshlensError

app = typer.Typer(
    name="meshlens",
    help="Investigate service-mesh audit logs: ingest (files, Loki, Elasticsearch) into DuckDB, analyse, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: rendering it with rich imports ~40 modules and doubled the start-up of
    # every `--help`; the text is the same.
    rich_markup_mode=None,
)
ingest_app = typer.Typer(help="Load logs into a meshlens DuckDB store.", no_args_is_help=True)
aggregate_app = typer.Typer(help="Push metric queries down to Loki/Elasticsearch into the series table.",
                            no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
app.add_typer(aggregate_app, name="aggregate")

# (module, the sub-apps its register() takes), in the order of `meshlens --help`
COMMAND_MODULES: tuple[tuple[str, tuple[typer.Typer, ...]], ...] = (
    ("meshlens.cli.core", (app, ingest_app)),
    ("meshlens.cli.loki", (ingest_app, aggregate_app)),
    ("meshlens.cli.es", (ingest_app, aggregate_app)),
    ("meshlens.cli.simulate", (app,)),
    ("meshlens.cli.reports", (app,)),
    ("meshlens.cli.analysis", (app,)),
    ("meshlens.cli.retention", (app,)),
    ("meshlens.cli.investigate", (app,)),
)

for _module, _apps in COMMAND_MODULES:
    importlib.import_module(_module).register(*_apps)


def main() -> None:
    """Console entry point: expected failures -> one line on stderr and the exit code of
    :func:`meshlens.cli.common.exit_code` (usage errors that click catches exit 2 too)."""
    from meshlens.cli.common import error_line, exit_code

    try:
        app()
    except (MeshlensError, KeyboardInterrupt) as exc:
        typer.echo(error_line(exc), err=True)
        sys.exit(exit_code(exc))
