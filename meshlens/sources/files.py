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
    """Collects records into a :class:`RawBatch`. Texts and positions of plain-file chunks stay Arrow
    columns (no Python object per line); single records (other containers, the per-line fallback) are
    collected as lists, kept as lists when the batch holds nothing else, else cut into an Arrow piece.
    Labels, timestamps and reject reasons are per-record lists either way."""

    def __init__(self, source: str, identity_positions: bool) -> None:
        self.source = source
        self.ident = identity_positions
        self._reset()

    def _reset(self) -> None:
        self.texts: list[pa.Array] = []  # Arrow pieces, in order
        self.positions: list[pa.Array] = []
        self.pending_texts: list[str] = []  # single records not yet cut into a piece
        self.pending_positions: list[str] = []
        self.labels: list[dict[str, str] | None] = []
        self.ts: list[int | None] = []
        self.reasons: list[str | None] = []
        self.any_ts = self.any_reason = False

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, text: str, ts_ns: int | None, labels: dict[str, str] | None, position: str,
            reason: str | None) -> None:
        self.pending_texts.append(text)
        self.pending_positions.append(position)
        self.labels.append(labels)
        self.ts.append(ts_ns)
        self.reasons.append(reason)
        self.any_ts = self.any_ts or ts_ns is not None
        self.any_reason = self.any_reason or reason is not None

    def _flush_pending(self) -> None:
        if self.pending_texts:
            self.texts.append(pa.array(self.pending_texts, pa.string()))
            self.positions.append(pa.array(self.pending_positions, pa.string()))
            self.pending_texts, self.pending_positions = [], []

    def add_chunk(self, chunk: Chunk, labels: dict[str, str] | None) -> None:
        self._flush_pending()
        n = len(chunk.texts)
        self.texts.append(chunk.texts)
        self.positions.append(chunk.positions)
        self.labels.extend([labels] * n)
        self.ts.extend([None] * n)
        self.reasons.extend([None] * n)

    def take(self) -> RawBatch:
        if self.texts:
            self._flush_pending()
            texts: list[str] | pa.ChunkedArray = pa.chunked_array(self.texts, pa.string())
            positions: list[str] | pa.ChunkedArray = pa.chunked_array(self.positions, pa.string())
        else:
            texts, positions = self.pending_texts, self.pending_positions
        b = RawBatch(source=self.source, lines=texts, ts_ns=self.ts if self.any_ts else [], labels=self.labels,
                     positions=positions, reject_reasons=self.reasons if self.any_reason else None,
                     identity_positions=self.ident)
        self._reset()
        return b


def read_files(paths: list[str | os.PathLike[str]], **kw: int) -> Iterator[RawBatch]:
    for p in expand_paths(paths):
        yield from read_file(p, **kw)


class FileSource:
    """Local files and directories as a :class:`~meshlens.sources.base.Source`.

    Files carry no resume state: a re-run re-reads them, and the event identity (source labels,
    timestamp, text, position) makes every record already stored a duplicate, so nothing is doubled."""

    watermark_key: str | None = None

    def __init__(self, paths: list[str | os.PathLike[str]], *, batch_size: int = DEFAULT_BATCH,
                 max_record_bytes: int | None = None) -> None:
        self.files = expand_paths(paths)
        self._kw: dict[str, int] = {"batch_size": batch_size}
        if max_record_bytes:
            self._kw["max_record_bytes"] = max_record_bytes

    @property
    def source_id(self) -> str:
        shown = ",".join(str(f) for f in self.files[:3])
        more = f",+{len(self.files) - 3} more" if len(self.files) > 3 else ""
        return f"file:{shown}{more}"

    def plan(self, previous: object = None) -> bool:
        return True

    def batches(self) -> Iterator[RawBatch]:
        for f in self.files:
            yield from read_file(f, **self._kw)

    def final_state(self) -> None:
        return None

    def close(self) -> None:
        return None


def open_file_source(target: str | os.PathLike[str] | list[str | os.PathLike[str]], **options: int) -> FileSource:
    """Registry factory (``file``): a path, a ``file://`` URL's path, or a list of paths."""
    paths = list(target) if isinstance(target, list | tuple) else [target]
    return FileSource(paths, **options)
