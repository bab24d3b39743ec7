"""Incidents: what happened in a window, why, and who changed what -- without naming a symptom first.

The other analyses answer narrower questions: :mod:`~meshlens.analysis.anomalies` lists every
series that misbehaved (an incident shows up on the failing service, on each caller it propagates to and
mesh-wide; an unrelated loud service shows up too), :mod:`~meshlens.analysis.rootcause` explains *one*
episode at *one* symptom service, :mod:`~meshlens.analysis.changes` ranks config changes against it.
:func:`find_incidents` chains them:

1. **Anomalies** of the whole window (:func:`~meshlens.analysis.anomalies.detect_anomalies`, one pass),
   and who calls whom (one scan of the records that name their client).
2. **Episodes.** Service and edge anomalies, strongest first, join the group whose strongest anomaly
   started within :data:`LINK_S` of theirs and that holds the same or an adjacent service (caller or
   callee); otherwise they start a group. One failure propagating up a call chain is one group even when
   it spans several services and metrics; the same service failing again hours later is another group; a
   loud service erring at the same time as an incident but not adjacent to it stays apart.
3. **Does it reach users?** The mesh's *entry services* are those called by its ingress gateway(s) (a
   root caller -- never called itself -- named like a gateway or ingress; when the window has none, the
   services called by any root caller: workers, un-meshed clients). A group reaches users when an entry
   service in it (or an edge into one) *hurts*: failures :data:`MIN_EXCESS_RATE` above their baseline or
   a latency percentile :data:`MIN_LATENCY_RATIO` times its baseline, for :data:`MIN_DURATION_S` or more
   -- effect sizes, which do not grow with the traffic as significance scores do; a change in request
   volume is demand, not harm. Also when such an anomaly of an entry service that (transitively) calls
   the group started earlier and is still going on at the group's onset (*covered*: one long anomaly of
   the entry can span two incidents of its callees). Everything else is *background* (returned
   separately, never an incident). The hurting entry service with the strongest anomaly is the
   **symptom** (where users see it).
4. **Root cause and change on the incident's own onset.** The root-cause analysis that ``analyze
   root-cause`` runs (:func:`~meshlens.analysis.rootcause.analyze_session`) looks at the symptom over a
   sub-window around the group: from :data:`PRE_S` before its onset (not before the previous incident at
   that symptom ended) to :data:`POST_S` after its end, and not past the next group's onset there --
   unless the episode is still going on at that bound, then the next group is part of it. The change
   correlation (:func:`~meshlens.analysis.changes.correlate_session`) scores config changes against that
   result; its top candidate is the incident's change when it is likely (score >= 0.5). The root-cause
   onset (refined to the request) is the incident's onset. When the symptom's failures and latency did
   not change significantly there, or for less than :data:`MIN_DURATION_S`, or by less than
   :data:`MIN_EXCESS_RATE`, the group is not an incident (background, or part of an incident whose span
   holds it). Findings of one episode at two entry services (same onset, same culprit or change) are one
   incident (``symptoms`` lists them); a finding or a group at the same symptom that starts within
   :data:`CONTIGUOUS_S` of an incident's end (with the same culprit, for a finding) continues it.
   Cost: each symptom service's records are read from the events once per window (:class:`_Symptoms`),
   and the onset attempt that is kept is analysed on its own session (no second onset detection).
5. **Severity** = the symptom's excess bad (failed or slow) requests during the episode, estimated from
   its bad rate before vs during: how many user requests the incident spoiled. Most severe first.
6. **Second pass.** A series reports one latency episode per window (failure counts two): when an
   incident with slow requests was found, the stretches of at least :data:`SECOND_PASS_MIN_S` outside
   the incidents are searched again, so a second latency incident of the same services hours later is
   not hidden behind the first.

Limits: an incident too weak at every entry service for the anomaly detector (a few percent of slow
requests behind a rarely used page) is not found -- ``analyze root-cause`` on the entry service with a
narrow window is more sensitive. Two incidents overlapping in time at the same symptom are reported as
one (the root-cause analysis explains one episode per call; its candidates usually list both causes).
When a later group's onset bounds an episode's analysis while the episode goes on, the incident's end is
that group's last anomaly and its severity counts the first part only (on the bundled samples the
latency incident reads 06:31-07:00 of a 06:30-07:20 episode).
"""

from __future__ import annotations

import re
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pandas as pd

