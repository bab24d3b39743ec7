"""The contract every source passes through the one pipeline (:func:`meshlens.ingest.ingest`).

Each backend -- files, Loki (the in-process server and the real Loki in ../shared/tools/loki), and
Elasticsearch (the in-process server) -- is loaded with the same records: valid Istio access lines and
lines that are not mesh records. Then, for every backend:

* exact counts: every record read becomes exactly one event or reject (nothing dropped, nothing doubled),
  and a line that is not a mesh record is kept in ``rejects`` with a reason;
* an idempotent re-run: the same range again stores nothing new;
* resume after an interruption mid-run: the run that continues stores exactly what is missing, and the
  store ends identical to an uninterrupted run's (the same event ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshlens.ingest import IngestCounts, ingest
from meshlens.records import RawBatch
from meshlens.sources.base import Source, open_source, registered_sources
from meshlens.sources.files import FileSource
from meshlens.store import open_store
from tests.servers import real_loki
from tests.support.interrupt import Killed, killed_after

T0 = 1_714_557_600_000_000_000  # 2024-05-01T10:00:00Z
N_GOOD, N_BAD = 240, 12
APPS = ("reviews", "ratings")


def istio_line(i: int, ts_ns: int) -> str:
    ms = ts_ns // 1_000_000
    stamp = f"2024-05-01T10:{(ms // 60_000) % 60:02d}:{(ms // 1000) % 60:02d}.{ms % 1000:03d}Z"
    app = APPS[i % 2]
    return (f'[{stamp}] "GET /item/{i} HTTP/1.1" {500 if i % 17 == 0 else 200} - via_upstream - "-" 0 {i} 3 2 "-" '
            f'"curl/8.5" "rid-{i:05d}" "{app}:9080" "10.0.0.{i % 200}:9080" '
            f"outbound|9080||{app}.shop.svc.cluster.local 10.1.0.2:41{i % 1000:03d} 10.0.0.{i % 200}:9080 "
            "10.1.0.2:40000 - default")


def records() -> list[tuple[int, str]]:
    """(backend timestamp, line): valid access lines and a few that are no mesh record at all."""
    out = [(T0 + i * 1_000_000_000, istio_line(i, T0 + i * 1_000_000_000)) for i in range(N_GOOD)]
    out += [(T0 + (i * 20 + 5) * 1_000_000_000, f"this is not an access log line number {i}") for i in range(N_BAD)]
    return sorted(out)


START, END = T0 - 1_000_000_000, T0 + (N_GOOD + 10) * 1_000_000_000


@dataclass
class Backend:
    """One loaded backend: ``make(**kw)`` builds a fresh Source over the loaded range."""

    name: str
    make: Callable[..., Source]


def _file_backend(tmp: Path) -> Backend:
    recs = records()
    paths = []
    for k in range(0, len(recs), 50):  # several files: several batches, so a run can stop midway
        p = tmp / f"part-{k:04d}.log"
        p.write_text("".join(line + "\n" for _, line in recs[k:k + 50]))
        paths.append(str(p))
    return Backend("file", lambda **kw: FileSource(paths, **kw))


def _loki_make(url: str) -> Callable[..., Source]:
    def make(**kw: Any) -> Source:
        return open_source(f"loki+{url}", query='{job="mesh"}', start=START, end=END, batch_size=50,
                           write_batch=50, progress=False, **kw)
    return make


def _es_make(url: str) -> Callable[..., Source]:
    def make(**kw: Any) -> Source:
        return open_source(f"es+{url}", index="logs-*", start=START, end=END, page_size=50, progress=False,
                           max_retries=2, **kw)
    return make


@pytest.fixture(scope="module", params=["file", "loki-test-server", "loki-real", "es-test-server"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    kind = request.param
    with ExitStack() as stack:
        if kind == "file":
            yield _file_backend(tmp_path_factory.mktemp("files"))
            return
        if kind == "loki-test-server":
            from tests.servers.loki import LokiServer

            srv = stack.enter_context(LokiServer())
            srv.push({"job": "mesh", "app": "reviews"}, records())
            yield Backend(kind, _loki_make(srv.url))
            return
        if kind == "loki-real":
            why = real_loki.available()
            if why:
                pytest.skip(why)
            loki = real_loki.start()
            stack.callback(loki.stop)
            loki.push([({"job": "mesh", "app": "reviews"}, records())])
            _wait_visible(loki.url, N_GOOD + N_BAD)
            yield Backend(kind, _loki_make(loki.url))
            return
        from tests.servers.elasticsearch import EsTestServer

        es = stack.enter_context(EsTestServer("es8"))
        es.create_index("logs-mesh-1", mappings={"@timestamp": {"type": "date"}})
        es.add_docs("logs-mesh-1", [(f"d{i}", _es_doc(ts, line)) for i, (ts, line) in enumerate(records())])
        yield Backend(kind, _es_make(es.url))


def _wait_visible(url: str, expected: int, timeout_s: float = 30.0) -> None:
    """Pushed entries are queryable within moments; wait until a metric query counts all of them."""
    import time

    import requests

    span_s = (END - START) // 1_000_000_000 + 1
    got, deadline = -1, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = requests.get(f"{url}/loki/api/v1/query", timeout=30, params={
            "query": f'sum(count_over_time({{job="mesh"}}[{span_s}s]))', "time": str(END)})
        result = r.json()["data"]["result"] if r.ok else []
        got = int(float(result[0]["value"][1])) if result else 0
        if got == expected:
            return
        time.sleep(0.3)
    raise RuntimeError(f"the real Loki shows {got} of the {expected} pushed entries")


def _es_doc(ts_ns: int, line: str) -> dict[str, Any]:
    from meshlens.timeutil import ns_to_rfc3339

    return {"@timestamp": ns_to_rfc3339(ts_ns), "log": line + "\n", "stream": "stdout",
            "kubernetes": {"namespace_name": "shop", "pod_name": "reviews-v1-abc", "container_name": "istio-proxy",
                           "labels": {"app": "reviews"}}}


class StopsAfter:
    """A source that dies after ``n`` batches (everything else delegated): a run killed midway."""

    def __init__(self, inner: Source, n: int) -> None:
        self.inner, self.n = inner, n
        self.source_id, self.watermark_key = inner.source_id, inner.watermark_key
        self.progress_bar = False

    def plan(self, previous: Mapping[str, Any] | None) -> bool:
        return bool(self.inner.plan(previous))

    def batches(self) -> Iterator[RawBatch]:
        return killed_after(self.inner.batches(), self.n)

    def final_state(self) -> Mapping[str, Any] | None:
        return self.inner.final_state()

    def close(self) -> None:
        self.inner.close()


def _event_ids(db: Path) -> list[str]:
    with open_store(db, read_only=True) as s:
        return s.query("SELECT event_id FROM events ORDER BY event_id").event_id.tolist()


def _reject_count(db: Path) -> int:
    with open_store(db, read_only=True) as s:
        return int(s.scalar("SELECT count(*) FROM rejects"))


def _conserved(c: IngestCounts) -> None:
    assert c.read == c.stored + c.duplicates + c.rejects + c.filtered, c


def test_the_registry_names_every_built_in_source() -> None:
    assert {"file", "loki", "es"} <= set(registered_sources())


def test_exact_counts_and_rejects_with_reasons(backend: Backend, tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    c = ingest(db, backend.make())
    _conserved(c)
    assert (c.read, c.stored, c.rejects, c.duplicates) == (N_GOOD + N_BAD, N_GOOD, N_BAD, 0), backend.name
    ids = _event_ids(db)
    assert len(ids) == len(set(ids)) == N_GOOD
    with open_store(db, read_only=True) as s:
        reasons = s.query("SELECT reason, raw FROM rejects").to_dict("records")
        assert s.scalar("SELECT count(*) FROM ingest_runs WHERE status = 'ok'") == 1
    assert len(reasons) == N_BAD and all(r["reason"] and "not an access log" in r["raw"] for r in reasons)


def test_a_second_run_over_the_same_range_adds_nothing(backend: Backend, tmp_path: Path) -> None:
    db = tmp_path / "b.duckdb"
    first = ingest(db, backend.make())
    again = ingest(db, backend.make())
    _conserved(again)
    assert again.stored == 0 and again.duplicates == first.stored, (backend.name, again)
    assert _event_ids(db) == sorted(_event_ids(db)) and len(_event_ids(db)) == N_GOOD
    assert _reject_count(db) == N_BAD  # the re-read rejects are not stored twice


def test_resume_after_an_interrupted_run_converges_to_the_uninterrupted_store(backend: Backend,
                                                                              tmp_path: Path) -> None:
    whole = tmp_path / "whole.duckdb"
    ingest(whole, backend.make())
    db = tmp_path / "cut.duckdb"
    with pytest.raises(Killed):
        ingest(db, StopsAfter(backend.make(), 2))
    partial = _event_ids(db)
    assert 0 < len(partial) < N_GOOD, backend.name  # the committed batches are kept
    with open_store(db, read_only=True) as s:
        assert s.scalar("SELECT status FROM ingest_runs") == "failed"
    rest = ingest(db, backend.make(), resume=True)
    _conserved(rest)
    assert rest.stored == N_GOOD - len(partial), (backend.name, rest)
    assert _event_ids(db) == _event_ids(whole)
    assert _reject_count(db) == N_BAD
