"""Local files as a source: plain, gzip, logcli jsonl, saved Loki responses, CRI container logs.

The source only reads bytes and cuts them into :class:`~meshlens.records.RawBatch` objects; the
container layout is decided by :mod:`meshlens.formats.containers` and the log format later by the
parsers. Files are streamed, so memory stays bounded by the batch size whatever the file size.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from meshlens.errors import SourceError
from meshlens.formats.containers import (
    MAX_RECORD_BYTES,
    Chunk,
    labels_from_path,
    plain_chunks,
    records_from_lines,
    sniff,
)
from meshlens.records import DEFAULT_BATCH, RawBatch

GZIP_MAGIC = b"\x1f\x8b"


def expand_paths(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Files given directly, plus every regular file under given directories (sorted, stable)."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out += sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif path.is_file():
            out.append(path)
        elif not path.exists():
            raise SourceError(f"{path}: no such file or directory")
        else:
            raise SourceError(f"{path}: not a regular file")
    return out


def _open(path: Path) -> BinaryIO:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, closed by it
    except OSError as exc:
        raise SourceError(f"{path}: cannot open ({exc.strerror})") from exc
    if fh.read(2) == GZIP_MAGIC:
        fh.seek(0)
        return gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[return-value]
    fh.seek(0)
    return fh


def _lines(fh: BinaryIO) -> Iterator[bytes]:
    for raw in fh:
        yield raw[:-1] if raw.endswith(b"\n") else raw


def file_source_id(path: Path) -> str:
    return f"file:{path.resolve()}"


def read_file(path: str | os.PathLike[str], *, batch_size: int = DEFAULT_BATCH,
              max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawBatch]:
    """Yield batches of raw records from one file."""
    path = Path(path)
    source = file_source_id(path)
    fh = _open(path)
    try:
        try:
            lines = _lines(fh)
            head = list(itertools.islice(lines, 5))
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise SourceError(f"{path}: cannot read ({exc})") from exc
        kind = sniff(head, str(path))
        ident = kind in ("lines", "cri")  # line numbers identify records; logcli/Loki carry (labels, ts)
        seen = 0
        if kind == "lines":
            items = plain_chunks(fh, str(path), head, max_record_bytes)
            labels = labels_from_path(str(path))
        else:
            items = records_from_lines(itertools.chain(head, lines), str(path), kind, max_record_bytes)
        batch = _Builder(source, ident)
        try:
            for rec in items:
                if isinstance(rec, Chunk):
                    seen += len(rec.texts)
                    done = 0
                    while done < len(rec.texts):  # cut chunks so that batches hold exactly batch_size
                        k = min(len(rec.texts) - done, batch_size - len(batch))
                        batch.add_chunk(Chunk(rec.texts.slice(done, k), rec.positions.slice(done, k), None), labels)
                        done += k
                        if len(batch) >= batch_size:
                            yield batch.take()
                    continue
                batch.add(rec.text, rec.ts_ns, rec.labels, rec.position, rec.reject_reason)
                seen += 1
                if len(batch) >= batch_size:
                    yield batch.take()
        except (OSError, EOFError, gzip.BadGzipFile, io.UnsupportedOperation) as exc:
            if len(batch):
                yield batch.take()
            raise SourceError(f"{path}: read failed after some records ({exc}); the records before the "
                              "failure are stored, fix the file and re-run (re-ingest is idempotent)") from exc
        if seen == 0:
            size = path.stat().st_size
            batch.add("", None, None, f"{path}:0",
                      "empty file: no records" if size == 0 else f"no records in {size} bytes (blank lines only)")
        if len(batch):
            yield batch.take()
    finally:
        fh.close()


class _Builder:
    """Collects records into a :class:`RawBatch`: plain-file chunks stay Arrow columns (no Python
    object per line), single records (other containers, the per-line fallback) stay lists; a batch
    holding both is turned into Arrow columns."""

    def __init__(self, source: str, identity_positions: bool) -> None:
        self.source = source
        self.ident = identity_positions
        self._reset()

    def _reset(self) -> None:
        self.lines: list[pa.Array] = []  # Arrow pieces, in order
        self.positions: list[pa.Array] = []
        self.reasons: list[pa.Array] = []
        self.labels: list[dict[str, str] | None] = []
        self.ts: list[int | None] = []
        self.any_reason = False
        self.any_ts = False
        self.pending = RawBatch(source=self.source)  # list-mode records not yet cut into a piece
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def add(self, text: str, ts_ns: int | None, labels: dict[str, str] | None, position: str,
            reason: str | None) -> None:
        self.pending.append(text, ts_ns, labels, position, reason)
        self.labels.append(labels)
        self.ts.append(ts_ns)
        self.any_reason = self.any_reason or reason is not None
        self.any_ts = self.any_ts or ts_ns is not None
        self.n += 1

    def _flush_pending(self) -> None:
        p = self.pending
        if len(p):
            self.lines.append(pa.array(p.lines, pa.string()))
            self.positions.append(pa.array(p.positions, pa.string()))
            self.reasons.append(pa.array(p.reject_reasons or [None] * len(p), pa.string()))
            self.pending = RawBatch(source=self.source)

    def add_chunk(self, chunk: Chunk, labels: dict[str, str] | None) -> None:
        self._flush_pending()
        n = len(chunk.texts)
        self.lines.append(chunk.texts)
        self.positions.append(chunk.positions)
        self.reasons.append(pa.nulls(n, pa.string()))
        self.labels.extend([labels] * n)
        self.ts.extend([None] * n)
        self.n += n

    def take(self) -> RawBatch:
        if not self.lines:  # list records only: keep the list form
            b = self.pending
            b.identity_positions = self.ident
            if b.reject_reasons is not None and not any(r is not None for r in b.reject_reasons):
                b.reject_reasons = None
        else:
            self._flush_pending()
            b = RawBatch(source=self.source, lines=pa.chunked_array(self.lines, pa.string()),
                         ts_ns=self.ts if self.any_ts else [], labels=self.labels,
                         positions=pa.chunked_array(self.positions, pa.string()),
                         reject_reasons=pa.chunked_array(self.reasons, pa.string()).to_pylist() if self.any_reason else None,
                         identity_positions=self.ident)
        self._reset()
        return b


def read_files(paths: list[str | os.PathLike[str]], **kw: int) -> Iterator[RawBatch]:
    for p in expand_paths(paths):
        yield from read_file(p, **kw)
