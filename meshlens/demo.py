"""``make demo``: the main job end to end on the bundled samples (``data/samples``).

Ingests the samples into a store, prints the ingest counts and a summary, then runs every report through
the same code path as the scheduler (``meshlens schedule run-due`` with a config listing all reports)
and prints where ``index.html`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from meshlens.analysis.overview import format_summary, summary
from meshlens.errors import ConfigError
from meshlens.ingest import ingest_files
from meshlens.store import open_store


def run_demo(*, db: Path, samples: Path, out: Path, reports: bool = True,
             echo: Callable[[str], None] = print) -> Path | None:
    if not samples.exists():
        raise ConfigError(f"sample directory {samples} not found; run from the repository root "
                          "(or generate it: meshlens simulate --out data/samples)")
    files = sorted(p for p in samples.rglob("*") if p.is_file() and p.suffix in (".gz", ".log", ".jsonl", ".json")
                   and p.name != "ground_truth.json")
    echo(f"== ingest {len(files)} sample files from {samples} into {db}")
    counts = ingest_files(db, [str(f) for f in files], progress=True)
    echo(str(counts))
    echo("== summary")
    with open_store(db, read_only=True) as store:
        echo(format_summary(summary(store)))
    if not reports:
        return None
    try:
        from meshlens.reports_demo import run_all_reports
    except ImportError:
        echo("== reports: not available in this build")
        return None
    index = run_all_reports(db=db, out=out, echo=echo)
    echo(f"== reports index: {index}")
    return index
