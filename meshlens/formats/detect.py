"""Turn a :class:`~meshlens.records.RawBatch` into normalized events and rejects.

Per record, the format is detected (or forced with ``fmt``):

* Envoy-family text lines (``[START_TIME] "METHOD PATH PROTO" ...`` or without the time) and Istio/Consul
  JSON lines are parsed in bulk by :mod:`meshlens.formats.bulk` (DuckDB SQL);
* everything else goes to a record parser: Kubernetes audit (also AKS-wrapped), Linkerd access logs and
  policy lines, Envoy RBAC debug, ztunnel, ECS documents, Docker ``{"log": ...}`` wrappers;
* what matches nothing, or fails its parser, becomes a reject with the reason.

``kubectl logs --prefix`` prefixes (``[pod container] ``) are stripped and feed the labels. Every record
of the batch ends up in exactly one of the two outputs: events + rejects == records.

Event ids: md5 of (stream labels, backend timestamp, record text), plus the occurrence number for a
record repeated verbatim within one batch -- so re-ingesting a record never duplicates it, while two
identical lines in one file are both kept.
"""

from __future__ import annotations

import json
import re
from typing import Any

import duckdb
import pyarrow as pa

from meshlens import schema
from meshlens.errors import ConfigError
from meshlens.formats import bulk, registry
from meshlens.formats.base import Embedded, Event, Labels, Reject
from meshlens.formats.identity import self_identity, workload_from_pod
from meshlens.records import RawBatch
from meshlens.timeutil import parse_rfc3339_ns

MAX_RAW_REJECT = 64 * 1024
MAX_EMBEDDING = 4  # envelopes inside envelopes (a search hit of an ECS document of a Docker line...)
SCAN_CHUNK = 8 * 2048  # rows per Arrow record batch handed to DuckDB (its unit of parallel work)

# public --format names -> internal class (bulk SQL extractor, or the record parser's own name)
FORMATS: dict[str, str] = {"auto": "auto", **{n: (spec.bulk_class or spec.name)
                                              for n, spec in registry.BY_NAME.items()}}

_KUBECTL_PREFIX = re.compile(r"^\[([^\]\s]+) ([^\]\s]+)\] ")


def _auto_whens() -> str:
    """The SQL ``WHEN`` arms by which the bulk formats claim a ``body`` under auto-detection."""
    return "\n".join(f"              WHEN {spec.sql_detect} THEN "
                     f"'{'envoy_json?' if spec.bulk_class == 'envoy_json' else spec.bulk_class}'"
                     for spec in registry.of_kind("bulk") if spec.sql_detect)


def _first_words(text: str, n: int = 80) -> str:
    t = text.strip().replace("\n", "\\n")
    return t[:n] + ("..." if len(t) > n else "")


def _named(name: str, fn: Any, body: str, obj: Any, labels: Labels) -> Event:
    """Run a record parser; its rejects carry the format name (the rejects table's ``format``)."""
    try:
        return fn(body, obj, labels)
    except Reject as r:
        r.format = name  # type: ignore[attr-defined]
        raise


