"""An in-process, threaded HTTP server that behaves like Grafana Loki's HTTP API (for tests/benchmarks).

Loki cannot run in CI, so this server reproduces what meshlens depends on, from Loki's API docs
(``docs/sources/reference/loki-http-api.md``) and source (``pkg/loghttp``, ``pkg/util/server/error.go``,
``pkg/logqlmodel/error.go``, ``pkg/util/validation``, ``pkg/chunkenc/unordered.go``), summarised in
``/work/shared/formats.md`` sections 5-6:

* ``GET|POST /loki/api/v1/query_range`` -- log queries (``streams``) and metric queries (``matrix``);
  ``start`` inclusive, ``end`` exclusive, ``limit`` default 100, ``direction`` default backward, ``step``
  default ``max(floor(range_s/250), 1)``; timestamps parsed like ``pkg/loghttp/params.go`` (a float is
  seconds rounded to ms, an integer of <= 10 digits is seconds, otherwise ns, else RFC3339Nano);
* ``GET /loki/api/v1/query`` (instant; log queries are rejected like Loki does), ``/labels``,
  ``/label/<name>/values``, ``GET|POST /series``, ``POST /push`` (JSON, optionally gzip), ``/ready``;
* limits with Loki's exact plain-text 400 bodies: ``max_entries_limit_per_query`` (5000),
  ``max_query_length`` (721h), ``max_query_series`` (500), the 11,000-points guard, "query too large to
  execute on a single querier" (by bytes), and query timeouts as 504;
* tenants (``X-Scope-OrgID``; with ``auth_enabled`` a missing header is 401 ``no org id``; ``a|b``
  multi-tenant queries add ``__tenant_id__``), and a gateway's basic-auth / bearer checks (401);
* on push, an entry identical in timestamp *and* line to one already stored in the stream is dropped
  (``unorderedHeadBlock.Append``);
* fault injection: status storms with ``Retry-After``, connections dropped mid-body, slow responses.

LogQL is a subset, enough for what meshlens sends: stream selectors (``= != =~ !~``), line filters
(``|= != |~ !~``), ``| json``, ``| regexp``, ``| pattern``, label filters (string and numeric),
``| label_format`` (templates: text, ``.label``, ``len``, ``trunc``, ``if hasPrefix``), ``| unwrap``, the range aggregations ``count_over_time rate bytes_over_time sum_over_time avg_over_time
min_over_time max_over_time quantile_over_time`` (with ``by``/``without``) and the vector aggregations
``sum count min max avg`` (``by``/``without``). Anything else is answered like Loki answers a query it
cannot parse: 400 ``parse error at line 1, col N: syntax error: unexpected ...``.

Run standalone (used by ``benchmarks/bench_loki.py``)::

    python -m tests.servers.loki --lines 1000000 --streams 40 --latency-ms 250
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gzip
import heapq
import itertools
import json
import math
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from base64 import b64decode
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NS = 1_000_000_000
HOUR_NS = 3600 * NS
DEFAULT_TENANT = "fake"  # Loki's tenant id when auth_enabled is false

# --- Loki's messages, verbatim ------------------------------------------------------------------
ERR_MAX_ENTRIES = "max entries limit per query exceeded, limit > max_entries_limit_per_query ({} > {})"
ERR_QUERY_TOO_LONG = "the query time range exceeds the limit (query length: {}, limit: {})"
ERR_SERIES_LIMIT = (
    "maximum number of series ({}) reached for a single query; consider reducing query cardinality by "
    "adding more specific stream selectors, reducing the time range, or aggregating results with functions "
    "like sum(), count() or topk()"
)
ERR_TOO_LARGE = "query too large to execute on a single querier: (query: {}, limit: {})"
ERR_DEADLINE = (
    "request timed out, decrease the duration of the request or add more label matchers (prefer exact "
    "match over regex match) to reduce the amount of data processed"
)
ERR_NO_ORG_ID = "no org id"
ERR_MULTIPLE_ORGS = "multiple org IDs present"  # 500, text/plain, no newline (real Loki main-65e30f8)
ERR_END_BEFORE_START = "end timestamp must not be before or equal to start time"
ERR_STEP_TOO_SMALL = (
    "exceeded maximum resolution of 11,000 points per time series. Try increasing the value of the step "
    "parameter"
)
ERR_ZERO_STEP = "zero or negative query resolution step widths are not accepted. Try a positive integer"
ERR_LIMIT_POSITIVE = "limit must be a positive value"
ERR_INSTANT_LOG = (
    "log queries are not supported as an instant query type, please change your query to a range query type"
)
ERR_EMPTY_MATCHERS = (
    "parse error : queries require at least one regexp or equality matcher that does not have an "
    "empty-compatible value. For instance, app=~\".*\" does not meet this requirement, but app=~\".+\" will"
)
ERR_PIPELINE = (
    "pipeline error: '{}' for series: '{}'.\n"
    "Use a label filter to intentionally skip this error. (e.g | __error__!=\"{}\").\n"
    "To skip all potential errors you can match empty errors.(e.g __error__=\"\")\n"
    "The label filter can also be specified after unwrap. (e.g | unwrap latency | __error__=\"\" )\n"
)


class LokiHTTPError(Exception):
    """An error answered as Loki does: plain-text body with a status code."""

    def __init__(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(body)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _bad(msg: str) -> LokiHTTPError:
    return LokiHTTPError(400, msg)


# ================================================================================================
# Durations and timestamps
# ================================================================================================
_DUR_UNITS = {"ms": NS // 1000, "s": NS, "m": 60 * NS, "h": HOUR_NS, "d": 24 * HOUR_NS,
              "w": 7 * 24 * HOUR_NS, "y": 365 * 24 * HOUR_NS}
_DUR_RE = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def parse_prom_duration(text: str) -> int | None:
    """Prometheus ``model.ParseDuration`` (``1h30m``, ``5m``, ``500ms``) -> ns, or None."""
    if not text:
        return None
    pos, total = 0, 0
    for m in _DUR_RE.finditer(text):
        if m.start() != pos:
            return None
        total += int(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and pos > 0 else None


def go_duration(ns: int) -> str:
    """Go's ``time.Duration.String()`` for whole-ish durations (``745h0m0s``, ``1.5s``)."""
    if ns < NS:
        return f"{ns / 1e6:g}ms" if ns >= 1_000_000 else f"{ns}ns"
    h, rem = divmod(ns, HOUR_NS)
    m, rem = divmod(rem, 60 * NS)
    s = rem / NS
    s_txt = f"{s:g}s"
    if h:
        return f"{h}h{m}m{s_txt}"
    if m:
        return f"{m}m{s_txt}"
    return s_txt


