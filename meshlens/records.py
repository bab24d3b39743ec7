"""The one shape in which raw log records travel from a source to the parsers.

Sources (files, Loki, Elasticsearch) know nothing about formats or DuckDB: they yield
:class:`RawBatch` objects -- columns of lines with the timestamp and stream labels the backend attached
-- and the ingest pipeline parses and stores each batch in one transaction. Columns (parallel lists)
rather than one object per line keep the per-line cost low: a batch becomes an Arrow table in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module: keep it light
    import pyarrow as pa

# Records per batch (one transaction) for bulk sources: two DuckDB row groups (2 x 122,880 rows), so a
# batch is written as whole row groups, one per core, in parallel -- measured ~1.5x faster per row than
# 200,000 rows.
ROW_GROUP = 122_880
DEFAULT_BATCH = 2 * ROW_GROUP


@dataclass
class RawBatch:
    """A batch of raw records from one source.

    Attributes:
        source: stable identity of the ingest source, e.g. ``file:/var/log/x.log`` or
            ``loki:https://loki:3100|tenant|{query}``. Stored on every event/reject.
        lines: the record text, one entry per record (a multi-line record is one entry): a list, or an
            Arrow string array when the source cut the lines into columns without Python objects (the
            plain-file fast path); :meth:`texts` gives a list either way.
        ts_ns: the backend's timestamp for each record in Unix nanoseconds (Loki entry time, ES
            ``@timestamp``, CRI time) or ``None``. Used when the line carries no time of its own, and
            part of the record's identity.
        labels: the backend's stream labels / metadata per record (namespace, pod, container, app...),
            or ``None``.
        positions: where each record came from, for rejects and debugging (``file:line``,
            ``query@ts``, ``index/_id``); a list or an Arrow string array, like ``lines``.
        reject_reasons: optional per-record reason decided by the container layer before parsing
            (invalid UTF-8, record too large); such records go straight to ``rejects``.
        checkpoint: opaque watermark state committed in the same transaction as this batch, so a run
            killed after this batch resumes exactly after it.
        identity_positions: the positions are a stable identity of each record in its source (a line
            number in a plain or CRI file, an Elasticsearch ``index/_id``), so they are part of the
            event id: two identical lines of one file stay two events whatever the batch boundaries.
            False when the backend's (labels, timestamp, line) is the identity (Loki, logcli exports).
    """

    source: str
    lines: list[str] | pa.ChunkedArray = field(default_factory=list)
    ts_ns: list[int | None] = field(default_factory=list)
    labels: list[dict[str, str] | None] = field(default_factory=list)
    positions: list[str] | pa.ChunkedArray = field(default_factory=list)
    reject_reasons: list[str | None] | None = None
    checkpoint: dict[str, Any] | None = None
    identity_positions: bool = False

    def __len__(self) -> int:
        return len(self.lines)

    def texts(self) -> list[str]:
        """The record texts as a Python list (whatever the storage)."""
        return self.lines if isinstance(self.lines, list) else self.lines.to_pylist()  # type: ignore[no-any-return]

    def position_list(self) -> list[str]:
        """The positions as a Python list (whatever the storage)."""
        return self.positions if isinstance(self.positions, list) else self.positions.to_pylist()  # type: ignore[no-any-return]

    def append(
        self,
        line: str,
        ts_ns: int | None = None,
        labels: dict[str, str] | None = None,
        position: str = "",
        reject_reason: str | None = None,
    ) -> None:
        """Add one record (convenience for sources that build batches record by record; list storage)."""
        self.lines.append(line)
        self.ts_ns.append(ts_ns)
        self.labels.append(labels)
        self.positions.append(position)
        if reject_reason is not None and self.reject_reasons is None:
            self.reject_reasons = [None] * (len(self.lines) - 1)
        if self.reject_reasons is not None:
            self.reject_reasons.append(reject_reason)


@dataclass
class AggregateCounts:
    """What a push-down aggregation stored (every backend: Loki metric queries, ES aggregations).

    Backends add their own field (Loki the detected ``log_format``, ES the ``group_by`` fields) in a
    subclass; the counting and the writing are :func:`store_series`, the one writer of ``series``."""

    queries: int = 0
    series: int = 0
    samples: int = 0
    metrics: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "series": self.series, "samples": self.samples,
                "metrics": dict(self.metrics)}