from meshlens.analysis.anomalies import anomalies_json, detect_anomalies
from meshlens.analysis.changes import LIKELY, correlate_session
from meshlens.analysis.common import NS, Window, pct, resolve_window, temp_name, ts_text
from meshlens.analysis.graph import TRAFFIC_SQL
from meshlens.analysis.rootcause import SYMPTOM_RECORDS_SQL, Session, analyze_session, session, session_onset
from meshlens.store import Store

LINK_S = 15 * 60
"""Anomalies whose onsets are at most this far apart (and whose services are the same or adjacent) are
one episode. Onsets are bucket-aligned (a few minutes on a 12 h window) and latency builds up more
slowly than errors, so a few buckets of slack are needed."""

PRE_S = 30 * 60
"""How much normal traffic before an episode the root-cause analysis gets as its baseline."""

POST_S = 10 * 60
"""How much traffic after an episode's last anomaly the root-cause analysis sees (its recovery)."""

MARGIN_S = 5 * 60
"""Gap kept between a sub-window and a neighbouring incident at the same symptom."""

SAME_ONSET_S = 5 * 60
"""Two groups whose root-cause onsets at the same symptom are this close are one incident."""

MAX_ONSET_DRIFT_S = 20 * 60
"""The root-cause onset must lie this close to the group's anomalies: otherwise the symptom's
significant episode in the sub-window is something else, not this group."""

CONTIGUOUS_S = 10 * 60
"""A finding at the same symptom with the same culprit that starts this soon after another ends
continues it."""

SECOND_PASS_MIN_S = 45 * 60
"""After the first pass, stretches of at least this length outside the incidents found are searched
again (a series reports one latency episode per window; a second one hours later would be hidden)."""

MIN_DURATION_S = 180
"""An incident lasts at least this long (at the entry's anomaly and in the root-cause episode): a burst of
a few seconds -- a handful of failed requests that happen to be close together -- is not one."""

MIN_EXCESS_RATE = 0.02
"""...and spoils at least this share of the symptom's requests more than its baseline did (2 percentage
points of failed or slow requests): a statistically significant but tiny shift on a busy service is not
what an incident list is for (``analyze anomalies`` lists it)."""

MIN_LATENCY_RATIO = 1.25
"""A latency anomaly hurts when its percentile is at least this multiple of its baseline (+25 %)."""

GATEWAY_RE = re.compile(r"gateway|ingress", re.IGNORECASE)

INCIDENT_FIELDS = ["rank", "onset", "end", "services", "symptom", "symptoms", "root_cause", "change", "summary",
                   "severity", "kind", "signature", "confidence", "requests_affected", "anomalies"]


@dataclass
class IncidentReport:
    """What :func:`find_incidents` found: the incidents (most severe first) and the background anomalies."""

    window: Window
    items: list[dict[str, Any]] = field(default_factory=list)
    background: list[dict[str, Any]] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        """The ``--json`` array: the incidents, most severe first (see :data:`INCIDENT_FIELDS`)."""
        return self.items

    def table(self) -> pd.DataFrame:
        """One row per incident (for notebooks): rank, onset, end, symptom, root cause, change, summary."""
        rows = [{"rank": i["rank"], "onset": i["onset"], "end": i["end"], "symptom": i["symptom"],
                 "root_cause": (i["root_cause"] or {}).get("target"),
                 "change": (i["change"] or {}).get("target"),
                 "actor": (i["change"] or {}).get("actor"), "severity": i["severity"], "summary": i["summary"]}
                for i in self.items]
        return pd.DataFrame(rows, columns=["rank", "onset", "end", "symptom", "root_cause", "change", "actor",
                                           "severity", "summary"])


# ------------------------------------------------------------------------------------------------
# Call graph: adjacency and entry services
# ------------------------------------------------------------------------------------------------


def _edges(store: Store, window: Window) -> pd.DataFrame:
    """Caller -> callee pairs of the window with their request counts: every record naming its client
    workload (a client sidecar's, or a server's that logs its client) -- one scan, no pairing of records
    (the full hop table of :mod:`~meshlens.analysis.graph` costs as much as the anomalies themselves, and
    only who calls whom is needed here)."""
    return store.query(
        f"""SELECT src_workload AS caller, dst_service AS callee, sum(coalesce(sample_weight, 1.0)) AS requests
            FROM events WHERE {TRAFFIC_SQL} AND src_workload IS NOT NULL AND src_workload <> dst_service
            GROUP BY ALL""", {"lo": window.lo_ns, "hi": window.hi_ns})


