"""``analyze incidents`` over a 5M-event store (target: < 15 s), and the answer it gives there.

    .venv/bin/python benchmarks/bench_incidents.py [--events 5000000] [--keep DIR] [--window N]

1. Simulates one multi-incident window of :func:`meshlens.simulate.windows.incident_windows` (default
   window 1: three incidents of different kinds hours apart, decoy changes, a loud unrelated service) and
   ingests it with the real ingest.
2. Grows the store to ``--events`` by duplicating its proxy records in DuckDB SQL: each copy gets new
   event ids and request ids (so copies are separate requests) and its times shifted by a few
   milliseconds, i.e. the same hours with N times the traffic; audit events are kept once.
3. Times :func:`meshlens.analysis.incidents.find_incidents` over the whole window on a read-only open (as
   the CLI does), and scores its answer against the ground truth (a fast wrong answer is not a result).
4. Baseline in the same run: one full scan of the events table (``GROUP BY dst_service`` with a latency
   quantile), so the cost can also be read as a multiple of "reading the data once" on a shared machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_analysis import replicated_store, scan_baseline

TARGET_S = 15.0


def build_store(workdir: Path, events: int, window: int) -> tuple[Path, dict]:
    """Simulate + ingest one incident window, replicated up to ``events`` rows."""
    from meshlens.simulate.windows import incident_windows

    return replicated_store(workdir, events, lambda: incident_windows(window + 1)[window])


def run(db: Path, gt: dict) -> tuple[float, dict]:
    from meshlens.analysis.incidents import find_incidents
    from meshlens.simulate.windows import score_window
    from meshlens.store import open_store

    with open_store(db, read_only=True) as store:
        t = time.perf_counter()
        report = find_incidents(store, gt["window_start"], gt["window_end"])
        dt = time.perf_counter() - t
    score = score_window(report.items, gt)
    for item in report.items:
        print(f"  #{item['rank']} {item['summary']}")
    return dt, score


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="Build/keep the store in this directory.")
    ap.add_argument("--window", type=int, default=1, help="Which window of incident_windows() to grow.")
    args = ap.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="meshlens-bench-incidents-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        db, gt = build_store(workdir, args.events, args.window)
        scan = scan_baseline(db)
        dt, score = run(db, gt)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = score["found"] == score["incidents"] and score["change_ok"] == score["incidents"] and not score["spurious"]
    print(f"\nincidents found {score['found']}/{score['incidents']}, change right {score['change_ok']}, "
          f"spurious {score['spurious']} ({'correct' if ok else 'WRONG'})")
    for m in score["misses"]:
        print(f"  MISS {m}")
    print(f"analyze incidents: {dt:.2f} s = {dt / scan:.1f} x full scan ({scan:.2f} s)")
    verdict = "OK" if dt < TARGET_S else "OVER TARGET"
    print(f"target: analyze incidents over {args.events:,} events in < {TARGET_S:.0f} s -> {dt:.2f} s {verdict}")
    return 0 if dt < TARGET_S and ok else 1


if __name__ == "__main__":
    sys.exit(main())
