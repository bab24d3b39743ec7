"""The store commands: ``ingest file``, ``summary``, ``schema``, ``migrate`` and ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from meshlens.cli.common import (
    FilterConfigOpt,
    NoDefaultFiltersOpt,
    SampleSuccessOpt,
    filter_options,
    run_command,
)
from meshlens.formats.registry import format_help
from meshlens.records import DEFAULT_BATCH

DbOpt = Annotated[Path, typer.Option("--db", help="DuckDB store file (created if missing).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _emit(obj: object, as_json: bool, text: str) -> None:
    if as_json:
        typer.echo(json.dumps(obj, indent=2, default=str))
    else:
        typer.echo(text)


def ingest_file(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories (plain, .gz, logcli jsonl, "
                                                "saved Loki JSON, CRI logs).")],
    db: DbOpt,
    fmt: Annotated[str, typer.Option("--format", help=format_help())] = "auto",
    mapping: Annotated[Path | None, typer.Option("--mapping", help="JSON/YAML file mapping Istio JSON key "
                                                 "names to your custom access-log keys.")] = None,
    batch_size: Annotated[int, typer.Option(help="Records per transaction.")] = DEFAULT_BATCH,
    max_record_bytes: Annotated[int, typer.Option(help="Larger records are rejected.")] = 8 * 1024 * 1024,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    filter_config: FilterConfigOpt = None,
    no_default_filters: NoDefaultFiltersOpt = False,
    sample_success: SampleSuccessOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest log files; prints records read, events stored, duplicates skipped, rejects (and filtered)."""
    from meshlens.ingest import ingest_files

    def run() -> None:
        json_mapping = _load_mapping(mapping) if mapping else None
        counts = ingest_files(db, [str(p) for p in paths], fmt=fmt, batch_size=batch_size,
                              progress=progress and not as_json, json_mapping=json_mapping,
                              max_record_bytes=max_record_bytes,
                              **filter_options(filter_config, no_default_filters, sample_success))
        _emit(counts.as_dict(), as_json, str(counts))
        warning = counts.empty_warning(_input_bytes(paths))
        if warning:
            typer.echo(warning, err=True)

    run_command(run)


def _input_bytes(paths: list[Path]) -> int:
    """Total size of the input files (directories walked), for the "0 events stored" warning."""
    total = 0
    for p in paths:
        for f in ([p] if p.is_file() else p.rglob("*") if p.is_dir() else []):
            if f.is_file():
                total += f.stat().st_size
    return total


def _load_mapping(path: Path) -> dict[str, str]:
    import yaml

    from meshlens.errors import ConfigError

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--mapping {path}: cannot read ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"--mapping {path}: expected a mapping of meshlens field -> your JSON key")
    from meshlens.formats.bulk import ENVOY_FIELDS, EXTRA_FIELDS

    unknown = set(data) - set(ENVOY_FIELDS) - set(EXTRA_FIELDS)
    if unknown:
        raise ConfigError(f"--mapping {path}: unknown field(s) {sorted(unknown)}; known: "
                          f"{', '.join([*ENVOY_FIELDS, *EXTRA_FIELDS])}")
    return data


ReadDbOpt = Annotated[Path, typer.Option("--db", help="DuckDB store to read (must exist; opened read-only).")]


def summary(db: ReadDbOpt, as_json: JsonOpt = False) -> None:
    """Overview of a store: events by type, services, time span, rejects."""
    from meshlens.analysis.overview import format_summary
    from meshlens.analysis.overview import summary as _summary
    from meshlens.cli.common import read_store, run_command

    def run() -> None:
        with read_store(db) as store:
            s = _summary(store)
        _emit(s, as_json, format_summary(s))

    run_command(run)


def schema(markdown: Annotated[bool, typer.Option("--markdown", help="Print docs/schema.md.")] = False) -> None:
    """Print the store's tables and columns."""
    from meshlens import schema as _schema

    if markdown:
        typer.echo(_schema.markdown())
        return
    for table, cols in _schema.TABLES.items():
        typer.echo(f"{table}: " + ", ".join(f"{c.name} {c.type}" for c in cols))


def migrate(db: DbOpt) -> None:
    """Upgrade a store written by an older meshlens to the current schema."""
    from meshlens.store import open_store

    with open_store(db) as store:
        store.publish_snapshot()
        typer.echo(f"{db}: schema version {store.schema_version()}")


def demo(
    db: Annotated[Path, typer.Option("--db", help="Store to (re)build.")] = Path("out/demo.duckdb"),
    samples: Annotated[Path, typer.Option(help="Sample data directory.")] = Path("data/samples"),
    out: Annotated[Path, typer.Option(help="Report output directory.")] = Path("out/reports"),
    reports: Annotated[bool, typer.Option(help="Also run every report (HTML).")] = True,
) -> None:
    """The main job end to end on the bundled samples: ingest, summarise, run the reports."""
    from meshlens.demo import run_demo

    run_demo(db=db, samples=samples, out=out, reports=reports, echo=typer.echo)


def register(app: typer.Typer, ingest_app: typer.Typer) -> None:
    """Add the store commands to the app."""
    ingest_app.command("file")(ingest_file)
    for fn in (summary, schema, migrate, demo):
        app.command()(fn)