def entry_services(edges: pd.DataFrame) -> list[str]:
    """Services where users see the mesh: those called by an ingress gateway (a root caller -- one never
    called itself -- named like a gateway/ingress); without one, those called by any root caller."""
    if edges.empty:
        return []
    callees = set(edges["callee"])
    roots = sorted(set(edges["caller"]) - callees)
    ingress = [r for r in roots if GATEWAY_RE.search(str(r))]
    chosen = ingress or roots
    return sorted(set(edges.loc[edges["caller"].isin(chosen), "callee"]) - set(chosen))


# ------------------------------------------------------------------------------------------------
# Grouping
# ------------------------------------------------------------------------------------------------


def _services_of(row: Any) -> list[str]:
    if row.scope == "edge":
        return [s for s in str(row.target).split("->", 1) if s]
    if row.scope == "service":
        return [str(row.target)]
    return []


def _groups(anoms: pd.DataFrame, neighbours: dict[str, set[str]]) -> list[list[int]]:
    """Groups (row positions) of service/edge anomalies, strongest first: each anomaly joins the first
    group whose *leader* (its strongest anomaly) started within :data:`LINK_S` of it and that holds the
    same or an adjacent service; else it leads a group of its own. Anchoring time at the leader keeps a
    busy window from chaining anomalies an hour apart into one group through the ones in between."""
    groups: list[tuple[int, set[str], list[int]]] = []  # (leader onset, services, rows)
    order = sorted(range(len(anoms)), key=lambda i: -float(anoms["score"].iat[i]))
    for i in order:
        r = anoms.iloc[i]
        if r["scope"] not in ("service", "edge"):
            continue
        si = set(_services_of(r))
        near = si | {n for x in si for n in neighbours.get(x, ())}
        t = int(r["onset"].value)
        home = next((g for g in groups if abs(g[0] - t) <= LINK_S * NS and g[1] & near), None)
        if home is None:
            groups.append((t, set(si), [i]))
        else:
            home[1].update(si)
            home[2].append(i)
    return sorted((sorted(g[2]) for g in groups), key=lambda g: min(int(anoms["onset"].iat[i].value) for i in g))


@dataclass
class _Group:
    rows: list[int]
    symptom: str
    onset_ns: int
    end_ns: int
    score: float
    services: list[str]
    covered: bool = False  # reaches users through an entry anomaly that started earlier (see _candidate_groups)


def _entry_of(scope: str, target: str) -> str:
    return str(target) if scope == "service" else str(target).split("->")[-1]


def _hurts(r: Any) -> bool:
    """Whether an anomaly is requests being hurt: failures or latency (not a change in how many requests
    arrive -- demand -- nor a categorical finding), lasting :data:`MIN_DURATION_S` or more, by a margin
    that matters whatever the traffic volume (a significance score grows with the number of requests; an
    effect size does not): a failure ratio :data:`MIN_EXCESS_RATE` above its baseline, a latency
    percentile :data:`MIN_LATENCY_RATIO` times its baseline."""
    if r.kind != "metric" or r.metric == "requests" or int(r.end.value) - int(r.onset.value) < MIN_DURATION_S * NS:
        return False
    if r.metric in ("p50_ms", "p99_ms"):
        return bool(r.observed >= MIN_LATENCY_RATIO * r.baseline)
    return bool(r.observed - r.baseline >= MIN_EXCESS_RATE)


def _upstream(edges: pd.DataFrame) -> dict[str, set[str]]:
    """Service -> every service that (transitively) calls it."""
    callers: dict[str, set[str]] = {}
    for a, b in zip(edges["caller"], edges["callee"], strict=True):
        callers.setdefault(str(b), set()).add(str(a))
    out: dict[str, set[str]] = {}
    for svc in callers:
        seen, todo = set(), [svc]
        while todo:
            for c in callers.get(todo.pop(), ()):
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        out[svc] = seen
    return out


