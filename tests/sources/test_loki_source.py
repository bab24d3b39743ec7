"""The Loki source against the Loki-compatible test server: exact pagination, tenants, auth, storms,
dropped connections, adaptive splits, resume after a kill, and "stored == what the server holds"."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.errors import AuthError, ConfigError, QueryError, SourceError
from meshlens.ingest import ingest_batches
from meshlens.records import RawBatch
from meshlens.sources.http import HttpClient
from meshlens.sources.loki import (
    LokiClient,
    LokiSource,
    add_matcher,
    ingest_loki,
    loki_http_config,
    resolve_range,
    split_log_query,
)
from meshlens.store import open_store
from tests.servers.loki import NS, LokiServer, generate, istio_line
from tests.support.loki_events import T0, Q, server_as_events, stored_events

REPO = Path(__file__).resolve().parents[2]


def http(srv: LokiServer, sleeps: list[float] | None = None, org: str | None = None, **kw: object) -> LokiClient:
    cfg, tenant = loki_http_config(srv.url, org_id=org, backoff_base_s=0.001, env={},
                                   max_retries=kw.pop("max_retries", 6), **kw)  # type: ignore[arg-type]
    client = HttpClient(cfg, "Loki", sleep=(sleeps.append if sleeps is not None else (lambda s: None)))
    return LokiClient(client, tenant)


Key = tuple[tuple[tuple[str, str], ...], int, str]


def fetch_all(srv: LokiServer, query: str = Q, start: int = T0, end: int = T0 + 600 * NS, *,
              client: LokiClient | None = None, **kw: object) -> tuple[list[Key], LokiSource]:
    """Run the source and return every emitted (labels, ts, line), duplicates included."""
    src = LokiSource(client or http(srv), query, start, end, progress=False, **kw)  # type: ignore[arg-type]
    src.plan()
    out: list[Key] = []
    for b in src.batches():
        assert len(b.lines) == len(b.ts_ns) == len(b.labels) == len(b.positions)
        assert b.checkpoint is not None
        out += [(tuple(sorted(lb.items())), t, ln) for ln, t, lb in zip(b.lines, b.ts_ns, b.labels, strict=True)]
    return out, src


def assert_exact(srv: LokiServer, got: list[Key], tenant: str = "fake", start: int = T0,
                 end: int = T0 + 600 * NS) -> None:
    held = srv.holdings(tenant, start, end)
    assert len(got) == len(set(got)), "a line was emitted twice"
    missing, extra = held - set(got), set(got) - held
    assert not missing and not extra, f"missing {len(missing)}, extra {len(extra)}"


LABELS = [{"namespace": "shop", "app": a, "pod": f"{a}-5d9f7-x{i}", "container": "istio-proxy"}
          for i, a in enumerate(["cart", "checkout", "payments", "reviews"])]


def burst(srv: LokiServer, ts: int, n: int, labels: dict[str, str], text: str = "line", tenant: str = "fake") -> None:
    """``n`` distinct Istio-looking lines at one nanosecond (timestamps parsed at second precision)."""
    srv.push(labels, [(ts, f'[2023-11-14T22:13:20.000Z] "GET /{text}/{i} HTTP/1.1" 200 - via_upstream - "-" 0 1 2 1 '
                           f'"-" "curl" "id-{i}" "a:80" "10.0.0.1:80" outbound|80||a.shop.svc.cluster.local - - - - -')
                      for i in range(n)], tenant)


# == exact pagination ======================================================================================
@pytest.mark.parametrize("parallel", [1, 3])
def test_thousands_of_lines_on_one_nanosecond_across_pages_and_streams(parallel: int) -> None:
    """The logcli weaknesses: identical text in two streams at the boundary ns, and a whole page at one ns."""
    with LokiServer(shuffle_ties=True) as srv:
        generate(srv, lines=1500, streams=3, start_ns=T0, span_ns=600 * NS)
        t = T0 + 300 * NS
        burst(srv, t, 3000, LABELS[0])
        burst(srv, t, 2000, LABELS[1])  # same texts as in LABELS[0], other stream
        burst(srv, t + 1, 40, LABELS[2])
        got, src = fetch_all(srv, batch_size=500, parallel=parallel)
        assert_exact(srv, got)
        assert len(got) == 1500 + 5040


def test_one_stream_burst_bigger_than_the_server_maximum_is_partitioned_by_prefix() -> None:
    with LokiServer(max_entries_limit=300) as srv:
        t = T0 + 10 * NS
        burst(srv, t, 1000, LABELS[0], text="same/long/prefix")
        burst(srv, t, 120, LABELS[1])
        srv.push(LABELS[0], [(t, ""), (t, "[x] \\ ^$.*+?()[]{}| é ☃")])  # empty line, regex metacharacters
        got, src = fetch_all(srv, batch_size=100)
        assert_exact(srv, got)
        assert len(got) == 1122
        assert src.paginator.max_entries == 300  # never asked for more than the server allows twice


@pytest.mark.parametrize("parallel", [1, 4])
def test_parallel_shards_equal_sequential_on_skewed_data(parallel: int) -> None:
    with LokiServer(shuffle_ties=True) as srv:
        generate(srv, lines=3000, streams=4, start_ns=T0 + 500 * NS, span_ns=20 * NS, seed=3)  # all at the end
        generate(srv, lines=200, streams=2, start_ns=T0, span_ns=600 * NS, seed=4)
        got, src = fetch_all(srv, batch_size=250, parallel=parallel)
        assert_exact(srv, got)
        assert src.checkpoint()["pending"] == []


def test_repeated_label_sets_and_pipelines_keep_response_labels() -> None:
    with LokiServer() as srv:
        srv.push(LABELS[0], [(T0 + i, f'{{"response_code":{200 + i % 2},"authority":"a"}}') for i in range(50)])
        got, _ = fetch_all(srv, query=Q + ' | json | response_code="201"', batch_size=7)
        assert len(got) == 25 and len(set(got)) == 25
        assert all(dict(lb)["response_code"] == "201" and dict(lb)["app"] == "cart" for lb, _, _ in got)


# == tenants and auth ======================================================================================
def test_tenants_are_isolated_and_part_of_the_identity(tmp_path: Path) -> None:
    with LokiServer(auth_enabled=True) as srv:
        generate(srv, lines=300, streams=2, start_ns=T0, span_ns=600 * NS, tenant="team-a", seed=1)
        generate(srv, lines=200, streams=2, start_ns=T0, span_ns=600 * NS, tenant="team-b", seed=2)
        got_a, src_a = fetch_all(srv, client=http(srv, org="team-a"), batch_size=64)
        assert_exact(srv, got_a, tenant="team-a")
        assert {r.tenant for r in srv.query_requests()} == {"team-a"}
        got_ab, src_ab = fetch_all(srv, client=http(srv, org="team-a|team-b"), batch_size=64)
        assert len(got_ab) == 500 and {dict(k[0])["__tenant_id__"] for k in got_ab} == {"team-a", "team-b"}
        assert src_a.source_id == f"loki:{srv.url}|team-a|{Q}" != src_ab.source_id

        with pytest.raises(AuthError, match="--org-id"):
            fetch_all(srv)  # no tenant: Loki answers 401 "no org id"


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_is_clear_and_not_retried(status: int) -> None:
    with LokiServer(basic_auth=("reader", "right")) as srv:
        generate(srv, lines=10, streams=1, start_ns=T0, span_ns=600 * NS)
        if status == 403:
            srv.inject(status=403, body="access denied: user reader may not read tenant fake", times=10)
            client = http(srv, username="reader", password="right")
        else:
            client = http(srv, username="reader", password="wrong")
        with pytest.raises(AuthError) as ei:
            fetch_all(srv, client=client, parallel=3)
        assert f"HTTP {status}" in str(ei.value) and "wrong" not in str(ei.value)
        assert len(srv.query_requests()) <= 3  # at most one per worker, none retried


# == faults ================================================================================================
def test_429_and_5xx_storms_are_ridden_out_exactly() -> None:
    with LokiServer() as srv:
        generate(srv, lines=2000, streams=3, start_ns=T0, span_ns=600 * NS)
        srv.inject(status=429, times=4, retry_after="3", body="too many outstanding requests")
        srv.inject(status=503, times=3)
        srv.inject(status=500, times=2)
        srv.inject(status=502, times=2)
        sleeps: list[float] = []
        got, _ = fetch_all(srv, client=http(srv, sleeps, max_retries=12), batch_size=300, parallel=2)
        assert_exact(srv, got)
        assert len(sleeps) == 11 and sleeps.count(3.0) == 4


def test_connection_dropped_mid_body_loses_nothing() -> None:
    with LokiServer() as srv:
        generate(srv, lines=1200, streams=2, start_ns=T0, span_ns=600 * NS)
        srv.inject(drop_mid_body=True, times=3)
        got, _ = fetch_all(srv, batch_size=200)
        assert_exact(srv, got)


@pytest.mark.parametrize("limit", ["bytes", "length", "timeout"])
def test_shard_is_split_when_loki_says_query_too_large(limit: str) -> None:
    kw = {"bytes": {"max_querier_bytes": 60_000}, "length": {"max_query_length_ns": 100 * NS},
          "timeout": {"timeout_above_ns": 150 * NS}}[limit]
    with LokiServer(**kw) as srv:  # type: ignore[arg-type]
        generate(srv, lines=1500, streams=3, start_ns=T0, span_ns=600 * NS)
        got, src = fetch_all(srv, batch_size=5000, parallel=2 if limit == "bytes" else 1)
        assert_exact(srv, got)
        assert src.paginator.splits >= 1
        statuses = {r.status for r in srv.query_requests()}
        assert statuses == {200, 504 if limit == "timeout" else 400}


def test_page_size_is_lowered_to_the_server_maximum() -> None:
    with LokiServer(max_entries_limit=100) as srv:
        generate(srv, lines=700, streams=2, start_ns=T0, span_ns=600 * NS)
        got, src = fetch_all(srv, batch_size=1000)
        assert_exact(srv, got)
        assert src.paginator.page_limit == 100
        assert sum(r.status == 400 for r in srv.query_requests()) == 1


def test_logql_syntax_error_is_reported_at_once_with_lokis_message() -> None:
    with LokiServer() as srv:
        with pytest.raises(QueryError, match=r"parse error at line 1, col \d+: syntax error: unexpected \$end"):
            fetch_all(srv, query='{container="istio-proxy"', parallel=3)
        assert len(srv.query_requests()) <= 3
    with LokiServer() as srv, pytest.raises(QueryError, match="aggregate loki"):
        fetch_all(srv, query='sum(count_over_time({container="istio-proxy"}[1m]))')


@pytest.mark.timeout(60)
def test_an_error_in_one_worker_stops_all_workers_promptly() -> None:
    import threading

    from tests.servers.loki import Fault

    with LokiServer() as srv:
        generate(srv, lines=2000, streams=2, start_ns=T0, span_ns=600 * NS)
        seen = {"n": 0}

        def hook(req):  # noqa: ANN001, ANN202 - the 1st query fails while three workers sit idle
            if req.path.endswith("query_range"):
                seen["n"] += 1
                if seen["n"] == 1:
                    return Fault(status=400, body="bad request from a misconfigured gateway")
            return None

        srv.fault_hook = hook
        with pytest.raises(SourceError, match="misconfigured gateway"):
            fetch_all(srv, batch_size=100, parallel=4, shard_ns=600 * NS)  # 1 shard for 4 workers

        def workers() -> list[threading.Thread]:
            return [t for t in threading.enumerate() if t.name.startswith("loki-worker")]

        deadline = time.monotonic() + 10
        while workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers() == []


def test_exhausted_retries_fail_resumably_then_resume_completes(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    with LokiServer() as srv:
        generate(srv, lines=1500, streams=3, start_ns=T0, span_ns=600 * NS)
        calls = {"n": 0}

        def hook(req):  # noqa: ANN001, ANN202 - fail every query after the 3rd
            from tests.servers.loki import Fault
            if req.path.endswith("query_range"):
                calls["n"] += 1
                if calls["n"] > 3:
                    return Fault(status=503, retry_after="0")
            return None

        srv.fault_hook = hook
        kw = {"url": srv.url, "query": Q, "start": T0, "end": T0 + 600 * NS, "batch_size": 200, "progress": False,
              "max_retries": 2, "backoff_base_s": 0.001, "write_batch": 200}
        with pytest.raises(SourceError) as ei:
            ingest_loki(db, **kw)
        assert ei.value.resumable
        with open_store(db) as store:
            partial = store.scalar("SELECT count(*) FROM events")
        assert 0 < partial < 1500
        srv.fault_hook = None
        counts = ingest_loki(db, resume=True, **kw)
        with open_store(db) as store:
            assert stored_events(store) == server_as_events(srv)
        assert counts.stored == 1500 - partial


# == resume =================================================================================================
class Killed(Exception):
    pass


@pytest.mark.parametrize(("parallel", "kill_after"), [(1, 1), (1, 4), (3, 2), (3, 6)])
def test_resume_after_a_kill_gives_exactly_the_uninterrupted_result(tmp_path: Path, parallel: int,
                                                                     kill_after: int) -> None:
    with LokiServer(shuffle_ties=True) as srv:
        generate(srv, lines=1600, streams=3, start_ns=T0, span_ns=600 * NS, seed=7)
        burst(srv, T0 + 100 * NS, 700, LABELS[0])
        kw = {"url": srv.url, "query": Q, "start": T0, "end": T0 + 600 * NS, "batch_size": 150, "progress": False,
              "parallel": parallel, "write_batch": 150}
        ingest_loki(tmp_path / "full.duckdb", **kw)

        db = tmp_path / "killed.duckdb"
        cfg, org = loki_http_config(srv.url, env={})
        src = LokiSource(LokiClient(HttpClient(cfg, "Loki"), org), Q, T0, T0 + 600 * NS, batch_size=150,
                         parallel=parallel, progress=False, write_batch=150)
        src.plan()

        def dies() -> Iterator[RawBatch]:
            for i, b in enumerate(src.batches()):
                if i == kill_after:
                    raise Killed
                yield b

        with open_store(db) as store, pytest.raises(Killed):
            ingest_batches(store, dies(), source=src.source_id, watermark_key=src.watermark_key, progress=False)
        ingest_loki(db, resume=True, **kw)
        with open_store(tmp_path / "full.duckdb") as a, open_store(db) as b:
            assert stored_events(a) == stored_events(b) == server_as_events(srv)
            assert a.scalar("SELECT count(*) FROM events") == b.scalar("SELECT count(*) FROM events") == 2300


def test_resume_after_sigkill_of_the_process(tmp_path: Path) -> None:
    db = tmp_path / "k.duckdb"
    with LokiServer(latency_s=0.03) as srv:
        generate(srv, lines=4000, streams=4, start_ns=T0, span_ns=600 * NS, seed=11)
        code = textwrap.dedent(f"""
            from meshlens.sources.loki import ingest_loki
            ingest_loki({str(db)!r}, url={srv.url!r}, query={Q!r}, start={T0}, end={T0 + 600 * NS},
                        batch_size=100, parallel=2, progress=False, write_batch=100)
        """)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
        deadline = time.monotonic() + 60
        while len([r for r in srv.query_requests() if r.status == 200]) < 15 and time.monotonic() < deadline:
            assert proc.poll() is None, "ingest finished before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with open_store(db) as store:
            before = store.scalar("SELECT count(*) FROM events")
            assert store.get_watermark(f"loki:{srv.url}||{Q}")["pending"]
        assert before < 4000
        srv.latency_s = 0
        counts = ingest_loki(db, url=srv.url, query=Q, start=T0, end=T0 + 600 * NS, batch_size=100, parallel=2,
                             resume=True, progress=False)
        with open_store(db) as store:
            assert stored_events(store) == server_as_events(srv)
        assert counts.stored == 4000 - before


def test_resume_continues_from_the_last_end_without_a_gap(tmp_path: Path) -> None:
    db = tmp_path / "inc.duckdb"
    with LokiServer() as srv:
        generate(srv, lines=2000, streams=2, start_ns=T0, span_ns=1200 * NS)
        kw = {"url": srv.url, "query": Q, "batch_size": 500, "progress": False}
        first = ingest_loki(db, start=T0, end=T0 + 600 * NS, **kw)
        srv.requests.clear()
        second = ingest_loki(db, since="5m", end=T0 + 1200 * NS, resume=True, resume_overlap="30s", **kw)
        starts = [int(r.params["start"][0]) for r in srv.query_requests()]
        assert min(starts) == T0 + 570 * NS  # previous end minus overlap, not the requested --since start
        assert second.duplicates > 0 and first.stored + second.stored == 2000
        with open_store(db) as store:
            assert stored_events(store) == server_as_events(srv, end=T0 + 1200 * NS)
            wm = store.get_watermark(f"loki:{srv.url}||{Q}")
        assert wm == {"v": 1, "query": Q, "start_ns": T0, "end_ns": T0 + 1200 * NS, "pending": []}


# == the property: the store holds exactly what Loki holds ===================================================
_POOL = [istio_line(random.Random(i), T0, f"svc{i % 3}", "shop") for i in range(6)]


@st.composite
def loki_data(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    n = draw(st.integers(1, 160))
    return draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12), st.integers(0, len(_POOL) - 1)),
                         min_size=n, max_size=n))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=loki_data(), batch=st.integers(2, 40), parallel=st.integers(1, 3), shuffle=st.booleans(),
       server_max=st.sampled_from([3, 50, 5000]), ns_step=st.sampled_from([1, NS // 3]))
def test_source_emits_each_line_loki_holds_exactly_once(data: list[tuple[int, int, int]], batch: int,
                                                        parallel: int, shuffle: bool, server_max: int,
                                                        ns_step: int) -> None:
    with LokiServer(shuffle_ties=shuffle, max_entries_limit=server_max) as srv:
        for stream, tick, line in data:
            srv.push(LABELS[stream], [(T0 + tick * ns_step, _POOL[line])])
        end = T0 + 13 * ns_step
        got, _ = fetch_all(srv, start=T0, end=end, batch_size=batch, parallel=parallel,
                           shard_ns=ns_step * 4 if parallel > 1 else None)
        assert_exact(srv, got, start=T0, end=end)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=loki_data(), batch=st.integers(8, 60), parallel=st.integers(1, 3), shuffle=st.booleans(),
       server_max=st.sampled_from([5, 5000]), ns_step=st.sampled_from([1, NS // 3]))
def test_stored_events_equal_exactly_what_loki_holds(data: list[tuple[int, int, int]], batch: int, parallel: int,
                                                     shuffle: bool, server_max: int, ns_step: int) -> None:
    with LokiServer(shuffle_ties=shuffle, max_entries_limit=server_max) as srv:
        for stream, tick, line in data:
            srv.push(LABELS[stream], [(T0 + tick * ns_step, _POOL[line])])
        store = open_store(":memory:")
        try:
            end = T0 + 13 * ns_step
            counts = ingest_loki(store, url=srv.url, query=Q, start=T0, end=end, batch_size=batch, write_batch=batch,
                                 parallel=parallel, shard=f"{ns_step * 4}ns" if parallel > 1 else None,
                                 progress=False)
            assert stored_events(store) == server_as_events(srv, end=end)
            assert counts.stored == srv.count() and counts.rejects == 0 and counts.duplicates == 0
        finally:
            store.close()


# == configuration and helpers ===============================================================================
def test_logcli_environment_variables(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("s3cret-token\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"LOKI_ADDR": "https://loki.example:3100", "LOKI_BEARER_TOKEN_FILE": str(tok), "LOKI_ORG_ID": "ops",
           "LOKI_CA_CERT_PATH": str(ca), "LOKI_TLS_SKIP_VERIFY": "false"}
    cfg, org = loki_http_config(env=env, headers=["X-Extra: 1"])
    assert (cfg.url, cfg.bearer_token, org, cfg.ca_cert, cfg.verify) == (
        "https://loki.example:3100", "s3cret-token", "ops", str(ca), True)
    assert cfg.headers == {"X-Extra": "1", "X-Scope-OrgID": "ops"}
    assert "s3cret" not in repr(cfg) + str(cfg.redacted())
    cfg, _ = loki_http_config("http://x", env={"LOKI_USERNAME": "u", "LOKI_PASSWORD": "p", "LOKI_TLS_SKIP_VERIFY": "1"})
    assert (cfg.username, cfg.password, cfg.verify) == ("u", "p", False)
    with pytest.raises(ConfigError, match="LOKI_ADDR"):
        loki_http_config(env={})
    with pytest.raises(ConfigError, match="does not exist"):
        loki_http_config("http://x", env={"LOKI_CLIENT_CERT_PATH": "/nonexistent.pem"})


def test_ranges_and_selector_surgery() -> None:
    assert resolve_range("2h", end="2024-05-01T10:00:00Z") == (1714550400 * NS, 1714557600 * NS)
    assert resolve_range(start="1714550400", end="1714557600000000000") == (1714550400 * NS, 1714557600 * NS)
    with pytest.raises(ConfigError):
        resolve_range()
    with pytest.raises(ConfigError, match="empty time range"):
        resolve_range(start="2024-05-01T10:00:00Z", end="2024-05-01T09:00:00Z")
    assert split_log_query('{a="}", b=`{x}`} |= "{" | json') == ('{a="}", b=`{x}`}', ' |= "{" | json')
    assert add_matcher('sum by (a) (count_over_time({a="x"} |= "{y}" [1m]))', "ns", "=", 'q"') == \
        'sum by (a) (count_over_time({a="x", ns="q\\""} |= "{y}" [1m]))'


def test_progress_bar_reports_time_covered_and_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with LokiServer() as srv:
        generate(srv, lines=300, streams=2, start_ns=T0, span_ns=600 * NS)
        src = LokiSource(http(srv), Q, T0, T0 + 600 * NS, batch_size=100, progress=True)
        src.plan()
        assert sum(len(b) for b in src.batches()) == 300
    err = capsys.readouterr().err
    assert "600/600s of range" in err and "300 lines" in err and "lines/s" in err
