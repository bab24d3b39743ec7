"""Anomaly detection: what changed in the mesh, per service, per edge and mesh-wide, and what is new.

Two families, one table (:func:`detect_anomalies`, most severe first):

**Metric anomalies.** One SQL aggregation buckets the window's hops (:mod:`meshlens.analysis.graph`)
per edge and latency bin (about 240 buckets per window, at least 10 s); services and the whole mesh
are roll-ups of it, so every series and percentile comes from one pass. Counts are ``sum(sample_weight)``
(unbiased on stores ingested with success sampling). Per series:

* **failure counts** -- 5xx, 4xx, authorization denials, TLS failures, each Envoy failure flag (per
  service and mesh-wide; 5xx also per edge) -- out of the requests: an *epidemic change point*, the
  interval whose binomial log-likelihood ratio "higher rate inside than outside" is largest (rate at
  least doubled, at least 3 excess events). Its baseline is the rest of the window -- robust to the
  incident by construction -- and the test is exact for sparse counts (no normal approximation: five
  requests per bucket are fine). A second episode is searched after the first. Severity = the LLR
  (reported when >= 12);
* **request counts**, both directions (a drop is an anomaly too), against a centred rolling median
  (``baseline``, two hours) -- or, when the window spans two days or more, the median of the same time of day on the
  other days (seasonality) -- scored per bucket with the Anscombe (variance-stabilised Poisson)
  difference ``2 (sqrt(x + 3/8) - sqrt(expected + 3/8))``;
* **latency p50 / p99** (from a log-latency histogram, about 13 % bins): log-latency against the
  series' median and MAD (robust sd floored at 0.15, i.e. about 15 %), for buckets with at least 5
  requests (p50) or 20 (p99: the p99 of fewer requests is just their maximum).

For rates and percentiles the onset is the start of the maximum-sum segment of ``score - 2`` (a
CUSUM-style change point, vectorized over all series), its sum the severity (reported when >= 8 with a
peak bucket score >= 4). Sparse traffic is scored on a coarser grid (so that the typical service sees
about 20 requests per bucket): percentiles of a handful of requests are noise.

**Categorical anomalies** (what an auditor cares about), against a *reference period*: the
``reference`` duration before ``start`` when the store holds at least an hour of traffic there, else
the first quarter of the window (the rest is then analysed):

* edges never seen in the reference (``new_edge``);
* callers (principal, else namespace/workload, else IP) newly reaching a sensitive endpoint (path
  patterns of :data:`meshlens.analysis.audit.DEFAULT_SENSITIVE_PATHS`, configurable) --
  ``new_sensitive_caller``;
* plaintext (non-mTLS) requests to a service whose reference traffic was at least 95 % mTLS
  (``plaintext``; kubelet probes excluded);
* callers denied by an authorization policy that were not denied in the reference
  (``new_denied_caller``).

Scores: LLRs (counts) and score sums (rates, latency) are both "strength of evidence" but not on one
calibrated scale; categorical findings get fixed weights (sensitive access 15, new denial and
plaintext 12, new edge 6, times ``1 + log10(count)``) so they sit among the metric anomalies.

Limits: a brand-new series (a new edge) has no metric baseline, so it is reported as a categorical
anomaly instead. Series with fewer than 20 requests in the window are not scored. An edge's anomaly that
its callee shows identically is reported once, as the service's. Anomalies are *symptoms*: an incident
shows up on the failing service, on every caller it propagates to and mesh-wide;
:mod:`meshlens.analysis.rootcause` says which one is the cause.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from meshlens.analysis.audit import DEFAULT_SENSITIVE_PATHS, sensitive_path_sql
from meshlens.analysis.common import (
    FAILURE_FLAGS,
    NS,
    Window,
    binom_llr,
    bucket_seconds,
    pct,
    records,
    resolve_window,
    ts_text,
)
from meshlens.analysis.graph import RID_SQL, TRAFFIC_SQL, hops_sql
from meshlens.errors import ConfigError
from meshlens.store import Store
from meshlens.timeutil import parse_duration_ns

K = 2.0
"""Per-bucket score above which a bucket adds to a segment (the CUSUM allowance)."""
MIN_LLR = 12.0
"""Minimum log-likelihood ratio of a count (error/denial/TLS/flag) anomaly."""
MIN_EXCESS = 3
"""A count anomaly needs at least this many events more than its baseline rate predicts."""
MIN_PEAK = 4.0
MIN_SERIES_REQUESTS = 20
LAT_SD_FLOOR = 0.15

ANOMALY_COLUMNS = ["rank", "kind", "scope", "target", "namespace", "metric", "direction", "onset", "end",
                   "baseline", "observed", "peak", "score", "evidence"]

COUNT_METRICS = ("errors_5xx", "errors_4xx", "denials", "tls_failures", "authn_failures")
METRIC_LABELS = {"errors_5xx": "5xx ratio", "errors_4xx": "4xx ratio", "denials": "authorization denials",
                 "tls_failures": "TLS failures", "authn_failures": "authentication failures (JWT, mTLS, identity)",
                 "requests": "requests per bucket", "p50_ms": "p50 latency",
                 "p99_ms": "p99 latency"}
CATEGORICAL_SCORES = {"new_sensitive_caller": 15.0, "new_denied_caller": 12.0, "plaintext": 12.0, "new_edge": 6.0}


# ------------------------------------------------------------------------------------------------
# Series
# ------------------------------------------------------------------------------------------------


LAT_BINS_PER_E = 8
"""Latency histogram resolution: bins of ``ln(1 + ms) * 8`` (about 13 % wide) -- percentiles of any roll-up
(edge, service, mesh) come from one aggregation, exact to the bin."""


def _base_sql() -> str:
    """One aggregation of the window's hops per (bucket, edge, latency bin): everything else rolls up."""
    return f"""
        SELECT ts_ns // $w * $w AS bucket_ns, caller, callee, any_value(callee_ns) AS namespace,
               CAST(round(ln(1 + greatest(dur_ms, 0)) * {LAT_BINS_PER_E}) AS INTEGER) AS bin,
               sum(w) AS requests,
               coalesce(sum(w) FILTER (WHERE coalesce(status, 0) >= 500), 0) AS errors_5xx,
               coalesce(sum(w) FILTER (WHERE status BETWEEN 400 AND 499), 0) AS errors_4xx,
               coalesce(sum(w) FILTER (WHERE denied), 0) AS denials,
               coalesce(sum(w) FILTER (WHERE tls_reason IS NOT NULL), 0) AS tls_failures
        FROM ({hops_sql()})
        GROUP BY ALL
    """


