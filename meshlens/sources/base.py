"""What a source is, and the registry that finds one by name or URL scheme.

A source turns "where the logs are" into :class:`~meshlens.records.RawBatch` objects and a resumable
cursor -- nothing about DuckDB, parsing or run records: :func:`meshlens.ingest.ingest` owns those for
every source (the store, the run record, watermarks, snapshots and the conservation count), as dlt
separates its sources from ``pipeline.run``.

Sources are registered by name and URL scheme, the way papermill registers its I/O handlers
(``papermill/iorw.py``): ``file`` (paths), ``loki`` (``loki://``, ``loki+https://``) and ``es``
(``es://``, ``es+https://``, ``elasticsearch://``, ``opensearch://``). A factory is named by its
dotted path, so the registry imports nothing heavy until a source is opened. Adding a source is one
module plus one :func:`register_source` call (see the README, "Extending meshlens").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from meshlens.errors import ConfigError
from meshlens.records import RawBatch


@runtime_checkable
class Source(Protocol):
    """One readable range of records, resumable through an opaque JSON state.

    ``source_id`` is stored on every event and in the run record: it must not hold credentials.
    ``watermark_key`` names the stored resume state (None: the source is not resumable by state and
    relies on event identity alone, as files do).

    Optional attributes the pipeline reads: ``progress_bar`` (False when the source draws its own
    progress, or a tqdm bar it owns), ``notes`` (lines saying how the run read, e.g. a fallback
    taken, stored in the run record) and ``warnings`` (what the user should hear about, e.g. an empty
    range and what does exist; added to the counts' warnings)."""

    source_id: str
    watermark_key: str | None

    def plan(self, previous: Mapping[str, Any] | None) -> bool:
        """Decide what to read, from the stored state of an earlier run (None: from scratch).

        Returns False when there is nothing to read (a resumed run that is already complete)."""

    def batches(self) -> Iterator[RawBatch]:
        """Yield raw batches; a batch's ``checkpoint`` is the state valid once it is stored."""

    def final_state(self) -> Mapping[str, Any] | None:
        """The state to store after every batch was stored (None: keep the last batch's checkpoint)."""

    def close(self) -> None:
        """Release connections, threads and server-side cursors."""


@dataclass(frozen=True)
class SourceEntry:
    """A registered source: its name, the URL schemes that select it, and its factory."""

    name: str
    factory: str  # "module:function"; the function takes (target, **options) and returns a Source
    schemes: tuple[str, ...] = ()
    help: str = ""
    options: tuple[str, ...] = field(default=())

    def load(self) -> Callable[..., Source]:
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, SourceEntry] = {}


def register_source(name: str, factory: str, *, schemes: tuple[str, ...] = (), help: str = "") -> SourceEntry:
    """Register a source (a later registration of the same name replaces the earlier one)."""
    entry = SourceEntry(name, factory, tuple(s.lower() for s in schemes), help)
    _REGISTRY[name] = entry
    return entry


def registered_sources() -> dict[str, SourceEntry]:
    """Every registered source by name."""
    return dict(_REGISTRY)


def source_entry(target: str) -> tuple[SourceEntry, str]:
    """The registered source that ``target`` names, and the target as that source's factory wants it.

    ``target`` is a source name (``loki``), a URL whose scheme selects a source (``loki+https://h:3100``
    -> ``loki`` with ``https://h:3100``; ``es://h:9200`` -> ``es`` with ``http://h:9200``) or a path
    (-> ``file``)."""
    if target in _REGISTRY:
        return _REGISTRY[target], ""
    scheme, sep, rest = target.partition("://")
    if sep:
        base, plus, transport = scheme.lower().partition("+")
        for entry in _REGISTRY.values():
            if base in entry.schemes:
                if entry.name == "file":
                    return entry, rest
                return entry, f"{transport or 'http'}://{rest}"
        known = sorted({s for e in _REGISTRY.values() for s in e.schemes})
        raise ConfigError(f"no source for URL scheme {scheme!r} in {target!r}; known schemes: {', '.join(known)} "
                          f"(with +https for TLS, e.g. loki+https://loki:3100)")
    return _REGISTRY["file"], target


def open_source(target: str, **options: Any) -> Source:
    """Build the source that ``target`` names (see :func:`source_entry`) with its options."""
    entry, rest = source_entry(target)
    return entry.load()(rest, **options)


register_source("file", "meshlens.sources.files:open_file_source", schemes=("file",),
                help="local files or directories: plain, gzip, logcli jsonl, saved Loki JSON, CRI logs")
register_source("loki", "meshlens.sources.loki:open_loki_source", schemes=("loki",),
                help="Grafana Loki over its HTTP API (LogQL range queries)")
register_source("es", "meshlens.sources.elasticsearch:open_es_source",
                schemes=("es", "elasticsearch", "opensearch"),
                help="Elasticsearch / OpenSearch (point-in-time or scroll paging)")
