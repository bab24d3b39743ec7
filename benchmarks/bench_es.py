"""Elasticsearch source throughput and memory: sequential vs sliced-parallel, as ratios from one run.

    .venv/bin/python benchmarks/bench_es.py [--docs 1000000] [--latency-ms 100] [--parallel 4]
                                            [--page-size 5000] [--flavor es8] [--modes fetch,ingest]

"1st page s" is the wait for the first page: the (Python) test server sorts every document of a new PIT
before answering, a one-time cost a real cluster spreads over its shards; "steady docs/s" is the rate
from the first page to the end, i.e. what the client sustains.

1. Starts the Elasticsearch-compatible test server (``tests/servers/elasticsearch.py``) in its own
   process holding ``--docs`` Fluent Bit documents (an Istio access line in ``log`` plus Kubernetes
   metadata), one per millisecond. ``--latency-ms`` is added to every search page, standing in for the
   time a real cluster spends on a 5000-hit PIT page (fetching ``_source`` from several shards); with 0
   the server answers as fast as Python can build the JSON.
2. For each mode it runs a child process and reports documents/s and the child's peak RSS:
   * ``fetch``: PIT paging + JSON decode + document mapping + RawBatch building (the source's own cost);
   * ``ingest``: the whole path, HTTP + parse + DuckDB store (``ingest_es`` into a new store);
   each sequential (one PIT reader) and with ``--parallel N`` sliced-PIT readers.
3. Prints the parallel/sequential ratios. Each child checks it read exactly ``--docs`` documents.

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

REPO = Path(__file__).resolve().parents[1]
FROM, TO = "2024-06-01T00:00:00Z", "2024-06-02T00:00:00Z"
INDEX = "logs-istio-000001"


def child(a: argparse.Namespace) -> None:
    """One measured run, in its own process so its peak RSS is its own."""
    sys.path.insert(0, str(REPO))
    from meshlens.sources import elasticsearch as es
    from meshlens.sources.elasticsearch import EsQuery, EsSource, SliceCursor, Window, ingest_es
    from meshlens.sources.http import HttpConfig

    first: list[float] = []
    real_batches = es.EsSource.batches

    def timed_batches(self: EsSource, *args: object, **kw: object):  # type: ignore[no-untyped-def]
        for b in real_batches(self, *args, **kw):  # type: ignore[arg-type]
            if not first and len(b):
                first.append(time.perf_counter())
            yield b

    es.EsSource.batches = timed_batches  # type: ignore[method-assign]
    t0 = time.perf_counter()
    if a.mode == "fetch":
        src = EsSource(HttpConfig(url=a.url), EsQuery("logs-*"), page_size=a.page_size, parallel=a.parallel)
        window = Window(1_717_200_000_000, 1_717_286_400_000)
        n = 0
        for batch in src.batches(window, [SliceCursor() for _ in range(a.parallel)]):
            n += len(batch)
        src.close()
        out = {"docs": n}
    else:
        with tempfile.TemporaryDirectory() as d:
            counts = ingest_es(Path(d) / "bench.duckdb", index="logs-*", url=a.url, start=FROM, end=TO,
                               parallel=a.parallel, page_size=a.page_size, progress=False)
        out = {"docs": counts.read, "stored": counts.stored, "rejects": counts.rejects}
    t1 = time.perf_counter()
    out["seconds"] = t1 - t0
    out["first_page_s"] = first[0] - t0 if first else out["seconds"]
    print(json.dumps(out))


def measure(url: str, mode: str, parallel: int, a: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--url", url, "--mode", mode, "--parallel", str(parallel),
           "--page-size", str(a.page_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} --parallel {parallel} failed")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["docs_per_s"] = res["docs"] / res["seconds"]
    steady = res["seconds"] - res["first_page_s"]
    res["steady_docs_per_s"] = res["docs"] / steady if steady > 0 else float("nan")
    res["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--page-size", type=int, default=5000)
    ap.add_argument("--flavor", default="es8")
    ap.add_argument("--modes", default="fetch,ingest")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return

    print(f"starting the {a.flavor} test server with {a.docs:,} documents, {a.latency_ms:g} ms per page ...",
          flush=True)
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.elasticsearch", "--flavor", a.flavor, "--generate", str(a.docs),
         "--index", INDEX, "--latency-ms", str(a.latency_ms)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            raise SystemExit("the test server did not start")
        url = json.loads(line)["url"]
        print(f"server ready at {url} ({time.perf_counter() - t0:.0f}s)\n", flush=True)
        results: dict[tuple[str, int], dict[str, float]] = {}
        print(f"{'mode':<8}{'parallel':>9}{'docs':>11}{'seconds':>9}{'1st page s':>11}{'docs/s':>10}"
              f"{'steady docs/s':>14}{'peak RSS MB':>13}")
        for mode in a.modes.split(","):
            for par in (1, a.parallel):
                r = measure(url, mode, par, a)
                results[(mode, par)] = r
                if r["docs"] != a.docs:
                    raise SystemExit(f"{mode} --parallel {par} read {r['docs']} documents, the server holds {a.docs}")
                print(f"{mode:<8}{par:>9}{r['docs']:>11,}{r['seconds']:>9.1f}{r['first_page_s']:>11.1f}"
                      f"{r['docs_per_s']:>10,.0f}{r['steady_docs_per_s']:>14,.0f}{r['peak_rss_mb']:>13.0f}",
                      flush=True)
        print()
        for mode in a.modes.split(","):
            seq, par = results[(mode, 1)], results[(mode, a.parallel)]
            print(f"{mode}: sliced parallel {a.parallel} / sequential = "
                  f"{par['docs_per_s'] / seq['docs_per_s']:.2f}x docs/s overall, "
                  f"{par['steady_docs_per_s'] / seq['steady_docs_per_s']:.2f}x after the first page, "
                  f"{par['peak_rss_mb'] / seq['peak_rss_mb']:.2f}x peak RSS")
        if "ingest" in a.modes and "fetch" in a.modes:
            f, i = results[("fetch", 1)], results[("ingest", 1)]
            print(f"whole path / fetch only (sequential) = {i['docs_per_s'] / f['docs_per_s']:.2f}x docs/s")
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(30)


if __name__ == "__main__":
    main()