def _candidate_groups(anoms: pd.DataFrame, edges: pd.DataFrame, entries: list[str]) -> tuple[list[_Group], set[int]]:
    """Groups that reach an entry service (with their symptom), and the rows of those that do not.

    A group reaches users when it holds an anomaly of an entry service (or of an edge into one) -- or,
    *covered*, when an entry service that calls its services (transitively) is in an anomaly that started
    before the group and is still going on at its onset: one long anomaly of the entry can span two
    incidents of its callees (a failure count's best interval merges two episodes with a short quiet gap
    between them), and the second one must not be lost for want of an onset of its own at the entry."""
    neighbours: dict[str, set[str]] = {}
    for a, b in zip(edges["caller"], edges["callee"], strict=True):
        neighbours.setdefault(str(a), set()).add(str(b))
        neighbours.setdefault(str(b), set()).add(str(a))
    entry_set = set(entries)
    upstream = _upstream(edges)
    entry_rows = [r for r in anoms.itertuples(index=False) if r.scope in ("service", "edge")
                  and _entry_of(r.scope, r.target) in entry_set and _hurts(r)]
    found, background = [], set()
    for g in _groups(anoms, neighbours):
        sub = anoms.iloc[g]
        services = list(dict.fromkeys(s for r in sub.itertuples(index=False) for s in _services_of(r)))
        at_entry: dict[str, float] = {}
        for r in sub.itertuples(index=False):
            svc = _entry_of(r.scope, r.target)
            if svc in entry_set and _hurts(r):
                at_entry[svc] = max(at_entry.get(svc, 0.0), float(r.score))
        onset = int(sub["onset"].min().value)
        covered = False
        if at_entry:
            onset = int(min(r.onset.value for r in sub.itertuples(index=False)
                            if _entry_of(r.scope, r.target) in entry_set and _hurts(r)))
        elif any(_hurts(r) for r in sub.itertuples(index=False)):
            callers = set().union(*(upstream.get(x, set()) for x in services)) if services else set()
            for r in entry_rows:
                e = _entry_of(r.scope, r.target)
                if e in callers and int(r.onset.value) <= onset <= int(r.end.value):
                    at_entry[e] = max(at_entry.get(e, 0.0), float(r.score))
            covered = bool(at_entry)
        if not at_entry:
            background.update(g)
            continue
        symptom = max(at_entry, key=lambda x: (at_entry[x], x))
        found.append(_Group(rows=g, symptom=symptom, onset_ns=onset, end_ns=int(sub["end"].max().value),
                            score=float(sub["score"].sum()), services=services, covered=covered))
    return found, background


# ------------------------------------------------------------------------------------------------
# Per incident: root cause and change on its own onset
# ------------------------------------------------------------------------------------------------


def _sub_window(g: _Group, prev_end_ns: int | None, next_onset_ns: int | None, window: Window) -> Window:
    """The symptom's traffic around this group only: from :data:`PRE_S` before its onset (not before the
    previous incident at the same symptom ended) to :data:`POST_S` after its end (not past the next
    group's onset there); at least 10 minutes either side of the onset."""
    ten = 10 * 60 * NS
    lo = max(window.lo_ns, g.onset_ns - PRE_S * NS)
    if prev_end_ns is not None:
        lo = max(lo, min(prev_end_ns + MARGIN_S * NS, g.onset_ns - ten))
    hi = min(window.hi_ns, g.end_ns + POST_S * NS)
    if next_onset_ns is not None:
        hi = min(hi, max(next_onset_ns - MARGIN_S * NS, g.onset_ns + ten))
    return Window(lo, max(hi, min(window.hi_ns, lo + 2 * ten)))


def _excess(onset: Any) -> float:
    """Estimated excess bad symptom requests during the episode (failed or slow)."""
    return max(0.0, (onset.bad_incident - onset.bad_baseline)) * onset.requests_incident


def _kind(onset: Any, signature: dict[str, float]) -> tuple[str, str | None]:
    names = {"authz": "authorization denials", "tls": "TLS failures", "route": "no route/cluster",
             "ratelimit": "rate limiting", "unavailable": "unreachable upstream", "timeout": "timeouts",
             "app": "application errors", "latency": "slowness"}
    top = max(signature.items(), key=lambda kv: kv[1], default=(None, 0.0))
    return onset.signal, (names.get(top[0], top[0]) if top[0] and top[1] > 0 else None)


def _episode_ok(onset: Any, g: _Group) -> bool:
    """Whether the symptom's episode in the sub-window is this group's (close to its anomalies) and big
    enough to be an incident (:data:`MIN_DURATION_S`, :data:`MIN_EXCESS_RATE`)."""
    drift = min(abs(onset.onset_ns - g.onset_ns), max(0, onset.onset_ns - g.end_ns))
    if drift > (LINK_S if g.covered else MAX_ONSET_DRIFT_S) * NS:
        return False
    return (onset.end_ns - onset.onset_ns >= MIN_DURATION_S * NS
            and onset.bad_incident - onset.bad_baseline >= MIN_EXCESS_RATE)


