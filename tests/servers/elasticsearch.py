"""An in-process HTTP server that behaves like Elasticsearch's and OpenSearch's search APIs.

Real Elasticsearch/OpenSearch cannot run in CI here, so this server reproduces -- from their docs and
real response bodies (``shared/formats.md`` section 7) -- what meshlens uses:

* ``GET /`` root info (``version.number``, ``version.distribution`` for OpenSearch, ``tagline``) and the
  ``X-Elastic-Product: Elasticsearch`` header on every response of Elasticsearch >= 7.14;
  ``GET /_cluster/health``;
* ``_search`` with ``query`` (``match_all``, ``bool``, ``range``, ``term(s)``, ``exists``, ``match``,
  ``ids``, a ``query_string`` subset with fields, phrases, wildcards, ranges, AND/OR/NOT and
  parentheses), ``sort`` (fields, ``_doc``, ``_id``, ``_shard_doc``, ``unmapped_type``),
  ``search_after``, ``from``/``size`` limited by ``index.max_result_window``, ``track_total_hits``,
  ``slice``;
* point in time in both dialects, gated by version: Elasticsearch ``POST /<index>/_pit`` (7.10+),
  ``DELETE /_pit``, implicit ``_shard_doc`` tiebreaker (7.12+), sliced PIT (7.15+); OpenSearch
  ``POST /<index>/_search/point_in_time`` (2.4+), ``DELETE /_search/point_in_time``, ``_shard_doc``
  only from 3.3; a PIT is a snapshot (documents indexed later are invisible) and every new PIT gets a
  new Lucene doc order (as after merges), so ``_shard_doc`` values differ between PITs; ``_shard_doc`` is
  ``(shard << 32) | doc`` with the shard numbered across the whole PIT on Elasticsearch
  (``ShardDocSortField.shardRequestIndex``) but inside its own index on OpenSearch
  (``ShardDocSortBuilder``: ``context.getShardId()``), so OpenSearch indices with equal shard numbers
  collide -- and ``search_after`` skips every hit equal to the cursor, as Lucene's ``compareTop`` does;
  ``_index`` sorts; the open-PIT parameters by version (``allow_partial_pit_creation`` on OpenSearch,
  default true; ``allow_partial_search_results`` on Elasticsearch 8.16+), any other one a 400
  "contains unrecognized parameter"; ``_cat/indices``; optional TLS (``ssl_context``);
* ``scroll`` (``POST /<index>/_search?scroll=``, ``/_search/scroll``, clear), composite aggregations
  (``terms``, ``date_histogram``, ``histogram`` sources; ``percentiles``, ``avg``/``sum``/``min``/
  ``max``/``value_count``, ``filter`` sub-aggregations; ``after_key`` paging; a page larger than
  ``search.max_buckets`` refused with ``too_many_buckets_exception``), ``_count``, ``_bulk``,
  index creation with mappings and ``max_result_window``;
* error bodies shaped like the real ones (``{"error": {"root_cause": [...], "type", "reason", ...},
  "status"}``; OpenSearch security's plain-text 401);
* fault knobs: 429/5xx storms (optionally with ``Retry-After``), the fielddata circuit breaker on an
  ``_id`` sort (429, or failed shards in a 200), PITs that miss shards, PIT/scroll expiry after N pages,
  authentication, forbidden paths, partial shard failures in a 200, ``timed_out`` answers, dropped
  connections and bodies cut mid-transfer.

Run standalone for benchmarks: ``python -m tests.servers.elasticsearch --flavor es8 --generate 1000000``
prints one JSON line with the URL and serves until stdin closes.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import fnmatch
import itertools
import json
import random
import re
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# ---------------------------------------------------------------------------------------------------
# flavors
# ---------------------------------------------------------------------------------------------------
FLAVORS: dict[str, tuple[str, str]] = {
    "es7.9": ("elasticsearch", "7.9.3"),
    "es7.10": ("elasticsearch", "7.10.2"),
    "es7.13": ("elasticsearch", "7.13.4"),
    "es7.17": ("elasticsearch", "7.17.22"),
    "es8": ("elasticsearch", "8.15.3"),
    "es9": ("elasticsearch", "9.1.2"),
    "os1": ("opensearch", "1.3.19"),
    "os2.3": ("opensearch", "2.3.0"),
    "os2": ("opensearch", "2.17.1"),
    "os3": ("opensearch", "3.3.0"),
}


def _vt(number: str) -> tuple[int, int, int]:
    a, b, c = (number.split(".") + ["0", "0"])[:3]
    return int(a), int(b), int(c)


class EsHttpError(Exception):
    """An error answer: status, JSON body (or text), extra headers."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def es_error(status: int, etype: str, reason: str, *, root: list[dict[str, Any]] | None = None,
             **extra: Any) -> EsHttpError:
    """Elasticsearch's error envelope: root_cause list, type, reason, status."""
    cause = {"type": etype, "reason": reason, **extra}
    return EsHttpError(status, {"error": {"root_cause": root or [cause], **cause}, "status": status})


def shard_error(status: int, etype: str, reason: str, index: str, **extra: Any) -> EsHttpError:
    """A query-phase failure on every shard: ``search_phase_execution_exception`` wrapping the cause."""
    cause = {"type": etype, "reason": reason, **extra}
    return EsHttpError(status, {"error": {
        "root_cause": [cause], "type": "search_phase_execution_exception", "reason": "all shards failed",
        "phase": "query", "grouped": True,
        "failed_shards": [{"shard": 0, "index": index, "node": "n1Xy2Qs5TdaBqoP8vW4hzA", "reason": cause}],
        "caused_by": cause,
    }, "status": status})


def no_handler(method: str, uri: str) -> EsHttpError:
    return EsHttpError(400, {"error": f"no handler found for uri [{uri}] and method [{method}]"})


# ---------------------------------------------------------------------------------------------------
# documents and indices
# ---------------------------------------------------------------------------------------------------
_ISO_DATE = re.compile(r"^\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:[.,]\d{1,9})?)?)?(?:Z|[+-]\d\d:?\d\d)?$")
_ISO_FULL = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d{1,9}))?)?)?(Z|[+-]\d\d:?\d\d)?$")


def parse_iso_ns(text: str) -> int | None:
    m = _ISO_FULL.match(text.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        base = datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0), tzinfo=UTC)
    except ValueError:
        return None
    ns = int(base.timestamp()) * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        ns -= sign * (int(tz[1:3]) * 3600 + int(tz[-2:]) * 60) * 1_000_000_000
    return ns


def flatten(src: Any, prefix: str = "", out: dict[str, list[Any]] | None = None) -> dict[str, list[Any]]:
    """``{"a": {"b": 1}, "c.d": [2, 3]}`` -> ``{"a.b": [1], "c.d": [2, 3]}`` (how ES indexes objects)."""
    out = {} if out is None else out
    if isinstance(src, dict):
        for k, v in src.items():
            flatten(v, f"{prefix}{k}.", out)
        return out
    key = prefix[:-1]
    if isinstance(src, list):
        for v in src:
            if isinstance(v, dict | list):
                flatten(v, prefix, out)
            elif v is not None:
                out.setdefault(key, []).append(v)
        return out
    if src is not None:
        out.setdefault(key, []).append(src)
    return out


def _infer_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str) and _ISO_DATE.match(value) and len(value) >= 10:
        return "date"
    return "text"


