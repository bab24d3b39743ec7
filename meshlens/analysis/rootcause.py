"""Root cause along the call graph: given a symptom service and a window, which service (or edge) broke?

Method (the heavy lifting is DuckDB SQL over the hops of :mod:`meshlens.analysis.graph`; Python only
handles per-bucket and per-candidate aggregates):

1. **Symptom requests.** Every call into the symptom service is a symptom request (its caller's record
   when there is one, else the symptom's own sidecar record).
2. **Onset.** Two detectors propose an episode on per-bucket counts (about 240 buckets per window):
   failures out of requests -- an *epidemic change point*, the interval ``[a, b]`` maximising the
   binomial log-likelihood ratio of "a higher rate inside than outside" (exact for sparse counts) --
   and the log-duration of successful requests, centred on their operation's median (method + path
   template, so a slow checkout is not compared with a fast home page) -- the same search for a
   higher mean (Gaussian GLR, at least +10 %). For each proposal a request is *slow* when its duration
   exceeds its operation's 90th percentile *outside* the proposed interval (and its median by 50 %);
   the proposal where "failed or slow" rises most significantly wins
   (so a shifted mix of successful requests during an error incident does not pass for a latency
   episode). The episode must leave at least 5 minutes (or a tenth of the window) of normal traffic
   before it -- or, in a short pre-fault window, :data:`MIN_BASELINE_REQUESTS` (20) symptom requests. The onset is then refined to the request: around the interval's start, the start of the
   suffix most likely under the episode's rate rather than the baseline's. Baseline = the window before
   the onset (plus after the episode when it ended well before the window's end).
3. **Failures, followed to their origin.** For each failing symptom request the hops of the same
   request id are followed down to the *deepest failing hop* -- a failing call ``C -> T`` where ``T``
   made no failing call itself, and ``C`` failed too (or is the gateway/job), see
   :func:`meshlens.analysis.graph.deepest_failures_sql`. A candidate's *explained share* is its excess
   (episode minus baseline) rate of deepest failures per symptom request, divided by the symptom's
   excess failure rate, times the share of its own failures that are new (its failure ratio over all
   requests in the 30 minutes before the onset vs during the episode). A loud service whose failures
   its callers absorb (optional calls, retries) never becomes a deepest failure of a failing symptom
   request, and one that fails as much as it always did -- even inside failing requests -- is not a
   change: neither can outrank the real cause.
4. **Service, caller or edge?** The deepest failing hop ``C -> T`` says where the failure was *seen*;
   its evidence says where it *is*: the server's own sidecar reporting the failure (application 5xx,
   RBAC denial, local rate limit) or client flags meaning the callee did not answer (timeout, no
   healthy upstream, reset, connection refused) put it at ``T``. Failures the client decides for either
   side's reasons (no route, no cluster, TLS handshake) are placed by their shape: several callers
   failing towards ``T`` -> ``T``; one caller failing towards several callees -> ``C`` (e.g. its client
   certificate expired); otherwise by whether ``T`` still serves its other callers and ``C`` still
   reaches its other callees. The edge ``C -> T`` is always a candidate too (ranked just below a
   service with the same evidence).
5. **Latency, attributed by self time.** Over the symptom's requests, a service's *self time* is the
   time of the calls into it minus the time of the calls it made (this telescopes: the self times of
   all services of a request sum to the symptom's duration). The excess mean self time per symptom
   request, divided by the symptom's excess mean duration, is the share of the slowdown a service
   explains. An edge gets the share of its callee in proportion to how much its calls slowed down.
6. **Score** = ``phi_fail * failure share + phi_slow * latency share``, where ``phi`` are the shares of
   the symptom's excess bad requests that failed vs were only slow. Candidates are ranked by score.
7. **Local evidence: where time and errors are born** (:func:`local_evidence`). Step 5 says where the
   symptom's added time is *seen*; real faults need where it is *born*, per route and per edge, on short
   contaminated baselines. Over all proxy records of the window (whole requests sampled uniformly above
   400k records) three kinds of component series are built:

   * ``self`` per service and request: its inbound (server-side) durations minus its outbound
     (client-side) calls -- grows when the service itself is slow (CPU, code, a slow pod). An entry
     service with no caller records has one too, so it can be the root cause;
   * ``gap`` per edge and call: the client record's duration minus the server record's (paired by
     request, callee, operation and order) -- time spent between the two sidecars or in the caller's
     client: the network, or a CPU-starved caller;
   * ``born`` per service and request: its inbound failed while none of its outbound calls of that
     request failed -- an error born at that service mid-chain (it answered 500 without the call it
     needed).

   Each component is compared before vs after the onset with a rank test (Mann-Whitney; *exact* when a
   side is small -- 9 slow calls after 27 fast ones is p ~ 1e-8, which the normal approximation cannot
   express), its effect measured by Cliff's delta (``2 P(after > before) - 1``, scale-free, robust to
   the incident contaminating a short baseline) and a practical size (upper quartile or mean up by
   2 ms and 25 %). A changed component needs z >= 3 at the onset. A changed gap ``C -> T`` is placed
   by its shape: the share of ``T``'s incoming gaps that changed (every caller sees the callee's
   network) against the share of ``C``'s outgoing gaps that changed (a starved caller is slow towards
   every callee). A candidate's local score is the noisy-OR of its components' deltas, each weighted
   by how sure it is (``min(1, z / 10)``) and by its placement. The edge ``C -> T`` gets a changed gap
   only as far as the change is specific to it (minus the share of ``C``'s other calls, or ``T``'s other
   callers, that changed too): a caller slow towards all its callees is the caller, not an edge. When the symptom shows an episode with
   a latency part, the latency share of step 5 is replaced by this score (step 5's evidence is kept).
   When the symptom shows *no* episode (a minority route: 2-25 % of requests 18-85x slower moves the
   symptom's mean too little), the onset is searched on the components themselves: each one's best
   split (rank scan, at least 8 values and a tenth of the window on each side) must pass a 0.05
   family-wise level over the scan (weighted Bonferroni: each component's share of the level spread
   over its own split points, so a rare route's dozen splits are not charged for a busy route's 200:
   z 3.7-4.5) and be of practical size, and the largest sure effect gives the onset.
8. **No signal.** When neither the symptom nor any component changed, the report says "no signal in
   the access logs" (:data:`NO_SIGNAL`) instead of naming a guess: a fault that only changes return
   values is invisible to proxies.

gRPC: a failing ``grpc-status`` (UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, ...) counts as a
failure even under HTTP 200 (:data:`meshlens.analysis.common.GRPC_FAILED`) -- gRPC answers errors in
the trailers, and Envoy logs its own local replies to gRPC requests (no healthy upstream, timeouts) as
200 too, with their flags (envoy#16667). The parsers read the status as Envoy writes it
(``%GRPC_STATUS%``'s names ``Unavailable``, ``SNAKE_STRING`` or the number). NOT_FOUND,
INVALID_ARGUMENT, ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE and CANCELLED are
answers (like a 404) or the caller's own choice, not failures. The simulator's gRPC meshes
(``Scenario.grpc``) are part of the evaluation.

Measured on real faults (``benchmarks/eval_nezha.py``, the Online Boutique half of Nezha, FSE'23, its
traces rendered as the sidecar records Envoy would write): see the README's analysis section.

Stores ingested with success sampling: rates and means use ``sample_weight``; the change-point tests
count the records actually stored (successes are thinned uniformly, so the observed failure share
changes exactly when the real one does).

Limits (say them when presenting results):

* One episode per call: the most significant bad interval of the window is explained. Narrow the
  window to analyse another one.
* Needs request ids (``x-request-id`` or trace ids) to follow failures through hops; without them only
  failures visible at the symptom's direct callees can be attributed.
* Self time treats parallel calls as sequential, so a parent with parallel children shows less self
  time than it has -- it is never *over*-blamed, but its own slowdown may be under-estimated.
* A service that fails without any sidecar log (outside the mesh) is blamed on the deepest meshed hop
  that saw the failure (its caller's edge), which is the right place to look but not the final answer.
* With success sampling, a latency-only incident touching a small share of requests can fall below
  detection (slow successes are sampled too): measured, 10 % sampling missed 2 of 24 simulated
  incidents, both partial slow-node ones.
* Local evidence needs both sidecar records of a call (client and server) for gaps, and request ids to
  pair them; calls missing from the logs count in their caller's self time (a caller whose calls to a
  delayed service are not logged is blamed instead). A rare route needs about 8 calls after the onset
  and a dozen before it to be judged at all (fewer is not evidence), and a slowdown of a few percent is
  below the practical size. Co-located faults (one node starving several pods) blame each pod's service.
* A fault that changes only what is returned (wrong values, handled exceptions) leaves the records
  unchanged: "no signal" is the honest answer there, and it is what the analysis says.
* gRPC failures are visible only when the access-log format logs the status: Istio's default TEXT and
  JSON formats do not (add ``"grpc_status": "%GRPC_STATUS%"``). Without it a gRPC callee's failures are
  200s like its successes, and the blame falls on the first HTTP caller that turns them into a 5xx (an
  error born there). Failure classes of a signature (authz, rate limit...) are read from HTTP codes,
  flags and details, not from gRPC codes: an application's PERMISSION_DENIED is an "app" failure.
* Short pre-fault windows: 20 requests before the onset make a baseline, but a short baseline only
  shows a clear change. The onset scan needs a log-likelihood ratio of 10 whatever the window, so with
  20-40 baseline requests a new failure rate must reach about 40 % of the symptom's requests (no failure
  in 30 requests, then 15 %, is p ~ 0.01 before the scan's correction: not evidence), and a local change
  still needs :data:`LOCAL_MIN_SIDE` values on each side. Measured on Nezha: a network delay on a service
  called 8 times in the 25 s after the injection is answered "no signal".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from meshlens.analysis.common import (
    FAILED_SQL,
    NS,
    Window,
    binom_llr,
    bucket_seconds,
    check_service,
    pct,
    records,
    resolve_window,
    temp_name,
    ts_text,
)
from meshlens.analysis.graph import RID_SQL, TRAFFIC_SQL, deepest_failures_sql, hops_sql
from meshlens.formats import envoy
from meshlens.store import Store

MIN_LLR = 10.0
"""Minimum log-likelihood ratio for an onset: below it the symptom's bad rate did not change."""

LATENCY_MIN_SHIFT = 0.1
"""Smallest mean log-duration shift (about +10 %) the latency detector reports."""

MIN_BASELINE_REQUESTS = 20
"""Symptom requests before an episode that make a baseline when the window holds less than the usual
5 minutes (or a tenth of the window) before it: a short pre-fault window (20-120 s, a few dozen
requests) is still judged, by tests that are exact for such counts."""

REFINE_BACK_S = 600
"""How far before the detected interval the request-level onset refinement may move the onset."""

HEALTH_BASELINE_S = 1800
"""How far before the onset the per-edge failure ratios ("did this candidate change?") look."""

LATENCY_WEIGHT_MIN = 0.05
"""Below this share of slowness in the episode's excess bad requests, latency is not attributed (its
weight in the score would be negligible, and it is the costliest part: every hop of every symptom
request)."""

MIN_SCORE = 0.02
"""Candidates explaining less than this share are not reported."""

EDGE_FACTOR = 0.95
"""An edge candidate ranks just below a service with the same evidence (the service is the usual fix)."""