class _Symptoms:
    """Each symptom service's records over the whole window, materialized once on first use
    (:data:`~meshlens.analysis.rootcause.SYMPTOM_RECORDS_SQL`): every sub-window session of that service
    (several per incident: onset attempts, the analysis, the second pass) reads them instead of scanning
    all the events again. Temp tables, dropped by :meth:`close`."""

    def __init__(self, store: Store, window: Window) -> None:
        self.store, self.window = store, window
        self.tables: dict[str, str] = {}

    def records(self, service: str) -> str:
        if service not in self.tables:
            name = temp_name("symrec")
            self.store.con.execute(f"CREATE TEMP TABLE {name} AS {SYMPTOM_RECORDS_SQL}",
                                   {"lo": self.window.lo_ns, "hi": self.window.hi_ns, "svc": service})
            self.tables[service] = name
        return self.tables[service]

    def close(self) -> None:
        for name in self.tables.values():
            with suppress(duckdb.Error):
                self.store.con.execute(f"DROP TABLE IF EXISTS {name}")
        self.tables.clear()


class _Episode:
    """The symptom's episode in ``sub`` (``onset``) if it is this group's incident, else ``onset`` None: the
    onset detection of the root-cause analysis alone (:func:`~meshlens.analysis.rootcause.session_onset`,
    a fraction of the whole analysis), so that groups that are no incident -- and sub-window bounds still
    being settled -- cost little. Its session stays open until :meth:`close`: the attempt that is kept is
    analysed on it (:func:`_analyze_group`) without building the symptom's requests or detecting the
    onset again."""

    def __init__(self, store: Store, g: _Group, sub: Window, symptoms: _Symptoms) -> None:
        self._cm = session(store, g.symptom, sub.lo_ns, sub.hi_ns, records=symptoms.records(g.symptom))
        self.sess: Session = self._cm.__enter__()
        try:
            self.prepared = session_onset(self.sess)
        except BaseException:
            self.close()
            raise
        onset = self.prepared[0]
        self.onset = onset if onset is not None and _episode_ok(onset, g) else None

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def _analyze_group(ep: _Episode, g: _Group, sub: Window, full: Window, lookback: str) -> dict[str, Any] | None:
    sess = ep.sess
    rc = analyze_session(sess, prepared=ep.prepared)
    if rc.onset is None or not _episode_ok(rc.onset, g):
        return None
    ch = correlate_session(sess, lookback=lookback, report=rc)
    rc_items = rc.to_json()
    ch_items = ch.to_json()
    top_change = ch_items[0] if ch_items and (ch_items[0].get("score") or 0) >= LIKELY else None
    onset = rc.onset
    ongoing = onset.ongoing and sub.hi_ns >= full.hi_ns
    end_ns = None if ongoing else (onset.end_ns if not onset.ongoing else g.end_ns)
    signal, signature = _kind(onset, rc.signature)
    return {"onset_ns": onset.onset_ns, "end_ns": end_ns, "symptom": g.symptom,
            "root_cause": rc_items[0] if rc_items else None, "change": top_change,
            "severity": round(_excess(onset), 1), "kind": signal, "signature": signature,
            "confidence": rc_items[0]["score"] if rc_items else None,
            "requests_affected": int(round(_excess(onset))),
            "bad_before": onset.bad_baseline, "bad_during": onset.bad_incident,
            "rc_report": rc}


def _summary(item: dict[str, Any]) -> str:
    """One sentence: what, where, since when, likely cause, who changed what."""
    what = {"errors": "errors", "latency": "slow requests", "errors and latency": "errors and slow requests"}.get(
        item["kind"], item["kind"])
    since = item["onset"]
    until = f" until {item['end']}" if item["end"] else " (ongoing)"
    bad = f" (bad requests {pct(item['bad_before'])} -> {pct(item['bad_during'])})"
    others = [x for x in item.get("symptoms", []) if x != item["symptom"]]
    where = item["symptom"] + (f" (also {', '.join(others)})" if others else "")
    text = f"{what.capitalize()} at {where} from {since}{until}{bad}"
    rc = item["root_cause"]
    if rc:
        sig = f" ({item['signature']})" if item.get("signature") else ""
        text += f"; likely cause: {rc['kind']} {rc['target']}{sig}"
    else:
        text += "; no service or edge explains it"
    ch = item["change"]
    if ch:
        text += (f"; {ch['verb']} {ch['target']} by {ch['actor']} at {ts_text(pd.Timestamp(ch['ts']).value)} "
                 f"(change score {ch['score']:.2f})")
    else:
        text += "; no config change explains it"
    return text + "."


