"""Investigate an Elasticsearch/OpenSearch range too big to pull: aggregate there, pull only the evidence.

The Elasticsearch half of :mod:`meshlens.investigate` (read its docstring first): the scan runs as
composite aggregations in the cluster, and everything after it -- detection, the pull windows, the
explanation, the result -- is :mod:`meshlens.investigate`'s own code, unchanged:

1. **Scan** (:func:`scan_es`): ``_count`` of the range (``lines_in_range``, exact); one composite
   aggregation ``date_histogram`` + ``terms`` on the writer's namespace and service, the upstream
   cluster, the response code, flags, details and transport failure reason (metric
   ``investigate_requests``), and one ``date_histogram`` + ``terms`` on writer and cluster with a
   ``percentiles`` (p50, p99) sub-aggregation of the duration on the coarse grid
   (``investigate_p50_ms``/``investigate_p99_ms``). Each follows ``after_key`` to the last page; the page
   size is at most ``search.max_buckets`` (a ``too_many_buckets_exception`` halves it and asks again).
   The buckets are stored in ``series`` with the labels the Loki scan stores (``namespace, app, cluster,
   status, flags, details, transport_failure``), so :func:`meshlens.investigate.detect_suspects` reads
   them unchanged.
2. **Detect**: :func:`meshlens.investigate.detect_suspects`.
3. **Pull**: per :func:`meshlens.investigate.pull_windows` window, the documents of the episodes'
   services (a ``terms`` filter on the service field) and the gateways' documents towards the hurt
   entry services only (``terms`` on the exact upstream clusters the scan saw them call), plus the
   Kubernetes audit index over the range (``--audit-index``), each through
   :func:`meshlens.sources.elasticsearch.open_es_source` and :func:`meshlens.ingest.ingest` (exact,
   resumable, deduplicated).
4. **Explain**: :func:`meshlens.analysis.incidents.find_incidents` with the scan's anomalies.

Which document fields hold the values: the scan aggregates *parsed* fields -- Istio's JSON access-log
keys in the document (Fluent Bit ``Merge_Log``, Filebeat ``decode_json_fields`` with
``target: ""``, an ingest pipeline's ``json`` processor) and the shipper's Kubernetes metadata
(``kubernetes.namespace_name``/``kubernetes.labels.app`` of Fluent Bit, ``kubernetes.namespace``/
``kubernetes.labels.app`` of Filebeat, detected from a sample). Every field has an option
(:class:`EsFields`). Documents that hold only the raw line (``message``/``log``) cannot be scanned:
:func:`scan_es` says so and names the fallback, ``ingest es`` + ``analyze incidents``. A runtime field
(grok or painless over ``message``) was not chosen: it parses every document of the range on every
query -- the cost a scan exists to avoid -- and it cannot split Istio's TEXT format reliably (quoted
fields with spaces); parsing at index time is the fix that scales.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from meshlens.analysis.common import Window, bucket_seconds
from meshlens.errors import ConfigError, SourceError
from meshlens.investigate import (
    CHANGE_LOOKBACK,
    InvestigateResult,
    Scan,
    Suspect,
    _callee,
    _frames,
    _gateways,
    _read,
    detect_suspects,
    explain,
    pull_windows,
    scanned_edges,
)
from meshlens.sources.elasticsearch import (
    _UNIT_TO_MS,
    PRODUCT,
    AggSpec,
    EsQuery,
    EsSource,
    _auto_spec,
    _run_composite,
    composite_to_series,
    http_config,
    index_path,
    load_query_dsl,
    open_es_source,
)
from meshlens.sources.elasticsearch import AggregateCounts as EsAggregateCounts
from meshlens.sources.elasticsearch import Window as EsWindow
from meshlens.sources.http import HttpClient
from meshlens.store import Store

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 5000
"""Composite buckets per page: well under Elasticsearch's default ``search.max_buckets`` (65,536 since
7.0; 10,000 on some 7.x and on OpenSearch domains) -- a page's buckets count against it."""


