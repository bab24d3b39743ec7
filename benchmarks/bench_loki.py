"""Loki source throughput and memory: sequential vs parallel, as ratios measured in the same run.

    .venv/bin/python benchmarks/bench_loki.py [--lines 1000000] [--streams 40] [--latency-ms 200]
                                              [--parallel 8] [--batch-size 5000]

``--parallel`` defaults to 8: fetching is latency-bound (each query waits on Loki), so more concurrent
shards than cores is the normal setting, as with logcli's ``--parallel-max-workers``. With 4 the ratio
is lower here (~2.8x in our runs) because the test server and the store share the client's 2 cores
with fetching; run ``--parallel 4`` to see it.

1. Starts the Loki-compatible test server (``tests/servers/loki.py``) in its own process with ``--lines``
   Istio TEXT access-log lines over ``--streams`` streams (labels namespace/app/pod/container) spread
   over one hour. ``--latency-ms`` is added to every query, standing in for the time a real Loki spends
   finding and decompressing chunks (typically 0.1-1 s for a 5000-line page); with 0 the server answers
   as fast as Python can.
2. For each mode it runs a child process and reports lines/s and the child's peak RSS:
   * ``fetch``: HTTP + JSON decode + RawBatch building only (the source's own cost);
   * ``ingest``: the whole path, HTTP + parse + DuckDB store (``ingest_loki`` into a new store);
   each with ``--parallel 1`` (sequential, like logcli without --parallel-*) and ``--parallel N``;
   * ``store``: the ceiling -- the same lines as in-memory batches straight into ``ingest_batches``
     (parse + store, no HTTP), so the whole path can be read as a fraction of it.
3. Prints the parallel/sequential ratios (target: >= 3x) and the whole-path lines/s (target: >= 50k).

The machine is shared and noisy: compare ratios within one run, not absolute numbers across runs.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
T0_S = 1_700_000_000
NS = 1_000_000_000


def child(args: argparse.Namespace) -> None:
    """One measured run (in its own process, so peak RSS is its own)."""
    sys.path.insert(0, str(REPO))
    from meshlens.sources.http import HttpClient
    from meshlens.sources.loki import LokiClient, LokiSource, ingest_loki, loki_http_config

    start, end = T0_S * NS, (T0_S + args.span_s) * NS
    query = '{container="istio-proxy"}'
    if args.mode == "store":
        store_only(args)
        return
    t0 = time.perf_counter()
    if args.mode == "fetch":
        cfg, org = loki_http_config(args.url, env={})
        with HttpClient(cfg, "Loki") as http:
            src = LokiSource(LokiClient(http, org), query, start, end, parallel=args.parallel,
                             batch_size=args.batch_size, progress=False)
            src.plan()
            n = sum(len(b) for b in src.batches())
        out = {"lines": n}
    else:
        with tempfile.TemporaryDirectory() as d:
            counts = ingest_loki(Path(d) / "bench.duckdb", url=args.url, query=query, start=start, end=end,
                                 parallel=args.parallel, batch_size=args.batch_size, progress=False)
        out = {"lines": counts.read, "stored": counts.stored, "rejects": counts.rejects}
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


def store_only(args: argparse.Namespace) -> None:
    """Parse + store of the server's lines from memory (no HTTP): the ceiling for ``ingest``."""
    from meshlens.ingest import ingest_batches
    from meshlens.records import DEFAULT_BATCH, RawBatch
    from meshlens.store import open_store
    from tests.servers.loki import LokiServer, generate

    srv = LokiServer()
    generate(srv, lines=args.lines, streams=args.streams, start_ns=T0_S * NS, span_ns=args.span_s * NS)
    rows = sorted(srv.holdings(), key=lambda r: r[1])
    streams: dict[Any, dict[str, str]] = {}  # one labels dict per stream, as the Loki source hands them over
    batches = []
    for i in range(0, len(rows), DEFAULT_BATCH):
        chunk = rows[i:i + DEFAULT_BATCH]
        batches.append(RawBatch(source="bench", lines=[r[2] for r in chunk], ts_ns=[r[1] for r in chunk],
                                labels=[streams.setdefault(r[0], dict(r[0])) for r in chunk],
                                positions=[f"q@{r[1]}" for r in chunk]))
    with tempfile.TemporaryDirectory() as d:
        store = open_store(Path(d) / "bench.duckdb")
        t0 = time.perf_counter()
        counts = ingest_batches(store, batches, source="bench", progress=False)
        seconds = time.perf_counter() - t0
        store.close()
    print(json.dumps({"lines": counts.read, "stored": counts.stored, "seconds": seconds}))