def _date_value(value: Any, ftype: str) -> int | None:
    """A document's date value -> ms (``date``) or ns (``date_nanos``), as ES sorts and compares it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        ns = int(value * 1_000_000)  # epoch_millis, the default numeric date format
    elif isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            ns = int(float(s) * 1_000_000)
        else:
            parsed = parse_iso_ns(s)
            if parsed is None:
                return None
            ns = parsed
    else:
        return None
    return ns if ftype == "date_nanos" else ns // 1_000_000


_TOKEN = re.compile(r"[\w]+", re.UNICODE)


def analyze(text: str) -> list[str]:
    """The standard analyzer, roughly: lowercase word tokens."""
    return [t.lower() for t in _TOKEN.findall(text)]


class Index:
    """One index: append-only documents (tombstones on overwrite) and per-field value caches."""

    def __init__(self, name: str, shards: int = 2, max_result_window: int = 10_000) -> None:
        self.name = name
        self.shards = shards
        self.max_result_window = max_result_window
        self.mapping: dict[str, str] = {}  # dotted field -> type
        self.ids: list[str] = []
        self.raws: list[bytes] = []
        self.alive: list[bool] = []
        self.by_id: dict[str, int] = {}
        self._flat: dict[int, dict[str, list[Any]]] = {}
        self._columns: dict[str, list[Any]] = {}
        self._tokens: dict[tuple[str, int], list[str]] = {}
        self.lock = threading.RLock()
        self.uuid = base64.urlsafe_b64encode(zlib.crc32(name.encode()).to_bytes(4, "big") * 4).decode()[:22]

    def put_mapping(self, properties: dict[str, Any], prefix: str = "") -> None:
        for name, spec in properties.items():
            if not isinstance(spec, dict):
                continue
            if "properties" in spec:
                self.put_mapping(spec["properties"], f"{prefix}{name}.")
            else:
                self.mapping[prefix + name] = spec.get("type", "object")
                for sub, sspec in (spec.get("fields") or {}).items():
                    self.mapping[f"{prefix}{name}.{sub}"] = sspec.get("type", "keyword")

    def add(self, doc_id: str, source: dict[str, Any], raw: bytes | None = None) -> str:
        with self.lock:
            result = "created"
            old = self.by_id.get(doc_id)
            if old is not None:
                self.alive[old] = False
                result = "updated"
            pos = len(self.ids)
            self.ids.append(doc_id)
            self.raws.append(raw if raw is not None else json.dumps(source, separators=(",", ":")).encode())
            self.alive.append(True)
            self.by_id[doc_id] = pos
            for path, values in flatten(source).items():
                if path not in self.mapping and values:
                    t = _infer_type(values[0])
                    self.mapping[path] = t
                    if t == "text":
                        self.mapping[path + ".keyword"] = "keyword"
            return result

    def delete(self, doc_id: str) -> bool:
        with self.lock:
            pos = self.by_id.pop(doc_id, None)
            if pos is None:
                return False
            self.alive[pos] = False
            return True

    def live_positions(self) -> list[int]:
        with self.lock:
            return [i for i, a in enumerate(self.alive) if a]

    def flat(self, pos: int) -> dict[str, list[Any]]:
        f = self._flat.get(pos)
        if f is None:
            f = flatten(json.loads(self.raws[pos]))
            if len(self._flat) < 20_000:
                self._flat[pos] = f
        return f

    def ftype(self, fld: str) -> str | None:
        return self.mapping.get(fld)

    def values(self, fld: str, pos: int) -> list[Any]:
        """Indexed values of a field (dates as ms/ns ints, keyword subfields as strings)."""
        col = self._columns.get(fld)
        if col is None or len(col) <= pos:
            with self.lock:
                col = self._columns.setdefault(fld, [])
                n = len(self.raws)
                if len(col) < n:
                    col.extend(self._compute(fld, i) for i in range(len(col), n))
        return col[pos]

    def _compute(self, fld: str, pos: int) -> list[Any]:
        t = self.mapping.get(fld)
        base = fld
        if t == "keyword" and fld not in self.flat(pos) and fld.endswith(".keyword"):
            base = fld[: -len(".keyword")]
        raw = self.flat(pos).get(base, [])
        if t in ("date", "date_nanos"):
            return [v for v in (_date_value(x, t) for x in raw) if v is not None]
        if t == "keyword":
            return [str(x) for x in raw if len(str(x)) <= 256]
        if t in ("long", "integer", "short", "byte"):
            out = []
            for x in raw:
                try:
                    out.append(int(float(x)))
                except (TypeError, ValueError):
                    continue
            return out
        if t in ("float", "double", "half_float", "scaled_float"):
            out2 = []
            for x in raw:
                try:
                    out2.append(float(x))
                except (TypeError, ValueError):
                    continue
            return out2
        return list(raw)

    def tokens(self, fld: str, pos: int) -> list[str]:
        key = (fld, pos)
        t = self._tokens.get(key)
        if t is None:
            t = [tok for v in self.flat(pos).get(fld, []) for tok in analyze(str(v))]
            if len(self._tokens) < 50_000:
                self._tokens[key] = t
        return t

    def shard_of(self, pos: int) -> int:
        return zlib.crc32(self.ids[pos].encode()) % self.shards


Ref = tuple[Index, int]  # (index, position)


# ---------------------------------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------------------------------
Pred = Callable[[Index, int], bool]


def _parse_date_bound(value: Any, fmt: str | None, ftype: str, index: str, fld: str) -> int:
    ns: int | None = None
    if fmt and "epoch_second" in fmt and re.fullmatch(r"-?\d+(\.\d+)?", str(value)):
        ns = int(float(value) * 1_000_000_000)
    elif isinstance(value, int | float) or re.fullmatch(r"-?\d+(\.\d+)?", str(value)):
        ns = int(float(value) * 1_000_000)
    else:
        ns = parse_iso_ns(str(value))
    if ns is None:
        raise shard_error(400, "parse_exception",
                          f"failed to parse date field [{value}] with format "
                          f"[{fmt or 'strict_date_optional_time||epoch_millis'}]: [failed to parse date field "
                          f"[{value}] with format [{fmt or 'strict_date_optional_time||epoch_millis'}]]",
                          index)
    return ns if ftype == "date_nanos" else ns // 1_000_000


def _coerce(value: Any, ftype: str | None) -> Any:
    if ftype in ("long", "integer", "short", "byte", "float", "double"):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    return value


class QueryCompiler:
    def __init__(self, index_hint: str) -> None:
        self.index_hint = index_hint

    def compile(self, q: Any) -> Pred:
        if q is None:
            return lambda idx, pos: True
        if not isinstance(q, dict) or len(q) != 1:
            raise es_error(400, "parsing_exception",
                           "[_na] query malformed, must start with start_object" if not isinstance(q, dict)
                           else f"[{next(iter(q), '_na')}] malformed query, expected [END_OBJECT] but found "
                                "[FIELD_NAME]", line=1, col=1)
        kind, body = next(iter(q.items()))
        fn = getattr(self, f"q_{kind}", None)
        if fn is None:
            raise es_error(400, "parsing_exception", f"unknown query [{kind}]", line=1, col=13)
        return fn(body)

    def q_match_all(self, body: Any) -> Pred:
        return lambda idx, pos: True

    def q_match_none(self, body: Any) -> Pred:
        return lambda idx, pos: False

    def q_bool(self, body: dict[str, Any]) -> Pred:
        def many(key: str) -> list[Pred]:
            v = body.get(key)
            if v is None:
                return []
            return [self.compile(x) for x in (v if isinstance(v, list) else [v])]

        must, filt, should, must_not = many("must"), many("filter"), many("should"), many("must_not")
        need = must + filt
        msm = body.get("minimum_should_match")
        min_should = int(msm) if msm is not None else (0 if need else (1 if should else 0))

        def pred(idx: Index, pos: int) -> bool:
            if not all(p(idx, pos) for p in need):
                return False
            if any(p(idx, pos) for p in must_not):
                return False
            if min_should:
                return sum(1 for p in should if p(idx, pos)) >= min_should
            return True

        return pred

    def q_range(self, body: dict[str, Any]) -> Pred:
        (fld, spec), = body.items()
        fmt = spec.get("format")
        bounds = [(op, spec[op]) for op in ("gte", "gt", "lte", "lt") if op in spec and spec[op] is not None]

        converted: dict[int, list[tuple[str, Any]]] = {}

        def bounds_for(idx: Index) -> list[tuple[str, Any]]:
            conv = converted.get(id(idx))
            if conv is None:
                t = idx.ftype(fld)
                if t in ("date", "date_nanos"):
                    conv = [(op, _parse_date_bound(b, fmt, t, idx.name, fld)) for op, b in bounds]
                else:
                    conv = [(op, _coerce(b, t)) for op, b in bounds]
                converted[id(idx)] = conv
            return conv

        def pred(idx: Index, pos: int) -> bool:
            if idx.ftype(fld) is None:
                return False
            vals = idx.values(fld, pos)
            if not vals:
                return False
            conv = bounds_for(idx)
            for v in vals:
                ok = True
                for op, b in conv:
                    try:
                        if (op == "gte" and not v >= b) or (op == "gt" and not v > b) or \
                                (op == "lte" and not v <= b) or (op == "lt" and not v < b):
                            ok = False
                            break
                    except TypeError:
                        ok = False
                        break
                if ok:
                    return True
            return False

        return pred

    def q_term(self, body: dict[str, Any]) -> Pred:
        (fld, spec), = body.items()
        value = spec.get("value") if isinstance(spec, dict) else spec
        return self._equals(fld, [value])

    def q_terms(self, body: dict[str, Any]) -> Pred:
        items = [(k, v) for k, v in body.items() if k != "boost"]
        (fld, values), = items
        return self._equals(fld, list(values))

    def _equals(self, fld: str, values: list[Any]) -> Pred:
        if fld in ("_index", "_id"):
            want_meta = {str(v) for v in values}
            if fld == "_index":
                return lambda idx, pos: idx.name in want_meta
            return lambda idx, pos: idx.ids[pos] in want_meta

        def pred(idx: Index, pos: int) -> bool:
            t = idx.ftype(fld)
            if t == "text":
                toks = set(idx.tokens(fld, pos))
                return any(str(v) in toks for v in values)
            if t in ("date", "date_nanos"):
                want = {_parse_date_bound(v, None, t, idx.name, fld) for v in values}
            else:
                want = {_coerce(v, t) for v in values}
            return any(v in want for v in idx.values(fld, pos))

        return pred

    def q_exists(self, body: dict[str, Any]) -> Pred:
        fld = body["field"]
        return lambda idx, pos: bool(idx.flat(pos).get(fld))

    def q_ids(self, body: dict[str, Any]) -> Pred:
        want = set(body.get("values") or [])
        return lambda idx, pos: idx.ids[pos] in want

    def q_match(self, body: dict[str, Any]) -> Pred:
        (fld, spec), = body.items()
        text = spec.get("query") if isinstance(spec, dict) else spec
        op = (spec.get("operator") if isinstance(spec, dict) else None) or "or"
        want = analyze(str(text))

        def pred(idx: Index, pos: int) -> bool:
            t = idx.ftype(fld)
            if t in ("keyword", "long", "integer", "float", "double", "date", "date_nanos", "boolean"):
                return self._equals(fld, [text])(idx, pos)
            toks = set(idx.tokens(fld, pos))
            hits = [w in toks for w in want]
            return all(hits) if op.lower() == "and" else any(hits)

        return pred

    def q_match_phrase(self, body: dict[str, Any]) -> Pred:
        (fld, spec), = body.items()
        text = spec.get("query") if isinstance(spec, dict) else spec
        return lambda idx, pos: _phrase_in(analyze(str(text)), idx.tokens(fld, pos))

    def q_query_string(self, body: dict[str, Any]) -> Pred:
        q = body.get("query")
        if not isinstance(q, str):
            raise es_error(400, "parsing_exception", "[query_string] requires 'query' field", line=1, col=1)
        op = str(body.get("default_operator") or "OR").upper()
        return QueryStringParser(q, self.index_hint, op, body.get("default_field")).parse()


def _phrase_in(phrase: list[str], toks: list[str]) -> bool:
    if not phrase:
        return True
    n = len(phrase)
    return any(toks[i:i + n] == phrase for i in range(len(toks) - n + 1))


class QueryStringParser:
    """A subset of Lucene's classic query syntax, with Lucene's error messages for the usual mistakes."""

    _TOK = re.compile(r'\s+|\(|\)|"(?:[^"\\]|\\.)*"|"(?:[^"\\]|\\.)*$|[\[{][^\]}]*[\]}]|(?:\\.|[^\s()"\[{])+')

    def __init__(self, q: str, index: str, default_op: str, default_field: str | None) -> None:
        self.q = q
        self.index = index
        self.default_op = default_op
        self.default_field = default_field if default_field not in (None, "*") else None
        self.toks: list[tuple[str, int]] = []
        pos = 0
        while pos < len(q):
            m = self._TOK.match(q, pos)
            if not m:
                self._lexical(pos)
            text = m.group(0)
            if not text.isspace():
                if text.startswith('"') and (len(text) == 1 or not text.endswith('"') or text.endswith('\\"')):
                    self._lexical(len(q), after=text)
                self.toks.append((text, m.start()))
            pos = m.end()
        self.i = 0

    def _err(self, encountered: str, col: int) -> EsHttpError:
        reason = f"Cannot parse '{self.q}': Encountered \"{encountered}\" at line 1, column {col}."
        cause = {"type": "parse_exception", "reason": reason,
                 "caused_by": {"type": "parse_exception", "reason": f"Encountered \"{encountered}\" at line 1, "
                                                                    f"column {col}."}}
        return shard_error(400, "query_shard_exception", f"Failed to parse query [{self.q}]", self.index,
                           index_uuid="aAbBcCdDeE1234567890zz", caused_by=cause)

    def _lexical(self, col: int, after: str = "") -> None:
        reason = f"Cannot parse '{self.q}': Lexical error at line 1, column {col + 1}.  Encountered: <EOF> after " \
                 f": \"{after}\""
        cause = {"type": "parse_exception", "reason": reason}
        raise shard_error(400, "query_shard_exception", f"Failed to parse query [{self.q}]", self.index,
                          index_uuid="aAbBcCdDeE1234567890zz", caused_by=cause)

    def peek(self) -> str | None:
        return self.toks[self.i][0] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, int]:
        t = self.toks[self.i]
        self.i += 1
        return t

    def parse(self) -> Pred:
        if not self.toks:
            return lambda idx, pos: True
        p = self.or_expr()
        if self.i < len(self.toks):
            text, col = self.toks[self.i]
            raise self._err(text, col + 1)
        return p

    def or_expr(self) -> Pred:
        terms = [self.and_expr()]
        ops: list[str] = []
        while self.peek() not in (None, ")"):
            if self.peek() in ("OR", "||"):
                self.take()
                ops.append("OR")
            else:
                ops.append(self.default_op)
            terms.append(self.and_expr())
        if not ops:
            return terms[0]
        # default operator AND binds like AND between adjacent clauses
        groups: list[list[Pred]] = [[terms[0]]]
        for op, t in zip(ops, terms[1:], strict=True):
            if op == "AND":
                groups[-1].append(t)
            else:
                groups.append([t])
        return lambda idx, pos: any(all(p(idx, pos) for p in g) for g in groups)

    def and_expr(self) -> Pred:
        parts = [self.unary()]
        while self.peek() in ("AND", "&&"):
            self.take()
            parts.append(self.unary())
        if len(parts) == 1:
            return parts[0]
        return lambda idx, pos: all(p(idx, pos) for p in parts)

    def unary(self) -> Pred:
        t = self.peek()
        if t is None:
            raise self._err("<EOF>", len(self.q) + 1)
        if t in ("NOT", "!"):
            self.take()
            inner = self.unary()
            return lambda idx, pos: not inner(idx, pos)
        if t.startswith("-") and len(t) > 1:
            self.toks[self.i] = (t[1:], self.toks[self.i][1] + 1)
            inner = self.unary()
            return lambda idx, pos: not inner(idx, pos)
        if t.startswith("+") and len(t) > 1:
            self.toks[self.i] = (t[1:], self.toks[self.i][1] + 1)
        return self.primary()

    def primary(self) -> Pred:
        text, col = self.take()
        if text in ("AND", "OR", "&&", "||", ")"):
            raise self._err(text, col + 1)
        if text == "(":
            inner = self.or_expr()
            if self.peek() != ")":
                raise self._err("<EOF>", len(self.q) + 1)
            self.take()
            return inner
        fld, value = None, text
        m = re.match(r"^((?:\\.|[^:\\])+):(.*)$", text)
        if m and not text.startswith('"'):
            fld, value = m.group(1).replace("\\", ""), m.group(2)
            if value == "":
                nxt = self.peek()
                if nxt is None:
                    raise self._err("<EOF>", len(self.q) + 1)
                if nxt == "(":
                    self.take()
                    inner = self._with_field(fld)
                    return inner
                value, _ = self.take()
        return self.leaf(fld, value)

    def _with_field(self, fld: str) -> Pred:
        saved = self.default_field
        self.default_field = fld
        try:
            inner = self.or_expr()
        finally:
            self.default_field = saved
        if self.peek() != ")":
            raise self._err("<EOF>", len(self.q) + 1)
        self.take()
        return inner

    def leaf(self, fld: str | None, value: str) -> Pred:
        fld = fld or self.default_field
        if value[:1] in "[{" and value[-1:] in "]}":
            lo, _, hi = value[1:-1].partition(" TO ")
            spec: dict[str, Any] = {}
            if lo.strip() not in ("*", ""):
                spec["gte" if value[0] == "[" else "gt"] = lo.strip()
            if hi.strip() not in ("*", ""):
                spec["lte" if value[-1] == "]" else "lt"] = hi.strip()
            if not fld:
                return lambda idx, pos: False
            return QueryCompiler(self.index).q_range({fld: spec})
        for op, key in ((">=", "gte"), ("<=", "lte"), (">", "gt"), ("<", "lt")):
            if value.startswith(op) and fld:
                return QueryCompiler(self.index).q_range({fld: {key: value[len(op):]}})
        phrase = value.startswith('"')
        raw = value[1:-1] if phrase else value
        raw = re.sub(r"\\(.)", r"\1", raw)
        wildcard = not phrase and any(c in raw for c in "*?")

        def match_field(idx: Index, pos: int, f: str) -> bool:
            t = idx.ftype(f)
            if t is None:
                return False
            if t == "text":
                toks = idx.tokens(f, pos)
                if phrase:
                    return _phrase_in(analyze(raw), toks)
                if wildcard:
                    pat = raw.lower()
                    return any(fnmatch.fnmatchcase(tok, pat) for tok in toks)
                want = analyze(raw)
                return bool(want) and all(w in toks for w in want)
            vals = idx.values(f, pos)
            if wildcard:
                return any(fnmatch.fnmatchcase(str(v), raw) for v in vals)
            if t in ("date", "date_nanos"):
                try:
                    want_d = _parse_date_bound(raw, None, t, idx.name, f)
                except EsHttpError:
                    return False
                return want_d in vals
            want_v = _coerce(raw, t)
            return any(v == want_v or str(v) == raw for v in vals)

        if fld == "*" or fld is None:
            return lambda idx, pos: any(match_field(idx, pos, f) for f in idx.flat(pos))
        if "*" in fld:
            return lambda idx, pos: any(match_field(idx, pos, f) for f in idx.flat(pos)
                                        if fnmatch.fnmatchcase(f, fld))
        return lambda idx, pos: match_field(idx, pos, fld)


# ---------------------------------------------------------------------------------------------------
# contexts
# ---------------------------------------------------------------------------------------------------
def parse_time_value(v: str) -> float:
    m = re.fullmatch(r"(\d+)(nanos|micros|ms|s|m|h|d)", v.strip())
    if not m:
        raise es_error(400, "illegal_argument_exception",
                       f"failed to parse setting [keep_alive] with value [{v}] as a time value: unit is missing "
                       "or unrecognized")
    n, unit = int(m.group(1)), m.group(2)
    return n * {"nanos": 1e-9, "micros": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


@dataclass
class PitContext:
    """A point in time: a frozen list of documents with shard ordinals and a per-PIT Lucene doc order."""

    base: str
    refs: list[Ref]
    shard_doc: dict[tuple[int, int], int]  # (id(index), pos) -> _shard_doc
    expires_at: float
    keep_alive_s: float
    indices: list[str]
    counter: int = 0
    cache: dict[str, tuple[list[Any], list[Ref]]] = field(default_factory=dict)


@dataclass
class ScrollContext:
    hits: list[tuple[Any, Ref]]
    position: int
    size: int
    expires_at: float
    keep_alive_s: float
    body: dict[str, Any]


class _Rev:
    """Reverses ordering of any comparable value (descending sort on strings)."""

    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v

    def __lt__(self, o: _Rev) -> bool:
        return o.v < self.v

    def __eq__(self, o: object) -> bool:
        return isinstance(o, _Rev) and o.v == self.v

    def __hash__(self) -> int:
        return hash(self.v)


# ---------------------------------------------------------------------------------------------------
# the engine (no HTTP)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Faults:
    """Knobs a test turns to make the server misbehave (all counters decrement as they fire)."""

    fail_status: int = 429
    fail_count: int = 0
    fail_path: str | None = None
    retry_after: str | None = None
    expire_after_pages: int | None = None  # free every PIT/scroll after this many context pages
    partial_count: int = 0
    timed_out_count: int = 0
    drop_count: int = 0
    drop_mode: str = "close"  # "close": no answer at all; "truncate": half the body, then close
    drop_path: str | None = None
    forbidden_paths: tuple[str, ...] = ()
    latency_s: float = 0.0  # added to every search/scroll page (stands in for a real cluster's query time)
    # field data on _id trips the fielddata breaker: "error" = 429 (all shards), "partial" = 200 with
    # shard 0 of every index failed
    id_sort_breaker: str | None = None
    pit_failed_shards: int = 0  # shards lost when a PIT is opened (refused unless partial PITs are allowed)
    unknown_params: tuple[str, ...] = ()  # parameters this server does not know (an older/compatible one)


class SearchEngine:
    """The data and the search semantics; the HTTP layer only routes to it."""

    def __init__(self, distribution: str, number: str, shards: int = 2) -> None:
        self.distribution = distribution
        self.number = number
        self.v = _vt(number)
        self.default_shards = shards
        self.indices: dict[str, Index] = {}
        self.pits: dict[str, PitContext] = {}
        self.scrolls: dict[str, ScrollContext] = {}
        self.lock = threading.RLock()
        self.faults = Faults()
        self.context_pages = 0
        self.breaker_trips = 0
        self._pit_seq = itertools.count(1)
        self._scroll_seq = itertools.count(1)
        self.max_result_window = 10_000
        # the cluster setting search.max_buckets (65,536 by default since Elasticsearch 7.x)
        self.max_buckets = 65_536
        # composite bucketings of recent requests: a client pages through one with ``after_key``, and
        # recomputing every bucket of the whole result for each page made paging quadratic here
        # (documents are append-only, so the same sources over the same live documents give the same map)
        self._composite_cache: dict[tuple[Any, ...], tuple[dict[tuple[Any, ...], list[Ref]], list[tuple[Any, ...]]]] = {}
        self._composite_lock = threading.Lock()

    # -- features by version -----------------------------------------------------------------
    @property
    def is_os(self) -> bool:
        return self.distribution == "opensearch"

    def has_es_pit(self) -> bool:
        return not self.is_os and self.v >= (7, 10, 0)

    def has_os_pit(self) -> bool:
        return self.is_os and self.v >= (2, 4, 0)

    def has_shard_doc(self) -> bool:
        return self.v >= (3, 3, 0) if self.is_os else self.v >= (7, 12, 0)

    def has_sliced_pit(self) -> bool:
        return True if self.is_os else self.v >= (7, 15, 0)

    def id_sort_allowed(self) -> bool:
        return self.is_os or self.v < (8, 0, 0)

    def pit_params(self) -> set[str]:
        """Query parameters the open-PIT endpoint accepts (any other is a 400, as on the real servers)."""
        common = {"keep_alive", "preference", "routing", "expand_wildcards", "ignore_unavailable",
                  "allow_no_indices"}
        if self.is_os:
            return common | {"allow_partial_pit_creation"}  # since PIT itself (2.4), default true
        return common | ({"allow_partial_search_results"} if self.v >= (8, 16, 0) else set())

    def check_params(self, uri_path: str, params: dict[str, str], allowed: set[str]) -> None:
        for name in params:
            if name not in allowed or name in self.faults.unknown_params:
                raise es_error(400, "illegal_argument_exception",
                               f"request [{uri_path}] contains unrecognized parameter: [{name}]")

    def pit_shard_failures(self, index_expr: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """The shards a new PIT misses (fault knob); raises when partial PITs are not allowed."""
        n = self.faults.pit_failed_shards
        if not n:
            return []
        if self.is_os:
            allowed = params.get("allow_partial_pit_creation", "true") != "false"
        else:
            allowed = params.get("allow_partial_search_results", "false") == "true"
        names = [i.name for i in self.resolve(index_expr)] or [index_expr]
        cause = {"type": "no_shard_available_action_exception",
                 "reason": "[es-node-2][10.0.0.12:9300][indices:data/read/open_reader_context]"}
        failures = [{"shard": k, "index": names[k % len(names)], "node": "n2Kq9", "reason": cause}
                    for k in range(n)]
        if not allowed:
            raise EsHttpError(503, {"error": {
                "root_cause": [cause], "type": "search_phase_execution_exception", "reason": "Partial shards failure",
                "phase": "query", "grouped": True, "failed_shards": failures}, "status": 503})
        return failures

    # -- indices -----------------------------------------------------------------------------
    def create_index(self, name: str, body: dict[str, Any] | None = None) -> Index:
        with self.lock:
            if name in self.indices:
                raise es_error(400, "resource_already_exists_exception", f"index [{name}/{self.indices[name].uuid}] "
                               "already exists", index=name, index_uuid=self.indices[name].uuid)
            body = body or {}
            settings = body.get("settings") or {}
            sidx = settings.get("index", settings) if isinstance(settings, dict) else {}
            mrw = int(sidx.get("max_result_window", settings.get("index.max_result_window", self.max_result_window)))
            shards = int(sidx.get("number_of_shards", self.default_shards))
            idx = Index(name, shards=shards, max_result_window=mrw)
            props = (body.get("mappings") or {}).get("properties") or {}
            idx.put_mapping(props)
            self.indices[name] = idx
            return idx

    def index_for_write(self, name: str) -> Index:
        with self.lock:
            return self.indices.get(name) or self.create_index(name)

    def resolve(self, expr: str, *, allow_missing: bool = False) -> list[Index]:
        out: list[Index] = []
        for part in [p for p in expr.split(",") if p]:
            if part in ("_all", "*"):
                out.extend(self.indices[n] for n in sorted(self.indices))
                continue
            if any(c in part for c in "*?"):
                out.extend(self.indices[n] for n in sorted(self.indices) if fnmatch.fnmatchcase(n, part))
                continue
            idx = self.indices.get(part)
            if idx is None:
                if allow_missing:
                    continue
                raise es_error(404, "index_not_found_exception", f"no such index [{part}]",
                               **{"resource.type": "index_or_alias", "resource.id": part, "index_uuid": "_na_",
                                  "index": part})
            out.append(idx)
        seen: set[str] = set()
        return [i for i in out if not (i.name in seen or seen.add(i.name))]

    # -- PIT ---------------------------------------------------------------------------------
    def open_pit(self, index_expr: str, keep_alive: str | None) -> PitContext:
        if not keep_alive:
            raise es_error(400, "action_request_validation_exception",
                           "Validation Failed: 1: [keep_alive] is not specified;")
        ka = parse_time_value(keep_alive)
        indices = self.resolve(index_expr)
        seq = next(self._pit_seq)
        rng = random.Random(seq * 7919)
        refs: list[Ref] = []
        shard_doc: dict[tuple[int, int], int] = {}
        ordinal = 0
        for idx in indices:
            positions = idx.live_positions()
            by_shard: dict[int, list[int]] = {}
            for p in positions:
                by_shard.setdefault(idx.shard_of(p), []).append(p)
            for sh in range(idx.shards):
                ps = by_shard.get(sh, [])
                rng.shuffle(ps)  # a new Lucene doc order in every PIT (segments merge between PITs)
                # Elasticsearch: the shard's position among all shards of the PIT (ShardDocSortField's
                # shardRequestIndex, unique across indices); OpenSearch 3.3+: the shard's number inside
                # its own index (ShardDocSortBuilder: context.getShardId()), so indices collide.
                prefix = sh if self.is_os else ordinal
                for lucene, p in enumerate(ps):
                    shard_doc[(id(idx), p)] = (prefix << 32) | lucene
                    refs.append((idx, p))
                ordinal += 1
        base = base64.urlsafe_b64encode(f"pit-{seq}-{time.time_ns()}".encode()).decode().rstrip("=")
        ctx = PitContext(base, refs, shard_doc, time.monotonic() + ka, ka, [i.name for i in indices])
        with self.lock:
            self.pits[base] = ctx
        return ctx

    def pit_id_for(self, ctx: PitContext) -> str:
        """Elasticsearch may hand out a new id with every answer; any id of the PIT stays valid."""
        if self.is_os:
            return ctx.base
        ctx.counter += 1
        return f"{ctx.base}.{ctx.counter}"

    def find_pit(self, pit_id: str) -> PitContext:
        base = pit_id.split(".", 1)[0]
        with self.lock:
            ctx = self.pits.get(base)
            if ctx is not None and time.monotonic() > ctx.expires_at:
                del self.pits[base]
                ctx = None
        if ctx is None:
            raise self._context_missing(pit_id)
        return ctx

    def close_pits(self, ids: Iterable[str]) -> list[tuple[str, bool]]:
        out = []
        with self.lock:
            for pit_id in ids:
                out.append((pit_id, self.pits.pop(pit_id.split(".", 1)[0], None) is not None))
        return out

    def _context_missing(self, ident: str) -> EsHttpError:
        reason = f"No search context found for id [{abs(hash(ident)) % 100000}]"
        cause = {"type": "search_context_missing_exception", "reason": reason}
        return EsHttpError(404, {"error": {
            "root_cause": [cause], "type": "search_phase_execution_exception", "reason": "all shards failed",
            "phase": "query", "grouped": True,
            "failed_shards": [{"shard": -1, "index": None, "reason": cause}], "caused_by": cause,
        }, "status": 404})

    def expire_all_contexts(self) -> None:
        with self.lock:
            self.pits.clear()
            self.scrolls.clear()

    def _count_context_page(self) -> None:
        with self.lock:
            self.context_pages += 1
            n = self.faults.expire_after_pages
            if n is not None and self.context_pages >= n:
                self.pits.clear()
                self.scrolls.clear()
                self.context_pages = 0

    # -- search ------------------------------------------------------------------------------
    def _sort_spec(self, sort: Any) -> list[tuple[str, str, dict[str, Any]]]:
        if sort is None:
            return []
        items = sort if isinstance(sort, list) else [sort]
        out = []
        for it in items:
            if isinstance(it, str):
                out.append((it, "desc" if it == "_score" else "asc", {}))
            elif isinstance(it, dict):
                (fld, spec), = it.items()
                if isinstance(spec, str):
                    out.append((fld, spec, {}))
                else:
                    out.append((fld, spec.get("order", "desc" if fld == "_score" else "asc"), spec))
        return out

    def _sort_value(self, fld: str, order: str, opts: dict[str, Any], ref: Ref, pit: PitContext | None,
                    global_doc: int) -> Any:
        idx, pos = ref
        if fld == "_shard_doc":
            assert pit is not None
            return pit.shard_doc[(id(idx), pos)]
        if fld == "_doc":
            return global_doc
        if fld == "_id":
            return idx.ids[pos]
        if fld == "_index":
            return idx.name
        if fld == "_score":
            return 1.0
        vals = idx.values(fld, pos)
        if not vals:
            return None
        v = min(vals) if order == "asc" else max(vals)
        if opts.get("numeric_type") == "date_nanos" and idx.ftype(fld) == "date":
            v = v * 1_000_000
        return v

    def _validate_sort(self, spec: list[tuple[str, str, dict[str, Any]]], indices: list[Index],
                       pit: PitContext | None, index_name: str) -> None:
        for fld, _order, opts in spec:
            if fld == "_shard_doc":
                if pit is None:
                    raise es_error(400, "action_request_validation_exception",
                                   "Validation Failed: 1: [_shard_doc] sort field cannot be used without [point in "
                                   "time];")
                if not self.has_shard_doc():
                    raise shard_error(400, "query_shard_exception",
                                      "No mapping found for [_shard_doc] in order to sort on", index_name)
            elif fld == "_id":
                if not self.id_sort_allowed():
                    raise shard_error(400, "illegal_argument_exception",
                                      "Fielddata access on the _id field is disallowed, you can re-enable it by "
                                      "updating the dynamic cluster setting: indices.id_field_data.enabled",
                                      index_name)
            elif fld in ("_doc", "_score", "_index"):  # _index: a constant keyword per index, sortable
                continue
            else:
                types = {i.ftype(fld) for i in indices} - {None}
                if not types and "unmapped_type" not in opts and indices:
                    raise shard_error(400, "query_shard_exception",
                                      f"No mapping found for [{fld}] in order to sort on", index_name)
                if "text" in types:
                    raise shard_error(400, "illegal_argument_exception", _fielddata_msg(fld), index_name)

    def search(self, path_index: str | None, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        """``_search`` (also the first scroll request). Returns the response object."""
        t0 = time.perf_counter()
        body = body or {}
        pit_spec = body.get("pit")
        pit: PitContext | None = None
        scroll = params.get("scroll")
        if pit_spec is not None:
            if path_index:
                raise es_error(400, "action_request_validation_exception",
                               "Validation Failed: 1: [indices] cannot be used with point in time. Do not specify "
                               "any index with point in time.;")
            if scroll:
                raise es_error(400, "action_request_validation_exception",
                               "Validation Failed: 1: using [point in time] is not allowed in a scroll context;")
            pit = self.find_pit(str(pit_spec.get("id")))
            if pit_spec.get("keep_alive"):
                pit.expires_at = time.monotonic() + parse_time_value(str(pit_spec["keep_alive"]))
            refs = pit.refs
            indices = [self.indices[n] for n in pit.indices if n in self.indices]
        else:
            indices = self.resolve(path_index or "_all")
            refs = [(i, p) for i in indices for p in i.live_positions()]
        index_name = indices[0].name if indices else (path_index or "_all")
        size = int(params.get("size", body.get("size", 10)))
        from_ = int(params.get("from", body.get("from", 0)))
        window = min((i.max_result_window for i in indices), default=self.max_result_window)
        search_after = body.get("search_after")
        if scroll:
            if size > window:
                raise shard_error(400, "illegal_argument_exception",
                                  f"Batch size is too large, size must be less than or equal to: [{window}] but was "
                                  f"[{size}]. Scroll batch sizes cost as much memory as result windows so they are "
                                  "controlled by the [index.max_result_window] index level setting.", index_name)
        elif from_ + size > window:
            raise shard_error(400, "illegal_argument_exception",
                              f"Result window is too large, from + size must be less than or equal to: [{window}] "
                              f"but was [{from_ + size}]. See the scroll api for a more efficient way to request "
                              "large data sets. This limit can be set by changing the [index.max_result_window] index "
                              "level setting.", index_name)
        if search_after is not None and from_ not in (0, -1):
            raise es_error(400, "action_request_validation_exception",
                           "Validation Failed: 1: `from` parameter must be set to 0 when `search_after` is used.;")
        slice_spec = body.get("slice")
        if slice_spec is not None:
            if pit is None and not scroll:
                raise es_error(400, "action_request_validation_exception",
                               "Validation Failed: 1: [slice] can only be used with [scroll] or [point-in-time] "
                               "requests;")
            if pit is not None and not self.has_sliced_pit():
                raise es_error(400, "action_request_validation_exception",
                               "Validation Failed: 1: [slice] can only be used with [scroll] requests;")
            mx, sid = int(slice_spec.get("max", 0)), int(slice_spec.get("id", -1))
            if mx <= 1 or not 0 <= sid < mx:
                raise es_error(400, "illegal_argument_exception",
                               f"max must be greater than 1 and id must be in [0, max), got id={sid} max={mx}")
        spec = self._sort_spec(body.get("sort"))
        if pit is not None and self.has_shard_doc() and not self.is_os and spec and \
                not any(f == "_shard_doc" for f, _, _ in spec):
            spec = [*spec, ("_shard_doc", "asc", {})]  # implicit tiebreaker (ES 7.12+)
        self._validate_sort(spec, indices, pit, index_name)
        breaker = self.faults.id_sort_breaker if any(f == "_id" for f, _, _ in spec) else None
        if breaker:
            with self.lock:
                self.breaker_trips += 1
            if breaker == "error":
                raise EsHttpError(429, {"error": {
                    "root_cause": [_fielddata_breaker()], "type": "search_phase_execution_exception",
                    "reason": "all shards failed", "phase": "query", "grouped": True,
                    "failed_shards": [{"shard": 0, "index": i.name, "node": "n1Xy2Qs5TdaBqoP8vW4hzA",
                                       "reason": _fielddata_breaker()} for i in indices],
                    "caused_by": _fielddata_breaker()}, "status": 429})
        base_key = json.dumps([body.get("query"), body.get("sort")], sort_keys=True, default=str)
        key = json.dumps([base_key, slice_spec], sort_keys=True, default=str)
        cached = pit.cache.get(key) if pit is not None else None
        if cached is None:
            base = pit.cache.get(base_key) if pit is not None else None
            if base is None:
                pred = QueryCompiler(index_name).compile(body.get("query"))
                keyed = []
                for n, r in enumerate(refs):
                    if pred(*r):
                        vals = [self._sort_value(f, o, opt, r, pit, n) for f, o, opt in spec]
                        keyed.append((self._key(vals, spec), vals, r))
                if spec:
                    keyed.sort(key=lambda x: x[0])
                base = ([k for k, _, _ in keyed], [(v, r) for _, v, r in keyed])
                if pit is not None:
                    with self.lock:
                        if len(pit.cache) > 32:
                            pit.cache.clear()
                        pit.cache[base_key] = base  # type: ignore[assignment]
            keys, rows = base  # type: ignore[misc]
            if slice_spec is not None:
                sel = [i for i, (_v, r) in enumerate(rows) if self._in_slice(slice_spec, r, pit, scroll is not None)]
                keys, rows = [keys[i] for i in sel], [rows[i] for i in sel]
                if pit is not None:
                    with self.lock:
                        pit.cache[key] = (keys, rows)  # type: ignore[assignment]
        else:
            keys, rows = cached  # type: ignore[misc]
        start = 0
        if search_after is not None:
            if not isinstance(search_after, list) or len(search_after) != len(spec):
                raise es_error(400, "illegal_argument_exception",
                               f"search_after has {len(search_after) if isinstance(search_after, list) else 0} "
                               f"value(s) but sort has {len(spec)}.")
            sa = []
            for (f, _o, _opt), v in zip(spec, search_after, strict=True):
                if f == "_shard_doc" and not isinstance(v, int):
                    try:
                        v = int(v)
                    except (TypeError, ValueError):
                        raise es_error(400, "illegal_argument_exception",
                                       f"Failed to parse search_after value for field [{f}].") from None
                sa.append(v)
            start = bisect.bisect_right(keys, self._key(sa, spec))
        elif from_ > 0:
            start = from_
        total = len(rows)
        if scroll:
            ka = parse_time_value(scroll)
            sid = base64.urlsafe_b64encode(f"scroll-{next(self._scroll_seq)}-{time.time_ns()}".encode()).decode()
            ctx = ScrollContext(list(rows), 0, size, time.monotonic() + ka, ka, body)
            with self.lock:
                self.scrolls[sid] = ctx
            return self._scroll_page(sid, ctx, total, spec, t0)
        page = rows[start:start + size] if size > 0 else []
        if breaker == "partial":  # shard 0 of every index failed; its hits are missing from the page
            page = [row for row in page if row[1][0].shard_of(row[1][1]) != 0]
        resp: dict[str, Any] = {"took": 0, "timed_out": False}
        if pit is not None:
            resp["pit_id"] = self.pit_id_for(pit)
            self._count_context_page()
        resp["_shards"] = {"total": sum(i.shards for i in indices), "successful": sum(i.shards for i in indices),
                           "skipped": 0, "failed": 0}
        if breaker == "partial":
            resp["_shards"].update(successful=resp["_shards"]["total"] - len(indices), failed=len(indices),
                                   failures=[{"shard": 0, "index": i.name, "node": "n1Xy2Qs5TdaBqoP8vW4hzA",
                                              "reason": _fielddata_breaker()} for i in indices])
        resp["hits"] = self._hits(page, spec, total, body.get("track_total_hits", 10_000), with_sort=bool(spec))
        if body.get("aggs") or body.get("aggregations"):
            aggs = body.get("aggs") or body.get("aggregations")
            pred = QueryCompiler(index_name).compile(body.get("query"))
            matched_refs = [r for r in refs if pred(*r)]
            resp["aggregations"] = self.aggregate(aggs, matched_refs, index_name)
        resp["took"] = int((time.perf_counter() - t0) * 1000)
        return resp

    @staticmethod
    def _key(vals: list[Any], spec: list[tuple[str, str, dict[str, Any]]]) -> tuple[Any, ...]:
        out = []
        for v, (_f, order, opts) in zip(vals, spec, strict=True):
            missing_first = opts.get("missing") == "_first"
            if v is None:
                out.append((0 if missing_first else 2, 0))
            elif order == "desc":
                out.append((1, -v if isinstance(v, int | float) else _Rev(v)))
            else:
                out.append((1, v))
        return tuple(out)

    def _in_slice(self, spec: dict[str, Any], ref: Ref, pit: PitContext | None, scroll: bool) -> bool:
        idx, pos = ref
        mx, sid = int(spec["max"]), int(spec["id"])
        fld = spec.get("field")
        if fld:
            vals = idx.values(fld, pos)
            if not vals:
                return sid == 0
            v = int(vals[0]) if isinstance(vals[0], int | float) else zlib.crc32(str(vals[0]).encode())
            return ((v * 0x9E3779B97F4A7C15) >> 17) % mx == sid
        if pit is not None and not self.is_os:
            # Elasticsearch slices a PIT by Lucene doc id (DocIdSliceQuery): not stable across PITs
            return (pit.shard_doc[(id(idx), pos)] & 0xFFFFFFFF) % mx == sid
        return zlib.crc32(idx.ids[pos].encode()) % mx == sid

    def _hits(self, page: list[tuple[list[Any], Ref]], spec: list[Any], total: int, track: Any,
              with_sort: bool) -> dict[str, Any]:
        # Built as bytes: documents are stored serialized, and re-encoding 5000 hits per page would make
        # this server, not the client under test, the bottleneck of the benchmark.
        score = b"null" if with_sort else b"1.0"
        parts = []
        for vals, (idx, pos) in page:
            item = b'{"_index":' + json.dumps(idx.name).encode() + b',"_id":' + json.dumps(idx.ids[pos]).encode() \
                + b',"_score":' + score + b',"_source":' + idx.raws[pos]
            if with_sort:
                item += b',"sort":' + json.dumps(vals).encode()
            parts.append(item + b"}")
        hits = _RawJson(b"[" + b",".join(parts) + b"]")
        out: dict[str, Any] = {}
        if track is not False:
            cap = None if track is True else int(track)  # absent = 10,000 (the default), true = exact
            if cap is not None and total > cap:
                out["total"] = {"value": cap, "relation": "gte"}
            else:
                out["total"] = {"value": total, "relation": "eq"}
        out["max_score"] = None if with_sort else (1.0 if parts else None)
        out["hits"] = hits
        return out

    def scroll_next(self, scroll_id: str, scroll: str | None) -> dict[str, Any]:
        with self.lock:
            ctx = self.scrolls.get(scroll_id)
            if ctx is not None and time.monotonic() > ctx.expires_at:
                del self.scrolls[scroll_id]
                ctx = None
        if ctx is None:
            raise self._context_missing(scroll_id)
        if scroll:
            ctx.keep_alive_s = parse_time_value(scroll)
        ctx.expires_at = time.monotonic() + ctx.keep_alive_s
        return self._scroll_page(scroll_id, ctx, len(ctx.hits), self._sort_spec(ctx.body.get("sort")),
                                 time.perf_counter())

    def _scroll_page(self, sid: str, ctx: ScrollContext, total: int, spec: list[Any], t0: float) -> dict[str, Any]:
        page = ctx.hits[ctx.position:ctx.position + ctx.size]
        ctx.position += len(page)
        self._count_context_page()
        return {"_scroll_id": sid, "took": int((time.perf_counter() - t0) * 1000), "timed_out": False,
                "_shards": {"total": 2, "successful": 2, "skipped": 0, "failed": 0},
                "hits": self._hits(page, spec, total, 10_000, with_sort=bool(spec))}

    def clear_scrolls(self, ids: list[str] | None) -> int:
        with self.lock:
            if ids is None:
                n = len(self.scrolls)
                self.scrolls.clear()
                return n
            return sum(1 for i in ids if self.scrolls.pop(i, None) is not None)

    def count(self, path_index: str | None, body: dict[str, Any]) -> dict[str, Any]:
        indices = self.resolve(path_index or "_all")
        name = indices[0].name if indices else "_all"
        pred = QueryCompiler(name).compile((body or {}).get("query"))
        n = sum(1 for i in indices for p in i.live_positions() if pred(i, p))
        shards = sum(i.shards for i in indices)
        return {"count": n, "_shards": {"total": shards, "successful": shards, "skipped": 0, "failed": 0}}

    # -- aggregations ------------------------------------------------------------------------
    def aggregate(self, aggs: dict[str, Any], refs: list[Ref], index_name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, spec in aggs.items():
            sub = spec.get("aggs") or spec.get("aggregations")
            kinds = [k for k in spec if k not in ("aggs", "aggregations", "meta")]
            (kind,) = kinds
            body = spec[kind]
            if kind == "composite":
                out[name] = self._composite(body, sub, refs, index_name)
            elif kind == "filter":
                pred = QueryCompiler(index_name).compile(body)
                sel = [r for r in refs if pred(*r)]
                res: dict[str, Any] = {"doc_count": len(sel)}
                if sub:
                    res.update(self.aggregate(sub, sel, index_name))
                out[name] = res
            else:
                out[name] = self._metric(kind, body, refs, index_name)
        return out

    def _numbers(self, fld: str, refs: list[Ref], index_name: str) -> list[float]:
        vals: list[float] = []
        for idx, pos in refs:
            t = idx.ftype(fld)
            if t == "text":
                raise shard_error(400, "illegal_argument_exception", _fielddata_msg(fld), index_name)
            for v in idx.values(fld, pos):
                if isinstance(v, int | float) and not isinstance(v, bool):
                    vals.append(float(v))
        return vals

    def _metric(self, kind: str, body: dict[str, Any], refs: list[Ref], index_name: str) -> dict[str, Any]:
        fld = body.get("field")
        vals = self._numbers(fld, refs, index_name) if fld else []
        if kind == "percentiles":
            percents = body.get("percents") or [1, 5, 25, 50, 75, 95, 99]
            vals.sort()
            values = {f"{float(p)}": _percentile(vals, float(p)) for p in percents}
            if body.get("keyed", True) is False:
                return {"values": [{"key": float(p), "value": _percentile(vals, float(p))} for p in percents]}
            return {"values": values}
        if kind == "value_count":
            return {"value": len(vals)}
        if kind == "avg":
            return {"value": sum(vals) / len(vals) if vals else None}
        if kind == "sum":
            return {"value": sum(vals)}
        if kind == "min":
            return {"value": min(vals) if vals else None}
        if kind == "max":
            return {"value": max(vals) if vals else None}
        raise es_error(400, "parsing_exception", f"Unknown aggregation type [{kind}]", line=1, col=1)

    def _composite(self, body: dict[str, Any], sub: dict[str, Any] | None, refs: list[Ref],
                   index_name: str) -> dict[str, Any]:
        sources = body.get("sources") or []
        if not sources:
            raise es_error(400, "illegal_argument_exception", "Composite [sources] cannot be null or empty")
        size = int(body.get("size", 10))
        if size > self.max_buckets:  # CompositeAggregator refuses a page larger than the bucket limit
            raise shard_error(400, "too_many_buckets_exception",
                              f"Trying to create too many buckets. Must be less than or equal to: [{self.max_buckets}] "
                              f"but was [{size}]. This limit can be set by changing the [search.max_buckets] cluster "
                              "level setting.", index_name, max_buckets=self.max_buckets)
        after = body.get("after")
        getters: list[tuple[str, Callable[[Index, int], list[Any]], bool]] = []
        for src in sources:
            (name, spec), = src.items()
            (kind, opts), = spec.items()
            fld = opts.get("field")
            missing_bucket = bool(opts.get("missing_bucket", False))
            if kind == "terms":
                getters.append((name, self._terms_getter(fld, index_name), missing_bucket))
            elif kind in ("date_histogram", "histogram"):
                getters.append((name, self._hist_getter(kind, fld, opts, index_name), missing_bucket))
            else:
                raise es_error(400, "parsing_exception", f"Unknown value source type [{kind}]", line=1, col=1)
        fields = [opts.get("field") for src in sources for spec in src.values() for opts in spec.values()]
        key = (json.dumps(sources, sort_keys=True, default=str),
               tuple(i.ftype(f) for i in {r[0] for r in refs} for f in fields), tuple(refs))
        with self._composite_lock:
            cached = self._composite_cache.get(key)
        if cached is None:
            buckets: dict[tuple[Any, ...], list[Ref]] = {}
            for ref in refs:
                combos: list[list[Any]] = [[]]
                for _name, get, missing_bucket in getters:
                    vals = get(*ref)
                    if not vals:
                        if not missing_bucket:
                            combos = []
                            break
                        vals = [None]
                    combos = [c + [v] for c in combos for v in sorted(set(vals), key=_sortable)]
                for c in combos:
                    buckets.setdefault(tuple(c), []).append(ref)
            ordered = sorted(buckets, key=lambda k: tuple(_sortable(v) for v in k))
            with self._composite_lock:
                while len(self._composite_cache) >= 8:
                    self._composite_cache.pop(next(iter(self._composite_cache)))
                self._composite_cache[key] = (buckets, ordered)
        else:
            buckets, ordered = cached
        if after is not None:
            after_t = tuple(after.get(name) for name, _, _ in getters)
            ak = tuple(_sortable(v) for v in after_t)
            ordered = [k for k in ordered if tuple(_sortable(v) for v in k) > ak]
        page = ordered[:size]
        out_buckets = []
        for k in page:
            b: dict[str, Any] = {"key": {name: v for (name, _, _), v in zip(getters, k, strict=True)},
                                 "doc_count": len(buckets[k])}
            if sub:
                b.update(self.aggregate(sub, buckets[k], index_name))
            out_buckets.append(b)
        res: dict[str, Any] = {}
        if out_buckets:
            res["after_key"] = dict(out_buckets[-1]["key"])
        res["buckets"] = out_buckets
        return res

    def _terms_getter(self, fld: str, index_name: str) -> Callable[[Index, int], list[Any]]:
        def get(idx: Index, pos: int) -> list[Any]:
            if idx.ftype(fld) == "text":
                raise shard_error(400, "illegal_argument_exception", _fielddata_msg(fld), index_name)
            return idx.values(fld, pos)

        return get

    def _hist_getter(self, kind: str, fld: str, opts: dict[str, Any], index_name: str
                     ) -> Callable[[Index, int], list[Any]]:
        if kind == "histogram":
            step = float(opts["interval"])

            def hget(idx: Index, pos: int) -> list[Any]:
                return [(v // step) * step for v in idx.values(fld, pos) if isinstance(v, int | float)]

            return hget
        interval = opts.get("fixed_interval") or opts.get("calendar_interval") or opts.get("interval")
        if interval is None:
            raise es_error(400, "illegal_argument_exception", "Invalid interval specified, must be non-null and "
                           "non-empty")
        cal = {"minute": "1m", "hour": "1h", "day": "1d", "week": "7d", "1w": "7d"}
        iv = cal.get(str(interval), str(interval))
        if iv.endswith(("M", "q", "y")) or iv in ("month", "quarter", "year"):
            raise es_error(400, "illegal_argument_exception", f"calendar interval [{interval}] is not supported by "
                           "this test server")
        step_ms = int(parse_time_value(iv) * 1000)

        def dget(idx: Index, pos: int) -> list[Any]:
            t = idx.ftype(fld)
            vals = idx.values(fld, pos)
            if t == "date_nanos":
                vals = [v // 1_000_000 for v in vals]
            return [(v // step_ms) * step_ms for v in vals if isinstance(v, int)]

        return dget

    # -- bulk --------------------------------------------------------------------------------
    def bulk(self, path_index: str | None, data: bytes) -> dict[str, Any]:
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        items = []
        errors = False
        i = 0
        t0 = time.perf_counter()
        while i < len(lines):
            try:
                action = json.loads(lines[i])
            except ValueError as exc:
                raise es_error(400, "illegal_argument_exception", f"Malformed action/metadata line [{i + 1}], "
                               f"expected START_OBJECT or END_OBJECT but found [{exc}]") from None
            (op, meta), = action.items()
            name = meta.get("_index") or path_index
            doc_id = meta.get("_id")
            if op == "delete":
                idx = self.indices.get(name)
                ok = idx.delete(str(doc_id)) if idx else False
                items.append({op: {"_index": name, "_id": doc_id, "result": "deleted" if ok else "not_found",
                                   "status": 200 if ok else 404}})
                i += 1
                continue
            raw = lines[i + 1]
            i += 2
            try:
                src = json.loads(raw)
            except ValueError as exc:
                errors = True
                items.append({op: {"_index": name, "_id": doc_id, "status": 400, "error": {
                    "type": "document_parsing_exception", "reason": f"[1:1] failed to parse: {exc}"}}})
                continue
            idx = self.index_for_write(name)
            if doc_id is None:
                doc_id = base64.urlsafe_b64encode(random.randbytes(15)).decode()
            doc_id = str(doc_id)
            if op == "create" and doc_id in idx.by_id:
                errors = True
                items.append({op: {"_index": name, "_id": doc_id, "status": 409, "error": {
                    "type": "version_conflict_engine_exception",
                    "reason": f"[{doc_id}]: version conflict, document already exists (current version [1])"}}})
                continue
            result = idx.add(doc_id, src, raw.strip())
            items.append({op: {"_index": name, "_id": doc_id, "_version": 1, "result": result,
                               "_shards": {"total": 1, "successful": 1, "failed": 0}, "_seq_no": len(idx.ids) - 1,
                               "_primary_term": 1, "status": 201 if result == "created" else 200}})
        return {"took": int((time.perf_counter() - t0) * 1000), "errors": errors, "items": items}

    # -- root --------------------------------------------------------------------------------
    def root(self) -> dict[str, Any]:
        if self.is_os:
            version: dict[str, Any] = {"distribution": "opensearch", "number": self.number, "build_type": "tar",
                       "build_hash": "8a3d2b6c1f0e9d7c5b4a3f2e1d0c9b8a7f6e5d4c", "build_date": "2024-10-10T12:00:00Z",
                       "build_snapshot": False, "lucene_version": "9.11.1",
                       "minimum_wire_compatibility_version": "7.10.0",
                       "minimum_index_compatibility_version": "7.0.0"}
            return {"name": "opensearch-node1", "cluster_name": "meshlens-test", "cluster_uuid": "Hk2nB3s0RzqW0c8VvXn1oQ",
                    "version": version, "tagline": "The OpenSearch Project: https://opensearch.org/"}
        version = {"number": self.number, "build_flavor": "default", "build_type": "docker",
                   "build_hash": "f8edfccba429b6477927a7c1ce1bc6729521305e", "build_date": "2024-10-09T22:08:00.328917561Z",
                   "build_snapshot": False, "lucene_version": "9.11.1",
                   "minimum_wire_compatibility_version": "7.17.0", "minimum_index_compatibility_version": "7.0.0"}
        return {"name": "es-node-1", "cluster_name": "meshlens-test", "cluster_uuid": "Qx8vDPFtSEuMHVvXl3JbQw",
                "version": version, "tagline": "You Know, for Search"}

    def cat_indices(self, expr: str, params: dict[str, str]) -> Any:
        """``_cat/indices`` (``format=json``: a list of string-valued rows; ``h`` picks the columns)."""
        rows = []
        for idx in self.resolve(expr, allow_missing=True):
            live = len(idx.live_positions())
            rows.append({"health": "green", "status": "open", "index": idx.name, "uuid": idx.uuid,
                         "pri": str(idx.shards), "rep": "0", "docs.count": str(live), "docs.deleted": "0",
                         "store.size": f"{live}kb", "pri.store.size": f"{live}kb"})
        if params.get("h"):
            cols = params["h"].split(",")
            rows = [{c: r.get(c) for c in cols} for r in rows]
        if params.get("format") == "json":
            return rows
        return "".join(" ".join(str(v) for v in r.values()) + "\n" for r in rows)

    def health(self) -> dict[str, Any]:
        shards = sum(i.shards for i in self.indices.values())
        return {"cluster_name": "meshlens-test", "status": "green", "timed_out": False, "number_of_nodes": 1,
                "number_of_data_nodes": 1, "active_primary_shards": shards, "active_shards": shards,
                "relocating_shards": 0, "initializing_shards": 0, "unassigned_shards": 0,
                "delayed_unassigned_shards": 0, "number_of_pending_tasks": 0, "number_of_in_flight_fetch": 0,
                "task_max_waiting_in_queue_millis": 0, "active_shards_percent_as_number": 100.0}


def _fielddata_breaker() -> dict[str, Any]:
    """``CircuitBreakingException`` as rendered in an error body (the fielddata breaker is PERMANENT)."""
    return {"type": "circuit_breaking_exception",
            "reason": "[fielddata] Data too large, data for [_id] would be [3221225472/3gb], which is larger than "
                      "the limit of [3006477107/2.7gb]",
            "bytes_wanted": 3221225472, "bytes_limit": 3006477107, "durability": "PERMANENT"}


def _fielddata_msg(fld: str) -> str:
    return (f"Text fields are not optimised for operations that require per-document field data like aggregations "
            f"and sorting, so these operations are disabled by default. Please use a keyword field instead. "
            f"Alternatively, set fielddata=true on [{fld}] in order to load field data by uninverting the inverted "
            "index. Note that this can use significant memory.")


def _sortable(v: Any) -> tuple[int, Any]:
    if v is None:
        return (0, 0)
    if isinstance(v, int | float):
        return (1, v)
    return (2, str(v))


def _percentile(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    rank = p / 100 * (len(sorted_vals) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (rank - lo)


class _RawJson:
    """A pre-serialized JSON value spliced into a response without re-encoding (document sources)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