class Parser:
    """Parses batches; holds one in-memory DuckDB connection (use one Parser per thread)."""

    def __init__(self, fmt: str | None = None, json_mapping: dict[str, str] | None = None,
                 con: duckdb.DuckDBPyConnection | None = None) -> None:
        fmt = fmt or "auto"
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r}; choose one of: {', '.join(sorted(FORMATS))}")
        self.fmt = fmt
        self.cls = FORMATS[fmt]
        self.json_mapping = json_mapping
        # Own in-memory connection, or the store's (then only TEMP tables/macros are created on it).
        self.con = con if con is not None else duckdb.connect(":memory:")
        for m in bulk.MACROS:
            self.con.execute(m)
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE events_template AS SELECT * FROM ({_template_sql(schema.EVENT_COLUMNS)}) LIMIT 0")
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE rejects_template AS SELECT * FROM ({_template_sql(schema.REJECT_COLUMNS)}) LIMIT 0")
        self._label_cache: dict[int, tuple[Labels | None, str, str | None, str | None, str | None]] = {}

    # -- labels ------------------------------------------------------------------------------
    def _label_info(self, labels: Labels | None) -> tuple[Labels | None, str, str | None, str | None, str | None]:
        key = id(labels)
        hit = self._label_cache.get(key)
        if hit is not None and hit[0] is labels:
            return hit
        if labels:
            canon = json.dumps({str(k): str(v) for k, v in sorted(labels.items())}, separators=(",", ":"))
            wl, ns = self_identity(labels)
            ct = labels.get("container") or labels.get("container_name")
        else:
            canon, wl, ns, ct = "", None, None, None
        info = (labels, canon, wl, ns, ct)
        if len(self._label_cache) > 100_000:
            self._label_cache.clear()
        self._label_cache[key] = info
        return info

    # -- main --------------------------------------------------------------------------------
    def _streams(self, batch: RawBatch, n: int) -> tuple[pa.Array, pa.Table]:
        """Per-record stream ids and the small table of distinct streams (labels, own identity).

        Done with C-level map/dict calls: sources reuse one labels dict per stream, so the distinct
        streams are few and per-record Python work is avoided.
        """
        labels = batch.labels if batch.labels else [None] * n
        ids = list(map(id, labels))
        by_id = dict(zip(ids, labels, strict=True))
        index = {k: i for i, k in enumerate(by_id)}
        sid = pa.array(list(map(index.__getitem__, ids)), pa.int32())
        keys, wls, nss, cts = [], [], [], []
        for lb in by_id.values():
            _, c, w, s, t = self._label_info(lb)
            keys.append(c)
            wls.append(w)
            nss.append(s)
            cts.append(t)
        streams = pa.table({
            "stream_id": pa.array(range(len(keys)), pa.int32()),
            "stream_key": pa.array(keys, pa.string()),
            "self_workload": pa.array(wls, pa.string()),
            "self_namespace": pa.array(nss, pa.string()),
            "self_container": pa.array(cts, pa.string()),
        })
        return sid, streams

    def parse_into(self, batch: RawBatch, ingested_at: Any = None) -> tuple[int, int]:
        """Parse into the temp tables ``_ml_events`` and ``_ml_rejects`` of the parser's connection.

        With ``Parser(con=store.con)`` the store then inserts straight from those tables: the wide
        result never leaves DuckDB (no Arrow round trip). Returns (events, rejects) counts.
        """
        n = len(batch)
        con = self.con
        if n == 0:
            self.drop_results()
            con.execute("CREATE OR REPLACE TEMP VIEW _ml_events AS SELECT *, NULL::BIGINT AS _ml_seq "
                        "FROM events_template")
            con.execute("CREATE OR REPLACE TEMP VIEW _ml_rejects AS SELECT * FROM rejects_template")
            return 0, 0
        sid, streams = self._streams(batch, n)
        ts = batch.ts_ns if batch.ts_ns else [None] * n
        pos = batch.positions if len(batch.positions) else [""] * n
        rej = batch.reject_reasons if batch.reject_reasons else [None] * n
        raw = pa.table({
            "seq": _column(range(n), pa.int64()),
            "line": _column(batch.lines, pa.string()),
            "src_ts_ns": _column(ts, pa.int64()),
            "stream_id": sid,
            "position": _column(pos, pa.string()),
            "pre_reject": _column(rej, pa.string()),
        })
        # DuckDB scans an Arrow table with one thread per record batch: small batches let both cores parse
        con.register("_ml_raw_in", pa.Table.from_batches(raw.to_batches(max_chunksize=SCAN_CHUNK)))
        con.register("_ml_streams_in", streams)
        try:
            self._parse_registered(batch)
            return self._finalize(batch, ingested_at)
        except BaseException:
            self.drop_results()
            raise
        finally:
            con.unregister("_ml_raw_in")
            con.unregister("_ml_streams_in")

    def parse(self, batch: RawBatch, ingested_at: Any = None) -> tuple[pa.Table, pa.Table]:
        """Return (events, rejects) as Arrow tables with the store's column names."""
        self.parse_into(batch, ingested_at)
        try:
            events = self.con.sql("SELECT * EXCLUDE (_ml_seq) FROM _ml_events").to_arrow_table()
            rejects = self.con.sql("SELECT * FROM _ml_rejects").to_arrow_table()
        finally:
            self.drop_results()
        return events, rejects

    def drop_results(self) -> None:
        """Drop the result views and the temp tables behind them (call after storing a batch)."""
        self.con.execute("DROP VIEW IF EXISTS _ml_events")
        self.con.execute("DROP VIEW IF EXISTS _ml_rejects")
        for t in ("_ml_p", "_ml_ev_py", "_ml_rej_py", "_ml_streams", "_ml_occ", "_ml_ctx"):
            self.con.execute(f"DROP TABLE IF EXISTS {t}")

    def _parse_registered(self, batch: RawBatch) -> None:
        con = self.con
        forced = self.cls
        if forced == "auto":
            # bulk formats claim rows by their SQL detection, in registry order; the rest go to Python
            whens = _auto_whens()
            klass = f"""CASE
              WHEN pre_reject IS NOT NULL THEN 'pre_reject'
{whens}
              ELSE 'python' END"""
        elif forced == "envoy_text":
            klass = "CASE WHEN pre_reject IS NOT NULL THEN 'pre_reject' ELSE 'envoy_text' END"
        elif forced == "envoy_json":
            klass = """CASE WHEN pre_reject IS NOT NULL THEN 'pre_reject'
                       WHEN body[1] = '{' THEN 'envoy_json?' ELSE 'bad_json' END"""
        else:
            klass = "CASE WHEN pre_reject IS NOT NULL THEN 'pre_reject' ELSE 'python' END"
        con.execute("CREATE OR REPLACE TEMP TABLE _ml_streams AS SELECT * FROM _ml_streams_in")
        base = f"""
            (WITH r AS (
              SELECT r.*, s.self_workload AS sw, s.self_namespace AS sn, s.self_container AS sc,
                CASE WHEN line[1] = '[' AND NOT regexp_matches(substr(line, 2, 1), '[0-9 ]')
                     THEN regexp_extract(line, '^\\[([^\\]\\s]+) ([^\\]\\s]+)\\] ', ['pod', 'container'])
                END AS kp
              FROM _ml_raw_in r JOIN _ml_streams s USING (stream_id)),
            b AS (
              SELECT seq, line, src_ts_ns, stream_id, position, pre_reject,
                CASE WHEN kp.pod <> '' THEN substr(line, length(kp.pod) + length(kp.container) + 5)
                     ELSE line END AS body,
                CASE WHEN kp.pod <> '' THEN coalesce(podwl(kp.pod), sw) ELSE sw END AS self_workload,
                sn AS self_namespace,
                CASE WHEN kp.pod <> '' THEN kp.container ELSE sc END AS self_container,
                nullif(kp.pod, '') AS prefix_pod
              FROM r)
            SELECT *, {klass} AS klass FROM b)"""
        # 'envoy_json?' rows become 'envoy_json' if they parse as JSON, else go to the record parsers
        # (auto: they name the JSON error) or are rejected (forced format)
        fields = bulk.fields_sql(base, self.json_mapping, invalid_json="bad_json" if forced == "envoy_json" else "python")
        con.execute(f"CREATE OR REPLACE TEMP TABLE _ml_p AS {bulk.derive_sql('(' + fields + ')')}")
        rows = con.execute(
            "SELECT seq, body, prefix_pod, self_container FROM _ml_p WHERE klass = 'python' ORDER BY seq"
        ).fetchall()
        py_events, py_rejects = self._parse_python(rows, batch)
        con.register("_ml_ev_py_in", _events_arrow(py_events))
        con.execute("CREATE OR REPLACE TEMP TABLE _ml_ev_py AS SELECT * FROM _ml_ev_py_in")
        con.unregister("_ml_ev_py_in")
        con.register("_ml_rej_py_in", pa.table({
            "seq": pa.array([r[0] for r in py_rejects], pa.int64()),
            "format": pa.array([r[1] for r in py_rejects], pa.string()),
            "reason": pa.array([r[2] for r in py_rejects], pa.string()),
        }))
        con.execute("CREATE OR REPLACE TEMP TABLE _ml_rej_py AS SELECT * FROM _ml_rej_py_in")
        con.unregister("_ml_rej_py_in")

    def _parse_python(self, rows: list[tuple[Any, ...]], batch: RawBatch,
                      ) -> tuple[list[Event], list[tuple[int, str | None, str]]]:
        events: list[Event] = []
        rejects: list[tuple[int, str | None, str]] = []
        embedded: list[tuple[int, Embedded, Labels, int]] = []
        for seq, body, prefix_pod, ct in rows:
            labels: Labels = dict(batch.labels[seq] or {}) if batch.labels else {}
            if prefix_pod:
                labels.setdefault("pod", prefix_pod)
                if ct:
                    labels.setdefault("container", ct)
            fmt_name: str | None = None
            try:
                fmt_name, ev = self._dispatch(body, labels)
            except Embedded as emb:
                embedded.append((seq, emb, labels, 1))
                continue
            except Reject as r:
                rejects.append((seq, fmt_name or getattr(r, "format", None), r.reason))
                continue
            except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as exc:
                rejects.append((seq, fmt_name, f"parser error: {type(exc).__name__}: {exc}"))
                continue
            _finish(ev, seq, events, rejects)
        if embedded:
            self._parse_embedded(embedded, events, rejects)
            events.sort(key=lambda e: e["seq"])
        return events, rejects

    def _parse_embedded(self, items: list[tuple[int, Embedded, Labels, int]], events: list[Event],
                        rejects: list[tuple[int, str | None, str]]) -> None:
        """Parse the records that envelopes carry: Envoy/Istio lines with the bulk SQL (with the envelope's
        identity), the rest with the record parsers; then complete each event from its envelope."""
        inner = self if self.cls == "auto" else self._auto_parser()
        while items:
            ctx = [(emb.labels if emb.labels is not None else outer) for _, emb, outer, _ in items]
            sql_rows = self._bulk_embedded([emb.text for _, emb, _, _ in items], ctx)
            again: list[tuple[int, Embedded, Labels, int]] = []
            for (seq, emb, _outer, depth), labels, (klass, row) in zip(items, ctx, sql_rows, strict=True):
                if klass != "python":
                    if row["reason"] is not None:
                        if emb.fallback is not None:
                            _finish(dict(emb.fallback), seq, events, rejects)
                        else:
                            rejects.append((seq, row["format"], f"{emb.name}: {row['reason']}"))
                        continue
                    ev = {c: row[c] for c in _PY_COLUMNS if row.get(c) is not None}
                    ev["ts_ns"] = row.get("ts_ns")
                else:
                    try:
                        _, ev = inner._dispatch(emb.text, labels)
                    except Embedded as deeper:
                        if depth >= MAX_EMBEDDING:
                            rejects.append((seq, None, f"{emb.name}: records nested more than {MAX_EMBEDDING} "
                                                       "envelopes deep"))
                        else:
                            again.append((seq, deeper, labels, depth + 1))
                        continue
                    except Reject as r:
                        if emb.fallback is not None:
                            _finish(dict(emb.fallback), seq, events, rejects)
                        else:
                            rejects.append((seq, getattr(r, "format", None), f"{emb.name}: {r.reason}"))
                        continue
                    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as exc:
                        rejects.append((seq, None, f"{emb.name}: parser error: {type(exc).__name__}: {exc}"))
                        continue
                _complete(ev, emb)
                _finish(ev, seq, events, rejects)
            items = again

    def _auto_parser(self) -> Parser:
        """An auto-detecting parser on the same connection, for records inside a forced-format envelope."""
        if getattr(self, "_inner", None) is None:
            self._inner = Parser(None, self.json_mapping, con=self.con)
        return self._inner

    def _bulk_embedded(self, texts: list[str], labels: list[Labels]) -> list[tuple[str, dict[str, Any]]]:
        """(class, parsed columns) per text: the bulk SQL parses what its detection claims."""
        idents = [self_identity(lb) for lb in labels]
        tbl = pa.table({
            "seq": pa.array(range(len(texts)), pa.int64()),
            "body": pa.array(texts, pa.string()),
            "self_workload": pa.array([i[0] for i in idents], pa.string()),
            "self_namespace": pa.array([i[1] for i in idents], pa.string()),
            "self_container": pa.array([lb.get("container") or lb.get("container_name") for lb in labels],
                                       pa.string()),
        })
        con = self.con
        con.register("_ml_emb_in", tbl)
        try:
            base = f"""(SELECT seq, body AS line, NULL::BIGINT AS src_ts_ns, 0 AS stream_id, '' AS position,
                  NULL::VARCHAR AS pre_reject, body, self_workload, self_namespace, self_container,
                  NULL::VARCHAR AS prefix_pod, CASE {_auto_whens()} ELSE 'python' END AS klass FROM _ml_emb_in)"""
            fields = bulk.fields_sql(base, self.json_mapping, invalid_json="python")
            cur = con.execute(f"SELECT * FROM ({bulk.derive_sql('(' + fields + ')')}) ORDER BY seq")
            names = [d[0] for d in cur.description]
            out = []
            for r in cur.fetchall():
                row = dict(zip(names, r, strict=True))
                out.append(("python" if row["klass"] not in ("envoy_text", "envoy_json") else row["klass"], row))
            return out
        finally:
            con.unregister("_ml_emb_in")

    def _dispatch(self, body: str, labels: Labels) -> tuple[str, Event]:
        forced = self.cls
        stripped = body.strip()
        spec = registry.BY_NAME.get(forced)
        if forced == "auto" and not stripped:
            from meshlens.formats.otel import attributes_record

            line = attributes_record(labels)
            if line is not None:
                raise Embedded(line, name="empty line with access-log attributes as labels (OTLP structured metadata)")
            raise Reject("empty line")
        if forced == "auto" and stripped[:1] == "[" and stripped[-1:] == "]":
            try:
                return self._dispatch_json(body, json.loads(body), labels)
            except json.JSONDecodeError:
                pass
        if spec is not None and spec.kind == "json" and stripped[:1] != "{" and "text" in spec.extra:
            # a format with a JSON and a text shape (ztunnel): forced, a text line goes to its text parser
            text_spec = registry.BY_NAME[spec.extra["text"]]
            return spec.name, _named(spec.name, text_spec.parse, body, None, labels)
        if (forced == "auto" and stripped[:1] == "{") or (spec is not None and spec.kind == "json"):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as exc:
                kind = "truncated or invalid" if stripped[:1] == "{" else "invalid"
                raise Reject(f"{kind} JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
            return self._dispatch_json(body, obj, labels)
        return self._dispatch_text(body, labels)

    def _dispatch_json(self, body: str, obj: Any, labels: Labels) -> tuple[str, Event]:
        """JSON record parsers of the registry, in order; envelopes (``unwrap``) are opened and their
        inner record detected again."""
        forced = self.cls
        if isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], dict):
            obj = obj[0]  # a one-document export (`[{...}]`); longer arrays are split by the file container
        if not isinstance(obj, dict):
            raise Reject(f"JSON record is a {type(obj).__name__}, not an object")
        if forced != "auto":
            spec = registry.BY_NAME.get(forced)
            if spec is None or spec.kind != "json" or spec.parse is None:
                raise Reject(f"does not parse as {self.fmt}")
            return spec.name, _named(spec.name, spec.parse, body, obj, labels)
        for spec in registry.FORMATS:
            if spec.kind == "json" and spec.detect is not None and spec.parse is not None and spec.detect(obj):
                return spec.name, _named(spec.name, spec.parse, body, obj, labels)
            if spec.kind == "unwrap" and spec.detect is not None and spec.unwrap is not None and spec.detect(obj):
                inner, when = spec.unwrap(obj)
                raise Embedded(inner, name=f"{spec.name} envelope",
                               ts_text=when if isinstance(when, str) else None)
        keys = ", ".join(sorted(obj)[:8])
        raise Reject(f"JSON record of unknown shape (keys: {keys}); not an Istio/Envoy, Linkerd, "
                     "Kubernetes audit or ECS record -- pass --format or a JSON key mapping")

    def _dispatch_text(self, body: str, labels: Labels) -> tuple[str, Event]:
        """Text record parsers of the registry, in order; known non-record shapes are named."""
        forced = self.cls
        if forced != "auto":
            spec = registry.BY_NAME.get(forced)
            if spec is None or spec.kind != "text" or spec.parse is None:
                raise Reject(f"does not parse as {self.fmt}")
            return spec.name, _named(spec.name, spec.parse, body, None, labels)
        for spec in registry.of_kind("text"):
            if spec.detect is not None and spec.parse is not None and spec.detect(body):
                return spec.name, _named(spec.name, spec.parse, body, None, labels)
        for pattern, reason in registry.TEXT_NOT_RECORDS:
            if pattern.match(body):
                raise Reject(reason)
        raise Reject(f"unrecognised format: no parser matched '{_first_words(body)}'")

    # -- assemble ----------------------------------------------------------------------------
    def _finalize(self, batch: RawBatch, ingested_at: Any) -> tuple[int, int]:
        """Build ``_ml_events`` and ``_ml_rejects`` (temp tables, store column order).

        Free-text columns and reject text are redacted here (:mod:`meshlens.redact`, on by default,
        ``self.redact`` or the environment), so no secret or PII reaches the store; the event id is
        computed from the unredacted line so changing the redaction never duplicates events.
        """
        from meshlens.redact import RedactConfig, ip_sql, redact_sql

        rcfg = getattr(self, "redact", None) or RedactConfig.from_env()
        con = self.con
        # views cannot take parameters: the batch constants live in a one-row temp table
        con.execute("CREATE OR REPLACE TEMP TABLE _ml_ctx AS SELECT ?::VARCHAR AS source, "
                    "coalesce(?::TIMESTAMPTZ, now()) AS ingested_at", [batch.source, ingested_at])
        now = "(SELECT ingested_at FROM _ml_ctx)"
        sel = []
        for c in schema.EVENT_COLUMN_NAMES:
            if c == "event_id":
                sel.append("CASE WHEN o.occ IS NULL OR o.occ = 1 THEN e.h ELSE md5(e.h || '#' || o.occ) END "
                           "AS event_id")
            elif c == "ts":
                sel.append("make_timestamptz(coalesce(e.ts_ns, e.src_ts_ns) // 1000) AS ts")
            elif c == "ts_ns":
                sel.append("coalesce(e.ts_ns, e.src_ts_ns) AS ts_ns")
            elif c == "source":
                sel.append("(SELECT source FROM _ml_ctx) AS source")
            elif c == "raw":
                sel.append(f"{redact_sql('coalesce(e.raw_override, e.line)', rcfg)} AS raw")
            elif c in ("path", "authority", "user_agent"):
                sel.append(f"{redact_sql(f'e.{c}', rcfg)} AS {c}")
            elif c == "src_ip":
                sel.append(f"{ip_sql('e.src_ip', rcfg)} AS src_ip")
            elif c == "ingested_at":
                sel.append(f"{now} AS ingested_at")
            elif c == "change_spec":
                sel.append("CAST(e.change_spec AS JSON) AS change_spec")
            else:
                sel.append(f"e.{c}")
        con.execute("""
            CREATE OR REPLACE TEMP TABLE _ml_streams AS
            SELECT *, CASE WHEN stream_key = '' THEN MAP {} ELSE CAST(json_transform(stream_key,
                   '"MAP(VARCHAR, VARCHAR)"') AS MAP(VARCHAR, VARCHAR)) END AS labels FROM _ml_streams""")
        # identical records within the batch (rare): number them so both are kept, deterministically
        pos = "position" if batch.identity_positions else "''"
        # With identity positions (line numbers, index/_id) that are unique in the batch -- checked
        # cheaply on the short positions -- no two records can share an identity: skip hashing the lines.
        key = f"stream_id, src_ts_ns, line, {pos}"
        if batch.identity_positions and not con.execute(
                "SELECT count(*) FROM (SELECT 1 FROM _ml_p GROUP BY stream_id, position HAVING count(*) > 1)"
        ).fetchall()[0][0]:
            key = "stream_id, position"
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _ml_occ AS
            WITH hh AS (SELECT seq, hash({key}) AS hh FROM _ml_p),
            d AS (SELECT hh FROM hh GROUP BY hh HAVING count(*) > 1)
            SELECT seq, row_number() OVER (PARTITION BY hh ORDER BY seq) AS occ
            FROM hh WHERE hh IN (SELECT hh FROM d)""")
        con.execute(f"""
            CREATE OR REPLACE TEMP VIEW _ml_events AS
            WITH e AS (
              SELECT * EXCLUDE (reason), NULL::VARCHAR AS raw_override FROM _ml_p
              WHERE klass IN ('envoy_text', 'envoy_json') AND reason IS NULL
              UNION ALL BY NAME
              SELECT y.* EXCLUDE (raw), y.raw AS raw_override, p.line, p.src_ts_ns, p.stream_id, p.position
              FROM _ml_ev_py y JOIN _ml_p p USING (seq)),
            k AS (
              SELECT e.*, md5(s.stream_key || chr(31) || coalesce(CAST(e.src_ts_ns AS VARCHAR), '') || chr(31)
                              || e.line || {"chr(31) || e.position" if batch.identity_positions else "''"})
                     AS h, s.labels
              FROM e JOIN _ml_streams s USING (stream_id))
            SELECT {", ".join(sel)}, e.seq AS _ml_seq
            FROM k e LEFT JOIN _ml_occ o USING (seq)""")
        rej_reason = redact_sql(f"""CASE WHEN length(r.line) > {MAX_RAW_REJECT}
                   THEN j.reason || ' [raw truncated to {MAX_RAW_REJECT} of ' || length(r.line) || ' chars]'
                   ELSE j.reason END""", rcfg)
        rej_raw = redact_sql(f"left(r.line, {MAX_RAW_REJECT})", rcfg)
        con.execute(f"""
            CREATE OR REPLACE TEMP VIEW _ml_rejects AS
            WITH j AS (
              SELECT seq, format, reason FROM _ml_p
              WHERE klass IN ('envoy_text', 'envoy_json') AND reason IS NOT NULL
              UNION ALL SELECT seq, format, reason FROM _ml_rej_py
              UNION ALL SELECT seq, NULL, pre_reject FROM _ml_p WHERE klass = 'pre_reject'
              UNION ALL SELECT seq, 'istio_json', 'invalid JSON (forced format {self.fmt})' FROM _ml_p
                WHERE klass = 'bad_json')
            SELECT md5(c.source || chr(31) || r.position || chr(31) || r.line) AS reject_id,
              c.source, r.position, r.src_ts_ns AS ts_ns, j.format,
              {rej_reason} AS reason,
              {rej_raw} AS raw,
              {now} AS ingested_at
            FROM j JOIN _ml_p r USING (seq), _ml_ctx c""")
        n_ev, n_rej = con.execute("""
            SELECT count(*) FILTER (WHERE klass IN ('envoy_text', 'envoy_json') AND reason IS NULL)
                     + (SELECT count(*) FROM _ml_ev_py),
                   count(*) FILTER (WHERE (klass IN ('envoy_text', 'envoy_json') AND reason IS NOT NULL)
                                    OR klass IN ('pre_reject', 'bad_json')) + (SELECT count(*) FROM _ml_rej_py)
            FROM _ml_p""").fetchall()[0]
        return int(n_ev), int(n_rej)


def _finish(ev: Event, seq: int, events: list[Event], rejects: list[tuple[int, str | None, str]]) -> None:
    """Resolve a parsed event's text time and add it (or reject it for an unreadable time)."""
    ts_text = ev.pop("ts_text", None)
    if ev.get("ts_ns") is None and ts_text:
        ts = parse_rfc3339_ns(ts_text)
        if ts is None:
            rejects.append((seq, ev.get("format"), f"timestamp {ts_text!r} is not RFC 3339"))
            return
        ev["ts_ns"] = ts
    ev["seq"] = seq
    events.append(ev)


