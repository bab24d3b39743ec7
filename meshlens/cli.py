"""The ``meshlens`` command: a thin typer layer over the package's Python API.

Every command calls a package function with the same name and prints its result (``--json`` for
machines). Errors meshlens raises on purpose (:class:`~meshlens.errors.MeshlensError`) become one line
on stderr and exit code 1; usage errors exit 2 (typer's convention).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from meshlens.errors import MeshlensError
from meshlens.filters import FilterConfigOpt, NoDefaultFiltersOpt, SampleSuccessOpt
from meshlens.records import DEFAULT_BATCH


def _hide_flag_types() -> None:
    """typer 0.29's help prints a ``<bool>`` type after every flag (``--json <bool>``), as if it took a
    value; a flag takes none, so show no type for flags (options with values keep theirs)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_meshlens_flags_hidden", False):
        return

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag and not self.count else shown(self, ctx)

    display_type_rich._meshlens_flags_hidden = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_types()

app = typer.Typer(
    name="meshlens",
    help="Investigate service-mesh audit logs: ingest (files, Loki, Elasticsearch) into DuckDB, analyse, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ingest_app = typer.Typer(help="Load logs into a meshlens DuckDB store.", no_args_is_help=True)
aggregate_app = typer.Typer(help="Push metric queries down to Loki/Elasticsearch into the series table.",
                            no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
app.add_typer(aggregate_app, name="aggregate")

DbOpt = Annotated[Path, typer.Option("--db", help="DuckDB store file (created if missing).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _emit(obj: object, as_json: bool, text: str) -> None:
    if as_json:
        typer.echo(json.dumps(obj, indent=2, default=str))
    else:
        typer.echo(text)


@ingest_app.command("file")
def ingest_file(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories (plain, .gz, logcli jsonl, "
                                                "saved Loki JSON, CRI logs).")],
    db: DbOpt,
    fmt: Annotated[str, typer.Option("--format", help="Force a record format instead of auto-detection "
                                     "(istio_text, istio_json, envoy_default, linkerd_json, k8s_audit, ...).")] = "auto",
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
    from meshlens.filters import build_filter_config
    from meshlens.ingest import ingest_files

    json_mapping = _load_mapping(mapping) if mapping else None
    counts = ingest_files(db, [str(p) for p in paths], fmt=fmt, batch_size=batch_size,
                          progress=progress and not as_json, json_mapping=json_mapping,
                          max_record_bytes=max_record_bytes,
                          filters=build_filter_config(filter_config, no_default_filters, sample_success))
    _emit(counts.as_dict(), as_json, str(counts))
    warning = counts.empty_warning(_input_bytes(paths))
    if warning:
        typer.echo(warning, err=True)


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


@app.command()
def summary(db: ReadDbOpt, as_json: JsonOpt = False) -> None:
    """Overview of a store: events by type, services, time span, rejects."""
    from meshlens.analysis.overview import format_summary
    from meshlens.analysis.overview import summary as _summary
    from meshlens.store import open_store

    with open_store(db, read_only=True) as store:
        s = _summary(store)
    _emit(s, as_json, format_summary(s))


@app.command()
def schema(markdown: Annotated[bool, typer.Option("--markdown", help="Print docs/schema.md.")] = False) -> None:
    """Print the store's tables and columns."""
    from meshlens import schema as _schema

    if markdown:
        typer.echo(_schema.markdown())
        return
    for table, cols in _schema.TABLES.items():
        typer.echo(f"{table}: " + ", ".join(f"{c.name} {c.type}" for c in cols))


@app.command()
def migrate(db: DbOpt) -> None:
    """Upgrade a store written by an older meshlens to the current schema."""
    from meshlens.store import open_store

    with open_store(db) as store:
        store.publish_snapshot()
        typer.echo(f"{db}: schema version {store.schema_version()}")


@app.command()
def demo(
    db: Annotated[Path, typer.Option("--db", help="Store to (re)build.")] = Path("out/demo.duckdb"),
    samples: Annotated[Path, typer.Option(help="Sample data directory.")] = Path("data/samples"),
    out: Annotated[Path, typer.Option(help="Report output directory.")] = Path("out/reports"),
    reports: Annotated[bool, typer.Option(help="Also run every report (HTML).")] = True,
) -> None:
    """The main job end to end on the bundled samples: ingest, summarise, run the reports."""
    from meshlens.demo import run_demo

    run_demo(db=db, samples=samples, out=out, reports=reports, echo=typer.echo)


def _register_optional() -> None:
    """Source and report commands live in their own modules; a missing optional part is skipped."""
    import importlib

    for mod, args in (("meshlens.cli_loki", (ingest_app, aggregate_app)),
                      ("meshlens.cli_es", (ingest_app, aggregate_app)),
                      ("meshlens.cli_simulate", (app,)),
                      ("meshlens.cli_reports", (app,)),
                      ("meshlens.cli_analysis", (app,)),
                      ("meshlens.cli_retention", (app,))):
        try:
            module = importlib.import_module(mod)
        except ImportError as exc:
            if exc.name != mod:
                raise
            continue
        module.register(*args)


_register_optional()


def main() -> None:
    """Console entry point: MeshlensError -> one line on stderr, exit 1 (usage errors: click, exit 2)."""
    try:
        app()
    except MeshlensError as exc:
        typer.echo(f"meshlens: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("meshlens: interrupted; what was committed before is kept (re-run to resume)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