def _flags_sql() -> str:
    """Response-flag counts per bucket and edge (only the few flagged hops are unnested)."""
    flags = "', '".join(FAILURE_FLAGS)
    return f"""
        SELECT ts_ns // $w * $w AS bucket_ns, caller, callee, 'flag_' || flag AS metric, count(*) AS n
        FROM (SELECT ts_ns, caller, callee, unnest(string_split(flags, ',')) AS flag
              FROM ({hops_sql(where="response_flags IS NOT NULL")}))
        WHERE flag IN ('{flags}')
        GROUP BY ALL
        UNION ALL
        -- authn events (JWT / RequestAuthentication, server-side mTLS, mesh identity), per callee: the
        -- server records them, so they count at service level
        SELECT ts_ns // $w * $w AS bucket_ns, NULL AS caller, dst_service AS callee,
               'authn_failures' AS metric, sum(coalesce(sample_weight, 1.0)) AS n
        FROM events WHERE event_type = 'authn' AND ts_ns >= $lo AND ts_ns < $hi AND dst_service IS NOT NULL
        GROUP BY ALL
    """


def _percentiles(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """p50/p99 (ms) per ``keys`` from histogram rows (``bin``, ``requests``): the bin where the
    cumulative count crosses the quantile, at the bin's centre."""
    h = df.groupby([*keys, "bin"], as_index=False)["requests"].sum().sort_values([*keys, "bin"])
    h["cum"] = h.groupby(keys)["requests"].cumsum()
    h["total"] = h.groupby(keys)["requests"].transform("sum")
    out = []
    for q, name in ((0.5, "p50_ms"), (0.99, "p99_ms")):
        hit = h[h["cum"] >= q * h["total"]].groupby(keys, as_index=False)["bin"].first()
        hit[name] = np.expm1(hit.pop("bin") / LAT_BINS_PER_E)
        out.append(hit.set_index(keys))
    return pd.concat(out, axis=1).reset_index()


COUNT_COLUMNS = ("requests", "errors_5xx", "errors_4xx", "denials", "tls_failures")


def _rollup(base: pd.DataFrame, flags: pd.DataFrame) -> pd.DataFrame:
    """Edge, service and mesh series from the per-edge histogram rows."""
    parts = []
    for scope, keys in (("edge", ["caller", "callee"]), ("service", ["callee"]), ("mesh", [])):
        k = ["bucket_ns", *keys]
        agg = base.groupby(k, as_index=False).agg(
            namespace=("namespace", "first"), **{c: (c, "sum") for c in COUNT_COLUMNS})
        agg = agg.merge(_percentiles(base, k), on=k, how="left")
        if not flags.empty:
            f = flags.groupby([*k, "metric"])["n"].sum().unstack("metric", fill_value=0).reset_index()
            agg = agg.merge(f, on=k, how="left")
        agg["scope"] = scope
        agg["target"] = (agg["caller"] + "->" + agg["callee"] if scope == "edge"
                         else agg["callee"] if scope == "service" else "mesh")
        if scope == "mesh":
            agg["namespace"] = None
        parts.append(agg.drop(columns=[c for c in ("caller", "callee") if c in agg]))
    df = pd.concat(parts, ignore_index=True)
    flag_cols = [c for c in df.columns if str(c).startswith("flag_")]
    df[flag_cols] = df[flag_cols].fillna(0)
    return df


def _coarsen(base: pd.DataFrame, width: int) -> pd.DataFrame:
    """The series re-aggregated on a wider grid (from the per-edge histogram rows; no new query)."""
    b = base.assign(bucket_ns=base["bucket_ns"] // (width * NS) * (width * NS))
    return _rollup(b, pd.DataFrame())


def metric_series(store: Store, start: Any = None, end: Any = None, *, bucket_s: int | None = None) -> pd.DataFrame:
    """The bucketed metrics behind the metric anomalies, one row per (bucket, scope, target): for charts.

    Columns: ``ts, scope (mesh|service|edge), target, namespace, requests, errors_5xx, errors_4xx,
    denials, tls_failures, p50_ms, p99_ms, flag_<F>...`` (counts of hops with each Envoy failure flag).
    """
    window = resolve_window(store, start, end)
    return _series(store, window, int(bucket_s or bucket_seconds(window)))[0]


def _series(store: Store, window: Window, width: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(series, per-edge base rows)."""
    params = {"lo": window.lo_ns, "hi": window.hi_ns, "w": width * NS}
    base = store.query(_base_sql(), params)
    if base.empty:
        return pd.DataFrame(), base
    df = _rollup(base, store.query(_flags_sql(), params))
    df["ts"] = pd.to_datetime(df["bucket_ns"], unit="ns", utc=True)
    return df.sort_values(["scope", "target", "bucket_ns"]).reset_index(drop=True), base


def _grid(window: Window, width: int) -> np.ndarray:
    """Bucket starts covering the window, aligned to multiples of the width (readable times)."""
    w = width * NS
    first = window.lo_ns // w * w
    return np.arange(first, window.hi_ns, w, dtype=np.int64)


def _best_segment(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (start, end, sum) of the maximum-sum segment of ``z - K`` (vectorized Kadane)."""
    y = np.nan_to_num(z, nan=0.0) - K
    prefix = np.concatenate([np.zeros((y.shape[0], 1)), np.cumsum(y, axis=1)], axis=1)
    run_min = np.minimum.accumulate(prefix[:, :-1], axis=1)
    gain = prefix[:, 1:] - run_min
    end = np.argmax(gain, axis=1)
    best = gain[np.arange(len(end)), end]
    cols = np.arange(prefix.shape[1])[None, :]
    masked = np.where(cols <= end[:, None], prefix, np.inf)
    start = np.argmin(masked, axis=1)
    return start, end, best


def _anscombe(x: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Variance-stabilised Poisson difference (about a z-score, also for counts of 0, 1, 2...)."""
    return 2.0 * (np.sqrt(np.maximum(x, 0) + 0.375) - np.sqrt(np.maximum(expected, 0) + 0.375))


def _rolling_median(m: np.ndarray, n: int, min_periods: int) -> np.ndarray:
    """Centered rolling median along buckets (robust to an incident shorter than half of ``n``)."""
    return pd.DataFrame(m.T).rolling(n, min_periods=min_periods, center=True).median().to_numpy().T


def _seasonal_median(m: np.ndarray, period: int, days: int = 7) -> np.ndarray:
    """Median of the same bucket of the day on the other days of the window (NaN where none)."""
    lagged = []
    for k in range(1, days + 1):
        if k * period >= m.shape[1]:
            break
        pad = np.full((m.shape[0], k * period), np.nan)
        lagged.append(np.concatenate([pad, m[:, :-k * period]], axis=1))
        lagged.append(np.concatenate([m[:, k * period:], pad], axis=1))
    if not lagged:
        return np.full(m.shape, np.nan)
    stack = np.stack(lagged)
    with np.errstate(all="ignore"):
        counts = (~np.isnan(stack)).sum(axis=0)
        med = np.nanmedian(np.where(counts[None] > 0, stack, 0.0), axis=0)
    return np.where(counts > 0, med, np.nan)


def _epidemic_rows(k: np.ndarray, n: np.ndarray, chunk: int = 32) -> tuple[np.ndarray, ...]:
    """Per row of bucket counts ``k`` out of ``n``: the interval ``[a, b]`` maximising the binomial
    log-likelihood ratio of "a higher rate inside than outside" (rate at least doubled, at least
    :data:`MIN_EXCESS` excess events). Returns ``(a, b, llr, p_in, p_out)``; llr 0 where none."""
    rows, width = k.shape
    a_idx, b_idx = np.triu_indices(width)
    ck = np.concatenate([np.zeros((rows, 1)), np.cumsum(k, axis=1)], axis=1)
    cn = np.concatenate([np.zeros((rows, 1)), np.cumsum(n, axis=1)], axis=1)
    out = [np.zeros(rows, dtype=int), np.zeros(rows, dtype=int), np.zeros(rows), np.zeros(rows), np.zeros(rows)]
    for lo in range(0, rows, chunk):
        sl = slice(lo, lo + chunk)
        k_in = ck[sl, b_idx + 1] - ck[sl, a_idx]
        n_in = cn[sl, b_idx + 1] - cn[sl, a_idx]
        k_out, n_out = ck[sl, -1:] - k_in, cn[sl, -1:] - n_in
        with np.errstate(all="ignore"):
            p_in, p_out = k_in / np.maximum(n_in, 1), k_out / np.maximum(n_out, 1)
            ok = (p_in >= 2 * p_out) & (k_in - n_in * p_out >= MIN_EXCESS) & (n_out >= MIN_SERIES_REQUESTS / 2)
            # the LLR of the eligible intervals only (usually a small share of all of them): the same values
            llr = np.zeros(k_in.shape)
            llr[ok] = binom_llr(k_in[ok], n_in[ok], k_out[ok], n_out[ok])
        best = np.argmax(llr, axis=1)
        r = np.arange(llr.shape[0])
        for o, v in zip(out, (a_idx[best], b_idx[best], llr[r, best], p_in[r, best], p_out[r, best]), strict=True):
            o[sl] = v
    return tuple(out)


@dataclass
class _Grid:
    """Series of one scope laid out as (series x bucket) matrices."""

    keys: pd.DataFrame
    buckets: np.ndarray
    width: int
    row: np.ndarray
    col: np.ndarray
    df: pd.DataFrame

    @classmethod
    def of(cls, df: pd.DataFrame, window: Window, width: int) -> _Grid | None:
        buckets = _grid(window, width)
        totals = df.groupby(["scope", "target"])["requests"].transform("sum")
        df = df[totals >= MIN_SERIES_REQUESTS]
        if df.empty or len(buckets) < 4:
            return None
        keys = df[["scope", "target", "namespace"]].drop_duplicates(["scope", "target"]).reset_index(drop=True)
        row = df.merge(keys.reset_index()[["index", "scope", "target"]], on=["scope", "target"])["index"].to_numpy()
        col = ((df["bucket_ns"].to_numpy() - buckets[0]) // (width * NS)).astype(int)
        return cls(keys, buckets, width, row, col, df)

    def matrix(self, column: str, fill: float = 0.0) -> np.ndarray:
        m = np.full((len(self.keys), len(self.buckets)), fill)
        if column in self.df:  # a metric no record of the window has (e.g. no authn events) stays 0
            v = self.df[column]
            m[self.row, self.col] = (v.fillna(0) if fill == 0 else v).to_numpy(float)
        return m

    def anomaly(self, i: int, a: int, b: int, **fields: Any) -> dict[str, Any]:
        scope = self.keys["scope"].iat[i]
        return {"kind": "metric", "scope": scope, "target": self.keys["target"].iat[i],
                "namespace": None if scope == "mesh" else self.keys["namespace"].iat[i],
                "onset_ns": int(self.buckets[a]), "end_ns": int(self.buckets[b]) + self.width * NS, **fields}


def _count_anomalies(g: _Grid) -> list[dict[str, Any]]:
    """Failure counts out of the requests: epidemic change point (exact for sparse counts), up to two
    episodes per series; edges only for 5xx (the other metrics repeat their callee's)."""
    found: list[dict[str, Any]] = []
    req = g.matrix("requests")
    scopes = g.keys["scope"].to_numpy()
    for metric in (*COUNT_METRICS, *[c for c in g.df.columns if str(c).startswith("flag_")]):
        x = g.matrix(metric)
        rows = np.nonzero(x.sum(axis=1) >= MIN_EXCESS)[0]
        if metric != "errors_5xx":
            rows = rows[scopes[rows] != "edge"]
        for _ in range(2):
            if not len(rows):
                break
            a, b, llr, p_in, p_out = _epidemic_rows(x[rows], req[rows])
            hit = llr >= MIN_LLR
            for j in np.nonzero(hit)[0]:
                i, seg = rows[j], slice(a[j], b[j] + 1)
                with np.errstate(all="ignore"):
                    z = _anscombe(x[i, seg], req[i, seg] * p_out[j])
                found.append(g.anomaly(i, a[j], b[j], metric=metric, direction="up", baseline=float(p_out[j]),
                                       observed=float(p_in[j]), peak=float(np.max(z)), score=float(llr[j]),
                                       fmt="ratio"))
                x[i, seg] = np.round(req[i, seg] * p_out[j])  # then look for a second episode elsewhere
            rows = rows[hit]
    return found


def _level_anomalies(g: _Grid, baseline_s: int) -> list[dict[str, Any]]:
    """Request rates (both directions) and latency percentiles: per-bucket robust scores, then the
    maximum-sum segment of ``score - K`` per series."""
    found: list[dict[str, Any]] = []
    req = g.matrix("requests")

    def collect(metric: str, z: np.ndarray, base: np.ndarray, obs: np.ndarray, direction: str, fmt: str,
                weights: np.ndarray | None = None) -> None:
        start, end, best = _best_segment(z)
        peak = np.max(np.nan_to_num(z, nan=-np.inf), axis=1)
        for i in np.nonzero((best >= MIN_SEGMENT_SCORE) & (peak >= MIN_PEAK))[0]:
            a, b = int(start[i]), int(end[i])
            seg = slice(a, b + 1)
            o = obs[i, seg]
            ok = ~np.isnan(o)
            w = weights[i, seg][ok] if weights is not None else np.ones(ok.sum())
            observed = float((o[ok] * w).sum() / max(w.sum(), 1e-9))
            bvals = base[i, seg] if base.ndim == 2 else np.array([base[i]])
            baseline = float(np.nanmedian(bvals)) if np.isfinite(bvals).any() else float("nan")
            found.append(g.anomaly(i, a, b, metric=metric, direction=direction, baseline=baseline,
                                   observed=observed, peak=float(peak[i]), score=float(best[i]), fmt=fmt))

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: series too quiet for percentiles
        # request counts: a centered rolling median follows the daily curve; with two days or more, the
        # same time of the other days (seasonality) where available
        n_buckets = len(g.buckets)
        span = max(5, baseline_s // g.width)
        expected = _rolling_median(req, min(span, n_buckets), min_periods=3)
        period = int(86400 // g.width) if g.width <= 3600 else 0
        if period and n_buckets >= 2 * period:
            seasonal = _seasonal_median(req, period)
            expected = np.where(np.isnan(seasonal), expected, seasonal)
        known = ~np.isnan(expected)
        exp0 = np.nan_to_num(expected)
        collect("requests", np.where(known, _anscombe(req, exp0), 0.0), expected, req, "up", "count")
        collect("requests", np.where(known, -_anscombe(req, exp0), 0.0), expected, req, "down", "count")

        # latency percentiles: log-latency against the series' robust centre and spread
        for metric, min_n in (("p50_ms", 5), ("p99_ms", 20)):  # a p99 of fewer requests is just their max
            v = g.matrix(metric, np.nan)
            logv = np.where((req >= min_n) & (v > 0), np.log(np.where(v > 0, v, 1)), np.nan)
            med = np.nanmedian(logv, axis=1)
            mad = np.nanmedian(np.abs(logv - med[:, None]), axis=1)
            sd = np.maximum(1.4826 * np.nan_to_num(mad, nan=LAT_SD_FLOOR), LAT_SD_FLOOR)
            z = np.where(np.isnan(logv), 0.0, (logv - med[:, None]) / sd[:, None])
            collect(metric, z, np.exp(med), v, "up", "ms", weights=req)
    return found


def _coarse_width(series: pd.DataFrame, window: Window, width: int) -> int:
    """A bucket width at which the typical service sees at least ~20 requests per bucket (rates and
    percentiles of a handful of requests are noise); never fewer than 20 buckets per window."""
    svc = series[series["scope"] == "service"]
    if svc.empty:
        return width
    per_bucket = svc.groupby("target")["requests"].sum() / max(len(_grid(window, width)), 1)
    median = float(per_bucket.median())
    if median >= 20:
        return width
    need = width * 20 / max(median, 1e-9)
    cap = max(width, int(window.seconds // 20))
    for w in _NICE_WIDTHS:
        if w >= need:
            return max(width, min(w, cap))
    return max(width, cap)


_NICE_WIDTHS = (10, 15, 30, 60, 120, 180, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)


def _score_series(df: pd.DataFrame, window: Window, width: int, baseline_s: int,
                  coarse: pd.DataFrame | None = None, coarse_width: int | None = None) -> pd.DataFrame:
    """All metric anomalies of the bucketed series (see the module docstring): counts on the fine
    grid, rates and percentiles on ``coarse`` (defaults to the same series)."""
    found: list[dict[str, Any]] = []
    fine = _Grid.of(df, window, width)
    if fine is not None:
        found += _count_anomalies(fine)
    level = fine if coarse is None else _Grid.of(coarse, window, coarse_width or width)
    if level is not None:
        found += _level_anomalies(level, baseline_s)
    return pd.DataFrame(found)


MIN_SEGMENT_SCORE = 8.0
"""Minimum severity (sum of ``score - 2`` over the segment) of a reported metric anomaly."""


def _metric_evidence(r: pd.Series) -> list[str]:
    def show(v: float) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "n/a"
        if r["fmt"] == "ratio":
            return pct(v)
        if r["fmt"] == "ms":
            return f"{v:.0f} ms"
        return f"{v:.1f}/bucket"

    scope = {"mesh": "mesh-wide", "service": f"service {r['target']}", "edge": f"edge {r['target']}"}[r["scope"]]
    what = METRIC_LABELS.get(r["metric"], r["metric"].replace("flag_", "response flag "))
    how = (f"log-likelihood ratio {r['score']:.1f} (binomial, interval vs the rest of the window)"
           if r["fmt"] == "ratio" else f"severity {r['score']:.1f} (sum of bucket scores above {K:.0f})")
    return [f"{scope}: {what} {'rose' if r['direction'] == 'up' else 'fell'} from {show(r['baseline'])} "
            f"(baseline) to {show(r['observed'])} between {ts_text(r['onset_ns'])} and {ts_text(r['end_ns'])}",
            f"peak bucket score {r['peak']:.1f}; {how}"]


# ------------------------------------------------------------------------------------------------
# Categorical anomalies
# ------------------------------------------------------------------------------------------------


def _reference(store: Store, window: Window, reference: str) -> tuple[Window, Window, str]:
    """(reference window, analysed window, description)."""
    lo = window.lo_ns - parse_duration_ns(reference)
    row = store.con.execute(
        "SELECT count(*), min(ts_ns), max(ts_ns) FROM events WHERE record_kind = 'access_log' "
        "AND ts_ns >= ? AND ts_ns < ?", [lo, window.lo_ns]).fetchone()
    if row and row[0] and (row[2] - row[1]) >= 3600 * NS:
        return Window(lo, window.lo_ns), window, f"the {reference} before the window"
    cut = window.lo_ns + (window.hi_ns - window.lo_ns) // 4
    return Window(window.lo_ns, cut), Window(cut, window.hi_ns), "the first quarter of the window"


def _edge_presence(store: Store, base: pd.DataFrame, ref: Window, cur: Window) -> pd.DataFrame:
    """Per edge: requests and denials in the reference and the analysed period, first/last seen."""
    ref_rows, cur_rows = base["bucket_ns"] < ref.hi_ns, base["bucket_ns"] >= cur.lo_ns
    # the per-period sums as sums of masked columns (0 outside the period): one vectorized groupby
    b = base.assign(ref_n=base["requests"].where(ref_rows, 0.0), cur_n=base["requests"].where(cur_rows, 0.0),
                    cur_failed=base["errors_5xx"].where(cur_rows, 0.0),
                    ref_denied=base["denials"].where(ref_rows, 0.0), cur_denied=base["denials"].where(cur_rows, 0.0),
                    den_cur_ts=base["bucket_ns"].where(cur_rows & (base["denials"] > 0)),
                    cur_ts=base["bucket_ns"].where(cur_rows))
    g = b.groupby(["caller", "callee"]).agg(
        namespace=("namespace", "first"),
        ref_n=("ref_n", "sum"), cur_n=("cur_n", "sum"), cur_failed=("cur_failed", "sum"),
        ref_denied=("ref_denied", "sum"), cur_denied=("cur_denied", "sum"),
        first_cur=("cur_ts", "min"), last_cur=("cur_ts", "max"),
        first_denied=("den_cur_ts", "min"), last_denied=("den_cur_ts", "max"),
    ).reset_index()
    if ref.hi_ns <= int(base["bucket_ns"].min()):  # reference before the window: read it
        prior = store.query(
            f"SELECT caller, callee, sum(w) AS n, coalesce(sum(w) FILTER (WHERE denied), 0) AS d FROM ({hops_sql()}) "
            f"GROUP BY ALL", {"lo": ref.lo_ns, "hi": ref.hi_ns})
        g = g.drop(columns=["ref_n", "ref_denied"]).merge(prior, on=["caller", "callee"], how="left").rename(
            columns={"n": "ref_n", "d": "ref_denied"}).fillna({"ref_n": 0, "ref_denied": 0})
    return g


def _categorical(store: Store, base: pd.DataFrame, width: int, ref: Window, cur: Window, ref_text: str,
                 patterns: Sequence[str]) -> pd.DataFrame:
    params = {"lo": ref.lo_ns, "hi": cur.hi_ns, "rhi": ref.hi_ns, "clo": cur.lo_ns}
    out: list[pd.DataFrame] = []
    edges = _edge_presence(store, base, ref, cur)
    new = edges[(edges["ref_n"] == 0) & (edges["cur_n"] > 0) & (edges["caller"] != "unknown")]
    out.append(pd.DataFrame({
        "scope": "edge", "target": new["caller"] + "->" + new["callee"], "namespace": new["namespace"],
        "metric": "new_edge", "onset_ns": new["first_cur"], "end_ns": new["last_cur"] + width * NS,
        "observed": new["cur_n"],
        "text": [f"edge {r.caller}->{r.callee} first seen in the bucket of {ts_text(r.first_cur)}, not in "
                 f"{ref_text}: {int(r.cur_n)} requests ({int(r.cur_failed)} answered 5xx)"
                 for r in new.itertuples(index=False)]}))
    den = edges[(edges["ref_denied"] == 0) & (edges["cur_denied"] > 0)]
    if not den.empty:
        policies = store.query(
            f"""SELECT dst_service AS callee, array_to_string(list_slice(list_sort(list(DISTINCT authz_policy)
                           FILTER (WHERE authz_policy IS NOT NULL)), 1, 3), ', ') AS policy
                FROM events WHERE {TRAFFIC_SQL} AND authz_decision = 'deny'
                  AND dst_service IN (SELECT unnest($svcs::VARCHAR[])) GROUP BY dst_service""",
            {"lo": cur.lo_ns, "hi": cur.hi_ns, "svcs": sorted(set(den["callee"]))})
        den = den.merge(policies, on="callee", how="left")
        out.append(pd.DataFrame({
            "scope": "edge", "target": den["caller"] + "->" + den["callee"], "namespace": den["namespace"],
            "metric": "new_denied_caller", "onset_ns": den["first_denied"], "end_ns": den["last_denied"] + width * NS,
            "observed": den["cur_denied"],
            "text": [f"{r.caller} denied on {r.callee} {int(r.cur_denied)} times from the bucket of "
                     f"{ts_text(r.first_denied)} (policy {r.policy or 'not logged'}), never denied in {ref_text}"
                     for r in den.itertuples(index=False)]}))
    pm = sensitive_path_sql(list(patterns))
    examples = "array_to_string(list_slice(list_sort(list(DISTINCT {x}) FILTER (WHERE {x} IS NOT NULL)), 1, 3), ', ')"
    sens = store.query(
        f"""WITH r AS (SELECT {RID_SQL} AS rid, ts_ns, dst_service, dst_namespace, path, status, src_principal,
                              src_workload, src_namespace, src_ip, authz_decision, {pm.label} AS pattern,
                              coalesce(sample_weight, 1.0) AS w
                       FROM events WHERE {TRAFFIC_SQL} AND path IS NOT NULL AND ({pm.condition})),
                 s AS (SELECT rid, dst_service, min(ts_ns) AS ts_ns, any_value(dst_namespace) AS ns,
                              coalesce(max(src_principal), max(src_namespace || '/' || src_workload), max(src_ip),
                                       'unknown') AS who,
                              any_value(path) AS path, any_value(pattern) AS pattern,
                              bool_or(authz_decision = 'deny' OR status IN (401, 403)) AS refused, min(w) AS w
                       FROM r GROUP BY rid, dst_service)
            SELECT 'service' AS scope, dst_service AS target, any_value(ns) AS namespace,
                   'new_sensitive_caller' AS metric, min(ts_ns) AS onset_ns, max(ts_ns) AS end_ns,
                   round(sum(w)) AS observed, who, any_value(pattern) AS pattern,
                   count(*) FILTER (WHERE refused) AS refused, {examples.format(x="path")} AS examples
            FROM s WHERE ts_ns >= $clo
              AND (who, dst_service) NOT IN (SELECT (who, dst_service) FROM s WHERE ts_ns < $rhi)
            GROUP BY dst_service, who""", {**params, **pm.params, **pm.label_params})
    sens["text"] = [f"{r.who} reached {r.pattern} on {r.target} ({r.observed:.0f} requests, {r.refused} refused), "
                    f"never in {ref_text}; e.g. {r.examples}" for r in sens.itertuples(index=False)]
    out.append(sens.drop(columns=["who", "pattern", "refused"]))
    plain = store.query(
        f"""WITH r AS (SELECT dst_service, coalesce(sum(coalesce(sample_weight, 1.0)) FILTER (WHERE mtls), 0) AS m,
                              sum(coalesce(sample_weight, 1.0)) AS n FROM events
                       WHERE {TRAFFIC_SQL} AND ts_ns < $rhi AND mtls IS NOT NULL GROUP BY dst_service),
                 p AS (SELECT ts_ns, dst_service, dst_namespace, coalesce(sample_weight, 1.0) AS w,
                              coalesce(src_principal, src_namespace || '/' || src_workload, src_ip) AS who
                       FROM events WHERE {TRAFFIC_SQL} AND ts_ns >= $clo AND mtls = false)
            SELECT 'service' AS scope, p.dst_service AS target, any_value(p.dst_namespace) AS namespace,
                   'plaintext' AS metric, min(p.ts_ns) AS onset_ns, max(p.ts_ns) AS end_ns, round(sum(p.w)) AS observed,
                   any_value(r.m / r.n) AS ref_share, {examples.format(x="p.who")} AS examples
            FROM p JOIN r ON r.dst_service = p.dst_service
            WHERE r.n >= 20 AND r.m >= 0.95 * r.n
            GROUP BY p.dst_service""", params)
    plain["text"] = [f"{r.observed:.0f} plaintext requests to {r.target} since {ts_text(r.onset_ns)}; "
                     f"{pct(r.ref_share)} of its traffic used mTLS in {ref_text}; callers: {r.examples}"
                     for r in plain.itertuples(index=False)]
    out.append(plain.drop(columns=["ref_share"]))
    parts = [d for d in out if not d.empty]
    if not parts:
        return pd.DataFrame()
    df = pd.concat(parts, ignore_index=True)
    df["kind"] = "categorical"
    df["direction"] = "new"
    df["baseline"] = 0.0
    df["peak"] = np.nan
    df["score"] = [CATEGORICAL_SCORES[m] * (1 + np.log10(max(o, 1)))
                   for m, o in zip(df["metric"], df["observed"], strict=True)]
    df["evidence"] = [[t] for t in df["text"]]
    return df


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Drop an edge's metric anomaly when its callee shows the same one (same metric and interval):
    with a single caller the two are one finding, and the service is the one to read."""
    if df.empty:
        return df
    edges = df["scope"] == "edge"
    callee = df["target"].where(~edges, df["target"].str.split("->").str[-1])
    key = pd.Series(list(zip(callee, df["metric"], df["onset_ns"], df["end_ns"], strict=True)), index=df.index)
    service_keys = set(key[df["scope"] == "service"])
    drop = edges & (df["kind"] == "metric") & key.isin(service_keys)
    return df[~drop]


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def detect_anomalies(
    store: Store, start: Any = None, end: Any = None, *, bucket_s: int | None = None,
    baseline: str = "2h", reference: str = "24h", sensitive_paths: Sequence[str] | None = None,
    min_score: float = MIN_SEGMENT_SCORE, categorical: bool = True, top: int | None = None,
    namespace: str | None = None, service: str | None = None,
) -> pd.DataFrame:
    """Metric and categorical anomalies in ``[start, end)``, most severe first (see the module docstring).

    ``bucket_s``: bucket width (default: about 240 buckets per window); ``baseline``: the span of the
    centred rolling median that request rates are compared with (it follows the daily curve; an outage
    shorter than half of it stands out); ``reference``: the period before ``start`` that defines "seen
    before";
    ``sensitive_paths``: path patterns (prefixes or globs); ``namespace`` / ``service`` keep the anomalies
    of that namespace / of that service and its edges (mesh-wide ones are kept). Columns: ``rank, kind
    (metric|categorical),
    scope (mesh|service|edge), target, namespace, metric, direction (up|down|new), onset, end, baseline,
    observed, peak, score, evidence`` (list of strings).
    """
    window = resolve_window(store, start, end)
    width = int(bucket_s or bucket_seconds(window))
    if width < 1:
        raise ConfigError(f"bucket width must be at least 1 s, got {bucket_s}")
    ref, cur, ref_text = _reference(store, window, reference)
    parts = []
    series, base = _series(store, window, width)
    metric = pd.DataFrame()
    if not series.empty:
        cw = _coarse_width(series, window, width)
        coarse = series if cw == width else _coarsen(base, cw)
        metric = _score_series(series, window, width, int(parse_duration_ns(baseline) // NS), coarse, cw)
    if not metric.empty:
        metric = metric[metric["score"] >= min_score].copy()
        metric["evidence"] = [_metric_evidence(r) for _, r in metric.iterrows()]
        parts.append(metric)
    if categorical:
        cat = _categorical(store, base, width, ref, cur, ref_text,
                           list(sensitive_paths or DEFAULT_SENSITIVE_PATHS)) if not base.empty else pd.DataFrame()
        if not cat.empty:
            parts.append(cat)
    return _finish(parts, namespace=namespace, service=service, top=top)


def anomalies_from_series(series: pd.DataFrame, coarse: pd.DataFrame, window: Window, width: int,
                          coarse_width: int, *, baseline: str = "2h", min_score: float = MIN_SEGMENT_SCORE,
                          service: str | None = None) -> pd.DataFrame:
    """The metric anomalies of series built elsewhere -- e.g. from a backend's push-down aggregates
    (:mod:`meshlens.investigate`) -- with the same scoring as :func:`detect_anomalies`.

    ``series`` / ``coarse``: rows shaped like :func:`metric_series` (``bucket_ns, scope, target,
    namespace, requests, errors_5xx, errors_4xx, denials, tls_failures, p50_ms, p99_ms, flag_<F>``) on
    grids of ``width`` and ``coarse_width`` seconds (failure counts are scored on the first, rates and
    percentiles on the second). No categorical anomalies: they need the raw records."""
    if series.empty:
        return pd.DataFrame(columns=ANOMALY_COLUMNS)
    metric = _score_series(series, window, width, int(parse_duration_ns(baseline) // NS), coarse, coarse_width)
    parts = []
    if not metric.empty:
        metric = metric[metric["score"] >= min_score].copy()
        metric["evidence"] = [_metric_evidence(r) for _, r in metric.iterrows()]
        parts.append(metric)
    return _finish(parts, namespace=None, service=service, top=None)


def _finish(parts: list[pd.DataFrame], *, namespace: str | None, service: str | None,
            top: int | None) -> pd.DataFrame:
    """Dedupe, scope, order and rank the anomalies found (shared by both entry points)."""
    if not parts:
        return pd.DataFrame(columns=ANOMALY_COLUMNS)
    df = _dedupe(pd.concat(parts, ignore_index=True))
    if namespace:
        df = df[(df["scope"] == "mesh") | (df["namespace"] == namespace)]
    if service:
        ends = df["target"].str.split("->")
        df = df[(df["scope"] == "mesh") | ends.apply(lambda t: service in t)]
    if df.empty:
        return pd.DataFrame(columns=ANOMALY_COLUMNS)
    df["onset"] = pd.to_datetime(df["onset_ns"].astype("int64"), unit="ns", utc=True)
    df["end"] = pd.to_datetime(df["end_ns"].astype("int64"), unit="ns", utc=True)
    df = df.sort_values(["score", "onset_ns"], ascending=[False, True]).reset_index(drop=True)
    if top:
        df = df.head(top)
    df["rank"] = np.arange(1, len(df) + 1)
    for col in ("baseline", "observed", "peak", "score"):
        df[col] = df[col].astype(float).round(4)
    return df[ANOMALY_COLUMNS]


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The anomalies with the evidence as one text column (for tables)."""
    out = df.copy()
    out["evidence"] = ["; ".join(e) for e in out["evidence"]]
    return out


def anomaly_series(series: pd.DataFrame, anomaly: pd.Series | dict[str, Any]) -> pd.DataFrame:
    """The bucketed values behind one metric anomaly (``ts, value``; ratios for count metrics), from
    :func:`metric_series`, to draw it with its onset."""
    s = series[(series["scope"] == anomaly["scope"]) & (series["target"] == anomaly["target"])]
    metric = anomaly["metric"]
    if metric not in s:
        return pd.DataFrame(columns=["ts", "value"])
    values = s[metric] if metric in ("requests", "p50_ms", "p99_ms") else s[metric] / s["requests"].where(
        s["requests"] > 0)
    return pd.DataFrame({"ts": s["ts"], "value": values.astype(float)}).reset_index(drop=True)


def anomalies_json(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The ``--json`` array of :func:`detect_anomalies`."""
    return records(df)
