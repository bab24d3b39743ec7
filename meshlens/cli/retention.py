"""``meshlens retention apply`` and ``meshlens archive query``: thin typer layer over
:mod:`meshlens.retention` and :mod:`meshlens.archive`. Wire with ``register(app)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

retention_app = typer.Typer(help="Apply a retention policy: NULL old raw text, roll up, archive, delete.",
                            no_args_is_help=True)
archive_app = typer.Typer(help="Query live and archived (Parquet) events together.", no_args_is_help=True)

DbOpt = Annotated[Path, typer.Option("--db", help="DuckDB store file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@retention_app.command("apply")
def apply(
    db: DbOpt,
    policy: Annotated[Path, typer.Option("--policy", help="Retention policy file (YAML or TOML): raw_days, "
                                         "events_days, rollup, rollup_minutes_days, archive_dir.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be done; change nothing "
                                          "(archive, store).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply a retention policy; prints what was archived, rolled up, NULLed and deleted."""
    from meshlens.retention import apply_retention, load_policy
    from meshlens.store import open_store, writing

    pol = load_policy(policy)
    if dry_run:
        with open_store(db) as store:
            report = apply_retention(store, pol, dry_run=True)
    else:
        with writing(db) as store:
            report = apply_retention(store, pol)
    typer.echo(json.dumps(report.as_dict(), indent=2) if as_json else str(report))


@archive_app.command("query")
def query(
    db: DbOpt,
    archive: Annotated[str, typer.Option("--archive", help="Archive directory (or s3:// URL with httpfs).")],
    sql: Annotated[str, typer.Argument(help="SQL over the view all_events (live + archived events).")],
    as_json: JsonOpt = False,
) -> None:
    """Run a read-only query over live + archived events (view ``all_events``)."""
    from meshlens.archive import attach
    from meshlens.store import open_store

    with open_store(db, read_only=True) as store:
        attach(store, archive)
        df = store.query(sql)
    typer.echo(df.to_json(orient="records", date_format="iso") if as_json else df.to_string(index=False))


def register(app: typer.Typer) -> None:
    app.add_typer(retention_app, name="retention")
    app.add_typer(archive_app, name="archive")
