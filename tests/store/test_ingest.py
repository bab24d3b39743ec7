"""Ingest guarantees: idempotent, conserving, transactional; containers; bad input never crashes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from meshlens.errors import ConfigError, SourceError
from meshlens.formats.detect import Parser
from meshlens.ingest import ingest_batches, ingest_files
from meshlens.records import RawBatch
from meshlens.store import open_store

LINE = ('[2020-11-25T21:26:18.409Z] "GET /status/418 HTTP/1.1" 418 - via_upstream - "-" 0 135 4 4 "-" '
        '"curl/7.73.0-DEV" "84961386-6d84-929d-98bd-c5aee93b5c88" "httpbin:8000" "10.44.1.27:80" '
        'outbound|8000||httpbin.foo.svc.cluster.local 10.44.1.23:37652 10.0.45.184:8000 10.44.1.23:46520 - default')


def _line(i: int) -> str:
    return LINE.replace("84961386", f"{i:08d}").replace("18.409Z", f"18.{i % 1000:03d}Z")


def _rows(db: Path, sql: str) -> list[tuple]:
    with open_store(db, read_only=True) as s:
        return s.con.execute(sql).fetchall()


def test_reingest_adds_nothing(tmp_path: Path, db: Path, shared_samples: Path) -> None:
    files = sorted((shared_samples / "istio").glob("*"))
    first = ingest_files(db, files, progress=False)
    second = ingest_files(db, files, progress=False)
    assert first.stored > 0 and second.stored == 0
    assert second.duplicates == first.stored
    assert second.read == first.read == first.stored + first.rejects
    assert second.read == second.stored + second.duplicates + second.rejects
    assert _rows(db, "SELECT count(*) FROM events")[0][0] == first.stored
    assert _rows(db, "SELECT count(*) FROM rejects")[0][0] == first.rejects  # rejects idempotent too
    runs = _rows(db, "SELECT status, records_read, events_stored FROM ingest_runs ORDER BY started_at")
    assert runs == [("ok", first.read, first.stored), ("ok", second.read, 0)]


def test_identical_lines_in_one_file_are_both_kept(tmp_path: Path, db: Path) -> None:
    f = tmp_path / "dup.log"
    f.write_text(f"{LINE}\n{LINE}\n{_line(1)}\n")
    c = ingest_files(db, [f], progress=False)
    assert (c.read, c.stored, c.duplicates) == (3, 3, 0)
    c2 = ingest_files(db, [f], progress=False)
    assert (c2.stored, c2.duplicates) == (0, 3)


def test_same_record_from_another_path_is_a_duplicate(tmp_path: Path, db: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "x.log").write_text(LINE + "\n")
    assert ingest_files(db, [tmp_path / "a"], progress=False).stored == 1
    assert ingest_files(db, [tmp_path / "b"], progress=False).duplicates == 1


def test_large_file_in_several_batches(tmp_path: Path, db: Path) -> None:
    f = tmp_path / "many.log.gz"
    with gzip.open(f, "wt") as fh:
        for i in range(5000):
            fh.write(_line(i) + "\n")
            if i % 1000 == 0:
                fh.write(f"garbage line {i}\n")
    c = ingest_files(db, [f], progress=False, batch_size=700)
    assert (c.read, c.stored, c.rejects) == (5005, 5000, 5)
    pos = _rows(db, "SELECT position, reason FROM rejects ORDER BY position::INT")
    assert pos[0][0] == "2" and "unrecognised format" in pos[0][1]


BAD_INPUTS = {
    "truncated": (LINE[:120] + "\n", "quoted fields"),
    "invalid_utf8": (None, "invalid UTF-8"),
    "wrong_json_types": ('{"start_time":"2020-11-25T21:26:18.409Z","response_code":"abc","upstream_cluster":"x",'
                         '"bytes_sent":{"a":1}}\n', "RESPONSE_CODE is not an integer"),
    "json_bad_bytes": ('{"start_time":"2020-11-25T21:26:18.409Z","response_code":200,"upstream_cluster":"x",'
                       '"bytes_sent":"lots"}\n', "BYTES_SENT is not a number"),
    "bad_time": (LINE.replace("2020-11-25T21:26:18.409Z", "yesterday") + "\n", "START_TIME"),
    "unknown_format": ("hello world, not a log line\n", "unrecognised format"),
    "truncated_json": ('{"start_time":"2020-11-25T21:26:18.409Z","response_code":200,"upstream_clus\n',
                       "invalid JSON"),
    "json_array": ("[1, 2, 3]\n", "not an object"),
    "unknown_json": ('{"hello": "world"}\n', "unknown shape"),
    "empty_file": ("", "empty file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_becomes_a_reject_with_reason(tmp_path: Path, db: Path, case: str) -> None:
    text, reason = BAD_INPUTS[case]
    f = tmp_path / f"{case}.log"
    if case == "invalid_utf8":
        f.write_bytes(b"good prefix \xff\xfe bad bytes\n" + LINE.encode() + b"\n")
    else:
        f.write_text(text)
    # something already stored must survive
    ingest_files(db, [_write(tmp_path / "ok.log", _line(7))], progress=False)
    c = ingest_files(db, [f], progress=False)
    assert c.rejects >= 1
    assert c.read == c.stored + c.duplicates + c.rejects
    reasons = [r[0] for r in _rows(db, "SELECT reason FROM rejects")]
    assert any(reason in r for r in reasons), reasons
    assert _rows(db, "SELECT count(*) FROM events WHERE request_id = '00000007-6d84-929d-98bd-c5aee93b5c88'") == [(1,)]
    if case == "invalid_utf8":
        assert c.stored == 1  # the good line after the bad one is kept


def _write(p: Path, text: str) -> Path:
    p.write_text(text + "\n")
    return p


def test_ten_megabyte_line(tmp_path: Path, db: Path) -> None:
    f = tmp_path / "huge.log"
    f.write_text(LINE + "\n" + "x" * (10 * 1024 * 1024) + "\n" + _line(2) + "\n")
    c = ingest_files(db, [f], progress=False)
    assert (c.read, c.stored, c.rejects) == (3, 2, 1)
    reason, raw_len = _rows(db, "SELECT reason, length(raw) FROM rejects")[0]
    assert "record too large" in reason and raw_len <= 65536


def test_unreadable_path_is_a_clear_error(tmp_path: Path, db: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        ingest_files(db, [tmp_path / "missing.log"], progress=False)


def test_failure_mid_ingest_keeps_whole_batches_only(tmp_path: Path, db: Path) -> None:
    def batches():
        for b in range(3):
            batch = RawBatch(source="test:")
            for i in range(100):
                batch.append(_line(b * 100 + i), None, {"namespace": "foo"}, f"{b}:{i}")
            yield batch
        raise OSError("disk on fire")

    with open_store(db) as store, pytest.raises(OSError):
        ingest_batches(store, batches(), source="test:", progress=False)
    assert _rows(db, "SELECT count(*) FROM events") == [(300,)]
    status, msg = _rows(db, "SELECT status, message FROM ingest_runs")[0]
    assert status == "failed" and "disk on fire" in msg


def test_insert_failure_rolls_back_the_batch(db: Path) -> None:
    with open_store(db) as store:
        parser = Parser()
        b = RawBatch(source="t:")
        for i in range(10):
            b.append(_line(i), None, None, str(i))
        ev, rej = parser.parse(b)
        bad = ev.drop_columns(["raw"])  # wrong shape -> the insert fails inside the transaction
        with pytest.raises(Exception):  # noqa: B017 - any DuckDB error
            store.insert_batch(bad, rej, ("wm", {"x": 1}))
        assert store.scalar("SELECT count(*) FROM events") == 0
        assert store.get_watermark("wm") is None
        res = store.insert_batch(ev, rej, ("wm", {"x": 1}))
        assert res.stored == 10 and store.get_watermark("wm") == {"x": 1}


def test_logcli_jsonl_container(tmp_path: Path, db: Path) -> None:
    f = tmp_path / "export.jsonl"
    recs = [{"labels": {"namespace": "shop", "pod": "reviews-v1-6584ddcf65-k78wz", "container": "istio-proxy"},
             "line": _line(i), "timestamp": f"2024-05-01T10:00:0{i}.123456789Z"} for i in range(3)]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    c = ingest_files(db, [f], progress=False)
    assert c.stored == 3
    row = _rows(db, "SELECT src_workload, src_namespace, labels['pod'], format FROM events LIMIT 1")[0]
    assert row == ("reviews-v1", "shop", "reviews-v1-6584ddcf65-k78wz", "istio_text")


def test_logcli_timestamp_used_when_line_has_none(tmp_path: Path, db: Path) -> None:
    f = tmp_path / "export.jsonl"
    line = LINE.split("] ", 1)[1]  # no [START_TIME]
    f.write_text(json.dumps({"labels": {"namespace": "a"}, "line": line,
                             "timestamp": "2024-05-01T10:00:00.123456789Z"}) + "\n")
    ingest_files(db, [f], progress=False)
    assert _rows(db, "SELECT ts_ns FROM events") == [(1714557600123456789,)]


def test_saved_loki_response_container(tmp_path: Path, db: Path) -> None:
    body = {"status": "success", "data": {"resultType": "streams", "result": [
        {"stream": {"namespace": "foo", "app": "httpbin"}, "values": [["1606339578409000001", _line(1)]]},
        {"stream": {"namespace": "foo", "app": "httpbin"}, "values": [["1606339578409000002", _line(2)]]}]}}
    f = tmp_path / "resp.json"
    f.write_text(json.dumps(body, indent=2))
    c = ingest_files(db, [f], progress=False)
    assert c.stored == 2
    assert _rows(db, "SELECT DISTINCT labels['app'] FROM events") == [("httpbin",)]


def test_cri_container_with_partial_lines(tmp_path: Path, db: Path) -> None:
    d = tmp_path / "var/log/pods/shop_reviews-v1-6584ddcf65-k78wz_0a1b2c/istio-proxy"
    d.mkdir(parents=True)
    half = len(LINE) // 2
    (d / "0.log").write_text(
        f"2024-05-01T10:00:00.000000001Z stdout P {LINE[:half]}\n"
        f"2024-05-01T10:00:00.000000002Z stdout F {LINE[half:]}\n"
        f"2024-05-01T10:00:01.000000000Z stdout F {_line(3)}\n")
    c = ingest_files(db, [tmp_path / "var"], progress=False)
    assert (c.read, c.stored) == (2, 2)
    rows = _rows(db, "SELECT labels['namespace'], labels['container'], src_workload, position FROM events "
                     "ORDER BY position")
    assert rows[0] == ("shop", "istio-proxy", "reviews-v1", "1-2")


def test_forced_format_and_unknown_format(tmp_path: Path, db: Path) -> None:
    f = _write(tmp_path / "x.log", LINE)
    with pytest.raises(ConfigError, match="unknown format"):
        ingest_files(db, [f], fmt="nope", progress=False)
    c = ingest_files(db, [f], fmt="linkerd_json", progress=False)
    assert c.rejects == 1
    assert ingest_files(db, [f], fmt="istio_text", progress=False).stored == 1


def test_custom_json_mapping(tmp_path: Path, db: Path) -> None:
    rec = {"ts": "2024-05-01T10:00:00.000Z", "code": 503, "cluster": "outbound|80||cart.shop.svc.cluster.local",
           "flags": "UF,URX", "response_code": 999}
    mapping = {"start_time": "ts", "response_code": "code", "upstream_cluster": "cluster",
               "response_flags": "flags"}
    f = _write(tmp_path / "custom.jsonl", json.dumps(rec))
    c = ingest_files(db, [f], fmt="envoy_json", json_mapping=mapping, progress=False)
    assert c.stored == 1
    assert _rows(db, "SELECT status, dst_service, dst_namespace, response_flags FROM events") == [
        (503, "cart", "shop", "UF,URX")]


def test_conservation_property_on_random_lines(tmp_path: Path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    parser = Parser()

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.one_of(st.text(max_size=300), st.sampled_from([LINE, LINE[:-30], "{", '{"a":1}',
                                                                     '"GET / HTTP/1.1" 200']),
                              st.text(alphabet='[]{}" -|:0123456789abc', max_size=200)), max_size=40))
    def check(lines: list[str]) -> None:
        b = RawBatch(source="prop:")
        for i, ln in enumerate(lines):
            b.append(ln.replace("\n", " "), None, None, str(i))
        ev, rej = parser.parse(b)
        assert ev.num_rows + rej.num_rows == len(lines)

    check()


def test_consul_json_access_log_and_intentions_denial(tmp_path: Path, db: Path) -> None:
    """Consul's default JSON access log has Istio's 24 keys with %UPSTREAM_CLUSTER% (formats.md §3)."""
    base = {"start_time": "2024-05-01T10:00:00.000Z", "method": "GET", "path": "/api", "protocol": "HTTP/1.1",
            "response_code": 200, "response_flags": "-", "response_code_details": "via_upstream",
            "connection_termination_details": None, "upstream_transport_failure_reason": None,
            "bytes_received": 0, "bytes_sent": 10, "duration": 3, "upstream_service_time": "2",
            "x_forwarded_for": None, "user_agent": "curl/8", "request_id": "r1", "authority": "backend",
            "upstream_host": "10.0.0.9:20000",
            "upstream_cluster": "backend.default.dc1.internal.0a1b2c3d-1111-2222-3333-444455556666.consul",
            "upstream_local_address": "10.0.0.5:4000", "downstream_local_address": "127.0.0.1:9191",
            "downstream_remote_address": "127.0.0.1:5000", "requested_server_name": None, "route_name": None}
    denied = {**base, "request_id": "r2", "response_code": 403, "upstream_cluster": "local_app", "authority": "web",
              "response_code_details": "rbac_access_denied_matched_policy[consul-intentions-layer7-0]",
              "bytes_sent": 19}
    f = tmp_path / "consul.jsonl"
    f.write_text(json.dumps(base) + "\n" + json.dumps(denied) + "\n")
    labels_file = tmp_path / "consul-export.jsonl"
    labels_file.write_text("\n".join(json.dumps({"labels": {"namespace": "default", "app": "web",
                                                             "container": "consul-dataplane"},
                                                  "line": ln, "timestamp": "2024-05-01T10:00:00Z"})
                                      for ln in f.read_text().splitlines()) + "\n")
    assert ingest_files(db, [labels_file], progress=False).stored == 2
    rows = _rows(db, "SELECT request_id, mesh, direction, dst_service, dst_namespace, event_type, authz_policy "
                     "FROM events ORDER BY request_id")
    assert rows == [("r1", "consul", "outbound", "backend", "default", "request", None),
                    ("r2", "consul", "inbound", "web", "default", "authz", "consul-intentions-layer7-0")]


def test_audit_patch_takes_the_new_spec_from_the_response(tmp_path: Path, db: Path) -> None:
    ev = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "RequestResponse", "auditID": "a1",
          "stage": "ResponseComplete", "verb": "patch",
          "requestURI": "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/deny-legacy",
          "user": {"username": "alice@example.com"}, "sourceIPs": ["10.0.0.1"],
          "objectRef": {"resource": "authorizationpolicies", "namespace": "shop", "name": "deny-legacy",
                        "apiGroup": "security.istio.io", "apiVersion": "v1"},
          "responseStatus": {"code": 200},
          "requestObject": {"spec": {"action": "DENY"}},
          "responseObject": {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                             "metadata": {"name": "deny-legacy", "namespace": "shop"},
                             "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "payments"}}}},
          "stageTimestamp": "2024-05-01T09:19:43.706060Z"}
    delete = {**ev, "auditID": "a2", "verb": "delete", "requestObject": None,
              "responseObject": {"kind": "Status", "status": "Success"}}
    f = tmp_path / "audit.log"
    f.write_text(json.dumps(ev) + "\n" + json.dumps(delete) + "\n")
    ingest_files(db, [f], progress=False)
    rows = _rows(db, "SELECT verb, resource_kind, change_targets, change_spec->>'$.action' FROM events ORDER BY verb")
    assert rows == [("delete", "AuthorizationPolicy", [], None), ("patch", "AuthorizationPolicy", ["payments"], "DENY")]


def test_identical_lines_across_batch_boundaries_are_both_kept(tmp_path: Path) -> None:
    f = tmp_path / "dup.log"
    f.write_text(f"{LINE}\n{LINE}\n{LINE}\n")
    for bs in (1, 2, 3):
        c = ingest_files(tmp_path / f"b{bs}.duckdb", [f], batch_size=bs, progress=False)
        assert (c.read, c.stored, c.duplicates) == (3, 3, 0), bs
        again = ingest_files(tmp_path / f"b{bs}.duckdb", [f], batch_size=bs, progress=False)
        assert (again.stored, again.duplicates) == (0, 3), bs


def _batches(n_batches: int, per: int = 200) -> list[RawBatch]:
    out = []
    for b in range(n_batches):
        batch = RawBatch(source="test:", checkpoint={"batch": b})
        for i in range(per):
            batch.append(_line(b * per + i), None, {"namespace": "foo"}, f"{b}:{i}")
        out.append(batch)
    return out


def test_snapshots_published_while_the_next_batch_is_read(tmp_path: Path) -> None:
    """A snapshot (CHECKPOINT + copy) after every batch while the reader thread prepares the next one:
    readers see a consistent store and the ingest completes."""
    db = tmp_path / "s.duckdb"
    with open_store(db) as store:
        counts = ingest_batches(store, _batches(8, per=2000), source="test:", progress=False, snapshot_every_s=0)
    assert counts.stored == 16000
    with open_store(db, read_only=True) as ro:
        assert ro.scalar("SELECT count(*) FROM events") == 16000


def test_gc_is_paused_while_batches_are_stored_and_restored_after(tmp_path: Path) -> None:
    """The collector is paused for the run (its full passes cost ~10 % of a Loki ingest's CPU), the
    caller's GC state comes back afterwards -- also after a failed run -- and cycles are still freed."""
    import gc

    seen: list[bool] = []

    def batches(fail: bool):
        for i in range(3):
            seen.append(gc.isenabled())
            yield RawBatch(source="t", lines=[_line(i * 10 + k) for k in range(10)])
        if fail:
            raise SourceError("the source broke")

    assert gc.isenabled()
    with open_store(tmp_path / "a.duckdb") as store:
        counts = ingest_batches(store, batches(False), source="t", progress=False)
    assert counts.stored == 30 and seen and not any(seen)
    assert gc.isenabled()
    seen.clear()
    with open_store(tmp_path / "b.duckdb") as store, pytest.raises(SourceError):
        ingest_batches(store, batches(True), source="t", progress=False)
    assert gc.isenabled() and seen and not any(seen)
    gc.disable()
    try:
        with open_store(tmp_path / "c.duckdb") as store:
            ingest_batches(store, batches(False), source="t", progress=False)
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_gc_tick_collects_cycles_during_a_long_run() -> None:
    import gc

    from meshlens.ingest import _gc_paused

    passes: list[int] = []

    def cb(phase: str, info: dict) -> None:
        if phase == "stop":
            passes.append(info["generation"])

    gc.callbacks.append(cb)
    try:
        with _gc_paused(every_s=3600) as tick:
            tick()
            assert passes == []  # not due yet
        with _gc_paused(every_s=0) as tick:
            tick()
            assert passes == [2]  # due: one full pass
    finally:
        gc.callbacks.remove(cb)


def test_pandas_is_imported_off_the_writer_while_the_first_batch_is_read(tmp_path: Path) -> None:
    """pyarrow imports pandas on its first list conversion (~0.25 s): the ingest starts that import in
    a background thread before reading, so the writer does not pay it after the first fetch."""
    import subprocess
    import sys

    code = f"""
import sys, threading
from meshlens.ingest import ingest_batches
from meshlens.records import RawBatch
from meshlens.store import open_store
assert "pandas" not in sys.modules
importer = []
class Watch:  # records which thread imports pandas
    def find_spec(self, name, path=None, target=None):
        if name == "pandas":
            importer.append(threading.current_thread().name)
        return None
sys.meta_path.insert(0, Watch())
def batches():  # a first batch that takes a while to arrive, as from Loki
    import time
    deadline = time.monotonic() + 60
    while "pandas" not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.01)
    yield RawBatch(source="t", lines=[{LINE!r}])
with open_store({str(tmp_path / "p.duckdb")!r}) as s:
    assert ingest_batches(s, batches(), source="t", progress=False).stored == 1
assert importer == ["meshlens-warm"], importer
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_logcli_jsonl_labels_in_any_order_nested_values_and_bad_json(tmp_path: Path, db: Path) -> None:
    """The logcli container keys its label cache on the items as exported: the same labels in another key
    order are the same stream (same identity, no duplicate on re-export); a nested value still works; a
    broken record is a reject naming the JSON error as the standard library words it."""
    f = tmp_path / "export.jsonl"
    a = {"namespace": "shop", "pod": "reviews-v1-6584ddcf65-k78wz", "container": "istio-proxy"}
    b = dict(reversed(list(a.items())))
    recs = [{"labels": a, "line": _line(1), "timestamp": "2024-05-01T10:00:01.123456789Z"},
            {"labels": b, "line": _line(2), "timestamp": "2024-05-01T10:00:02.123456789Z"},
            {"labels": {**a, "extra": {"nested": 1}}, "line": _line(3), "timestamp": "2024-05-01T10:00:03Z"}]
    f.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"labels": {"a": "b"}, "line": "cut\n')
    c = ingest_files(db, [f], progress=False)
    assert (c.stored, c.rejects) == (3, 1)
    assert _rows(db, "SELECT count(DISTINCT labels) FROM events WHERE labels['extra'] IS NULL") == [(1,)]
    assert _rows(db, "SELECT count(*) FROM events WHERE labels['extra'] LIKE '%nested%'") == [(1,)]
    (reason,) = _rows(db, "SELECT reason FROM rejects")[0]
    assert reason.startswith("logcli jsonl record is not valid JSON: Unterminated string"), reason
    g = tmp_path / "again.jsonl"  # the same records with the labels' keys in the other order: all duplicates
    g.write_text("\n".join(json.dumps({**r, "labels": dict(reversed(list(r["labels"].items())))}) for r in recs) + "\n")
    again = ingest_files(db, [g], progress=False)
    assert (again.stored, again.duplicates) == (0, 3)
