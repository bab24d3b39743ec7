"""Multi-incident windows: the evaluation set of :mod:`meshlens.analysis.incidents`.

One window holds 2-3 incidents of different kinds hours apart -- some caused by a config change (with
decoy changes near its onset), some not (a slow node, a node down, an external dependency failing, an
expired client certificate, a traffic surge) -- plus a *loud unrelated service*: an error burst on a
service whose errors cannot reach any entry service (every call into it is optional, so its callers
absorb them). Sometimes the burst coincides with an incident's onset, sometimes it sits alone between
two incidents; sometimes the last incident is still ongoing at the end of the window; sometimes a later
incident strikes the same service as an earlier one (a second incident of one service hours later).

Composition only: each window is an ordinary :class:`~meshlens.simulate.model.Scenario` with several
:class:`~meshlens.simulate.model.IncidentSpec` (the planner and engine already support that), checked
with the planner before use (a random choice that the planner cannot host is replaced, deterministically).
"""

from __future__ import annotations

import random
from dataclasses import replace

from meshlens.errors import ConfigError
from meshlens.simulate.cluster import Cluster
from meshlens.simulate.model import IncidentSpec, NoisySpec, Scenario, parse_ts
from meshlens.simulate.plan import Planner
from meshlens.simulate.scenarios import EVAL_CASES
from meshlens.simulate.topology import Topology, get_topology

_TOPOLOGIES = ("shop", "bank", "streaming", "random")
_FORMATS = ("text", "json", "mixed")
_ACTORS = ("alice", "argocd", "helm", "bob")


def unreachable_services(topo: Topology) -> list[str]:
    """Istio services whose errors reach no entry service: not an entry, not on any critical chain from one
    (gateway routes and workers), yet called by something -- the right place for a loud unrelated service."""
    entries = set(topo.entry_services())
    critical: set[str] = set()
    for e in entries:
        critical |= set(topo.entry_reach(e, critical_only=True))
    called = {b for _a, b, _c in topo.edges()}
    return sorted(s for s, svc in topo.services.items()
                  if topo.mesh_of(s) == "istio" and not svc.worker and s not in entries and s not in critical
                  and s in called)


def _plan(sc: Scenario) -> object:
    topo = get_topology(sc.topology, linkerd=sc.linkerd, seed=sc.seed)
    start = parse_ts(sc.start)
    return Planner(sc, topo, Cluster(topo, sc.seed, start), start, start + int(sc.duration_s * 1e6)).plan()


def _window(i: int, seed: int, duration_s: float, entry_rate: float, topology: str) -> Scenario:
    """Window ``i``'s scenario before feasibility checks (see the module docstring)."""
    rng = random.Random(f"window:{seed}")
    n = 2 + (i % 2)  # 2 or 3 incidents
    kinds: list[tuple[str, str]] = []
    offset = (i * 5) % len(EVAL_CASES)
    for k in range(len(EVAL_CASES)):
        kind, variant = EVAL_CASES[(offset + k * 3) % len(EVAL_CASES)]
        if all(kind != c[0] for c in kinds):
            kinds.append((kind, variant))
        if len(kinds) == n:
            break
    # onsets spread over the window, hours apart: slots of duration/(n+1) with a little jitter
    slot = duration_s / (n + 0.6)
    incidents = []
    for k, (kind, variant) in enumerate(kinds):
        onset = slot * (k + 0.5) + rng.uniform(-0.1, 0.1) * slot
        ongoing = k == n - 1 and i % 4 == 3
        incidents.append(IncidentSpec(kind=kind, variant=variant, actor=_ACTORS[(i + k) % len(_ACTORS)],
                                      onset_s=round(onset), duration_s=None if ongoing else
                                      round(rng.uniform(18, 35) * 60), decoys=3))
    # the loud unrelated service: a burst at an incident's onset, or alone between two incidents
    if i % 2 == 0:
        burst_start = incidents[0].onset_s - rng.uniform(3, 10) * 60
    else:
        burst_start = (incidents[0].onset_s + incidents[1].onset_s) / 2
    noisy = NoisySpec(mode="burst", error_rate=round(rng.uniform(0.3, 0.5), 2), start_s=round(burst_start),
                      duration_s=round(rng.uniform(15, 30) * 60))
    return Scenario(
        name=f"window-{i:02d}-" + "-".join(k for k, _ in kinds), seed=seed, topology=topology,
        linkerd=(i % 3 == 0), start=f"2024-06-{1 + i % 28:02d}T{i % 12:02d}:00:00Z", duration_s=duration_s,
        entry_rate=entry_rate, diurnal_amplitude=0.3, istio_format=_FORMATS[i % len(_FORMATS)],
        details_style="pipe" if i % 2 else "comma", background_error_rate=0.002, incidents=incidents,
        noisy=noisy, benign_changes_per_hour=1.5, read_only_per_hour=8.0, health_check_period_s=300.0)


