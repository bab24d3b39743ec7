"""``investigate loki`` vs the full path, on the REAL Grafana Loki, as the traffic grows.

    .venv/bin/python benchmarks/bench_investigate.py [--rate 2.5] [--scales 1,2,4] [--hours 12] [--port 3140]

Per scale ``k`` (one run each; the 2-core machine is shared, so the ratios are the figures to read):

1. simulates the shop mesh of the bundled samples (``default_scenario``: a latency incident at reviews
   06:30-07:20, an authorization-policy incident at payments 09:20-09:55, decoy changes, a noisy service)
   over ``--hours`` at ``--rate x k`` user requests/s (2.5/s over 12 h is about 1M lines);
2. pushes it into a fresh real Loki (``../shared/tools/loki``, on ``--port``), each stream in time order;
3. **investigate**: ``investigate_loki`` into a new store (scan, detect, pull the suspects, explain);
4. **full path**: ``ingest_loki`` of the whole range into another new store (default options: the
   command a user types), then ``find_incidents`` over the range (``analyze incidents``).

Prints per scale: lines in the range, lines pulled (and their share), queries, wall seconds of both paths
(and investigate's phases), the ratio, and both answers (symptom, root cause and change per incident).
Targets (issue 17): the same root causes, at most 10 % of the lines pulled, at most a third of the full
path's wall time; investigate should grow with the suspects' share, not the mesh's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _answers(items: list[dict]) -> list[tuple[str, str | None, str | None]]:
    return sorted((i["symptom"], (i.get("root_cause") or {}).get("target"), (i.get("change") or {}).get("target"))
                  for i in items)


def _settle(url: str, pushed: int, start: str, end: str, timeout_s: float = 60.0) -> None:
    """Wait until Loki counts every pushed line (right after a push, a count can come back short)."""
    import pandas as pd
    import requests

    lo, hi = pd.Timestamp(start), pd.Timestamp(end)
    span = f"{int((hi - lo).total_seconds())}s"
    deadline = time.monotonic() + timeout_s
    n = -1
    while time.monotonic() < deadline:
        r = requests.get(url + "/loki/api/v1/query", params={"query": f'sum(count_over_time({{job=~".+"}} [{span}])) '
                         f'+ sum(count_over_time({{container=~".+"}} [{span}]))', "time": str(hi.value)}, timeout=120)
        res = r.json()["data"]["result"] if r.ok else []
        n = int(float(res[0]["value"][1])) if res else 0
        if n >= pushed:
            return
        time.sleep(2)
    print(f"  (Loki counts {n} of {pushed} pushed lines after {timeout_s:.0f} s)")


def run_scale(k: float, args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    import pandas as pd

    from meshlens.analysis.incidents import find_incidents
    from meshlens.investigate import investigate_loki
    from meshlens.simulate import simulate
    from meshlens.simulate.scenarios import default_scenario
    from meshlens.sources.loki import ingest_loki
    from meshlens.store import open_store
    from tests.servers import real_loki
    from tests.support.loki_sim import push_simulation

    base = default_scenario()
    sc = replace(base, entry_rate=args.rate * k, duration_s=args.hours * 3600)
    start = sc.start
    end = (pd.Timestamp(sc.start) + pd.Timedelta(seconds=sc.duration_s)).isoformat()
    work = Path(tempfile.mkdtemp(prefix="bench-investigate-", dir=args.tmp))
    loki = None
    try:
        t = time.monotonic()
        simulate(sc, work / "sim")
        sim_s = time.monotonic() - t
        data = work / "loki"
        data.mkdir()
        import subprocess

        out = subprocess.run(["bash", str(real_loki.TOOLS / "start.sh"), str(data), str(args.port),
                              str(args.port + 6000)], capture_output=True, text=True, timeout=120,
                             env={"LOKI_CACHE": real_loki.CACHE, "PATH": "/usr/bin:/bin"})
        words = out.stdout.split()
        if out.returncode != 0 or len(words) != 2:
            raise RuntimeError(f"real Loki did not start: {out.stdout[-300:]} {out.stderr[-300:]}")
        loki = real_loki.RealLoki(pid=int(words[0]), url=words[1], grpc_port=args.port + 6000, data=data, auth=False)
        t = time.monotonic()
        pushed = push_simulation(loki, work / "sim")
        loki.flush()  # chunks to the store, as in a Loki that has been running
        _settle(loki.url, pushed, start, end)
        push_s = time.monotonic() - t
        sel, audit = '{container="istio-proxy"}', '{job="kube-apiserver-audit"}'

        t = time.monotonic()
        res = investigate_loki(work / "inv.duckdb", query=sel, audit_query=audit, url=loki.url, start=start,
                               end=end, progress=False)
        inv_s = time.monotonic() - t

        t = time.monotonic()
        ingest_loki(work / "full.duckdb", query=sel, url=loki.url, start=start, end=end, progress=False)
        ingest_loki(work / "full.duckdb", query=audit, url=loki.url, start=pd.Timestamp(start) - pd.Timedelta("2h"),
                    end=end, progress=False)
        ingest_s = time.monotonic() - t
        with open_store(work / "full.duckdb", read_only=True) as st:
            full = find_incidents(st, start, end)
        full_s = time.monotonic() - t
        return {"k": k, "pushed": pushed, "sim_s": sim_s, "push_s": push_s, "inv_s": inv_s, "full_s": full_s,
                "ingest_s": ingest_s, "pulled": res.to_json()["pulled"], "phases": res.timings,
                "inv": _answers(res.incidents), "full": _answers(full.items)}
    finally:
        if loki is not None:
            loki.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=2.5, help="user requests/s at scale 1 (2.5 -> ~1M lines / 12 h)")
    ap.add_argument("--scales", default="1", help="comma-separated traffic multipliers, e.g. 1,2,4")
    ap.add_argument("--hours", type=float, default=12.0)
    ap.add_argument("--port", type=int, default=3140, help="HTTP port of the real Loki (gRPC: +6000)")
    ap.add_argument("--tmp", default=None, help="directory for the simulation, Loki's data and the stores")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.servers import real_loki

    reason = real_loki.available()
    if reason:
        sys.exit(f"skipped: {reason}")
    rows = []
    for k in [float(x) for x in args.scales.split(",")]:
        r = run_scale(k, args)
        rows.append(r)
        p = r["pulled"]
        ph = {n: round(v, 1) for n, v in r["phases"].items()}
        same = r["inv"] == r["full"]
        print(f"scale {k:g}: {p['lines_in_range']} lines in range ({r['pushed']} pushed; simulate {r['sim_s']:.0f} s, "
              f"push {r['push_s']:.0f} s)")
        print(f"  investigate {r['inv_s']:.1f} s {ph}; pulled {p['lines_pulled']} "
              f"({p['lines_pulled'] / max(p['lines_in_range'], 1):.1%}) with {p['queries']} queries")
        print(f"  full path   {r['full_s']:.1f} s (ingest loki {r['ingest_s']:.1f} s + analyze incidents "
              f"{r['full_s'] - r['ingest_s']:.1f} s)")
        print(f"  investigate / full wall: {r['inv_s'] / r['full_s']:.2f} (target <= 0.33); lines pulled "
              f"{p['lines_pulled'] / max(p['lines_in_range'], 1):.1%} (target <= 10%); same answers: {same}")
        print(f"  investigate: {r['inv']}")
        print(f"  full path:   {r['full']}")
        sys.stdout.flush()
    if len(rows) > 1:
        print("growth vs scale 1: " + ", ".join(
            f"x{r['k']:g}: investigate {r['inv_s'] / rows[0]['inv_s']:.2f}x, full {r['full_s'] / rows[0]['full_s']:.2f}x"
            for r in rows[1:]))


if __name__ == "__main__":
    main()
