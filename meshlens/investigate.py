"""Investigate a mesh too big to pull: scan in the backend, pull raw lines only for the evidence.

Every analysis of meshlens reads raw events in DuckDB, so an investigation of a range costs a full pull
of it. :func:`investigate_loki` runs the first half of the investigation where the data lives:

1. **Scan** (metric queries only, computed by Loki): per bucket, one ``sum by (namespace, app,
   upstream_cluster, response_code, response_flags, response_code_details,
   upstream_transport_failure_reason) (count_over_time(...))`` per access-log encoding (Istio TEXT via
   ``| pattern``, Istio JSON via ``| json``), the p50 and p99 of ``duration`` per writer and upstream
   cluster (from one histogram pass: ``sum by (namespace, app, upstream_cluster, bin)
   (count_over_time(... | label_format bin=...))`` per writer, :data:`LATENCY_BIN`), and the lines per
   stream (``sum by (namespace, app) (count_over_time({selector}[step]))``: ``lines_in_range`` and
   the share of each service's streams). The answers are stored in the ``series`` table (metrics
   ``investigate_*``), so the scan is also a record of what was seen.
2. **Detect** from the stored aggregates: they become the same edge / service / mesh series the anomaly
   analysis builds from raw hops (an outbound record is the edge ``app -> service of its upstream
   cluster``; a service is the sum of the edges into it, plus its own inbound records' denials, TLS
   failures and latency), scored by :func:`meshlens.analysis.anomalies.anomalies_from_series` and
   grouped into user-facing episodes by the incidents analysis' own grouping
   (:func:`meshlens.analysis.incidents._candidate_groups`): the symptom (an entry service), the onset and
   the suspect services of each episode.
3. **Pull** raw lines only for the suspects (:func:`pull_plan`): per explain window -- from
   :data:`PRE_PULL_S` before each onset (the baseline the root cause compares with) to at most
   :data:`MAX_EPISODE_PULL_S` after it plus :data:`POST_PULL_S`, overlapping windows merged -- the streams
   of the episodes' services (``app=~"a|b|c"``) and the ingress gateway's lines towards the hurt entry
   services only (a line filter); and the Kubernetes audit events of the range (config changes), all
   through the normal ingest (:func:`meshlens.ingest.ingest`: exact, resumable, deduplicated).
4. **Explain**: :func:`meshlens.analysis.incidents.find_incidents` with the scan's anomalies and call
   graph (the whole range is their baseline, as in a full pull), which runs the root cause and the
   change correlation of each episode on the pulled slice.

What aggregates cannot see, and what it falls back to: request-id chains (which request failed
because of which downstream call) exist only in raw lines, so the root cause is decided on the pulled
slice, where the suspects' own records carry the request ids; a culprit outside the suspects is seen
only through the suspects' client records (its edge), which is where the full-pull analysis would
also look first. Categorical findings (new edges, new callers of sensitive paths, plaintext) are not
scanned. Linkerd and other non-Istio access logs are not scanned (no LogQL parser here), so an
incident that shows only there is not found; ``ingest loki`` + ``analyze incidents`` is the fallback.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from meshlens.analysis.common import FAILURE_FLAGS, NS, Window, bucket_seconds
from meshlens.errors import ConfigError
from meshlens.sources.http import HttpClient
from meshlens.sources.loki import (
    LOKI_PRODUCT,
    LokiClient,
    MetricRunner,
    _prom_range,
    add_matcher,
    explain_empty,
    loki_http_config,
    matrix_to_series,
    open_loki_source,
    parse_streams,
    re2_escape,
    resolve_range,
    source_identity,
    split_log_query,
)
from meshlens.store import Store

log = logging.getLogger(__name__)

PRE_PULL_S = 15 * 60
"""Raw lines pulled before an onset: the root-cause analysis' baseline. ``incidents.PRE_S`` (30 min) is
what a full pull offers it; its sub-window is clipped to what was pulled, and 15 min of the symptom's
traffic is baseline enough for its failure and latency rates before vs during (the anomalies, with the
whole range as baseline, come from the scan). Each minute here is a minute of every suspect's lines:
30 min (and 10 min of recovery) made the pull 14-17 % of a 12 h range with two incidents
(bench_investigate). Measured on the evaluation windows (tests/analysis/test_investigate.py): 15 min
keeps every root cause of the full pull; 10 min does not, nor does cutting the episode itself
(:data:`MAX_EPISODE_PULL_S` 15 min), nor pulling only the entry service's calls to the suspects."""

POST_PULL_S = 5 * 60
"""Raw lines pulled after an episode's last anomalous bucket (its recovery; ``incidents.POST_S`` is 10 min:
its sub-window is clipped to what was pulled, and 5 min keeps the root causes)."""

MAX_EPISODE_PULL_S = 30 * 60
"""At most this much of an episode after its onset is pulled: the root cause is decided at the onset
(the incidents analysis' sub-window starts :data:`PRE_PULL_S` before it); a long episode's later part
adds lines, not evidence. Its reported end is then at most this long after the onset."""

CHANGE_LOOKBACK = "2h"
"""Audit events are pulled from this long before the range (as ``analyze changes`` looks back)."""

