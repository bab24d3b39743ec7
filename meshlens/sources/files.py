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

from meshlens.errors import SourceError
from meshlens.formats.containers import (
    MAX_RECORD_BYTES,
    Chunk,
    labels_from_path,
    plain_chunks,
    records_from_lines,
    sniff,
)
from meshlens.records import RawBatch

DEFAULT_BATCH = 200_000
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
        batch = RawBatch(source=source, identity_positions=ident)
        seen = 0
        if kind == "lines":
            items = plain_chunks(fh, str(path), head, max_record_bytes)
            labels = labels_from_path(str(path))
        else:
            items = records_from_lines(itertools.chain(head, lines), str(path), kind, max_record_bytes)
        try:
            for rec in items:
                if isinstance(rec, Chunk):
                    _extend(batch, rec, labels)
                    seen += len(rec.texts)
                else:
                    batch.append(rec.text, rec.ts_ns, rec.labels, rec.position, rec.reject_reason)
                    seen += 1
                if len(batch) >= batch_size:
                    yield batch
                    batch = RawBatch(source=source, identity_positions=ident)
        except (OSError, EOFError, gzip.BadGzipFile, io.UnsupportedOperation) as exc:
            if len(batch):
                yield batch
            raise SourceError(f"{path}: read failed after some records ({exc}); the records before the "
                              "failure are stored, fix the file and re-run (re-ingest is idempotent)") from exc
        if seen == 0:
            size = path.stat().st_size
            batch.append("", None, None, f"{path}:0",
                         "empty file: no records" if size == 0 else f"no records in {size} bytes (blank lines only)")
        if len(batch):
            yield batch
    finally:
        fh.close()


def _extend(batch: RawBatch, chunk: Chunk, labels: dict[str, str] | None) -> None:
    n = len(chunk.texts)
    batch.lines.extend(chunk.texts)
    batch.ts_ns.extend([None] * n)
    batch.labels.extend([labels] * n)
    batch.positions.extend(chunk.positions)
    if batch.reject_reasons is not None:
        batch.reject_reasons.extend([None] * n)


def read_files(paths: list[str | os.PathLike[str]], **kw: int) -> Iterator[RawBatch]:
    for p in expand_paths(paths):
        yield from read_file(p, **kw)
