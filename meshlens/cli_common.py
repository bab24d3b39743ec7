"""What the source commands (``ingest loki``, ``ingest es``, ``aggregate ...``) share: turning expected
failures into one line on stderr and a documented exit code (2: bad configuration, 1: the run failed,
130: interrupted), so schedulers and scripts can tell them apart."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer

from meshlens.errors import ConfigError, MeshlensError, SourceError

T = TypeVar("T")


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body; turn expected failures into one line on stderr and an exit code."""
    try:
        return fn()
    except KeyboardInterrupt:
        typer.echo("meshlens: interrupted; everything stored so far is kept -- re-run with --resume to continue",
                   err=True)
        raise typer.Exit(130) from None
    except ConfigError as exc:
        typer.echo(f"meshlens: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except MeshlensError as exc:
        hint = ""
        if isinstance(exc, SourceError) and exc.resumable and "--resume" not in str(exc):
            hint = " Re-run with --resume to continue where this run stopped."
        typer.echo(f"meshlens: error: {exc}{hint}", err=True)
        raise typer.Exit(1) from None
