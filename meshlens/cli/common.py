"""What every command shares: the options that mean the same everywhere (store, time range, HTTP
auth/TLS, output), the printed result (text lines, or JSON with ``--json``: a contract for scripts),
and the one rule that turns expected failures into one line on stderr and a documented exit code
(0 ok; 1 the data or the servers said no; 2 the command line or config is wrong; 130 interrupted),
so schedulers can tell them apart."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, TypeVar

import typer

from meshlens.errors import ConfigError, MeshlensError, SourceError

T = TypeVar("T")


def lazy_module(name: str) -> ModuleType:
    """``name``, imported on first attribute access (the stdlib's LazyLoader recipe).

    Command modules are imported to build the command tree, so a heavy dependency they import at the
    top (pandas, altair, papermill...) would be paid by every command, ``--help`` included."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module

Db = Annotated[Path, typer.Option("--db", help="DuckDB store to write (created if missing).")]
Since = Annotated[str | None, typer.Option("--since", help="Relative range ending now (or at --to): 2h, 30m, 7d.")]
From = Annotated[str | None, typer.Option("--from", help="Start (inclusive): RFC3339, Unix s/ns, now-2h.")]
To = Annotated[str | None, typer.Option("--to", help="End (exclusive); default now.")]
Timeout = Annotated[float, typer.Option("--timeout", help="Per-request timeout in seconds.")]
Retries = Annotated[int, typer.Option("--max-retries", help="Retries for 429/5xx/connection errors.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]

# Ingest filters and sampling: the same on every ingest command (meshlens.filters).
FilterConfigOpt = Annotated[Path | None, typer.Option(
    "--filter-config", help="YAML/TOML file with ingest filter rules and sampling (see docs/retention.md).")]
NoDefaultFiltersOpt = Annotated[bool, typer.Option(
    "--no-default-filters", help="Keep health checks (kube-probe user agents, /healthz, /ready, /metrics...).")]
SampleSuccessOpt = Annotated[float | None, typer.Option(
    "--sample-success", help="Keep this fraction (0 < RATE <= 1) of successful requests, weighted 1/RATE; "
    "denials, errors, TLS/authn failures and config changes are always kept.")]


def filter_options(filter_config: Path | None, no_default_filters: bool, sample_success: float | None
                   ) -> dict[str, Any]:
    """The filter/sampling options as ``ingest(...)`` keyword arguments."""
    from meshlens.filters import build_filter_config

    return {"filters": build_filter_config(filter_config, no_default_filters, sample_success)}


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


@contextmanager
def read_store(db: Path) -> Iterator[Any]:
    """Open ``--db`` read-only (its published snapshot) for a command that only reads.

    A missing store is the command line's fault (a mistyped ``--db``), so it is a :class:`ConfigError`
    naming the option, the same from every command."""
    from meshlens.store import open_store

    if not Path(str(db)).exists() and not Path(str(db) + ".snapshot").exists():
        raise ConfigError(f"--db {db}: store does not exist; ingest into it first (meshlens ingest file ... --db {db})")
    store = open_store(db, read_only=True)
    try:
        yield store
    finally:
        store.close()


# The one exit-code rule of every command (docs/cli.md): schedulers and scripts tell these apart.
EXIT_OK = 0
EXIT_REFUSED = 1      # the data or the servers said no (unreachable, auth refused, a failed report...)
EXIT_USAGE = 2        # the command line or a config file is wrong (bad option value, unknown format...)
EXIT_INTERRUPTED = 130


def exit_code(exc: BaseException) -> int:
    """The documented exit code for an expected failure."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_REFUSED


def error_line(exc: BaseException) -> str:
    """The one line printed on stderr for an expected failure."""
    if isinstance(exc, KeyboardInterrupt):
        return "meshlens: interrupted; everything stored so far is kept -- re-run to continue"
    hint = ""
    if isinstance(exc, SourceError) and exc.resumable and "--resume" not in str(exc):
        hint = " Re-run with --resume to continue where this run stopped."
    return f"meshlens: error: {exc}{hint}"


def fail(exc: BaseException) -> typer.Exit:
    """Print ``exc`` as one line on stderr and return the :class:`typer.Exit` carrying its exit code."""
    typer.echo(error_line(exc), err=True)
    return typer.Exit(exit_code(exc))


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body; turn expected failures into one line on stderr and an exit code."""
    try:
        return fn()
    except (KeyboardInterrupt, MeshlensError) as exc:
        raise fail(exc) from None
