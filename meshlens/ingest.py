"""Source -> parse/normalize -> DuckDB, with the conservation count and progress.

For every ingest: records read = events stored + duplicates skipped + rejects + filtered (dropped by an
ingest filter rule or not kept by success sampling, counted per rule -- see :mod:`meshlens.filters`).
The count is checked per batch (a batch whose output does not add up aborts the run before anything of
it is stored), and
each batch is stored in one transaction together with the source's checkpoint, so a run killed at any
moment resumes without loss or duplicates.

Parsing and storing overlap: a worker thread parses batch N+1 while the main thread writes batch N
(DuckDB releases the GIL while it works), which is what keeps the two cores busy.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from meshlens import filters as _filters
from meshlens.errors import MeshlensError, StoreError
from meshlens.formats.detect import Parser
from meshlens.records import RawBatch
from meshlens.sources.files import DEFAULT_BATCH, expand_paths, read_file
from meshlens.store import Store, open_store

SNAPSHOT_EVERY_S = 60.0
# DuckDB caches written blocks up to its memory limit (80% of RAM by default); ingest needs little of
# it, so the writer is capped to keep memory bounded whatever the input size (override with env).
INGEST_MEMORY_LIMIT = os.environ.get("MESHLENS_INGEST_MEMORY_LIMIT", "1GB")


@dataclass
class IngestCounts:
    """The numbers every ingest reports (plus the run id for ``ingest_runs``).

    ``read == stored + duplicates + rejects + filtered``; ``filtered_by_rule`` splits ``filtered``.
    """

    read: int = 0
    stored: int = 0
    duplicates: int = 0
    rejects: int = 0
    run_id: str = ""
    filtered: int = 0
    filtered_by_rule: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["records_read"] = d.pop("read")
        d["events_stored"] = d.pop("stored")
        d["duplicates_skipped"] = d.pop("duplicates")
        return d

    def empty_warning(self, input_bytes: int | None = None) -> str | None:
        """A warning when a non-empty input stored nothing new and nothing was a re-ingested duplicate:
        the format was not recognised, every record was rejected or filtered -- a silent 0 would let
        an SRE analyse an empty store. None when the result is plausible."""
        if self.stored or self.duplicates or (not self.read and not input_bytes):
            return None
        why = (f"{self.rejects} rejected, {self.filtered} filtered" if self.read
               else f"no records recognised in {input_bytes:,} bytes")
        return (f"warning: the input was not empty but 0 events were stored ({why}); check the format "
                "(--format), the filters, and `meshlens summary` / the rejects table")

    def add(self, other: IngestCounts) -> None:
        self.read += other.read
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.rejects += other.rejects
        self._add_filtered(other.filtered_by_rule)

    def _add_filtered(self, by_rule: dict[str, int]) -> None:
        for rule, n in by_rule.items():
            self.filtered_by_rule[rule] = self.filtered_by_rule.get(rule, 0) + n
            self.filtered += n

    def __str__(self) -> str:
        text = (f"records read: {self.read}  events stored: {self.stored}  "
                f"duplicates skipped: {self.duplicates}  rejects: {self.rejects}  filtered: {self.filtered}")
        per_rule = ", ".join(f"{k}: {v}" for k, v in self.filtered_by_rule.items() if v)
        return text + (f" ({per_rule})" if per_rule else "")


_DONE = object()


def _prefetch(batches: Iterable[RawBatch], depth: int = 1) -> Iterator[RawBatch]:
    """Read the next batch in a worker thread while the current one is parsed and stored.

    File reading and decoding are Python work; parsing and storing are DuckDB work that releases the
    GIL -- overlapping them keeps both cores busy. Errors are re-raised in the caller.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for b in batches:
                if stop.is_set():
                    return
                q.put(b)
            q.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer thread
            q.put(exc)

    t = threading.Thread(target=work, name="meshlens-read", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.1)
        t.join()


