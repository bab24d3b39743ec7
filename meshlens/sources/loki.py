"""Grafana Loki source: every line of a LogQL range into the store -- complete, fast and resumable.

Why it is built this way (see ``/work/shared/formats.md`` sections 5-6 for the Loki facts):

**Exact pagination.** ``query_range`` with ``direction=forward`` returns the ``limit`` oldest entries of
``[start, end)`` across all streams. logcli pages by restarting at the last page's timestamp and
skipping lines whose *text* equals one already printed at that timestamp -- which loses a line when two
streams log identical text in the same nanosecond, and aborts when one nanosecond holds more lines than a
page. Here an entry's identity is ``(canonical stream labels, ts_ns, line)`` (Loki itself drops an entry
identical in all three, ``unorderedHeadBlock.Append``), and for a full page whose newest timestamp is
``T``:

* every entry older than ``T`` is complete (forward order), so they are emitted and the cursor moves to
  ``T`` (inclusive start), remembering the keys already emitted at ``T`` to skip them next page;
* if the *whole* page is one nanosecond ``T``, that nanosecond is fetched on its own: with the largest
  limit the server allows, then split per stream (``/series``), then -- for a single stream with more
  lines in one nanosecond than a page, which happens when timestamps are parsed at second precision --
  partitioned by line prefix with ``|~ "^prefix[class]"`` filters until every part fits in a page. The
  cursor then moves to ``T + 1``. No loop, no failure, nothing lost.

**Parallel shards by stream and hour, one writer.** The selector's streams are listed (``/series``) and
each gets its own query (:func:`stream_queries`) over whole-hour windows (Loki's query frontend splits at
1h), so Loki reads each stream's chunks in order and decompresses each block once -- time-only shards
(what logcli's ``--parallel-duration`` does) make every page re-open the current block of every stream.
Time shards (``parallel * 4``) remain for multi-tenant ids, very many streams or when ``/series``
refuses; streams that appear while reading are picked up by listing the range again at the end. Worker
threads (4 by default) page through shards and hand pages to the generator, which runs in the caller's
thread, so exactly one thread writes to DuckDB while the workers keep fetching. An idle worker takes
the second half of a busy shard, so skewed data still uses every worker.

**Adaptive to Loki's limits.** "query time range exceeds the limit", "maximum number of series", "query
too large", "would read too many bytes", "max number of chunks" (400) and query timeouts (504) split the
shard in two and retry; 429/5xx are retried with backoff and jitter honouring ``Retry-After``
(:mod:`meshlens.sources.http`); "max entries limit per query exceeded" lowers the page size to the server's
maximum; a LogQL parse error raises :class:`~meshlens.errors.QueryError` at once with Loki's message.

**Resumable.** Every batch carries the watermark ``{start_ns, end_ns, pending: [[cursor, end], ...]}``
(``cursor`` = everything older in that shard is stored), committed with the batch in one transaction
under the key ``loki:<url>|<tenant>|<query>``. A run killed at any moment and re-run with ``resume=True``
re-fetches each unfinished shard from its cursor; the few lines re-read at a cursor are dropped by the
store's ``event_id`` dedup, so the result is exactly the same set of events.

**Push-down aggregation.** :func:`aggregate_loki` runs LogQL metric queries (presets for Istio access
logs in JSON or text format, or any custom query) and stores the matrix into the ``series`` table,
splitting on labels when Loki's series limit is hit and on time when the range is too long.

This module does not parse lines; the ingest pipeline does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshlens.errors import AuthError, ConfigError, QueryError, SourceError
from meshlens.records import DEFAULT_BATCH, ROW_GROUP, RawBatch
from meshlens.records import AggregateCounts as _AggregateCounts
from meshlens.sources.http import HttpClient, HttpConfig
from meshlens.timeutil import (  # noqa: F401 - resolve_range re-exported for callers of this module
    ns_to_rfc3339,
    parse_duration_or_seconds_ns,
    parse_time_ns,
    resolve_range,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from meshlens.ingest import IngestCounts
    from meshlens.store import Store

log = logging.getLogger("meshlens.loki")

NS = 1_000_000_000
QUERY_RANGE = "/loki/api/v1/query_range"
SERIES = "/loki/api/v1/series"
LOKI_DEFAULT_MAX_ENTRIES = 5000  # max_entries_limit_per_query default (pkg/validation/limits.go)
DEFAULT_BATCH_SIZE = 5000
DEFAULT_WRITE_BATCH = DEFAULT_BATCH  # lines per stored batch (pages coalesced; two whole DuckDB row groups)
DEFAULT_RESUME_OVERLAP_NS = 60 * NS
SHARDS_PER_WORKER = 4
MIN_DONATE_NS = 2 * NS  # do not hand out shards narrower than this to idle workers
MAX_SHARDS = 4096  # planned shards (adaptive splits may add more); bounds the checkpoint size
MAX_STREAM_SHARDS = 1000  # more streams than this: time shards only (one /series answer, bounded plan)
SHARD_ALIGN_NS = 3600 * NS  # Loki's split_queries_by_interval default: stream shards are whole hours
# lines in the first stored batch (see LokiSource.batches): one DuckDB row group. A smaller batch is
# written twice (to the WAL at commit, compressed at the next checkpoint) and pays the fixed per-batch
# cost (planning the parse SQL, ~0.1 s) again: measured ~12% more client CPU with a 25,000 ramp.
FIRST_WRITE_BATCH = ROW_GROUP
MAX_LATE_ROUNDS = 3  # times the range is listed again for streams that appeared while reading
DEFAULT_PARALLEL = 4  # fetching waits on Loki: a few requests in flight keep it and the writer busy
# 504 is not retried by the HTTP layer for range queries: a Loki query timeout means "too much work",
# so the shard is split instead of re-sending the same query.
QUERY_RETRY_STATUSES = (429, 500, 502, 503)
LOKI_PRODUCT = "Loki"
# Structured metadata and parsed labels per entry instead of one result item per distinct label set
# (Loki >= 3.0; older servers ignore the header and answer as before -- parse_streams reads both).
CATEGORIZE = {"X-Loki-Response-Encoding-Flags": "categorize-labels"}

LabelKey = tuple[tuple[str, str], ...]
EntryKey = tuple[LabelKey, int, str]

# ================================================================================================
# Time inputs (parsing itself lives in meshlens.timeutil)
# ================================================================================================
def parse_duration(value: str | int | float) -> int:
    """``2h``, ``90m``, ``1h30m``, ``500ms`` or a number of seconds -> nanoseconds."""
    return parse_duration_or_seconds_ns(value)


def parse_time(value: str | int | float | datetime, now_ns: int | None = None) -> int:
    """RFC 3339, Unix seconds/ns, ``now``, ``now-2h`` or a ``datetime`` -> Unix ns."""
    return parse_time_ns(value, now_ns=now_ns)


def _iso(ns: int) -> str:
    return ns_to_rfc3339(ns)


# ================================================================================================
# Configuration from arguments and logcli's environment variables
# ================================================================================================
def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def loki_http_config(
    url: str | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    bearer_token: str | None = None,
    bearer_token_file: str | None = None,
    org_id: str | None = None,
    headers: Mapping[str, str] | Sequence[str] | None = None,
    ca_cert: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    insecure: bool | None = None,
    timeout_s: float = 60,
    max_retries: int = 8,
    backoff_base_s: float = 0.5,
    backoff_max_s: float = 30,
    env: Mapping[str, str] | None = None,
) -> tuple[HttpConfig, str | None]:
    """Build the HTTP config and tenant, arguments first, then logcli's ``LOKI_*`` environment variables.

    Existing logcli users need no new configuration: ``LOKI_ADDR``, ``LOKI_USERNAME``,
    ``LOKI_PASSWORD``, ``LOKI_BEARER_TOKEN``, ``LOKI_BEARER_TOKEN_FILE``, ``LOKI_ORG_ID``,
    ``LOKI_CA_CERT_PATH``, ``LOKI_CLIENT_CERT_PATH``, ``LOKI_CLIENT_KEY_PATH`` and
    ``LOKI_TLS_SKIP_VERIFY`` are read when the matching argument is not given.
    """
    env = os.environ if env is None else env
    url = url or env.get("LOKI_ADDR")
    if not url:
        raise ConfigError("no Loki URL: pass --url http://loki:3100 or set LOKI_ADDR (as for logcli)")
    username = username if username is not None else env.get("LOKI_USERNAME") or None
    password = password if password is not None else env.get("LOKI_PASSWORD") or None
    bearer_token = bearer_token or env.get("LOKI_BEARER_TOKEN") or None
    bearer_token_file = bearer_token_file or env.get("LOKI_BEARER_TOKEN_FILE") or None
    if bearer_token_file and not bearer_token:
        try:
            bearer_token = Path(bearer_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read bearer token file {bearer_token_file!r}: {exc.strerror}") from exc
    elif bearer_token_file and bearer_token:
        raise ConfigError("give a bearer token or a bearer token file, not both")
    org_id = org_id or env.get("LOKI_ORG_ID") or None
    ca_cert = ca_cert or env.get("LOKI_CA_CERT_PATH") or None
    client_cert = client_cert or env.get("LOKI_CLIENT_CERT_PATH") or None
    client_key = client_key or env.get("LOKI_CLIENT_KEY_PATH") or None
    if insecure is None:
        insecure = _truthy(env.get("LOKI_TLS_SKIP_VERIFY"))
    for label, path in (("CA certificate", ca_cert), ("client certificate", client_cert), ("client key", client_key)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{label} file {path!r} does not exist")
    hdrs = parse_headers(headers)
    if org_id:
        hdrs["X-Scope-OrgID"] = org_id
    cfg = HttpConfig(
        url=url, username=username, password=password, bearer_token=bearer_token, headers=hdrs,
        ca_cert=ca_cert, client_cert=client_cert, client_key=client_key, verify=not insecure,
        timeout_s=timeout_s, max_retries=max_retries, backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
    )
    return cfg, org_id


def parse_headers(headers: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """``{"K": "V"}`` or ``["K: V", "K2=V2"]`` -> dict (for ``--header K:V``)."""
    if headers is None:
        return {}
    if isinstance(headers, Mapping):
        return {str(k): str(v) for k, v in headers.items()}
    out: dict[str, str] = {}
    for h in headers:
        m = re.match(r"\s*([^:=\s]+)\s*[:=]\s*(.*)$", h)
        if not m:
            raise ConfigError(f"bad header {h!r}; use --header 'Name: value'")
        out[m.group(1)] = m.group(2).strip()
    return out


# ================================================================================================
# LogQL helpers (selector surgery; no parsing of lines)
# ================================================================================================
def _scan_string_end(q: str, i: int) -> int:
    """Index just past the string literal starting at ``q[i]`` (``"..."`` or backticks)."""
    quote = q[i]
    j = i + 1
    while j < len(q):
        c = q[j]
        if quote == '"' and c == "\\":
            j += 2
            continue
        if c == quote:
            return j + 1
        j += 1
    raise QueryError(f"unterminated string literal in LogQL query at offset {i}: {q!r}")


def selector_spans(q: str) -> list[tuple[int, int]]:
    """Spans ``(open, close)`` of every stream selector ``{...}`` outside string literals."""
    spans: list[tuple[int, int]] = []
    i, depth, open_at = 0, 0, -1
    while i < len(q):
        c = q[i]
        if c in "\"`":
            i = _scan_string_end(q, i)
            continue
        if c == "{":
            if depth == 0:
                open_at = i
            depth += 1
        elif c == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append((open_at, i))
        i += 1
    return spans


def split_log_query(q: str) -> tuple[str, str]:
    """``'{a="b"} |= "x" | json'`` -> (``'{a="b"}'``, ``' |= "x" | json'``); QueryError for metric queries."""
    s = q.strip()
    spans = selector_spans(s)
    if not s.startswith("{") or not spans:
        raise QueryError(
            f"{s!r} is not a LogQL log query (it must start with a stream selector like "
            '{namespace="shop"}); for metric queries use `meshlens aggregate loki`'
        )
    _open, close = spans[0]
    return s[: close + 1], s[close + 1:]


def logql_quote(value: str) -> str:
    """A LogQL (Go) double-quoted string literal."""
    return json.dumps(value, ensure_ascii=False)


def exact_selector(labels: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}={logql_quote(v)}" for k, v in sorted(labels.items())) + "}"


def add_matcher(q: str, name: str, op: str, value: str) -> str:
    """Add ``name op "value"`` to every stream selector of a (log or metric) query."""
    spans = selector_spans(q)
    if not spans:
        raise QueryError(f"no stream selector in LogQL query {q!r}")
    out, last = [], 0
    for _open, close in spans:
        inner = q[_open + 1:close].strip()
        sep = ", " if inner else ""
        out.append(q[last:close])
        out.append(f"{sep}{name}{op}{logql_quote(value)}")
        last = close
    out.append(q[last:])
    return "".join(out)


_RE2_META = set("\\.+*?()|[]{}^$-")


def re2_escape(text: str) -> str:
    """Escape text for an RE2 regex (and Python's ``re`` after ``\\x{..}`` translation)."""
    out = []
    for ch in text:
        if ch in _RE2_META:
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):x}}}")
    return "".join(out)


