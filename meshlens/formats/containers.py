"""Containers: how records are packed in files, before any log format applies.

Handles, per file (sniffed, not guessed from the extension alone):

* gzip (by magic bytes) around any of the below;
* plain lines (one record per line), with pretty-printed multi-line JSON documents (a line that is a
  lone ``{``) assembled into one record;
* logcli ``--output jsonl`` exports: ``{"labels": {...}, "line": "...", "timestamp": "RFC3339Nano"}``;
* a saved Loki ``query_range`` JSON response (streams are expanded into records with their labels);
* Kubernetes CRI container log files (``<RFC3339Nano> <stream> <P|F> <text>``; ``P`` partial lines are
  joined), with namespace/pod/container labels from ``/var/log/pods/<ns>_<pod>_<uid>/<container>/N.log``
  or ``/var/log/containers/<pod>_<ns>_<container>-<id>.log`` paths.

Pure functions over bytes/text: the file source (:mod:`meshlens.sources.files`) does the I/O. Records
that cannot be decoded (invalid UTF-8, over the size limit) carry a ``reject_reason`` so that they are
kept as rejects, never dropped.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meshlens.formats.identity import workload_from_pod
from meshlens.jsonutil import loads_json
from meshlens.timeutil import parse_rfc3339_ns

MAX_RECORD_BYTES = 8 * 1024 * 1024
MAX_MULTILINE_LINES = 100_000

_CRI_LINE = re.compile(rb"^(\d{4}-\d\d-\d\dT\S+) (stdout|stderr) ([PF])(?: (.*))?$", re.S)
_POD_PATH = re.compile(r"/pods/([^/_]+)_([^/_]+)_([^/]+)/([^/]+)/\d+\.log(?:\.gz|\.\d+(?:\.gz)?)?$")
_CONTAINERS_PATH = re.compile(r"/containers/([^/_]+)_([^/_]+)_(.+)-[0-9a-f]{64}\.log(?:\.gz)?$")


@dataclass
class Record:
    text: str
    position: str
    ts_ns: int | None = None
    labels: dict[str, str] | None = None
    reject_reason: str | None = None


def labels_from_path(path: str) -> dict[str, str] | None:
    """Kubernetes labels encoded in CRI log paths (namespace, pod, container, app)."""
    m = _POD_PATH.search(path)
    if m:
        ns, pod, _uid, container = m.groups()
    else:
        m = _CONTAINERS_PATH.search(path)
        if not m:
            return None
        pod, ns, container = m.groups()
    out = {"namespace": ns, "pod": pod, "container": container}
    wl = workload_from_pod(pod)
    if wl:
        out["app"] = wl
    return out


def _decode(raw: bytes, position: str) -> tuple[str, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return raw.decode("utf-8", errors="replace"), f"invalid UTF-8 at byte {exc.start} of the record"


def _too_large(size: int, limit: int) -> str:
    return f"record too large: {size} bytes > limit {limit} bytes (raise --max-record-bytes if genuine)"


def sniff(first_lines: list[bytes], path: str) -> str:
    """Which container a file is: ``cri``, ``logcli``, ``loki_json`` or ``lines``."""
    sample = [ln for ln in first_lines if ln.strip()]
    if not sample:
        return "lines"
    head = sample[0].strip()
    if _CRI_LINE.match(head) and (labels_from_path(path) or all(_CRI_LINE.match(x.strip()) for x in sample[:5])):
        return "cri"
    if head.startswith(b"{"):
        try:
            obj = json.loads(head)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict) and "line" in obj and set(obj) <= {"labels", "line", "timestamp"}:
            return "logcli"
        if isinstance(obj, dict) and obj.get("status") and isinstance(obj.get("data"), dict) \
                and "resultType" in obj["data"]:
            return "loki_json"
        if isinstance(obj, dict) and ("resourceLogs" in obj or "logEvents" in obj or "events" in obj
                                      or "hits" in obj):
            return "json_documents"
    return "lines"


def records_from_lines(lines: Iterable[bytes], path: str, kind: str,
                       max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Record]:
    """Yield records from the raw lines (without trailing newlines) of one file."""
    if kind == "cri":
        yield from _cri(lines, path, max_record_bytes)
    elif kind == "logcli":
        yield from _logcli(lines, path, max_record_bytes)
    elif kind == "json_documents":
        yield from _json_documents(lines, path, max_record_bytes)
    elif kind == "loki_json":
        doc = b"\n".join(lines)
        try:
            obj = json.loads(doc)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            text, _ = _decode(doc[:65536], path)
            yield Record(text, "1", None, None, f"saved Loki response is not valid JSON: {exc}")
            return
        yield from loki_response_records(obj, "1")
    else:
        yield from _plain(lines, path, max_record_bytes)


# An Envoy text line cut in two (terminal or document wrapping): the first part starts with
# `[START_TIME] "`, the second with `"`, and only together do they hold Envoy's 12 (default format) or
# Istio's 14 double quotes. Such a pair is one record.
_ENVOY_HEAD = re.compile(rb'^\[[^\]]+\] "')
_ENVOY_QUOTES = (12, 14)


def _wrapped_pair(first: bytes, second: bytes) -> bool:
    return (bool(_ENVOY_HEAD.match(first)) and second.startswith(b'"')
            and first.count(b'"') < 12 and first.count(b'"') + second.count(b'"') in _ENVOY_QUOTES)


def _plain(lines: Iterable[bytes], path: str, limit: int, first_lineno: int = 1) -> Iterator[Record]:
    base_labels = labels_from_path(path)
    pending: tuple[int, bytes] | None = None
    for rec in _plain_records(lines, path, limit, first_lineno, base_labels):
        if isinstance(rec, tuple):  # a candidate first half of a wrapped Envoy line
            if pending is not None:
                yield _line_record(pending[1], pending[0], path, base_labels)
            pending = rec
            continue
        if pending is not None:
            lineno, first = pending
            pending = None
            second = rec.text.encode("utf-8", errors="replace")
            if rec.reject_reason is None and rec.position == str(lineno + 1) and _wrapped_pair(first, second):
                yield _line_record(first + b" " + second, lineno, path, base_labels, f"{lineno}-{lineno + 1}")
                continue
            yield _line_record(first, lineno, path, base_labels)
        yield rec
    if pending is not None:
        yield _line_record(pending[1], pending[0], path, base_labels)


def _line_record(raw: bytes, lineno: int, path: str, labels: dict[str, str] | None,
                 position: str | None = None) -> Record:
    text, err = _decode(raw, path)
    return Record(text.rstrip("\r"), position or str(lineno), None, labels, err)


def _plain_records(lines: Iterable[bytes], path: str, limit: int, first_lineno: int,
                   base_labels: dict[str, str] | None) -> Iterator[Record | tuple[int, bytes]]:
    block: list[bytes] = []
    block_start = 0
    block_size = 0
    lineno = 0
    for lineno, raw in enumerate(lines, first_lineno):  # noqa: B007 - lineno used after the loop
        if block:
            block.append(raw)
            block_size += len(raw) + 1
            if raw.rstrip() in (b"}", b"]"):
                doc = b"\n".join(block)
                try:
                    obj = json.loads(doc)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    obj = None
                if obj is not None:
                    yield from _document(doc, obj, f"{block_start}-{lineno}", base_labels)
                    block = []
                    continue
            if len(block) > MAX_MULTILINE_LINES or block_size > limit:
                yield from _bad_block(block, path, block_start, base_labels, limit)
                block = []
            continue
        if raw.strip() in (b"{", b"["):
            block, block_start, block_size = [raw], lineno, len(raw)
            continue
        if not raw.strip():
            continue  # blank lines separate records; they are not records
        if len(raw) > limit:
            text, _ = _decode(raw[:65536], path)
            yield Record(text, str(lineno), None, base_labels, _too_large(len(raw), limit))
            continue
        if raw[:1] == b"[" and raw.count(b'"') < 12 and _ENVOY_HEAD.match(raw):
            yield (lineno, raw)
            continue
        text, err = _decode(raw, path)
        yield Record(text.rstrip("\r"), str(lineno), None, base_labels, err)
    if block:
        yield from _bad_block(block, path, block_start, base_labels, limit)


def _bad_block(block: list[bytes], path: str, start: int, labels: dict[str, str] | None,
               limit: int) -> Iterator[Record]:
    doc = b"\n".join(block)
    end = start + len(block) - 1
    try:
        json.loads(doc)
        reason = "multi-line JSON document too large"
    except json.JSONDecodeError as exc:
        reason = (f"multi-line JSON document (lines {start}-{end}) is not valid JSON: {exc.msg} at its "
                  f"line {exc.lineno} column {exc.colno}")
    except UnicodeDecodeError as exc:
        reason = f"invalid UTF-8 at byte {exc.start} of the multi-line JSON document"
    text, _ = _decode(doc[:limit], path)
    yield Record(text, f"{start}-{end}", None, labels, reason)


def _document(doc: bytes, obj: Any, position: str, labels: dict[str, str] | None) -> Iterator[Record]:
    """A complete multi-line JSON document: a Loki response is expanded, so are documents that hold many
    records (:func:`expand_document`); anything else is one record."""
    if isinstance(obj, dict) and isinstance(obj.get("data"), dict) and "resultType" in obj["data"]:
        yield from loki_response_records(obj, position)
        return
    parts = expand_document(obj)
    if parts is not None:
        for i, text in enumerate(parts):
            yield Record(text, f"{position}#{i}", None, labels)
        return
    yield Record(doc.decode("utf-8", errors="replace"), position, None, labels)


def expand_document(obj: Any) -> list[str] | None:
    """The records of a JSON document that holds several (None: it is one record).

    A JSON array of objects (one each), an OTLP/JSON logs request with several log records (one
    single-record request each), a CloudWatch
    Logs export (one event each: EKS audit), a saved Elasticsearch/OpenSearch search response (one hit
    each). Each part is JSON text that the format detector reads as one record.
    """
    from meshlens.formats import k8s_audit, otel

    if isinstance(obj, list):  # an exported array of documents (Filebeat/ingest-pipeline test output, jq -s)
        return [json.dumps(x, separators=(",", ":"), ensure_ascii=False) for x in obj] \
            if obj and all(isinstance(x, dict) for x in obj) else None
    if not isinstance(obj, dict):
        return None
    parts = otel.expand_request(obj) or k8s_audit.expand_cloudwatch(obj)
    if parts is None and isinstance(obj.get("hits"), dict) and isinstance(obj["hits"].get("hits"), list):
        hits = obj["hits"]["hits"]
        if hits and all(isinstance(h, dict) and "_source" in h for h in hits):
            parts = [json.dumps(h, separators=(",", ":"), ensure_ascii=False) for h in hits]
    return parts


def loki_response_records(obj: dict[str, Any], position: str) -> Iterator[Record]:
    """Records from a Loki ``query_range``/``query`` response body (streams only).

    Several result items may carry the same label set (grafana/loki#5079): each keeps its entries.
    """
    data = obj.get("data") or {}
    rtype = data.get("resultType")
    if obj.get("status") not in (None, "success"):
        yield Record(json.dumps(obj)[:65536], position, None, None,
                     f"Loki response status {obj.get('status')!r}: {obj.get('error') or 'no data'}")
        return
    if rtype != "streams":
        yield Record(json.dumps(obj)[:65536], position, None, None,
                     f"Loki {rtype} result holds metric samples, not log lines; use "
                     "`meshlens aggregate loki` to store metric series")
        return
    for i, stream in enumerate(data.get("result") or []):
        labels = {str(k): str(v) for k, v in (stream.get("stream") or {}).items()}
        for j, value in enumerate(stream.get("values") or []):
            pos = f"{position}#result[{i}].values[{j}]"
            if not isinstance(value, list) or len(value) < 2 or not isinstance(value[1], str):
                yield Record(json.dumps(value)[:65536], pos, None, labels,
                             "Loki stream entry is not [\"<ns timestamp>\", \"<line>\", ...]")
                continue
            ts = value[0]
            ts_ns = int(ts) if isinstance(ts, str) and ts.isdigit() else None
            if ts_ns is None:
                yield Record(value[1], pos, None, labels, f"Loki entry timestamp {ts!r} is not integer ns")
                continue
            yield Record(value[1], pos, ts_ns, labels)


def _json_documents(lines: Iterable[bytes], path: str, limit: int) -> Iterator[Record]:
    """One JSON document per line, each possibly holding several records (OTLP/JSON requests as the
    collector's file exporter writes them, CloudWatch exports): expanded with :func:`expand_document`."""
    for rec in _plain(lines, path, limit):
        if rec.reject_reason is None and rec.text[:1] == "{":
            try:
                obj = json.loads(rec.text)
            except json.JSONDecodeError:
                obj = None
            parts = expand_document(obj) if obj is not None else None
            if parts is not None:
                for i, text in enumerate(parts):
                    yield Record(text, f"{rec.position}#{i}", None, rec.labels)
                continue
        yield rec


def _logcli(lines: Iterable[bytes], path: str, limit: int) -> Iterator[Record]:
    label_cache: dict[Any, dict[str, str]] = {}
    for lineno, raw in enumerate(lines, 1):
        pos = str(lineno)
        if not raw.strip():
            yield Record("", pos, None, None, "empty line in a logcli jsonl export")
            continue
        if len(raw) > limit:
            text, _ = _decode(raw[:65536], path)
            yield Record(text, pos, None, None, _too_large(len(raw), limit))
            continue
        text, err = _decode(raw, path)
        if err:
            yield Record(text, pos, None, None, err)
            continue
        try:
            obj = loads_json(text)
        except json.JSONDecodeError as exc:
            yield Record(text, pos, None, None, f"logcli jsonl record is not valid JSON: {exc.msg} "
                         f"at column {exc.colno}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("line"), str):
            yield Record(text, pos, None, None, "logcli jsonl record without a string \"line\"")
            continue
        ts = obj.get("timestamp")
        ts_ns = parse_rfc3339_ns(ts) if isinstance(ts, str) else None
        if ts is not None and ts_ns is None:
            yield Record(obj["line"], pos, None, None, f"logcli jsonl timestamp {ts!r} is not RFC 3339")
            continue
        lb = obj.get("labels")
        labels = None
        if isinstance(lb, dict) and lb:
            # one dict per label set: the items in the export's order are the key (hashing them costs a
            # tenth of serializing them); a value that cannot be hashed (a nested object) is serialized
            key: Any = tuple(lb.items())
            try:
                labels = label_cache.get(key)
            except TypeError:
                key = json.dumps(lb, sort_keys=True)
                labels = label_cache.get(key)
            if labels is None:
                labels = {str(k): str(v) for k, v in lb.items()}
                if len(label_cache) < 100_000:
                    label_cache[key] = labels
        yield Record(obj["line"], pos, ts_ns, labels)


def _cri(lines: Iterable[bytes], path: str, limit: int) -> Iterator[Record]:
    labels = labels_from_path(path)
    parts: list[bytes] = []
    start = 0
    for lineno, raw in enumerate(lines, 1):
        m = _CRI_LINE.match(raw)
        if not m:
            text, _ = _decode(raw[:65536], path)
            yield Record(text, str(lineno), None, labels,
                         "not a CRI log line (<RFC3339Nano> <stdout|stderr> <P|F> <text>)")
            continue
        ts_b, _stream, tag, body = m.groups()
        if not parts:
            start = lineno
        parts.append(body or b"")
        if tag == b"P" and sum(len(p) for p in parts) <= limit:
            continue
        joined = b"".join(parts)
        parts = []
        pos = str(start) if start == lineno else f"{start}-{lineno}"
        ts_ns = parse_rfc3339_ns(ts_b.decode("ascii", errors="replace"))
        if len(joined) > limit:
            text, _ = _decode(joined[:65536], path)
            yield Record(text, pos, ts_ns, labels, _too_large(len(joined), limit))
            continue
        text, err = _decode(joined, path)
        yield Record(text, pos, ts_ns, labels, err)
    if parts:
        text, err = _decode(b"".join(parts), path)
        yield Record(text, str(start), None, labels,
                     err or "CRI partial line (P) without its final (F) part: file truncated")


_LONE_BRACE = re.compile(rb"(?m)^[ \t]*[\[{][ \t]*\r?$")


@dataclass
class Chunk:
    """Columns of plain-line records from one read chunk (the fast path: no per-line Python objects).

    ``texts`` and ``positions`` are Arrow string arrays (``positions`` are line numbers); ``reasons`` is
    always None here (a chunk needing a reject goes through the per-line path).
    """

    texts: pa.Array
    positions: pa.Array
    reasons: list[str | None] | None


# Bytes that make a line worth a closer (per-line) look at its ends: ASCII whitespace (what
# ``bytes.strip`` removes: a line of only these is blank, as in the per-line path) and lone-brace chars.
_WS_BYTES = np.zeros(256, dtype=bool)
_WS_BYTES[list(b" \t\n\r\x0b\x0c")] = True
_BRACE_OR_WS = _WS_BYTES.copy()
_BRACE_OR_WS[[ord("{"), ord("[")]] = True


# Our own Arrow allocations come from the system allocator: the default (mimalloc) returns freed memory
# to the OS at once, and on VMs the madvise + page faults of getting it back cost more than the work.
_POOL = pa.system_memory_pool()


def _columns(data: bytes | bytearray, end: int, lineno: int, limit: int) -> Chunk | str | None:
    """Cut ``data[:end]`` (whole lines, no final newline) into Arrow columns without a Python object
    per line (and without copying ``data``: ``data[end]`` must be a newline). ``data`` may be reused
    by the caller afterwards: the columns own their memory.

    Returns the :class:`Chunk` (None if every line was blank), or why the chunk needs the per-line
    path: ``"rest"`` (a line that starts with ``"`` -- a wrapped Envoy line -- or a lone ``{``/``[``
    opening a multi-line JSON document: the rest of the file goes line by line) or ``"chunk"`` (an
    over-long line or invalid UTF-8: only this chunk). Blank and whitespace-only lines are skipped;
    their line numbers are not reused, so positions stay the file's line numbers.
    """
    buf = np.frombuffer(data, dtype=np.uint8, count=end)
    nl = np.flatnonzero(buf == 10)
    n = len(nl) + 1
    starts = np.empty(n, dtype=np.int64)
    starts[0] = 0
    starts[1:] = nl + 1
    ends = np.empty(n, dtype=np.int64)
    ends[:-1] = nl
    ends[-1] = end
    lengths = ends - starts
    if int(lengths.max()) > limit:
        return "chunk"
    nonempty = lengths > 0
    first = buf[starts[nonempty]]
    if (first == ord('"')).any():
        return "rest"
    last = buf[ends[nonempty] - 1]
    look = np.zeros(n, dtype=bool)
    look[nonempty] = _BRACE_OR_WS[last] | _WS_BYTES[first]
    blank = ~nonempty
    for i in np.flatnonzero(look).tolist():
        line = data[starts[i]:ends[i]]
        if _LONE_BRACE.fullmatch(line):
            return "rest"
        blank[i] = not line.strip()
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[:-1] = starts
    offsets[-1] = end + 1
    arr = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    try:
        # drop each "\n"; the cast checks UTF-8 (in C++)
        texts = pc.binary_slice(arr, 0, -1, memory_pool=_POOL).cast(pa.large_string(), memory_pool=_POOL)
    except pa.ArrowInvalid:
        return "chunk"
    finally:
        del arr  # releases the export of ``data`` (the caller resizes and refills it)
    if data.find(b"\r", 0, end) >= 0:
        texts = pc.utf8_rtrim(texts, "\r", memory_pool=_POOL)
    positions = pa.array(np.arange(lineno, lineno + n, dtype=np.int64)).cast(pa.string(), memory_pool=_POOL)
    if blank.any():
        keep = pa.array(~blank)
        texts = pc.filter(texts, keep, memory_pool=_POOL)
        positions = pc.filter(positions, keep, memory_pool=_POOL)
    if len(texts) == 0:
        return None
    return Chunk(texts.cast(pa.string(), memory_pool=_POOL), positions, None)


def plain_chunks(fh: Any, path: str, head: list[bytes], limit: int = MAX_RECORD_BYTES,
                 chunk_bytes: int = 4 << 20) -> Iterator[Chunk | Record]:
    """Plain lines read in large chunks and cut into Arrow columns at once (no Python object per line,
    which made reading the largest cost of an ingest; see :func:`_columns`).

    Falls back to the per-line path (:func:`_plain`) for the rest of the file as soon as a chunk holds
    something that needs it: a lone ``{`` opening a multi-line JSON document or a line starting with a
    quote (a wrapped Envoy line), and for one chunk with an over-long line or invalid UTF-8. Yields
    :class:`Chunk` columns or single :class:`Record`.
    """
    lineno = 1
    # One buffer, reused: the chunk is read into it after the previous chunk's unfinished last line
    # (no 4 MB allocations, whose page faults cost more than the parsing on VMs).
    buf = bytearray(b"\n".join(head) + b"\n" if head else b"")
    have = len(buf)
    while True:
        if len(buf) < have + chunk_bytes:
            buf.extend(bytes(have + chunk_bytes - len(buf)))
        with memoryview(buf) as mv:
            got_n = fh.readinto(mv[have:have + chunk_bytes]) or 0
        eof = got_n == 0
        total = have + got_n
        if eof:
            cut = total
        else:
            cut = buf.rfind(b"\n", 0, total)
            if cut < 0:
                have = total
                continue
        nl = not eof or (total > 0 and buf[total - 1] == 10)
        end = cut - 1 if eof and nl else cut  # body = buf[:end]
        if end <= 0:
            if eof:
                return
            lineno += 1
            buf[:total - cut - 1] = buf[cut + 1:total]
            have = total - cut - 1
            continue
        got = _columns(buf if nl else bytes(buf[:end]) + b"\n", end, lineno, limit)
        if got == "rest":
            rest = itertools.chain(bytes(buf[:end]).split(b"\n"), _iter_lines(bytes(buf[cut + 1:total]), fh))
            yield from _plain(rest, path, limit, lineno)
            return
        if got == "chunk":
            yield from _plain(bytes(buf[:end]).split(b"\n"), path, limit, lineno)
        elif got is not None:
            assert isinstance(got, Chunk)
            yield got
        lineno += buf.count(b"\n", 0, end) + 1
        if eof:
            return
        buf[:total - cut - 1] = buf[cut + 1:total]  # the unfinished last line goes to the front
        have = total - cut - 1


def _iter_lines(carry: bytes, fh: Any) -> Iterator[bytes]:
    rest = carry + fh.read()
    if rest:
        lines = rest.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        yield from lines