def ingest_batches(
    store: Store,
    batches: Iterable[RawBatch],
    *,
    source: str,
    fmt: str | None = None,
    watermark_key: str | None = None,
    progress: bool | tqdm = True,
    json_mapping: dict[str, str] | None = None,
    snapshot_every_s: float = SNAPSHOT_EVERY_S,
    filters: _filters.FilterConfig | None = None,
) -> IngestCounts:
    """Parse and store batches; returns the counts. ``source`` must not contain credentials.

    ``filters`` (default :meth:`FilterConfig.default`: drop health checks) is applied to each parsed
    batch before it is stored; pass ``FilterConfig()`` to keep everything.
    """
    cfg = _filters.FilterConfig.default() if filters is None else filters
    if INGEST_MEMORY_LIMIT and re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", INGEST_MEMORY_LIMIT):
        store.con.execute(f"SET memory_limit = '{INGEST_MEMORY_LIMIT}'")
    parser = Parser(fmt, json_mapping, con=store.con)
    counts = IngestCounts(run_id=store.start_run(source), filtered_by_rule=dict.fromkeys(cfg.rule_names(), 0))
    bar = progress if isinstance(progress, tqdm) else tqdm(
        total=None, unit="rec", unit_scale=True, desc="ingest", disable=not progress, leave=False,
        mininterval=0.5)
    try:
        for batch in _prefetch(batches):
            n = len(batch)
            n_ev, n_rej = parser.parse_into(batch)
            if n_ev + n_rej != n:
                parser.drop_results()
                raise StoreError(
                    f"internal error: batch of {n} records from {batch.source} parsed into {n_ev} "
                    f"events + {n_rej} rejects; nothing of this batch was stored. Please report it."
                )
            cp = (watermark_key, batch.checkpoint) if watermark_key and batch.checkpoint is not None else None
            try:
                fr = _filters.apply_filters(store.con, "_ml_events", cfg, n_ev)
                if fr.kept + fr.filtered != n_ev:
                    raise StoreError(
                        f"internal error: {n_ev} parsed events of a batch from {batch.source} were split into "
                        f"{fr.kept} kept + {fr.filtered} filtered; nothing of this batch was stored. Please report it.")
                res = store.insert_batch(fr.view, "_ml_rejects", cp)
            finally:
                _filters.drop_results(store.con)
                parser.drop_results()
            counts.read += n
            counts._add_filtered(fr.by_rule)
            counts.stored += res.stored
            counts.duplicates += res.duplicates
            counts.rejects += res.rejects
            bar.update(n)
            bar.set_postfix(stored=counts.stored, rejects=counts.rejects, refresh=False)
            store.maybe_publish_snapshot(snapshot_every_s)
    except BaseException as exc:
        msg = str(exc) if isinstance(exc, MeshlensError) else f"{type(exc).__name__}: {exc}"
        store.finish_run(counts.run_id, read=counts.read, stored=counts.stored, duplicates=counts.duplicates,
                         rejects=counts.rejects, status="failed", message=msg[:2000],
                         filtered=counts.filtered, filtered_by_rule=counts.filtered_by_rule)
        raise
    finally:
        if not isinstance(progress, tqdm):
            bar.close()
    store.finish_run(counts.run_id, read=counts.read, stored=counts.stored, duplicates=counts.duplicates,
                     rejects=counts.rejects, status="ok", filtered=counts.filtered,
                     filtered_by_rule=counts.filtered_by_rule)
    return counts


def ingest_files(
    db: str | os.PathLike[str] | Store,
    paths: list[str | os.PathLike[str]],
    fmt: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
    json_mapping: dict[str, str] | None = None,
    max_record_bytes: int | None = None,
    filters: _filters.FilterConfig | None = None,
) -> IngestCounts:
    """Ingest files (or directories of files) into the store at ``db``; returns the counts.

    ``filters``: see :func:`ingest_batches` (default: drop health checks, counted per rule)."""
    files = expand_paths(paths)
    kw: dict[str, int] = {"batch_size": batch_size}
    if max_record_bytes:
        kw["max_record_bytes"] = max_record_bytes

    def batches() -> Iterator[RawBatch]:
        for f in files:
            yield from read_file(f, **kw)

    source = "file:" + ",".join(str(f) for f in files[:3]) + (f",+{len(files) - 3} more" if len(files) > 3 else "")
    if isinstance(db, Store):
        return ingest_batches(db, batches(), source=source, fmt=fmt, progress=progress,
                              json_mapping=json_mapping, filters=filters)
    store = open_store(db)
    try:
        return ingest_batches(store, batches(), source=source, fmt=fmt, progress=progress,
                              json_mapping=json_mapping, filters=filters)
    finally:
        try:
            store.publish_snapshot()
        finally:
            store.close()