OP_SQL = ("coalesce(method, '') || ' ' || regexp_replace(split_part(coalesce(path, ''), '?', 1), "
          "'/[^/]*[0-9][^/]*', '/*', 'g')")
"""Operation key: method plus the path with id-like segments (anything holding a digit) replaced by ``*``."""

CANDIDATE_COLUMNS = ["rank", "kind", "target", "namespace", "score", "failure_share", "latency_share",
                     "evidence", "examples", "sig"]


@dataclass
class Onset:
    """The bad episode found at the symptom: when it started and how bad it is versus the baseline."""

    service: str
    onset_ns: int
    end_ns: int
    bucket_s: int
    llr: float
    signal: str
    requests_baseline: int
    requests_incident: int
    bad_baseline: float
    bad_incident: float
    failed_baseline: float
    failed_incident: float
    slow_baseline: float
    slow_incident: float
    mean_ms_baseline: float
    mean_ms_incident: float
    ongoing: bool

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["onset"] = ts_text(self.onset_ns)
        d["end"] = ts_text(self.end_ns)
        return d

    def describe(self) -> str:
        until = "still ongoing at the end of the window" if self.ongoing else f"until {ts_text(self.end_ns)}"
        return (f"{self.service}: {self.signal} from {ts_text(self.onset_ns)} {until}; bad requests "
                f"{pct(self.bad_baseline)} -> {pct(self.bad_incident)} (failed {pct(self.failed_baseline)} -> "
                f"{pct(self.failed_incident)}, slow {pct(self.slow_baseline)} -> {pct(self.slow_incident)}, "
                f"mean {self.mean_ms_baseline:.0f} -> {self.mean_ms_incident:.0f} ms)")


@dataclass
class RootCauseReport:
    """What :func:`analyze` found: the onset (None when the symptom did not change) and the candidates."""

    service: str
    window: Window
    onset: Onset | None
    candidates: pd.DataFrame
    timeline: pd.DataFrame
    message: str = ""
    failing_paths: pd.DataFrame = field(default_factory=pd.DataFrame)
    signature: dict[str, float] = field(default_factory=dict)
    path_services: pd.DataFrame = field(default_factory=pd.DataFrame)
    local: Any = None

    def to_json(self, *, say_no_incident: bool = False) -> list[dict[str, Any]]:
        """The ``--json`` array: best first; ``rank, kind, target, namespace, score, evidence`` and more.

        Fields for scripts (added, never renamed): ``incident`` (true), ``episode`` (the onset: ``onset,
        end, signal, ongoing`` and the symptom's before/after ``requests_*, failed_*, slow_*, bad_*,
        mean_ms_*``), ``signature`` (the most common failure of the candidate's deepest failing hops:
        ``status, flags, details, policy, count``; null for latency-only candidates) and
        ``example_request_ids``. ``say_no_incident``: when nothing was found, one item with ``incident``
        false, ``rank`` 0, ``kind`` "none" and the ``message`` instead of an empty array."""
        if self.onset is None or self.candidates.empty:
            if not say_no_incident:
                return []
            return [{"incident": self.onset is not None, "rank": 0, "kind": "none", "target": None,
                     "namespace": None, "score": 0.0, "evidence": [self.message], "message": self.message,
                     "symptom": self.service, "onset": self.onset.as_dict()["onset"] if self.onset else None,
                     "episode": self.onset.as_dict() if self.onset else None, "signature": None,
                     "example_request_ids": []}]
        out = records(self.candidates.drop(columns=["examples", "sig"], errors="ignore"))
        onset = self.onset.as_dict()
        sigs = self.candidates["sig"].tolist() if "sig" in self.candidates else [None] * len(out)
        examples = self.candidates["examples"].tolist() if "examples" in self.candidates else [[]] * len(out)
        for item, sig, ex in zip(out, sigs, examples, strict=True):
            item["onset"] = onset["onset"]
            item["symptom"] = self.service
            item["incident"] = True
            item["episode"] = onset
            item["signature"] = sig if isinstance(sig, dict) else None
            item["example_request_ids"] = [str(x) for x in ex] if isinstance(ex, list) else []
        return out

    # -- for notebooks and reports --------------------------------------------------------------
    @property
    def onset_time(self) -> pd.Timestamp | None:
        return pd.Timestamp(self.onset.onset_ns, unit="ns", tz="UTC") if self.onset else None

    def table(self) -> pd.DataFrame:
        """The candidates with their evidence as one text column (for tables and chart tooltips)."""
        df = self.candidates.drop(columns=["examples", "sig"], errors="ignore").copy()
        df["evidence"] = ["; ".join(e) for e in df["evidence"]]
        return df

    def timeline_long(self) -> pd.DataFrame:
        """The symptom's requests, failed and slow requests per bucket, long format (``ts, series, value``)."""
        t = self.timeline
        if t.empty:
            return pd.DataFrame(columns=["ts", "series", "value"])
        return t.melt(id_vars=["ts"], value_vars=["requests", "failed", "slow"], var_name="series",
                      value_name="value")

    def culprit(self) -> str | None:
        """The service the top candidate blames (the callee of an edge), e.g. to highlight a path to it."""
        if self.candidates.empty:
            return None
        top = self.candidates.iloc[0]
        return str(top["target"]).split("->")[-1] if top["kind"] == "edge" else str(top["target"])

    def example_request(self) -> str | None:
        """A request id that shows the failure (from the top candidate's evidence), for a drill-down."""
        for ex in self.candidates.get("examples", []):
            if isinstance(ex, list) and ex:
                return str(ex[0])
        return None


# ------------------------------------------------------------------------------------------------
# Symptom requests and onset
# ------------------------------------------------------------------------------------------------


SYMPTOM_RECORDS_SQL = f"""
    SELECT {RID_SQL} AS rid, ts_ns, coalesce(direction = 'outbound', FALSE) AS c, {FAILED_SQL} AS failed,
           coalesce(duration_ms, 0) AS d, method, path, coalesce(sample_weight, 1.0) AS w
    FROM events WHERE {TRAFFIC_SQL} AND dst_service = $svc"""
"""SQL: the symptom's records in ``[$lo, $hi)`` (bind ``$svc``), as :func:`_symptom_sql` reads them. A caller
that opens many sessions on one service over parts of one window (``analyze incidents``) materializes this
once over the whole window and passes it to :func:`session` as ``records``: one scan of the events instead
of one per session."""


def _symptom_sql(records: str | None = None) -> str:
    """One row per symptom request (bind ``$lo, $hi, $svc``): failed/duration as the symptom's caller
    saw it (its client record), else as the symptom's own sidecar logged it; ``xc``: log-duration
    centred on its operation's median (operations differ in speed). ``records``: a table of
    :data:`SYMPTOM_RECORDS_SQL` over a window holding ``[$lo, $hi)`` to read instead of the events."""
    rows = SYMPTOM_RECORDS_SQL if records is None else f"SELECT * FROM {records} WHERE ts_ns >= $lo AND ts_ns < $hi"
    return f"""
    WITH s AS ({rows}),
    g AS (
        SELECT rid, min(ts_ns) AS ts_ns, bool_or(c) AS has_c,
               bool_or(failed) FILTER (WHERE c) AS cf, bool_or(failed) FILTER (WHERE NOT c) AS sf,
               sum(d) FILTER (WHERE c) AS cd, sum(d) FILTER (WHERE NOT c) AS sd,
               any_value(method) AS method, any_value(path) AS path, min(w) AS w
        FROM s GROUP BY rid
    ),
    h AS MATERIALIZED (
        SELECT rid, ts_ns, w, coalesce(CASE WHEN has_c THEN cf ELSE sf END, FALSE) AS failed,
               coalesce(CASE WHEN has_c THEN cd ELSE sd END, 0) AS dur_ms,
               ln(1 + greatest(coalesce(CASE WHEN has_c THEN cd ELSE sd END, 0), 0)) AS x, {OP_SQL} AS op
        FROM g
    ),
    per_op AS (SELECT op, median(x) AS med FROM h GROUP BY op)
    SELECT h.rid, h.ts_ns, h.w, h.failed, h.dur_ms, h.x, h.op, h.x - o.med AS xc, FALSE AS slow
    FROM h JOIN per_op o USING (op)
    """


def _epidemic(k: np.ndarray, n: np.ndarray, min_start: int = 1, min_in: int = 5,
              min_out: int = 10) -> tuple[int, int, float]:
    """Best interval ``[a, b]`` (bucket indices, ``a >= min_start``) with a higher rate inside than
    outside: (a, b, llr); llr 0 if none."""
    ck = np.concatenate([[0.0], np.cumsum(k)])
    cn = np.concatenate([[0.0], np.cumsum(n)])
    a_idx, b_idx = np.triu_indices(len(k))
    k_in = ck[b_idx + 1] - ck[a_idx]
    n_in = cn[b_idx + 1] - cn[a_idx]
    k_out, n_out = ck[-1] - k_in, cn[-1] - n_in
    llr = binom_llr(k_in, n_in, k_out, n_out)
    with np.errstate(divide="ignore", invalid="ignore"):
        higher = (k_in / np.maximum(n_in, 1)) > (k_out / np.maximum(n_out, 1))
    ok = higher & (n_in >= min_in) & (n_out >= min_out) & (a_idx >= min_start)
    if not ok.any():
        return 0, 0, 0.0
    llr = np.where(ok, llr, -np.inf)
    i = int(np.argmax(llr))
    return int(a_idx[i]), int(b_idx[i]), float(llr[i])


def _epidemic_mean(n: np.ndarray, sx: np.ndarray, sxx: np.ndarray, min_start: int = 1, min_in: int = 5,
                   min_out: int = 10, min_shift: float = LATENCY_MIN_SHIFT) -> tuple[int, int, float]:
    """Best interval with a higher mean inside (Gaussian, common unknown variance): (a, b, llr).

    GLR ``N/2 ln(s0^2 / s1^2)`` of one mean vs two; ``min_shift`` (in log-duration) ignores shifts too
    small to matter however many requests there are.
    """
    cn, cs, cq = (np.concatenate([[0.0], np.cumsum(v)]) for v in (n, sx, sxx))
    a_idx, b_idx = np.triu_indices(len(n))
    n_in = cn[b_idx + 1] - cn[a_idx]
    s_in = cs[b_idx + 1] - cs[a_idx]
    n_tot, s_tot, q_tot = cn[-1], cs[-1], cq[-1]
    n_out, s_out = n_tot - n_in, s_tot - s_in
    if n_tot < min_in + min_out:
        return 0, 0, 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        m_in, m_out = s_in / np.maximum(n_in, 1), s_out / np.maximum(n_out, 1)
        s0 = max((q_tot - s_tot ** 2 / n_tot) / n_tot, 1e-9)
        s1 = np.maximum((q_tot - s_in ** 2 / np.maximum(n_in, 1) - s_out ** 2 / np.maximum(n_out, 1)) / n_tot, 1e-9)
        llr = 0.5 * n_tot * np.log(s0 / s1)
    ok = (m_in - m_out >= min_shift) & (n_in >= min_in) & (n_out >= min_out) & (a_idx >= min_start)
    if not ok.any():
        return 0, 0, 0.0
    llr = np.where(ok, llr, -np.inf)
    i = int(np.argmax(llr))
    return int(a_idx[i]), int(b_idx[i]), float(llr[i])