def measure(url: str, mode: str, parallel: int, a: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--url", url, "--mode", mode, "--parallel", str(parallel),
           "--batch-size", str(a.batch_size), "--span-s", str(a.span_s), "--lines", str(a.lines),
           "--streams", str(a.streams)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} --parallel {parallel} failed with exit code {proc.returncode}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["lines_per_s"] = res["lines"] / res["seconds"]
    res["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    res["cpu_s"] = usage.ru_utime + usage.ru_stime
    return res


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (the test server shares the 2 cores with the client)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--streams", type=int, default=40)
    ap.add_argument("--span-s", type=int, default=3600)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--modes", default="fetch,ingest,store")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; starting the Loki test server with "
          f"{a.lines:,} lines, {a.streams} streams, {a.latency_ms:g} ms per query ...", flush=True)
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.loki", "--lines", str(a.lines), "--streams", str(a.streams),
         "--start-ns", str(T0_S * NS), "--span-s", str(a.span_s), "--latency-ms", str(a.latency_ms)],
        stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    try:
        assert server.stdout is not None
        ready = server.stdout.readline().split()
        if not ready or ready[0] != "READY":
            raise SystemExit("the test server did not start")
        url, held = ready[1], int(ready[2])
        print(f"server ready at {url} holding {held:,} lines ({time.perf_counter() - t0:.1f}s)\n", flush=True)
        results: dict[tuple[str, int], dict[str, float]] = {}
        print(f"{'mode':<8}{'parallel':>9}{'lines':>11}{'seconds':>9}{'lines/s':>11}{'peak RSS MB':>13}"
              f"{'client CPU s':>14}{'server CPU s':>14}")
        for mode in a.modes.split(","):
            for par in ((1,) if mode == "store" else (1, a.parallel)):
                before = _proc_cpu_s(server.pid)
                r = measure(url, mode, par, a)
                r["server_cpu_s"] = _proc_cpu_s(server.pid) - before
                results[(mode, par)] = r
                if r["lines"] != held:
                    raise SystemExit(f"{mode} --parallel {par} read {r['lines']} lines, the server holds {held}")
                print(f"{mode:<8}{par:>9}{r['lines']:>11,}{r['seconds']:>9.1f}{r['lines_per_s']:>11,.0f}"
                      f"{r['peak_rss_mb']:>13.0f}{r['cpu_s']:>14.1f}{r['server_cpu_s']:>14.1f}", flush=True)
        print()
        for mode in a.modes.split(","):
            if mode == "store":
                continue
            seq, par = results[(mode, 1)], results[(mode, a.parallel)]
            print(f"{mode}: parallel {a.parallel} / sequential = {par['lines_per_s'] / seq['lines_per_s']:.2f}x "
                  "(target >= 3x)")
        if ("ingest", a.parallel) in results:
            best = max(results[("ingest", p)]["lines_per_s"] for p in (1, a.parallel))
            print(f"whole path (HTTP + parse + store): {best:,.0f} lines/s (target >= 50,000)")
            if ("store", 1) in results:
                ceiling = results[("store", 1)]["lines_per_s"]
                print(f"parse + store alone (no HTTP): {ceiling:,.0f} lines/s; the whole path reaches "
                      f"{best / ceiling:.0%} of it")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