def _compact(anoms: pd.DataFrame, rows: list[int]) -> list[dict[str, Any]]:
    sub = anoms.iloc[sorted(rows, key=lambda i: -float(anoms["score"].iat[i]))]
    return [{"scope": r.scope, "target": r.target, "metric": r.metric, "direction": r.direction,
             "onset": ts_text(int(r.onset.value)), "score": float(r.score)} for r in sub.itertuples(index=False)]


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _home(g: _Group, found: list[dict[str, Any]], hi: int) -> dict[str, Any] | None:
    """The incident found at ``g``'s symptom whose span holds ``g``'s onset, if any."""
    return next((f for f in found if f["symptom"] == g.symptom
                 and f["onset_ns"] - SAME_ONSET_S * NS <= g.onset_ns <= (f["end_ns"] or hi)), None)


def _pass(store: Store, window: Window, lo: int, hi: int, entries: list[str], edges: pd.DataFrame,
          lookback: str, options: dict[str, Any],
          symptoms: _Symptoms, anoms: pd.DataFrame | None = None
          ) -> tuple[list[dict[str, Any]], pd.DataFrame, set[int]]:
    if anoms is None:
        anoms = detect_anomalies(store, lo, hi, **options)
    groups, background = _candidate_groups(anoms, edges, entries)
    found: list[dict[str, Any]] = []
    rejected: list[_Group] = []
    # per symptom in time order: each sub-window starts after the previous incident's (root-cause) end
    for symptom in sorted({g.symptom for g in groups}):
        mine = sorted((g for g in groups if g.symptom == symptom), key=lambda g: g.onset_ns)
        prev_end: int | None = None
        absorbed: set[int] = set()
        for k, g in enumerate(mine):
            if k in absorbed:
                continue
            if _home(g, found, hi) is not None:
                rejected.append(g)  # inside an incident already explained at this symptom: part of it
                continue
            # the next group at this symptom bounds this one's analysis; when the episode is still going
            # on at that bound, the next group is part of it: absorb it and look again up to the one after
            later = [j for j in range(k + 1, len(mine)) if mine[j].onset_ns > g.onset_ns + SAME_ONSET_S * NS]
            taken: list[int] = []
            ep: _Episode | None = None
            try:
                for _attempt in range(8):
                    nxt = mine[later[0]].onset_ns if later else None
                    sub = _sub_window(g, prev_end, nxt, Window(lo, hi))
                    if ep is not None:
                        ep.close()
                        ep = None
                    ep = _Episode(store, g, sub, symptoms)
                    onset = ep.onset
                    if onset is None or nxt is None or not onset.ongoing:
                        break
                    # still going on at the bound: the group there is part of this episode; try the next one
                    taken.append(later.pop(0))
                res = _analyze_group(ep, g, sub, window, lookback) if ep is not None and onset is not None else None
            finally:
                if ep is not None:
                    ep.close()
            if res is None:
                rejected.append(g)
                continue
            absorbed.update(taken)
            rows = list(g.rows) + [i for j in taken for i in mine[j].rows]
            services = list(dict.fromkeys(g.services + [x for j in taken for x in mine[j].services if not mine[j].covered]))
            res.update(rows=rows, services=services, anoms=anoms, covered=g.covered)
            found.append(res)
            prev_end = res["end_ns"] or hi
    for g in sorted(rejected, key=lambda x: x.onset_ns):
        # a group inside an incident's span at the same symptom is part of it (a later symptom of the same
        # episode: latency building up during a surge...); one starting right after an incident's end
        # (its analysis was bounded by this group's onset) continues it; anything else is background
        home = _home(g, found, hi)
        if home is None:
            home = next((f for f in found if f["symptom"] == g.symptom and f["end_ns"] is not None
                         and 0 <= g.onset_ns - f["end_ns"] <= CONTIGUOUS_S * NS), None)
            if home is not None:
                later = [f["onset_ns"] for f in found if f["symptom"] == g.symptom and f["onset_ns"] > g.onset_ns]
                home["end_ns"] = max(home["end_ns"], min([g.end_ns, *later]))
        if home is not None:
            home["rows"] = home["rows"] + [i for i in g.rows if i not in home["rows"]]
        else:
            background.update(g.rows)
    return found, anoms, background


