"""What the source commands (``ingest loki``, ``ingest es``, ``aggregate ...``) share: the options that
mean the same for every source, the printed result (text lines, or one JSON object with ``--json``:
a contract for scripts), and turning expected failures into one line on stderr and a documented exit
code (2: bad configuration, 1: the run failed, 130: interrupted), so schedulers can tell them apart."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from meshlens.errors import ConfigError, MeshlensError, SourceError

T = TypeVar("T")

Db = Annotated[Path, typer.Option("--db", help="DuckDB store to write (created if missing).")]
Since = Annotated[str | None, typer.Option("--since", help="Relative range ending now (or at --to): 2h, 30m, 7d.")]
From = Annotated[str | None, typer.Option("--from", help="Start (inclusive): RFC3339, Unix s/ns, now-2h.")]
To = Annotated[str | None, typer.Option("--to", help="End (exclusive); default now.")]
Timeout = Annotated[float, typer.Option("--timeout", help="Per-request timeout in seconds.")]
Retries = Annotated[int, typer.Option("--max-retries", help="Retries for 429/5xx/connection errors.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]


def echo_ingest_counts(counts: Any, as_json: bool) -> None:
    """Print an ingest's counts (:class:`meshlens.ingest.IngestCounts`)."""
    if as_json:
        typer.echo(json.dumps(counts.as_dict(), sort_keys=True))
        return
    typer.echo(f"records read:       {counts.read}")
    typer.echo(f"events stored:      {counts.stored}")
    typer.echo(f"duplicates skipped: {counts.duplicates}")
    new = getattr(counts, "rejects_new", counts.rejects)
    if new == counts.rejects:
        typer.echo(f"rejects:            {counts.rejects}")
    else:  # a re-read range: say how many of the unparseable lines are new rows in `rejects`
        typer.echo(f"rejects:            {counts.rejects} (lines read that did not parse; {new} new in the "
                   f"rejects table, {counts.rejects - new} already there)")
    if getattr(counts, "filtered", 0):
        typer.echo(f"filtered:           {counts.filtered}")


def echo_aggregate_counts(counts: Any, as_json: bool, extra: Iterable[str] = ()) -> None:
    """Print a push-down aggregation's counts; ``extra`` lines go before the per-metric lines."""
    if as_json:
        typer.echo(json.dumps(counts.as_dict(), sort_keys=True))
        return
    typer.echo(f"queries run:    {counts.queries}")
    typer.echo(f"series stored:  {counts.series}")
    typer.echo(f"samples stored: {counts.samples}")
    for line in extra:
        typer.echo(line)
    for name, n in counts.metrics.items():
        typer.echo(f"  {name}: {n} samples")


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
