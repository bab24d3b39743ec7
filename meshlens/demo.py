"""``make demo``: the main job end to end on the bundled samples (``data/samples``).

Ingests the samples into a store, prints the ingest counts and a summary, then runs every report through
the same code path as the scheduler (``meshlens schedule run-due`` with a config listing all reports)
and prints where ``index.html`` is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    warning = counts.empty_warning(sum(f.stat().st_size for f in files))
    if warning:
        echo(warning)
    echo("== summary")
    with open_store(db, read_only=True) as store:
        echo(format_summary(summary(store)))
    if not reports:
        return None
    return run_all_reports(db=db, out=out, echo=echo)


def demo_schedule(db: Path, out: Path) -> dict[str, object]:
    """A schedule config (as a mapping) listing every packaged report with its defaults, the landing
    page (``triage``) first."""
    from meshlens.reports import list_notebooks, report_sort_key

    return {
        "db": str(db.resolve()),
        "out_dir": str(out.resolve()),
        "reports": [{"name": name, "notebook": name, "cron": "0 6 * * *", "keep_runs": 5}
                    for name in sorted(list_notebooks(), key=report_sort_key)],
    }


def outcome_line(o: Any) -> str:
    """One report's result as the demo prints it: name, status, time, first finding, where the HTML is."""
    took = f"{o.duration_s:5.1f} s" if getattr(o, "duration_s", None) is not None else ""
    head = f"  {o.name:<20} {o.status or o.action:<7} {took}"
    finding = (o.findings or [""])[0] if getattr(o, "findings", None) else ""
    lines = [head + (f"  {o.html}" if o.html else (f"  {o.run_dir}" if o.run_dir else ""))]
    if o.error:
        lines.append(f"      error: {o.error.splitlines()[0] if o.error else ''}")
    elif finding:
        lines.append(f"      {finding[:160]}" + (" ..." if len(finding) > 160 else ""))
    return "\n".join(lines)


def run_all_reports(*, db: Path, out: Path, echo: Callable[[str], None] = print,
                    progress: bool = True) -> Path | None:
    """Run every report once through the scheduler's path (``run_due(force=True)``), printing each one
    as it finishes under a progress bar (tqdm, on stderr)."""
    from tqdm import tqdm

    from meshlens.schedule import parse_config, run_due

    cfg = parse_config(demo_schedule(db, out), base_dir=Path.cwd())
    echo(f"== reports: {', '.join(r.name for r in cfg.reports)}")
    with tqdm(total=len(cfg.reports), desc="reports", unit="report", disable=not progress,
              file=sys.stderr, leave=False) as bar:

        def done(o: Any) -> None:
            bar.clear()
            echo(outcome_line(o))
            bar.update(1)
            bar.refresh()

        result = run_due(cfg, force=True, on_outcome=done)
    index = Path(result.index[0]) if result.index else None
    echo(f"== reports index: {index}")
    if result.exit_code:
        raise ReportsFailed(f"{len(result.failures)} report(s) failed; see {index}")
    return index


class ReportsFailed(ConfigError):
    """At least one demo report failed (its HTML, with the error cell, is still written)."""