# ================================================================================================
# Loki protocol: one request, classified
# ================================================================================================
class _SplitSignal(SourceError):
    """Loki refused a query for its size or time: split it and try again.

    A :class:`SourceError` so that, should one ever escape the splitting logic, the user still gets
    Loki's message as a one-line error rather than a traceback.
    """

    def __init__(self, reason: str, message: str, status: int) -> None:
        super().__init__(f"Loki refused the query ({reason}): {message}", status=status, resumable=True)
        self.reason = reason
        self.message = message


class _EntriesLimit(SourceError):
    """``limit`` above ``max_entries_limit_per_query``: lower the page size to ``server_max``."""

    def __init__(self, server_max: int, message: str) -> None:
        super().__init__(f"Loki: {message}", status=400)
        self.server_max = server_max


_SPLIT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("the query time range exceeds the limit", "range"),
    ("query time range exceeds the limit", "range"),
    ("maximum number of series", "series"),
    ("query too large", "size"),
    ("would read too many bytes", "size"),
    ("max number of chunks", "size"),
    ("exceeded maximum resolution", "points"),
    ("request timed out", "timeout"),
    ("too many bytes", "size"),
)
_PARSE_PATTERNS = ("parse error", "syntax error", "only label matchers are supported",
                   "queries require at least one", "invalid aggregation", "error parsing regexp",
                   "pipeline error", "unexpected")


def _loki_permanent(status: int, body: str) -> bool:
    """A 5xx that is Loki's configuration, not its load: retrying cannot help (see :func:`classify_error`)."""
    return "multiple org ids present" in body.lower()


def classify_error(status: int, body: str) -> tuple[str, str]:
    """(kind, reason) for a non-2xx Loki answer: kind is split, entries, query, no_org, multi_org,
    not_found, other."""
    low = body.lower()
    if "no org id" in low:
        return "no_org", ""
    if "multiple org ids present" in low:
        return "multi_org", ""
    if "max entries limit" in low:
        return "entries", ""
    for pat, reason in _SPLIT_PATTERNS:
        if pat in low:
            return "split", reason
    if status == 504:
        return "split", "timeout"
    if status == 413:
        return "split", "size"
    if status == 404:
        return "not_found", ""
    if status in (400, 422) and any(p in low for p in _PARSE_PATTERNS):
        return "query", ""
    return "other", ""


class LokiClient:
    """Loki's query API over :class:`HttpClient`, turning answers into data or typed errors."""

    def __init__(self, http: HttpClient, tenant: str | None = None) -> None:
        self.http = http
        self.tenant = tenant

    @property
    def identity(self) -> str:
        return self.http.cfg.identity()

    def _get(self, path: str, params: Mapping[str, Any] | list[tuple[str, Any]],
             retry_statuses: Iterable[int] = QUERY_RETRY_STATUSES, headers: Mapping[str, str] | None = None) -> Any:
        try:
            resp, doc = self.http.request_json("GET", path, params=params, retry_statuses=retry_statuses,
                                               permanent=_loki_permanent, headers=headers)
        except AuthError as exc:
            if "no org id" in str(exc).lower():
                raise AuthError(
                    f"Loki at {self.identity} needs a tenant (multi-tenancy is on; it answered 'no org id'). "
                    "Pass --org-id TENANT or set LOKI_ORG_ID.",
                    status=exc.status,
                ) from None
            raise
        if doc is not None:
            if not isinstance(doc, dict) or doc.get("status") != "success":
                raise SourceError(
                    f"Loki at {self.http.where(path)} answered 200 without status=success: {str(doc)[:300]}",
                    status=resp.status_code,
                )
            return doc.get("data")
        body = " ".join(resp.text.split())
        kind, reason = classify_error(resp.status_code, body)
        where = self.http.where(path)
        if kind == "no_org":
            raise AuthError(
                f"Loki at {self.identity} needs a tenant ('no org id', HTTP {resp.status_code}). "
                "Pass --org-id TENANT or set LOKI_ORG_ID.",
                status=resp.status_code,
            )
        if kind == "multi_org":
            raise SourceError(
                f"Loki at {self.identity} does not allow queries over several tenants ({self.tenant!r}): it "
                "answered 'multiple org IDs present'. Set multi_tenant_queries_enabled: true in Loki's "
                "limits_config, or ingest one tenant per run.",
                status=resp.status_code,
            )
        if kind == "entries":
            m = re.search(r"\((\d+)\s*>\s*(\d+)\)", body)
            raise _EntriesLimit(int(m.group(2)) if m else LOKI_DEFAULT_MAX_ENTRIES, body)
        if kind == "split":
            raise _SplitSignal(reason, body, resp.status_code)
        if kind == "query":
            raise QueryError(f"Loki rejected the query: {body}", status=resp.status_code)
        if kind == "not_found":
            raise SourceError(
                f"Loki API not found at {where} (HTTP 404: {body[:200]}). --url must be Loki's base URL, "
                "e.g. http://loki:3100 (without /loki/api/v1).",
                status=404,
            )
        raise SourceError(f"Loki at {where} answered HTTP {resp.status_code}: {body[:500]}", status=resp.status_code)

    def query_range(self, query: str, start_ns: int, end_ns: int, *, limit: int | None = None,
                    direction: str = "forward", step_s: float | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"query": query, "start": str(start_ns), "end": str(end_ns),
                                  "direction": direction}
        if limit is not None:
            params["limit"] = str(limit)
        if step_s is not None:
            params["step"] = _fmt_step(step_s)
        data = self._get(QUERY_RANGE, params, headers=CATEGORIZE if step_s is None else None)
        if not isinstance(data, dict) or "resultType" not in data:
            raise SourceError(f"Loki query_range at {self.identity} returned no data.resultType")
        return data

    def series(self, selector: str, start_ns: int, end_ns: int) -> list[dict[str, str]]:
        data = self._get(SERIES, [("match[]", selector), ("start", str(start_ns)), ("end", str(end_ns))],
                         retry_statuses=(429, 500, 502, 503, 504))
        return list(data or [])

    def labels(self, start_ns: int, end_ns: int) -> list[str]:
        """Label names with data in the range (Loki omits ``data`` for a tenant with none)."""
        data = self._get("/loki/api/v1/labels", {"start": str(start_ns), "end": str(end_ns)},
                         retry_statuses=(429, 500, 502, 503, 504))
        return [str(v) for v in data or []]

    def label_values(self, name: str, selector: str | None, start_ns: int, end_ns: int) -> list[str]:
        params = {"start": str(start_ns), "end": str(end_ns)}
        if selector:
            params["query"] = selector
        data = self._get(f"/loki/api/v1/label/{name}/values", params, retry_statuses=(429, 500, 502, 503, 504))
        return [str(v) for v in data or []]