@dataclass
class EsFields:
    """Which document fields hold what the scan groups by (defaults: Istio JSON keys in the document).

    ``namespace``/``service`` default to the shipper's Kubernetes metadata, detected from a sample
    document (Fluent Bit or Filebeat layout). A text field is aggregated as its ``.keyword`` sub-field."""

    namespace: str | None = None
    service: str | None = None
    cluster: str = "upstream_cluster"
    status: str = "response_code"
    flags: str = "response_flags"
    details: str = "response_code_details"
    transport_failure: str = "upstream_transport_failure_reason"
    duration: str = "duration"
    duration_unit: str = "ms"

    def group(self) -> dict[str, str]:
        """label (as the Loki scan names it) -> field, for the request counts."""
        assert self.namespace and self.service
        return {"namespace": self.namespace, "app": self.service, "cluster": self.cluster, "status": self.status,
                "flags": self.flags, "details": self.details, "transport_failure": self.transport_failure}


class _Counting:
    """An :class:`HttpClient` that counts the requests sent through it (``queries`` of the result)."""

    def __init__(self, inner: HttpClient) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.sent = 0

    def _bump(self) -> None:
        with self._lock:
            self.sent += 1

    def request(self, *a: Any, **kw: Any) -> Any:
        self._bump()
        return self._inner.request(*a, **kw)

    def request_json(self, *a: Any, **kw: Any) -> Any:
        self._bump()
        return self._inner.request_json(*a, **kw)

    def close(self) -> None:  # the owner closes the inner client
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# ------------------------------------------------------------------------------------------------
# 1. Scan
# ------------------------------------------------------------------------------------------------


def _narrowed(src: EsSource, extra: list[dict[str, Any]]) -> EsSource:
    """The same index, time field and user query, with ``extra`` filters, on the same connection."""
    dsl = {"bool": {"filter": [*src.q._user_filters(), *extra]}}
    q = EsQuery(index=src.q.index, time_field=src.q.time_field, query_dsl=dsl)
    out = EsSource(src.cfg, q, client=src.client)
    out.info = src.info
    return out


