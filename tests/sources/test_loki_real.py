"""The Loki source against the in-process server AND the real Grafana Loki (issue 15).

Every test runs twice (``inproc``, ``real``); the real one is skipped with the reason when
``../shared/tools/loki`` is absent. What a user relies on: every line exactly once across shard and page
boundaries and same-nanosecond bursts, kill -9 then ``--resume`` equals an uninterrupted run, tenants
(``--org-id``, ``X-Scope-OrgID`` header, ``LOKI_ORG_ID``), structured metadata (asked for with
``categorize-labels``) on the events, ranges longer than ``max_query_length``, push-down aggregates equal
to the direct metric query.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlens.errors import AuthError
from meshlens.sources.http import HttpClient
from meshlens.sources.loki import (
    LOKI_PRODUCT,
    LokiClient,
    LokiSource,
    aggregate_loki,
    ingest_loki,
    loki_http_config,
)
from meshlens.store import open_store
from tests.servers import backends
from tests.servers.backends import Backend

NS = 1_000_000_000
REPO = Path(__file__).resolve().parents[2]
T0 = (time.time_ns() // (3600 * NS) - 4) * 3600 * NS  # a whole hour, 3-4 h ago
RANGE = {"start": T0, "end": T0 + 3600 * NS}


@pytest.fixture(params=backends.BACKENDS)
def loki(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from backends.make(request)


@pytest.fixture(params=backends.BACKENDS)
def loki_auth(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from backends.make(request, auth=True, multi_tenant_queries=False)


def _client(b: Backend, org: str | None = None) -> LokiClient:
    cfg, tenant = loki_http_config(b.url, org_id=org, env={}, backoff_base_s=0.01)
    return LokiClient(HttpClient(cfg, LOKI_PRODUCT), tenant)


def _fetch(b: Backend, query: str, org: str | None = None, **kw: object) -> tuple[list[tuple[str, int, str]], LokiSource]:
    """(app, ts, line) of every emitted entry, duplicates included."""
    src = LokiSource(_client(b, org), query, RANGE["start"], RANGE["end"], progress=False, **kw)  # type: ignore[arg-type]
    src.plan()
    out = []
    for batch in src.batches():
        out += [(lb.get("app", ""), t, ln) for ln, t, lb in zip(batch.lines, batch.ts_ns, batch.labels, strict=True)]
    return out, src


def _istio(i: int, app: str) -> str:
    return (f'[2024-05-01T10:00:00.000Z] "GET /api/{i} HTTP/1.1" 200 - via_upstream - "-" 0 12 3 2 "-" "curl/8" '
            f'"req-{app}-{i:07d}" "{app}:80" "10.0.0.5:80" outbound|80||{app}.svc 10.0.0.4:5000 10.0.0.5:80 '
            "10.0.0.4:4000 - default")


# -- exact across shard and page boundaries, and same-nanosecond bursts -------------------------------
@pytest.mark.parametrize("parallel", [1, 4])
def test_every_line_once_across_shards_pages_and_bursts(loki: Backend, parallel: int) -> None:
    want: set[tuple[str, int, str]] = set()
    streams = []
    for s in range(3):
        app = f"a{s}"
        entries = [(T0 + (i * 997_000_123) % (3000 * NS), _istio(i, app)) for i in range(2700)]
        entries += [(T0 + 1800 * NS, f"burst {app} {i}") for i in range(2100)]  # 6300 lines at one ns
        entries.sort()
        streams.append(({"app": app}, entries))
        want.update((app, t, ln) for t, ln in entries)
    streams.append(({"app": "big"}, [(T0 + 2400 * NS, f"one stream burst {i:05d}") for i in range(5600)]))
    want.update(("big", T0 + 2400 * NS, f"one stream burst {i:05d}") for i in range(5600))
    loki.push(streams)
    got, src = _fetch(loki, loki.selector(), parallel=parallel)
    assert len(got) == len(want) == 3 * 4800 + 5600 and set(got) == want  # each exactly once
    assert src.paginator.requests > len(want) // 5000


def test_stored_counts_are_exact_and_a_second_run_adds_nothing(loki: Backend, tmp_path: Path) -> None:
    loki.push([({"app": f"s{s}"}, [(T0 + i * 50_000_000 + s, _istio(i, f"s{s}")) for i in range(6000)])
               for s in range(2)])
    db = tmp_path / "m.duckdb"
    first = ingest_loki(db, query=loki.selector(), url=loki.url, progress=False, **RANGE)
    assert (first.read, first.stored, first.rejects) == (12000, 12000, 0)
    second = ingest_loki(db, query=loki.selector(), url=loki.url, progress=False, **RANGE)
    assert (second.read, second.stored, second.duplicates) == (12000, 0, 12000)


# -- kill -9 and resume -------------------------------------------------------------------------------
_KILLED = textwrap.dedent("""
    import sys
    from meshlens.ingest import ingest_batches
    from meshlens.sources.http import HttpClient
    from meshlens.sources.loki import LokiClient, LokiSource, loki_http_config
    from meshlens.store import open_store
    url, query, start, end, db = sys.argv[1:6]
    cfg, org = loki_http_config(url, env={})
    src = LokiSource(LokiClient(HttpClient(cfg, "Loki"), org), query, int(start), int(end), parallel=2,
                     batch_size=1000, write_batch=1000, progress=False)
    store = open_store(db)
    src.plan(None)
    def tell():
        for i, b in enumerate(src.batches()):
            print("BATCH", i, flush=True)
            yield b
    ingest_batches(store, tell(), source=src.source_id, watermark_key=src.watermark_key, progress=False)
    print("DONE", flush=True)
