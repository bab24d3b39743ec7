"""meshlens: investigate service-mesh audit logs from Jupyter.

The Python API that notebooks and scripts use, in one place::

    import meshlens
    meshlens.ingest_files("mesh.duckdb", ["access.log.gz"])
    meshlens.ingest("mesh.duckdb", "loki+https://loki:3100", query='{namespace="shop"}', since="2h")
    with meshlens.open_store("mesh.duckdb", read_only=True) as store:
        report = meshlens.root_cause(store, "frontend", "latest-3h", "latest")

Names are loaded on first use (PEP 562), so ``import meshlens`` -- and every command of the CLI --
costs nothing for the parts it does not touch (pandas, altair, papermill...). ``__all__`` is the
public surface; a test pins it.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> "module:attribute"
_EXPORTS: dict[str, str] = {
    # ingest: one pipeline, sources by name or URL
    "ingest": "meshlens.ingest:ingest",
    "ingest_files": "meshlens.ingest:ingest_files",
    "ingest_loki": "meshlens.sources.loki:ingest_loki",
    "ingest_es": "meshlens.sources.elasticsearch:ingest_es",
    "aggregate_loki": "meshlens.sources.loki:aggregate_loki",
    "aggregate_es": "meshlens.sources.elasticsearch:aggregate_es",
    "IngestCounts": "meshlens.ingest:IngestCounts",
    "Source": "meshlens.sources.base:Source",
    "open_source": "meshlens.sources.base:open_source",
    "register_source": "meshlens.sources.base:register_source",
    "FilterConfig": "meshlens.filters:FilterConfig",
    # the store
    "open_store": "meshlens.store:open_store",
    "Store": "meshlens.store:Store",
    "attach_archive": "meshlens.archive:attach",
    "apply_retention": "meshlens.retention:apply_retention",
    "load_policy": "meshlens.retention:load_policy",
    # analyses
    "summary": "meshlens.analysis.overview:summary",
    "detect_anomalies": "meshlens.analysis.anomalies:detect_anomalies",
    "root_cause": "meshlens.analysis.rootcause:analyze",
    "correlate_changes": "meshlens.analysis.changes:correlate",
    "service_graph": "meshlens.analysis.graph:service_graph",
    # reports
    "run_report": "meshlens.reports:run_report",
    "time_range": "meshlens.notebook:time_range",
    # errors
    "MeshlensError": "meshlens.errors:MeshlensError",
    "ConfigError": "meshlens.errors:ConfigError",
    "SourceError": "meshlens.errors:SourceError",
    "AuthError": "meshlens.errors:AuthError",
    "QueryError": "meshlens.errors:QueryError",
    "StoreError": "meshlens.errors:StoreError",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'meshlens' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
