"""Shared pieces of the parsers: the reject signal and the record-parser contract.

A *record parser* turns one raw record into one normalized event (a dict keyed by the column names of
:data:`meshlens.schema.EVENT_COLUMNS`; missing keys mean NULL) or raises :class:`Reject` with a reason a
human can act on. Parsers are pure: no I/O, no DuckDB, no clock.

High-volume access-log formats (Istio/Envoy text and JSON, Linkerd) are parsed in bulk with vectorized
DuckDB SQL in :mod:`meshlens.formats.bulk`; the rest use record parsers registered in
:mod:`meshlens.formats.detect`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Event = dict[str, Any]
Labels = dict[str, str]


class Reject(Exception):  # noqa: N818 - it is a signal, not an error condition of the program
    """Raised by a record parser: this record cannot become an event, and ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Embedded(Exception):  # noqa: N818 - a signal, like Reject
    """Raised by an envelope parser: this record *carries* another record (the proxy's own line in an
    ECS ``event.original``, an OTLP log body, a search hit's ``_source``, Docker's ``log``).

    The detector parses ``text`` like any record -- the Envoy/Istio lines with the bulk SQL parser --
    with the envelope's ``labels`` as the writer's identity, then completes the event from the
    envelope: ``ts_ns``/``ts_text`` when the inner record has no time (with ``ts_refine``, also when the
    envelope's time is the same instant to within a second but more precise), ``fill`` for columns the
    inner record left NULL. ``fallback``: the event the envelope itself yields when the inner record
    cannot be parsed. ``name`` names the envelope in reject reasons.
    """

    def __init__(self, text: str, *, name: str, labels: Labels | None = None, ts_ns: int | None = None,
                 ts_text: str | None = None, ts_refine: bool = False, fill: Event | None = None,
                 fallback: Event | None = None) -> None:
        super().__init__(name)
        self.text = text
        self.name = name
        self.labels = labels
        self.ts_ns = ts_ns
        self.ts_text = ts_text
        self.ts_refine = ts_refine
        self.fill = fill or {}
        self.fallback = fallback


# (text, parsed JSON object or None, labels) -> event
RecordParser = Callable[[str, Any, Labels], Event]
