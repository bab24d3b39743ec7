"""Source -> parse/normalize -> DuckDB, with the conservation count and progress.

For every ingest: records read = events stored + duplicates skipped + rejects + filtered (dropped by an
ingest filter rule or not kept by success sampling, counted per rule -- see :mod:`meshlens.filters`).
The count is checked per batch (a batch whose output does not add up aborts the run before anything of
it is stored), and
each batch is stored in one transaction together with the source's checkpoint, so a run killed at any
moment resumes without loss or duplicates.

Reading and storing overlap: a worker thread reads (and for Loki, fetches and decodes) batch N+1 while
the main thread parses and stores batch N in DuckDB (which releases the GIL while it works), which is
what keeps the two cores busy. Parsing itself runs on the writer, not during the fetch.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from meshlens import filters as _filters
from meshlens.errors import MeshlensError, StoreError
from meshlens.formats.detect import Parser
from meshlens.records import AggregateCounts, RawBatch
from meshlens.sources.base import Source
from meshlens.sources.files import DEFAULT_BATCH, FileSource
from meshlens.store import Store, open_store

SNAPSHOT_EVERY_S = 60.0
# DuckDB caches written blocks up to its memory limit (80% of RAM by default); ingest needs little of
# it, so the writer is capped to keep memory bounded whatever the input size (override with env).
INGEST_MEMORY_LIMIT = os.environ.get("MESHLENS_INGEST_MEMORY_LIMIT", "1GB")
MAX_REJECT_REASONS = 20
"""Distinct reject reasons counted per run (for the "0 events stored" warning's top reason)."""
_TRUNCATED_RE = re.compile(r" \[raw truncated to .*\]$")
_QUOTED_RE = re.compile(r"'[^']*'")
_NUMBER_RE = re.compile(r"\b\d+\b")
GC_EVERY_S = 30.0
"""While an ingest runs the cyclic garbage collector is paused and run once per this many seconds."""


@contextlib.contextmanager
def _gc_paused(every_s: float = GC_EVERY_S) -> Iterator[Any]:
    """Pause Python's automatic cyclic GC for the ingest; yields a ``tick()`` to call between batches.

    Why: decoding a 5000-line Loki page allocates 5000 small lists; the automatic collector then runs
    every few hundred allocations, and its full passes walk every object alive -- the batch being
    filled included. Measured against the real Loki, that was 8-10 % of the client's CPU (1M lines:
    22.3/22.9 s wall paused against 24.5/24.7 s not). Ingest code makes almost no reference cycles
    (reference counting frees its garbage), and ``tick()`` collects at most every ``every_s`` seconds
    so a long run's few cycles are still freed. The caller's GC state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    last = time.monotonic()

    def tick() -> None:
        nonlocal last
        if time.monotonic() - last >= every_s:
            gc.collect()
            last = time.monotonic()

    try:
        yield tick
    finally:
        if was_enabled:
            gc.enable()


_warmed = False


def _warm_arrow_bridge() -> None:
    """Import pandas in a background thread, once, while the first batch is read.

    Why: pyarrow imports pandas (its pandas shim) on the first conversion of a Python list, which the
    parser does for every batch; that import takes ~0.25 s of CPU. Done on the writer it lands on the
    critical path after the fetch (a 100k-line Loki range takes ~3 s in all); a thread started before the
    source is read does it while the writer waits for the network or the file.
    """
    global _warmed
    if _warmed or "pandas" in sys.modules:
        return
    _warmed = True

    def work() -> None:
        with contextlib.suppress(Exception):  # no pandas installed: pyarrow works without it
            import pandas  # noqa: F401

    threading.Thread(target=work, name="meshlens-warm", daemon=True).start()


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
    # rows this run added to ``rejects``; ``rejects`` counts every unparseable record read, including
    # ones an earlier run already stored (a resumed or repeated range re-reads them)
    rejects_new: int = 0
    warnings: list[str] = field(default_factory=list)  # things the user should know (e.g. "no lines: ...")
    # why records were rejected: reason -> count (the commonest; at most MAX_REJECT_REASONS distinct), and
    # which ingest read them (the source id: no credentials) -- what the "0 events stored" warning names
    reject_reasons: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["records_read"] = d.pop("read")
        d["events_stored"] = d.pop("stored")
        d["duplicates_skipped"] = d.pop("duplicates")
        return d

    def empty_warning(self, input_bytes: int | None = None, *, unit: str = "records") -> str | None:
        """A warning when a non-empty input stored nothing new and nothing was a re-ingested duplicate:
        the format was not recognised, every record was rejected or filtered -- a silent 0 would let
        an SRE analyse an empty store. One line naming the source, how many ``unit`` (records, lines,
        documents) were read, and why none was kept: the commonest reject reason, the filter rule(s)
        that dropped them. None when the result is plausible (also when nothing was read: a source
        that matched nothing says so itself, with what does exist)."""
        if self.stored or self.duplicates or (not self.read and not input_bytes):
            return None
        where = f"{self.source}: " if self.source else ""
        tail = "; check the format (--format), the filters, and `meshlens summary` / the rejects table"
        if not self.read:
            return (f"warning: {where}the input was not empty but 0 events were stored (no records recognised "
                    f"in {input_bytes:,} bytes){tail}")
        parts = []
        if self.rejects:
            top = max(self.reject_reasons.items(), key=lambda kv: (kv[1], kv[0]), default=None)
            reason = f" (top reason, {top[1]} of them: {top[0]})" if top else ""
            parts.append(("all rejected" if self.rejects == self.read else f"{self.rejects} rejected") + reason)
        if self.filtered:
            rules = sorted(((n, r) for r, n in self.filtered_by_rule.items() if n), reverse=True)
            by = ", ".join(f"{r!r} ({n})" for n, r in rules[:3])
            parts.append(("all filtered" if self.filtered == self.read else f"{self.filtered} filtered")
                         + (f" by rule {by}" if by else ""))
        return f"warning: {where}{self.read} {unit} read but 0 events were stored: {'; '.join(parts)}{tail}"

    def _add_reasons(self, rows: Iterable[tuple[str | None, int]]) -> None:
        for reason, n in rows:
            # the reason's class: without the quoted text of the record and the numbers (line, column...)
            key = _NUMBER_RE.sub("N", _QUOTED_RE.sub("'…'", _TRUNCATED_RE.sub("", reason or "no reason given")))
            if key in self.reject_reasons or len(self.reject_reasons) < MAX_REJECT_REASONS:
                self.reject_reasons[key] = self.reject_reasons.get(key, 0) + int(n)

    def add(self, other: IngestCounts) -> None:
        self.read += other.read
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.rejects += other.rejects
        self.rejects_new += other.rejects_new
        self.warnings += other.warnings
        self._add_filtered(other.filtered_by_rule)
        self._add_reasons(other.reject_reasons.items())

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
    counts = IngestCounts(run_id=store.start_run(source), filtered_by_rule=dict.fromkeys(cfg.rule_names(), 0),
                          source=source)
    bar = progress if isinstance(progress, tqdm) else tqdm(
        total=None, unit="rec", unit_scale=True, desc="ingest", disable=not progress, leave=False,
        mininterval=0.5)
    _warm_arrow_bridge()
    paused = contextlib.ExitStack()
    gc_tick = paused.enter_context(_gc_paused())
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
                res = store.insert_batch(fr.view, "_ml_rejects", cp, run=(counts.run_id, n, fr.filtered),
                                         n_events=fr.kept, n_rejects=n_rej)
                if n_rej:
                    counts._add_reasons(store.con.execute(
                        "SELECT reason, count(*) FROM _ml_rejects GROUP BY ALL ORDER BY 2 DESC "
                        f"LIMIT {MAX_REJECT_REASONS}").fetchall())
            finally:
                _filters.drop_results(store.con)
                parser.drop_results()
            counts.read += n
            counts._add_filtered(fr.by_rule)
            counts.stored += res.stored
            counts.duplicates += res.duplicates
            counts.rejects += res.rejects
            counts.rejects_new += res.rejects_new
            bar.update(n)
            bar.set_postfix(stored=counts.stored, rejects=counts.rejects, refresh=False)
            store.maybe_publish_snapshot(snapshot_every_s)
            gc_tick()
    except BaseException as exc:
        msg = str(exc) if isinstance(exc, MeshlensError) else f"{type(exc).__name__}: {exc}"
        store.finish_run(counts.run_id, read=counts.read, stored=counts.stored, duplicates=counts.duplicates,
                         rejects=counts.rejects, status="failed", message=msg[:2000],
                         filtered=counts.filtered, filtered_by_rule=counts.filtered_by_rule)
        raise
    finally:
        paused.close()
        if not isinstance(progress, tqdm):
            bar.close()
    store.finish_run(counts.run_id, read=counts.read, stored=counts.stored, duplicates=counts.duplicates,
                     rejects=counts.rejects, status="ok", filtered=counts.filtered,
                     filtered_by_rule=counts.filtered_by_rule)
    return counts


def ingest(
    db: str | os.PathLike[str] | Store,
    source: Source | str,
    *,
    resume: bool = False,
    fmt: str | None = None,
    progress: bool = True,
    json_mapping: dict[str, str] | None = None,
    filters: _filters.FilterConfig | None = None,
    snapshot_every_s: float = SNAPSHOT_EVERY_S,
    **source_options: Any,
) -> IngestCounts:
    """The one ingest pipeline: any :class:`~meshlens.sources.base.Source` into the store at ``db``.

    ``source`` is a Source, or a name/URL/path that the source registry resolves
    (:func:`meshlens.sources.base.open_source`, with ``source_options``). This function owns, for
    every source: the store (opened read-write unless an open :class:`Store` is given, which is left
    to its owner), the run record, the resume state (read when ``resume``, stored with each batch and
    after the last one), the read snapshot (published after the run, also after a failed one: what
    was committed is consistent) and the conservation count. Returns the counts.
    """
    from meshlens.sources.base import open_source

    src = open_source(source, **source_options) if isinstance(source, str) else source
    _warm_arrow_bridge()  # while the store opens and the source plans
    own = not isinstance(db, Store)
    store: Store | None = None
    failed = True
    try:
        store = open_store(db) if own else db  # type: ignore[arg-type]
        key = src.watermark_key
        previous = store.get_watermark(key) if resume and key else None
        if not src.plan(previous):
            run_id = store.start_run(src.source_id)
            store.finish_run(run_id, read=0, stored=0, duplicates=0, rejects=0, status="ok",
                             message="nothing new since the last run")
            failed = False
            return IngestCounts(run_id=run_id)
        batches = src.batches()
        try:
            counts = ingest_batches(store, batches, source=src.source_id, fmt=fmt, watermark_key=key,
                                    progress=getattr(src, "progress_bar", progress), json_mapping=json_mapping,
                                    filters=filters, snapshot_every_s=snapshot_every_s)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops fetch threads and server-side cursors if the ingest failed midway
        state = src.final_state()
        if key and state is not None:
            store.set_watermark(key, dict(state))
        warnings = getattr(counts, "warnings", None)
        if isinstance(warnings, list):  # what the user should hear about (e.g. nothing matched the range)
            warnings.extend(getattr(src, "warnings", None) or ())
        notes = list(getattr(src, "notes", None) or ())
        if notes:  # how the source read (fallbacks taken), kept in the run's row
            store.finish_run(counts.run_id, read=counts.read, stored=counts.stored, duplicates=counts.duplicates,
                             rejects=counts.rejects, status="ok", message="; ".join(notes)[:2000],
                             filtered=counts.filtered, filtered_by_rule=counts.filtered_by_rule)
        failed = False
        return counts
    finally:
        try:
            src.close()
        finally:
            if own and store is not None:
                try:
                    store.publish_snapshot()
                except Exception:
                    if not failed:
                        raise  # on a failed run the original error is the one to report
                finally:
                    store.close()


def store_series(store: Store, table: Any, counts: AggregateCounts) -> None:
    """Upsert one table of ``series`` rows (idempotent on series key + ts) and count what it held."""
    store.upsert_series(table)
    for m in table.column("metric").to_pylist():
        counts.metrics[m] = counts.metrics.get(m, 0) + 1
    counts.samples += table.num_rows
    counts.series += len(set(table.column("series_key").to_pylist()))


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
    src = FileSource(paths, batch_size=batch_size, max_record_bytes=max_record_bytes)
    return ingest(db, src, fmt=fmt, progress=progress, json_mapping=json_mapping, filters=filters)