def _refine_mean(x: np.ndarray, m_in: float, m_out: float, var: float) -> int:
    """Index where a mean shift from ``m_out`` to ``m_in`` starts: start of the best-scoring suffix of
    Gaussian log-likelihood-ratio contributions."""
    gain = ((x - m_out) ** 2 - (x - m_in) ** 2) / (2 * var)
    suffix = np.cumsum(gain[::-1])[::-1]
    return int(np.argmax(suffix))


def _interval_llr(k: np.ndarray, n: np.ndarray, a: int, b: int) -> float:
    """Binomial LLR of a higher rate in buckets ``[a, b]`` than outside them (0 when not higher)."""
    k_in, n_in = k[a:b + 1].sum(), n[a:b + 1].sum()
    k_out, n_out = k.sum() - k_in, n.sum() - n_in
    if k_in / max(n_in, 1) <= k_out / max(n_out, 1):
        return 0.0
    return float(binom_llr(k_in, n_in, k_out, n_out))


def _refine(bad: np.ndarray, p_in: float, p_out: float) -> int:
    """Index where the incident starts in a bad/good sequence: start of the best-scoring suffix."""
    p_in = min(max(p_in, 1e-4), 1 - 1e-4)
    p_out = min(max(p_out, 1e-4), p_in - 1e-5)
    gain = np.where(bad, np.log(p_in / p_out), np.log((1 - p_in) / (1 - p_out)))
    suffix = np.cumsum(gain[::-1])[::-1]
    return int(np.argmax(suffix))


@dataclass
class Session:
    """The materialized inputs of one analysis (hop table and symptom requests), shared with
    :mod:`meshlens.analysis.changes` so the window is scanned once."""

    store: Store
    window: Window
    service: str
    sym: str


@contextmanager
def session(store: Store, service: str, start: Any = None, end: Any = None, *,
            records: str | None = None) -> Iterator[Session]:
    """Open an analysis session for symptom ``service`` over ``[start, end)`` (temp tables dropped after).
    ``records``: the service's records over a window holding this one (see :data:`SYMPTOM_RECORDS_SQL`)."""
    window = resolve_window(store, start, end)
    service = check_service(store, service, window)
    sess = Session(store, window, service, temp_name("sym"))
    params = {"lo": window.lo_ns, "hi": window.hi_ns, **({} if records else {"svc": service})}
    store.con.execute(f"CREATE TEMP TABLE {sess.sym} AS {_symptom_sql(records)}", params)
    try:
        yield sess
    finally:
        with suppress(duckdb.Error):
            store.con.execute(f"DROP TABLE IF EXISTS {sess.sym}")


