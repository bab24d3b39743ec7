"""The three analyses over a 5M-event store: anomalies, root cause, change correlation (target: < 10 s).

    .venv/bin/python benchmarks/bench_analysis.py [--events 5000000] [--keep DIR] [--scenario N]

1. Simulates one evaluation scenario (default: an AuthorizationPolicy incident with decoy changes and a
   noisy service; ``--scenario 10``: a latency incident) and ingests it with the real ingest (~60k
   events).
2. Grows the store to ``--events`` by duplicating its proxy records in DuckDB SQL: each copy gets new
   event ids and request ids (so copies are separate requests) and its times shifted by a few
   milliseconds, i.e. the same hour with N times the traffic; audit events are kept once.
3. Times, on a read-only open as the CLI does, ``detect_anomalies`` over the whole window,
   ``rootcause.analyze`` and ``changes.correlate`` for the incident's symptom service, and checks that
   they still name the planted cause (a fast wrong answer is not a result).
4. Baseline in the same run: one full scan of the events table (``GROUP BY dst_service`` with a
   latency quantile), so the analyses' cost can also be read as a multiple of "reading the data once"
   on this shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

TARGET_S = 10.0


def build_store(workdir: Path, events: int, scenario_index: int = 0) -> tuple[Path, dict]:
    """Simulate + ingest one evaluation scenario, replicated up to ``events`` rows (see
    :func:`replicated_store`)."""
    from meshlens.simulate.scenarios import scenarios_for_evaluation

    return replicated_store(workdir, events, lambda: scenarios_for_evaluation(scenario_index + 1)[scenario_index])


def replicated_store(workdir: Path, events: int, make_scenario: Callable[[], Any]) -> tuple[Path, dict]:
    """Simulate + ingest a scenario, then duplicate its traffic (fresh ids, shifted 3 ms per copy) up to
    ``events`` rows; returns the store and the scenario's ground truth. A store kept from an earlier run
    (``--keep``) with at least that many events is reused. Shared by the analysis benchmarks."""
    from meshlens.ingest import ingest_files
    from meshlens.simulate import simulate

    db, truth = workdir / "bench.duckdb", workdir / "truth.json"
    if db.exists() and truth.exists() and Path(str(db) + ".snapshot").exists():
        con = duckdb.connect(str(db), read_only=True)
        total = con.execute("SELECT count(*) FROM events").fetchone()[0]
        con.close()
        if total >= events:
            print(f"store: reusing {db} ({total:,} events)")
            return db, json.loads(truth.read_text())
        db.unlink()
    gt = simulate(make_scenario(), workdir / "sim").to_dict()
    truth.write_text(json.dumps(gt))
    ingest_files(str(db), sorted(str(p) for p in (workdir / "sim").glob("*.jsonl.gz")), progress=False)
    con = duckdb.connect(str(db))
    base = con.execute("SELECT count(*) FROM events WHERE record_kind = 'access_log'").fetchone()[0]
    other = con.execute("SELECT count(*) FROM events WHERE record_kind <> 'access_log'").fetchone()[0]
    copies = max(0, -(-(events - other) // base) - 1)
    t = time.perf_counter()
    con.execute(
        """INSERT INTO events
           SELECT e.* REPLACE (
               md5(event_id || '#' || k) AS event_id,
               request_id || '#' || k AS request_id,
               trace_id || '#' || k AS trace_id,
               ts_ns + k * 3000000 AS ts_ns,
               ts + to_microseconds(k * 3000) AS ts)
           FROM events e, range(1, $copies + 1) r(k)
           WHERE record_kind = 'access_log'""", {"copies": copies})
    con.execute("CHECKPOINT")
    total = con.execute("SELECT count(*) FROM events").fetchone()[0]
    con.close()
    shutil.copyfile(db, str(db) + ".snapshot")
    print(f"store: {total:,} events ({base:,} proxy records x {copies + 1} + {other:,} others) "
          f"built in {time.perf_counter() - t:.1f} s")
    return db, gt


def scan_baseline(db: Path) -> float:
    con = duckdb.connect(str(db), read_only=True)
    t = time.perf_counter()
    con.execute("SELECT dst_service, count(*), approx_quantile(duration_ms, 0.99) FROM events "
                "GROUP BY dst_service").fetchall()
    dt = time.perf_counter() - t
    con.close()
    return dt


def run_analyses(db: Path, gt: dict) -> dict[str, float]:
    from meshlens.analysis import anomalies, changes, rootcause
    from meshlens.store import open_store

    inc = gt["incidents"][0]
    symptom, lo, hi = inc["symptom_service"], gt["window_start"], gt["window_end"]
    times: dict[str, float] = {}
    with open_store(db, read_only=True) as store:
        t = time.perf_counter()
        found = anomalies.detect_anomalies(store, lo, hi)
        times["anomalies"] = time.perf_counter() - t
        t = time.perf_counter()
        rc = rootcause.analyze(store, symptom, lo, hi)
        times["root cause"] = time.perf_counter() - t
        t = time.perf_counter()
        ch = changes.correlate(store, symptom, lo, hi)
        times["change correlation"] = time.perf_counter() - t
    top_rc = rc.candidates["target"].iloc[0] if not rc.candidates.empty else None
    top_ch = ch.candidates["target"].iloc[0] if not ch.candidates.empty else None
    ok_rc = top_rc in inc["accepted_root_causes"]
    ok_ch = inc["change"] is not None and top_ch in inc["change"]["accepted_targets"] \
        and bool(ch.candidates["likely"].iloc[0])
    print(f"anomalies found: {len(found)}; root cause #1: {top_rc} ({'correct' if ok_rc else 'WRONG'}); "
          f"change #1: {top_ch} ({'correct' if ok_ch else 'WRONG'})")
    if not (ok_rc and ok_ch):
        print("the analyses gave a wrong answer on the grown store", file=sys.stderr)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="Build/keep the store in this directory.")
    ap.add_argument("--scenario", type=int, default=0,
                    help="Evaluation scenario to grow (0: AuthorizationPolicy denial; 10: slow release, a latency "
                         "incident: root cause then also attributes latency over every hop).")
    args = ap.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="meshlens-bench-analysis-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        db, gt = build_store(workdir, args.events, args.scenario)
        scan = scan_baseline(db)
        times = run_analyses(db, gt)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    total = sum(times.values())
    print(f"\n{'analysis':<22}{'seconds':>9}{'x full scan':>13}")
    for name, dt in times.items():
        print(f"{name:<22}{dt:>9.2f}{dt / scan:>13.1f}")
    print(f"{'all three':<22}{total:>9.2f}{total / scan:>13.1f}")
    print(f"{'(full scan baseline)':<22}{scan:>9.2f}")
    verdict = "OK" if total < TARGET_S else "OVER TARGET"
    print(f"\ntarget: all three analyses over {args.events:,} events in < {TARGET_S:.0f} s -> {total:.2f} s {verdict}")
    return 0 if total < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
