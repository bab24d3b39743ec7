"""Event ids are the dedup key across meshlens versions: a store ingested by an older meshlens must skip
the same records ingested by a newer one. So the id is pinned here to its documented formula
(``meshlens.formats.detect``: md5 of stream labels, backend timestamp, record text, plus the position
when it is an identity and the occurrence number of a repeated record), computed independently with
hashlib, for every way a batch reaches the parser: Loki-like batches (labels, timestamps, no identity
positions, Python lists), plain files (Arrow columns, line numbers as identity), a record parser's
format, and a record repeated within a batch. A speed change that alters any id fails here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from meshlens.ingest import ingest_batches, ingest_files
from meshlens.records import RawBatch
from meshlens.store import open_store

US = chr(31)
ISTIO = ('[2020-11-25T21:26:18.409Z] "GET /status/418 HTTP/1.1" 418 - via_upstream - "-" 0 135 4 4 "-" '
         '"curl/7.73.0-DEV" "84961386-6d84-929d-98bd-c5aee93b5c88" "httpbin:8000" "10.44.1.27:80" '
         'outbound|8000||httpbin.foo.svc.cluster.local 10.44.1.23:37652 10.0.45.184:8000 10.44.1.23:46520 - default')
LINKERD = ('{"client.addr":"10.244.0.12:43558","client.id":"web.emojivoto.serviceaccount.identity.linkerd.'
           'cluster.local","host":"emoji-svc.emojivoto:8080","method":"POST","processing_ns":"41000",'
           '"request_bytes":"5","response_bytes":"18","status":200,"timestamp":"2024-03-04T10:00:00.123456Z",'
           '"total_ns":"1800000","trace_id":"","uri":"http://emoji-svc.emojivoto:8080/emojivoto.v1.EmojiService/'
           'ListAll","user_agent":"grpc-go/1.59.0","version":"HTTP/2.0"}')


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _stream_key(labels: dict[str, str] | None) -> str:
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":")) if labels else ""


def expected_id(line: str, *, labels: dict[str, str] | None = None, ts_ns: int | None = None,
                position: str | None = None, occurrence: int = 1) -> str:
    """The documented identity: md5(stream key US ts US line [US position]), then md5(id#n) for the
    n-th (n > 1) verbatim repeat of a record within one batch."""
    h = _md5(_stream_key(labels) + US + ("" if ts_ns is None else str(ts_ns)) + US + line
             + ("" if position is None else US + position))
    return h if occurrence == 1 else _md5(f"{h}#{occurrence}")


def _ids(store_path: Path) -> dict[str, str]:
    with open_store(store_path) as store:
        return dict(store.con.execute("SELECT position, event_id FROM events").fetchall())


def test_loki_like_batch_ids_follow_the_documented_formula(tmp_path: Path) -> None:
    labels = {"namespace": "foo", "pod": "httpbin-1", "container": "istio-proxy", "detected_level": "unknown"}
    other = {"namespace": "bar", "app": "x"}
    ts = [1_606_339_578_409_000_001, 1_606_339_578_409_000_002, 1_606_339_578_409_000_002,
          1_606_339_578_409_000_003]
    lines = [ISTIO, ISTIO.replace("418", "200"), ISTIO.replace("418", "200"), LINKERD]
    batch = RawBatch(source="loki:x", lines=lines, ts_ns=ts, labels=[labels, labels, labels, other],
                     positions=[f"q@{t}#{i}" for i, t in enumerate(ts)])
    with open_store(tmp_path / "s.duckdb") as store:
        counts = ingest_batches(store, [batch], source="loki:x", progress=False)
    assert (counts.stored, counts.rejects) == (4, 0)
    got = _ids(tmp_path / "s.duckdb")
    assert got == {
        "q@1606339578409000001#0": expected_id(lines[0], labels=labels, ts_ns=ts[0]),
        # the same (labels, ts, line) twice: the second is occurrence 2
        "q@1606339578409000002#1": expected_id(lines[1], labels=labels, ts_ns=ts[1]),
        "q@1606339578409000002#2": expected_id(lines[2], labels=labels, ts_ns=ts[2], occurrence=2),
        "q@1606339578409000003#3": expected_id(lines[3], labels=other, ts_ns=ts[3]),
    }


def test_plain_file_ids_include_the_line_number(tmp_path: Path) -> None:
    f = tmp_path / "a.log"
    f.write_text(f"{ISTIO}\n{ISTIO}\n{LINKERD}\n")
    counts = ingest_files(tmp_path / "s.duckdb", [f], progress=False)
    assert (counts.stored, counts.rejects) == (3, 0)
    got = _ids(tmp_path / "s.duckdb")
    assert got == {"1": expected_id(ISTIO, position="1"), "2": expected_id(ISTIO, position="2"),
                   "3": expected_id(LINKERD, position="3")}
    # and a second ingest of the same file adds nothing
    again = ingest_files(tmp_path / "s.duckdb", [f], progress=False)
    assert (again.stored, again.duplicates) == (0, 3)
