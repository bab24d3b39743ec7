"""Load: ingest N events (default 10M) and run every report on the result; peak memory of each stage.

    .venv/bin/python benchmarks/bench_load.py                  # 10M events (~3.3 GB of logs, a few minutes)
    .venv/bin/python benchmarks/bench_load.py --events 1000000 # the smaller run used on shared machines
    .venv/bin/python benchmarks/bench_load.py --keep /tmp/load  # keep the inputs and the store

Each stage runs in its own child process (ingest, then one per report, as the scheduler would run
them) and reports its own peak RSS and that of its children (the report's Jupyter kernel). The promise
checked is *bounded* memory: the ingest streams the file in batches with DuckDB's memory limit set
(``MESHLENS_INGEST_MEMORY_LIMIT``, 1GB by default), so its peak must not grow with the input size --
compare two sizes (``--events`` 1M and 10M) to see it; and the reports aggregate in SQL, so their peak is
set by result sizes, not by the event count.

Data: Istio text access lines for 24 services in 4 namespaces over 6 hours (with 5xx, UF/UH flags, RBAC
denials and a little PII to exercise redaction), unique request ids so every line is an event.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_LINE = ('[{ts}] "{method} /api/{svc}/{item}{q} HTTP/1.1" {code} {flags} {details} - "-" {rx} {tx} {dur} {ust} "-" '
         '"{ua}" "{rid}" "{svc}.{ns}:8080" "10.{a}.{b}.{c}:8080" outbound|8080||{svc}.{ns}.svc.cluster.local '
         '10.{a}.{b}.9:{sport} 10.96.{b}.{c}:8080 10.{b}.{a}.{c}:{cport} - default\n')
SERVICES = [(f"svc{i:02d}", f"ns{i % 4}") for i in range(24)]

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
stage = sys.argv[1]
if stage == "ingest":
    from meshlens.ingest import ingest_files
    out = ingest_files(sys.argv[2], [sys.argv[3]], progress=False).as_dict()
else:
    from meshlens import reports
    r = reports.run_report(sys.argv[4], sys.argv[2], json.loads(sys.argv[5]), sys.argv[3], timeout_s=3600)
    out = {"status": r.status, "error": (r.error or "")[:500]}
out["seconds"] = round(time.perf_counter() - t0, 1)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
out["children_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
print("RESULT " + json.dumps(out, default=str))
"""


def write_log(path: Path, n: int) -> None:
    t0_ms = 1_714_557_600_000
    span_ms = 6 * 3600 * 1000
    buf: list[str] = []
    with path.open("w") as fh:
        for i in range(n):
            svc, ns = SERVICES[(i * 7919) % 24]
            ms = t0_ms + (i * span_ms) // n
            s, milli = divmod(ms, 1000)
            r = (i * 2654435761) % 1000
            code, flags, details = (200, "-", "via_upstream")
            if r < 15:
                code, flags, details = 503, ("UF,URX" if r < 8 else "UH"), "upstream_reset_before_response_started"
            elif r < 20:
                code, flags, details = 403, "-", "rbac_access_denied_matched_policy[ns[x]-policy[deny]-rule[0]]"
            q = "?token=abc123secret" if r == 999 else ("?email=a.b%40example.com" if r == 998 else "")
            buf.append(_LINE.format(
                ts=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{milli:03d}Z",
                method="GET" if r % 5 else "POST", svc=svc, ns=ns, item=i % 5000, q=q, code=code, flags=flags,
                details=details, rx=r, tx=(r * 37) % 20000, dur=1 + r % 250, ust=r % 200, ua="envoy/1.30",
                rid=f"{i:012x}-load", a=i % 200, b=(i >> 8) % 250, c=(i >> 16) % 250, sport=1024 + i % 60000,
                cport=2048 + (i * 13) % 60000))
            if len(buf) >= 50_000:
                fh.writelines(buf)
                buf.clear()
        fh.writelines(buf)


def child(*args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=ROOT, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"stage {args[0]} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="directory for inputs/store (kept)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from meshlens.reports import list_notebooks

    d = args.keep or Path(tempfile.mkdtemp(prefix="meshlens-load-"))
    d.mkdir(parents=True, exist_ok=True)
    log, db = d / "access.log", d / "load.duckdb"
    t = time.perf_counter()
    write_log(log, args.events)
    print(f"wrote {args.events:,} lines ({log.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f}s")
    results = {"ingest": child("ingest", str(db), str(log))}
    ing = results["ingest"]
    print(f"ingest: {ing}  -> {args.events / float(ing['seconds']):,.0f} lines/s, store "
          f"{db.stat().st_size / 1e9:.2f} GB")
    for name in sorted(list_notebooks()):
        # the symptom-driven reports need a service of this data set (their default is the demo's)
        params = {"service": SERVICES[0][0]} if name in ("change_correlation", "root_cause") else {}
        results[name] = child("report", str(db), str(d / "reports"), name, json.dumps(params))
        print(f"report {name}: {results[name]}")
    peak = max(max(int(r["peak_rss_mb"]), int(r["children_peak_rss_mb"])) for r in results.values())
    print(f"SUMMARY events={args.events} peak_rss_mb={peak} "
          + " ".join(f"{k}={v.get('seconds')}s/{v.get('peak_rss_mb')}MB" for k, v in results.items()))
    bad = [k for k, v in results.items() if k != "ingest" and v.get("status") != "ok"]
    if bad:
        raise SystemExit(f"reports not ok: {bad}")


if __name__ == "__main__":
    main()
