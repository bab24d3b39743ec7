"""Small file-ingest batches and logs for crash, concurrency and bookkeeping tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from meshlens.records import RawBatch
from meshlens.sources.files import read_file

ROOT = Path(__file__).resolve().parents[2]


_RUNNER = """
import sys
from meshlens.ingest import ingest_batches
from meshlens.store import open_store
from tests.support.crash import small_batches
store = open_store(sys.argv[1])
try:
    ingest_batches(store, small_batches(sys.argv[2], int(sys.argv[3])), source="file:log", progress=False,
                   snapshot_every_s=float(sys.argv[4]))
    store.publish_snapshot()
finally:
    store.close()
print("DONE", flush=True)
"""


def small_batches(path: str | Path, n: int) -> Iterator[RawBatch]:
    """The file source's batches cut into ``n``-record batches (it batches per 4 MiB read chunk), so a
    small test file still spans many transactions."""
    for b in read_file(path):
        for i in range(0, len(b), n):
            yield RawBatch(source=b.source, lines=b.lines[i:i + n], ts_ns=b.ts_ns[i:i + n],
                           labels=b.labels[i:i + n], positions=b.positions[i:i + n],
                           reject_reasons=b.reject_reasons[i:i + n] if b.reject_reasons else None)


def istio_line(i: int) -> str:
    sec, ms = divmod(i, 1000)
    ts = f"2024-05-01T10:{(sec // 60) % 60:02d}:{sec % 60:02d}.{ms:03d}Z"
    return (f'[{ts}] "GET /api/items/{i % 97} HTTP/1.1" {200 if i % 13 else 503} - via_upstream - "-" 0 '
            f'{i % 5000} {i % 40} {i % 30} "-" "curl/8.0" "req-{i:08d}" "shop:8080" "10.0.{i % 250}.5:8080" '
            f"outbound|8080||shop.default.svc.cluster.local 10.0.0.4:{1024 + i % 60000} 10.0.0.5:8080 "
            "10.0.0.4:4000 - default")


def make_log(path: Path, n: int) -> Path:
    """n records: access lines, verbatim duplicates (kept, numbered) and unparseable lines (rejects)."""
    with path.open("w") as fh:
        for i in range(n):
            if i % 101 == 0:
                fh.write(f"garbage record {i} that no parser accepts\n")
            elif i % 173 == 0:
                fh.write(istio_line(i - 1) + "\n")  # identical to the previous line
            else:
                fh.write(istio_line(i) + "\n")
    return path