def prom_duration(ns: int) -> str:
    """Prometheus ``model.Duration.String()`` (``30d1h``; years/weeks only when exact, ``90d`` not ``12w6d``)."""
    if ns == 0:
        return "0s"
    out = []
    for unit in ("y", "w", "d", "h", "m", "s", "ms"):
        size = _DUR_UNITS[unit]
        if unit in ("y", "w") and ns % size:
            continue
        n, ns = divmod(ns, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


def parse_loki_time(value: str | None, default: int) -> int:
    """``pkg/loghttp/params.go`` ``parseTimestamp`` semantics, in ns."""
    if value is None or value == "":
        return default
    if "." in value:
        try:
            t = float(value)
        except ValueError:
            pass
        else:
            s = math.floor(t)
            frac = round((t - s) * 1000) / 1000
            return int(s) * NS + int(round(frac * NS))
    try:
        n = int(value)
    except ValueError:
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise _bad(f'cannot parse "{value}" to a valid timestamp') from exc
        return int(dt.timestamp()) * NS + dt.microsecond * 1000
    return n * NS if len(value) <= 10 else n


def parse_step(value: str | None, start: int, end: int) -> int:
    if not value:
        return max(math.floor((end - start) / NS / 250), 1) * NS
    try:
        return int(float(value) * NS)
    except ValueError:
        pass
    d = parse_prom_duration(value)
    if d is None:
        raise _bad(f'cannot parse "{value}" to a valid duration')
    return d


def _fmt_value(v: float) -> str:
    """Go ``strconv.FormatFloat(v, 'f', -1, 64)``."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e21:
        return str(int(v))
    text = repr(v)
    if "e" in text:
        from decimal import Decimal

        text = format(Decimal(text), "f")
    return text


def _fmt_ts_seconds(ns: int) -> int | float:
    ms = ns // 1_000_000
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


# ================================================================================================
# LogQL subset: lexer
# ================================================================================================
@dataclass
class Tok:
    kind: str  # IDENT STRING NUMBER DURATION OP EOF
    text: str
    pos: int  # 0-based offset
    value: Any = None


_OPS = ["|=", "|~", "!=", "!~", "=~", "==", ">=", "<=", "{", "}", "(", ")", "[", "]", ",", "|", "=", ">", "<"]
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:]*")
_NUM_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_GO_ESC = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
           '"': '"', "'": "'"}


class LogQLParseError(Exception):
    def __init__(self, pos: int | None, msg: str) -> None:
        super().__init__(msg)
        self.pos = pos
        self.msg = msg

    def loki_message(self) -> str:
        if self.pos is None:
            return f"parse error : {self.msg}"
        return f"parse error at line 1, col {self.pos + 1}: {self.msg}"


def _unquote_go(body: str, pos: int) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(body):
            raise LogQLParseError(pos, "invalid syntax")
        e = body[i + 1]
        if e in _GO_ESC:
            out.append(_GO_ESC[e])
            i += 2
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i + 2:i + 2 + width]
            if len(digits) != width or not all(ch in "0123456789abcdefABCDEF" for ch in digits):
                raise LogQLParseError(pos, "invalid syntax")
            out.append(chr(int(digits, 16)))
            i += 2 + width
        elif e in "01234567":
            digits = body[i + 1:i + 4]
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise LogQLParseError(pos, "invalid char escape")
    return "".join(out)


def lex(src: str) -> list[Tok]:
    toks: list[Tok] = []
    i = 0
    n = len(src)
    while i < n:
        c = src[i]
        if c.isspace():
            i += 1
            continue
        if c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            if j >= n:
                raise LogQLParseError(i, "literal not terminated")
            toks.append(Tok("STRING", src[i:j + 1], i, _unquote_go(src[i + 1:j], i)))
            i = j + 1
            continue
        if c == "`":
            j = src.find("`", i + 1)
            if j < 0:
                raise LogQLParseError(i, "literal not terminated")
            toks.append(Tok("STRING", src[i:j + 1], i, src[i + 1:j]))
            i = j + 1
            continue
        if c.isdigit():
            m = re.compile(r"(?:\d+(?:ms|s|m|h|d|w|y))+").match(src, i)
            if m and (m.end() == n or not src[m.end()].isalnum()):
                toks.append(Tok("DURATION", m.group(0), i, parse_prom_duration(m.group(0))))
                i = m.end()
                continue
            m = _NUM_RE.match(src, i)
            assert m
            toks.append(Tok("NUMBER", m.group(0), i, float(m.group(0))))
            i = m.end()
            continue
        m = _IDENT_RE.match(src, i)
        if m:
            toks.append(Tok("IDENT", m.group(0), i, m.group(0)))
            i = m.end()
            continue
        for op in _OPS:
            if src.startswith(op, i):
                toks.append(Tok("OP", op, i, op))
                i += len(op)
                break
        else:
            raise LogQLParseError(i, f"syntax error: unexpected character: '{c}'")
    toks.append(Tok("EOF", "", n))
    return toks


# ================================================================================================
# LogQL subset: AST + parser
# ================================================================================================
@dataclass
class Matcher:
    name: str
    op: str
    value: str
    rx: re.Pattern[str] | None = None

    def matches(self, labels: dict[str, str]) -> bool:
        v = labels.get(self.name, "")
        if self.op == "=":
            return v == self.value
        if self.op == "!=":
            return v != self.value
        assert self.rx is not None
        hit = self.rx.fullmatch(v) is not None
        return hit if self.op == "=~" else not hit


@dataclass
class Stage:
    kind: str  # line, json, regexp, pattern, label, label_format, unwrap
    op: str = ""
    value: Any = None
    rx: re.Pattern[str] | None = None


@dataclass
class LogExpr:
    matchers: list[Matcher]
    stages: list[Stage]


@dataclass
class RangeAgg:
    fn: str
    log: LogExpr
    range_ns: int
    unwrap: str | None = None
    post: list[Stage] = field(default_factory=list)
    param: float | None = None
    grouping: tuple[str, tuple[str, ...]] | None = None


@dataclass
class VectorAgg:
    fn: str
    inner: RangeAgg | VectorAgg
    grouping: tuple[str, tuple[str, ...]] | None = None


RANGE_FNS = {"count_over_time", "rate", "bytes_over_time", "bytes_rate", "sum_over_time", "avg_over_time",
             "min_over_time", "max_over_time", "quantile_over_time"}
UNWRAP_FNS = {"sum_over_time", "avg_over_time", "min_over_time", "max_over_time", "quantile_over_time"}
VECTOR_FNS = {"sum", "count", "min", "max", "avg"}


def re2_to_python(rx: str) -> str:
    r"""Translate the RE2 spellings meshlens and users commonly send to Python ``re`` (``\x{..}``, ``\z``)."""
    rx = re.sub(r"\\x\{([0-9A-Fa-f]+)\}", lambda m: f"\\U{int(m.group(1), 16):08x}", rx)
    return rx.replace(r"\z", r"\Z")


def _compile(rx: str, pos: int) -> re.Pattern[str]:
    try:
        return re.compile(re2_to_python(rx))
    except re.error as exc:
        raise LogQLParseError(pos, f"error parsing regexp: {exc}: `{rx}`") from exc


class Parser:
    def __init__(self, src: str) -> None:
        self.toks = lex(src)
        self.i = 0

    def peek(self, k: int = 0) -> Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> Tok:
        t = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return t

    def unexpected(self, t: Tok, expecting: str = "") -> LogQLParseError:
        what = {"EOF": "$end", "IDENT": "IDENTIFIER", "STRING": "STRING", "NUMBER": "NUMBER",
                "DURATION": "RANGE"}.get(t.kind, t.text)
        msg = f"syntax error: unexpected {what}"
        if expecting:
            msg += f", expecting {expecting}"
        return LogQLParseError(t.pos, msg)

    def expect(self, text: str) -> Tok:
        t = self.next()
        if t.kind != "OP" or t.text != text:
            raise self.unexpected(t, text)
        return t

    # entry point
    def parse(self) -> LogExpr | RangeAgg | VectorAgg:
        e = self.parse_expr()
        t = self.peek()
        if t.kind != "EOF":
            raise self.unexpected(t)
        return e

    def parse_expr(self) -> LogExpr | RangeAgg | VectorAgg:
        t = self.peek()
        if t.kind == "OP" and t.text == "{":
            return self.parse_log()
        if t.kind == "IDENT" and t.text in RANGE_FNS:
            return self.parse_range()
        if t.kind == "IDENT" and t.text in VECTOR_FNS:
            return self.parse_vector()
        raise self.unexpected(t)

    def parse_selector(self) -> list[Matcher]:
        self.expect("{")
        ms: list[Matcher] = []
        while True:
            t = self.next()
            if t.kind == "OP" and t.text == "}" and not ms:
                raise LogQLParseError(t.pos, "syntax error: unexpected }, expecting IDENTIFIER")
            if t.kind != "IDENT":
                raise self.unexpected(t, "IDENTIFIER")
            op = self.next()
            if op.kind != "OP" or op.text not in ("=", "!=", "=~", "!~"):
                raise self.unexpected(op, "= or != or =~ or !~")
            v = self.next()
            if v.kind != "STRING":
                raise self.unexpected(v, "STRING")
            rx = _compile(v.value, v.pos) if op.text in ("=~", "!~") else None
            ms.append(Matcher(t.text, op.text, v.value, rx))
            sep = self.next()
            if sep.kind == "OP" and sep.text == "}":
                break
            if sep.kind != "OP" or sep.text != ",":
                raise self.unexpected(sep, ", or }")
        if not any(m.op in ("=", "=~") and not (m.rx.fullmatch("") if m.rx else m.value == "") for m in ms):
            raise LogQLParseError(None, ERR_EMPTY_MATCHERS.removeprefix("parse error : "))
        return ms

    def parse_log(self, allow_unwrap: bool = False) -> LogExpr:
        ms = self.parse_selector()
        stages: list[Stage] = []
        while True:
            t = self.peek()
            if t.kind != "OP" or t.text not in ("|=", "|~", "!=", "!~", "|"):
                break
            self.next()
            if t.text != "|":
                v = self.next()
                if v.kind != "STRING":
                    raise self.unexpected(v, "STRING")
                rx = _compile(v.value, v.pos) if t.text in ("|~", "!~") else None
                stages.append(Stage("line", t.text, v.value, rx))
                continue
            stages.append(self.parse_stage(allow_unwrap))
        return LogExpr(ms, stages)

    def parse_stage(self, allow_unwrap: bool) -> Stage:
        t = self.next()
        if t.kind != "IDENT":
            raise self.unexpected(t)
        nxt = self.peek()
        is_filter = nxt.kind == "OP" and nxt.text in ("=", "!=", "=~", "!~", "==", ">", ">=", "<", "<=")
        if t.text == "json" and not is_filter:
            if self.peek().kind == "IDENT":
                raise self.unexpected(self.peek())  # json with parameters: not supported here
            return Stage("json")
        if t.text in ("regexp", "pattern") and not is_filter:
            v = self.next()
            if v.kind != "STRING":
                raise self.unexpected(v, "STRING")
            if t.text == "regexp":
                rx = _compile(v.value, v.pos)
                if not rx.groupindex:
                    raise LogQLParseError(None, f"stage '| regexp \"{v.value}\"' : at least one named "
                                                "capture must be supplied")
                return Stage("regexp", value=v.value, rx=rx)
            return Stage("pattern", value=v.value, rx=_pattern_to_regex(v.value, v.pos))
        if t.text == "unwrap" and not is_filter:
            if not allow_unwrap:
                raise self.unexpected(t)
            lbl = self.next()
            if lbl.kind != "IDENT":
                raise self.unexpected(lbl, "IDENTIFIER")
            return Stage("unwrap", value=lbl.text)
        if t.text == "label_format" and not is_filter:
            formats: list[tuple[str, list[Any]]] = []
            while True:
                dst = self.next()
                if dst.kind != "IDENT":
                    raise self.unexpected(dst, "IDENTIFIER")
                self.expect("=")
                v = self.next()
                if v.kind != "STRING":  # a rename (dst=src) is real LogQL; this server takes templates only
                    raise self.unexpected(v, "STRING")
                formats.append((dst.text, _parse_template(v.value)))
                if not (self.peek().kind == "OP" and self.peek().text == ","):
                    break
                self.next()
            return Stage("label_format", value=formats)
        if t.text in ("logfmt", "line_format", "drop", "keep", "decolorize", "unpack"):
            raise self.unexpected(t)  # real Loki supports these; this test server does not
        if not is_filter:
            raise self.unexpected(nxt, "=, !=, =~, !~, >, >=, <, <=, ==")
        op = self.next()
        v = self.next()
        if op.text in ("=~", "!~"):
            if v.kind != "STRING":
                raise self.unexpected(v, "STRING")
            return Stage("label", op.text, (t.text, v.value), _compile(v.value, v.pos))
        if v.kind == "STRING" and op.text in ("=", "!="):
            return Stage("label", op.text, (t.text, v.value))
        if v.kind == "NUMBER":
            return Stage("label", "num" + op.text, (t.text, v.value))
        raise self.unexpected(v, "STRING or NUMBER")

    def parse_grouping(self) -> tuple[str, tuple[str, ...]] | None:
        t = self.peek()
        if t.kind == "IDENT" and t.text in ("by", "without"):
            self.next()
            self.expect("(")
            names: list[str] = []
            while True:
                n = self.next()
                if n.kind == "OP" and n.text == ")" and not names:
                    break
                if n.kind != "IDENT":
                    raise self.unexpected(n, "IDENTIFIER")
                names.append(n.text)
                s = self.next()
                if s.kind == "OP" and s.text == ")":
                    break
                if s.kind != "OP" or s.text != ",":
                    raise self.unexpected(s, ", or )")
            return (t.text, tuple(names))
        return None

    def parse_range(self) -> RangeAgg:
        fn = self.next().text
        self.expect("(")
        param = None
        if fn == "quantile_over_time":
            p = self.next()
            if p.kind != "NUMBER":
                raise self.unexpected(p, "NUMBER")
            param = p.value
            self.expect(",")
        log = self.parse_log(allow_unwrap=fn in UNWRAP_FNS or fn == "rate")
        unwrap = None
        post: list[Stage] = []
        stages = log.stages
        for k, st in enumerate(stages):
            if st.kind == "unwrap":
                unwrap = st.value
                post = stages[k + 1:]
                log.stages = stages[:k]
                if any(p.kind != "label" for p in post):
                    raise LogQLParseError(None, "only label filters are allowed after unwrap")
                break
        if fn in UNWRAP_FNS and unwrap is None:
            raise LogQLParseError(None, f"invalid aggregation {fn} without unwrap")
        if fn in ("count_over_time", "bytes_over_time", "bytes_rate") and unwrap is not None:
            raise LogQLParseError(None, f"invalid aggregation {fn} with unwrap")
        r = self.next()
        if r.kind == "OP" and r.text == "[":
            d = self.next()
            if d.kind != "DURATION":
                raise self.unexpected(d, "RANGE")
            self.expect("]")
            range_ns = d.value
        else:
            raise self.unexpected(r, "[")
        self.expect(")")
        grouping = self.parse_grouping()
        if grouping and fn not in UNWRAP_FNS:
            raise LogQLParseError(None, f"grouping not allowed for {fn} aggregation")
        return RangeAgg(fn, log, range_ns, unwrap, post, param, grouping)

    def parse_vector(self) -> VectorAgg:
        fn = self.next().text
        grouping = self.parse_grouping()
        self.expect("(")
        t = self.peek()
        if t.kind == "IDENT" and t.text in RANGE_FNS:
            inner: RangeAgg | VectorAgg = self.parse_range()
        elif t.kind == "IDENT" and t.text in VECTOR_FNS:
            inner = self.parse_vector()
        else:
            raise self.unexpected(t)
        self.expect(")")
        after = self.parse_grouping()
        if grouping and after:
            raise self.unexpected(self.toks[self.i - 1])
        return VectorAgg(fn, inner, grouping or after)


def _pattern_to_regex(p: str, pos: int) -> re.Pattern[str]:
    parts = re.split(r"(<[A-Za-z_][A-Za-z0-9_]*>)", p)
    out = ["^"]
    captures = 0
    names: set[str] = set()
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
            continue
        name = part[1:-1]
        last = i == len(parts) - 2 and parts[-1] == ""
        body = ".*" if last else ".*?"
        if name == "_":
            out.append(body)
        else:
            if name in names:
                raise LogQLParseError(None, f"stage '| pattern \"{p}\"' : duplicate capture name ({name})")
            names.add(name)
            captures += 1
            out.append(f"(?P<{name}>{body})")
    if not captures:
        raise LogQLParseError(None, f"stage '| pattern \"{p}\"' : at least one capture is required")
    return re.compile("".join(out), re.S)


def parse_logql(q: str) -> LogExpr | RangeAgg | VectorAgg:
    return Parser(q).parse()


# ================================================================================================
# Pipeline evaluation
# ================================================================================================
_LABEL_BAD = re.compile(r"[^A-Za-z0-9_]")


def _sanitize(key: str) -> str:
    key = _LABEL_BAD.sub("_", key)
    return "_" + key if key[:1].isdigit() else key


def _flatten_json(obj: dict[str, Any], prefix: str, out: dict[str, str]) -> None:
    for k, v in obj.items():
        key = _sanitize(prefix + k)
        if isinstance(v, dict):
            _flatten_json(v, key + "_", out)
        elif isinstance(v, list):
            continue  # Loki's json parser skips arrays
        elif v is None:
            out[key] = ""
        elif isinstance(v, bool):
            out[key] = "true" if v else "false"
        else:
            out[key] = str(v)


_TEMPLATE_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_TEMPLATE_ARG = re.compile(r'"(?:[^"\\]|\\.)*"|\S+')
_TEMPLATE_FUNCS = {"len", "trunc", "hasPrefix"}


def _parse_template(src: str) -> list[Any]:
    """The subset of Go's text/template that ``label_format`` is used with here: text, ``{{ .label }}``,
    ``{{ len .label }}``, ``{{ trunc N .label }}`` and ``{{ if hasPrefix "p" .label }} .. {{ else }} ..
    {{ end }}`` (Loki's functions of those names: sprig's ``trunc`` and ``hasPrefix``, Go's ``len``; a
    missing label is the empty string). Anything else: a parse error (real Loki has more)."""
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _TEMPLATE_ACTION.finditer(src):
        if m.start() > pos:
            parts.append(("text", src[pos:m.start()]))
        parts.append(("act", m.group(1).strip()))
        pos = m.end()
    if pos < len(src):
        parts.append(("text", src[pos:]))

    def cmd(text: str) -> list[str]:
        args = _TEMPLATE_ARG.findall(text)
        if not args or (not args[0].startswith(".") and args[0] not in _TEMPLATE_FUNCS):
            raise LogQLParseError(None, f"template: function {args[0] if args else ''!r} not supported here")
        return args

    def block(i: int, stop: tuple[str, ...]) -> tuple[list[Any], int]:
        nodes: list[Any] = []
        while i < len(parts):
            kind, text = parts[i]
            if kind == "text":
                nodes.append(("text", text))
                i += 1
            elif text in stop:
                return nodes, i
            elif text.startswith("if "):
                then, i = block(i + 1, ("else", "end"))
                other: list[Any] = []
                if i < len(parts) and parts[i][1] == "else":
                    other, i = block(i + 1, ("end",))
                if i >= len(parts):
                    raise LogQLParseError(None, "template: unexpected EOF (an if without end)")
                nodes.append(("if", cmd(text[3:]), then, other))
                i += 1
            else:
                nodes.append(("cmd", cmd(text)))
                i += 1
        if stop:
            raise LogQLParseError(None, "template: unexpected EOF (an if without end)")
        return nodes, i

    return block(0, ())[0]


def _template_arg(arg: str, labels: dict[str, str]) -> str:
    if arg.startswith("."):
        return labels.get(arg[1:], "")
    if arg.startswith('"'):
        return str(json.loads(arg))
    return arg


def _template_cmd(args: list[str], labels: dict[str, str]) -> Any:
    vals = [_template_arg(a, labels) for a in args[1:]]
    if args[0].startswith("."):
        return _template_arg(args[0], labels)
    if args[0] == "len":
        return str(len(vals[0].encode()))
    if args[0] == "trunc":  # sprig: trunc c s
        c, text = int(vals[0]), vals[1]
        return text[len(text) + c:] if c < 0 and len(text) + c > 0 else text[:c] if c >= 0 else text
    return vals[1].startswith(vals[0])  # hasPrefix prefix s


def _render_template(nodes: list[Any], labels: dict[str, str]) -> str:
    out = []
    for n in nodes:
        if n[0] == "text":
            out.append(n[1])
        elif n[0] == "cmd":
            out.append(str(_template_cmd(n[1], labels)))
        else:
            out.append(_render_template(n[2] if _template_cmd(n[1], labels) else n[3], labels))
    return "".join(out)


def _set_extracted(labels: dict[str, str], base: dict[str, str], key: str, value: str) -> None:
    if key in base:
        key = key + "_extracted"
    labels[key] = value


def run_pipeline(stages: list[Stage], line: str, base: dict[str, str]) -> dict[str, str] | None:
    """Apply stages to one entry; returns the resulting labels or None when filtered out."""
    labels = base
    copied = False
    for st in stages:
        if st.kind == "line":
            if st.op == "|=":
                ok = st.value in line
            elif st.op == "!=":
                ok = st.value not in line
            else:
                assert st.rx is not None
                ok = (st.rx.search(line) is not None) == (st.op == "|~")
            if not ok:
                return None
            continue
        if not copied:
            labels = dict(base)
            copied = True
        if st.kind == "json":
            try:
                obj = json.loads(line, parse_float=str, parse_int=str)
            except ValueError as exc:
                labels["__error__"] = "JSONParserErr"
                labels["__error_details__"] = str(exc)
                continue
            if not isinstance(obj, dict):
                labels["__error__"] = "JSONParserErr"
                labels["__error_details__"] = "Value looks like object, but can't find closing '}' symbol"
                continue
            extracted: dict[str, str] = {}
            _flatten_json(obj, "", extracted)
            for k, v in extracted.items():
                _set_extracted(labels, base, k, v)
        elif st.kind in ("regexp", "pattern"):
            assert st.rx is not None
            m = st.rx.search(line)
            if m:
                for k, v in m.groupdict().items():
                    if k != "_" and v is not None:
                        _set_extracted(labels, base, _sanitize(k), v)
        elif st.kind == "label_format":
            rendered = [(dst, _render_template(nodes, labels)) for dst, nodes in st.value]
            labels.update(rendered)
        elif st.kind == "label":
            name, want = st.value
            have = labels.get(name, "")
            if st.op.startswith("num"):
                if "__error__" in labels:
                    continue
                try:
                    num = float(have)
                except ValueError:
                    labels["__error__"] = "LabelFilterErr"
                    continue
                op = st.op[3:]
                ok = {"==": num == want, "=": num == want, "!=": num != want, ">": num > want,
                      ">=": num >= want, "<": num < want, "<=": num <= want}[op]
            elif st.op == "=":
                ok = have == want
            elif st.op == "!=":
                ok = have != want
            else:
                assert st.rx is not None
                ok = (st.rx.fullmatch(have) is not None) == (st.op == "=~")
            if not ok:
                return None
    return labels


def _labels_str(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


# ================================================================================================
# Storage
# ================================================================================================
class Stream:
    """One stream: entries sorted by ts; ties keep write order (``unordered.go`` preserves it)."""

    __slots__ = ("labels", "key", "ts", "lines", "_seen", "nbytes", "_frags", "meta")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = dict(sorted(labels.items()))
        self.key = _labels_str(self.labels)
        self.ts: list[int] = []
        self.lines: list[str] = []
        self._seen: set[tuple[int, str]] = set()
        self.nbytes = 0
        self._frags: list[str] | None = None
        self.meta: dict[int, dict[str, str]] | None = None  # structured metadata by entry index (rare)

    def frags(self) -> list[str]:
        """Each entry pre-encoded as its JSON ``["<ts>","<line>"]``: the server then answers at the speed
        of a string join, so benchmarks measure the client rather than this server's JSON encoder."""
        frags = self._frags
        if frags is None:
            frags = self._frags = [json.dumps([str(t), ln], ensure_ascii=False) for t, ln in zip(self.ts, self.lines, strict=True)]
        return frags

    def append(self, ts: int, line: str, meta: dict[str, str] | None = None) -> bool:
        if (ts, line) in self._seen:
            return False  # identical timestamp and content: Loki drops it
        self._frags = None
        self._seen.add((ts, line))
        if not self.ts or ts >= self.ts[-1]:
            i = len(self.ts)
            self.ts.append(ts)
            self.lines.append(line)
        else:
            i = bisect.bisect_right(self.ts, ts)
            self.ts.insert(i, ts)
            self.lines.insert(i, line)
            if self.meta:
                self.meta = {(j + 1 if j >= i else j): m for j, m in self.meta.items()}
        if meta:
            if self.meta is None:
                self.meta = {}
            self.meta[i] = dict(meta)
        self.nbytes += len(line)
        return True

    def extend_sorted(self, entries: list[tuple[int, str]]) -> int:
        """Bulk load (benchmarks): dedup, then one sort."""
        self._frags = None
        added = 0
        for ts, line in entries:
            if (ts, line) not in self._seen:
                self._seen.add((ts, line))
                self.ts.append(ts)
                self.lines.append(line)
                self.nbytes += len(line)
                added += 1
        order = sorted(range(len(self.ts)), key=self.ts.__getitem__)
        self.ts = [self.ts[i] for i in order]
        self.lines = [self.lines[i] for i in order]
        return added

    def range(self, start: int, end: int) -> tuple[int, int]:
        return bisect.bisect_left(self.ts, start), bisect.bisect_left(self.ts, end)


@dataclass
class Fault:
    """One injected fault, consumed by the next matching request."""

    status: int | None = None
    body: str = ""
    retry_after: str | None = None
    drop_mid_body: bool = False
    delay_s: float = 0.0
    path: str = "/loki/api/v1/"  # prefix the request path must have
    times: int = 1


@dataclass
class RequestLog:
    method: str
    path: str
    params: dict[str, list[str]]
    tenant: str | None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class LokiServer:
    """A Loki-compatible server on 127.0.0.1 (see the module docstring).

    Use as a context manager; ``url`` is the base URL (what ``--url``/``LOKI_ADDR`` take).
    """

    def __init__(
        self,
        *,
        auth_enabled: bool = False,
        basic_auth: tuple[str, str] | None = None,
        bearer_token: str | None = None,
        max_entries_limit: int = 5000,
        max_query_series: int = 500,
        max_query_length_ns: int = 721 * HOUR_NS,
        max_querier_bytes: int | None = None,
        timeout_above_ns: int | None = None,
        multi_tenant_queries: bool = True,
        shuffle_ties: bool = False,
        latency_s: float = 0.0,
        ssl_context: Any = None,
        seed: int = 0,
    ) -> None:
        self.auth_enabled = auth_enabled
        self.basic_auth = basic_auth
        self.bearer_token = bearer_token
        self.max_entries_limit = max_entries_limit
        self.max_query_series = max_query_series
        self.max_query_length_ns = max_query_length_ns
        self.max_querier_bytes = max_querier_bytes
        self.timeout_above_ns = timeout_above_ns
        self.multi_tenant_queries = multi_tenant_queries
        self.shuffle_ties = shuffle_ties
        self.latency_s = latency_s
        self.ssl_context = ssl_context
        self._rng = random.Random(seed)
        self._tenants: dict[str, dict[str, Stream]] = {}
        self._lock = threading.RLock()
        self._faults: list[Fault] = []
        self.requests: list[RequestLog] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.fault_hook: Callable[[RequestLog], Fault | None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, port: int = 0) -> LokiServer:
        handler = type("Handler", (_Handler,), {"loki": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._httpd.daemon_threads = True
        if self.ssl_context is not None:
            self._httpd.socket = self.ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="loki-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LokiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"

    # -- data --------------------------------------------------------------------------------------
    def push(self, labels: dict[str, str], entries: Iterable[tuple[int, str] | tuple[int, str, dict[str, str]]],
             tenant: str = DEFAULT_TENANT) -> int:
        """Store entries like ``/push`` does (``(ts, line[, structured metadata])``); returns how many were
        kept (duplicates dropped)."""
        with self._lock:
            streams = self._tenants.setdefault(tenant, {})
            key = _labels_str(dict(labels))
            st = streams.get(key)
            if st is None:
                st = streams[key] = Stream(labels)
            return sum(1 for e in entries if st.append(int(e[0]), e[1], e[2] if len(e) > 2 else None))  # type: ignore[misc]

    def load(self, labels: dict[str, str], entries: list[tuple[int, str]], tenant: str = DEFAULT_TENANT) -> int:
        """Bulk variant of :meth:`push` (one sort), for large benchmark data sets."""
        with self._lock:
            streams = self._tenants.setdefault(tenant, {})
            key = _labels_str(dict(labels))
            st = streams.get(key)
            if st is None:
                st = streams[key] = Stream(labels)
            return st.extend_sorted(entries)

    def holdings(self, tenant: str = DEFAULT_TENANT, start: int = 0, end: int = 2**63 - 1) -> set[tuple[tuple[tuple[str, str], ...], int, str]]:
        """Everything stored for a tenant in [start, end): {(sorted label items, ts_ns, line)}."""
        out = set()
        with self._lock:
            for st in self._tenants.get(tenant, {}).values():
                lo, hi = st.range(start, end)
                items = tuple(st.labels.items())
                out.update((items, st.ts[i], st.lines[i]) for i in range(lo, hi))
        return out

    def count(self, tenant: str = DEFAULT_TENANT) -> int:
        with self._lock:
            return sum(len(st.ts) for st in self._tenants.get(tenant, {}).values())

    # -- faults --------------------------------------------------------------------------------------
    def inject(self, fault: Fault | None = None, **kw: Any) -> None:
        """Queue a fault (``inject(status=503, times=5, retry_after="0")``, ``inject(drop_mid_body=True)``)."""
        with self._lock:
            self._faults.append(fault or Fault(**kw))

    def _take_fault(self, req: RequestLog) -> Fault | None:
        if self.fault_hook is not None:
            f = self.fault_hook(req)
            if f is not None:
                return f
        with self._lock:
            for f in self._faults:
                if req.path.startswith(f.path):
                    f.times -= 1
                    if f.times <= 0:
                        self._faults.remove(f)
                    return f
        return None

    def query_requests(self, path: str = "/loki/api/v1/query_range") -> list[RequestLog]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- tenants -----------------------------------------------------------------------------------
    def _streams_for(self, org: str) -> list[tuple[Stream, dict[str, str]]]:
        """(stream, labels as the query sees them) for a tenant or a ``a|b`` multi-tenant id."""
        if "|" in org and not self.multi_tenant_queries:
            # the real Loki (multi_tenant_queries_enabled: false, its default) for every query API
            raise LokiHTTPError(500, ERR_MULTIPLE_ORGS)
        tenants = org.split("|") if "|" in org else [org]
        out = []
        with self._lock:
            for t in tenants:
                for st in self._tenants.get(t, {}).values():
                    labels = st.labels if len(tenants) == 1 else {**st.labels, "__tenant_id__": t}
                    out.append((st, labels))
        return out

    # -- queries -------------------------------------------------------------------------------------
    def _check_length(self, start: int, end: int) -> None:
        if self.max_query_length_ns and end - start > self.max_query_length_ns:
            raise _bad(ERR_QUERY_TOO_LONG.format(go_duration(end - start), prom_duration(self.max_query_length_ns)))
        if self.timeout_above_ns is not None and end - start > self.timeout_above_ns:
            raise LokiHTTPError(504, ERR_DEADLINE)

    def _check_bytes(self, selected: list[tuple[Stream, dict[str, str]]], start: int, end: int) -> None:
        if self.max_querier_bytes is None:
            return
        total = 0
        for st, _ in selected:
            lo, hi = st.range(start, end)
            total += sum(len(st.lines[i]) for i in range(lo, hi))
        if total > self.max_querier_bytes:
            raise _bad(ERR_TOO_LARGE.format(_human_bytes(total), _human_bytes(self.max_querier_bytes)))

    def query_range(self, org: str, params: dict[str, str], categorize: bool = False) -> dict[str, Any]:
        """``categorize``: the ``X-Loki-Response-Encoding-Flags: categorize-labels`` header (then entries carry
        ``{"structuredMetadata": ..., "parsed": ...}`` and streams only their own labels; without it both
        are merged into the stream labels, one result item per distinct label set, like the real Loki)."""
        now = time.time_ns()
        q = params.get("query", "")
        end = parse_loki_time(params.get("end"), now)
        since = parse_prom_duration(params.get("since", "")) if params.get("since") else None
        start = parse_loki_time(params.get("start"), end - (since or HOUR_NS))
        if end < start:
            raise _bad(ERR_END_BEFORE_START)
        limit = _parse_limit(params.get("limit"))
        direction = (params.get("direction") or "backward").upper()
        if direction not in ("FORWARD", "BACKWARD"):
            raise _bad(f"invalid direction '{params.get('direction')}'")
        step = parse_step(params.get("step"), start, end)
        if step <= 0:
            raise _bad(ERR_ZERO_STEP)
        if (end - start) // step > 11000:
            raise _bad(ERR_STEP_TOO_SMALL)
        expr = _parse_or_400(q)
        self._check_length(start, end)
        if isinstance(expr, LogExpr):
            if limit > self.max_entries_limit:
                raise _bad(ERR_MAX_ENTRIES.format(limit, self.max_entries_limit))
            selected = [(st, lb) for st, lb in self._streams_for(org) if all(m.matches(lb) for m in expr.matchers)]
            self._check_bytes(selected, start, end)
            res = _success("streams", self._select_logs(expr, selected, start, end, limit, direction == "FORWARD",
                                                        categorize))
            if categorize:
                res["data"]["encodingFlags"] = ["categorize-labels"]
            return res
        selected = [(st, lb) for st, lb in self._streams_for(org)
                    if all(m.matches(lb) for m in _matchers_of(expr))]
        self._check_bytes(selected, start - _range_of(expr), end)
        return _success("matrix", self._eval_matrix(expr, selected, start, end, step))

    def query_instant(self, org: str, params: dict[str, str]) -> dict[str, Any]:
        t = parse_loki_time(params.get("time"), time.time_ns())
        expr = _parse_or_400(params.get("query", ""))
        if isinstance(expr, LogExpr):
            raise _bad(ERR_INSTANT_LOG)
        selected = [(st, lb) for st, lb in self._streams_for(org) if all(m.matches(lb) for m in _matchers_of(expr))]
        matrix = self._eval_matrix(expr, selected, t, t, NS)
        return _success("vector", [{"metric": s["metric"], "value": s["values"][0]} for s in matrix])

    def _select_logs(self, expr: LogExpr, selected: list[tuple[Stream, dict[str, str]]], start: int, end: int,
                     limit: int, forward: bool, categorize: bool = False) -> list[dict[str, Any]]:
        ranks = list(range(len(selected)))
        if self.shuffle_ties:
            with self._lock:
                self._rng.shuffle(ranks)

        def gen(k: int) -> Iterator[tuple[int, int, int, int]]:
            st, _ = selected[k]
            lo, hi = st.range(start, end)
            idx = range(lo, hi) if forward else range(hi - 1, lo - 1, -1)
            sign = 1 if forward else -1
            rank = ranks[k] * sign
            for i in idx:
                yield (st.ts[i] * sign, rank, i * sign, k)

        out: dict[str, tuple[dict[str, str], list[str]]] = {}
        frags = [st.frags() for st, _ in selected] if not expr.stages else []
        n = 0
        for _ts, _rank, i_signed, k in heapq.merge(*(gen(k) for k in range(len(selected)))):
            st, base = selected[k]
            i = abs(i_signed)
            meta = st.meta.get(i) if st.meta else None
            if expr.stages or meta:
                line = st.lines[i]
                with_meta = {**base, **meta} if meta else base
                labels = run_pipeline(expr.stages, line, with_meta) if expr.stages else with_meta
                if labels is None:
                    continue
                if categorize:
                    parsed = {k: v for k, v in labels.items() if k not in with_meta or with_meta[k] != v}
                    cats = {**({"structuredMetadata": meta} if meta else {}), **({"parsed": parsed} if parsed else {})}
                    labels, key = base, st.key + str(k)
                    frag = json.dumps([str(st.ts[i]), line, *([cats] if cats else [])], ensure_ascii=False)
                else:
                    key = _labels_str(labels)
                    frag = json.dumps([str(st.ts[i]), line], ensure_ascii=False)
            else:
                labels, key, frag = base, st.key + str(k), frags[k][i]
            slot = out.get(key)
            if slot is None:
                slot = out[key] = (labels, [])
            slot[1].append(frag)
            n += 1
            if n >= limit:
                break
        return [{"stream": lb, "values": RawValues(vals)} for lb, vals in out.values()]

    # -- metric evaluation -------------------------------------------------------------------------
    def _series_samples(self, agg: RangeAgg, selected: list[tuple[Stream, dict[str, str]]], lo_ns: int,
                        hi_ns: int) -> dict[str, tuple[dict[str, str], list[int], list[float]]]:
        """Samples in (lo, hi] per resulting series."""
        series: dict[str, tuple[dict[str, str], list[int], list[float]]] = {}
        for st, base in selected:
            a, b = bisect.bisect_right(st.ts, lo_ns), bisect.bisect_right(st.ts, hi_ns)
            for i in range(a, b):
                line = st.lines[i]
                labels = run_pipeline(agg.log.stages, line, base)
                if labels is None:
                    continue
                if agg.unwrap is not None:
                    labels = dict(labels)
                    raw = labels.pop(agg.unwrap, "")
                    try:
                        value = float(raw)
                    except ValueError:
                        value = 0.0
                        labels["__error__"] = "SampleExtractionErr"
                        labels["__error_details__"] = f'strconv.ParseFloat: parsing "{raw}": invalid syntax'
                    labels = run_pipeline(agg.post, line, labels) if agg.post else labels
                    if labels is None:
                        continue
                elif agg.fn in ("bytes_over_time", "bytes_rate"):
                    value = float(len(line))
                else:
                    value = 1.0
                if "__error__" in labels:
                    raise _bad(ERR_PIPELINE.format(labels["__error__"], _labels_str(labels), labels["__error__"]))
                labels.pop("__error_details__", None)
                if agg.grouping:
                    labels = _group(labels, agg.grouping)
                key = _labels_str(labels)
                slot = series.get(key)
                if slot is None:
                    slot = series[key] = (labels, [], [])
                slot[1].append(st.ts[i])
                slot[2].append(value)
        for _labels, ts, vals in series.values():
            order = sorted(range(len(ts)), key=ts.__getitem__)
            ts[:] = [ts[j] for j in order]
            vals[:] = [vals[j] for j in order]
        return series

    def _eval_range(self, agg: RangeAgg, selected: list[tuple[Stream, dict[str, str]]], start: int, end: int,
                    step: int) -> dict[str, tuple[dict[str, str], dict[int, float]]]:
        samples = self._series_samples(agg, selected, start - agg.range_ns, end)
        out: dict[str, tuple[dict[str, str], dict[int, float]]] = {}
        range_s = agg.range_ns / NS
        for key, (labels, ts, vals) in samples.items():
            points: dict[int, float] = {}
            t = start
            while t <= end:
                a, b = bisect.bisect_right(ts, t - agg.range_ns), bisect.bisect_right(ts, t)
                if b > a:
                    window = vals[a:b]
                    points[t] = _range_fn(agg.fn, window, range_s, agg.param)
                t += step
            if points:
                out[key] = (labels, points)
        return out

    def _eval(self, expr: RangeAgg | VectorAgg, selected: list[tuple[Stream, dict[str, str]]], start: int,
              end: int, step: int) -> dict[str, tuple[dict[str, str], dict[int, float]]]:
        if isinstance(expr, RangeAgg):
            return self._eval_range(expr, selected, start, end, step)
        inner = self._eval(expr.inner, selected, start, end, step)
        groups: dict[str, tuple[dict[str, str], dict[int, list[float]]]] = {}
        for labels, points in inner.values():
            g = _group(labels, expr.grouping) if expr.grouping else {}
            key = _labels_str(g)
            slot = groups.setdefault(key, (g, {}))
            for t, v in points.items():
                slot[1].setdefault(t, []).append(v)
        fn = {"sum": sum, "count": len, "min": min, "max": max, "avg": lambda xs: sum(xs) / len(xs)}[expr.fn]
        return {k: (g, {t: float(fn(vs)) for t, vs in pts.items()}) for k, (g, pts) in groups.items()}

    def _eval_matrix(self, expr: RangeAgg | VectorAgg, selected: list[tuple[Stream, dict[str, str]]], start: int,
                     end: int, step: int) -> list[dict[str, Any]]:
        result = self._eval(expr, selected, start, end, step)
        if len(result) > self.max_query_series:
            raise _bad(ERR_SERIES_LIMIT.format(self.max_query_series))
        return [
            {"metric": labels, "values": [[_fmt_ts_seconds(t), _fmt_value(v)] for t, v in sorted(points.items())]}
            for _k, (labels, points) in sorted(result.items())
        ]

    # -- metadata ----------------------------------------------------------------------------------
    def series(self, org: str, matches: list[str], start: int, end: int) -> list[dict[str, str]]:
        if not matches:
            raise _bad("0 matcher groups supplied")
        groups = []
        for m in matches:
            expr = _parse_or_400(m)
            if not isinstance(expr, LogExpr) or expr.stages:
                raise _bad("only label matchers are supported")
            groups.append(expr.matchers)
        out: dict[str, dict[str, str]] = {}
        for st, lb in self._streams_for(org):
            lo, hi = st.range(start, end)
            if hi > lo and any(all(m.matches(lb) for m in g) for g in groups):
                out[_labels_str(lb)] = lb
        return list(out.values())

    def label_names(self, org: str, query: str | None, start: int, end: int) -> list[str]:
        names: set[str] = set()
        for lb in self._matching_labels(org, query, start, end):
            names.update(lb)
        return sorted(names)

    def label_values(self, org: str, name: str, query: str | None, start: int, end: int) -> list[str]:
        return sorted({lb[name] for lb in self._matching_labels(org, query, start, end) if name in lb})

    def _matching_labels(self, org: str, query: str | None, start: int, end: int) -> list[dict[str, str]]:
        matchers = []
        if query:
            expr = _parse_or_400(query)
            if not isinstance(expr, LogExpr):
                raise _bad("only label matchers are supported")
            matchers = expr.matchers
        out = []
        for st, lb in self._streams_for(org):
            lo, hi = st.range(start, end)
            if hi > lo and all(m.matches(lb) for m in matchers):
                out.append(lb)
        return out


def _parse_or_400(q: str) -> LogExpr | RangeAgg | VectorAgg:
    try:
        return parse_logql(q)
    except LogQLParseError as exc:
        raise _bad(exc.loki_message()) from None


def _matchers_of(expr: RangeAgg | VectorAgg) -> list[Matcher]:
    while isinstance(expr, VectorAgg):
        expr = expr.inner
    return expr.log.matchers


def _range_of(expr: RangeAgg | VectorAgg) -> int:
    while isinstance(expr, VectorAgg):
        expr = expr.inner
    return expr.range_ns


def _group(labels: dict[str, str], grouping: tuple[str, tuple[str, ...]]) -> dict[str, str]:
    kind, names = grouping
    if kind == "by":
        return {k: labels[k] for k in names if labels.get(k, "") != ""}
    return {k: v for k, v in labels.items() if k not in names}


def _quantile(q: float, values: list[float]) -> float:
    """Prometheus ``quantile`` (linear interpolation between closest ranks)."""
    if not values:
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    xs = sorted(values)
    rank = q * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    w = rank - lo
    return xs[lo] * (1 - w) + xs[hi] * w


def _range_fn(fn: str, window: list[float], range_s: float, param: float | None) -> float:
    if fn in ("count_over_time",):
        return float(len(window))
    if fn == "rate":
        return sum(window) / range_s
    if fn == "bytes_over_time":
        return sum(window)
    if fn == "bytes_rate":
        return sum(window) / range_s
    if fn == "sum_over_time":
        return sum(window)
    if fn == "avg_over_time":
        return sum(window) / len(window)
    if fn == "min_over_time":
        return min(window)
    if fn == "max_over_time":
        return max(window)
    if fn == "quantile_over_time":
        return _quantile(param if param is not None else 0.5, window)
    raise AssertionError(fn)


def _parse_limit(value: str | None) -> int:
    if value is None or value == "":
        return 100
    try:
        n = int(value)
    except ValueError:
        raise _bad(f'strconv.Atoi: parsing "{value}": invalid syntax') from None
    if n <= 0:
        raise _bad(ERR_LIMIT_POSITIVE)
    return n


class RawValues(list):  # type: ignore[type-arg]
    """A stream's ``values``, each already JSON-encoded (see :meth:`Stream.frags`)."""


def render_json(obj: Any) -> str:
    """``json.dumps`` that splices :class:`RawValues` in as they are."""
    if isinstance(obj, RawValues):
        return "[" + ",".join(obj) + "]"
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(k) + ":" + render_json(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(render_json(v) for v in obj) + "]"
    return json.dumps(obj, ensure_ascii=False)


def _success(kind: str, result: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(len(r.get("values", [])) for r in result) if kind == "streams" else 0
    return {"status": "success", "data": {"resultType": kind, "result": result, "stats": {
        "summary": {"bytesProcessedPerSecond": 0, "linesProcessedPerSecond": 0, "totalBytesProcessed": 0,
                    "totalLinesProcessed": 0, "execTime": 0.0, "queueTime": 0.0, "subqueries": 0,
                    "totalEntriesReturned": n, "splits": 0, "shards": 0}}}}


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n}B"


# ================================================================================================
# HTTP layer
# ================================================================================================
class _Handler(BaseHTTPRequestHandler):
    loki: LokiServer
    protocol_version = "HTTP/1.1"
    server_version = "Loki-test"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler API
        return

    def setup(self) -> None:
        super().setup()
        # Go's net/http (Loki) disables Nagle; without this, headers and body in two writes meet the
        # client's delayed ACK and every keep-alive request costs ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler API
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    # -- plumbing ------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        return body

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None,
              drop_mid_body: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if drop_mid_body:
            self.send_header("Connection", "close")
        self.end_headers()
        if drop_mid_body:
            self.wfile.write(body[: max(1, len(body) // 2)])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_text(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        hdrs = {"X-Content-Type-Options": "nosniff", **(headers or {})}
        self._send(status, text.encode(), "text/plain; charset=utf-8", hdrs)

    def _send_json(self, obj: Any, drop_mid_body: bool = False) -> None:
        body = render_json(obj).encode()
        self._send(200, body, "application/json; charset=UTF-8", drop_mid_body=drop_mid_body)

    def _gateway_auth_ok(self) -> bool:
        srv = self.loki
        auth = self.headers.get("Authorization", "")
        if srv.basic_auth is not None:
            if not auth.startswith("Basic "):
                return False
            try:
                user, _, pw = b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return False
            return (user, pw) == srv.basic_auth
        if srv.bearer_token is not None:
            return auth == f"Bearer {srv.bearer_token}"
        return True

    def _handle(self, method: str) -> None:
        srv = self.loki
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        qs = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        body = self._read_body() if method == "POST" else b""
        ctype = self.headers.get("Content-Type", "")
        if method == "POST" and ctype.startswith("application/x-www-form-urlencoded"):
            for k, v in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items():
                qs.setdefault(k, []).extend(v)
        org = self.headers.get("X-Scope-OrgID")
        req = RequestLog(method, path, qs, org, headers=dict(self.headers.items()))
        with srv._lock:
            srv.requests.append(req)
        try:
            self._route(method, path, qs, body, ctype, org, req)
        except LokiHTTPError as exc:
            req.status = exc.status
            self._send_text(exc.status, exc.body, exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, method: str, path: str, qs: dict[str, list[str]], body: bytes, ctype: str,
               org: str | None, req: RequestLog) -> None:
        srv = self.loki
        if path == "/ready":
            req.status = 200
            self._send_text(200, "ready\n")
            return
        if not path.startswith("/loki/api/v1/"):
            raise LokiHTTPError(404, "404 page not found\n")
        if not self._gateway_auth_ok():
            raise LokiHTTPError(401, "401 Unauthorized\n", {"WWW-Authenticate": 'Basic realm="loki"'})
        if srv.auth_enabled and not org:
            raise LokiHTTPError(401, ERR_NO_ORG_ID + "\n")
        tenant = org or DEFAULT_TENANT
        fault = srv._take_fault(req)
        if fault is not None:
            if fault.delay_s:
                time.sleep(fault.delay_s)
            if fault.status is not None:
                hdrs = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                raise LokiHTTPError(fault.status, fault.body or _default_body(fault.status), hdrs)
        if srv.latency_s and path != "/loki/api/v1/push":
            time.sleep(srv.latency_s)
        p = {k: v[-1] for k, v in qs.items()}
        now = time.time_ns()
        drop = bool(fault and fault.drop_mid_body)
        if path == "/loki/api/v1/query_range" and method in ("GET", "POST"):
            flags = self.headers.get("X-Loki-Response-Encoding-Flags", "")
            resp = srv.query_range(tenant, p, categorize="categorize-labels" in flags)
        elif path == "/loki/api/v1/query":
            resp = srv.query_instant(tenant, p)
        elif path == "/loki/api/v1/labels":
            start, end = _meta_bounds(p, now)
            names = srv.label_names(tenant, p.get("query"), start, end)
            # the real Loki omits "data" when there is no label at all (a tenant without data)
            resp = {"status": "success", "data": names} if names else {"status": "success"}
        elif path.startswith("/loki/api/v1/label/") and path.endswith("/values"):
            name = urllib.parse.unquote(path[len("/loki/api/v1/label/"):-len("/values")])
            start, end = _meta_bounds(p, now)
            resp = {"status": "success", "data": srv.label_values(tenant, name, p.get("query"), start, end)}
        elif path == "/loki/api/v1/series":
            start, end = _meta_bounds(p, now)
            resp = {"status": "success", "data": srv.series(tenant, qs.get("match[]", []), start, end)}
        elif path == "/loki/api/v1/push" and method == "POST":
            self._push(tenant, body, ctype)
            req.status = 204
            self._send(204, b"", "text/plain")
            return
        else:
            raise LokiHTTPError(404, "404 page not found\n")
        req.status = 200
        self._send_json(resp, drop_mid_body=drop)

    def _push(self, tenant: str, body: bytes, ctype: str) -> None:
        if not ctype.startswith("application/json"):
            raise _bad("this test server only accepts JSON pushes (Content-Type: application/json)")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise _bad(f"loghttp.PushRequest.Streams: {exc}") from None
        for s in doc.get("streams", []):
            labels = s.get("stream") or {}
            entries = []
            for v in s.get("values", []):
                if not isinstance(v, list) or len(v) < 2 or not isinstance(v[0], str) or not isinstance(v[1], str):
                    raise _bad("loghttp.PushRequest.Streams: Value is not a string")
                meta = v[2] if len(v) > 2 and isinstance(v[2], dict) else None
                entries.append((int(v[0]), v[1], {str(a): str(b) for a, b in meta.items()}) if meta
                               else (int(v[0]), v[1]))
            self.loki.push(labels, entries, tenant)


def _meta_bounds(p: dict[str, str], now: int) -> tuple[int, int]:
    end = parse_loki_time(p.get("end"), now)
    start = parse_loki_time(p.get("start"), end - 6 * HOUR_NS)
    return start, end


def _default_body(status: int) -> str:
    return {429: "too many outstanding requests", 500: "internal server error", 502: "bad gateway",
            503: "Service Unavailable", 504: ERR_DEADLINE}.get(status, f"error {status}")


# ================================================================================================
# Data generation (tests, benchmark) and standalone mode
# ================================================================================================
ISTIO_TEMPLATE = (
    '[{start}] "{method} {path} HTTP/1.1" {code} {flags} {details} - "-" {rx} {tx} {dur} {ust} "-" '
    '"{ua}" "{rid}" "{authority}" "{uhost}" outbound|{port}||{svc}.{ns}.svc.cluster.local '
    "10.44.1.23:37652 10.0.45.184:{port} 10.44.1.23:46520 - default"
)


def istio_line(rng: random.Random, ts_ns: int, svc: str, ns: str, same_start: bool = False) -> str:
    code = rng.choices([200, 201, 404, 503, 403], weights=[80, 5, 5, 7, 3])[0]
    flags = {503: rng.choice(["UF,URX", "UH", "UC"]), 403: "-"}.get(code, "-")
    details = {503: "upstream_reset_before_response_started{connection_failure}",
               403: "rbac_access_denied_matched_policy[none]"}.get(code, "via_upstream")
    ms = ts_ns // 1_000_000
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
    return ISTIO_TEMPLATE.format(
        start=start, method=rng.choice(["GET", "POST"]), path=f"/api/v1/items/{rng.randrange(1000)}", code=code,
        flags=flags, details=details, rx=rng.randrange(2000), tx=rng.randrange(20000), dur=rng.randrange(1, 900),
        ust=rng.randrange(1, 800), ua="curl/8.5.0",
        rid=f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}-"
            f"{rng.getrandbits(16):04x}-{rng.getrandbits(48):012x}",
        authority=f"{svc}:8000", uhost=f"10.44.{rng.randrange(256)}.{rng.randrange(256)}:8000", port=8000,
        svc=svc, ns=ns,
    )


def generate(server: LokiServer, *, lines: int, streams: int, start_ns: int, span_ns: int, seed: int = 1,
             tenant: str = DEFAULT_TENANT) -> int:
    """Deterministic Istio access-log data: ``lines`` lines over ``streams`` streams in [start, start+span)."""
    rng = random.Random(seed)
    per = lines // streams
    stored = 0
    for s in range(streams):
        ns = f"ns{s % 4}"
        app = f"svc{s}"
        labels = {"namespace": ns, "app": app, "pod": f"{app}-7d9c6b-{s:05d}", "container": "istio-proxy"}
        n = per + (1 if s < lines - per * streams else 0)
        entries = []
        for _ in range(n):
            ts = start_ns + rng.randrange(span_ns)
            entries.append((ts, istio_line(rng, ts, app, ns)))
        stored += server.load(labels, entries, tenant)
    return stored


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the Loki-compatible test server")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lines", type=int, default=0)
    ap.add_argument("--streams", type=int, default=40)
    ap.add_argument("--start-ns", type=int, default=1_700_000_000 * NS)
    ap.add_argument("--span-s", type=int, default=3600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    args = ap.parse_args(argv)
    srv = LokiServer(latency_s=args.latency_ms / 1000)
    stored = generate(srv, lines=args.lines, streams=args.streams, start_ns=args.start_ns,
                      span_ns=args.span_s * NS, seed=args.seed) if args.lines else 0
    srv.start(args.port)
    print(f"READY {srv.url} {stored}", flush=True)
    try:
        for _ in itertools.count():
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