def _with_noisy_service(sc: Scenario) -> Scenario | None:
    """Pin the loud service to one whose errors reach no entry service (None: the topology has none
    outside the incidents' paths)."""
    topo = get_topology(sc.topology, linkerd=sc.linkerd, seed=sc.seed)
    plan = _plan(replace(sc, noisy=None))
    busy = set()
    for inc in plan.incidents:  # type: ignore[attr-defined]
        busy |= set(inc.path) | {inc.target, inc.caller or ""} | {x for e in inc.affected_edges for x in e.split("->")}
    cands = [s for s in unreachable_services(topo) if s not in busy]
    if not cands:
        return None
    assert sc.noisy is not None
    return replace(sc, noisy=replace(sc.noisy, service=random.Random(sc.seed).choice(cands)))


def _repeat_target(sc: Scenario) -> Scenario:
    """Make the last incident strike the first one's root-cause service again (hours later), when the
    planner can host that; else leave the window as it is."""
    plan = _plan(replace(sc, noisy=None))
    first = plan.incidents[0]  # type: ignore[attr-defined]
    incs = list(sc.incidents)
    incs[-1] = replace(incs[-1], target=first.target, symptom=first.symptom)
    cand = replace(sc, incidents=incs)
    try:
        _plan(replace(cand, noisy=None))
    except ConfigError:
        return sc
    return cand


def incident_windows(n: int = 9, *, duration_s: float = 5 * 3600.0, entry_rate: float = 0.6,
                     base_seed: int = 500) -> list[Scenario]:
    """``n`` multi-incident windows with known answers (see the module docstring); deterministic."""
    out: list[Scenario] = []
    for i in range(n):
        for attempt in range(30):
            seed = base_seed + i + 1000 * attempt
            topology = _TOPOLOGIES[(i + attempt) % len(_TOPOLOGIES)]
            if topology == "random":
                topology = f"random-{seed}"
            sc = _window(i, seed, duration_s, entry_rate, topology)
            try:
                if i % 3 == 2:
                    sc = _repeat_target(sc)
                pinned = _with_noisy_service(sc)
                if pinned is None:
                    continue
                _plan(pinned)
            except ConfigError:
                continue
            out.append(pinned)
            break
        else:
            raise ConfigError(f"no topology could host incident window {i}")
    return out


ONSET_TOLERANCE_S = 300.0
"""An incident counts as found when a reported one starts within this of the true onset."""


def _ts_s(value: str | None) -> float | None:
    return None if value is None else parse_ts(value.replace("+00:00", "Z") if "Z" not in value else value) / 1e6


def score_window(items: list[dict], truth: dict) -> dict:
    """Compare ``analyze incidents`` items with a window's ground truth (``GroundTruth.to_dict()``).

    Per true incident: *found* when a reported incident starts within :data:`ONSET_TOLERANCE_S` of its
    onset and its root cause is one of the accepted answers (the service or an affected edge); *change
    right* when, for an incident caused by a change, that incident's change is the cause (one of its
    accepted targets), and for one without a cause, it has no change. Reported incidents that match no
    true incident (none starts within the tolerance, nor is the report inside a true incident's span)
    are *spurious*. Returns counts and one line per miss.
    """
    reported = [(i, _ts_s(i["onset"])) for i in items]
    used: set[int] = set()
    found = change_ok = 0
    misses: list[str] = []
    for inc in truth["incidents"]:
        t0 = _ts_s(inc["onset"]) or 0.0
        best = min((k for k in range(len(reported)) if k not in used),
                   key=lambda k: abs((reported[k][1] or 0) - t0), default=None)
        item = reported[best][0] if best is not None else None
        near = item is not None and abs((reported[best][1] or 0) - t0) <= ONSET_TOLERANCE_S  # type: ignore[index]
        if near:
            used.add(best)  # type: ignore[arg-type]
        rc = ((item or {}).get("root_cause") or {}).get("target") if near else None
        ok = near and rc in inc["accepted_root_causes"]
        found += ok
        ch = ((item or {}).get("change") or {}).get("target") if near else None
        cause = inc["change"]
        c_ok = near and ((cause is None and ch is None) or (cause is not None and ch in cause["accepted_targets"]))
        change_ok += c_ok
        if not (ok and c_ok):
            misses.append(f"{inc['kind']}/{inc['variant']} at {inc['onset'][:19]} (truth {inc['root_cause_service']}, "
                          f"change {cause['target'] if cause else None}): reported "
                          + (f"{item['onset']} root cause {rc}, change {ch}" if near and item else
                             "nothing within 5 min"))
    spans = [(_ts_s(i["onset"]) or 0.0, _ts_s(i["end"]) or float("inf")) for i in truth["incidents"]]
    spurious = []
    for k, (item, t) in enumerate(reported):
        if k in used:
            continue
        inside = any(a - ONSET_TOLERANCE_S <= (t or 0) <= b for a, b in spans)
        if not inside:
            spurious.append(item)
            misses.append(f"spurious incident at {item['onset']}: symptom {item['symptom']}, root cause "
                          f"{(item.get('root_cause') or {}).get('target')}")
    return {"incidents": len(truth["incidents"]), "found": found, "change_ok": change_ok,
            "spurious": len(spurious), "misses": misses}
