"""Change correlation: which config change (if any) caused the symptom?

Every ``config_change`` event (a mutating Kubernetes API call from the audit log) near the window is a
candidate. Several events on one object within ten minutes (a Helm upgrade: release secret + Deployment
patch; an Argo CD sync) form one candidate. Each candidate gets four features in ``[0, 1]``, computed
against the root-cause analysis of the same window (:mod:`meshlens.analysis.rootcause`):

* **time** -- how the change precedes the detected onset: 1 when it was made at most a rollout delay
  before (180 s for Deployments/Helm/ConfigMaps -- new pods must start -- and 60 s for mesh config that
  proxies load in seconds), then ``exp(-extra / 10 min)``; 0.7 when made up to 60 s *after* the onset
  (the onset is estimated from sparse requests), and 0 later: a change made after the symptom started
  cannot have caused it.
* **path** -- whether its targets (``change_targets``: VirtualService hosts, DestinationRule host,
  policy selector ``app`` labels, Deployment name; ``*`` = the whole namespace) are the services the
  root-cause analysis blames (their relative score), or lie on the symptom's failing/slow paths (0.2: relaying a failure is not
  causing it).
  A target matches a service when equal or when it is the service name plus a ``-suffix``
  (``reviews-v2``, ``accounts-config``). Workload-scoped kinds must also match the namespace.
* **kind** -- whether this kind of change can produce the observed failure signature: an
  AuthorizationPolicy explains 403 RBAC denials, a DestinationRule TLS failures or unreachable upstreams,
  a VirtualService no-route/no-cluster flags, a Deployment or ConfigMap application 5xx, crashes and
  slowness, an EnvoyFilter local rate limits (table :data:`KIND_COMPAT`); weighted by the signature's
  class shares.
* **shift** -- whether the targeted services' own calls got worse right after the change (failure rate:
  binomial likelihood ratio; latency: mean log-duration z) in the 15 minutes after vs before it.

The score is a logistic function of the features, ``sigmoid(-4 + 4.5 time*path + 1.5 kind +
1.5 shift*path + 0.5 time)``. Its weights are set by hand so that the score reads as a confidence:
``>= 0.5`` ("likely cause") requires a change on the blamed services made shortly before the onset --
a change elsewhere, even one of the right kind at the right moment on a service that broke too, stays
at or below 0.12; a change on the blamed service made long before (no shift at the time) stays below
0.1. They were checked against the simulator's evaluation scenarios (decoy changes near the onset, a
noisy service, incidents without any change), not fitted to production data.

Limits: a change is only seen if the audit log recorded it (kubectl, Helm, Argo CD... through the API
server); changes outside Kubernetes (cloud load balancers, DNS, certificates expiring) are not
candidates -- then no candidate reaches 0.5 and the root cause's evidence is what remains. Targets
are matched by name, so a ConfigMap whose name does not start with its workload's name is not linked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from meshlens.analysis.common import NS, binom_llr, logistic, pct, records, temp_name, ts_text
from meshlens.analysis.graph import TRAFFIC_SQL, hops_sql
from meshlens.analysis.rootcause import RootCauseReport, Session, analyze_session, session
from meshlens.store import Store
from meshlens.timeutil import parse_duration_ns

LIKELY = 0.5
"""Scores at or above this mean "likely cause"."""

GROUP_GAP_S = 600
"""Events on the same object closer than this form one change (Helm upgrade, Argo CD sync)."""

SHIFT_WINDOW_S = 900
"""Before/after window around a change for the shift feature."""

ROLLOUT_KINDS = frozenset({"Deployment", "HelmRelease", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod",
                           "ConfigMap", "Secret", "Scale", "Rollout"})
"""Kinds that act through new pods: allow a rollout delay before the onset."""

WORKLOAD_SCOPED = frozenset({"Deployment", "HelmRelease", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod",
                             "ConfigMap", "Secret", "Scale", "Rollout", "AuthorizationPolicy", "EnvoyFilter",
                             "PeerAuthentication", "Sidecar", "RequestAuthentication", "Server",
                             "ServerAuthorization"})
"""Kinds that only act on workloads of their own namespace (Istio's root namespace applies mesh-wide)."""

PATH_RELEVANCE = 0.2
"""Relevance of a service that is on the symptom's bad paths without being blamed itself: its own
behaviour did not change (it only relays its callee's failures or slowness), so a change there is a
weak suspect."""

EDGE_CALLER_RELEVANCE = 0.6
"""Relevance of the caller of a blamed edge when its failures could lie on either side (no route, no
cluster, TLS handshake): the client's configuration is as much a suspect as the server's."""

ROOT_NAMESPACES = frozenset({"istio-system", "linkerd", "consul"})

POD_CONFIG_KINDS = frozenset({"ConfigMap", "Secret"})
"""Kinds that act on a workload only through its pods mounting or referencing them (volumes, envFrom,
env valueFrom): which workloads those are is read from the workloads' specs in the audit log."""

_WORKLOAD = {"app": 1.0, "unavailable": 1.0, "latency": 1.0, "timeout": 0.8, "tls": 0.3, "route": 0.2,
             "ratelimit": 0.3, "authz": 0.1}
_ROUTE = {"route": 1.0, "timeout": 0.7, "latency": 0.5, "unavailable": 0.5, "app": 0.4, "tls": 0.3}
_AUTHZ = {"authz": 1.0, "unavailable": 0.3}
KIND_COMPAT: dict[str, dict[str, float]] = {
    "AuthorizationPolicy": _AUTHZ, "RequestAuthentication": _AUTHZ, "ServerAuthorization": _AUTHZ,
    "MeshTLSAuthentication": _AUTHZ, "NetworkAuthentication": _AUTHZ, "ServiceIntentions": _AUTHZ,
    "Server": {"authz": 1.0, "route": 0.5, "unavailable": 0.5},
    "PeerAuthentication": {"tls": 1.0, "unavailable": 0.8, "authz": 0.5},
    "DestinationRule": {"tls": 1.0, "unavailable": 0.8, "route": 0.6, "timeout": 0.4, "latency": 0.3},
    "VirtualService": _ROUTE, "HTTPRoute": _ROUTE, "GRPCRoute": _ROUTE, "ServiceRouter": _ROUTE,
    "ServiceSplitter": _ROUTE, "ServiceResolver": _ROUTE,
    "Gateway": {"route": 1.0, "tls": 0.6, "unavailable": 0.5},
    "ServiceEntry": {"route": 0.8, "unavailable": 0.6, "tls": 0.5},
    "Sidecar": {"route": 0.8, "unavailable": 0.5},
    "EnvoyFilter": {"ratelimit": 1.0, "app": 0.5, "route": 0.5, "unavailable": 0.5, "timeout": 0.5,
                    "latency": 0.5, "authz": 0.5, "tls": 0.5},
    "NetworkPolicy": {"unavailable": 1.0, "timeout": 0.8},
    "ServiceDefaults": {"tls": 0.7, "route": 0.5, "unavailable": 0.5},
    "ProxyDefaults": {"tls": 0.7, "route": 0.5, "unavailable": 0.5},
    "Deployment": _WORKLOAD, "HelmRelease": _WORKLOAD, "StatefulSet": _WORKLOAD, "DaemonSet": _WORKLOAD,
    "ReplicaSet": _WORKLOAD, "Pod": _WORKLOAD, "Rollout": _WORKLOAD,
    "Scale": {"unavailable": 0.6, "latency": 0.6, "ratelimit": 0.4, "timeout": 0.4},
    "ConfigMap": {"app": 1.0, "latency": 1.0, "timeout": 0.7, "unavailable": 0.5},
    "Secret": {"tls": 1.0, "app": 0.7, "authz": 0.5},
}
"""How well a change kind can produce each failure class (see :data:`rootcause.SIGNATURE_CLASSES`)."""
UNKNOWN_KIND_COMPAT = 0.3

W_BIAS, W_PATH_TIME, W_KIND, W_SHIFT, W_TIME = -4.0, 4.5, 1.5, 1.5, 0.5
"""Logistic weights (see the module docstring for how they were chosen)."""

CHANGE_COLUMNS = ["rank", "target", "kind", "namespace", "name", "actor", "verb", "ts", "score", "likely",
                  "dt_s", "f_time", "f_path", "f_kind", "f_shift", "evidence"]


@dataclass
class ChangeReport:
    """Ranked change candidates plus the root-cause report they were scored against."""

    service: str
    root_cause: RootCauseReport
    candidates: pd.DataFrame
    message: str = ""

    def to_json(self) -> list[dict[str, Any]]:
        """The ``--json`` array: best first; ``rank, target, actor, ts, score, evidence`` and more."""
        return records(self.candidates)

    # -- for notebooks and reports --------------------------------------------------------------
    def table(self) -> pd.DataFrame:
        """Candidates with the evidence as one text column."""
        df = self.candidates.copy()
        df["evidence"] = ["; ".join(e) for e in df["evidence"]]
        return df[["rank", "target", "actor", "verb", "ts", "score", "likely", "evidence"]]

    def markers(self) -> pd.DataFrame:
        """One row per candidate inside the analysed window, for chart rules: ``ts, label``
        (``Kind/ns/name (score)``), ``actor``."""
        c = self.candidates
        w = self.root_cause.window
        c = c[(c["ts"] >= pd.Timestamp(w.lo_ns, unit="ns", tz="UTC")) & (c["ts"] < pd.Timestamp(w.hi_ns, unit="ns", tz="UTC"))]
        return pd.DataFrame({"ts": c["ts"], "label": [f"{t} ({s:.2f})" for t, s in zip(c["target"], c["score"],
                                                                                   strict=True)],
                             "actor": c["actor"]})

    def likely(self) -> pd.DataFrame:
        """The candidates scored as likely causes (score >= 0.5), best first."""
        return self.candidates[self.candidates["likely"]]


# ------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------


def _load_changes(store: Store, lo_ns: int, hi_ns: int) -> pd.DataFrame:
    """Config changes in ``[lo, hi)``, with ``*``/missing targets of a delete resolved from the object's
    earlier changes (a delete carries no spec, but it undoes what the object targeted)."""
    df = store.query(
        """WITH c AS (
               SELECT ts_ns, actor, verb, resource_kind AS kind, resource_namespace AS namespace,
                      resource_name AS name, change_targets AS targets, change_spec::VARCHAR AS spec,
                      last_value(CASE WHEN change_targets IS NOT NULL AND len(change_targets) > 0
                                       AND change_targets <> ['*'] THEN change_targets END IGNORE NULLS)
                          OVER (PARTITION BY resource_kind, resource_namespace, resource_name ORDER BY ts_ns
                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_targets
               FROM events WHERE event_type = 'config_change' AND ts_ns < $hi AND resource_kind IS NOT NULL)
           SELECT ts_ns, actor, verb, kind, namespace, name, spec,
                  CASE WHEN (targets IS NULL OR len(targets) = 0 OR targets = ['*']) AND prev_targets IS NOT NULL
                       THEN prev_targets ELSE targets END AS targets
           FROM c WHERE ts_ns >= $lo ORDER BY ts_ns""",
        {"lo": lo_ns, "hi": hi_ns})
    if df.empty:
        return df
    scale = (df["kind"] == "Deployment") & df["spec"].fillna("").str.fullmatch(r'\{"replicas":\s*\d+\}')
    df["effective_kind"] = np.where(scale, "Scale", df["kind"])
    df["targets"] = [list(t) if t is not None and len(t) else ([n] if n else []) for t, n in
                     zip(df["targets"], df["name"], strict=True)]
    return df


def _group(df: pd.DataFrame) -> pd.DataFrame:
    """One candidate per object and burst of events (see :data:`GROUP_GAP_S`)."""
    df = df.sort_values(["kind", "namespace", "name", "ts_ns"]).reset_index(drop=True)
    key = df["kind"].astype(str) + "/" + df["namespace"].fillna("") + "/" + df["name"].fillna("")
    new = (key != key.shift()) | (df["ts_ns"].diff() > GROUP_GAP_S * NS)
    df["group"] = new.cumsum()
    g = df.groupby("group").agg(
        ts_ns=("ts_ns", "min"), kind=("kind", "first"), effective_kind=("effective_kind", "first"),
        namespace=("namespace", "first"), name=("name", "first"),
        actor=("actor", lambda s: ", ".join(dict.fromkeys(x for x in s if x))),
        verb=("verb", lambda s: ", ".join(dict.fromkeys(x for x in s if x))),
        events=("ts_ns", "size"), spec=("spec", "last"),
        targets=("targets", lambda s: list(dict.fromkeys(t for ts in s for t in ts))),
    )
    return g.reset_index(drop=True)


def _relevance(rc: RootCauseReport) -> dict[str, float]:
    """Service -> how much the root-cause analysis blames it (top candidate 1.0; an edge's callee the
    edge's relative score, its caller :data:`EDGE_CALLER_RELEVANCE` of it only when the evidence cannot
    tell the sides apart; services merely on the bad paths :data:`PATH_RELEVANCE`).

    Why the caller of an edge gets nothing from it when the evidence places the failure at the callee
    (its own sidecar reported it -- application 5xx, RBAC denial, rate limit -- or the callee did not
    answer -- timeout, reset, no healthy upstream) or the edge only slowed down (its callee's self time
    grew): the root-cause analysis already ranks a caller as a *service* candidate when the evidence
    points at it. Giving it a share of every edge it calls anyway made a change to the caller of the
    broken service -- a ConfigMap of the service that merely calls it, made just before the onset -- a
    "likely" cause of an incident no change caused."""
    rel: dict[str, float] = {}
    cands = rc.candidates
    sides: dict[str, str] = {}
    if rc.failing_paths is not None and not rc.failing_paths.empty:
        sides = dict(zip(rc.failing_paths["edge"].astype(str), rc.failing_paths["side"].astype(str), strict=False))
    if not cands.empty:
        top = float(cands["score"].max()) or 1.0
        for r in cands.itertuples(index=False):
            v = float(r.score) / top
            if r.kind == "edge":
                caller, callee = str(r.target).split("->", 1)
                rel[callee] = max(rel.get(callee, 0.0), v)
                ambiguous = sides.get(str(r.target)) == "edge" and float(r.failure_share) > 0
                if ambiguous:
                    rel[caller] = max(rel.get(caller, 0.0), EDGE_CALLER_RELEVANCE * v)
            else:
                rel[str(r.target)] = max(rel.get(str(r.target), 0.0), v)
    if rc.path_services is not None and not rc.path_services.empty:
        for svc in rc.path_services["service"]:
            rel[str(svc)] = max(rel.get(str(svc), 0.0), PATH_RELEVANCE)
    return rel


def _match(target: str, services: list[str]) -> str | None:
    """The service a change target names: equal, or the longest service name ``s`` with ``target``
    starting ``s-`` (``reviews-v2``, ``accounts-config``)."""
    if target in services:
        return target
    best = None
    for s in services:
        if target.startswith(s + "-") and (best is None or len(s) > len(best)):
            best = s
    return best


def _pod_spec_refs(spec: Any) -> tuple[set[tuple[str, str]], bool]:
    """(ConfigMaps/Secrets a workload spec references, whether the spec is a full pod template).

    References: ``volumes[].configMap.name``, ``volumes[].secret.secretName``, projected volume sources,
    ``envFrom[].configMapRef/secretRef.name`` and ``env[].valueFrom.configMapKeyRef/secretKeyRef.name`` of
    every (init) container. A merge patch (``{"patch": ...}``) is searched too but is not a full spec."""
    out: set[tuple[str, str]] = set()
    if not isinstance(spec, dict):
        return out, False
    full = "patch" not in spec
    body = spec.get("patch", spec) if not full else spec
    if isinstance(body, dict) and "spec" in body and not full:
        body = body["spec"]
    pod = ((body or {}).get("template") or {}).get("spec") if isinstance(body, dict) else None
    if not isinstance(pod, dict):
        return out, False
    for vol in pod.get("volumes") or []:
        if not isinstance(vol, dict):
            continue
        if isinstance(vol.get("configMap"), dict) and vol["configMap"].get("name"):
            out.add(("ConfigMap", str(vol["configMap"]["name"])))
        if isinstance(vol.get("secret"), dict) and vol["secret"].get("secretName"):
            out.add(("Secret", str(vol["secret"]["secretName"])))
        for src in ((vol.get("projected") or {}).get("sources") or []) if isinstance(vol.get("projected"), dict) else []:
            for key, kind in (("configMap", "ConfigMap"), ("secret", "Secret")):
                if isinstance((src or {}).get(key), dict) and src[key].get("name"):
                    out.add((kind, str(src[key]["name"])))
    containers = [*(pod.get("containers") or []), *(pod.get("initContainers") or [])]
    for ctr in containers:
        if not isinstance(ctr, dict):
            continue
        for ef in ctr.get("envFrom") or []:
            for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if isinstance((ef or {}).get(key), dict) and ef[key].get("name"):
                    out.add((kind, str(ef[key]["name"])))
        for env in ctr.get("env") or []:
            vf = (env or {}).get("valueFrom") if isinstance(env, dict) else None
            for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if isinstance(vf, dict) and isinstance(vf.get(key), dict) and vf[key].get("name"):
                    out.add((kind, str(vf[key]["name"])))
    return out, full and bool(pod.get("containers"))


_FULL = ("*full*", "")
"""Marker in a workload's reference set: its full pod template has been seen."""


def _config_references(store: Store, hi_ns: int) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """(namespace, workload) -> the ConfigMaps/Secrets its pods reference, from the workload specs of the
    audit log up to ``hi_ns`` (the last full spec wins; patches add references). Workloads whose full
    spec was seen carry :data:`_FULL`."""
    df = store.query(
        """SELECT resource_namespace AS ns, resource_name AS name, change_spec::VARCHAR AS spec FROM events
           WHERE event_type = 'config_change' AND ts_ns < $hi AND change_spec IS NOT NULL
             AND resource_kind IN ('Deployment', 'StatefulSet', 'DaemonSet', 'ReplicaSet', 'Rollout')
           ORDER BY ts_ns""", {"hi": hi_ns})
    out: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for r in df.itertuples(index=False):
        try:
            spec = json.loads(r.spec)
        except (TypeError, ValueError):
            continue
        found, full = _pod_spec_refs(spec)
        key = (str(r.ns), str(r.name))
        if full:
            out[key] = found | {_FULL}
        else:
            out.setdefault(key, set()).update(found)
    return out


def _uses_config(refs: dict[tuple[str, str], set[tuple[str, str]]], c: Any, service: str) -> bool:
    """Whether the workload ``service`` may use the ConfigMap/Secret ``c``: it references it, or its
    full spec is unknown (then the name match is all there is)."""
    names = refs.get((str(c.namespace), service))
    if names is None or _FULL not in names:
        return True
    return (str(c.kind), str(c.name)) in names


def _time_feature(dt_s: float, kind: str) -> float:
    if np.isnan(dt_s):
        return 0.0
    if dt_s < -60:
        return 0.0
    if dt_s < 0:
        return 0.7
    allowance = 180.0 if kind in ROLLOUT_KINDS else 60.0
    return float(np.exp(-max(0.0, dt_s - allowance) / 600.0))


def _kind_feature(kind: str, signature: dict[str, float]) -> float:
    compat = KIND_COMPAT.get(kind)
    total = sum(signature.values()) or 1.0
    if compat is None:
        return UNKNOWN_KIND_COMPAT
    return float(sum(v * compat.get(k, 0.1) for k, v in signature.items()) / total)


def _shift(sess: Session, pairs: pd.DataFrame) -> pd.DataFrame:
    """Before/after failure and latency of the calls into (and from) each (candidate, service)."""
    if pairs.empty:
        return pd.DataFrame(columns=["cid", "svc", "n_b", "f_b", "n_a", "f_a", "m_b", "m_a", "v_b", "v_a"])
    name = temp_name("pairs")
    sess.store.con.register(name, pairs)
    where = ("dst_service IN (SELECT unnest($svcs::VARCHAR[])) "
             "OR src_workload IN (SELECT unnest($svcs::VARCHAR[]))")
    lo = max(sess.window.lo_ns, int(pairs["ts_ns"].min()) - SHIFT_WINDOW_S * NS)
    hi = min(sess.window.hi_ns, int((pairs["ts_ns"] + pairs["allow_ns"]).max()) + SHIFT_WINDOW_S * NS)
    try:
        if lo >= hi:
            return pd.DataFrame(columns=["cid", "svc", "n_b", "f_b", "n_a", "f_a", "m_b", "m_a", "v_b", "v_a"])
        return sess.store.query(
            f"""WITH h AS ({hops_sql(where=where)}),
                j AS (
                    SELECT p.cid, p.svc, h.ts_ns >= p.ts_ns AS after, h.failed, ln(1 + greatest(h.dur_ms, 0)) AS x, h.w
                    FROM {name} p JOIN h ON h.callee = p.svc
                     AND h.ts_ns >= p.ts_ns - $w AND h.ts_ns < p.ts_ns + p.allow_ns + $w
                    UNION ALL
                    SELECT p.cid, p.svc, h.ts_ns >= p.ts_ns, h.failed, ln(1 + greatest(h.dur_ms, 0)), h.w
                    FROM {name} p JOIN h ON h.caller = p.svc AND h.callee <> p.svc
                     AND h.ts_ns >= p.ts_ns - $w AND h.ts_ns < p.ts_ns + p.allow_ns + $w)
                SELECT cid, svc,
                       coalesce(sum(w) FILTER (WHERE NOT after), 0) AS n_b,
                       coalesce(sum(w) FILTER (WHERE NOT after AND failed), 0) AS f_b,
                       coalesce(sum(w) FILTER (WHERE after), 0) AS n_a,
                       coalesce(sum(w) FILTER (WHERE after AND failed), 0) AS f_a,
                       sum(w * x) FILTER (WHERE NOT after) / sum(w) FILTER (WHERE NOT after) AS m_b,
                       sum(w * x) FILTER (WHERE after) / sum(w) FILTER (WHERE after) AS m_a,
                       var_samp(x) FILTER (WHERE NOT after) AS v_b, var_samp(x) FILTER (WHERE after) AS v_a
                FROM j GROUP BY cid, svc""",
            {"w": SHIFT_WINDOW_S * NS, "lo": lo, "hi": hi, "svcs": sorted(set(pairs["svc"]))})
    finally:
        sess.store.con.unregister(name)


def _shift_scores(sh: pd.DataFrame) -> pd.DataFrame:
    if sh.empty:
        return sh.assign(shift=[], text=[])
    llr = binom_llr(sh["f_a"], sh["n_a"], sh["f_b"], sh["n_b"])
    worse = (sh["f_a"] / sh["n_a"].clip(lower=1)) > (sh["f_b"] / sh["n_b"].clip(lower=1))
    s_fail = np.where(worse & (sh["n_b"] > 0) & (sh["n_a"] > 0), 1 - np.exp(-llr / 10.0), 0.0)
    se = np.sqrt(sh["v_b"].fillna(0) / sh["n_b"].clip(lower=1) + sh["v_a"].fillna(0) / sh["n_a"].clip(lower=1))
    z = ((sh["m_a"] - sh["m_b"]) / se.where(se > 0)).fillna(0.0)
    s_lat = np.clip((z - 3.0) / 5.0, 0.0, 1.0)
    out = sh.assign(s_fail=s_fail, s_lat=s_lat, shift=np.maximum(s_fail, s_lat))
    out["text"] = [
        f"calls of {r.svc} in the {SHIFT_WINDOW_S // 60} min after vs before: failures "
        f"{pct(r.f_b / r.n_b) if r.n_b else 'n/a'} -> {pct(r.f_a / r.n_a) if r.n_a else 'n/a'}, mean latency "
        f"x{np.exp(r.m_a - r.m_b):.2f}" if pd.notna(r.m_a) and pd.notna(r.m_b) else
        f"calls of {r.svc}: too few around the change to compare"
        for r in out.itertuples(index=False)]
    return out


def _signature_text(signature: dict[str, float]) -> str:
    names = {"authz": "authorization denials", "tls": "TLS failures", "route": "no route/cluster",
             "ratelimit": "rate limiting", "unavailable": "unreachable/unhealthy upstream", "timeout": "timeouts",
             "app": "application errors", "latency": "slowness"}
    top = sorted(((v, k) for k, v in signature.items() if v >= 0.05), reverse=True)[:3]
    return ", ".join(f"{pct(v)} {names.get(k, k)}" for v, k in top) or "none"


def _score(cands: pd.DataFrame, rc: RootCauseReport, sess: Session) -> pd.DataFrame:
    onset_ns = rc.onset.onset_ns if rc.onset else None
    rel = _relevance(rc)
    known = sess.store.query(
        f"""SELECT dst_service AS svc, any_value(dst_namespace) AS ns FROM events WHERE {TRAFFIC_SQL}
            GROUP BY dst_service
            UNION ALL
            SELECT src_workload, any_value(src_namespace) FROM events WHERE {TRAFFIC_SQL} AND src_workload IS NOT NULL
            GROUP BY src_workload""", {"lo": sess.window.lo_ns, "hi": sess.window.hi_ns})
    known = known.drop_duplicates("svc")
    ns_of = dict(zip(known["svc"], known["ns"], strict=False))
    services = sorted(ns_of)
    top_target = str(rc.candidates["target"].iloc[0]) if not rc.candidates.empty else None
    rows, pairs = [], []
    refs = _config_references(sess.store, sess.window.hi_ns) if cands["kind"].isin(POD_CONFIG_KINDS).any() \
        else {}
    for cid, c in enumerate(cands.itertuples(index=False)):
        kind = str(c.effective_kind)
        matched: dict[str, float] = {}
        unmatched = []
        targets = list(c.targets)
        if kind in POD_CONFIG_KINDS:  # the workloads that reference it are its targets too
            targets += [w for (ns, w), names in refs.items() if ns == c.namespace and (kind, c.name) in names
                        and w not in targets]
        for t in targets:
            if t == "*":
                scope = [s for s in services if c.namespace in ROOT_NAMESPACES or ns_of.get(s) == c.namespace]
                for s in scope:
                    matched[s] = max(matched.get(s, 0.0), 0.8 * rel.get(s, 0.0))
                continue
            s = _match(str(t), services)
            if s is None:
                unmatched.append(str(t))
                continue
            v = rel.get(s, 0.0)
            if (kind in WORKLOAD_SCOPED and c.namespace not in ROOT_NAMESPACES and ns_of.get(s)
                    and c.namespace and ns_of.get(s) != c.namespace):
                # a namespaced object acts on its own namespace's workloads only (a ConfigMap cannot be
                # mounted, a policy cannot select, a Deployment cannot run pods elsewhere)
                v = 0.0
            elif kind in POD_CONFIG_KINDS and not _uses_config(refs, c, s):
                v = 0.0  # the workload's spec is known and neither mounts nor references this object
            matched[s] = max(matched.get(s, 0.0), v)
        dt_s = (onset_ns - int(c.ts_ns)) / NS if onset_ns is not None else float("nan")
        allow_ns = (180 if kind in ROLLOUT_KINDS else 60) * NS
        for s in matched:
            pairs.append({"cid": cid, "svc": s, "ts_ns": int(c.ts_ns), "allow_ns": allow_ns})
        rows.append({"cid": cid, "matched": matched, "unmatched": unmatched, "dt_s": dt_s,
                     "f_time": _time_feature(dt_s, kind), "f_path": max(matched.values(), default=0.0),
                     "f_kind": _kind_feature(kind, rc.signature) if rc.onset else 0.0})
    feats = pd.DataFrame(rows)
    sh = _shift_scores(_shift(sess, pd.DataFrame(pairs, columns=["cid", "svc", "ts_ns", "allow_ns"])))
    best_shift = sh.groupby("cid")["shift"].max() if not sh.empty else pd.Series(dtype=float)
    feats["f_shift"] = feats["cid"].map(best_shift).fillna(0.0).astype(float)
    z = (W_BIAS + W_PATH_TIME * feats["f_path"] * feats["f_time"] + W_KIND * feats["f_kind"]
         + W_SHIFT * feats["f_shift"] * feats["f_path"] + W_TIME * feats["f_time"])
    feats["score"] = logistic(z.to_numpy(float))
    out = pd.concat([cands.reset_index(drop=True), feats.drop(columns=["cid"])], axis=1)
    out["evidence"] = [_evidence(r, rc, sh[sh["cid"] == i] if not sh.empty else sh, top_target)
                       for i, r in enumerate(out.itertuples(index=False))]
    return out


def _evidence(r: Any, rc: RootCauseReport, sh: pd.DataFrame, top_target: str | None) -> list[str]:
    ev: list[str] = []
    onset = rc.onset
    if onset is None:
        ev.append(f"no onset detected at {rc.service} in the window: nothing for a change to explain")
    elif r.dt_s < -60:
        ev.append(f"made {(-r.dt_s) / 60:.1f} min after the onset of {rc.service}'s {onset.signal} "
                  f"({ts_text(onset.onset_ns)}): cannot have caused it")
    elif r.dt_s < 0:
        ev.append(f"made {-r.dt_s:.0f} s after the detected onset ({ts_text(onset.onset_ns)}), within its "
                  "uncertainty")
    else:
        when = f"{r.dt_s:.0f} s" if r.dt_s < 120 else f"{r.dt_s / 60:.1f} min"
        ev.append(f"made {when} before the onset of {rc.service}'s {onset.signal} ({ts_text(onset.onset_ns)})")
    if r.matched:
        best = max(r.matched, key=r.matched.get)
        if r.matched[best] >= 0.75:
            role = "the top root-cause candidate" if top_target and best in top_target.split("->") \
                else "a root-cause candidate"
            ev.append(f"targets {best}: {role} (relevance {r.matched[best]:.2f})")
        elif r.matched[best] > 0:
            ev.append(f"targets {best}: on {rc.service}'s failing/slow paths (relevance {r.matched[best]:.2f})")
        else:
            ev.append(f"targets {', '.join(sorted(r.matched))}: not on {rc.service}'s failing/slow paths")
    if r.unmatched:
        ev.append(f"targets {', '.join(r.unmatched)}: no such service in the traffic")
    if onset is not None:
        fit = "fits" if r.f_kind >= 0.6 else ("partly fits" if r.f_kind >= 0.3 else "does not fit")
        ev.append(f"{r.effective_kind} {fit} the failure signature ({_signature_text(rc.signature)})")
    if not sh.empty:
        s = sh.sort_values("shift", ascending=False).iloc[0]
        ev.append(s["text"] + ("" if s["shift"] >= 0.3 else " (no significant shift)"))
    ev.append(f"{r.verb} by {r.actor}" + (f" ({r.events} events)" if r.events > 1 else ""))
    if isinstance(r.spec, str) and r.spec and r.kind != "Secret":
        spec = str(r.spec)
        ev.append("spec: " + (spec[:160] + "..." if len(spec) > 160 else spec))
    return ev


def correlate_session(sess: Session, *, lookback: str = "2h", top: int = 20,
                      report: RootCauseReport | None = None) -> ChangeReport:
    """:func:`correlate` on an open :func:`meshlens.analysis.rootcause.session`."""
    rc = report or analyze_session(sess)
    lo = sess.window.lo_ns - parse_duration_ns(lookback)
    raw = _load_changes(sess.store, lo, sess.window.hi_ns)
    if raw.empty:
        return ChangeReport(sess.service, rc, pd.DataFrame(columns=CHANGE_COLUMNS),
                            message=f"no config changes between {ts_text(lo)} and {ts_text(sess.window.hi_ns)}")
    scored = _score(_group(raw), rc, sess)
    scored["target"] = scored["kind"] + "/" + scored["namespace"].fillna("") + "/" + scored["name"].fillna("")
    scored["ts"] = pd.to_datetime(scored["ts_ns"], unit="ns", utc=True)
    scored["likely"] = scored["score"] >= LIKELY
    scored["abs_dt"] = scored["dt_s"].astype(float).abs().fillna(np.inf)
    scored = scored.sort_values(["score", "abs_dt"], ascending=[False, True]).head(top).reset_index(drop=True)
    scored["rank"] = np.arange(1, len(scored) + 1)
    for col in ("score", "f_time", "f_path", "f_kind", "f_shift"):
        scored[col] = scored[col].astype(float).round(4)
    scored["dt_s"] = scored["dt_s"].astype(float).round(1)
    n_likely = int(scored["likely"].sum())
    msg = (f"{n_likely} likely cause(s) among {len(raw)} config change events" if n_likely else
           f"no config change explains {sess.service}'s symptom ({len(raw)} change events considered)")
    return ChangeReport(sess.service, rc, scored[CHANGE_COLUMNS], message=msg)


def correlate(store: Store, service: str, start: Any = None, end: Any = None, *, lookback: str = "2h",
              top: int = 20) -> ChangeReport:
    """Rank config changes by how likely each caused ``service``'s symptom in ``[start, end)``.

    Changes from ``lookback`` before ``start`` up to ``end`` are candidates (see the module docstring).
    """
    with session(store, service, start, end) as sess:
        return correlate_session(sess, lookback=lookback, top=top)


def change_candidates(store: Store, service: str, start: Any = None, end: Any = None, *,
                      lookback: str = "2h", top: int = 20) -> pd.DataFrame:
    """The ranked candidates of :func:`correlate` as a DataFrame."""
    return correlate(store, service, start, end, lookback=lookback, top=top).candidates
