"""Simulated meshes (``meshlens simulate``) as Elasticsearch documents, shipped as Fluent Bit ships them.

A proxy's Istio JSON line becomes a document with its keys merged in (Fluent Bit's Kubernetes filter with
``Merge_Log On``: the parsed fields the investigate scan aggregates) and the Kubernetes metadata under
``kubernetes``; a TEXT line stays raw in ``log`` (``Merge_Log`` only parses JSON); an audit event is the
event itself (the API server's webhook/Fluent Bit tail of the audit log) with ``@timestamp``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support.loki_sim import simulation_streams

ACCESS_INDEX = "logs-istio-000001"
AUDIT_INDEX = "k8s-audit-000001"


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ns % 10**9:09d}Z"


def simulation_docs(out_dir: str | Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(index, id, document)`` for every line of a simulation."""
    for n, (labels, entries) in enumerate(simulation_streams(out_dir)):
        for i, (ts, line) in enumerate(entries):
            doc_id = f"s{n}-{i}"
            if "job" in labels:
                yield AUDIT_INDEX, doc_id, {"@timestamp": _iso(ts), **json.loads(line)}
                continue
            doc: dict[str, Any] = {"@timestamp": _iso(ts), "stream": "stdout"}
            if line.lstrip().startswith("{"):
                doc.update(json.loads(line))
            else:
                doc["log"] = line
            doc["kubernetes"] = {"namespace_name": labels.get("namespace"), "pod_name": labels.get("pod"),
                                 "container_name": labels.get("container"), "labels": {"app": labels.get("app")}}
            yield ACCESS_INDEX, doc_id, doc


def load_simulation(server: Any, out_dir: str | Path) -> dict[str, int]:
    """Index a simulation into a :class:`tests.servers.elasticsearch.EsTestServer`; documents per index."""
    server.create_index(ACCESS_INDEX, mappings={"@timestamp": {"type": "date_nanos"}})
    server.create_index(AUDIT_INDEX, mappings={"@timestamp": {"type": "date_nanos"}})
    by_index: dict[str, list[tuple[str, dict[str, Any]]]] = {ACCESS_INDEX: [], AUDIT_INDEX: []}
    for index, doc_id, doc in simulation_docs(out_dir):
        by_index[index].append((doc_id, doc))
    return {index: server.add_docs(index, docs) for index, docs in by_index.items()}