""")


def test_kill9_then_resume_equals_an_uninterrupted_run(loki: Backend, tmp_path: Path) -> None:
    loki.push([({"app": f"k{s}"}, [(T0 + i * 100_000_000 + s, _istio(i, f"k{s}")) for i in range(4000)])
               for s in range(3)])
    ref = tmp_path / "ref.duckdb"
    ingest_loki(ref, query=loki.selector(), url=loki.url, progress=False, **RANGE)
    db = tmp_path / "m.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, loki.url, loki.selector(), str(RANGE["start"]),
                             str(RANGE["end"]), str(db)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(("BATCH 4", "DONE")):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    resumed = ingest_loki(db, query=loki.selector(), url=loki.url, resume=True, progress=False, **RANGE)
    with open_store(ref, read_only=True) as a, open_store(db, read_only=True) as b:
        want = {r[0] for r in a.con.execute("SELECT event_id FROM events").fetchall()}
        got = b.con.execute("SELECT event_id FROM events").fetchall()
        runs = dict(b.con.execute("SELECT status, count(*) FROM ingest_runs GROUP BY 1").fetchall())
    assert len(want) == 12000 and len(got) == len(want) and {r[0] for r in got} == want
    # the killed run stored something, the resumed one the rest (it re-reads the unfinished hours of
    # every stream: stream shards' watermark is the union of what is unfinished)
    assert runs == {"interrupted": 1, "ok": 1} and 0 < 12000 - resumed.stored < 12000


# -- tenants ------------------------------------------------------------------------------------------
def test_tenants_by_org_id_header_and_environment(loki_auth: Backend, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    b = loki_auth
    b.push([({"app": "a"}, [(T0 + i * NS, f"team a {i}") for i in range(30)])], tenant="team-a")
    b.push([({"app": "b"}, [(T0 + i * NS, f"team b {i}") for i in range(20)])], tenant="team-b")
    kw = {"query": b.selector(), "url": b.url, "progress": False, **RANGE}
    assert ingest_loki(tmp_path / "1.duckdb", org_id="team-a", **kw).read == 30  # type: ignore[arg-type]
    assert ingest_loki(tmp_path / "2.duckdb", headers=["X-Scope-OrgID: team-b"], **kw).read == 20  # type: ignore[arg-type]
    monkeypatch.setenv("LOKI_ORG_ID", "team-b")
    counts = ingest_loki(tmp_path / "3.duckdb", **kw)  # type: ignore[arg-type]
    assert counts.read == 20
    with open_store(tmp_path / "3.duckdb", read_only=True) as s:
        assert s.scalar("SELECT source FROM ingest_runs").startswith(f"loki:{b.url}|team-b|")
    monkeypatch.delenv("LOKI_ORG_ID")
    with pytest.raises(AuthError, match="needs a tenant.*--org-id"):
        ingest_loki(tmp_path / "4.duckdb", **kw)  # type: ignore[arg-type]


# -- structured metadata ------------------------------------------------------------------------------
def test_structured_metadata_lands_on_the_events(loki: Backend, tmp_path: Path) -> None:
    loki.push([({"app": "md"}, [(T0 + i * NS, _istio(i, "md"), {"trace_id": f"t{i % 3}"} if i % 2 else {})
                                for i in range(40)])])
    db = tmp_path / "m.duckdb"
    assert ingest_loki(db, query=loki.selector(), url=loki.url, progress=False, **RANGE).stored == 40
    with open_store(db, read_only=True) as s:
        rows = s.con.execute("SELECT labels['trace_id'] FROM events ORDER BY position").fetchall()
    assert [r[0] for r in rows] == [(f"t{i % 3}" if i % 2 else None) for i in range(40)]
    if loki.server is not None:  # it was asked for per entry, not as one result item per trace id
        assert all(r.headers.get("X-Loki-Response-Encoding-Flags") == "categorize-labels"
                   for r in loki.server.query_requests())


# -- longer than max_query_length (30d1h on the real Loki) ---------------------------------------------
@pytest.mark.parametrize("by_stream", [False, None])
def test_a_range_longer_than_max_query_length_is_split(loki: Backend, by_stream: bool | None) -> None:
    old = T0 - 40 * 86400 * NS
    loki.push([({"app": "old"}, [(old + i * NS, f"old {i}") for i in range(10)]),
               ({"app": "new"}, [(T0 + i * NS, f"new {i}") for i in range(10)])])
    client = _client(loki)
    src = LokiSource(client, loki.selector(), old - 3600 * NS, RANGE["end"], progress=False, by_stream=by_stream)
    src.plan()
    got = [ln for b in src.batches() for ln in b.lines]
    assert sorted(got) == sorted([f"old {i}" for i in range(10)] + [f"new {i}" for i in range(10)])
    if by_stream is False:  # one 41-day time shard: Loki refuses it and it is split
        assert src.paginator.splits >= 1
    else:  # Loki refuses /series over 41 days too: time shards, split as needed; either way exact
        assert src.streams in (None, 2)


# -- push-down aggregates -----------------------------------------------------------------------------
def test_pushdown_aggregates_equal_the_direct_metric_query(loki: Backend, tmp_path: Path) -> None:
    loki.push([({"app": f"g{s}"}, [(T0 + i * 3 * NS + s, _istio(i, f"g{s}")) for i in range(900)])
               for s in range(2)])
    sel = loki.selector()
    db = tmp_path / "m.duckdb"
    counts = aggregate_loki(db, selector=sel, url=loki.url, metrics=["requests"], step="5m", log_format="text",
                            **RANGE)
    assert counts.samples > 0
    with open_store(db, read_only=True) as s:
        stored = s.scalar("SELECT sum(value) FROM series WHERE metric = 'requests'")
    step = 300 * NS
    direct = _client(loki).query_range(f"sum(count_over_time({sel}[5m]))", T0 + step, T0 + 3600 * NS,
                                       step_s=300)  # the evaluation times aggregate_loki uses
    total = sum(float(v) for item in direct["result"] for _, v in item["values"])
    assert stored == total and 1798 <= total <= 1800  # an entry exactly at T0 is outside (T0, T0 + 5m]


def test_stream_shards_are_exclusive_when_one_stream_s_labels_contain_another_s(loki: Backend) -> None:
    # {app="a"} also matches {app="a", pod="p"}: each stream shard must exclude the other stream
    loki.push([({"app": "sup"}, [(T0 + i * NS, f"plain {i}") for i in range(50)]),
               ({"app": "sup", "pod": "p1"}, [(T0 + i * NS, f"with pod {i}") for i in range(70)])])
    got, src = _fetch(loki, loki.selector(), parallel=2)
    assert src.streams == 2 and len(got) == 120 and len(set(got)) == 120


def test_uncompressed_and_gzip_answers_are_the_same(loki: Backend) -> None:
    """Loopback pulls ask for identity (no gzip CPU on either side); the real Loki honours it, and a
    compressed answer (``compress=True``, what a remote Loki gets) decodes to the same entries."""
    loki.push([({"app": "z1"}, [(RANGE["start"] + i * NS, _istio(i, "z1")) for i in range(300)])])
    q = f'{{test="{loki.tag}"}}'
    got = {}
    for compress in (None, True):
        cfg, tenant = loki_http_config(loki.url, env={})
        cfg.compress = compress
        http = HttpClient(cfg, LOKI_PRODUCT)
        resp = http.request("GET", "/loki/api/v1/query_range", params={
            "query": q, "start": str(RANGE["start"]), "end": str(RANGE["end"]), "limit": "1000"})
        if loki.real is not None:
            assert resp.headers.get("Content-Encoding") == ("gzip" if compress else None)
        got[compress] = sorted(ln for _, _, ln in _fetch(loki, q)[0]) if compress is None else sorted(
            v[1] for s in resp.json()["data"]["result"] for v in s["values"])
        http.close()
    assert got[None] == got[True] and len(got[None]) == 300


def test_latency_bins_by_label_format_like_loki(loki: Backend) -> None:
    """investigate's latency histogram (``| label_format bin=`...``` with len/trunc/hasPrefix): the bins
    of integer-ms durations, and ``0:`` for a line without one, as Loki computes them."""
    from meshlens.investigate import LATENCY_BIN, PARSERS

    durations = [0, 3, 1, 9, 10, 15, 19, 20, 47, 99, 100, 150, 199, 250, 999, 1000, 1999, 2500, 19999]
    lines = [(T0 + (i + 1) * NS, _istio(i, "lat").replace(" 0 12 3 2 ", f" 0 12 {d} 2 ")) for i, d in enumerate(durations)]
    lines.append((T0 + 100 * NS, "not an access log line"))
    loki.push([({"app": "lat"}, lines)])
    q = f"sum by (bin) (count_over_time({loki.selector()} {PARSERS['text']} | label_format bin=`{LATENCY_BIN}` [1h]))"
    data = _client(loki).query_range(q, T0 + 3600 * NS, T0 + 3600 * NS, step_s=3600)
    got = {item["metric"].get("bin", ""): int(float(item["values"][0][1])) for item in data["result"]}
    assert got == {"0:": 1, "1:0": 1, "1:3": 1, "1:1": 1, "1:9": 1, "2:10": 1, "2:15": 1, "2:19": 1, "2:2": 1,
                   "2:4": 1, "2:9": 1, "3:10": 1, "3:15": 1, "3:19": 1, "3:2": 1, "3:9": 1, "4:10": 1, "4:19": 1,
                   "4:2": 1, "5:19": 1}
