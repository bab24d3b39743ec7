"""Simulated meshes (``meshlens simulate``) as Loki streams: push them to the in-process or the real Loki."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import pandas as pd


def simulation_streams(out_dir: str | Path) -> list[tuple[dict[str, str], list[tuple[int, str]]]]:
    """Every ``*.jsonl.gz`` logcli export of a simulation as ``[(labels, [(ts_ns, line), ...]), ...]``,
    each stream sorted by its Loki timestamp (the order Loki accepts pushes in)."""
    streams: dict[tuple[tuple[str, str], ...], list[tuple[int, str]]] = defaultdict(list)
    for path in sorted(Path(out_dir).glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                rec = json.loads(raw)
                ts = int(pd.Timestamp(rec["timestamp"]).value)
                streams[tuple(sorted(rec["labels"].items()))].append((ts, rec["line"]))
    return [(dict(k), sorted(set(v))) for k, v in sorted(streams.items())]


def push_simulation(server: object, out_dir: str | Path, extra_labels: dict[str, str] | None = None) -> int:
    """Push a simulation into a :class:`tests.servers.loki.LokiServer` or a real Loki
    (:class:`tests.servers.real_loki.RealLoki`), each stream with ``extra_labels`` added; returns the
    lines pushed."""
    streams = [({**lb, **(extra_labels or {})}, e) for lb, e in simulation_streams(out_dir)]
    if hasattr(server, "load"):
        return sum(server.load(lb, e) for lb, e in streams)  # type: ignore[attr-defined]
    step, total = 5000, 0
    longest = max((len(e) for _, e in streams), default=0)
    for i in range(0, longest, step):  # interleaved, each stream in time order
        total += server.push([(lb, e[i:i + step]) for lb, e in streams if e[i:i + step]])  # type: ignore[attr-defined]
    return total
