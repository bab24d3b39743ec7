"""Hostile values: label values, parameters and record text containing quotes, backslashes, newlines,
LogQL or SQL syntax are escaped (they select/store exactly themselves) or rejected with a clear error --
never interpreted as query syntax.

LogQL: what meshlens sends is parsed by the Loki test server's LogQL parser (Go string unquoting, RE2
via its translator), so a quoting mistake shows up as a parse error or a wrong match. SQL: values travel
as DuckDB bind parameters; the tests put SQL syntax in every user-reachable value and check it comes
back verbatim or matches nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.analysis import audit
from meshlens.errors import ConfigError, QueryError
from meshlens.formats.detect import Parser
from meshlens.ingest import ingest_files
from meshlens.records import RawBatch
from meshlens.sources.loki import add_matcher, exact_selector, ingest_loki, logql_quote, re2_escape
from meshlens.store import open_store
from tests.servers.loki import NS, LogExpr, LokiServer, istio_line, parse_logql, re2_to_python
from tests.support.crash import istio_line as file_line

HOSTILE = ['a"b', "a\\b", "a\nb", 'x"} |= "y', '"} or {app=~".+', "`rm -rf`", "{}", "a\\\"b", "\t\r\x00",
           "x' OR '1'='1", "'); DROP TABLE events; --", "ünï©ødé ☃", "|~ `.*`", "$ns", "?", "%s %d"]
hostile_text = st.one_of(st.sampled_from(HOSTILE), st.text(
    st.characters(blacklist_categories=("Cs",)), max_size=30))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _matchers(q: str) -> dict[str, str]:
    expr = parse_logql(q)
    assert isinstance(expr, LogExpr)
    return {m.name: m.value for m in expr.matchers}


@SETTINGS
@given(st.dictionaries(st.sampled_from(["app", "namespace", "pod", "container"]), hostile_text.filter(bool),
                       min_size=1))
def test_exact_selector_round_trips_through_a_logql_parser(labels: dict[str, str]) -> None:
    assert _matchers(exact_selector(labels)) == labels


@SETTINGS
@given(hostile_text)
def test_add_matcher_quotes_the_value(value: str) -> None:
    q = add_matcher('{namespace="shop"} |= "GET"', "pod", "=", value)
    assert _matchers(q) == {"namespace": "shop", "pod": value}
    assert logql_quote(value).startswith('"') and logql_quote(value).endswith('"')


@SETTINGS
@given(hostile_text, st.text(max_size=5))
def test_re2_escape_matches_the_literal_only(text: str, tail: str) -> None:
    rx = re.compile(re2_to_python("^" + re2_escape(text)), re.S)
    assert rx.match(text + tail)
    if text:
        assert not rx.match(text[:-1] + ("\x01" if text[-1] != "\x01" else "\x02") + tail)


def test_a_query_with_an_unterminated_string_is_rejected_clearly() -> None:
    with pytest.raises(QueryError, match="unterminated string"):
        add_matcher('{app="x}', "pod", "=", "p")


T0 = 1_700_000_000 * NS


def test_loki_ingest_selects_exactly_the_hostile_stream(tmp_path: Path) -> None:
    """Streams whose label values hold quotes, backslashes, newlines and LogQL syntax: a query built
    for one of them returns that stream only, and its labels are stored byte for byte."""
    import random

    rng = random.Random(1)
    streams = [{"app": v, "namespace": "shop", "container": "istio-proxy"} for v in HOSTILE[:8]]
    with LokiServer() as srv:
        for i, lb in enumerate(streams):
            srv.push(lb, [(T0 + (i * 50 + k) * NS, istio_line(rng, T0 + (i * 50 + k) * NS, "svc", "shop"))
                          for k in range(20)])
        for target in streams:
            db = tmp_path / f"s{streams.index(target)}.duckdb"
            ingest_loki(db, url=srv.url, query=exact_selector(target), start=T0, end=T0 + 3600 * NS,
                        progress=False)
            with open_store(db) as store:
                got = [dict(r[0]) for r in store.con.execute("SELECT DISTINCT labels FROM events").fetchall()]
                n = store.scalar("SELECT count(*) FROM events")
            assert got == [target] and n == 20, (target, got, n)


def test_sql_syntax_in_records_labels_and_source_is_stored_verbatim(tmp_path: Path) -> None:
    evil = "'); DROP TABLE events; --"
    lines = [file_line(i).replace("/api/items/", "/api/items/" + evil.replace(" ", "%20") + "/") for i in range(5)]
    lines.append(f"x' OR 1=1; {evil} \\' \" \n")  # a reject
    batch = RawBatch(source=f"file:/tmp/{evil}", lines=lines, ts_ns=[None] * 6,
                     labels=[{"app": evil, "namespace": "a'b"}] * 6, positions=[f"{evil}:{i}" for i in range(6)])
    db = tmp_path / "s.duckdb"
    from meshlens.ingest import ingest_batches

    with open_store(db) as store:
        counts = ingest_batches(store, [batch], source=batch.source, progress=False)
        assert counts.stored == 5 and counts.rejects == 1
        assert store.scalar("SELECT count(*) FROM events WHERE source = ?", [batch.source]) == 5
        assert store.scalar("SELECT count(*) FROM events WHERE labels['app'] = ?", [evil]) == 5
        assert store.scalar("SELECT count(*) FROM events WHERE contains(path, ?)", [evil.replace(" ", "%20")]) == 5
        assert store.scalar("SELECT raw FROM rejects") == lines[5]
        assert store.scalar("SELECT count(*) FROM rejects WHERE position = ?", [f"{evil}:5"]) == 1


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    f = d / "a.log"
    f.write_text("\n".join(file_line(i) for i in range(200)) + "\n")
    db = d / "s.duckdb"
    ingest_files(db, [f], progress=False)
    return db


@pytest.mark.parametrize("value", HOSTILE)
def test_analysis_parameters_are_bound_not_interpolated(small_store: Path, value: str) -> None:
    """Filters with SQL syntax match nothing (they are compared as values) and raise no SQL error."""
    with open_store(small_store, read_only=True) as store:
        assert audit.count_events(store) == 200
        assert audit.count_events(store, namespace=value) == 0
        assert audit.count_events(store, service=value) == 0
        assert len(audit.events(store, namespace=value, service=value)) == 0
        assert len(audit.denied_requests(store, namespace=value)) == 0


def test_column_names_from_users_are_validated(small_store: Path) -> None:
    with open_store(small_store, read_only=True) as store, pytest.raises(ConfigError, match="unknown event columns"):
        audit.events(store, columns=['path" FROM events; DROP TABLE events; --'])


@pytest.mark.parametrize("key", ['x"); DROP TABLE events; --', "a'b", 'k"', "ünï", "back\\slash"])
def test_hostile_json_mapping_keys_cannot_inject(key: str) -> None:
    """A custom JSON key mapping (``--json-mapping``) is quoted as an identifier and a JSON string."""
    import json

    body = json.dumps({"upstream_cluster": "outbound|80||a.shop.svc.cluster.local", "response_code": 200,
                       "start_time": "2024-01-01T00:00:00Z", key: "/p"})
    try:
        events, rejects = Parser("auto", {"path": key}).parse(RawBatch("t", [body], [None], [None], ["1"]))
    except ConfigError:
        return  # rejecting the mapping with a clear error is fine too
    assert events.num_rows + rejects.num_rows == 1
    if events.num_rows:
        assert events.column("path").to_pylist() == ["/p"]


@pytest.mark.parametrize("index", ["logs-*/../_all", "a?b#c", "x y", "logs-*,other-*", "é/%2F"])
def test_es_index_names_are_path_quoted(index: str) -> None:
    from urllib.parse import unquote

    from meshlens.sources.elasticsearch import index_path

    p = index_path(index)
    assert not set(p) & set("/?# ") and unquote(p) == index.strip()
