"""Errors a person can act on, against the in-process server AND the real Loki (issue 15).

* several tenants on a Loki without ``multi_tenant_queries_enabled``: one line naming the setting, no retry;
* a tenant or selector with no data in the range: a warning naming tenant, query, range and what exists;
* a second run's ``rejects`` (re-read lines) vs the rows it added (``rejects_new``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlens.errors import SourceError
from meshlens.sources.http import HttpClient
from meshlens.sources.loki import DEFAULT_PARALLEL, LOKI_PRODUCT, ingest_loki, loki_http_config
from tests.servers import backends
from tests.servers.backends import Backend

NS = 1_000_000_000
T0 = (time.time_ns() // NS - 3 * 3600) * NS  # 3 h ago: inside the real Loki's accepted window
RANGE = {"start": T0 - 60 * NS, "end": T0 + 3600 * NS}


@pytest.fixture(params=backends.BACKENDS)
def loki(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from backends.make(request)


@pytest.fixture(params=backends.BACKENDS)
def loki_auth(request: pytest.FixtureRequest) -> Iterator[Backend]:
    # multi_tenant_queries=False: the real Loki's default (multi_tenant_queries_enabled: false)
    yield from backends.make(request, auth=True, multi_tenant_queries=False)


def _client(url: str, org: str | None, retries: list[str]) -> HttpClient:
    cfg, _ = loki_http_config(url, org_id=org, max_retries=3, backoff_base_s=0.01, env={})
    return HttpClient(cfg, LOKI_PRODUCT, sleep=lambda s: None, on_retry=lambda a, why, d: retries.append(why))


def test_several_tenants_without_the_setting_is_one_line_no_retry(loki_auth: Backend, tmp_path: Path) -> None:
    loki_auth.push([({"app": "a"}, [(T0 + i * NS, f"line {i}") for i in range(5)])], tenant="team-a")
    retries: list[str] = []
    with pytest.raises(SourceError) as ei:
        ingest_loki(tmp_path / "m.duckdb", query=loki_auth.selector(), url=loki_auth.url, org_id="team-a|team-b",
                    http_client=_client(loki_auth.url, "team-a|team-b", retries), progress=False, **RANGE)
    msg = str(ei.value)
    assert "multi_tenant_queries_enabled" in msg and "'team-a|team-b'" in msg and "\n" not in msg
    assert retries == [] and not ei.value.resumable
    if loki_auth.server is not None:  # each worker's first request, none retried
        assert 1 <= len(loki_auth.server.query_requests()) <= DEFAULT_PARALLEL


def test_a_selector_without_data_warns_with_what_exists(loki: Backend, tmp_path: Path) -> None:
    loki.push([({"app": f"shop-{loki.tag}"}, [(T0 + i * NS, f"line {i}") for i in range(5)])])
    query = loki.selector(app="shpo")  # a typo
    counts = ingest_loki(tmp_path / "m.duckdb", query=query, url=loki.url, progress=False, **RANGE)
    assert counts.read == 0 and len(counts.warnings) == 1
    w = counts.warnings[0]
    assert "default tenant" in w and query in w and "no stream matches" in w
    assert f"shop-{loki.tag}" in w  # the value that does exist
    assert time.strftime("%Y-%m-%dT", time.gmtime(RANGE["start"] / NS)) in w  # the range


def test_a_pipeline_that_keeps_nothing_says_so(loki: Backend, tmp_path: Path) -> None:
    loki.push([({"app": "a"}, [(T0 + i * NS, f"line {i}") for i in range(5)])])
    counts = ingest_loki(tmp_path / "m.duckdb", query=loki.selector() + ' |= "nothere"', url=loki.url,
                         progress=False, **RANGE)
    assert counts.read == 0 and "1 stream(s) match" in counts.warnings[0]
    assert 'the pipeline |= "nothere" kept none' in counts.warnings[0]


def test_a_tenant_without_data_warns(loki_auth: Backend, tmp_path: Path) -> None:
    loki_auth.push([({"app": "a"}, [(T0 + NS, "x")])], tenant="team-a")
    tenant = f"nobody-{loki_auth.tag}"
    counts = ingest_loki(tmp_path / "m.duckdb", query=loki_auth.selector(), url=loki_auth.url, org_id=tenant,
                         progress=False, **RANGE)
    assert counts.read == 0
    assert f"tenant {tenant!r} has no streams at all in this range" in counts.warnings[0]


def test_a_second_run_tells_reread_rejects_from_new_ones(loki: Backend, tmp_path: Path) -> None:
    db = tmp_path / "m.duckdb"
    loki.push([({"app": "a"}, [(T0 + i * NS, f"not an access log {i}") for i in range(4)])])
    first = ingest_loki(db, query=loki.selector(), url=loki.url, progress=False, **RANGE)
    second = ingest_loki(db, query=loki.selector(), url=loki.url, progress=False, **RANGE)
    assert (first.rejects, first.rejects_new) == (4, 4)
    assert (second.rejects, second.rejects_new) == (4, 0)
    assert second.as_dict()["rejects"] == 4 and second.as_dict()["rejects_new"] == 0
    assert second.warnings == []