def _fmt_step(step_s: float) -> str:
    return str(int(step_s)) if float(step_s).is_integer() else repr(float(step_s))


# ================================================================================================
# Pages of entries
# ================================================================================================
@dataclass
class _Entries:
    """Columns of entries from one or more responses."""

    ts: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    labels: list[dict[str, str]] = field(default_factory=list)
    lkeys: list[LabelKey] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ts)

    def key(self, i: int) -> EntryKey:
        return (self.lkeys[i], self.ts[i], self.lines[i])

    def extend(self, other: _Entries) -> None:
        self.ts += other.ts
        self.lines += other.lines
        self.labels += other.labels
        self.lkeys += other.lkeys

    def select(self, keep: Iterable[int]) -> _Entries:
        out = _Entries()
        for i in keep:
            out.ts.append(self.ts[i])
            out.lines.append(self.lines[i])
            out.labels.append(self.labels[i])
            out.lkeys.append(self.lkeys[i])
        return out

    def dedup(self, skip: set[EntryKey] | None = None) -> _Entries:
        seen: set[EntryKey] = set(skip or ())
        keep = []
        for i in range(len(self.ts)):
            k = self.key(i)
            if k not in seen:
                seen.add(k)
                keep.append(i)
        return self if len(keep) == len(self.ts) else self.select(keep)


def parse_streams(data: Mapping[str, Any]) -> _Entries:
    """Flatten a ``streams`` result (repeated label sets, 2- or 3-element values) into entry columns.

    With ``categorize-labels`` (which :class:`LokiClient` asks for) an entry's third element holds its
    ``structuredMetadata`` and ``parsed`` labels; they are merged into the stream labels so that an
    event's labels -- and its identity -- are exactly what Loki answers without the flag. The flag
    matters for the wire: without it every distinct metadata value (a trace id!) is its own result item
    with a full copy of the stream labels. Merged label sets are interned (one dict per distinct set).
    """
    if data.get("resultType") != "streams":
        raise QueryError(
            f"Loki returned a {data.get('resultType')!r} result, not log lines; ingest needs a log query "
            "(a stream selector with an optional pipeline). Use `meshlens aggregate loki` for metric queries."
        )
    out = _Entries()
    ts_out, lines_out, labels_out, keys_out = out.ts, out.lines, out.labels, out.lkeys
    label_keys: set[LabelKey] = set()
    repeated = False
    interned: dict[tuple[LabelKey, tuple[tuple[str, str], ...]], tuple[dict[str, str], LabelKey]] = {}
    for item in data.get("result") or []:
        labels = {str(k): str(v) for k, v in (item.get("stream") or {}).items()}
        lkey = tuple(sorted(labels.items()))
        if lkey in label_keys:
            repeated = True  # grafana/loki#5079: one label set split over several result items
        label_keys.add(lkey)
        values = item.get("values") or []
        plain = _plain_values(values)
        if plain is not None:  # the usual, well-formed answer: whole columns at once
            ts_v, lines_v, extras = plain
            ts_out += ts_v
            lines_out += lines_v
            if extras is None:
                labels_out += [labels] * len(ts_v)
                keys_out += [lkey] * len(ts_v)
                continue
            # Loki sends the same few metadata sets over and over ({"structuredMetadata":
            # {"detected_level": "info"}}): look them up by their items. Only all-string items are
            # cached, and a tuple of strings equals only a tuple of the same strings (1 == True, not "1").
            seen: dict[tuple[Any, ...], tuple[dict[str, str], LabelKey]] = {}
            for extra in extras:
                if extra is None:
                    labels_out.append(labels)
                    keys_out.append(lkey)
                    continue
                sm = extra.get("structuredMetadata")
                items = tuple(sm.items()) if len(extra) == 1 and type(sm) is dict else None
                hit = seen.get(items) if items is not None else None
                if hit is None:
                    hit = _merge_metadata(labels, lkey, extra, interned)
                    if items is not None and all(type(a) is str and type(b) is str for a, b in items):
                        seen[items] = hit
                labels_out.append(hit[0])
                keys_out.append(hit[1])
            continue
        for v in values:
            # A real Loki sends ["<ns>", "<line>"(, {metadata})]; anything else is a broken answer
            # (proxy, truncation) -- fail loudly and resumably rather than crash or guess.
            if not (isinstance(v, list | tuple) and len(v) >= 2 and isinstance(v[0], str) and v[0].isdigit()
                    and isinstance(v[1], str)):
                raise SourceError(
                    f"Loki answered a malformed stream entry {str(v)[:120]!r} (expected [\"<ns timestamp>\", "
                    "\"<line>\"]); nothing of this page was stored. Re-run with --resume once the server "
                    "or proxy answers correctly.", resumable=True)
            ts_out.append(int(v[0]))
            lines_out.append(v[1])
            extra = v[2] if len(v) > 2 and isinstance(v[2], dict) and v[2] else None
            if extra is None:
                labels_out.append(labels)
                keys_out.append(lkey)
                continue
            merged, mkey = _merge_metadata(labels, lkey, extra, interned)
            labels_out.append(merged)
            keys_out.append(mkey)
    return out.dedup() if repeated else out


def _plain_values(values: Any) -> tuple[list[int], list[str], list[dict[str, Any] | None] | None] | None:
    """A stream item's ``values`` as columns (timestamps, lines, metadata or None per entry; metadata
    None when no entry has any) when every entry is well formed, else None: the caller's per-entry loop
    then names what is wrong. Column-wise comprehensions cost a third of a checked loop per entry."""
    if type(values) is not list or not all(type(v) is list and len(v) >= 2 for v in values):
        return None
    ts_s = [v[0] for v in values]
    lines = [v[1] for v in values]
    if not (all(type(t) is str and t.isdigit() for t in ts_s) and all(type(x) is str for x in lines)):
        return None
    try:
        ts = list(map(int, ts_s))
    except ValueError:  # a non-ASCII digit: the checked loop reports it
        return None
    if all(len(v) == 2 for v in values):
        return ts, lines, None
    return ts, lines, [v[2] if len(v) > 2 and isinstance(v[2], dict) and v[2] else None for v in values]


def _merge_metadata(labels: dict[str, str], lkey: LabelKey, extra: Mapping[str, Any],
                    interned: dict[tuple[LabelKey, tuple[tuple[str, str], ...]], tuple[dict[str, str], LabelKey]],
                    ) -> tuple[dict[str, str], LabelKey]:
    """The stream labels with an entry's structured metadata and parsed labels (``categorize-labels``)
    merged in, interned: one dict (and key) per distinct merged set."""
    add: list[tuple[str, str]] = []
    for part in ("structuredMetadata", "parsed"):
        sub = extra.get(part)
        if isinstance(sub, dict):
            add.extend((str(a), str(b)) for a, b in sub.items())
    ck = (lkey, tuple(add))
    hit = interned.get(ck)
    if hit is None:
        merged = {**labels, **dict(add)}
        hit = interned[ck] = (merged, tuple(sorted(merged.items())))
    return hit


# ================================================================================================
# Shards, pages and the paginator
# ================================================================================================
@dataclass
class _Shard:
    id: int
    start: int  # cursor: every entry older than this in [start, end) is already emitted
    end: int
    skip: frozenset[EntryKey] = frozenset()  # keys already emitted at ts == start
    query: str | None = None  # one stream's query (see stream_queries); None: the paginator's query


@dataclass
class _Page:
    shard_id: int
    entries: _Entries
    cursor: int
    done: bool


@dataclass
class _Split:
    """Shard ``shard_id`` is replaced by ``children`` (adaptive split) -- or shrunk (donation)."""

    shard_id: int
    children: list[_Shard]
    keep_end: int | None = None  # donation: the shard continues with this end


class _Stopped(Exception):
    pass