# Istio's default TEXT access log (formats.md 1.1), the fields the scan groups by; the transport failure
# reason (a quoted field after the connection termination details) tells TLS failures apart. A LogQL
# ``pattern`` (literal splitting) rather than a regexp: on the real Loki here it is ~4x cheaper per line
# for the same answer.
TEXT_PATTERN = ('[<_>] "<_> <_> <_>" <response_code> <response_flags> <response_code_details> <_> '
                '"<upstream_transport_failure_reason>" <_> <_> <duration> <_> "<_>" "<_>" "<_>" "<_>" "<_>" '
                '<upstream_cluster> <_>')
PARSERS = {"text": f"| pattern `{TEXT_PATTERN}`", "json": "| json"}
ACCESS_FILTER = '| __error__="" | upstream_cluster=~"(inbound|outbound).*"'
GROUP = "namespace, app, upstream_cluster, response_code, response_flags, response_code_details, " \
        "upstream_transport_failure_reason"
RENAME = {"response_code": "status", "response_flags": "flags", "response_code_details": "details",
          "upstream_transport_failure_reason": "transport_failure", "upstream_cluster": "cluster"}
LATENCY_BIN = ('{{ len .duration }}:{{ if hasPrefix "1" .duration }}{{ trunc 2 .duration }}'
               '{{ else }}{{ trunc 1 .duration }}{{ end }}')
"""A log-scale bin of the (integer ms) duration, computed by Loki per line (``| label_format``): its number
of digits and its leading digit -- two when it is a 1 -- e.g. ``3:2`` = 200-299 ms, ``3:15`` = 150-159
ms, ``2:47``... exact below 20 ms. One count query by (writer, upstream cluster, bin) yields both the p50 and
the p99 (:func:`latency_quantiles`): one pass over the lines instead of one per ``quantile_over_time``."""
DENIAL_RE = re.compile(r"^(rbac_access_denied|ext_authz_denied|ext_authz_error)")
TLS_RE = re.compile(r"tls|certificate|ssl", re.IGNORECASE)
_FQDN_RE = re.compile(r"^outbound\|[^|]*\|[^|]*\|([^.;|]+)(?:\.([^.;|]+))?")


@dataclass
class InvestigateResult:
    """What an investigation found and what it cost (``to_json`` is the ``--json`` object)."""

    window: Window
    incidents: list[dict[str, Any]] = field(default_factory=list)
    lines_pulled: int = 0
    lines_in_range: int = 0
    queries: int = 0
    suspects: list[dict[str, Any]] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"incidents": self.incidents,
                "pulled": {"lines_pulled": self.lines_pulled, "lines_in_range": self.lines_in_range,
                           "queries": self.queries},
                "suspects": self.suspects, "entries": self.entries, "formats": self.formats,
                "warnings": self.warnings, "timings_s": {k: round(v, 2) for k, v in self.timings.items()}}


# ------------------------------------------------------------------------------------------------
# 1. Scan
# ------------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """The aggregates of one scan as they were stored (``series`` origins per metric)."""

    window: Window
    width: int
    coarse_width: int
    origins: dict[str, list[str]] = field(default_factory=dict)
    formats: list[str] = field(default_factory=list)
    queries: int = 0
    lines_in_range: int = 0