def _grid(window: Window, width: int) -> np.ndarray:
    w = width * NS
    return np.arange(window.lo_ns // w * w, window.hi_ns, w, dtype=np.int64)


def _timeline(sess: Session, width: int) -> pd.DataFrame:
    """Per bucket of the symptom: requests, failed, slow (weighted by ``sample_weight``: estimates of the
    real counts, for display and rates), the same as observed record counts (``n_obs, failed_obs,
    slow_obs, ok_obs``) and log-latency sums of the successful ones (``sx, sxx``) for the detectors,
    and p50/p99.

    Why two sets: with ingest-time success sampling a weighted count stands for requests that were not
    stored; a change-point test must count what was observed (successes are thinned uniformly, so the
    observed failure share changes exactly when the real one does)."""
    df = sess.store.query(
        f"""SELECT ts_ns // $w * $w AS bucket_ns, sum(w) AS requests,
                   coalesce(sum(w) FILTER (WHERE failed), 0) AS failed,
                   coalesce(sum(w) FILTER (WHERE slow), 0) AS slow,
                   count(*) AS n_obs, count(*) FILTER (WHERE failed) AS failed_obs,
                   count(*) FILTER (WHERE slow) AS slow_obs, count(*) FILTER (WHERE NOT failed) AS ok_obs,
                   coalesce(sum(xc) FILTER (WHERE NOT failed), 0) AS sx,
                   coalesce(sum(xc * xc) FILTER (WHERE NOT failed), 0) AS sxx,
                   approx_quantile(dur_ms, 0.5) AS p50_ms, approx_quantile(dur_ms, 0.99) AS p99_ms
            FROM {sess.sym} GROUP BY 1 ORDER BY 1""", {"w": width * NS})
    full = pd.DataFrame({"bucket_ns": _grid(sess.window, width)})
    df = full.merge(df, on="bucket_ns", how="left").fillna(
        {c: 0 for c in ("requests", "failed", "slow", "n_obs", "failed_obs", "slow_obs", "ok_obs", "sx", "sxx")})
    df["ts"] = pd.to_datetime(df["bucket_ns"], unit="ns", utc=True)
    return df


def _mark_slow(sess: Session, lo_ns: int, hi_ns: int) -> None:
    """Mark slow symptom requests against the baseline (outside ``[lo, hi)``): log-duration above the
    baseline's 90th percentile of its operation, and at least 50 % above its median.

    A percentile rather than "median + k robust sd": it flags a shift of the bulk of a wide latency
    distribution (a slow pod behind half the requests) as well as a new tail, with a known baseline
    rate (about 10 %) whatever the distribution's shape."""
    new = temp_name("sym")
    sess.store.con.execute(
        f"""CREATE TEMP TABLE {new} AS
            WITH base AS (SELECT * FROM {sess.sym} WHERE NOT failed AND (ts_ns < $lo OR ts_ns >= $hi)),
                 per_op AS (SELECT op, median(x) AS med, quantile_cont(x, 0.9) AS q90, count(*) AS n
                            FROM base GROUP BY op),
                 whole AS (SELECT median(xc) AS med, quantile_cont(xc, 0.9) AS q90 FROM base)
            SELECT s.* EXCLUDE (slow),
                   NOT s.failed AND CASE WHEN o.n >= 20
                       THEN s.x > greatest(o.q90, o.med + ln(1.5))
                       ELSE s.xc > greatest(w.q90, w.med + ln(1.5)) END AS slow
            FROM {sess.sym} s LEFT JOIN per_op o USING (op) CROSS JOIN whole w""",
        {"lo": lo_ns, "hi": hi_ns})
    sess.store.con.execute(f"DROP TABLE IF EXISTS {sess.sym}")
    sess.sym = new


def _onset(ctx: Session) -> tuple[Onset | None, pd.DataFrame]:
    width = bucket_seconds(ctx.window)
    tl = _timeline(ctx, width)
    n = tl["n_obs"].to_numpy(float)
    # the window must hold normal traffic before the episode: at least 5 min (or a tenth of the window),
    # or -- a short pre-fault window -- at least MIN_BASELINE_REQUESTS requests: enough for the binomial
    # and rank tests to say how sure they are (MIN_LLR still decides whether anything changed)
    min_start = max(1, int(np.ceil(min(300.0, ctx.window.seconds / 10) / width)))
    reached = np.nonzero(np.cumsum(n) >= MIN_BASELINE_REQUESTS)[0]
    if len(reached):
        min_start = max(1, min(min_start, int(reached[0]) + 1))
    fa, fb, f_llr = _epidemic(tl["failed_obs"].to_numpy(float), n, min_start)
    la, lb, l_llr = _epidemic_mean(tl["ok_obs"].to_numpy(float), tl["sx"].to_numpy(float),
                                   tl["sxx"].to_numpy(float), min_start)
    grid = tl["bucket_ns"].to_numpy()

    def bounds(a: int, b: int) -> tuple[int, int]:
        return max(int(grid[a]), ctx.window.lo_ns), (ctx.window.hi_ns if b >= len(grid) - 1
                                                     else int(grid[b]) + width * NS)

    # Each detector proposes an interval. Each proposal is scored by the stronger of two binomial tests
    # on it: more failures inside than outside, more slow requests inside than outside (slow judged
    # against that proposal's own outside). The best proposal wins, and its stronger test says which
    # indicator (failed, or slow) times the onset. This keeps a shifted mix of successful requests
    # during an error incident from passing for a latency episode, and the reverse.
    best: tuple[float, int, int, str] | None = None
    for a, b, llr in ((fa, fb, f_llr), (la, lb, l_llr)):
        if llr < MIN_LLR:
            continue
        lo_ns, end_ns = bounds(a, b)
        _mark_slow(ctx, lo_ns, end_ns)
        t = _timeline(ctx, width)
        for column in ("failed_obs", "slow_obs"):
            score = _interval_llr(t[column].to_numpy(float), t["n_obs"].to_numpy(float), a, b)
            if best is None or score > best[0]:
                best = (score, a, b, column)
    if best is None or best[0] < MIN_LLR:
        return None, tl
    llr, a, b, column = best
    lo_ns, end_ns = bounds(a, b)
    ongoing = b >= len(grid) - 1
    _mark_slow(ctx, lo_ns, end_ns)
    tl = _timeline(ctx, width)
    inside = tl.iloc[a:b + 1]
    outside = tl.drop(tl.index[a:b + 1])
    p_in = inside[column].sum() / max(inside["n_obs"].sum(), 1)
    p_out = outside[column].sum() / max(outside["n_obs"].sum(), 1)
    # refine on individual requests, from up to 10 min (or 10 buckets) before the interval to as far
    # into it: a weak start (a few slow pods) can leave the first minutes out of the best bucket
    # interval, and empty buckets (sparse or sampled traffic) can be swallowed at its start
    back = max(10, int(np.ceil(REFINE_BACK_S / width)))
    local = ctx.store.query(
        f"SELECT ts_ns, failed, xc FROM {ctx.sym} WHERE ts_ns >= $lo AND ts_ns < $hi ORDER BY ts_ns",
        {"lo": max(int(grid[max(a - back, 0)]), ctx.window.lo_ns), "hi": int(grid[min(a + back, b)]) + width * NS})
    onset_ns = lo_ns
    if column == "failed_obs" and local["failed"].any() and p_in > p_out:
        onset_ns = int(local["ts_ns"].iloc[_refine(local["failed"].to_numpy(bool), p_in, p_out)])
    elif column == "slow_obs" and (~local["failed"]).any():
        # a latency episode: time it on the durations themselves (a binary "slow" loses the magnitude)
        ok = local[~local["failed"]]
        stats = [(part["sx"].sum(), part["sxx"].sum(), part["ok_obs"].sum()) for part in (inside, outside)]
        (s_in, q_in, n_in), (s_out, q_out, n_out) = stats
        if n_in > 0 and n_out > 0:
            m_in, m_out = s_in / n_in, s_out / n_out
            var = max((q_in + q_out - s_in ** 2 / n_in - s_out ** 2 / n_out) / (n_in + n_out), 1e-6)
            onset_ns = int(ok["ts_ns"].iloc[_refine_mean(ok["xc"].to_numpy(float), m_in, m_out, var)])
    stats = _period_stats(ctx, onset_ns, end_ns)
    base, inc = stats.get("base", {}), stats.get("inc", {})
    d_fail = inc.get("failed", 0) - base.get("failed", 0)
    d_slow = inc.get("slow", 0) - base.get("slow", 0)
    signal = "errors" if d_fail >= 2 * max(d_slow, 0) else ("latency" if d_slow >= 2 * max(d_fail, 0)
                                                             else "errors and latency")
    onset = Onset(
        service=ctx.service, onset_ns=onset_ns, end_ns=end_ns, bucket_s=width, llr=round(llr, 1), signal=signal,
        requests_baseline=int(base.get("n", 0)), requests_incident=int(inc.get("n", 0)),
        bad_baseline=base.get("bad", 0.0), bad_incident=inc.get("bad", 0.0),
        failed_baseline=base.get("failed", 0.0), failed_incident=inc.get("failed", 0.0),
        slow_baseline=base.get("slow", 0.0), slow_incident=inc.get("slow", 0.0),
        mean_ms_baseline=base.get("mean_ms", float("nan")), mean_ms_incident=inc.get("mean_ms", float("nan")),
        ongoing=ongoing)
    return onset, tl


def _period_sql(window: Window, onset_ns: int, end_ns: int) -> tuple[str, dict[str, int]]:
    """SQL CASE naming a row's period (``inc``: the episode; ``base``: before the onset, plus after the
    episode when it ended well before the window's end; NULL otherwise) and its bind parameters."""
    params = {"lo": window.lo_ns, "t0": onset_ns, "t1": end_ns}
    base = "(ts_ns >= $lo AND ts_ns < $t0)"
    if end_ns < window.hi_ns and (window.hi_ns - end_ns) > 5 * 60 * NS:
        base += " OR (ts_ns >= $t1 AND ts_ns < $hi)"
        params["hi"] = window.hi_ns
    return f"CASE WHEN ts_ns >= $t0 AND ts_ns < $t1 THEN 'inc' WHEN {base} THEN 'base' END", params


def _period_stats(ctx: Session, onset_ns: int, end_ns: int) -> dict[str, dict[str, float]]:
    period, params = _period_sql(ctx.window, onset_ns, end_ns)
    df = ctx.store.query(
        f"""SELECT period, sum(w) AS n, sum(w * failed::INT) / sum(w) AS failed, sum(w * slow::INT) / sum(w) AS slow,
                   sum(w * (failed OR slow)::INT) / sum(w) AS bad, sum(w * dur_ms) / sum(w) AS mean_ms
            FROM (SELECT *, {period} AS period FROM {ctx.sym})
            WHERE period IS NOT NULL GROUP BY period""", params)
    return {r["period"]: {k: float(v) for k, v in r.items() if k != "period"} for r in df.to_dict("records")}


def detect_onset(store: Store, service: str, start: Any = None, end: Any = None) -> Onset | None:
    """When did the symptom ``service`` go bad in ``[start, end)``? None when its bad rate did not change."""
    with session(store, service, start, end) as ctx:
        return _onset(ctx)[0]


def session_onset(sess: Session) -> tuple[Onset | None, pd.DataFrame]:
    """The onset (None: the bad rate did not change) and the symptom's timeline of an open session, as
    :func:`analyze_session` finds them; pass the pair back to it as ``prepared`` to analyse the session
    without detecting the onset again."""
    return _onset(sess)


# ------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------


def _requests_table(ctx: Session, onset: Onset) -> tuple[str, str]:
    """Temp tables: symptom requests with their period, and all hops of the *failing* ones (a few
    percent of the traffic: what the failure analysis follows)."""
    req, rh = temp_name("req"), temp_name("rf")
    con = ctx.store.con
    period, params = _period_sql(ctx.window, onset.onset_ns, onset.end_ns)
    con.execute(
        f"""CREATE TEMP TABLE {req} AS
            SELECT rid, period, bool_or(failed) AS sym_failed, bool_or(slow) AS sym_slow, sum(dur_ms) AS sym_dur,
                   min(w) AS w
            FROM (SELECT *, {period} AS period FROM {ctx.sym})
            WHERE period IS NOT NULL GROUP BY rid, period""", params)
    failing = f"(SELECT rid FROM {req} WHERE sym_failed)"
    con.execute(f"CREATE TEMP TABLE {rh} AS SELECT h.*, r.period FROM ({hops_sql(rids=failing)}) h "
                f"JOIN {req} r USING (rid)", {"lo": ctx.window.lo_ns, "hi": ctx.window.hi_ns})
    return req, rh


def _leaves(ctx: Session, req: str, rh: str) -> pd.DataFrame:
    return ctx.store.query(
        f"SELECT rid, request_id, period, ts_ns, caller, caller_ns, callee, callee_ns, status, flags, details, srv_status, "
        f"srv_details, denied, policy, tls_reason, side FROM ({deepest_failures_sql(rh, req)})")


def _edge_health(ctx: Session, onset: Onset, services: list[str]) -> pd.DataFrame:
    """Per period (``base``/``inc``) and edge touching ``services``: calls and failures over *all*
    requests, not only the symptom's -- whether a callee still serves its other callers, and whether a
    candidate fails more than it used to, are part of the evidence."""
    where = ("dst_service IN (SELECT unnest($svcs::VARCHAR[])) "
             "OR src_workload IN (SELECT unnest($svcs::VARCHAR[]))")
    lo = max(ctx.window.lo_ns, onset.onset_ns - HEALTH_BASELINE_S * NS)  # a recent baseline is enough
    return ctx.store.query(
        f"""SELECT CASE WHEN ts_ns >= $t0 THEN 'inc' ELSE 'base' END AS period, caller, callee, sum(w) AS n,
                   coalesce(sum(w) FILTER (WHERE failed), 0) AS f
            FROM ({hops_sql(where=where)}) GROUP BY ALL""",
        {"lo": lo, "hi": onset.end_ns, "t0": onset.onset_ns, "svcs": services})


def _changed(health: pd.DataFrame, key: str | list[str]) -> pd.DataFrame:
    """Per ``key``: failure ratio before/during the episode and the share of the episode's failures
    that are new (``1 - before/during``): a service failing as much as it always did gets ~0."""
    g = health.groupby([*([key] if isinstance(key, str) else key), "period"])[["n", "f"]].sum().unstack(
        "period", fill_value=0)
    g.columns = [f"{a}_{b}" for a, b in g.columns]
    for col in ("n_inc", "f_inc", "n_base", "f_base"):
        if col not in g:
            g[col] = 0
    r_inc = g["f_inc"] / g["n_inc"].clip(lower=1)
    r_base = g["f_base"] / g["n_base"].clip(lower=1)
    g["r_inc"], g["r_base"] = r_inc, r_base
    g["changed"] = np.where(r_inc > 0, (1 - r_base / r_inc.where(r_inc > 0, 1)).clip(0, 1), 0.0)
    return g


def _share(counts: pd.DataFrame, key: list[str], n_inc: float, n_base: float, excess: float) -> pd.DataFrame:
    """Excess deepest-failure rate per key, as a share of the symptom's excess failure rate."""
    g = counts.groupby(key + ["period"])["rid"].nunique().unstack("period", fill_value=0)
    for p in ("inc", "base"):
        if p not in g:
            g[p] = 0
    rate_inc = g["inc"] / max(n_inc, 1)
    rate_base = g["base"] / n_base if n_base else 0.0
    g["share"] = ((rate_inc - rate_base) / excess).clip(0, 1) if excess > 0 else 0.0
    return g.reset_index()


def _side_weights(leaves: pd.DataFrame, health: pd.DataFrame) -> pd.DataFrame:
    """Per incident edge: how much of its failures the callee vs the caller owns (see module docstring)."""
    inc = leaves[leaves["period"] == "inc"]
    if inc.empty:
        return pd.DataFrame(columns=["caller", "callee", "w_callee", "w_caller", "placement"])
    edges = inc.groupby(["caller", "callee"]).agg(
        n=("rid", "nunique"), server=("side", lambda s: (s == "server").mean()),
        callee_side=("side", lambda s: (s == "callee").mean()), edge_side=("side", lambda s: (s == "edge").mean()),
    ).reset_index()
    # edges failing at a comparable scale (background errors elsewhere must not look like fan-in)
    strong = edges[edges["n"] >= max(3, 0.05 * edges["n"].max())]
    fan_in = strong.groupby("callee")["caller"].nunique()
    fan_out = strong.groupby("caller")["callee"].nunique()
    h = health.set_index(["caller", "callee"])
    rows = []
    for e in edges.itertuples(index=False):
        fi, fo = int(fan_in.get(e.callee, 0)), int(fan_out.get(e.caller, 0))
        others_in = health[(health["callee"] == e.callee) & (health["caller"] != e.caller)]
        others_out = health[(health["caller"] == e.caller) & (health["callee"] != e.callee)]
        t_others = (others_in["f"].sum() / others_in["n"].sum()) if others_in["n"].sum() >= 10 else None
        c_others = (others_out["f"].sum() / others_out["n"].sum()) if others_out["n"].sum() >= 10 else None
        edge_ratio = float(h.loc[(e.caller, e.callee), "f"] / h.loc[(e.caller, e.callee), "n"]) \
            if (e.caller, e.callee) in h.index else 1.0
        if fi >= 2 and fi >= fo:
            wc, wr, why = 1.0, 0.2, f"{fi} callers fail towards {e.callee}"
        elif fo >= 2:
            wc, wr, why = 0.2, 1.0, f"{e.caller} fails towards {fo} services"
        elif t_others is not None and t_others >= max(0.2, 0.5 * edge_ratio):
            wc, wr, why = 0.9, 0.2, f"{e.callee} also fails for its other callers"
        elif c_others is not None and c_others >= max(0.2, 0.5 * edge_ratio):
            wc, wr, why = 0.2, 0.9, f"{e.caller} also fails towards its other callees"
        elif t_others is not None and c_others is None:
            wc, wr, why = 0.4, 0.6, f"{e.callee} still serves its other callers"
        elif c_others is not None and t_others is None:
            wc, wr, why = 0.7, 0.3, f"{e.caller} still reaches its other callees"
        else:
            wc, wr, why = 0.5, 0.5, "only this edge fails"
        definite = e.server + e.callee_side
        rows.append({"caller": e.caller, "callee": e.callee, "w_callee": definite + e.edge_side * wc,
                     "w_caller": e.edge_side * wr, "placement": why if e.edge_side >= 0.5 else
                     "the callee's side reported or caused the failure"})
    return pd.DataFrame(rows)


def _signature(leaves: pd.DataFrame, limit: int = 3) -> list[str]:
    """Most common failure signatures among deepest failing hops (status, flags, details, policy, TLS)."""
    if leaves.empty:
        return []
    sig = leaves.assign(
        status=leaves["status"].astype("Int64").astype(str),
        flags=leaves["flags"].fillna("-"),
        what=leaves["srv_details"].fillna(leaves["details"]).fillna("-"),
        extra=np.where(leaves["policy"].notna(), "policy " + leaves["policy"].fillna(""),
                       np.where(leaves["tls_reason"].notna(), "TLS: " + leaves["tls_reason"].fillna(""), "")),
    )
    top = sig.groupby(["status", "flags", "what", "extra"]).size().sort_values(ascending=False).head(limit)
    out = []
    for (status, flags, what, extra), n in top.items():
        flag_txt = "" if flags == "-" else f" {flags}"
        out.append(f"{status}{flag_txt} {what}{' (' + extra + ')' if extra else ''} x{n}")
    return out


def _signature_fields(leaves: pd.DataFrame) -> dict[str, Any] | None:
    """The most common failure among deepest failing hops, as fields: ``status, flags, details, policy,
    count`` (the server's details when it reported the failure, else the client's)."""
    if leaves.empty:
        return None
    from collections import Counter

    def val(x: Any) -> Any:
        return None if x is None or (not isinstance(x, str) and pd.isna(x)) else x

    details = leaves["srv_details"].where(leaves["srv_details"].notna(), leaves["details"])
    keys = [(None if val(st) is None else int(st), val(fl), val(de), val(po)) for st, fl, de, po in
            zip(leaves["status"], leaves["flags"], details, leaves["policy"], strict=True)]
    (status, flags, det, policy), count = Counter(keys).most_common(1)[0]
    return {"status": status, "flags": flags, "details": det, "policy": policy, "count": int(count)}


@dataclass
class _FailureContext:
    """What the failure candidates of one episode are built from (see :func:`_failure_candidates`)."""

    service: str
    leaves: pd.DataFrame
    inc_leaves: pd.DataFrame
    edge_share: pd.DataFrame
    weights: pd.DataFrame
    changed: dict[str, pd.DataFrame]
    ns_of: dict[str, Any]
    head: str

    def change_of(self, role: str, key: Any) -> tuple[float, list[str]]:
        """(share of the candidate's episode failures that are new, evidence line)."""
        tab = self.changed[role]
        if key not in tab.index:
            return 1.0, []
        r = tab.loc[key]
        what = {"edge": f"calls {'->'.join(key) if isinstance(key, tuple) else key}",
                "callee": f"calls into {key}", "caller": f"calls from {key}"}[role]
        factor = float(r["changed"])
        text = (f"{what} failed {pct(r['r_base'])} before the onset, {pct(r['r_inc'])} after "
                f"({int(r['f_inc'])} of {int(r['n_inc'])})")
        if factor < 0.5:
            text += ": not a change -- these failures are usual and only coincide with the symptom's"
        return factor, [text]

    @staticmethod
    def examples(sub: pd.DataFrame) -> list[str]:
        return sub.sort_values("ts_ns")["request_id"].dropna().drop_duplicates().head(3).tolist()

    def edge_rows(self) -> list[dict[str, Any]]:
        rows = []
        for e in self.edge_share.itertuples(index=False):
            if e.share <= 0:
                continue
            sub = self.inc_leaves[(self.inc_leaves["caller"] == e.caller) & (self.inc_leaves["callee"] == e.callee)]
            factor, shift = self.change_of("edge", (e.caller, e.callee))
            rows.append({"kind": "edge", "target": f"{e.caller}->{e.callee}", "namespace": self.ns_of.get(e.callee),
                         "failure_share": EDGE_FACTOR * e.share * factor, "examples": self.examples(sub),
                         "sig": _signature_fields(sub),
                         "f_evidence": [f"deepest failing hop of {int(e.inc)} failing {self.service} requests "
                                        f"after the onset (vs {int(e.base)} in the baseline); explains "
                                        f"{pct(e.share)} of the excess failures", self.head,
                                        *("signature: " + s for s in _signature(sub)), *shift]})
        return rows

    def service_rows(self, role: str, n_inc: float, n_base: float, excess: float) -> list[dict[str, Any]]:
        """Services as the callee (``role="callee"``) or the caller of their deepest failing hops."""
        col, wcol = role, f"w_{role}"
        per = _share(self.leaves, [col], n_inc, n_base, excess)
        w = self.edge_share.assign(wn=self.edge_share[wcol] * self.edge_share["inc"]).groupby(col).agg(
            wn=("wn", "sum"), n=("inc", "sum"))
        place = self.weights.groupby(col)["placement"].agg(lambda s: "; ".join(sorted(set(s)))) \
            if not self.weights.empty else pd.Series(dtype=str)
        rows = []
        for r in per.itertuples(index=False):
            svc = getattr(r, col)
            if r.share <= 0 or svc not in w.index or w.loc[svc, "n"] <= 0:
                continue
            weight = float(w.loc[svc, "wn"] / w.loc[svc, "n"])
            if weight <= 0:
                continue
            factor, shift = self.change_of(role, svc)
            sub = self.inc_leaves[self.inc_leaves[col] == svc]
            other = "callee" if role == "caller" else "caller"
            via = sub.groupby(other)["rid"].nunique().sort_values(ascending=False).head(4)
            path_txt = ", ".join(f"{a}->{svc}" if role == "callee" else f"{svc}->{a}" for a in via.index)
            placed = "" if weight >= 0.99 else f", {pct(weight)} of them placed at {svc}"
            rows.append({"kind": "service", "target": svc, "namespace": self.ns_of.get(svc),
                         "failure_share": r.share * weight * factor, "examples": self.examples(sub),
                         "sig": _signature_fields(sub),
                         "f_evidence": [f"deepest failing hops {'into' if role == 'callee' else 'from'} {svc} "
                                        f"({path_txt}) explain {pct(r.share)} of the excess failures{placed}",
                                        self.head, *("signature: " + s for s in _signature(sub)), *shift,
                                        *([f"placement: {place[svc]}"] if svc in place.index else [])]})
        return rows


def _failure_candidates(ctx: Session, onset: Onset, req: str, rh: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Services and edges ranked by the share of the symptom's excess failures they explain."""
    leaves = _leaves(ctx, req, rh)
    counts = ctx.store.query(f"SELECT period, sum(w) AS n, coalesce(sum(w) FILTER (WHERE sym_failed), 0) AS f "
                             f"FROM {req} GROUP BY period")
    c = {r["period"]: r for r in counts.to_dict("records")}
    n_inc, n_base = float(c.get("inc", {}).get("n", 0)), float(c.get("base", {}).get("n", 0))
    f_inc, f_base = float(c.get("inc", {}).get("f", 0)), float(c.get("base", {}).get("f", 0))
    excess = f_inc / max(n_inc, 1) - (f_base / n_base if n_base else 0.0)
    cols = ["kind", "target", "namespace", "failure_share", "f_evidence", "examples", "sig"]
    if leaves.empty or excess <= 0:
        return pd.DataFrame(columns=cols), leaves
    inc_leaves = leaves[leaves["period"] == "inc"]
    # failure ratios of the edges that matter (a stray background error elsewhere needs no evidence)
    per_edge = inc_leaves.groupby(["caller", "callee"])["rid"].nunique()
    big = per_edge[per_edge >= max(2, 0.02 * per_edge.max())].index if not per_edge.empty else []
    health_all = _edge_health(ctx, onset, sorted({x for edge in big for x in edge}))
    weights = _side_weights(leaves, health_all[health_all["period"] == "inc"])
    ns_of = dict(zip(leaves["callee"], leaves["callee_ns"], strict=False))
    ns_of.update({k: v for k, v in zip(leaves["caller"], leaves["caller_ns"], strict=False) if k not in ns_of})
    rate_base = f_base / n_base if n_base else 0.0
    fc = _FailureContext(
        service=ctx.service, leaves=leaves, inc_leaves=inc_leaves,
        edge_share=_share(leaves, ["caller", "callee"], n_inc, n_base, excess).merge(
            weights, on=["caller", "callee"], how="left").fillna({"w_callee": 1.0, "w_caller": 0.0}),
        weights=weights,
        changed={"edge": _changed(health_all, ["caller", "callee"]), "callee": _changed(health_all, "callee"),
                 "caller": _changed(health_all, "caller")},
        ns_of=ns_of,
        head=(f"{ctx.service}: {f_inc:.0f} of {n_inc:.0f} requests failed after the onset "
              f"({pct(f_inc / max(n_inc, 1))}, baseline {pct(rate_base)})"))
    rows = fc.edge_rows() + fc.service_rows("callee", n_inc, n_base, excess) + \
        fc.service_rows("caller", n_inc, n_base, excess)
    if not rows:
        return pd.DataFrame(columns=cols), leaves
    df = pd.DataFrame(rows)
    df = df.sort_values("failure_share", ascending=False).drop_duplicates(["kind", "target"])
    return df, leaves


def _edge_times(ctx: Session, req: str) -> pd.DataFrame:
    """Per period and edge, over all the symptom's requests: total call time, calls, p50/p99 (one
    streaming aggregate, nothing materialized)."""
    return ctx.store.query(
        f"""SELECT r.period, h.caller, h.callee, any_value(h.callee_ns) AS ns, sum(h.w * h.dur_ms) AS t,
                   sum(h.w) AS calls, approx_quantile(h.dur_ms, 0.5) AS p50, approx_quantile(h.dur_ms, 0.99) AS p99
            FROM ({hops_sql(rids=req)}) h JOIN {req} r USING (rid) GROUP BY ALL""",
        {"lo": ctx.window.lo_ns, "hi": ctx.window.hi_ns})


def _latency_candidates(ctx: Session, req: str, edges: pd.DataFrame) -> pd.DataFrame:
    cols = ["kind", "target", "namespace", "latency_share", "l_evidence"]
    sym_mean = ctx.store.query(f"SELECT period, sum(w) AS n, sum(w * sym_dur) / sum(w) AS d FROM {req} "
                               f"GROUP BY period")
    m = {r["period"]: r for r in sym_mean.to_dict("records")}
    if "inc" not in m or "base" not in m or edges.empty:
        return pd.DataFrame(columns=cols)
    n_inc, n_base = m["inc"]["n"], m["base"]["n"]
    d_sym = m["inc"]["d"] - m["base"]["d"]
    if not d_sym or d_sym <= 0:
        return pd.DataFrame(columns=cols)
    into = edges.groupby(["callee", "period"])["t"].sum().unstack("period", fill_value=0)
    out_of = edges.groupby(["caller", "period"])["t"].sum().unstack("period", fill_value=0)
    n = pd.Series({"inc": n_inc, "base": n_base})
    selfs = into.sub(out_of.reindex(into.index).fillna(0), fill_value=0) / n
    for col in ("inc", "base"):
        if col not in selfs:
            selfs[col] = 0.0
    ns = edges.groupby("callee")["ns"].first()
    share = ((selfs["inc"] - selfs["base"]) / d_sym).clip(0, 1)
    rows: list[dict[str, Any]] = []
    head = (f"{ctx.service}: mean duration {m['base']['d']:.0f} -> {m['inc']['d']:.0f} ms per request after the "
            f"onset (+{d_sym:.0f} ms)")
    for svc, s in share.sort_values(ascending=False).items():
        if s < MIN_SCORE:
            break
        base_self, inc_self = float(selfs.loc[svc, "base"]), float(selfs.loc[svc, "inc"])
        calls_into = edges[edges["callee"] == svc]
        q = calls_into.groupby("period").agg(p50=("p50", "median"), p99=("p99", "max"))
        q_txt = ""
        if {"inc", "base"} <= set(q.index):
            q_txt = (f"; calls into {svc}: p50 {q.loc['base', 'p50']:.0f} -> {q.loc['inc', 'p50']:.0f} ms, "
                     f"p99 {q.loc['base', 'p99']:.0f} -> {q.loc['inc', 'p99']:.0f} ms")
        rows.append({"kind": "service", "target": svc, "namespace": ns.get(svc), "latency_share": float(s),
                     "l_evidence": [f"self time per {ctx.service} request {base_self:.0f} -> {inc_self:.0f} ms "
                                    f"(+{inc_self - base_self:.0f} ms): explains {pct(s)} of the added latency{q_txt}",
                                    head]})
        per_edge = calls_into.pivot_table(index="caller", columns="period", values="t", aggfunc="sum",
                                          fill_value=0)
        if {"inc", "base"} <= set(per_edge.columns):
            growth = (per_edge["inc"] / n_inc - per_edge["base"] / n_base).clip(lower=0)
            if growth.sum() > 0:
                for caller, g in growth.items():
                    if g <= 0:
                        continue
                    es = float(s) * g / growth.sum()
                    rows.append({"kind": "edge", "target": f"{caller}->{svc}", "namespace": ns.get(svc),
                                 "latency_share": EDGE_FACTOR * es,
                                 "l_evidence": [f"calls {caller}->{svc} add {g:.0f} ms per {ctx.service} request "
                                                f"after the onset; the edge carries {pct(g / growth.sum())} of "
                                                f"{svc}'s added time", head]})
    return pd.DataFrame(rows, columns=cols) if rows else pd.DataFrame(columns=cols)


def _combine(onset: Onset, fail: pd.DataFrame, lat: pd.DataFrame, top: int,
             phi_f: float | None = None) -> pd.DataFrame:
    d_fail = max(onset.failed_incident - onset.failed_baseline, 0.0)
    d_slow = max(onset.slow_incident - onset.slow_baseline, 0.0)
    if phi_f is None:
        phi_f = d_fail / (d_fail + d_slow) if (d_fail + d_slow) > 0 else 1.0
    keys = ["kind", "target", "namespace"]
    df = pd.merge(fail, lat, on=keys, how="outer") if not fail.empty or not lat.empty else pd.DataFrame()
    if df.empty:
        return pd.DataFrame(columns=CANDIDATE_COLUMNS)
    df["failure_share"] = df["failure_share"].astype(float).fillna(0.0)
    df["latency_share"] = df["latency_share"].astype(float).fillna(0.0)
    df["score"] = phi_f * df["failure_share"] + (1 - phi_f) * df["latency_share"]
    df = df[df["score"] >= MIN_SCORE].copy()

    def evidence(r: pd.Series) -> list[str]:
        f_ev = r["f_evidence"] if isinstance(r.get("f_evidence"), list) else []
        l_ev = r["l_evidence"] if isinstance(r.get("l_evidence"), list) else []
        first, second = (f_ev, l_ev) if phi_f >= 0.5 else (l_ev, f_ev)
        ex = r["examples"] if isinstance(r.get("examples"), list) else []
        out = list(first) + [x for x in second if x not in first]
        if ex:
            out.append("example request ids: " + ", ".join(ex))
        return out

    df["evidence"] = df.apply(evidence, axis=1) if not df.empty else []
    df["examples"] = [x if isinstance(x, list) else [] for x in df.get("examples", [[]] * len(df))]
    df["sig"] = [x if isinstance(x, dict) else None for x in df.get("sig", [None] * len(df))]
    df["kind_order"] = (df["kind"] == "edge").astype(int)
    df = df.sort_values(["score", "kind_order", "target"], ascending=[False, True, True]).head(top)
    df["rank"] = np.arange(1, len(df) + 1)
    df["score"] = df["score"].round(4)
    df["failure_share"] = df["failure_share"].round(4)
    df["latency_share"] = df["latency_share"].round(4)
    return df[CANDIDATE_COLUMNS].reset_index(drop=True)


def _failing_paths(leaves: pd.DataFrame) -> pd.DataFrame:
    inc = leaves[leaves["period"] == "inc"] if not leaves.empty else leaves
    if inc.empty:
        return pd.DataFrame(columns=["edge", "side", "failing_requests", "signature"])
    g = inc.groupby(["caller", "callee"]).agg(failing_requests=("rid", "nunique"),
                                              side=("side", lambda s: s.mode().iat[0])).reset_index()
    g["edge"] = g["caller"] + "->" + g["callee"]
    g["signature"] = [", ".join(_signature(inc[(inc["caller"] == r.caller) & (inc["callee"] == r.callee)], 2))
                      for r in g.itertuples(index=False)]
    return g.sort_values("failing_requests", ascending=False)[["edge", "side", "failing_requests", "signature"]]


SIGNATURE_CLASSES = ("authz", "tls", "route", "ratelimit", "unavailable", "timeout", "app", "latency")
"""Failure classes of a signature (what kind of change could produce it is decided in
:mod:`meshlens.analysis.changes`)."""


def _signature_classes(leaves: pd.DataFrame, phi_slow: float) -> dict[str, float]:
    """Shares of the episode's excess bad requests by failure class (deepest failing hops + slowness)."""
    inc = leaves[leaves["period"] == "inc"] if not leaves.empty else leaves
    out = dict.fromkeys(SIGNATURE_CLASSES, 0.0)
    out["latency"] = phi_slow
    if inc.empty:
        out["latency"] = 1.0 if phi_slow > 0 else 0.0
        return out
    flags = inc["flags"].fillna("")
    details = (inc["srv_details"].fillna("") + " " + inc["details"].fillna("")).str.lower()
    status = inc["status"].fillna(0).astype(int)
    conds = [
        ("authz", inc["denied"].fillna(False).astype(bool) | status.isin([401, 403]) | details.str.contains("rbac")),
        ("tls", inc["tls_reason"].notna()),
        ("route", flags.str.contains(envoy.flags_regex(envoy.flags_where(klass="route"))) | details.str.contains("route_not_found|cluster_not_found")),
        ("ratelimit", (status == 429) | flags.str.contains(envoy.flags_regex(envoy.flags_where(klass="ratelimit")))),
        ("timeout", flags.str.contains(envoy.flags_regex(envoy.flags_where(klass="timeout")))),
        ("unavailable", flags.str.contains(envoy.flags_regex(envoy.flags_where(klass="unavailable")))),
    ]
    cls = pd.Series("app", index=inc.index)
    for name, cond in reversed(conds):
        cls = cls.mask(cond.to_numpy(), name)
    shares = cls.value_counts(normalize=True)
    for name, v in shares.items():
        out[str(name)] = float(v) * (1 - phi_slow)
    return out


def _path_services(sess: Session, req: str, rf: str, use_failures: bool, edges: pd.DataFrame,
                   d_sym: float | None) -> pd.DataFrame:
    """Services on the symptom's bad paths during the episode: share of failing symptom requests whose
    failing hops touch them, and added time per symptom request (latency)."""
    fs = sess.store.query(
        f"""WITH f AS (SELECT count(*) AS n FROM {req} WHERE period = 'inc' AND sym_failed),
                 touched AS (
                    SELECT rid, callee AS svc, callee_ns AS ns FROM {rf} WHERE period = 'inc' AND failed
                    UNION ALL SELECT rid, caller, caller_ns FROM {rf} WHERE period = 'inc' AND failed)
            SELECT svc AS service, any_value(ns) AS namespace,
                   count(DISTINCT rid) / nullif((SELECT n FROM f), 0) AS failing_share
            FROM touched GROUP BY svc""")
    df = fs.assign(added_ms=0.0)
    if d_sym and d_sym > 0 and not edges.empty:
        n = sess.store.query(f"SELECT period, sum(w) AS n FROM {req} GROUP BY period").set_index("period")["n"]
        t = edges.groupby(["callee", "period"])["t"].sum().unstack("period", fill_value=0)
        added = (t.get("inc", 0) / n.get("inc", 1) - t.get("base", 0) / n.get("base", 1)).rename("added_ms")
        ns = edges.groupby("callee")["ns"].first()
        lat = pd.DataFrame({"service": added.index, "namespace": ns.reindex(added.index).to_numpy(),
                            "added_ms": added.to_numpy()})
        df = pd.concat([fs.assign(added_ms=0.0), lat.assign(failing_share=0.0)]).groupby(
            "service", as_index=False).agg(namespace=("namespace", "first"), failing_share=("failing_share", "max"),
                                           added_ms=("added_ms", "max"))
    df["failing_share"] = df["failing_share"].fillna(0.0)
    keep = (df["failing_share"] >= 0.05) & use_failures
    if d_sym and d_sym > 0:
        keep |= df["added_ms"] >= 0.2 * d_sym
    return df[keep].sort_values(["failing_share", "added_ms"], ascending=False).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# Local evidence: where the time (or the failure) is born, per service and edge
# ------------------------------------------------------------------------------------------------

LOCAL_MAX_ROWS = 150_000
"""Records the local analysis reads at most: above it whole requests are sampled uniformly (by request
id hash), so the call trees stay complete and rare routes keep their share of the sample."""

LOCAL_MIN_SIDE = 8
"""Fewest values on each side of the onset for a component to be tested (short real baselines hold 20-40
requests of a busy route, a handful of a rare one)."""

LOCAL_Z = 3.0
"""Rank-test z (one-sided, p ~ 0.001 at the given onset) a component needs to count as changed."""

LOCAL_FULL_Z = 10.0
"""Rank z at which a component's evidence counts fully; below it its effect is weighted by ``z / 10``:
a large effect seen on a dozen requests is less sure than the same effect on hundreds."""

LOCAL_SCAN_Z = 4.5
"""The highest bar a component needs when the onset is searched for (the scan maximises over split points
and components: about a 0.05 family-wise level over ~10^4 tests); a component scanned at fewer split
points gets its share of :data:`LOCAL_SCAN_ALPHA` (see :func:`_scan_onset`)."""

LOCAL_SCAN_ALPHA = 0.05
"""Family-wise level of the onset scan over all components and split points (weighted Bonferroni)."""


def _local_records(sess: Session) -> pd.DataFrame:
    """Per proxy record of the window: time, request key, side, caller, callee, operation (a hash of method
    and path: only used to pair a call's two records), duration, failed; whole requests sampled down to
    :data:`LOCAL_MAX_ROWS` records."""
    params = {"lo": sess.window.lo_ns, "hi": sess.window.hi_ns}
    n = int(sess.store.con.execute("SELECT count(*) FROM events WHERE record_kind = 'access_log' AND "
                                   "ts_ns >= $lo AND ts_ns < $hi", params).fetchone()[0])
    m = max(1, int(np.ceil(n / LOCAL_MAX_ROWS)))
    return sess.store.query(
        f"""SELECT ts_ns, {RID_SQL} AS rid, coalesce(direction = 'outbound', FALSE) AS cli, src_workload AS caller,
                   dst_service AS callee, hash(method, split_part(coalesce(path, ''), '?', 1)) AS op,
                   coalesce(duration_ms, 0) AS d, {FAILED_SQL} AS failed
            FROM events WHERE {TRAFFIC_SQL} AND {RID_SQL} % $m = 0""", {**params, "m": m})


def _namespaces(sess: Session) -> dict[str, Any]:
    """Namespace of each service of the window (callers' and callees')."""
    df = sess.store.query(
        f"""SELECT dst_service AS s, any_value(dst_namespace) AS ns FROM events WHERE {TRAFFIC_SQL} GROUP BY 1
            UNION ALL SELECT src_workload, any_value(src_namespace) FROM events
            WHERE {TRAFFIC_SQL} AND src_workload IS NOT NULL GROUP BY 1""",
        {"lo": sess.window.lo_ns, "hi": sess.window.hi_ns})
    return dict(zip(df["s"], df["ns"], strict=True))


def _components(df: pd.DataFrame) -> dict[tuple[str, ...], pd.DataFrame]:
    """Time series (``ts, v``) of the quantities that place a delay or a failure:

    * ``("self", S)``: per request and service, S's own time -- its inbound (server-side) durations minus
      its outbound (client-side) calls. Grows when S itself is slow (CPU, code, a slow pod); an entry
      service with no caller records has one too.
    * ``("gap", C, T)``: per call, client-side minus server-side duration (the client and server records
      of one call, paired by request, callee, operation and order): time between the two sidecars and
      in the caller's client -- the network, or a starved caller.
    * ``("born", S)``: per request and service, 1 when S's inbound record failed and none of its outbound
      calls of that request failed: an error born at S (it answered 500 without a failing call under it).
    """
    out: dict[tuple[str, ...], pd.DataFrame] = {}
    srv = df[~df["cli"] & df["callee"].notna()]
    cli = df[df["cli"] & df["caller"].notna()]
    si = srv.groupby(["rid", "callee"]).agg(ts=("ts_ns", "min"), d_in=("d", "sum"), f_in=("failed", "any"))
    so = cli.groupby(["rid", "caller"]).agg(d_out=("d", "sum"), f_out=("failed", "any"))
    so.index = so.index.set_names(["rid", "callee"])
    st = si.join(so, how="left")
    st["self"] = st["d_in"] - st["d_out"].fillna(0)
    st["born"] = st["f_in"] & ~st["f_out"].fillna(False).astype(bool)
    st = st.reset_index()
    for svc, g in st.groupby("callee"):
        out[("self", str(svc))] = pd.DataFrame({"ts": g["ts"].to_numpy(), "v": g["self"].to_numpy(float)})
        if g["born"].any():
            out[("born", str(svc))] = pd.DataFrame({"ts": g["ts"].to_numpy(), "v": g["born"].to_numpy(float)})
    key = ["rid", "callee", "op"]
    c = cli.sort_values("ts_ns").assign(k=lambda x: x.groupby(key).cumcount())
    s = srv.sort_values("ts_ns").assign(k=lambda x: x.groupby(key).cumcount())
    pair = c.merge(s[[*key, "k", "d"]], on=[*key, "k"], suffixes=("", "_srv"))
    pair["gap"] = pair["d"] - pair["d_srv"]
    for (caller, callee), g in pair.groupby(["caller", "callee"]):
        if caller != callee:
            out[("gap", str(caller), str(callee))] = pd.DataFrame({"ts": g["ts_ns"].to_numpy(),
                                                                   "v": g["gap"].to_numpy(float)})
    return {k: v.sort_values("ts", ignore_index=True) for k, v in out.items()}


def _ranks(v: np.ndarray) -> tuple[np.ndarray, float]:
    """Mid-ranks of ``v`` and the tie correction of the rank variance."""
    order = v.argsort(kind="mergesort")
    _, first, counts = np.unique(v[order], return_index=True, return_counts=True)
    r = np.empty(len(v))
    r[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    n = len(v)
    tie = float((counts ** 3 - counts).sum()) / (n * (n - 1)) if n > 1 else 0.0
    return r, tie


def _rank_scan(v: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """Mann-Whitney z of "the values after index k are larger than before" for each split ``k``."""
    n = len(v)
    r, tie = _ranks(v)
    after = r.sum() - np.concatenate([[0.0], np.cumsum(r)])[splits]
    na = n - splits
    nb = splits
    u = after - na * (na + 1) / 2
    var = na * nb / 12.0 * ((n + 1) - tie)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, (u - na * nb / 2) / np.sqrt(var), 0.0)


@dataclass
class _Change:
    """One component's change at the onset: rank z, Cliff's delta, before/after summaries."""

    key: tuple[str, ...]
    z: float
    delta: float
    n_before: int
    n_after: int
    before: float
    after: float

    def text(self) -> str:
        kind = self.key[0]
        if kind == "self":
            what = f"{self.key[1]}'s self time per request (its inbound minus its outbound calls)"
        elif kind == "gap":
            what = f"client-minus-server time of calls {self.key[1]}->{self.key[2]}"
        else:
            what = f"requests failing at {self.key[1]} without a failing call under them"
        unit = "" if kind == "born" else " ms"
        fmt = (lambda x: pct(x)) if kind == "born" else (lambda x: f"{x:.1f}")
        return (f"{what}: {fmt(self.before)}{unit} -> {fmt(self.after)}{unit} "
                f"({'rate' if kind == 'born' else 'p75'}; {self.n_before} before, {self.n_after} after the onset; "
                f"P(after > before) {0.5 + self.delta / 2:.2f}, rank z {self.z:.1f})")


def _change_at(key: tuple[str, ...], s: pd.DataFrame, t0: int, t1: int) -> _Change | None:
    ts, v = s["ts"].to_numpy(), s["v"].to_numpy()
    b, a = v[ts < t0], v[(ts >= t0) & (ts < t1)]
    if key[0] == "born":
        if len(a) < LOCAL_MIN_SIDE or len(b) < 1 or a.sum() < 3:
            return None
        pb, pa = (b.sum() + 0.5) / (len(b) + 1), a.mean()
        if pa <= pb:
            return None
        z = float(np.sqrt(binom_llr(np.array([a.sum()]), np.array([len(a)]), np.array([b.sum()]),
                                    np.array([len(b)]))[0] * 2))
        return _Change(key, z, float(pa - b.mean()), len(b), len(a), float(b.mean()), float(pa))
    if len(a) < LOCAL_MIN_SIDE or len(b) < LOCAL_MIN_SIDE:
        return None
    both = np.concatenate([b, a])
    z = _split_z(both, len(b), float(_rank_scan(both, np.array([len(b)]))[0]))
    r, _ = _ranks(both)
    auc = (r[len(b):].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b))
    if not _practical(b, a):
        return None
    return _Change(key, z, float(2 * auc - 1), len(b), len(a), float(np.quantile(b, 0.75)),
                   float(np.quantile(a, 0.75)))


def _practical(b: np.ndarray, a: np.ndarray) -> bool:
    """Practical size of a change from ``b`` to ``a``: the upper quartile (or the mean: a new tail) moves
    by 2 ms and 25 %."""
    qb, qa = float(np.quantile(b, 0.75)), float(np.quantile(a, 0.75))
    mb, ma = float(np.mean(b)), float(np.mean(a))
    return (qa - qb >= max(2.0, 0.25 * abs(qb))) or (ma - mb >= max(2.0, 0.25 * abs(mb)))


def _mw_exact_z(u: float, na: int, nb: int) -> float:
    """z equivalent of the exact one-sided Mann-Whitney p-value ``P(U >= u)`` (no ties), for small
    samples where the normal approximation understates strong evidence: 9 slow calls after 27 fast ones
    is p ~ 1e-8, not the z 4.4 the approximation allows at most. The null distribution of U is the
    coefficient list of the Gaussian binomial ``[na + nb choose na]_q``."""
    size = na * nb + na + nb + 1
    poly = np.zeros(size)
    poly[0] = 1.0
    for i in range(1, na + 1):
        # multiply by (1 - q^(nb + i)), then divide by (1 - q^i): a running sum per residue class mod i
        shifted = np.zeros(size)
        shifted[nb + i:] = poly[:size - nb - i]
        prod = poly - shifted
        pad = (-size) % i
        poly = np.cumsum(np.concatenate([prod, np.zeros(pad)]).reshape(-1, i), axis=0).ravel()[:size]
    poly = np.maximum(poly, 0.0)
    total = poly.sum()
    tail = poly[int(np.ceil(u - 1e-9)):].sum() / total if total > 0 else 1.0
    from statistics import NormalDist
    return float(-NormalDist().inv_cdf(max(tail, 1e-300))) if tail < 0.5 else 0.0


def _split_z(v: np.ndarray, k: int, z_approx: float) -> float:
    """The rank z of a split, exact when the smaller side is small (see :func:`_mw_exact_z`)."""
    na, nb = len(v) - k, k
    if min(na, nb) > 40 or na * nb > 20_000:
        return z_approx
    r, _ = _ranks(v)
    u = r[k:].sum() - na * (na + 1) / 2
    # U's null distribution is symmetric in the two sizes: build the smaller polynomial
    return max(z_approx, _mw_exact_z(u, min(na, nb), max(na, nb)))


def _scan_onset(comps: dict[tuple[str, ...], pd.DataFrame], lo_ns: int, hi_ns: int) -> tuple[int | None, float]:
    """The onset of the clearest change of any locus component: each component's best split (rank scan
    over up to 200 split points, at least :data:`LOCAL_MIN_SIDE` values and 10 % of the window on each
    side) must pass a family-wise test -- weighted Bonferroni at :data:`LOCAL_SCAN_ALPHA`: each of the
    ``C`` scanned components gets an equal share of the level, spread over its ``S`` split points, so
    its bar is the z of ``alpha / (C * S)`` (never above :data:`LOCAL_SCAN_Z`, never below
    :data:`LOCAL_Z`). A rare route scanned at a dozen split points is not charged for the 200 of a busy
    one: 8 slow calls after 22 fast ones can be judged. It must also be of practical size (as
    :func:`_change_at` demands: a scan proposing an onset nothing is then found to change at is no
    answer). Among those, the largest sure effect (Cliff's delta times ``min(1, z / LOCAL_FULL_Z)``)
    wins -- a busy route's slight drift reaches a high z too, but not a large effect. Returns (onset,
    its z)."""
    from statistics import NormalDist

    best: tuple[float, float, int] | None = None
    margin = int(0.1 * (hi_ns - lo_ns))
    plans = []
    for key, s in comps.items():
        if key[0] == "born":
            continue
        ts, v = s["ts"].to_numpy(), s["v"].to_numpy()
        ok = np.nonzero((ts >= lo_ns + margin) & (ts < hi_ns - margin))[0]
        ok = ok[(ok >= LOCAL_MIN_SIDE) & (ok <= len(v) - LOCAL_MIN_SIDE)]
        if len(ok):
            plans.append((ts, v, ok[np.unique(np.linspace(0, len(ok) - 1, min(200, len(ok))).astype(int))]))
    for ts, v, splits in plans:
        bar = min(LOCAL_SCAN_Z, max(LOCAL_Z, -NormalDist().inv_cdf(LOCAL_SCAN_ALPHA / (len(plans) * len(splits)))))
        z = _rank_scan(v, splits)
        # the exact tail matters only for short sides: try the approximate best and the latest splits
        cand = {int(np.argmax(z)), *range(max(0, len(splits) - 3), len(splits))}
        for i in cand:
            k = int(splits[i])
            zi = _split_z(v, k, float(z[i]))
            if zi < bar or not _practical(v[:k], v[k:]):
                continue
            r, _ = _ranks(v)
            na, nb = len(v) - k, k
            delta = 2 * (r[k:].sum() - na * (na + 1) / 2) / (na * nb) - 1
            strength = delta * min(1.0, zi / LOCAL_FULL_Z)
            if best is None or strength > best[0]:
                best = (strength, zi, int(ts[k]))
    if best is None:
        return None, 0.0
    return best[2], best[1]


@dataclass
class LocalEvidence:
    """What the local analysis found at one onset: the changed components and the per-service blame."""

    onset_ns: int
    changes: list[_Change]
    candidates: pd.DataFrame

    @property
    def strongest(self) -> _Change | None:
        return max(self.changes, key=lambda c: c.z) if self.changes else None


def _blame(changes: list[_Change], comps: dict[tuple[str, ...], pd.DataFrame]) -> pd.DataFrame:
    """Per service and edge: a score in [0, 1] from its changed components (noisy-OR of their Cliff's
    deltas, times the share of each component placed at it).

    A changed gap ``C -> T`` is placed by its shape: the share of ``T``'s tested incoming gaps that
    changed (the callee's network: every caller sees it) against the share of ``C``'s outgoing gaps that
    changed (the caller: it is slow towards every callee). The edge ``C -> T`` itself gets the gap in
    proportion to how specific it is: minus the share of ``C``'s *other* calls or ``T``'s *other*
    callers that changed too (a starved caller slow towards all its callees is not an edge problem)."""
    gaps_in: dict[str, int] = {}
    gaps_out: dict[str, int] = {}
    for key in comps:
        if key[0] == "gap":
            gaps_out[key[1]] = gaps_out.get(key[1], 0) + 1
            gaps_in[key[2]] = gaps_in.get(key[2], 0) + 1
    sig_in: dict[str, int] = {}
    sig_out: dict[str, int] = {}
    for c in changes:
        if c.key[0] == "gap":
            sig_out[c.key[1]] = sig_out.get(c.key[1], 0) + 1
            sig_in[c.key[2]] = sig_in.get(c.key[2], 0) + 1
    parts: dict[tuple[str, str], list[tuple[float, str]]] = {}

    def add(kind: str, target: str, w: float, c: _Change, why: str = "") -> None:
        if w > 0:
            sure = min(1.0, c.z / LOCAL_FULL_Z)
            parts.setdefault((kind, target), []).append((max(c.delta, 0.0) * sure * w, c.text() + why))

    for c in changes:
        if c.key[0] in ("self", "born"):
            add("service", c.key[1], 1.0, c)
        else:
            caller, callee = c.key[1], c.key[2]
            f_in = sig_in.get(callee, 0) / max(gaps_in.get(callee, 1), 1)
            f_out = sig_out.get(caller, 0) / max(gaps_out.get(caller, 1), 1)
            w_callee = f_in / (f_in + f_out) if f_in + f_out > 0 else 0.5
            add("service", callee, w_callee, c, f"; placed {pct(w_callee)} at {callee} ({sig_in.get(callee, 0)} of "
                f"{gaps_in.get(callee, 0)} callers slower towards it)")
            add("service", caller, 1 - w_callee, c, f"; placed {pct(1 - w_callee)} at {caller} ({sig_out.get(caller, 0)}"
                f" of {gaps_out.get(caller, 0)} of its callees slower from it)")
            # the edge itself is the answer only as far as the change is specific to it: not when the
            # caller's other calls, or the callee's other callers, changed the same way
            other_out = (sig_out.get(caller, 0) - 1) / max(gaps_out.get(caller, 1) - 1, 1)
            other_in = (sig_in.get(callee, 0) - 1) / max(gaps_in.get(callee, 1) - 1, 1)
            specific = 1.0 - max(other_out, other_in)
            add("edge", f"{caller}->{callee}", EDGE_FACTOR * specific, c,
                "" if specific >= 1 else f"; {pct(specific)} specific to this edge (the caller's other calls "
                "or the callee's other callers changed too)")
    rows = []
    for (kind, target), items in parts.items():
        score = 1 - float(np.prod([1 - min(x, 1.0) for x, _ in items]))
        ev = [t for _, t in sorted(items, key=lambda it: -it[0])]
        rows.append({"kind": kind, "target": target, "latency_share": score, "l_evidence": ev})
    cols = ["kind", "target", "latency_share", "l_evidence"]
    return pd.DataFrame(rows, columns=cols).sort_values("latency_share", ascending=False, ignore_index=True) \
        if rows else pd.DataFrame(columns=cols)


def local_evidence(sess: Session, onset_ns: int | None = None, end_ns: int | None = None) -> LocalEvidence | None:
    """Changed components and per-service blame at ``onset_ns`` (searched for when None: the strongest
    change of any component, which must pass :data:`LOCAL_SCAN_Z`). None when nothing changed."""
    df = _local_records(sess)
    if df.empty:
        return None
    comps = _components(df)
    end = end_ns or sess.window.hi_ns
    if onset_ns is None:
        onset_ns, z = _scan_onset(comps, sess.window.lo_ns, sess.window.hi_ns)
        if onset_ns is None:
            return None
        end = sess.window.hi_ns
    changes = [c for k, s in comps.items() if (c := _change_at(k, s, onset_ns, end)) is not None and c.z >= LOCAL_Z]
    if not changes:
        return None
    cands = _blame(changes, comps)
    ns = _namespaces(sess)
    cands.insert(2, "namespace", [ns.get(str(t).split("->")[-1]) for t in cands["target"]])
    return LocalEvidence(onset_ns, changes, cands)


NO_SIGNAL = "no signal in the access logs"
"""The message prefix of a run that found nothing to explain (no change at the symptom, and no service's own
time, call gap or born errors changed): the fault, if any, is not visible in proxy records."""


def _local_onset(sess: Session, local: LocalEvidence) -> Onset:
    """An :class:`Onset` for an episode found by the local analysis only (the symptom's own statistics did
    not change enough: a minority route, a rare edge)."""
    _mark_slow(sess, local.onset_ns, sess.window.hi_ns)
    stats = _period_stats(sess, local.onset_ns, sess.window.hi_ns)
    base, inc = stats.get("base", {}), stats.get("inc", {})
    top = local.strongest
    return Onset(
        service=sess.service, onset_ns=local.onset_ns, end_ns=sess.window.hi_ns, bucket_s=bucket_seconds(sess.window),
        llr=round(float(top.z) ** 2 / 2, 1) if top else 0.0, signal="latency (local)",
        requests_baseline=int(base.get("n", 0)), requests_incident=int(inc.get("n", 0)),
        bad_baseline=base.get("bad", 0.0), bad_incident=inc.get("bad", 0.0),
        failed_baseline=base.get("failed", 0.0), failed_incident=inc.get("failed", 0.0),
        slow_baseline=base.get("slow", 0.0), slow_incident=inc.get("slow", 0.0),
        mean_ms_baseline=base.get("mean_ms", float("nan")), mean_ms_incident=inc.get("mean_ms", float("nan")),
        ongoing=True)


def analyze_session(sess: Session, *, top: int = 10,
                    prepared: tuple[Onset | None, pd.DataFrame] | None = None) -> RootCauseReport:
    """:func:`analyze` on an open :func:`session` (``prepared``: its :func:`session_onset`, if known)."""
    onset, timeline = prepared if prepared is not None else _onset(sess)
    if onset is None:
        local = local_evidence(sess)
        if local is None or local.candidates.empty:
            return RootCauseReport(sess.service, sess.window, None, pd.DataFrame(columns=CANDIDATE_COLUMNS),
                                   timeline, message=f"{NO_SIGNAL}: no change in {sess.service}'s failures or "
                                   f"latency from {sess.window.describe()}, and no service's own time, call gaps "
                                   f"or errors changed: nothing to explain")
        onset = _local_onset(sess, local)
        cands = _combine(onset, pd.DataFrame(columns=["kind", "target", "namespace", "failure_share",
                                                      "f_evidence", "examples", "sig"]),
                         local.candidates, top, phi_f=0.0)
        msg = (f"{onset.describe()}; the symptom's own statistics barely moved: the change is local "
               f"({local.strongest.text() if local.strongest else ''})")
        return RootCauseReport(sess.service, sess.window, onset, cands, timeline, msg,
                               signature=_signature_classes(pd.DataFrame(), 1.0), local=local)
    req, rf = _requests_table(sess, onset)
    d_fail = max(onset.failed_incident - onset.failed_baseline, 0.0)
    d_slow = max(onset.slow_incident - onset.slow_baseline, 0.0)
    phi_slow = d_slow / (d_fail + d_slow) if (d_fail + d_slow) > 0 else 0.0
    local = None
    try:
        fail, leaves = _failure_candidates(sess, onset, req, rf)
        # latency attribution reads every hop of the symptom's requests: only when slowness matters
        edges = _edge_times(sess, req) if phi_slow >= LATENCY_WEIGHT_MIN else pd.DataFrame()
        lat = _latency_candidates(sess, req, edges)
        if phi_slow >= LATENCY_WEIGHT_MIN:
            # where the added time is born (own time vs call gaps), not only where it is seen
            local = local_evidence(sess, onset.onset_ns, onset.end_ns)
            if local is not None and not local.candidates.empty:
                lat = _local_latency(lat, local.candidates)
        d_sym = onset.mean_ms_incident - onset.mean_ms_baseline
        path = _path_services(sess, req, rf, phi_slow <= 0.8, edges, d_sym if phi_slow >= 0.2 else None)
    finally:
        for t in (rf, req):
            with suppress(duckdb.Error):
                sess.store.con.execute(f"DROP TABLE IF EXISTS {t}")
    cands = _combine(onset, fail, lat, top)
    msg = onset.describe()
    if cands.empty:
        msg += "; no service or edge explains it (the failures start at the symptom itself or are not traced)"
    return RootCauseReport(sess.service, sess.window, onset, cands, timeline, msg, _failing_paths(leaves),
                           signature=_signature_classes(leaves, phi_slow), path_services=path, local=local)


def _local_latency(share: pd.DataFrame, local: pd.DataFrame) -> pd.DataFrame:
    """Latency candidates scored by the local blame (where the time is born: own time, call gaps), with
    the symptom-level evidence (how much of the symptom's added time flows through it) kept first."""
    cols = ["kind", "target", "namespace", "latency_share", "l_evidence"]
    if share.empty:
        return local[cols]
    old = {(k, t): ev for k, t, ev in zip(share["kind"], share["target"], share["l_evidence"], strict=True)}
    out = local[cols].copy()
    out["l_evidence"] = [(old.get((k, t)) or []) + list(ev) for k, t, ev in
                         zip(out["kind"], out["target"], out["l_evidence"], strict=True)]
    # the edges carrying a service's added time to the symptom, in the old proportions
    svc_local = dict(zip(out.loc[out["kind"] == "service", "target"], out.loc[out["kind"] == "service",
                                                                              "latency_share"], strict=True))
    svc_old = dict(zip(share.loc[share["kind"] == "service", "target"], share.loc[share["kind"] == "service",
                                                                                 "latency_share"], strict=True))
    have = set(zip(out["kind"], out["target"], strict=True))
    extra = []
    for r in share[share["kind"] == "edge"].itertuples(index=False):
        callee = str(r.target).split("->")[-1]
        if ("edge", r.target) in have or callee not in svc_local or not svc_old.get(callee):
            continue
        extra.append({"kind": "edge", "target": r.target, "namespace": r.namespace,
                      "latency_share": float(r.latency_share) / float(svc_old[callee]) * float(svc_local[callee]),
                      "l_evidence": r.l_evidence})
    return pd.concat([out, pd.DataFrame(extra, columns=cols)], ignore_index=True) if extra else out


def analyze(store: Store, service: str, start: Any = None, end: Any = None, *, top: int = 10) -> RootCauseReport:
    """Detect the symptom's onset in ``[start, end)`` and rank root-cause candidates (see module docstring)."""
    with session(store, service, start, end) as sess:
        return analyze_session(sess, top=top)


def root_cause(store: Store, service: str, start: Any = None, end: Any = None, *, top: int = 10) -> pd.DataFrame:
    """Ranked root-cause candidates for ``service`` (the DataFrame of :func:`analyze`)."""
    return analyze(store, service, start, end, top=top).candidates
