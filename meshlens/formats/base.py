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


# (text, parsed JSON object or None, labels) -> event
RecordParser = Callable[[str, Any, Labels], Event]