def _culprit(f: dict[str, Any]) -> str | None:
    rc = f.get("root_cause")
    return str(rc["target"]).split("->")[-1] if rc else None


def _same_episode(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two findings are one incident when their onsets coincide and they are at the same symptom, or
    blame the same service or the same change (one failure seen at two entry services) -- or when one
    continues the other: same symptom, same culprit, starting within :data:`CONTIGUOUS_S` of its end (an
    analysis bounded by a later group's onset cuts an episode in two)."""
    first, second = sorted((a, b), key=lambda f: f["onset_ns"])
    if (first["symptom"] == second["symptom"] and _culprit(first) is not None and _culprit(first) == _culprit(second)
            and first["end_ns"] is not None and second["onset_ns"] - first["end_ns"] <= CONTIGUOUS_S * NS):
        return True
    if abs(a["onset_ns"] - b["onset_ns"]) > SAME_ONSET_S * NS:
        return False
    if a["symptom"] == b["symptom"]:
        return True
    same_cause = _culprit(a) is not None and _culprit(a) == _culprit(b)
    same_change = bool(a.get("change") and b.get("change") and a["change"]["target"] == b["change"]["target"])
    return same_cause or same_change


def _merge(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Findings of one episode are one incident: the most severe one's symptom and analysis are kept,
    the others' entry services are listed under ``symptoms`` and their services added."""
    out: list[dict[str, Any]] = []
    for f in sorted(found, key=lambda x: -x["severity"]):
        twin = next((o for o in out if _same_episode(o, f)), None)
        if twin is None:
            f.setdefault("symptoms", [f["symptom"]])
            out.append(f)
            continue
        if f["symptom"] not in twin["symptoms"]:
            twin["symptoms"].append(f["symptom"])
        if f["onset_ns"] < twin["onset_ns"]:  # a continuation: the incident starts at the earlier part
            twin["onset_ns"] = f["onset_ns"]
            twin["change"] = twin["change"] or f["change"]
        if twin["end_ns"] is not None and (f["end_ns"] is None or f["end_ns"] > twin["end_ns"]):
            twin["end_ns"] = f["end_ns"]
        if not f.get("covered"):
            twin["services"] = list(dict.fromkeys(twin["services"] + f["services"]))
        twin.setdefault("extra", []).append(f)
    return out


def find_incidents(store: Store, start: Any = None, end: Any = None, *, lookback: str = "2h",
                   entries: list[str] | None = None, second_pass: bool = True,
                   anomalies: pd.DataFrame | None = None, edges: pd.DataFrame | None = None,
                   **options: Any) -> IncidentReport:
    """The incidents of ``[start, end)``, most severe first, and the anomalies that never reached users.

    ``lookback``: how long before an incident's sub-window config changes are candidates (as ``analyze
    changes``); ``entries``: the services where users see the mesh (default: those the ingress gateway
    calls, see :func:`entry_services`); ``second_pass``: search the stretches outside the incidents found
    again (see :data:`SECOND_PASS_MIN_S`); other ``options`` go to
    :func:`~meshlens.analysis.anomalies.detect_anomalies` (``bucket_s``, ``baseline``, ``reference``...).
    ``anomalies`` / ``edges``: the window's anomalies and caller -> callee pairs computed elsewhere -- from a
    backend's aggregates (:mod:`meshlens.investigate`), when the store holds only slices of the window's
    records -- instead of from the store; the second pass is then skipped (it re-detects on the store).
    """
    window = resolve_window(store, start, end)
    symptoms = _Symptoms(store, window)
    try:
        return _find(store, window, symptoms, lookback=lookback, entries=entries, second_pass=second_pass,
                     options=options, anomalies=anomalies, edges=edges)
    finally:
        symptoms.close()


def _find(store: Store, window: Window, symptoms: _Symptoms, *, lookback: str, entries: list[str] | None,
          second_pass: bool, options: dict[str, Any], anomalies: pd.DataFrame | None = None,
          edges: pd.DataFrame | None = None) -> IncidentReport:
    if edges is None:
        edges = _edges(store, window)
    if anomalies is not None:
        second_pass = False
    entry_list = sorted(entries) if entries else entry_services(edges)
    options = {k: v for k, v in options.items() if v is not None}
    found, anoms, bg_rows = _pass(store, window, window.lo_ns, window.hi_ns, entry_list, edges, lookback, options,
                                  symptoms, anoms=anomalies)
    backgrounds = [(anoms, bg_rows)]
    # a series reports one latency episode: only when one was taken by an incident can another hide
    if second_pass and any("latency" in f["kind"] for f in found):
        # stretches free of the incidents found: a series' second latency episode hides behind its first
        spans = sorted((f["onset_ns"], f["end_ns"] or window.hi_ns) for f in found)
        cursor, gaps = window.lo_ns, []
        for a, b in spans:
            if a - cursor >= SECOND_PASS_MIN_S * NS:
                gaps.append((cursor, a - MARGIN_S * NS))
            cursor = max(cursor, b + MARGIN_S * NS)
        if window.hi_ns - cursor >= SECOND_PASS_MIN_S * NS:
            gaps.append((cursor, window.hi_ns))
        for lo, hi in gaps:
            # metric anomalies only: the categorical ones (new edges, callers...) were all seen in the first pass
            more, _, _ = _pass(store, window, lo, hi, entry_list, edges, lookback, {**options, "categorical": False},
                               symptoms)
            # only what the first pass did not already report (same symptom, same onset)
            more = [m for m in more if not any(m["symptom"] == f["symptom"] and abs(m["onset_ns"] - f["onset_ns"])
                                               <= SAME_ONSET_S * NS for f in found)]
            found += more  # (its background anomalies are artefacts of the shorter baseline: not kept)
    incidents = _merge(found)
    incidents.sort(key=lambda x: (-x["severity"], x["onset_ns"]))
    items = []
    claimed: list[tuple[int, int, set[str]]] = []
    for rank, f in enumerate(incidents, 1):
        rc = f["root_cause"]
        services = list(dict.fromkeys([*f["symptoms"], *f["services"],
                                       *([s for s in str(rc["target"]).split("->")] if rc else [])]))
        item = {"rank": rank, "onset": ts_text(f["onset_ns"]), "end": ts_text(f["end_ns"]) if f["end_ns"] else None,
                "services": services, "symptom": f["symptom"], "symptoms": f["symptoms"], "root_cause": rc,
                "change": f["change"],
                "severity": f["severity"], "kind": f["kind"], "signature": f["signature"],
                "confidence": f["confidence"], "requests_affected": f["requests_affected"],
                "bad_before": round(f["bad_before"], 4), "bad_during": round(f["bad_during"], 4),
                "anomalies": sorted([a for x in [f, *f.get("extra", [])] for a in _compact(x["anoms"], x["rows"])],
                                    key=lambda a: -a["score"])}
        item["summary"] = _summary(item)
        items.append(item)
        claimed.append((f["onset_ns"], f["end_ns"] or window.hi_ns, set(services)))
    background: list[dict[str, Any]] = []
    for df, rows in backgrounds:
        if df.empty:
            continue
        keep = []
        # the rows of groups that are no incident, and mesh-wide anomalies -- unless they coincide with an
        # incident on its services (e.g. found by the second pass) or, mesh-wide, in time
        for i, r in enumerate(df.itertuples(index=False)):
            if r.scope in ("service", "edge") and i not in rows:
                continue
            t = int(r.onset.value)
            svcs = set(_services_of(r))
            inside = any(a - LINK_S * NS <= t <= b and (not svcs or svcs & s) for a, b, s in claimed)
            if not inside:
                keep.append(i)
        background += anomalies_json(df.iloc[sorted(set(keep))])
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for a in background:  # a stretch searched twice reports its background anomalies twice
        key = (a["scope"], a["target"], a["metric"], a["direction"], a["onset"])
        if key not in seen:
            seen.add(key)
            unique.append(a)
    background = unique
    background.sort(key=lambda a: -(a.get("score") or 0))
    for rank, a in enumerate(background, 1):
        a["rank"] = rank
    return IncidentReport(window=window, items=items, background=background, entries=entry_list)


def incidents_json(report: IncidentReport) -> list[dict[str, Any]]:
    """The ``--json`` array of :func:`find_incidents`."""
    return report.to_json()