class Paginator:
    """Pages one shard exactly (see the module docstring). Thread-safe: workers share one instance."""

    def __init__(
        self,
        client: LokiClient,
        query: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_entries: int = LOKI_DEFAULT_MAX_ENTRIES,
        stop: threading.Event | None = None,
        want_work: Callable[[], bool] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if batch_size < 2:
            raise ConfigError(f"batch size must be >= 2, got {batch_size}")
        self.client = client
        self.query = query.strip()
        # Kept for per-stream splits; a query that does not split here is still sent, so that Loki's own
        # parse error (or a metric result) is what the user sees.
        try:
            self.selector, self.pipeline = split_log_query(self.query)
        except QueryError:
            self.selector, self.pipeline = None, ""
        self.max_entries = max(max_entries, 2)
        self.page_limit = min(batch_size, self.max_entries)
        self.stop = stop or threading.Event()
        self.want_work = want_work or (lambda: False)
        self._sleep = sleep
        self._ids = iter(range(1_000_000, 10**12))
        self._lock = threading.Lock()
        self.requests = 0
        self.splits = 0

    def new_id(self) -> int:
        with self._lock:
            return next(self._ids)

    # -- one request -------------------------------------------------------------------------------
    def fetch(self, query: str, start: int, end: int, limit: int) -> tuple[_Entries, int]:
        """Entries of ``query`` in [start, end) (at most ``limit``), and the limit actually used."""
        while True:
            if self.stop.is_set():
                raise _Stopped
            with self._lock:
                self.requests += 1
                limit = min(limit, self.max_entries)
            try:
                data = self.client.query_range(query, start, end, limit=limit, direction="forward")
            except _EntriesLimit as exc:
                if limit <= exc.server_max:
                    raise SourceError(
                        f"Loki rejected limit={limit} although it reports a maximum of {exc.server_max}: {exc}",
                        status=400,
                    ) from None
                with self._lock:
                    self.max_entries = max(2, min(self.max_entries, exc.server_max))
                    self.page_limit = min(self.page_limit, self.max_entries)
                log.info("Loki's max_entries_limit_per_query is %d; using smaller pages", self.max_entries)
                continue
            return parse_streams(data), limit

    # -- a shard -------------------------------------------------------------------------------------
    def run_shard(self, sh: _Shard) -> Iterator[_Page | _Split]:
        cur, end = sh.start, sh.end
        skip: set[EntryKey] = set(sh.skip)
        timeouts = 0
        query = sh.query or self.query
        while cur < end:
            try:
                page, limit = self.fetch(query, cur, end, self.page_limit)
                full = None
                if len(page) >= limit and min(page.ts) == max(page.ts):
                    full = self.fetch_one_ns(page.ts[0], sh.query)
            except _SplitSignal as sig:
                # Also reached when one crowded nanosecond cannot be fetched: the shard then shrinks
                # around it until it is that nanosecond alone, where only timeouts are worth retrying.
                if end - cur > 1:
                    yield self._split(sh, cur, end, skip, sig)
                    return
                timeouts += 1
                if sig.reason != "timeout" or timeouts > self.client.http.cfg.max_retries:
                    raise SourceError(
                        f"Loki cannot answer the query even for a single nanosecond at {_iso(cur)}: "
                        f"{sig.message}. Narrow the query (more label matchers) or raise the server limit.",
                        status=sig.status, resumable=True,
                    ) from None
                self._sleep(self.client.http.backoff_delay(timeouts))
                continue
            timeouts = 0
            n = len(page)
            if n < limit:
                emit = page.dedup(skip) if skip else page
                yield _Page(sh.id, emit, end, True)
                return
            tmax = max(page.ts)
            if full is not None:  # the whole page is one nanosecond: it was fetched on its own
                emit = full.dedup(skip if tmax == cur else None)
                cur, skip = tmax + 1, set()
                yield _Page(sh.id, emit, cur, cur >= end)
                continue
            keep = [i for i in range(n) if page.ts[i] != cur or page.key(i) not in skip] if skip else range(n)
            emit = page.select(keep) if skip else page
            skip = {page.key(i) for i in range(n) if page.ts[i] == tmax}
            cur = tmax
            donated = self._maybe_donate(sh, cur, end)
            if donated is not None:
                end = donated.keep_end  # type: ignore[assignment]
                yield _Page(sh.id, emit, cur, False)
                yield donated
                continue
            yield _Page(sh.id, emit, cur, False)

    def _split(self, sh: _Shard, cur: int, end: int, skip: set[EntryKey], sig: _SplitSignal) -> _Split:
        mid = cur + (end - cur) // 2
        with self._lock:
            self.splits += 1
        log.info("Loki refused [%s, %s) (%s: %s); splitting in two", _iso(cur), _iso(end), sig.reason,
                 sig.message[:200])
        return _Split(sh.id, [_Shard(self.new_id(), cur, mid, frozenset(skip), sh.query),
                              _Shard(self.new_id(), mid, end, query=sh.query)])

    def _maybe_donate(self, sh: _Shard, cur: int, end: int) -> _Split | None:
        """Give the second half of this shard to an idle worker (load balancing for skewed data)."""
        if end - cur < 2 * MIN_DONATE_NS or not self.want_work():
            return None
        mid = cur + (end - cur) // 2
        return _Split(sh.id, [_Shard(self.new_id(), mid, end, query=sh.query)], keep_end=mid)

    # -- one nanosecond that does not fit in a page ---------------------------------------------------
    def fetch_one_ns(self, t: int, stream_query: str | None = None) -> _Entries:
        """Every entry at exactly ``t``: biggest page, else per stream, else per line prefix.

        ``stream_query``: the shard is one stream already (its selector excludes every other stream),
        so a crowded nanosecond goes straight to the per-prefix partition of that query.
        """
        page, limit = self.fetch(stream_query or self.query, t, t + 1, self.max_entries)
        if len(page) < limit:
            return page
        if stream_query is not None:
            return self._prefix_partition(stream_query, t, "").dedup()
        log.info("more than %d lines at %s; fetching that nanosecond per stream", limit, t)
        if self.selector is None:
            raise QueryError(f"cannot split query {self.query!r} by stream: it does not start with a selector")
        out = _Entries()
        for labels in self.client.series(self.selector, t, t + 1):
            out.extend(self._prefix_partition(exact_selector(labels) + self.pipeline, t, ""))
        return out.dedup()

    def _prefix_partition(self, q: str, t: int, prefix: str) -> _Entries:
        """Entries at ``t`` of one stream whose line starts with ``prefix``.

        A full page is split by the next character. When every line of the page shares a longer prefix
        (lines usually start with the same timestamp), the lines that do *not* share it are fetched in
        one query (``|~ "^prefix" !~ "^longer"``) and the search jumps to the longer prefix, so a common
        prefix costs one query instead of one per character.
        """
        filt = q if not prefix else f"{q} |~ {logql_quote('^' + re2_escape(prefix))}"
        page, limit = self.fetch(filt, t, t + 1, self.max_entries)
        if len(page) < limit:
            return page
        lcp = os.path.commonprefix(page.lines)
        if len(lcp) > len(prefix):
            rest, lim = self.fetch(f"{filt} !~ {logql_quote('^' + re2_escape(lcp))}", t, t + 1, self.max_entries)
            if len(rest) < lim:
                rest.extend(self._prefix_partition(q, t, lcp))
                return rest
        out, _ = self.fetch(f"{q} |~ {logql_quote('^' + re2_escape(prefix) + '$')}", t, t + 1, self.max_entries)
        out.extend(self._char_range(q, t, prefix, 0, 0x10FFFF, page))
        return out

    def _char_range(self, q: str, t: int, prefix: str, lo: int, hi: int, seen: _Entries | None) -> _Entries:
        """Entries at ``t`` whose line starts with ``prefix`` followed by a char in [lo, hi]."""
        if lo == hi:
            return self._prefix_partition(q, t, prefix + chr(lo))
        if seen is None:
            cls = f"[\\x{{{lo:x}}}-\\x{{{hi:x}}}]"
            page, limit = self.fetch(f"{q} |~ {logql_quote('^' + re2_escape(prefix) + cls)}", t, t + 1,
                                     self.max_entries)
            if len(page) < limit:
                return page
            seen = page
        n = len(prefix)
        chars = sorted({ord(line[n]) for line in seen.lines if len(line) > n and lo <= ord(line[n]) <= hi})
        if not chars:
            ranges = [(lo, lo + (hi - lo) // 2), (lo + (hi - lo) // 2 + 1, hi)]
        elif len(chars) == 1:
            c = chars[0]
            ranges = [r for r in ((lo, c - 1), (c, c), (c + 1, hi)) if r[0] <= r[1]]
        else:
            m = chars[len(chars) // 2]
            ranges = [(lo, m - 1), (m, hi)]
        out = _Entries()
        for a, b in ranges:
            out.extend(self._char_range(q, t, prefix, a, b, None))
        return out


def stream_queries(streams: Sequence[Mapping[str, str]], selector: str, pipeline: str) -> list[str]:
    """One query per stream that matches that stream and no other.

    ``{app="a"}`` also matches ``{app="a", pod="p"}`` (a selector matches every superset), so each
    stream's selector also says ``name=""`` for every label name it lacks that another stream has. The
    original selector's matchers are kept first, so each query still has them (Loki requires a
    non-empty matcher) and means exactly "this stream's lines of the user's query".
    """
    names = sorted({k for st in streams for k in st})
    base = selector.strip()[1:-1].strip()
    out = []
    for st in streams:
        parts = [f"{k}={logql_quote(v)}" for k, v in sorted(st.items())]
        parts += [f'{k}=""' for k in names if k not in st]
        out.append("{" + ", ".join(([base] if base else []) + parts) + "}" + pipeline)
    return out


# ================================================================================================
# Executors: inline (parallel=1) and threaded (parallel>1)
# ================================================================================================
@dataclass
class _WorkerExit:
    pass


@dataclass
class _WorkerError:
    exc: BaseException


def _run_inline(pag: Paginator, shards: list[_Shard]) -> Iterator[_Page | _Split]:
    todo = deque(shards)
    while todo:
        sh = todo.popleft()
        for msg in pag.run_shard(sh):
            yield msg
            if isinstance(msg, _Split):
                todo.extendleft(reversed(msg.children))


class _Threaded:
    """Worker threads page through shards; the consumer (one writer) receives messages in order."""

    def __init__(self, pag: Paginator, shards: list[_Shard], parallel: int, buffer_pages: int = 0) -> None:
        self.pag = pag
        self.parallel = parallel
        self.work: queue.Queue[_Shard | None] = queue.Queue()
        # Room for a write batch of pages: workers keep fetching while the writer stores a batch.
        self.out: queue.Queue[Any] = queue.Queue(maxsize=max(2, parallel * 2) + buffer_pages)
        self.outstanding = len(shards)
        self.idle = 0
        self.lock = threading.Lock()
        for sh in shards:
            self.work.put(sh)
        pag.want_work = self._want_work
        self.threads = [threading.Thread(target=self._worker, name=f"loki-worker-{i}", daemon=True)
                        for i in range(parallel)]

    def _want_work(self) -> bool:
        with self.lock:
            return self.idle > 0 and self.work.empty()

    def _put(self, msg: Any) -> None:
        while True:
            try:
                self.out.put(msg, timeout=0.1)
                return
            except queue.Full:
                if self.pag.stop.is_set():
                    raise _Stopped from None

    def _finish_one(self, added: int = 0) -> None:
        with self.lock:
            self.outstanding += added - 1
            done = self.outstanding == 0
        if done:
            for _ in range(self.parallel):
                self.work.put(None)

    def _worker(self) -> None:
        try:
            while not self.pag.stop.is_set():
                with self.lock:
                    self.idle += 1
                sh = self.work.get()
                with self.lock:
                    self.idle -= 1
                if sh is None:
                    break
                finished = False
                for msg in self.pag.run_shard(sh):
                    self._put(msg)
                    if isinstance(msg, _Split):
                        if msg.keep_end is None:
                            self._finish_one(added=len(msg.children))
                            finished = True
                        else:
                            with self.lock:
                                self.outstanding += len(msg.children)
                        for c in msg.children:
                            self.work.put(c)
                if not finished:
                    self._finish_one()
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            self.pag.stop.set()
            self._hand_over(_WorkerError(exc))
        finally:
            self._hand_over(_WorkerExit())

    def _hand_over(self, msg: Any) -> None:
        """Deliver a worker's error or exit to the consumer. It must not be dropped while the consumer
        still reads (a full queue behind a slow writer batch: a lost exit hangs the ingest, a lost error
        ends it as if complete); once the run is stopped the consumer drains the queue for 10 s."""
        deadline: float | None = None
        while True:
            try:
                self.out.put(msg, timeout=0.1)
                return
            except queue.Full:
                if self.pag.stop.is_set():
                    deadline = deadline or time.monotonic() + 10
                    if time.monotonic() > deadline:
                        return

    def messages(self) -> Iterator[_Page | _Split]:
        for t in self.threads:
            t.start()
        exits = 0
        error: BaseException | None = None
        try:
            while exits < self.parallel:
                msg = self.out.get()
                if isinstance(msg, _WorkerExit):
                    exits += 1
                elif isinstance(msg, _WorkerError):
                    if error is None:
                        error = msg.exc
                        self.pag.stop.set()
                        for _ in self.threads:  # wake idle workers so that they exit too
                            self.work.put(None)
                elif error is None:
                    yield msg
            if error is not None:
                raise error
        finally:
            self.pag.stop.set()
            for _ in self.threads:
                self.work.put(None)
            deadline = time.monotonic() + 10
            while any(t.is_alive() for t in self.threads) and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    self.out.get(timeout=0.05)


# ================================================================================================
# The source
# ================================================================================================
def source_identity(url_identity: str, tenant: str | None, query: str) -> str:
    """``loki:<url>|<tenant>|<query>``: the source id on events and the watermark key."""
    return f"loki:{url_identity}|{tenant or ''}|{query.strip()}"


class LokiSource:
    """Yields :class:`RawBatch` objects for a LogQL range, with resumable checkpoints.

    Typical use (what :func:`ingest_loki` does)::

        src = LokiSource(client, query, start_ns, end_ns, parallel=4)
        src.plan(store.get_watermark(src.watermark_key) if resume else None)
        ingest_batches(store, src.batches(), source=src.source_id, watermark_key=src.watermark_key)
        store.set_watermark(src.watermark_key, src.final_state())
    """

    def __init__(
        self,
        client: LokiClient,
        query: str,
        start_ns: int,
        end_ns: int,
        *,
        parallel: int = 1,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_entries: int = LOKI_DEFAULT_MAX_ENTRIES,
        shard_ns: int | None = None,
        resume_overlap_ns: int = DEFAULT_RESUME_OVERLAP_NS,
        progress: bool = True,
        write_batch: int = DEFAULT_WRITE_BATCH,
        flush_every_s: float = 5.0,
        by_stream: bool | None = None,
    ) -> None:
        if parallel < 1:
            raise ConfigError(f"--parallel must be >= 1, got {parallel}")
        if end_ns <= start_ns:
            raise ConfigError(f"empty time range [{_iso(start_ns)}, {_iso(end_ns)})")
        self.client = client
        self.query = query.strip()
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.parallel = parallel
        self.batch_size = batch_size
        self.max_entries = max_entries
        self.shard_ns = shard_ns
        self.resume_overlap_ns = resume_overlap_ns
        self.progress = progress
        self.write_batch = max(1, write_batch)
        self.flush_every_s = flush_every_s
        # None: shard by stream when it can be done exactly (a plain selector, one tenant, not too many
        # streams); see _make_shards
        self.by_stream = by_stream
        self.streams: int | None = None  # streams the plan sharded by (None: time shards only)
        self._known_streams: list[dict[str, str]] = []
        self._intervals: list[tuple[int, int]] = []
        self.stop = threading.Event()
        self.paginator = Paginator(client, self.query, batch_size=batch_size, max_entries=max_entries,
                                   stop=self.stop)
        self._pending: dict[int, list[int]] = {}
        self._range = (start_ns, end_ns)
        self._shards: list[_Shard] = []
        self.lines = 0
        self._planned = False
        self._resumed = False
        self.owned_http: HttpClient | None = None  # closed by close(): set by open_loki_source

    # The source draws its own bar (time covered, lines/s), so the pipeline draws none.
    progress_bar = False

    @property
    def warnings(self) -> list[str]:
        """Read once the run is over: a fresh range that yielded no line gets a warning naming the
        tenant, the selector, the range and what does exist there (Loki's series API)."""
        if self.lines or self._resumed or not self._planned:
            return []
        msg = explain_empty(self.client, self.query, self.start_ns, self.end_ns)
        log.warning("meshlens: warning: %s", msg)
        return [msg]

    def close(self) -> None:
        """Stop fetch workers and close the HTTP client this source created."""
        self.stop.set()
        if self.owned_http is not None:
            self.owned_http.close()
            self.owned_http = None

    @property
    def source_id(self) -> str:
        return source_identity(self.client.identity, self.client.tenant, self.query)

    @property
    def watermark_key(self) -> str:
        return self.source_id

    # -- planning ------------------------------------------------------------------------------------
    def plan(self, previous: Mapping[str, Any] | None = None) -> list[tuple[int, int]]:
        """Decide what to fetch: the requested range, or (resuming) the unfinished parts and what is new.

        Returns the intervals to fetch. With ``previous`` (a stored watermark), the unfinished shard
        remainders are fetched, plus ``[prev_end - overlap, requested_end)`` when the request goes past
        the previous run's end -- without a gap, even if the requested start is later.
        """
        intervals: list[tuple[int, int]]
        self._resumed = previous is not None
        if previous and previous.get("v") == 1:
            p_start, p_end = int(previous["start_ns"]), int(previous["end_ns"])
            intervals = [(int(c), int(e)) for c, e in previous.get("pending", []) if int(c) < int(e)]
            if self.end_ns > p_end:
                intervals.append((max(p_start, p_end - self.resume_overlap_ns), self.end_ns))
            self._range = (p_start, max(p_end, self.end_ns))
        else:
            intervals = [(self.start_ns, self.end_ns)]
            self._range = (self.start_ns, self.end_ns)
        intervals = _merge_intervals(intervals)
        self._shards = self._make_shards(intervals)
        self._pending = {sh.id: [sh.start, sh.end] for sh in self._shards}
        self._planned = True
        return intervals

    def _stream_list(self, intervals: list[tuple[int, int]]) -> list[dict[str, str]] | None:
        """The streams to shard by, or None for time shards (see :func:`stream_queries`)."""
        pag = self.paginator
        tenant = self.client.tenant or ""
        if self.by_stream is False or pag.selector is None or "|" in tenant or not intervals:
            return None
        try:
            streams = self.client.series(pag.selector, intervals[0][0], intervals[-1][1])
        except (SourceError, ConfigError) as exc:  # e.g. a series limit: time shards still work
            if self.by_stream:
                raise
            log.info("cannot list the streams (%s); sharding by time only", str(exc)[:200])
            return None
        if not streams or (self.by_stream is None and len(streams) > MAX_STREAM_SHARDS):
            return None
        if any(k.startswith("__") for st in streams for k in st):
            return None  # internal labels (__tenant_id__ ...) cannot be selected on
        return streams

    def _make_shards(self, intervals: list[tuple[int, int]]) -> list[_Shard]:
        """Shards by stream AND time, aligned to Loki's hour splits, so Loki decompresses each chunk once.

        A page of a time-only shard holds ~limit/streams lines of every stream, so each page re-opens
        (and re-decompresses) the current block of every stream -- what logcli's time shards do. A page of
        one stream reads that stream's blocks in order. Window edges are whole hours (Loki's query
        frontend splits at ``split_queries_by_interval``, 1h by default, so no sub-query is cut in two
        by a shard edge). With an explicit ``shard_ns`` that width is used as given.
        """
        total = sum(e - s for s, e in intervals)
        streams = self._stream_list(intervals)
        queries: list[str | None] = [None]
        self._intervals = list(intervals)
        if streams is not None:
            assert self.paginator.selector is not None
            queries = list(stream_queries(streams, self.paginator.selector, self.paginator.pipeline))
            self.streams = len(streams)
            self._known_streams = list(streams)
        if self.shard_ns:
            width = self.shard_ns
        elif streams is not None:
            # enough shards for the workers (parallel x SHARDS_PER_WORKER in all), whole hours each: many
            # streams -> one shard per stream; few streams -> several hour-aligned windows per stream.
            # Not one shard per hour: a sparse month would cost thousands of empty requests.
            per_stream = max(1, -(-self.parallel * SHARDS_PER_WORKER // len(queries)))
            width = max(1, -(-total // per_stream // SHARD_ALIGN_NS)) * SHARD_ALIGN_NS
        elif self.parallel == 1:
            width = max(total, 1)
        else:
            width = max(total // (self.parallel * SHARDS_PER_WORKER), NS)
        if total // width * len(queries) > MAX_SHARDS:
            width = -(-total * len(queries) // MAX_SHARDS)
            log.warning("shard width raised to %d ns to keep at most %d shards", width, MAX_SHARDS)
        aligned = streams is not None and self.shard_ns is None and width % SHARD_ALIGN_NS == 0
        shards = []
        for q in queries:
            for s, e in intervals:
                t = s
                while t < e:
                    u = (t // width + 1) * width if aligned else t + width
                    u = min(e, u)
                    if not aligned and e - u < width // 4:  # do not leave a sliver
                        u = e
                    shards.append(_Shard(self.paginator.new_id(), t, u, query=q))
                    t = u
        # interleave streams so that parallel workers read different streams' chunks at the same time
        shards.sort(key=lambda sh: (sh.start, sh.id))
        return shards

    def checkpoint(self) -> dict[str, Any]:
        # stream shards overlap in time: the union of what is unfinished is what a resume re-reads
        pending = [list(iv) for iv in _merge_intervals([(c, e) for c, e in self._pending.values() if c < e])]
        return {"v": 1, "query": self.query, "start_ns": self._range[0], "end_ns": self._range[1],
                "pending": pending}

    def final_state(self) -> dict[str, Any]:
        return self.checkpoint()

    def _remaining_ns(self) -> int:
        return sum(max(0, e - c) for c, e in self._pending.values())

    # -- iteration -----------------------------------------------------------------------------------
    def _apply(self, msg: _Page | _Split) -> None:
        if isinstance(msg, _Split):
            if msg.keep_end is not None:
                self._pending[msg.shard_id][1] = msg.keep_end
            else:
                self._pending.pop(msg.shard_id, None)
            for c in msg.children:
                self._pending[c.id] = [c.start, c.end]
            return
        if msg.done:
            self._pending.pop(msg.shard_id, None)
        elif msg.shard_id in self._pending:
            self._pending[msg.shard_id][0] = msg.cursor

    def _messages(self, shards: list[_Shard]) -> Iterator[_Page | _Split]:
        return (_run_inline(self.paginator, shards) if self.parallel == 1
                else _Threaded(self.paginator, shards, self.parallel,
                               buffer_pages=-(-self.write_batch // self.batch_size)).messages())

    def _late_streams(self) -> list[_Shard]:
        """Shards for streams that appeared after the plan (a pod restarted while we read): stream
        shards only cover the streams listed up front, so the range is listed again at the end and
        any new stream is read over the whole range. Time shards need no such check."""
        if self.streams is None or not self._intervals:
            return []
        try:
            now = self._stream_list(self._intervals) or []
        except (SourceError, ConfigError):
            return []
        known = {tuple(sorted(st.items())) for st in self._known_streams}
        new = [st for st in now if tuple(sorted(st.items())) not in known]
        if not new:
            return []
        self._known_streams += new
        assert self.paginator.selector is not None
        everyone = list(self._known_streams)
        queries = stream_queries(everyone, self.paginator.selector, self.paginator.pipeline)[-len(new):]
        log.info("%d stream(s) appeared while reading; reading them too", len(new))
        shards = [_Shard(self.paginator.new_id(), s, e, query=q) for q in queries for s, e in self._intervals]
        for sh in shards:
            self._pending[sh.id] = [sh.start, sh.end]
        return shards

    def batches(self) -> Iterator[RawBatch]:
        """Yield batches in the caller's thread; each carries the checkpoint valid once it is stored."""
        if not self._planned:
            self.plan(None)
        shards = [s for s in self._shards if s.start < s.end]
        if not shards:
            return
        # progress in seconds of the range: stream shards cover the range once per stream
        per = max(1, self.streams or 1)
        total_ns = self._remaining_ns()
        bar = _ProgressBar(total_ns // per, enabled=self.progress, desc=f"loki {self.client.identity}")
        source = self.source_id
        pos_prefix = self.query + "@"
        acc = _Entries()
        last_yield = time.monotonic()
        # Ramp up: the first stored batch is one row group, not write_batch, so that parsing and storing
        # start while the rest is still being fetched (a first batch of write_batch lines would leave the
        # writer idle until it is complete); each next one doubles, up to write_batch.
        target = min(self.write_batch, FIRST_WRITE_BATCH)

        def flush() -> RawBatch:
            nonlocal acc, last_yield, target
            e, acc = acc, _Entries()
            last_yield = time.monotonic()
            target = min(self.write_batch, target * 2)
            return RawBatch(source=source, lines=e.lines, ts_ns=e.ts, labels=e.labels,  # type: ignore[arg-type]
                            positions=[f"{pos_prefix}{t}" for t in e.ts], checkpoint=self.checkpoint())

        messages: Iterator[_Page | _Split] | None = None
        try:
            for _round in range(MAX_LATE_ROUNDS + 1):
                self.stop.clear()
                messages = self._messages(shards)
                for msg in messages:
                    self._apply(msg)
                    if isinstance(msg, _Page) and len(msg.entries):
                        acc.extend(msg.entries)
                        self.lines += len(msg.entries)
                    bar.update(max(0, total_ns - self._remaining_ns()) // per, self.lines)
                    # Several pages per batch: each stored batch has a fixed cost (parse setup,
                    # transaction), so writing 5000-line pages one by one would halve throughput. Flush on
                    # size or age so checkpoints stay frequent when Loki is slow.
                    if len(acc) >= target or (
                            len(acc) and time.monotonic() - last_yield >= self.flush_every_s):
                        yield flush()
                shards = self._late_streams()
                if not shards:
                    break
                total_ns += sum(sh.end - sh.start for sh in shards)
            if len(acc):
                yield flush()
        finally:
            self.stop.set()
            close = getattr(messages, "close", None)
            if close is not None:
                close()
            bar.close()


def _merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(i for i in intervals if i[0] < i[1]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


class _ProgressBar:
    """tqdm bar of time covered, with lines and lines/s; ``tqdm.auto`` renders in notebooks too."""

    def __init__(self, total_ns: int, *, enabled: bool, desc: str) -> None:
        self.bar = None
        self.t0 = time.monotonic()
        self.done_s = 0.0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(total_ns / NS, 3), desc=desc, unit="s", leave=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s of range "
                                       "[{elapsed}<{remaining}{postfix}]")

    def update(self, covered_ns: int, lines: int) -> None:
        if self.bar is None:
            return
        covered_s = round(covered_ns / NS, 3)
        self.bar.update(covered_s - self.done_s)
        self.done_s = covered_s
        rate = lines / max(time.monotonic() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{lines:,} lines, {rate:,.0f} lines/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ================================================================================================
# An empty answer, explained
# ================================================================================================
_MATCHER_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|`[^`]*`)')


def explain_empty(client: LokiClient, query: str, start_ns: int, end_ns: int, *, show: int = 8) -> str:
    """Why a range gave no line, from Loki's series/labels API: what *does* exist there.

    Zero records with exit 0 and no word looks like success; a typo in a label value, the wrong tenant
    or a range before the data are the usual causes, and the labels that exist tell which.
    """
    tenant = f"tenant {client.tenant!r}" if client.tenant else "the default tenant"
    head = f"no lines for {tenant}, query {query.strip()} in [{_iso(start_ns)}, {_iso(end_ns)})"
    try:
        selector, pipeline = split_log_query(query)
    except QueryError:
        return head
    try:
        streams = client.series(selector, start_ns, end_ns)
        if streams:
            why = (f"the pipeline{pipeline} kept none" if pipeline.strip()
                   else "they hold no line inside the range")
            return f"{head}: {len(streams)} stream(s) match {selector}, but {why}"
        names = client.labels(start_ns, end_ns)
        if not names:
            return f"{head}: {tenant} has no streams at all in this range (check --org-id and the range)"
        parts = []
        matchers = list(_MATCHER_RE.finditer(selector))
        for name in dict.fromkeys(m.group(1) for m in matchers):
            if name not in names:
                parts.append(f"no label {name!r}")
                continue
            # the values among the streams that the *other* matchers select: what this one could say
            others = [m.group(0) for m in matchers if m.group(1) != name]
            scope = "{" + ", ".join(others) + "}" if others else None
            try:
                values = client.label_values(name, scope, start_ns, end_ns)
            except QueryError:  # e.g. only empty-compatible matchers left
                values = client.label_values(name, None, start_ns, end_ns)
            more = f", ... ({len(values)} values)" if len(values) > show else ""
            parts.append(f"{name} = {', '.join(values[:show])}{more}")
        shown = ", ".join(names[:show * 2]) + (", ..." if len(names) > show * 2 else "")
        found = "; ".join(parts) if parts else f"labels: {shown}"
        return f"{head}: no stream matches {selector}; this range has {found}"
    except (SourceError, ConfigError) as exc:  # the explanation must not turn an empty run into a failure
        return f"{head} (could not list what exists: {str(exc)[:200]})"


# ================================================================================================
# Python API: ingest
# ================================================================================================
def ingest_loki(
    db: str | os.PathLike[str] | Store,
    *,
    query: str,
    url: str | None = None,
    since: str | int | None = None,
    start: str | int | datetime | None = None,
    end: str | int | datetime | None = None,
    parallel: int = DEFAULT_PARALLEL,
    batch_size: int = DEFAULT_BATCH_SIZE,
    write_batch: int = DEFAULT_WRITE_BATCH,
    max_entries: int = LOKI_DEFAULT_MAX_ENTRIES,
    shard: str | int | None = None,
    resume: bool = False,
    resume_overlap: str | int = "60s",
    fmt: str | None = None,
    progress: bool = True,
    org_id: str | None = None,
    tenant: str | None = None,
    http_client: HttpClient | None = None,
    ingest_options: Mapping[str, Any] | None = None,
    **auth: Any,
) -> IngestCounts:
    """Ingest every line of a LogQL range into a meshlens store (the notebook/CLI entry point).

    Args:
        db: store path (opened read-write, snapshot published at the end) or an open :class:`Store`.
        query: LogQL log query, e.g. ``'{namespace="shop", container="istio-proxy"}'``.
        url: Loki base URL (default ``$LOKI_ADDR``).
        since / start / end: the range (``since="2h"`` or ``start=..., end=...``; end defaults to now).
        parallel: worker threads fetching shards concurrently (one writer regardless); shards are one
            stream x whole hours (Loki then decompresses each chunk once), see ``LokiSource._make_shards``.
        batch_size: page size (``limit``); lowered automatically to the server's maximum.
        write_batch: lines per stored batch (pages are coalesced; each batch is one transaction with
            its checkpoint).
        resume: continue from the stored watermark for (url, tenant, query).
        org_id / tenant: ``X-Scope-OrgID`` (default ``$LOKI_ORG_ID``).
        ingest_options: extra keyword arguments for :func:`meshlens.ingest.ingest_batches` (filters,
            sampling, JSON key mapping...).
        **auth: ``username``, ``password``, ``bearer_token``, ``bearer_token_file``, ``headers``,
            ``ca_cert``, ``client_cert``, ``client_key``, ``insecure``, ``timeout_s``, ``max_retries``,
            ``backoff_base_s``, ``backoff_max_s`` (see :func:`loki_http_config`).

    Returns the ingest counts (records read, events stored, duplicates skipped, rejects).
    """
    from meshlens.ingest import ingest

    src = open_loki_source(url, query=query, since=since, start=start, end=end, parallel=parallel,
                           batch_size=batch_size, write_batch=write_batch, max_entries=max_entries, shard=shard,
                           resume_overlap=resume_overlap, progress=progress, org_id=org_id or tenant,
                           http_client=http_client, **auth)
    return ingest(db, src, resume=resume, fmt=fmt, **(ingest_options or {}))


def open_loki_source(
    url: str | None = None,
    *,
    query: str,
    since: str | int | None = None,
    start: str | int | datetime | None = None,
    end: str | int | datetime | None = None,
    parallel: int = DEFAULT_PARALLEL,
    batch_size: int = DEFAULT_BATCH_SIZE,
    write_batch: int = DEFAULT_WRITE_BATCH,
    max_entries: int = LOKI_DEFAULT_MAX_ENTRIES,
    shard: str | int | None = None,
    resume_overlap: str | int = "60s",
    progress: bool = True,
    org_id: str | None = None,
    http_client: HttpClient | None = None,
    **auth: Any,
) -> LokiSource:
    """Registry factory (``loki``, ``loki://``, ``loki+https://``): a :class:`LokiSource` for a range.

    Options as :func:`ingest_loki`; the HTTP client it creates is closed with the source."""
    start_ns, end_ns = resolve_range(since, start, end)
    own_http = http_client is None
    if http_client is None:
        cfg, org = loki_http_config(url or None, org_id=org_id, **auth)
        http_client = HttpClient(cfg, LOKI_PRODUCT)
    else:
        org = org_id or http_client.cfg.headers.get("X-Scope-OrgID")
    try:
        src = LokiSource(
            LokiClient(http_client, org), query, start_ns, end_ns, parallel=parallel, batch_size=batch_size,
            max_entries=max_entries, shard_ns=parse_duration(shard) if shard is not None else None,
            resume_overlap_ns=parse_duration(resume_overlap), progress=progress, write_batch=write_batch,
        )
    except BaseException:
        if own_http:
            http_client.close()
        raise
    src.owned_http = http_client if own_http else None
    return src


# ================================================================================================
# Push-down aggregation
# ================================================================================================
ISTIO_TEXT_REGEXP = (
    r'"(?P<method>\S+) \S+ \S+" (?P<response_code>\d+) (?P<response_flags>\S+) (?P<response_code_details>\S+) '
    r'\S+ "[^"]*" \d+ \d+ (?P<duration>\d+) \S+ "[^"]*" "[^"]*" "[^"]*" "(?P<authority>[^"]*)" "[^"]*" '
    r"(?P<upstream_cluster>\S+)"
)
PARSERS = {
    "json": "| json",
    # Istio >= 1.9 default TEXT format (formats.md 1.1); backticks: a raw LogQL string
    "text": f"| regexp `{ISTIO_TEXT_REGEXP}`",
}
SERIES_RENAME = {"app": "service", "response_code": "status", "response_flags": "flags"}


@dataclass(frozen=True)
class MetricPreset:
    """A LogQL metric query template for Istio access logs (``{selector}``, ``{parser}``, ``{range}``)."""

    metric: str
    template: str
    doc: str


PRESETS: dict[str, MetricPreset] = {p.metric: p for p in (
    MetricPreset(
        "requests",
        'sum by (namespace, app, response_code, response_flags) (count_over_time({selector} {parser} '
        '| __error__="" [{range}]))',
        "Requests per service (stream label app), status and response flags.",
    ),
    MetricPreset(
        "errors_5xx",
        'sum by (namespace, app, response_code, response_flags) (count_over_time({selector} {parser} '
        '| __error__="" | response_code=~"5.." [{range}]))',
        "5xx responses per service, status and flags.",
    ),
    MetricPreset(
        "authz_denials",
        'sum by (namespace, app) (count_over_time({selector} {parser} | __error__="" | response_code="403" '
        '| response_code_details=~"rbac_access_denied.*" [{range}]))',
        "RBAC denials (403 rbac_access_denied_*) per service.",
    ),
    MetricPreset(
        "p50_duration_ms",
        'quantile_over_time(0.5, {selector} {parser} | __error__="" | unwrap duration | __error__="" '
        "[{range}]) by (namespace, app)",
        "Median request duration (ms) per service.",
    ),
    MetricPreset(
        "p99_duration_ms",
        'quantile_over_time(0.99, {selector} {parser} | __error__="" | unwrap duration | __error__="" '
        "[{range}]) by (namespace, app)",
        "99th percentile request duration (ms) per service.",
    ),
)}
DEFAULT_METRICS = ("requests", "errors_5xx", "p99_duration_ms")
DEFAULT_SPLIT_LABELS = ("namespace", "app", "pod")
MAX_POINTS = 11000


@dataclass
class AggregateCounts(_AggregateCounts):
    """What an aggregation stored, and the access-log encoding the presets were rendered for."""

    log_format: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "log_format": self.log_format}


def render_preset(name: str, selector: str, step_ns: int, log_format: str) -> str:
    if name not in PRESETS:
        raise ConfigError(f"unknown metric preset {name!r}; choose from {', '.join(PRESETS)} or pass a custom query")
    if log_format not in PARSERS:
        raise ConfigError(f"unknown log format {log_format!r}; use json, text or auto")
    return PRESETS[name].template.format(selector=selector.strip(), parser=PARSERS[log_format],
                                         range=_prom_range(step_ns))


def _prom_range(ns: int) -> str:
    for unit, size in (("d", 86400 * NS), ("h", 3600 * NS), ("m", 60 * NS), ("s", NS), ("ms", 1_000_000)):
        if ns % size == 0:
            return f"{ns // size}{unit}"
    raise ConfigError(f"step {ns} ns is not a whole number of milliseconds")


def detect_log_format(client: LokiClient, selector: str, start_ns: int, end_ns: int, sample: int = 50) -> str | None:
    """``json`` or ``text`` from a sample of the newest lines (None when the range is empty)."""
    try:
        data = client.query_range(selector, start_ns, end_ns, limit=sample, direction="backward")
    except _SplitSignal:  # a long range can time out even for 50 lines: sample the last 15 minutes
        try:
            data = client.query_range(selector, max(start_ns, end_ns - 900 * NS), end_ns, limit=sample,
                                      direction="backward")
        except _SplitSignal:
            log.warning("cannot sample lines to detect the log format; assuming Istio's TEXT format")
            return None
    lines = parse_streams(data).lines
    if not lines:
        return None
    js = sum(1 for ln in lines if ln.lstrip().startswith("{"))
    return "json" if js * 2 >= len(lines) else "text"


class MetricRunner:
    """Runs one metric query over a range, splitting on Loki's limits; returns matrix items."""

    def __init__(self, client: LokiClient, step_ns: int, split_labels: Sequence[str] = DEFAULT_SPLIT_LABELS) -> None:
        self.client = client
        self.step_ns = step_ns
        self.split_labels = tuple(split_labels)
        self.queries = 0

    def run(self, query: str, start_ns: int, end_ns: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        chunk = self.step_ns * (MAX_POINTS - 1)
        t = start_ns
        while t <= end_ns:
            u = min(end_ns, t + chunk)
            out += self._run(query, t, u, 0)
            t = u + self.step_ns
        return out

    def _run(self, query: str, start_ns: int, end_ns: int, depth: int) -> list[dict[str, Any]]:
        self.queries += 1
        try:
            data = self.client.query_range(query, start_ns, end_ns, step_s=self.step_ns / NS)
        except _SplitSignal as sig:
            if sig.reason == "series" and depth < len(self.split_labels):
                return self._split_by_label(query, start_ns, end_ns, depth, sig)
            steps = (end_ns - start_ns) // self.step_ns
            if steps >= 1:
                mid = start_ns + (steps // 2) * self.step_ns
                log.info("Loki refused the metric query (%s); splitting the time range", sig.reason)
                return self._run(query, start_ns, mid, depth) + self._run(query, mid + self.step_ns, end_ns, depth)
            raise QueryError(
                f"Loki refused the metric query even for one step and one label value: {sig.message}. "
                "Group by fewer labels or narrow the selector.",
                status=sig.status,
            ) from None
        if data.get("resultType") != "matrix":
            raise QueryError(
                f"Loki returned a {data.get('resultType')!r} result; aggregation needs a metric query "
                "(e.g. sum by (app) (count_over_time({...}[1m])))."
            )
        return list(data.get("result") or [])

    def _split_by_label(self, query: str, start_ns: int, end_ns: int, depth: int,
                        sig: _SplitSignal) -> list[dict[str, Any]]:
        label = self.split_labels[depth]
        spans = selector_spans(query)
        selector = query[spans[0][0]:spans[0][1] + 1] if spans else None
        try:
            values = self.client.label_values(label, selector, start_ns - self.step_ns, end_ns)
        except _SplitSignal:
            return self._run(query, start_ns, end_ns, len(self.split_labels))  # time splits only
        log.info("Loki series limit hit (%s); splitting on %s (%d values)", sig.message[:120], label, len(values))
        out: list[dict[str, Any]] = []
        for v in [*values, ""]:
            out += self._run(add_matcher(query, label, "=", v), start_ns, end_ns, depth + 1)
        return out


def matrix_to_series(result: list[dict[str, Any]], *, metric: str, origin: str, step_ns: int,
                     rename: Mapping[str, str] | None = None) -> pa.Table:
    """Loki matrix items -> rows of the ``series`` table (ts = bucket start = eval time - step)."""
    import pyarrow as pa

    from meshlens.schema import SERIES_COLUMNS

    rename = SERIES_RENAME if rename is None else rename
    keys, tss, metrics, labels, values, steps, origins = [], [], [], [], [], [], []
    step_s = step_ns / NS
    for item in result:
        lb = {rename.get(k, k): str(v) for k, v in (item.get("metric") or {}).items()}
        canon = json.dumps(sorted(lb.items()), separators=(",", ":"))
        skey = hashlib.md5(f"{origin}|{metric}|{canon}".encode()).hexdigest()
        items = sorted(lb.items())
        for t, v in item.get("values") or []:
            ts_ns = round(float(t) * 1000) * 1_000_000 - step_ns
            keys.append(skey)
            tss.append(ts_ns // 1000)
            metrics.append(metric)
            labels.append(items)
            values.append(float(v))
            steps.append(step_s)
            origins.append(origin)
    arrays = [
        pa.array(keys, pa.string()),
        pa.array(tss, pa.timestamp("us", tz="UTC")),
        pa.array(metrics, pa.string()),
        pa.array(labels, pa.map_(pa.string(), pa.string())),
        pa.array(values, pa.float64()),
        pa.array(steps, pa.float64()),
        pa.array(origins, pa.string()),
    ]
    return pa.Table.from_arrays(arrays, names=[c.name for c in SERIES_COLUMNS])


def aggregate_loki(
    db: str | os.PathLike[str] | Store,
    *,
    selector: str | None = None,
    url: str | None = None,
    since: str | int | None = None,
    start: str | int | datetime | None = None,
    end: str | int | datetime | None = None,
    step: str | int = "1m",
    metrics: Sequence[str] | None = None,
    query: str | None = None,
    metric_name: str | None = None,
    log_format: str = "auto",
    split_labels: Sequence[str] = DEFAULT_SPLIT_LABELS,
    org_id: str | None = None,
    tenant: str | None = None,
    http_client: HttpClient | None = None,
    **auth: Any,
) -> AggregateCounts:
    """Run LogQL metric queries in Loki and store the resulting time series in ``series``.

    Either ``selector`` (a stream selector such as ``'{namespace="shop", container="istio-proxy"}'``) with
    preset ``metrics`` (default: requests, errors_5xx, p99_duration_ms; see :data:`PRESETS`), or a custom
    metric ``query`` stored under ``metric_name``. ``log_format`` (``json``/``text``/``auto``) picks the
    LogQL parser for the presets; ``auto`` samples the newest lines. Series labels from the presets are
    renamed ``app``->``service``, ``response_code``->``status``, ``response_flags``->``flags``.
    Re-running is idempotent (upsert on series key + ts).
    """
    from meshlens.ingest import store_series
    from meshlens.store import writing

    if (selector is None) == (query is None):
        raise ConfigError("give either a selector with preset metrics, or a custom metric --query")
    if query is not None and not metric_name:
        raise ConfigError("a custom metric query needs a --metric name to store it under")
    start_ns, end_ns = resolve_range(since, start, end)
    step_ns = parse_duration(step)
    if step_ns < 1_000_000:
        raise ConfigError(f"step {step!r} is too small; use e.g. 30s, 1m, 5m")
    own_http = http_client is None
    if http_client is None:
        cfg, org = loki_http_config(url, org_id=org_id or tenant, **auth)
        http_client = HttpClient(cfg, LOKI_PRODUCT)
    else:
        org = org_id or tenant or http_client.cfg.headers.get("X-Scope-OrgID")
    client = LokiClient(http_client, org)
    counts = AggregateCounts()
    # Align evaluation times to the step so re-runs and adjacent runs hit the same bucket timestamps.
    eval_start = ((start_ns + step_ns - 1) // step_ns) * step_ns + step_ns
    eval_end = (end_ns // step_ns) * step_ns
    jobs: list[tuple[str, str, Mapping[str, str]]] = []
    if query is not None:
        jobs.append((str(metric_name), query.strip(), {}))
    else:
        sel = (selector or "").strip()
        split_log_query(sel)  # validates it is a selector
        fmt = log_format
        if fmt == "auto":
            fmt = detect_log_format(client, sel, start_ns, end_ns) or "text"
        counts.log_format = fmt
        for name in metrics or DEFAULT_METRICS:
            jobs.append((name, render_preset(name, sel, step_ns, fmt), SERIES_RENAME))
    try:
        with writing(db) as store:
            runner = MetricRunner(client, step_ns, split_labels)
            for name, q, rename in jobs:
                if eval_end < eval_start:
                    break
                result = runner.run(q, eval_start, eval_end)
                origin = source_identity(client.identity, org, q)
                table = matrix_to_series(result, metric=name, origin=origin, step_ns=step_ns, rename=rename)
                store_series(store, table, counts)
            counts.queries = runner.queries
        return counts
    finally:
        if own_http:
            http_client.close()


__all__ = [
    "AggregateCounts", "LokiClient", "LokiSource", "MetricPreset", "PRESETS", "Paginator", "add_matcher",
    "aggregate_loki", "classify_error", "explain_empty", "exact_selector", "ingest_loki", "loki_http_config", "parse_duration",
    "parse_time", "resolve_range", "source_identity", "split_log_query",
]
