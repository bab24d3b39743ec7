"""Shared plumbing for the incident analyses (graph, anomalies, root cause, change correlation).

Why one module: the three analyses must agree on what a "window" is, what a failed request is, how a
request is named across hops and how time is bucketed -- otherwise the anomaly table, the root cause
and the change ranking would contradict each other on the same incident.

* :func:`resolve_window` turns user bounds (RFC 3339, Unix seconds, ``now``, ``-24h``, datetimes,
  pandas Timestamps, or nothing = the data's own span) into a half-open ``[lo, hi)`` in Unix ns.
* :data:`FAILED_SQL` is the single definition of a failed proxied hop (see its docstring).
* :func:`bucket_seconds` picks a bucket width that keeps a few hundred buckets per window, so sparse
  traffic still gives usable counts and a long window stays cheap.
* :func:`records` converts DataFrames to JSON-friendly dicts for the CLI.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from meshlens.errors import ConfigError
from meshlens.formats import envoy
from meshlens.store import Store
from meshlens.timeutil import ns_to_rfc3339, parse_time_ns

NS = 1_000_000_000

FAILURE_FLAGS: tuple[str, ...] = envoy.FAILURE_FLAGS
"""Envoy response flags that mean the proxy failed the request (declared in :data:`meshlens.formats.envoy.FLAGS`;
DC -- the downstream hung up -- is not one: the client's own record carries the failure)."""

GRPC_FAILED: tuple[int, ...] = (2, 4, 7, 8, 12, 13, 14, 15, 16)
"""gRPC status codes that are failures even when the HTTP status is 200 (gRPC answers errors in the
trailers): UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL,
UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED -- the server-side and authorization classes, as for HTTP (a
NOT_FOUND or INVALID_ARGUMENT is an answer, like a 404)."""

FAILED_SQL = (
    "coalesce(coalesce(status, 0) >= 500 OR status IN (401, 403, 407, 429) "
    "OR authz_decision = 'deny' "
    "OR coalesce(grpc_status, 0) IN (" + ", ".join(map(str, GRPC_FAILED)) + ") "
    "OR (response_flags IS NOT NULL AND len(list_intersect(string_split(response_flags, ','), "
    + envoy.flags_list_sql(FAILURE_FLAGS) + ")) > 0), FALSE)"
)
"""SQL: the record describes a failed request -- 5xx, an authorization refusal (401/403/407 or an authz
deny), a rate limit (429), a failing ``grpc-status`` (:data:`GRPC_FAILED`, also under HTTP 200), or an Envoy failure flag (no route, no cluster, upstream connect failure,
reset, timeout...). Application 4xx such as a 404 "not found" from the application are answers, not
failures: they do not propagate to callers, so they are not counted here (a 404 **NR** is, via its flag)."""

PROBE_SQL = "coalesce(user_agent, '') LIKE 'kube-probe/%'"
"""SQL: kubelet health checks (they bypass the mesh's client side and would pollute every statistic)."""

_NICE_BUCKETS = (10, 15, 30, 60, 120, 180, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)


@dataclass(frozen=True)
class Window:
    """A resolved, half-open analysis window ``[lo_ns, hi_ns)`` (Unix nanoseconds, UTC)."""

    lo_ns: int
    hi_ns: int

    @property
    def seconds(self) -> float:
        return (self.hi_ns - self.lo_ns) / NS

    def describe(self) -> str:
        return f"{ns_to_rfc3339(self.lo_ns)} to {ns_to_rfc3339(self.hi_ns)}"


def latest_event_ns(store: Store) -> int:
    """The bound that ``latest`` means: just after the newest event of the store (so ``--to latest``
    includes it)."""
    latest = store.scalar("SELECT max(ts_ns) FROM events")
    if latest is None:
        raise ConfigError(f"a time relative to 'latest' needs events in the store, and {store.path!r} is empty")
    return int(latest) + 1


def bound_ns(value: Any, name: str, store: Store | None = None) -> int | None:
    """One user-given time bound -> Unix ns (None for empty). Errors name the parameter.

    ``latest``-relative bounds (``latest-6h``) are resolved against ``store``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, pd.Timestamp):
        if pd.isna(value):
            return None
        ts = value.tz_convert("UTC") if value.tzinfo else value.tz_localize("UTC")
        return int(ts.value)
    if isinstance(value, np.datetime64):
        return int(pd.Timestamp(value).value)
    try:
        return parse_time_ns(value if isinstance(value, str | int | float | datetime) else str(value),
                             latest_ns=(lambda: latest_event_ns(store)) if store is not None else None)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def resolve_window(store: Store, start: Any = None, end: Any = None) -> Window:
    """``[start, end)`` in ns; a missing bound is taken from the proxied traffic in the store.

    Raises :class:`ConfigError` for an empty range or a store without traffic in it.
    """
    lo, hi = bound_ns(start, "start", store), bound_ns(end, "end", store)
    if lo is None or hi is None:
        row = store.con.execute(
            "SELECT min(ts_ns), max(ts_ns) FROM events WHERE record_kind = 'access_log'").fetchone()
        if row is None or row[0] is None:
            raise ConfigError(f"store {store.path!r} holds no proxied requests (access logs); ingest some first")
        lo = int(row[0]) if lo is None else lo
        hi = int(row[1]) + 1 if hi is None else hi
    if lo >= hi:
        raise ConfigError(f"empty time range: start {ns_to_rfc3339(lo)} is not before end {ns_to_rfc3339(hi)}")
    return Window(lo, hi)


def bucket_seconds(window: Window, target_buckets: int = 240, minimum: int = 10) -> int:
    """A "nice" bucket width (10 s .. 1 d) giving at most about ``target_buckets`` buckets."""
    raw = max(minimum, math.ceil(window.seconds / target_buckets))
    for width in _NICE_BUCKETS:
        if width >= raw:
            return width
    return _NICE_BUCKETS[-1]


def temp_name(prefix: str) -> str:
    """A unique name for a connection-local temporary table (safe to format into SQL: hex only)."""
    return f"_ml_{prefix}_{uuid.uuid4().hex[:12]}"


_SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_service(store: Store, service: str, window: Window) -> str:
    """Validate a symptom service name against the traffic in the window (clear error if unknown)."""
    name = (service or "").strip()
    if not name or not _SERVICE_RE.match(name):
        raise ConfigError(f"--service: {service!r} is not a service name (e.g. frontend, reviews)")
    n = store.scalar(
        "SELECT count(*) FROM events WHERE record_kind = 'access_log' AND ts_ns >= ? AND ts_ns < ? "
        "AND dst_service = ?", [window.lo_ns, window.hi_ns, name])
    if not n:
        known = store.query(
            "SELECT dst_service, count(*) AS n FROM events WHERE record_kind = 'access_log' AND ts_ns >= ? "
            "AND ts_ns < ? AND dst_service IS NOT NULL GROUP BY 1 ORDER BY n DESC LIMIT 12",
            [window.lo_ns, window.hi_ns])
        hint = ", ".join(known["dst_service"]) if not known.empty else "none"
        raise ConfigError(
            f"service {name!r} received no requests from {window.describe()}; services with traffic "
            f"there: {hint}")
    return name


def ts_text(ns: int | float | None) -> str | None:
    """Unix ns -> RFC 3339 (second precision is enough for humans; keeps evidence strings short)."""
    if ns is None or (isinstance(ns, float) and math.isnan(ns)):
        return None
    return ns_to_rfc3339(int(ns) // NS * NS)


def pct(x: float) -> str:
    """0.0123 -> '1.2%' (evidence strings)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%"


def logistic(z: float | np.ndarray) -> float | np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame -> JSON-friendly dicts (NaN/NaT -> None, numpy scalars -> Python, times -> RFC 3339)."""
    out = []
    for rec in df.to_dict(orient="records"):
        row: dict[str, Any] = {}
        for k, v in rec.items():
            if isinstance(v, list | tuple | np.ndarray):
                row[k] = [x.item() if hasattr(x, "item") else x for x in v]
            elif v is None or (not isinstance(v, str) and pd.isna(v)):
                row[k] = None
            elif isinstance(v, pd.Timestamp):
                row[k] = ns_to_rfc3339(int(v.value))
            elif hasattr(v, "isoformat"):
                row[k] = v.isoformat()
            elif hasattr(v, "item"):
                row[k] = v.item()
            else:
                row[k] = v
        out.append(row)
    return out


def binom_llr(k_in: np.ndarray, n_in: np.ndarray, k_out: np.ndarray, n_out: np.ndarray) -> np.ndarray:
    """Log-likelihood ratio of "two rates" vs "one rate" for binomial counts (vectorized, 0 where empty).

    Exact for sparse counts (no normal approximation), which is why it is used for error onsets.
    """
    k_in, n_in, k_out, n_out = (np.asarray(a, dtype=float) for a in (k_in, n_in, k_out, n_out))

    def ll(k: np.ndarray, n: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(n > 0, k / np.where(n > 0, n, 1), 0.0)
            a = np.where(k > 0, k * np.log(np.where(p > 0, p, 1)), 0.0)
            b = np.where(n - k > 0, (n - k) * np.log(np.where(p < 1, 1 - p, 1)), 0.0)
        return a + b

    return ll(k_in, n_in) + ll(k_out, n_out) - ll(k_in + k_out, n_in + n_out)