def _complete(ev: Event, emb: Embedded) -> None:
    """Fill what the inner record did not state from its envelope (time, identity, trace...)."""
    inner_ts = ev.get("ts_ns")
    if inner_ts is None and ev.get("ts_text"):
        inner_ts = parse_rfc3339_ns(str(ev["ts_text"]))
    if emb.ts_refine and emb.ts_ns is not None and inner_ts is not None and emb.ts_ns != inner_ts \
            and abs(emb.ts_ns - inner_ts) < 1_000_000_000 and emb.ts_ns % 1_000_000 != 0 \
            and inner_ts % 1_000_000 == 0:
        ev.pop("ts_text", None)
        ev["ts_ns"] = emb.ts_ns  # the same instant, with the precision the line's START_TIME lacks
    elif inner_ts is None and not ev.get("ts_text"):
        if emb.ts_ns is not None:
            ev["ts_ns"] = emb.ts_ns
        elif emb.ts_text:
            ev["ts_text"] = emb.ts_text
    for k, v in emb.fill.items():
        if ev.get(k) is None and v is not None:
            ev[k] = v


def _column(values: Any, typ: pa.DataType) -> pa.ChunkedArray:
    """A batch column as Arrow: Arrow input as is; lists converted in slices (converting many small
    lists is several times faster than one huge allocation, and the slices are DuckDB's parallel
    units)."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])
    return pa.chunked_array([pa.array(values[i:i + SCAN_CHUNK], typ) for i in range(0, len(values), SCAN_CHUNK)],
                            typ)


def _template_sql(cols: tuple[schema.Column, ...]) -> str:
    return "SELECT " + ", ".join(f'NULL::{c.type} AS "{c.name}"' for c in cols)


_ASSEMBLED = {"event_id", "ts", "ts_ns", "labels", "source", "position", "raw", "ingested_at"}

_EVENT_TYPES = {c.name: c.type for c in schema.EVENT_COLUMNS}


def _arrow_type(sql_type: str) -> pa.DataType:
    return {
        "VARCHAR": pa.string(), "INTEGER": pa.int32(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(),
        "BOOLEAN": pa.bool_(), "JSON": pa.string(), "VARCHAR[]": pa.list_(pa.string()),
    }.get(sql_type, pa.string())


_PY_COLUMNS = [c for c in schema.EVENT_COLUMN_NAMES if c not in _ASSEMBLED]


def _events_arrow(events: list[Event]) -> pa.Table:
    """Record-parser dicts -> Arrow with typed columns (seq, parsed columns, ts_ns, raw override)."""
    cols: dict[str, pa.Array] = {"seq": pa.array([e["seq"] for e in events], pa.int64())}
    for c in _PY_COLUMNS:
        cols[c] = pa.array([e.get(c) for e in events], _arrow_type(_EVENT_TYPES[c]))
    cols["ts_ns"] = pa.array([e.get("ts_ns") for e in events], pa.int64())
    cols["raw"] = pa.array([e.get("raw") for e in events], pa.string())
    return pa.table(cols)


def workload_of(pod: str | None) -> str | None:
    return workload_from_pod(pod)