def encode(obj: Any) -> bytes:
    """JSON-encode a response, splicing :class:`_RawJson` values in as they are."""
    parts: list[bytes] = []
    raws: list[bytes] = []

    def default(o: Any) -> Any:
        if isinstance(o, _RawJson):
            raws.append(o.raw)
            return f"\x00RAW{len(raws) - 1}\x00"
        raise TypeError(type(o).__name__)

    text = json.dumps(obj, default=default, separators=(",", ":"), ensure_ascii=False).encode()
    if not raws:
        return text
    pos = 0
    for m in re.finditer(rb'"\\u0000RAW(\d+)\\u0000"', text):
        parts.append(text[pos:m.start()])
        parts.append(raws[int(m.group(1))])
        pos = m.end()
    parts.append(text[pos:])
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------
@dataclass
class Auth:
    """Accepted credentials; requests without a valid one get 401."""

    users: dict[str, str] = field(default_factory=dict)
    api_keys: set[str] = field(default_factory=set)
    bearer_tokens: set[str] = field(default_factory=set)

    def check(self, header: str | None) -> tuple[bool, str | None]:
        if not header:
            return False, None
        scheme, _, cred = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                user, _, pw = base64.b64decode(cred).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False, None
            return self.users.get(user) == pw and user in self.users, user
        if scheme == "apikey":
            return cred in self.api_keys, None
        if scheme == "bearer":
            return cred in self.bearer_tokens, None
        return False, None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self, method: str) -> None:
        owner = self.server.owner
        raw = self._read_body()
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        owner._log(method, self.path, raw, self.headers)
        try:
            status, body, headers = owner.dispatch(method, path, params, raw, self.headers, self.path)
        except EsHttpError as exc:
            status, body, headers = exc.status, exc.body, exc.headers
        except _Drop as drop:
            self._drop(drop.mode, drop.payload)
            return
        except Exception as exc:  # noqa: BLE001 - a test server bug must show up as a 500 body
            status, body, headers = 500, {"error": {"root_cause": [{"type": "exception", "reason": repr(exc)}],
                                                    "type": "exception", "reason": repr(exc)}, "status": 500}, {}
        self._send(method, status, body, headers)

    def _send(self, method: str, status: int, body: Any, headers: dict[str, str]) -> None:
        owner = self.server.owner
        if isinstance(body, bytes | str):
            data = body.encode() if isinstance(body, str) else body
            ctype = "text/plain; charset=UTF-8"
        else:
            data = encode(body)
            ctype = "application/json; charset=UTF-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if owner.engine.distribution == "elasticsearch" and owner.engine.v >= (7, 14, 0):
            self.send_header("X-Elastic-Product", "Elasticsearch")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _drop(self, mode: str, payload: bytes) -> None:
        if mode == "truncate":
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: max(1, len(payload) // 2)])
            self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class _Drop(Exception):
    def __init__(self, mode: str, payload: bytes = b"") -> None:
        super().__init__(mode)
        self.mode = mode
        self.payload = payload


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: EsTestServer


@dataclass
class LoggedRequest:
    method: str
    path: str
    body: Any
    headers: dict[str, str]


class EsTestServer:
    """The server: ``with EsTestServer("es8") as srv: srv.url ...``.

    Args:
        flavor: a key of :data:`FLAVORS` (``es7.10``, ``es8``, ``es9``, ``os2``, ``os3``...).
        auth: accepted credentials (None = security disabled).
        shards: default number of shards per index.
    """

    def __init__(self, flavor: str = "es8", *, auth: Auth | None = None, shards: int = 2,
                 host: str = "127.0.0.1", port: int = 0, ssl_context: Any = None) -> None:
        distribution, number = FLAVORS[flavor]
        self.flavor = flavor
        self.engine = SearchEngine(distribution, number, shards=shards)
        self.auth = auth
        self.requests: list[LoggedRequest] = []
        self.log_requests = True
        self._lock = threading.Lock()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self.tls = ssl_context is not None
        if ssl_context is not None:  # HTTPS only, like a secured cluster: plain HTTP gets no answer
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    @property
    def faults(self) -> Faults:
        return self.engine.faults

    def start(self) -> EsTestServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="es-test-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> EsTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- data helpers ------------------------------------------------------------------------
    def create_index(self, name: str, *, mappings: dict[str, Any] | None = None,
                     max_result_window: int | None = None, shards: int | None = None) -> Index:
        settings: dict[str, Any] = {}
        if max_result_window is not None:
            settings["max_result_window"] = max_result_window
        if shards is not None:
            settings["number_of_shards"] = shards
        return self.engine.create_index(name, {"mappings": {"properties": mappings or {}},
                                               "settings": {"index": settings}})

    def add_docs(self, index: str, docs: Iterable[tuple[str, dict[str, Any]]]) -> int:
        idx = self.engine.index_for_write(index)
        n = 0
        for doc_id, src in docs:
            idx.add(doc_id, src)
            n += 1
        return n

    def add_raw(self, index: str, doc_id: str, raw: bytes) -> None:
        """A document whose stored source is exactly these bytes (malformed-document tests)."""
        idx = self.engine.index_for_write(index)
        idx.add(doc_id, json.loads(raw), raw)

    def all_docs(self, index: str = "*") -> dict[str, dict[str, Any]]:
        out = {}
        for idx in self.engine.resolve(index, allow_missing=True):
            for p in idx.live_positions():
                out[f"{idx.name}/{idx.ids[p]}"] = json.loads(idx.raws[p])
        return out

    # -- request handling --------------------------------------------------------------------
    def _log(self, method: str, path: str, raw: bytes, headers: Any) -> None:
        if not self.log_requests:
            return
        try:
            body: Any = json.loads(raw) if raw and not path.split("?")[0].endswith("_bulk") else None
        except ValueError:
            body = raw[:200]
        with self._lock:
            self.requests.append(LoggedRequest(method, path, body, {k: v for k, v in headers.items()}))

    def _fault(self, path: str) -> tuple[int, Any, dict[str, str]] | None:
        f = self.engine.faults
        with self._lock:
            if f.drop_count and (f.drop_path is None or f.drop_path in path):
                f.drop_count -= 1
                raise _Drop(f.drop_mode, b'{"took":1,"timed_out":false,"hits":{"hits":[{"_index":"x","_id":"1"}]}}'
                            * 20)
            if f.fail_count and (f.fail_path is None or f.fail_path in path):
                f.fail_count -= 1
                headers = {"Retry-After": f.retry_after} if f.retry_after else {}
                return (*_status_error(f.fail_status), headers)
        return None

    def dispatch(self, method: str, path: str, params: dict[str, str], raw: bytes, headers: Any,
                 uri: str) -> tuple[int, Any, dict[str, str]]:
        eng = self.engine
        if self.auth is not None:
            ok, user = self.auth.check(headers.get("Authorization"))
            if not ok:
                return self._unauthorized(headers.get("Authorization"), user, path)
        for prefix in eng.faults.forbidden_paths:
            if path.startswith(prefix):
                return self._forbidden(method, path)
        fault = self._fault(path)
        if fault is not None:
            return fault
        if eng.faults.latency_s and "_search" in path and method in ("GET", "POST"):
            time.sleep(eng.faults.latency_s)
        try:
            body = json.loads(raw) if raw and not path.endswith("_bulk") else {}
        except ValueError as exc:
            raise es_error(400, "x_content_parse_exception" if not eng.is_os else "parse_exception",
                           f"[1:1] Unexpected character: {exc}") from None
        segs = [s for s in path.split("/") if s]
        # root & cluster
        if not segs:
            if method in ("GET", "HEAD"):
                return 200, eng.root(), {}
            raise no_handler(method, uri)
        if segs == ["_cluster", "health"]:
            return 200, eng.health(), {}
        if segs[:2] == ["_cat", "indices"] and method == "GET":
            return 200, eng.cat_indices(segs[2] if len(segs) > 2 else "*", params), {}
        if segs[-1] == "_bulk" and method in ("POST", "PUT"):
            return 200, eng.bulk(segs[0] if len(segs) == 2 else None, raw), {}
        # scroll
        if segs[:2] == ["_search", "scroll"]:
            if method == "DELETE":
                ids = None if segs[2:] == ["_all"] else (
                    segs[2:] or ([body["scroll_id"]] if isinstance(body.get("scroll_id"), str)
                                 else list(body.get("scroll_id") or [])))
                n = eng.clear_scrolls(ids)
                return (200 if n or ids is None else 404), {"succeeded": True, "num_freed": n}, {}
            sid = (segs[2] if len(segs) > 2 else None) or body.get("scroll_id") or params.get("scroll_id")
            return 200, self._maybe_partial(eng.scroll_next(str(sid), body.get("scroll") or params.get("scroll")),
                                            path), {}
        # PIT, OpenSearch dialect
        if segs[:2] == ["_search", "point_in_time"]:
            if not eng.has_os_pit():
                raise no_handler(method, uri)
            if segs[2:] == ["_all"]:
                if method == "GET":
                    return 200, {"pits": [{"pit_id": k, "creation_time": 0, "keep_alive": int(c.keep_alive_s * 1000)}
                                          for k, c in eng.pits.items()]}, {}
                res = eng.close_pits(list(eng.pits))
                return 200, {"pits": [{"pit_id": i, "successful": ok} for i, ok in res]}, {}
            if method == "DELETE":
                ids = body.get("pit_id")
                ids = [ids] if isinstance(ids, str) else list(ids or [])
                res = eng.close_pits(ids)
                if not any(ok for _, ok in res):
                    raise eng._context_missing(ids[0] if ids else "")
                return 200, {"pits": [{"pit_id": i, "successful": ok} for i, ok in res]}, {}
            raise no_handler(method, uri)
        if len(segs) == 3 and segs[1:] == ["_search", "point_in_time"] and method == "POST":
            if not eng.has_os_pit():
                raise no_handler(method, uri)
            eng.check_params(path, params, eng.pit_params())
            failures = eng.pit_shard_failures(segs[0], params)
            ctx = eng.open_pit(segs[0], params.get("keep_alive"))
            n = sum(eng.indices[i].shards for i in ctx.indices)
            shards: dict[str, Any] = {"total": n, "successful": n - len(failures), "skipped": 0,
                                      "failed": len(failures)}
            if failures:
                shards["failures"] = failures
            return 200, {"pit_id": ctx.base, "_shards": shards, "creation_time": int(time.time() * 1000)}, {}
        # PIT, Elasticsearch dialect
        if segs == ["_pit"]:
            if not eng.has_es_pit() or method != "DELETE":
                raise no_handler(method, uri)
            res = eng.close_pits([str(body.get("id"))])
            ok = any(o for _, o in res)
            return (200 if ok else 404), {"succeeded": True, "num_freed": 1 if ok else 0}, {}
        if len(segs) == 2 and segs[1] == "_pit":
            if not eng.has_es_pit() or method != "POST":
                raise no_handler(method, uri)
            eng.check_params(path, params, eng.pit_params())
            failures = eng.pit_shard_failures(segs[0], params)
            ctx = eng.open_pit(segs[0], params.get("keep_alive"))
            out: dict[str, Any] = {"id": ctx.base}
            if eng.v >= (8, 0, 0):
                n = sum(eng.indices[i].shards for i in ctx.indices)
                out["_shards"] = {"total": n, "successful": n - len(failures), "skipped": 0, "failed": len(failures)}
                if failures:
                    out["_shards"]["failures"] = failures
            return 200, out, {}
        # search & count
        if segs[-1] == "_search" and len(segs) <= 2 and method in ("GET", "POST"):
            resp = eng.search(segs[0] if len(segs) == 2 else None, body, params)
            return 200, self._maybe_partial(resp, path), {}
        if segs[-1] == "_count" and len(segs) <= 2 and method in ("GET", "POST"):
            return 200, eng.count(segs[0] if len(segs) == 2 else None, body), {}
        # index admin
        if len(segs) == 2 and segs[1] == "_refresh":
            return 200, {"_shards": {"total": 2, "successful": 2, "failed": 0}}, {}
        if len(segs) == 1 and not segs[0].startswith("_"):
            if method == "PUT":
                eng.create_index(segs[0], body)
                return 200, {"acknowledged": True, "shards_acknowledged": True, "index": segs[0]}, {}
            if method == "DELETE":
                for idx in eng.resolve(segs[0]):
                    eng.indices.pop(idx.name, None)
                return 200, {"acknowledged": True}, {}
            if method in ("GET", "HEAD"):
                idxs = eng.resolve(segs[0])
                return 200, {i.name: {"mappings": {"properties": {f: {"type": t} for f, t in i.mapping.items()}},
                                      "settings": {"index": {"max_result_window": str(i.max_result_window)}}}
                             for i in idxs}, {}
        raise no_handler(method, uri)

    def _maybe_partial(self, resp: dict[str, Any], path: str) -> dict[str, Any]:
        """Partial answers: a failed shard (its hits missing) or timed_out, both with HTTP 200."""
        f = self.engine.faults
        with self._lock:
            partial = f.partial_count > 0
            if partial:
                f.partial_count -= 1
            timed_out = not partial and f.timed_out_count > 0
            if timed_out:
                f.timed_out_count -= 1
        if (partial or timed_out) and isinstance(resp["hits"]["hits"], _RawJson):
            resp["hits"]["hits"] = json.loads(resp["hits"]["hits"].raw)
        if partial:
            hits = resp["hits"]["hits"]
            keep = [h for i, h in enumerate(hits) if i % 2 == 1]
            resp["hits"]["hits"] = keep
            sh = resp["_shards"]
            sh["failed"] = 1
            sh["successful"] = max(0, sh["total"] - 1)
            sh["failures"] = [{"shard": 0, "index": hits[0]["_index"] if hits else "logs", "node": "n2Kq9",
                               "reason": {"type": "node_not_connected_exception",
                                          "reason": "[es-node-2][10.0.0.12:9300] Node not connected"}}]
        if timed_out:
            resp["timed_out"] = True
            resp["hits"]["hits"] = resp["hits"]["hits"][: len(resp["hits"]["hits"]) // 2]
        return resp

    def _unauthorized(self, header: str | None, user: str | None, path: str) -> tuple[int, Any, dict[str, str]]:
        if self.engine.is_os:
            return 401, "Unauthorized", {"WWW-Authenticate": 'Basic realm="OpenSearch Security"'}
        www = ['Basic realm="security" charset="UTF-8"', 'Bearer realm="security"', "ApiKey"]
        if header and user:
            reason = f"unable to authenticate user [{user}] for REST request [{path}]"
        elif header and header.lower().startswith("apikey"):
            reason = "unable to authenticate with provided credentials and anonymous access is not allowed for " \
                     "this request"
        else:
            reason = f"missing authentication credentials for REST request [{path}]"
        err = {"type": "security_exception", "reason": reason, "header": {"WWW-Authenticate": www}}
        return 401, {"error": {"root_cause": [err], **err}, "status": 401}, {"WWW-Authenticate": www[0]}

    def _forbidden(self, method: str, path: str) -> tuple[int, Any, dict[str, str]]:
        action = "cluster:monitor/main" if path == "/" else "indices:data/read/search"
        err = {"type": "security_exception",
               "reason": f"action [{action}] is unauthorized for user [reader] with effective roles [reader], this "
                         f"action is granted by the cluster privileges [monitor,manage,all]"}
        return 403, {"error": {"root_cause": [err], **err}, "status": 403}, {}


def _status_error(status: int) -> tuple[int, Any]:
    if status == 429:
        reason = ("rejected execution of org.elasticsearch.common.util.concurrent.TimedRunnable@6d2f1b43 on "
                  "QueueResizingEsThreadPoolExecutor[name = es-node-1/search, queue capacity = 1000, min queue "
                  "capacity = 1000, max queue capacity = 1000, frame size = 2000, targeted response rate = 1s, "
                  "task execution EWMA = 1.1ms, adjustment amount = 50, org.elasticsearch.common.util.concurrent."
                  "QueueResizingEsThreadPoolExecutor@1a2b3c4d[Running, pool size = 13, active threads = 13, queued "
                  "tasks = 1000, completed tasks = 8812345]]")
        return 429, es_error(429, "es_rejected_execution_exception", reason).body
    if status == 503:
        return 503, es_error(503, "cluster_block_exception",
                             "blocked by: [SERVICE_UNAVAILABLE/2/no master];").body
    if status == 504:
        return 504, "<html><body><h1>504 Gateway Time-out</h1></body></html>"
    if status == 502:
        return 502, "<html><body><h1>502 Bad Gateway</h1></body></html>"
    return status, es_error(status, "exception", f"simulated failure with status {status}").body


# ---------------------------------------------------------------------------------------------------
# test data
# ---------------------------------------------------------------------------------------------------
_SERVICES = [("productpage", "bookinfo"), ("reviews", "bookinfo"), ("ratings", "bookinfo"),
             ("details", "bookinfo"), ("frontend", "shop"), ("cart", "shop"), ("checkout", "shop")]
_PATHS = ["/productpage", "/reviews/0", "/ratings/0", "/details/0", "/api/v1/cart", "/api/v1/checkout", "/health"]


def istio_text_line(i: int, ts_ms: int, rng: random.Random) -> tuple[str, str, str]:
    """A realistic Istio default-format access line; returns (line, app, namespace)."""
    app, ns = _SERVICES[i % len(_SERVICES)]
    dst, dns = _SERVICES[(i * 3 + 1) % len(_SERVICES)]
    status = rng.choice([200] * 20 + [201, 404, 500, 503])
    flags = "-" if status < 500 else rng.choice(["UF,URX", "UH", "UC", "-"])
    dur = rng.randint(1, 900)
    ts = datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"
    rid = f"{i:08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-a{rng.getrandbits(12):03x}-" \
          f"{rng.getrandbits(48):012x}"
    path = _PATHS[i % len(_PATHS)]
    line = (f'[{ts}] "GET {path} HTTP/1.1" {status} {flags} via_upstream - "-" 0 {rng.randint(10, 5000)} {dur} '
            f'{max(0, dur - 2)} "-" "curl/8.5.0" "{rid}" "{dst}.{dns}.svc.cluster.local:9080" '
            f'"10.244.{i % 200}.{i % 250}:9080" outbound|9080||{dst}.{dns}.svc.cluster.local '
            f'10.244.1.{i % 250}:48{i % 1000:03d} 10.96.{i % 100}.{i % 200}:9080 10.244.1.{i % 250}:5{i % 10000:04d} - '
            "default")
    return line, app, ns


def fluentbit_doc(i: int, ts_ms: int, rng: random.Random) -> dict[str, Any]:
    """A Fluent Bit Kubernetes-filter record (raw line in ``log``, metadata under ``kubernetes``)."""
    line, app, ns = istio_text_line(i, ts_ms, rng)
    ts = datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"
    pod = f"{app}-v1-7d4b9c8f6-{(i % 7) * 11111:05d}"[:40]
    return {"@timestamp": ts, "log": line + "\n", "stream": "stdout", "time": ts,
            "kubernetes": {"pod_name": pod, "namespace_name": ns, "container_name": "istio-proxy",
                           "host": f"node-{i % 3}", "labels": {"app": app, "version": "v1"},
                           "docker_id": f"{i:064x}"[-64:], "container_image": "docker.io/istio/proxyv2:1.22.1"}}


def filebeat_doc(i: int, ts_ms: int, rng: random.Random) -> dict[str, Any]:
    """A Filebeat container-input record with add_kubernetes_metadata (raw line in ``message``)."""
    line, app, ns = istio_text_line(i, ts_ms, rng)
    ts = datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"
    pod = f"{app}-v1-7d4b9c8f6-{(i % 7) * 11111:05d}"
    return {"@timestamp": ts, "message": line, "stream": "stdout", "input": {"type": "container"},
            "log": {"offset": i * 512, "file": {"path": f"/var/log/containers/{pod}_{ns}_istio-proxy-abc.log"}},
            "kubernetes": {"namespace": ns, "pod": {"name": pod, "uid": f"uid-{i % 7}"},
                           "container": {"name": "istio-proxy"}, "node": {"name": f"node-{i % 3}"},
                           "labels": {"app": app}, "deployment": {"name": f"{app}-v1"}},
            "ecs": {"version": "8.0.0"}, "agent": {"type": "filebeat", "version": "8.15.0"}}


def generate(n: int, *, start_ms: int = 1_717_200_000_000, step_ms: int = 1, seed: int = 7,
             layout: str = "fluentbit", same_ts_every: int = 1) -> Iterable[tuple[str, dict[str, Any]]]:
    """``n`` documents; ``same_ts_every`` consecutive documents share one millisecond timestamp."""
    rng = random.Random(seed)
    make = fluentbit_doc if layout == "fluentbit" else filebeat_doc
    for i in range(n):
        ts = start_ms + (i // same_ts_every) * step_ms
        yield f"doc-{i:08d}", make(i, ts, rng)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="es8", choices=sorted(FLAVORS))
    ap.add_argument("--generate", type=int, default=0, help="number of documents to load into --index")
    ap.add_argument("--index", default="logs-istio-000001")
    ap.add_argument("--layout", default="fluentbit", choices=["fluentbit", "filebeat"])
    ap.add_argument("--same-ts-every", type=int, default=1)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added to every search page")
    args = ap.parse_args(argv)
    srv = EsTestServer(args.flavor, shards=args.shards, port=args.port)
    srv.log_requests = False
    srv.faults.latency_s = args.latency_ms / 1000
    if args.generate:
        srv.create_index(args.index, mappings={"@timestamp": {"type": "date"}})
        srv.add_docs(args.index, generate(args.generate, layout=args.layout, same_ts_every=args.same_ts_every))
        idx = srv.engine.indices[args.index]
        for p in range(len(idx.raws)):  # warm the time column so the first page is not the slow one
            idx.values("@timestamp", p)
    import gc

    gc.freeze()  # millions of long-lived objects: the cyclic GC would rescan them on every page
    gc.disable()
    srv.start()
    print(json.dumps({"url": srv.url, "docs": args.generate}), flush=True)
    try:
        sys.stdin.read()
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
