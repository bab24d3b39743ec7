"""Ingest throughput and memory, as ratios against DuckDB's own read_json measured in the same run.

    .venv/bin/python benchmarks/bench_ingest.py [--lines 1000000] [--rss-lines 2000000]

1. Writes N Istio JSON lines and N Istio TEXT lines (Istio's default formats, timestamps spread over a
   few hours as in real logs) to a temp dir.
2. Baseline: DuckDB ``read_json`` loading the same JSON file into a table of a new DuckDB file.
   Floor: DuckDB alone keeping the raw line (zstd), computing an md5 identity and running the redaction
   scan once per line -- no parsing -- printed as a ratio too: the part of the 3x budget that the
   mandatory per-record work of an audit store already uses.
3. meshlens ``ingest_files`` of each file into a new store; prints lines/s and the ratio
   meshlens time / read_json time (target: <= 3x) and lines/s (target: >= 150k on 2 cores), and the
   ratio meshlens time / floor (issue 15's target: <= 2x for JSON and TEXT).
4. Peak RSS of a child process ingesting ``--rss-lines`` lines (memory must stay bounded: the file
   is streamed in batches), next to the file size.

The machine is shared and noisy, which is why only ratios within one run are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = ('[{ts}] "GET /api/v1/products/{i} HTTP/1.1" {code} {flags} via_upstream - "-" 0 {size} {dur} {ust} "-" '
        '"Mozilla/5.0 (X11; Linux x86_64)" "{rid}" "productpage:9080" "10.44.1.27:9080" '
        'outbound|9080||productpage.shop.svc.cluster.local 10.44.1.23:37652 10.0.45.184:9080 10.44.1.23:46520 '
        '- default\n')


def _ts(i: int) -> str:
    ms = 1_714_557_600_000 + i * 7  # 7 ms apart
    s, milli = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{milli:03d}Z"


def write_inputs(d: Path, n: int) -> tuple[Path, Path]:
    jp, tp = d / "istio.jsonl", d / "istio.log"
    with open(jp, "w") as jf, open(tp, "w") as tf:
        for i in range(n):
            code, flags = (503, "UF") if i % 97 == 0 else (200, "-")
            rid = f"{i:08x}-6d84-929d-98bd-c5aee93b5c88"
            rec = {"start_time": _ts(i), "method": "GET", "path": f"/api/v1/products/{i}", "protocol": "HTTP/1.1",
                   "response_code": code, "response_flags": flags, "response_code_details": "via_upstream",
                   "connection_termination_details": None, "upstream_transport_failure_reason": None,
                   "bytes_received": 0, "bytes_sent": 1200 + i % 300, "duration": 4 + i % 50,
                   "upstream_service_time": str(3 + i % 50), "x_forwarded_for": None,
                   "user_agent": "Mozilla/5.0 (X11; Linux x86_64)", "request_id": rid,
                   "authority": "productpage:9080", "upstream_host": "10.44.1.27:9080",
                   "upstream_cluster": "outbound|9080||productpage.shop.svc.cluster.local",
                   "upstream_local_address": "10.44.1.23:37652", "downstream_local_address": "10.0.45.184:9080",
                   "downstream_remote_address": "10.44.1.23:46520", "requested_server_name": None,
                   "route_name": "default"}
            jf.write(json.dumps(rec) + "\n")
            tf.write(TEXT.format(ts=_ts(i), i=i, code=code, flags=flags, size=1200 + i % 300, dur=4 + i % 50,
                                 ust=3 + i % 50, rid=rid))
    return jp, tp


def baseline_read_json(path: Path, d: Path) -> float:
    import duckdb

    db = d / "baseline.duckdb"
    con = duckdb.connect(str(db))
    t = time.perf_counter()
    con.execute("CREATE TABLE t AS SELECT * FROM read_json(?, format='newline_delimited')", [str(path)])
    con.execute("CHECKPOINT")
    dt = time.perf_counter() - t
    con.close()
    db.unlink()
    return dt


def floor_mandatory(path: Path, d: Path) -> float:
    """DuckDB alone doing only what an audit store must do per record, with no parsing at all: keep the
    raw line (zstd, as meshlens stores it), compute the md5 identity of (stream, line) and
    run the redaction scan once -- the floor under any meshlens ingest, to read the 3x target against."""
    import duckdb

    from meshlens.redact import prefilter_pattern

    combined = prefilter_pattern()
    assert combined is not None
    db = d / "floor.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE t (event_id VARCHAR, raw VARCHAR USING COMPRESSION zstd)")
    src = (f"read_csv('{path}', columns={{'line': 'VARCHAR'}}, delim=chr(1), quote='', escape='', header=false, "
           "auto_detect=false)")
    t = time.perf_counter()
    con.execute(f"""INSERT INTO t SELECT md5('stream' || chr(31) || line), CASE WHEN
                    regexp_matches(line, $pattern) THEN 'redacted' ELSE line END FROM {src}""", {"pattern": combined})
    con.execute("CHECKPOINT")
    dt = time.perf_counter() - t
    con.close()
    db.unlink()
    return dt


def meshlens_ingest(path: Path, d: Path) -> tuple[float, int]:
    from meshlens.ingest import ingest_files

    db = d / f"{path.stem}.duckdb"
    t = time.perf_counter()
    c = ingest_files(db, [path], progress=False)
    dt = time.perf_counter() - t
    assert c.stored == c.read, c
    for f in d.glob(f"{path.stem}.duckdb*"):
        f.unlink()
    return dt, c.read


def peak_rss(path: Path, d: Path) -> int:
    code = ("import resource, sys; from meshlens.ingest import ingest_files; "
            "ingest_files(sys.argv[2], [sys.argv[1]], progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(d / "rss.duckdb")], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--rss-lines", type=int, default=2_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshlens-bench-") as tmp:
        d = Path(tmp)
        jp, tp = write_inputs(d, args.lines)
        base = baseline_read_json(jp, d)
        floor = floor_mandatory(jp, d)
        tj, n = meshlens_ingest(jp, d)
        tt, _ = meshlens_ingest(tp, d)
        print(f"lines: {n:,}")
        print(f"duckdb read_json (baseline): {base:6.2f} s  {n / base:>10,.0f} lines/s")
        print(f"floor (raw + md5 id + redaction scan, no parsing): {floor:6.2f} s  ratio {floor / base:4.2f}x")
        print(f"meshlens Istio JSON        : {tj:6.2f} s  {n / tj:>10,.0f} lines/s  ratio {tj / base:4.2f}x "
              f"(target <= 3x, >= 150k lines/s); {tj / floor:4.2f}x the floor (target <= 2x)")
        print(f"meshlens Istio TEXT        : {tt:6.2f} s  {n / tt:>10,.0f} lines/s  ratio {tt / base:4.2f}x; "
              f"{tt / floor:4.2f}x the floor (target <= 2x)")
        if args.rss_lines:
            big = d / "big.log"
            with open(big, "w") as out:
                for _ in range(max(1, args.rss_lines // args.lines)):
                    out.write(tp.read_text())
            rss = peak_rss(big, d)
            print(f"peak RSS ingesting {args.rss_lines:,} text lines ({big.stat().st_size / 1e6:,.0f} MB file): "
                  f"{rss / 1e6:,.0f} MB")
        os.sync()


if __name__ == "__main__":
    main()