def _aligned(window: Window, step_ns: int) -> tuple[int, int]:
    """Evaluation times on the step grid (bucket starts = eval - step), inside the window."""
    return ((window.lo_ns + step_ns - 1) // step_ns) * step_ns + step_ns, (window.hi_ns // step_ns) * step_ns


def _fetch(client: LokiClient, split_labels: tuple[str, ...], query: str, window: Window,
           step_ns: int) -> tuple[list[dict[str, Any]], int]:
    """One metric query over the window (split on Loki's limits): (matrix items, queries sent)."""
    runner = MetricRunner(client, step_ns, split_labels)
    lo, hi = _aligned(window, step_ns)
    return (runner.run(query, lo, hi) if hi >= lo else []), runner.queries


def _store(store: Store, client: LokiClient, org: str | None, name: str, query: str, step_ns: int,
           result: list[dict[str, Any]], scan: Scan) -> None:
    from meshlens.ingest import store_series
    from meshlens.records import AggregateCounts

    origin = source_identity(client.identity, org, query)
    table = matrix_to_series(result, metric=name, origin=origin, step_ns=step_ns, rename=RENAME)
    store_series(store, table, AggregateCounts())
    scan.origins.setdefault(name, []).append(origin)


def _run_all(store: Store, client: LokiClient, org: str | None, jobs: list[tuple[str, str, int]], window: Window,
             scan: Scan, split_labels: tuple[str, ...], parallel: int, tick: Any) -> list[list[dict[str, Any]]]:
    """Run ``(metric name, query, step)`` jobs, ``parallel`` at a time (Loki spreads each over its
    queriers; a few in flight keep them busy), storing each answer from this thread (DuckDB's)."""
    from concurrent.futures import ThreadPoolExecutor

    out: list[list[dict[str, Any]]] = []
    with ThreadPoolExecutor(max(1, parallel)) as ex:
        futs = [ex.submit(_fetch, client, split_labels, q, window, step) for _, q, step in jobs]
        for (name, q, step), fut in zip(jobs, futs, strict=True):
            result, n = fut.result()
            scan.queries += n
            _store(store, client, org, name, q, step, result, scan)
            out.append(result)
            tick(name.removeprefix("investigate_"))
    return out


def _formats(client: LokiClient, selector: str, lines: list[dict[str, Any]],
             step_ns: int) -> tuple[dict[str, str], int, dict[str, set[str] | None]]:
    """Which Istio encoding's queries read which streams -- ``{format: selector}`` -- and the queries it
    took, and the namespaces each one covers (None: all): 20 lines of each namespace from its busiest
    bucket (a short range: a sample query over the whole range could time out where the metric queries
    are split). When every namespace showed one
    encoding only, each format's selector names its namespaces, so that Loki reads only their chunks
    (a mixed mesh costs one pass per line, not two); otherwise both read the whole selector."""
    busiest: dict[str, tuple[float, int]] = {}
    for item in lines:
        ns = str((item.get("metric") or {}).get("namespace", ""))
        for t, v in item.get("values") or []:
            if float(v) > busiest.get(ns, (0.0, 0))[0]:
                busiest[ns] = (float(v), round(float(t) * 1000) * 1_000_000)
    seen: dict[str, set[str]] = {}
    for ns, (_, t_ns) in sorted(busiest.items()):
        q = add_matcher(selector, "namespace", "=", ns) if ns else selector
        data = client.query_range(q, t_ns - step_ns, t_ns + 1, limit=20, direction="backward")
        for ln in parse_streams(data).lines:
            s = ln.lstrip()
            fmt = "json" if s.startswith("{") else "text" if s.startswith("[") else None
            if fmt:
                seen.setdefault(fmt, set()).add(ns)
    formats = [f for f in ("text", "json") if f in seen]
    clean = len(formats) > 1 and not (seen["text"] & seen["json"]) and "" not in set().union(*seen.values())
    out = {}
    for f in formats:
        names = "|".join(re2_escape(n) for n in sorted(seen[f]))
        out[f] = add_matcher(selector, "namespace", "=~", names) if clean else selector
    return out, len(busiest), {f: set(seen[f]) if clean else None for f in formats}


def scan_loki(store: Store, client: LokiClient, selector: str, window: Window, *, org: str | None = None,
              split_labels: tuple[str, ...] = ("namespace", "app", "pod"), parallel: int = 2,
              progress: Any = None) -> Scan:
    """Phase 1: the metric queries over the whole range, stored in ``series`` (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    width = bucket_seconds(window)
    scan = Scan(window=window, width=width, coarse_width=width)
    step = width * NS
    sel = selector.strip()

    def tick(what: str) -> None:
        if progress is not None:
            progress.set_postfix_str(what, refresh=False)
            progress.update(1)

    lines_q = f"sum by (namespace, app) (count_over_time({sel} [{_prom_range(step)}]))"
    lines = _run_all(store, client, org, [("investigate_lines", lines_q, step)], window, scan, split_labels, 1,
                     tick)[0]
    scan.lines_in_range = int(sum(float(v) for item in lines for _, v in item.get("values") or []))
    if not scan.lines_in_range:
        return scan
    selectors, n, covered = _formats(client, sel, lines, step)
    scan.formats = list(selectors)
    scan.queries += n
    jobs = [("investigate_requests", f"sum by ({GROUP}) (count_over_time({fsel} {PARSERS[fmt]} {ACCESS_FILTER} "
             f"[{_prom_range(step)}]))", step) for fmt, fsel in selectors.items()]
    _run_all(store, client, org, jobs, window, scan, split_labels, parallel, tick)
    # rates and percentiles are scored on a grid where a typical service sees ~20 requests per bucket
    from meshlens.analysis.anomalies import _coarse_width

    fine, _ = _frames(store, scan, quantiles=False)
    scan.coarse_width = _coarse_width(fine, window, width) if not fine.empty else width
    cstep = scan.coarse_width * NS
    # latency: one histogram pass per encoding (not a quantile_over_time pass per percentile), one query
    # per writer (a writer's clusters x bins stay under Loki's series limit, where the whole mesh's do
    # not: a query refused on it would have read the lines for nothing)
    apps = sorted({(str((i.get("metric") or {}).get("namespace", "")), str((i.get("metric") or {}).get("app", "")))
                   for i in lines})
    jobs = [(fmt, add_matcher(fsel, "app", "=", app)) for fmt, fsel in selectors.items()
            for app in sorted({a for ns, a in apps if covered[fmt] is None or ns in covered[fmt]})]
    hists: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max(1, parallel)) as ex:
        futs = [ex.submit(_fetch_latency, client, split_labels, fmt, asel, window, cstep) for fmt, asel in jobs]
        for fut in futs:
            for name, q, items, n in fut.result():
                scan.queries += n
                _store(store, client, org, name, q, cstep, items, scan)
                if name == "investigate_latency_bins":
                    hists += items
            tick("latency")
    derived = f"latency_quantiles(sum by (namespace, app, upstream_cluster, bin) ({sel} {LATENCY_BIN} [{cstep}]))"
    for name, items in latency_quantiles(hists).items():
        _store(store, client, org, name, derived, cstep, items, scan)
    return scan


QUANTILES = (("investigate_p50_ms", 0.5), ("investigate_p99_ms", 0.99))


def _fetch_latency(client: LokiClient, split_labels: tuple[str, ...], fmt: str, selector: str, window: Window,
                   step_ns: int) -> list[tuple[str, str, list[dict[str, Any]], int]]:
    """One writer's latency: its :data:`LATENCY_BIN` histogram, as ``[(metric, query, items, queries)]``.
    When Loki refuses it even per pod (its clusters x bins above ``max_query_series``), the p50 and p99
    by ``quantile_over_time`` instead (a pass over its lines each, a series per cluster only)."""
    from meshlens.errors import QueryError

    rng = f"[{_prom_range(step_ns)}]"
    q = (f"sum by (namespace, app, upstream_cluster, bin) (count_over_time({selector} {PARSERS[fmt]} "
         f"{ACCESS_FILTER} | label_format bin=`{LATENCY_BIN}` {rng}))")
    runner = MetricRunner(client, step_ns, split_labels)
    lo, hi = _aligned(window, step_ns)
    if hi < lo:
        return []
    try:
        return [("investigate_latency_bins", q, runner.run(q, lo, hi), runner.queries)]
    except QueryError as exc:
        if "series" not in str(exc):
            raise
        log.info("latency histogram of %s refused on the series limit; quantile_over_time instead", selector)
    out = [("investigate_latency_bins", q, [], runner.queries)]
    for name, p in QUANTILES:
        qq = (f"quantile_over_time({p}, {selector} {PARSERS[fmt]} {ACCESS_FILTER} | unwrap duration "
              f'| __error__="" {rng}) by (namespace, app, upstream_cluster)')
        items, n = _fetch(client, split_labels, qq, window, step_ns)
        out.append((name, qq, items, n))
    return out


def _bin_bounds(label: str) -> tuple[float, float]:
    """``[lo, hi)`` ms of a :data:`LATENCY_BIN` label (``digits:leading``); NaNs for a line without duration."""
    digits, _, lead = str(label).partition(":")
    if not lead.isdigit() or not digits.isdigit():
        return float("nan"), float("nan")
    scale = 10 ** (int(digits) - len(lead))
    return float(int(lead) * scale), float((int(lead) + 1) * scale)


def latency_quantiles(items: list[dict[str, Any]], qs: Mapping[str, float] | None = None
                      ) -> dict[str, list[dict[str, Any]]]:
    """p50/p99 (ms) per (time, namespace, app, upstream cluster) from :data:`LATENCY_BIN` counts (matrix
    items), as matrix items. Like Loki's ``quantile_over_time`` the rank is ``q x (n - 1)`` among the
    samples; inside a bin wider than 1 ms the samples are taken as evenly spread (bins are exact below
    20 ms and at most 1.5x wide above; measured on the benchmark's 1M lines against ``quantile_over_time``:
    p50 within 4 % for 90 % of the points, p99 within 35 % -- a p99 of few requests is one sample, which
    the anomaly analysis does not score below 20 requests)."""
    qs = qs or dict(QUANTILES)
    rows = []
    for it in items:
        m = it.get("metric") or {}
        lo, hi = _bin_bounds(m.get("bin", ""))
        if lo != lo:
            continue
        key = (str(m.get("namespace", "")), str(m.get("app", "")), str(m.get("upstream_cluster", "")))
        rows += [(float(t), *key, lo, hi, float(v)) for t, v in it.get("values") or []]
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in qs}
    if not rows:
        return out
    df = pd.DataFrame(rows, columns=["t", "namespace", "app", "upstream_cluster", "lo", "hi", "n"])
    keys = ["t", "namespace", "app", "upstream_cluster"]
    df = df.groupby([*keys, "lo", "hi"], as_index=False)["n"].sum().sort_values([*keys, "lo"])
    df["cum"] = df.groupby(keys)["n"].cumsum()
    df["total"] = df.groupby(keys)["n"].transform("sum")
    for name, q in qs.items():
        rank = q * (df["total"] - 1)
        hit = df[df["cum"] > rank].groupby(keys, as_index=False).first()
        r = q * (hit["total"] - 1)
        pos = r - (hit["cum"] - hit["n"])
        width = hit["hi"] - hit["lo"]
        hit["value"] = np.where(width <= 1, hit["lo"], hit["lo"] + width * (pos + 0.5) / hit["n"])
        for (ns, app, cluster), g in hit.groupby(["namespace", "app", "upstream_cluster"]):
            out[name].append({"metric": {"namespace": ns, "app": app, "upstream_cluster": cluster},
                              "values": [[t, repr(float(v))] for t, v in zip(g["t"], g["value"], strict=True)]})
    return out


# ------------------------------------------------------------------------------------------------
# 2. Detect: aggregates -> the anomaly analysis' series
# ------------------------------------------------------------------------------------------------


def _read(store: Store, scan: Scan, metric: str) -> pd.DataFrame:
    """One stored aggregate as a flat frame: bucket_ns, value and one column per label."""
    origins = scan.origins.get(metric) or []
    if not origins:
        return pd.DataFrame()
    df = store.query(
        "SELECT epoch_ns(ts) AS bucket_ns, value, map_keys(labels) AS k, map_values(labels) AS v FROM series "
        "WHERE metric = $m AND origin IN (SELECT unnest($o::VARCHAR[])) AND ts >= make_timestamp($lo // 1000) "
        "AND ts < make_timestamp($hi // 1000)",
        {"m": metric, "o": origins, "lo": scan.window.lo_ns, "hi": scan.window.hi_ns})
    if df.empty:
        return df
    labels = pd.DataFrame([dict(zip(k, v, strict=True)) for k, v in zip(df["k"], df["v"], strict=True)])
    return pd.concat([df[["bucket_ns", "value"]].reset_index(drop=True), labels], axis=1)


def _callee(cluster: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(service, namespace) of outbound clusters ``outbound|port|subset|svc.ns.svc.cluster.local``."""
    m = cluster.fillna("").str.extract(_FQDN_RE)
    return m[0], m[1]


def _rows(counts: pd.DataFrame, width: int) -> pd.DataFrame:
    """Per-edge rows (outbound records) and per-service server rows (inbound records, caller NaN)."""
    c = counts.copy()
    for col in ("cluster", "status", "flags", "details", "transport_failure", "app", "namespace"):
        if col not in c:
            c[col] = ""
    c["bucket_ns"] = c["bucket_ns"] // (width * NS) * (width * NS)
    code = pd.to_numeric(c["status"], errors="coerce").fillna(0)
    outbound = c["cluster"].fillna("").str.startswith("outbound")
    svc, svc_ns = _callee(c["cluster"])
    c["caller"] = c["app"].where(outbound)
    c["callee"] = svc.where(outbound, c["app"])
    c["namespace"] = svc_ns.where(outbound & svc_ns.notna(), c["namespace"])
    v = c["value"].astype(float)
    tls = c["transport_failure"].fillna("").str.contains(TLS_RE)
    denied = c["details"].fillna("").str.match(DENIAL_RE)
    out = pd.DataFrame({
        "bucket_ns": c["bucket_ns"], "caller": c["caller"], "callee": c["callee"], "namespace": c["namespace"],
        "requests": np.where(outbound, v, 0.0),
        "errors_5xx": np.where(outbound & (code >= 500), v, 0.0),
        "errors_4xx": np.where(outbound & (code >= 400) & (code < 500), v, 0.0),
        # denials and TLS failures are the server's verdict: counted once, from its inbound record
        "denials": np.where(~outbound & denied, v, 0.0),
        "tls_failures": np.where(outbound & tls, v, 0.0),  # the client's record names the TLS error
    })
    flags = c["flags"].fillna("-").str.split(",")
    for f in FAILURE_FLAGS:
        out[f"flag_{f}"] = np.where(outbound & flags.apply(lambda x, f=f: f in x), v, 0.0)
    out = out[out["callee"].notna() & (out["callee"] != "")]
    return out


def _rollup(rows: pd.DataFrame, q50: pd.DataFrame, q99: pd.DataFrame, width: int) -> pd.DataFrame:
    """Edge, service and mesh series from the per-edge rows, with the scanned percentiles."""
    cols = [c for c in rows.columns if c not in ("bucket_ns", "caller", "callee", "namespace")]
    parts = []
    edges = rows[rows["caller"].notna()]
    for scope, frame, keys in (("edge", edges, ["caller", "callee"]), ("service", rows, ["callee"]),
                               ("mesh", rows, [])):
        g = frame.groupby(["bucket_ns", *keys], as_index=False).agg(
            namespace=("namespace", "first"), **{c: (c, "sum") for c in cols})
        g["scope"] = scope
        g["target"] = (g["caller"] + "->" + g["callee"] if scope == "edge"
                       else g["callee"] if scope == "service" else "mesh")
        if scope == "mesh":
            g["namespace"] = None
        parts.append(g.drop(columns=[c for c in ("caller", "callee") if c in g]))
    df = pd.concat(parts, ignore_index=True)
    for name, q in (("p50_ms", q50), ("p99_ms", q99)):
        df[name] = np.nan
        if q.empty:
            continue
        q = q.copy()
        for col in ("cluster", "app"):
            if col not in q:
                q[col] = ""
        q["bucket_ns"] = q["bucket_ns"] // (width * NS) * (width * NS)
        outbound = q["cluster"].fillna("").str.startswith("outbound")
        svc, _ = _callee(q["cluster"])
        # edges: the client's view; services: the server's own inbound records
        q["target"] = np.where(outbound, q["app"] + "->" + svc.fillna(""), q["app"])
        q["scope"] = np.where(outbound, "edge", "service")
        # several pods/encodings of one target: the larger value (a percentile of a union is at least
        # the smaller of the parts' and at most the larger; the larger keeps a slow replica visible)
        q = q.groupby(["bucket_ns", "scope", "target"], as_index=False)["value"].max()
        df = df.merge(q.rename(columns={"value": f"_{name}"}), on=["bucket_ns", "scope", "target"], how="left")
        df[name] = df.pop(f"_{name}")
    df["ts"] = pd.to_datetime(df["bucket_ns"], unit="ns", utc=True)
    return df.sort_values(["scope", "target", "bucket_ns"]).reset_index(drop=True)


def _frames(store: Store, scan: Scan, *, quantiles: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(series on the fine grid, series on the coarse grid) built from the stored aggregates."""
    counts = _read(store, scan, "investigate_requests")
    if counts.empty:
        return pd.DataFrame(), pd.DataFrame()
    q50 = _read(store, scan, "investigate_p50_ms") if quantiles else pd.DataFrame()
    q99 = _read(store, scan, "investigate_p99_ms") if quantiles else pd.DataFrame()
    fine_rows = _rows(counts, scan.width)
    fine = _rollup(fine_rows, q50 if scan.coarse_width == scan.width else pd.DataFrame(),
                   q99 if scan.coarse_width == scan.width else pd.DataFrame(), scan.width)
    if scan.coarse_width == scan.width:
        return fine, fine
    coarse = _rollup(_rows(counts, scan.coarse_width), q50, q99, scan.coarse_width)
    return fine, coarse


def scanned_edges(store: Store, scan: Scan) -> pd.DataFrame:
    """Caller -> callee pairs with their request counts, from the outbound aggregates."""
    counts = _read(store, scan, "investigate_requests")
    if counts.empty:
        return pd.DataFrame(columns=["caller", "callee", "requests"])
    rows = _rows(counts, scan.width)
    e = rows[rows["caller"].notna() & (rows["caller"] != rows["callee"])]
    return e.groupby(["caller", "callee"], as_index=False)["requests"].sum()


def _downstream(edges: pd.DataFrame, service: str) -> set[str]:
    """Every service that ``service`` calls, directly or through others."""
    callees: dict[str, set[str]] = {}
    for a, b in zip(edges["caller"], edges["callee"], strict=True):
        callees.setdefault(str(a), set()).add(str(b))
    seen: set[str] = set()
    todo = [service]
    while todo:
        for c in callees.get(todo.pop(), ()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


@dataclass
class Suspect:
    """One episode seen in the aggregates: where users see it, since when, and whose lines to pull."""

    symptom: str
    onset_ns: int
    end_ns: int
    services: list[str]
    score: float
    rows: list[int] = field(default_factory=list)  # its anomalies (positions in detect_suspects' frame)

    def as_dict(self) -> dict[str, Any]:
        from meshlens.analysis.common import ts_text

        return {"symptom": self.symptom, "onset": ts_text(self.onset_ns), "end": ts_text(self.end_ns),
                "services": self.services, "score": round(self.score, 2)}


def detect_suspects(store: Store, scan: Scan, *, entries: list[str] | None = None,
                    service: str | None = None) -> tuple[list[Suspect], list[str], pd.DataFrame]:
    """Phase 2: (episodes that reach users, entry services, anomalies) from the stored aggregates."""
    from meshlens.analysis.anomalies import anomalies_from_series
    from meshlens.analysis.incidents import (
        LINK_S,
        _candidate_groups,
        _hurts,
        _services_of,
        entry_services,
    )

    fine, coarse = _frames(store, scan)
    edges = scanned_edges(store, scan)
    entry_list = sorted(entries) if entries else entry_services(edges)
    anoms = anomalies_from_series(fine, coarse, scan.window, scan.width, scan.coarse_width)
    if anoms.empty:
        return [], entry_list, anoms
    groups, _ = _candidate_groups(anoms, edges, entry_list)
    gateways = set(_gateways(edges))
    out = []
    for g in groups:
        sub = anoms.iloc[g.rows]
        hurt = [r for r in sub.itertuples(index=False) if _hurts(r)] or list(sub.itertuples(index=False))
        # whose lines to pull: the symptom and every service of the episode (a surge of demand can be the
        # cause: a rate-limited service's anomaly is its request count) -- not the gateway, which calls
        # every entry (all user traffic): its lines towards the entries are pulled apart (pull_plan)
        # a service whose only anomaly is fewer requests is downstream of the failure (its callers fail
        # before calling it): a consequence, not the cause -- not pulled
        drops = {v for r in sub.itertuples(index=False) for v in _services_of(r)
                 if r.metric == "requests" and r.direction == "down"}
        causes = {v for r in sub.itertuples(index=False) for v in _services_of(r)
                  if not (r.metric == "requests" and r.direction == "down")}
        onset = min(g.onset_ns, min(int(r.onset.value) for r in hurt))
        end = max(int(r.end.value) for r in hurt)
        # ...and the services below the symptom (it calls them, directly or not) whose requests were hurt
        # (failures, latency) at that time in an anomaly that the grouping put elsewhere: the root cause
        # follows the symptom's calls down, and a slow service two hops below may lead a group of its own
        below = _downstream(edges, g.symptom)
        for r in anoms.itertuples(index=False):
            if (r.scope in ("service", "edge") and _hurts(r)
                    and int(r.onset.value) <= end and int(r.end.value) >= onset - LINK_S * NS):
                causes.update(v for v in _services_of(r) if v in below)
        services = [x for x in dict.fromkeys([g.symptom, *g.services, *sorted(causes & below)])
                    if x not in gateways and (x in causes or x not in drops)]
        if service and service not in services:
            continue
        out.append(Suspect(symptom=g.symptom, onset_ns=onset, end_ns=end, services=services, score=g.score,
                           rows=list(g.rows)))
    return out, entry_list, anoms


# ------------------------------------------------------------------------------------------------
# 3. Pull
# ------------------------------------------------------------------------------------------------


@dataclass
class PullWindow:
    """One explain window: ``[lo_ns, hi_ns)`` and the services whose lines were pulled in it."""

    lo_ns: int
    hi_ns: int
    services: set[str]
    symptoms: set[str] = field(default_factory=set)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def pull_windows(suspects: list[Suspect], window: Window) -> list[PullWindow]:
    """Per episode ``[onset - PRE_PULL_S, min(end, onset + MAX_EPISODE_PULL_S) + POST_PULL_S)``;
    overlapping windows merged (each keeps the services and symptoms of its episodes)."""
    spans = sorted(((max(window.lo_ns, s.onset_ns - PRE_PULL_S * NS),
                     min(window.hi_ns, min(s.end_ns, s.onset_ns + MAX_EPISODE_PULL_S * NS) + POST_PULL_S * NS),
                     s) for s in suspects), key=lambda t: (t[0], t[1]))
    out: list[PullWindow] = []
    for lo, hi, sus in spans:
        if out and lo <= out[-1].hi_ns:
            out[-1].hi_ns = max(out[-1].hi_ns, hi)
        else:
            out.append(PullWindow(lo, hi, set()))
        out[-1].services |= set(sus.services)
        out[-1].symptoms.add(sus.symptom)
    return out


def pull_plan(suspects: list[Suspect], window: Window, selector: str, *, gateways: Iterable[str] = (),
              label: str = "app") -> list[tuple[str, int, int]]:
    """The log queries to pull, as ``(query, lo_ns, hi_ns)``: per explain window (:func:`pull_windows`) the
    streams of all its episodes' services over the whole window -- a slice where every service is
    covered alike, so that the root cause compares like with like (pulling each service only around its
    own episode leaves a neighbour's calls to it without its side of the story) -- and the gateways'
    lines towards the window's entry services only (a line filter on the upstream cluster: the gateway
    carries all user traffic; the root cause needs the symptom's part)."""
    out: list[tuple[str, int, int]] = []
    gws = sorted(set(gateways))
    for w in pull_windows(suspects, window):
        services = sorted(w.services - set(gws))
        if services:
            out.append((service_query(selector, services, label), w.lo_ns, w.hi_ns))
        if gws:
            entries = "|".join(re2_escape(e) for e in sorted(w.symptoms))
            line_filter = f" |~ `outbound\\|[0-9]*\\|[^|]*\\|({entries})\\.`"
            out.append((service_query(selector, gws, label) + line_filter, w.lo_ns, w.hi_ns))
    return out


def service_query(selector: str, services: Iterable[str], label: str = "app") -> str:
    """The selector narrowed to the streams of ``services`` (a ``label=~"a|b"`` matcher, values escaped)."""
    names = sorted(set(services))
    if not names:
        raise ConfigError("no service to pull")
    return add_matcher(selector.strip(), label, "=~", "|".join(re2_escape(n) for n in names))


def explain(store: Store, scan: Scan, suspects: list[Suspect], anoms: pd.DataFrame, entries: list[str],
            service: str | None, start_ns: int, end_ns: int) -> list[dict[str, Any]]:
    """Step 4, shared by every backend: root cause and change correlation of each episode on the pulled slice.

    The episodes are the scan's (its anomalies have the whole range as their baseline, as a full pull's
    would); only the episodes pulled (all of them, or those of ``--service``) and the mesh-wide anomalies
    are handed to :func:`~meshlens.analysis.incidents.find_incidents`, with the scan's call graph.
    """
    from meshlens.analysis.incidents import find_incidents

    if len(anoms):
        mesh = set(np.nonzero((anoms["scope"] == "mesh").to_numpy())[0])
        keep_rows = {i for s in suspects for i in s.rows} | mesh
        if service:
            # an episode kept for --service whose symptom's own anomaly the grouping put in an episode not
            # kept (an entry hurt by two overlapping episodes) has no hurt entry without it, so is no
            # incident: that anomaly too, when it starts inside the episode's pulled window
            target = anoms["target"].to_numpy()
            scope = anoms["scope"].to_numpy()
            onset = anoms["onset"].astype("int64").to_numpy()
            for s in suspects:
                if any(scope[i] == "service" and target[i] == s.symptom for i in s.rows):
                    continue
                (w,) = pull_windows([s], Window(start_ns, end_ns))
                keep_rows |= {i for i in range(len(anoms)) if scope[i] == "service" and target[i] == s.symptom
                              and w.lo_ns <= onset[i] < w.hi_ns and onset[i] <= s.end_ns}
        keep = sorted(keep_rows)
        anoms = anoms.iloc[keep].reset_index(drop=True)
    rep = find_incidents(store, start_ns, end_ns, entries=entries, anomalies=anoms,
                         edges=scanned_edges(store, scan))
    return _rank(rep.items, service)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _bar(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


def investigate_loki(
    db: str | os.PathLike[str] | Store,
    *,
    query: str,
    audit_query: str | None = None,
    url: str | None = None,
    since: str | int | None = None,
    start: str | int | datetime | None = None,
    end: str | int | datetime | None = None,
    service: str | None = None,
    service_label: str = "app",
    entries: list[str] | None = None,
    parallel: int = 4,
    progress: bool = True,
    org_id: str | None = None,
    http_client: HttpClient | None = None,
    ingest_options: Mapping[str, Any] | None = None,
    **auth: Any,
) -> InvestigateResult:
    """Scan a Loki range with metric queries, pull raw lines only for the suspects, explain them.

    ``query``: the stream selector of the proxies' access logs; ``audit_query``: the stream selector
    of the Kubernetes audit log (config changes; optional); ``service``: keep only the episodes that
    involve this service; ``service_label``: the stream label naming the writing workload (``app``);
    ``entries``: the services where users see the mesh (default: what the ingress gateway calls, from
    the scan). See the module docstring for the phases. Returns an :class:`InvestigateResult`.
    """
    import time

    from meshlens.ingest import ingest
    from meshlens.store import writing

    start_ns, end_ns = resolve_range(since, start, end)
    window = Window(start_ns, end_ns)
    selector, pipeline = split_log_query(query)
    if pipeline.strip():
        raise ConfigError(f"--query must be a stream selector (no pipeline) for investigate, got {query!r}")
    if audit_query is not None:
        split_log_query(audit_query)
    own_http = http_client is None
    if http_client is None:
        cfg, org = loki_http_config(url, org_id=org_id, **auth)
        http_client = HttpClient(cfg, LOKI_PRODUCT)
    else:
        org = org_id or http_client.cfg.headers.get("X-Scope-OrgID")
    client = LokiClient(http_client, org)
    result = InvestigateResult(window=window)
    t0 = time.monotonic()
    try:
        with writing(db) as store:
            with _bar(None, "investigate: scan", progress) as bar:
                scan = scan_loki(store, client, selector, window, org=org, progress=bar)
            result.queries += scan.queries
            result.lines_in_range = scan.lines_in_range
            result.formats = scan.formats
            result.timings["scan"] = time.monotonic() - t0
            if not scan.lines_in_range:
                result.warnings.append(explain_empty(client, selector, start_ns, end_ns))
                return result
            if not scan.formats:
                result.warnings.append(f"the streams of {selector} hold no Istio access-log lines (TEXT or "
                                       "JSON) among the sampled ones: nothing to scan")
            t1 = time.monotonic()
            suspects, entry_list, anoms = detect_suspects(store, scan, entries=entries, service=service)
            result.entries = entry_list
            result.suspects = [s.as_dict() for s in suspects]
            result.timings["detect"] = time.monotonic() - t1
            t2 = time.monotonic()
            windows = pull_windows(suspects, window)
            pulls = pull_plan(suspects, window, selector, gateways=_gateways(scanned_edges(store, scan)),
                              label=service_label)
            if audit_query is not None and windows:
                from meshlens.timeutil import parse_duration_ns

                pulls.append((audit_query.strip(), start_ns - parse_duration_ns(CHANGE_LOOKBACK), end_ns))
            for q, lo, hi in pulls:
                src = open_loki_source(query=q, start=lo, end=hi, parallel=parallel, progress=progress,
                                       http_client=http_client, org_id=org)
                counts = ingest(store, src, resume=True, progress=progress, **(ingest_options or {}))
                result.lines_pulled += counts.read
                result.queries += src.paginator.requests + 1  # + the series listing
            result.timings["pull"] = time.monotonic() - t2
            if audit_query is not None and windows:
                result.lines_in_range += _count(client, audit_query.strip(), start_ns, end_ns, result)
            t3 = time.monotonic()
            with _bar(1, "investigate: explain", progress) as bar:
                result.incidents = explain(store, scan, suspects, anoms, entry_list, service, start_ns, end_ns)
                bar.update(1)
            result.timings["explain"] = time.monotonic() - t3
            if not suspects:
                result.warnings.append(
                    f"the aggregates of {result.lines_in_range} lines show no episode that reaches users; "
                    "nothing was pulled (meshlens analyze anomalies on a full ingest lists weaker anomalies)")
        return result
    finally:
        result.timings["total"] = time.monotonic() - t0
        if own_http:
            http_client.close()


def _gateways(edges: pd.DataFrame) -> list[str]:
    from meshlens.analysis.incidents import GATEWAY_RE

    if edges.empty:
        return []
    return sorted(r for r in set(edges["caller"]) - set(edges["callee"]) if GATEWAY_RE.search(str(r)))


def _count(client: LokiClient, selector: str, lo: int, hi: int, result: InvestigateResult) -> int:
    """Lines of a selector in ``[lo, hi)``, counted by Loki (one metric query per 30 days)."""
    runner = MetricRunner(client, max(NS, (hi - lo) // 100 // NS * NS))
    e0, e1 = _aligned(Window(lo, hi), runner.step_ns)
    data = runner.run(f"sum(count_over_time({selector} [{_prom_range(runner.step_ns)}]))", e0, e1) if e1 >= e0 else []
    result.queries += runner.queries
    return int(sum(float(v) for item in data for _, v in item.get("values") or []))


def _rank(items: list[dict[str, Any]], service: str | None) -> list[dict[str, Any]]:
    """The incidents of all slices, one per episode, most severe first, ranked again."""
    from meshlens.analysis.incidents import SAME_ONSET_S
    from meshlens.timeutil import parse_time_ns

    out: list[dict[str, Any]] = []
    for it in sorted(items, key=lambda x: -float(x.get("severity") or 0)):
        if service and service not in it.get("services", []):
            continue
        t = parse_time_ns(it["onset"])
        if any(o["symptom"] == it["symptom"] and abs(parse_time_ns(o["onset"]) - t) <= SAME_ONSET_S * NS for o in out):
            continue
        out.append(it)
    for rank, it in enumerate(out, 1):
        it["rank"] = rank
    return out


__all__ = ["InvestigateResult", "Scan", "Suspect", "detect_suspects", "investigate_loki", "pull_windows",
           "scan_loki", "service_query"]