def _composite(src: EsSource, window: EsWindow, spec: AggSpec, page_size: int) -> tuple[list[dict[str, Any]], int]:
    """Every bucket (``after_key`` paging; text fields retried as ``.keyword``), and the pages asked.

    A page larger than the cluster's ``search.max_buckets`` is refused (``too_many_buckets_exception``):
    the page size is halved and the aggregation asked again from the start."""
    size = page_size
    asked = 0
    while True:
        counts = EsAggregateCounts()
        try:
            buckets = _run_composite(src, window, spec, size, counts)
            return buckets, asked + counts.queries
        except SourceError as exc:
            asked += counts.queries + 1
            text = str(exc).lower()
            if ("too many buckets" not in text and "too_many_buckets" not in text) or size <= 10:
                raise
            log.info("composite page of %d buckets refused (search.max_buckets); asking for %d", size, size // 2)
            size //= 2


def _store(store: Store, table: Any, metric: dict[str, str], origin: str, scan: Scan) -> None:
    """Composite rows -> ``series`` under the investigate metric names (``metric``: old -> new)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from meshlens.ingest import store_series
    from meshlens.records import AggregateCounts

    table = table.filter(pc.is_in(table.column("metric"), pa.array(list(metric))))
    names = [metric[m] for m in table.column("metric").to_pylist()]
    table = table.set_column(table.schema.get_field_index("metric"), "metric", pa.array(names, pa.string()))
    store.query("SELECT 1")  # finish migrate()'s pending result before register() (see aggregate_es)
    store_series(store, table, AggregateCounts())
    for new in sorted(set(names)):
        if origin not in scan.origins.setdefault(new, []):
            scan.origins[new].append(origin)


def _needs_parsed_fields(src: EsSource, window: EsWindow, fields: EsFields) -> str:
    """Why the range cannot be scanned (no document has the cluster field), naming the fallback."""
    body = {"size": 1, "query": src.q.clause(window), "track_total_hits": False}
    hits = (src._checked_search(f"/{index_path(src.q.index)}/_search", body).get("hits") or {}).get("hits") or []
    doc = hits[0].get("_source") if hits and isinstance(hits[0].get("_source"), dict) else {}
    raw = next((k for k in ("message", "log") if isinstance(doc.get(k), str)), None)
    what = (f"its documents hold the raw access-log line in {raw!r}" if raw
            else f"no document has the field {fields.cluster!r}")
    return (f"cannot scan {src.q.index!r}: {what}, and the scan aggregates parsed fields (Istio's JSON "
            "access-log keys in the document, e.g. Fluent Bit Merge_Log, Filebeat decode_json_fields, or an "
            "ingest pipeline; or name them with --cluster-field/--status-field/--duration-field...). "
            "Without them use the full path: meshlens ingest es + meshlens analyze incidents.")


def scan_es(store: Store, src: EsSource, window: Window, *, fields: EsFields | None = None,
            page_size: int = DEFAULT_PAGE_SIZE, progress: Any = None) -> tuple[Scan, EsFields]:
    """Phase 1: ``_count`` and composite aggregations over the whole range, stored in ``series``.

    Returns the scan and the fields as resolved (detected namespace/service, ``.keyword`` sub-fields),
    which the pull filters on. Raises :class:`ConfigError` when the documents carry no parsed fields."""
    from meshlens.analysis.anomalies import _coarse_width

    fields = EsFields(**vars(fields)) if fields is not None else EsFields()
    if fields.duration_unit not in _UNIT_TO_MS:
        raise ConfigError(f"duration unit {fields.duration_unit!r}: use one of {', '.join(_UNIT_TO_MS)}")
    width = bucket_seconds(window)
    scan = Scan(window=window, width=width, coarse_width=width)

    def tick(what: str) -> None:
        if progress is not None:
            progress.set_postfix_str(what, refresh=False)
            progress.update(1)

    def whole(w_s: int) -> EsWindow:  # whole buckets only (as the Loki scan's step grid)
        step = w_s * 1000
        lo_ms, hi_ms = window.lo_ns // 1_000_000, window.hi_ns // 1_000_000
        return EsWindow(-(-lo_ms // step) * step, hi_ms // step * step)

    full = EsWindow(window.lo_ns // 1_000_000, window.hi_ns // 1_000_000)
    src.validate(full)
    scan.queries += 1
    scan.lines_in_range = int(src.count(full) or 0)
    scan.queries += 1
    tick("count")
    if not scan.lines_in_range:
        return scan, fields
    access = _narrowed(src, [{"exists": {"field": fields.cluster}}])
    if not access.count(full):
        scan.queries += 1
        raise ConfigError(_needs_parsed_fields(src, full, fields))
    scan.queries += 1
    if not fields.namespace or not fields.service:  # the shipper's layout, from one access document
        spec = _auto_spec(access, full, AggSpec(1000, {}), explicit_group=False)
        scan.queries += 1
        fields.namespace = fields.namespace or spec.group_by.get("namespace")
        fields.service = fields.service or spec.group_by.get("service")
        if not fields.namespace or not fields.service:
            raise ConfigError(f"cannot tell which fields of {src.q.index!r} name the writer's namespace and "
                              "service (tried kubernetes.namespace_name/kubernetes.namespace and "
                              "kubernetes.labels.app/service.name): pass --namespace-field and --service-field")
    origin = f"{src.identity}|investigate"
    spec = AggSpec(width * 1000, fields.group())
    buckets, n = _composite(access, whole(width), spec, page_size)
    scan.queries += n
    for label, fld in spec.group_by.items():  # text fields resolved to their keyword sub-fields
        setattr(fields, {"app": "service"}.get(label, label), fld)
    _store(store, composite_to_series(buckets, spec, f"{origin}|requests|{width}s"),
           {"requests": "investigate_requests"}, f"{origin}|requests|{width}s", scan)
    tick("requests")
    # percentiles on a grid where a typical service sees ~20 requests per bucket, as the Loki scan
    fine, _ = _frames(store, scan, quantiles=False)
    scan.coarse_width = _coarse_width(fine, window, width) if not fine.empty else width
    cw = scan.coarse_width
    spec = AggSpec(cw * 1000, {"namespace": fields.namespace, "app": fields.service, "cluster": fields.cluster},
                   duration_field=fields.duration, duration_unit=fields.duration_unit, percents=(50.0, 99.0))
    buckets, n = _composite(access, whole(cw), spec, page_size)
    scan.queries += n
    _store(store, composite_to_series(buckets, spec, f"{origin}|duration|{cw}s"),
           {"p50_duration_ms": "investigate_p50_ms", "p99_duration_ms": "investigate_p99_ms"},
           f"{origin}|duration|{cw}s", scan)
    tick("percentiles")
    return scan, fields


# ------------------------------------------------------------------------------------------------
# 3. Pull
# ------------------------------------------------------------------------------------------------


def es_pull_plan(store: Store, scan: Scan, suspects: list[Suspect], fields: EsFields
                 ) -> list[tuple[dict[str, Any], int, int]]:
    """The filters to pull, as ``(query DSL clause, lo_ns, hi_ns)``: per explain window
    (:func:`meshlens.investigate.pull_windows`) the documents of its episodes' services, and the
    gateways' documents towards the window's entry services only -- a ``terms`` filter on the exact
    upstream clusters the scan saw the gateways call them through (the gateway carries all user
    traffic; the root cause needs the symptom's part). See :func:`meshlens.investigate.pull_plan`."""
    gws = _gateways(scanned_edges(store, scan))
    counts = _read(store, scan, "investigate_requests")
    gw_clusters = pd.DataFrame(columns=["cluster", "callee"])
    if gws and not counts.empty and "cluster" in counts:
        g = counts[counts["app"].isin(gws)][["cluster"]].drop_duplicates()
        g["callee"] = _callee(g["cluster"])[0]
        gw_clusters = g[g["callee"].notna()]
    out: list[tuple[dict[str, Any], int, int]] = []
    for w in pull_windows(suspects, scan.window):
        services = sorted(w.services - set(gws))
        if services:
            out.append(({"terms": {fields.service: services}}, w.lo_ns, w.hi_ns))
        clusters = sorted(gw_clusters[gw_clusters["callee"].isin(w.symptoms)]["cluster"])
        if gws and clusters:
            out.append(({"bool": {"filter": [{"terms": {fields.service: gws}},
                                             {"terms": {fields.cluster: clusters}}]}}, w.lo_ns, w.hi_ns))
    return out


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def investigate_es(
    db: str | os.PathLike[str] | Store,
    *,
    index: str,
    audit_index: str | None = None,
    url: str | None = None,
    since: str | int | None = None,
    start: str | int | datetime | None = None,
    end: str | int | datetime | None = None,
    query: str | None = None,
    query_dsl: dict[str, Any] | str | os.PathLike[str] | None = None,
    time_field: str = "@timestamp",
    audit_query: str | None = None,
    audit_time_field: str = "@timestamp",
    fields: EsFields | None = None,
    service: str | None = None,
    entries: list[str] | None = None,
    parallel: int = 1,
    page_size: int = DEFAULT_PAGE_SIZE,
    progress: bool = True,
    http_client: HttpClient | None = None,
    ingest_options: Mapping[str, Any] | None = None,
    **conn: Any,
) -> InvestigateResult:
    """Scan an index pattern with composite aggregations, pull only the suspects' documents, explain them.

    ``index``: the proxies' access-log index pattern (``query``/``query_dsl`` narrow it, as in
    ``ingest es``); ``audit_index``: the Kubernetes audit index pattern (config changes; optional,
    ``audit_query`` narrows it); ``fields``: where the parsed access-log fields are (:class:`EsFields`);
    ``service``: keep only the episodes that involve this service; ``entries``: where users see the
    mesh (default: what the ingress gateway calls). ``**conn`` as :func:`meshlens.sources.elasticsearch.
    ingest_es` (credentials from the environment or a config file). See the module docstring.
    """
    from meshlens.ingest import ingest
    from meshlens.store import writing
    from meshlens.timeutil import parse_duration_ns, resolve_range

    start_ns, end_ns = resolve_range(since, start, end)
    window = Window(start_ns, end_ns)
    dsl = load_query_dsl(query_dsl)
    base_q = EsQuery(index=index, time_field=time_field, query=query, query_dsl=dsl)
    if audit_index is not None:
        EsQuery(index=audit_index, time_field=audit_time_field, query=audit_query)
    own_http = http_client is None
    inner = http_client or HttpClient(http_config(url, **conn), PRODUCT)
    client = _Counting(inner)
    result = InvestigateResult(window=window)
    t0 = time.monotonic()

    def bar(total: int | None, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)

    try:
        with writing(db) as store:
            src = EsSource(inner.cfg, base_q, client=client)  # type: ignore[arg-type]
            with bar(3, "investigate es: scan") as b:
                scan, resolved = scan_es(store, src, window, fields=fields, page_size=page_size, progress=b)
            result.lines_in_range = scan.lines_in_range
            result.formats = ["istio-json-fields"] if scan.origins else []
            result.timings["scan"] = time.monotonic() - t0
            if not scan.lines_in_range:
                result.warnings.extend(src.warnings or [f"no documents in {index!r} in {window.describe()}"])
                result.queries = client.sent
                return result
            t1 = time.monotonic()
            suspects, entry_list, anoms = detect_suspects(store, scan, entries=entries, service=service)
            result.entries = entry_list
            result.suspects = [s.as_dict() for s in suspects]
            result.timings["detect"] = time.monotonic() - t1
            t2 = time.monotonic()
            pulls: list[tuple[str, Any, str | None, str, int, int]] = [
                (index, {"bool": {"filter": [*base_q._user_filters(), clause]}}, None, time_field, lo, hi)
                for clause, lo, hi in es_pull_plan(store, scan, suspects, resolved)]
            if audit_index is not None and suspects:
                pulls.append((audit_index, None, audit_query, audit_time_field,
                              start_ns - parse_duration_ns(CHANGE_LOOKBACK), end_ns))
            for idx, q_dsl, q_str, tf, lo, hi in pulls:
                rng = open_es_source(index=idx, start=lo, end=hi, query=q_str, query_dsl=q_dsl, time_field=tf,
                                     parallel=parallel, progress=progress, http_client=client)  # type: ignore[arg-type]
                counts = ingest(store, rng, resume=True, progress=progress, **dict(ingest_options or {}))
                result.lines_pulled += counts.read
                if idx == audit_index:
                    audit = EsSource(inner.cfg, EsQuery(index=idx, time_field=tf, query=q_str), client=client)  # type: ignore[arg-type]
                    result.lines_in_range += int(audit.count(EsWindow(start_ns // 1_000_000, end_ns // 1_000_000)) or 0)
            result.timings["pull"] = time.monotonic() - t2
            t3 = time.monotonic()
            with bar(1, "investigate es: explain") as b:
                result.incidents = explain(store, scan, suspects, anoms, entry_list, service, start_ns, end_ns)
                b.update(1)
            result.timings["explain"] = time.monotonic() - t3
            if not suspects:
                result.warnings.append(
                    f"the aggregates of {result.lines_in_range} documents show no episode that reaches users; "
                    "nothing was pulled (meshlens analyze anomalies on a full ingest lists weaker anomalies)")
            result.queries = client.sent
        return result
    finally:
        result.timings["total"] = time.monotonic() - t0
        if own_http:
            inner.close()


__all__ = ["EsFields", "es_pull_plan", "investigate_es", "scan_es"]
