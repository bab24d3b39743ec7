"""Turn a :class:`Scenario` into a concrete plan: incident targets and symptoms, the changes that
cause them, decoy and benign changes, and the noisy service.

Choices are made so that the ground truth is unambiguous:

* an error incident's target is reached from its symptom (an entry service) through *critical* calls
  only, so its failures really reach the users, and for a sizeable share of the symptom's requests;
* decoys and benign changes never touch the root cause or any service on the symptom -> target path
  from 45 minutes before the onset until the end of the incident;
* the noisy service's errors cannot reach the symptom (it is outside the symptom's critical closure).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from meshlens.errors import ConfigError
from meshlens.simulate import objects as O  # noqa: N812
from meshlens.simulate.audit import Change
from meshlens.simulate.cluster import Cluster, Pod
from meshlens.simulate.model import EXPLICIT_ONLY, VARIANTS, IncidentSpec, NoisySpec, Scenario
from meshlens.simulate.topology import Service, Topology

S = 1_000_000  # microseconds per second

_VARIANT_CHANGE = {
    ("tls_failure", "verify_failed"): True, ("tls_failure", "expired"): False,
    ("latency", "slow_release"): True, ("latency", "slow_config"): True, ("latency", "slow_node"): False,
    ("latency", "starved_caller"): False, ("latency", "minority_route"): False,
    ("rate_limit", "low_limit"): True, ("rate_limit", "surge"): False,
}

_POLICY_SUFFIXES = ["lockdown", "restrict-callers", "deny-legacy", "harden", "zero-trust"]


@dataclass
class Incident:
    """A resolved incident: everything the traffic engine and the ground truth need."""

    id: str
    kind: str
    variant: str
    with_change: bool
    target: str
    symptom: str
    path: list[str]  # symptom ... target (critical call chain; for latency any chain)
    onset_us: int
    end_us: int
    severity: float
    caller: str | None = None
    affected_edges: list[str] = field(default_factory=list)
    root_cause_edge: str | None = None
    policy_name: str | None = None
    route_name: str | None = None
    bad_rs: str | None = None
    bad_pods: set[str] = field(default_factory=set)
    slow_op: str | None = None
    surge: float = 1.0
    limit: float = 1.0
    cause: Change | None = None
    rollback: Change | None = None
    decoys: list[Change] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    signature: dict[str, Any] = field(default_factory=dict)

    def active(self, t_us: int) -> bool:
        return self.onset_us <= t_us < self.end_us


@dataclass
class Noisy:
    service: str
    mode: str
    error_rate: float
    start_us: int
    end_us: int

    def active(self, t_us: int) -> bool:
        return self.start_us <= t_us < self.end_us


@dataclass
class Plan:
    incidents: list[Incident]
    changes: list[Change]
    noisy: Noisy | None


class Planner:
    def __init__(self, scenario: Scenario, topo: Topology, cluster: Cluster, start_us: int, end_us: int) -> None:
        self.sc = scenario
        self.topo = topo
        self.cluster = cluster
        self.start_us = start_us
        self.end_us = end_us
        self.rng = random.Random(f"{scenario.seed}:plan")
        self.changes: list[Change] = []
        self.protected: list[tuple[set[str], int, int]] = []  # (services, from, to) no decoy/benign there
        self.objects: dict[str, dict[str, Any]] = {}  # current state "Kind/ns/name" -> object
        self.helm_rev: dict[str, int] = {}
        self.versions: dict[str, str] = {n: s.version for n, s in topo.services.items()}

    # ------------------------------------------------------------------ incidents
    def plan(self) -> Plan:
        incidents: list[Incident] = []
        used: set[str] = set()
        for i, spec in enumerate(self.sc.incidents, 1):
            inc = self._resolve(i, spec, used)
            used.update(inc.path)
            incidents.append(inc)
            self.protected.append((set(inc.path) | {inc.target} | ({inc.caller} if inc.caller else set()),
                                   inc.onset_us - 45 * 60 * S, inc.end_us + 5 * 60 * S))
        noisy = self._noisy(incidents)
        self._benign()
        for inc, spec in zip(incidents, self.sc.incidents, strict=True):
            if inc.with_change:
                self._cause(inc, spec)
            self._decoys(inc, spec)
        self.changes.sort(key=lambda c: c.ts_us)
        self._apply_to_cluster(incidents)
        return Plan(incidents, self.changes, noisy)

    def _istio_services(self, exclude_workers: bool = True) -> list[str]:
        return [n for n, s in sorted(self.topo.services.items())
                if self.topo.mesh_of(n) == "istio" and not (exclude_workers and s.worker)]

    def _resolve(self, idx: int, spec: IncidentSpec, used: set[str]) -> Incident:
        rng = self.rng
        kind = spec.kind
        variant = spec.variant
        if variant is None:
            options = [v for v in VARIANTS[kind] if (kind, v) not in EXPLICIT_ONLY]
            if spec.with_change is not None:
                options = [v for v in options if _VARIANT_CHANGE.get((kind, v), spec.with_change)
                           == spec.with_change] or options
            variant = rng.choice(options)
        with_change = _VARIANT_CHANGE.get((kind, variant))
        if with_change is None:
            with_change = kind in ("authz_deny", "route_broken", "bad_rollout")
        if spec.with_change is not None and spec.with_change != with_change:
            raise ConfigError(f"incident {idx}: {kind}/{variant} {'has' if with_change else 'has no'} causing "
                              f"change, but with_change={spec.with_change} was asked")
        window = self.end_us - self.start_us
        onset = self.start_us + int((spec.onset_s if spec.onset_s is not None
                                     else window / S * rng.uniform(0.55, 0.65)) * S)
        if not self.start_us + 10 * 60 * S <= onset < self.end_us - 5 * 60 * S:
            raise ConfigError(f"incident {idx}: onset must leave >= 10 min of normal traffic before it and "
                              f">= 5 min after it inside the window")
        end = self.end_us if spec.duration_s is None else min(self.end_us, onset + int(spec.duration_s * S))
        if spec.rollback and spec.duration_s is None:
            end = min(self.end_us, onset + int(rng.uniform(12, 25) * 60 * S))
        target, symptom, path = self._pick_target(idx, kind, variant, spec, used)
        severity = spec.severity if spec.severity is not None else self._default_severity(kind, variant)
        inc = Incident(id=f"inc-{idx}", kind=kind, variant=variant, with_change=with_change, target=target,
                       symptom=symptom, path=path, onset_us=onset, end_us=end, severity=severity)
        svc = self.topo.services[target]
        callers = [c for c in self.topo.callers(target) if c in self.topo.services or c.startswith("istio-")]
        if kind == "authz_deny":
            inc.caller = spec.caller or (path[-2] if len(path) >= 2 else callers[0])
            if inc.caller not in self.topo.callers(target):
                raise ConfigError(f"incident {idx}: {inc.caller} does not call {target}")
            inc.affected_edges = [f"{inc.caller}->{target}"]
            inc.root_cause_edge = inc.affected_edges[0]
            inc.policy_name = f"{target}-{rng.choice(_POLICY_SUFFIXES)}"
        elif kind == "tls_failure" and variant == "expired":
            children = sorted({c.service for op in svc.ops for c in op.calls
                               if self.topo.mesh_of(c.service) == "istio"})
            inc.affected_edges = [f"{target}->{c}" for c in children]
            inc.root_cause_edge = inc.affected_edges[0] if len(children) == 1 else None
        else:
            inc.affected_edges = [f"{c}->{target}" for c in callers]
            inc.root_cause_edge = inc.affected_edges[0] if len(callers) == 1 else None
        if kind == "route_broken":
            inc.route_name = O.virtual_service(svc, variant)[1]
        if kind == "latency" and variant == "minority_route":
            inc.slow_op = rng.choice([op.name for op in svc.ops])
        if kind == "rate_limit":
            if variant == "surge":
                inc.surge = spec.severity or 3.0
                inc.limit = 1.4
                inc.severity = inc.surge
            else:
                inc.limit = spec.severity or rng.uniform(0.35, 0.5)
                inc.severity = inc.limit
        inc.signature = self._signature(inc)
        return inc

    @staticmethod
    def _default_severity(kind: str, variant: str) -> float:
        return {
            ("authz_deny", "deny_caller"): 1.0, ("route_broken", "no_route"): 1.0,
            ("route_broken", "no_cluster"): 0.6, ("bad_rollout", "errors"): 0.8,
            ("bad_rollout", "crashloop"): 0.6, ("tls_failure", "verify_failed"): 1.0,
            ("tls_failure", "expired"): 1.0, ("latency", "slow_release"): 250.0,
            ("latency", "slow_config"): 200.0, ("latency", "slow_node"): 400.0,
            ("connection_failure", "node_down"): 0.6, ("app_errors", "dependency_down"): 0.6,
            ("latency", "starved_caller"): 150.0, ("latency", "minority_route"): 30.0,
        }.get((kind, variant), 1.0)

    def _pick_target(self, idx: int, kind: str, variant: str, spec: IncidentSpec,
                     used: set[str]) -> tuple[str, str, list[str]]:
        topo = self.topo
        critical = kind != "latency"
        entries = topo.entry_services(gateway_only=True)
        if spec.symptom is not None and spec.symptom not in entries:
            raise ConfigError(f"incident {idx}: symptom {spec.symptom} is not a gateway entry service "
                              f"({', '.join(entries)})")
        if spec.target is not None:
            if spec.target not in topo.services:
                raise ConfigError(f"incident {idx}: unknown target service {spec.target}")
            cands = [spec.target]
        else:
            cands = [s for s in self._istio_services() if s not in used]
        best: list[tuple[float, str, str, list[str]]] = []
        for entry in ([spec.symptom] if spec.symptom else entries):
            share = topo.entry_reach(entry, critical_only=critical)
            edge_share = topo.edge_reach(entry, critical_only=critical)
            for t in cands:
                if topo.mesh_of(t) != "istio" or (t == entry and spec.target is None):
                    continue
                if kind == "tls_failure" and variant == "expired":
                    kids = [c for op in topo.services[t].ops for c in op.calls if c.critical]
                    if not kids:
                        continue
                if variant == "starved_caller" and not any(op.calls for op in topo.services[t].ops):
                    continue  # a starved *caller*: it must call something
                path = topo.critical_path(entry, t) if critical else self._any_path(entry, t)
                if t == entry:
                    path = [entry]
                if path is None:
                    continue
                s = share.get(t, 1.0 if t == entry else 0.0)
                if kind == "authz_deny":
                    if len(path) < 2:
                        continue
                    s = edge_share.get((spec.caller or path[-2], t), 0.0)
                elif kind == "tls_failure" and variant == "expired":
                    # only the target's own (critical) calls fail: that is what reaches the users
                    s = sum(w for (a, _b), w in edge_share.items() if a == t)
                if variant == "minority_route":
                    # a route a minority of the users' requests take (2-30 %)
                    if spec.target is None and not 0.02 <= s <= 0.3:
                        continue
                elif spec.target is None and s < 0.12:
                    continue
                best.append((s, t, entry, path))
        if not best:
            raise ConfigError(f"incident {idx} ({kind}): no target reachable "
                              f"{'through critical calls ' if critical else ''}from a gateway entry service"
                              f"{' for ' + spec.target if spec.target else ''} in topology {topo.name}")
        best.sort(key=lambda x: (x[1], x[2]))
        s, t, entry, path = self.rng.choice(best)
        return t, entry, path

    def _any_path(self, entry: str, target: str) -> list[str] | None:
        topo = self.topo
        seen = {entry: [entry]}
        frontier = [entry]
        while frontier:
            nxt = []
            for svc in frontier:
                for op in topo.services[svc].ops:
                    for c in op.calls:
                        if c.service not in seen:
                            seen[c.service] = seen[svc] + [c.service]
                            nxt.append(c.service)
            frontier = nxt
        return seen.get(target)

    def _signature(self, inc: Incident) -> dict[str, Any]:
        t = inc.target
        svc = self.topo.services[t]
        if inc.kind == "authz_deny":
            return {"status": 403, "response_flags": None,
                    "response_code_details": f"rbac_access_denied_matched_policy[ns[{svc.namespace}]-policy["
                                             f"{inc.policy_name}]-rule[0]]",
                    "seen_by": "server (inbound) proxy of the target; the caller sees 403 via_upstream"}
        if inc.kind == "route_broken":
            if inc.variant == "no_route":
                return {"status": 404, "response_flags": "NR", "response_code_details": "route_not_found",
                        "seen_by": "client (outbound) proxies of the target's callers"}
            return {"status": 503, "response_flags": "NC", "response_code_details": "cluster_not_found",
                    "seen_by": "client (outbound) proxies of the target's callers"}
        if inc.kind == "bad_rollout":
            if inc.variant == "errors":
                return {"status": 500, "response_flags": None, "response_code_details": "via_upstream",
                        "seen_by": "target's new pods (inbound) and its callers"}
            return {"status": 503, "response_flags": "UH|UC",
                    "response_code_details": "no_healthy_upstream|upstream_reset_before_response_started"
                                             "{connection_termination}",
                    "seen_by": "client (outbound) proxies of the target's callers"}
        if inc.kind == "tls_failure":
            code = "CERTIFICATE_VERIFY_FAILED" if inc.variant == "verify_failed" else \
                "SSLV3_ALERT_CERTIFICATE_EXPIRED"
            return {"status": 503, "response_flags": "UF,URX", "response_code_details":
                    "upstream_reset_before_response_started{...TLS_error...}", "tls_error": code,
                    "seen_by": "client (outbound) proxies of " + ("the target's callers" if inc.variant ==
                                                                 "verify_failed" else "the target itself")}
        if inc.kind == "latency":
            return {"status": None, "response_flags": "UT (some)", "response_code_details":
                    "upstream_response_timeout (some)", "added_latency_ms": inc.severity,
                    "seen_by": "target's inbound durations grow; callers' durations grow, some 504 UT"}
        if inc.kind == "rate_limit":
            return {"status": 429, "response_flags": "RL", "response_code_details": "local_rate_limited",
                    "seen_by": "server (inbound) proxy of the target; the caller sees 429 via_upstream"}
        if inc.kind == "connection_failure":
            return {"status": 503, "response_flags": "UF,URX", "response_code_details":
                    "upstream_reset_before_response_started{...connection_failure...}",
                    "seen_by": "client (outbound) proxies of the target's callers (pods on one node)"}
        return {"status": 500, "response_flags": None, "response_code_details": "via_upstream",
                "seen_by": "target (inbound) and its callers"}

    # ------------------------------------------------------------------ noisy service
    def _noisy(self, incidents: list[Incident]) -> Noisy | None:
        spec: NoisySpec | None = self.sc.noisy
        if spec is None:
            return None
        rng = self.rng
        if spec.service is not None:
            if spec.service not in self.topo.services:
                raise ConfigError(f"noisy service {spec.service} is not in topology {self.topo.name}")
            name = spec.service
        else:
            forbidden: set[str] = set()
            for inc in incidents:
                forbidden |= set(inc.path) | {inc.target, inc.caller or ""}
                forbidden |= set(self.topo.entry_reach(inc.symptom, critical_only=True))
                forbidden |= {e.split("->")[0] for e in inc.affected_edges}
            # only services that get traffic at all
            reached: set[str] = set()
            for e in self.topo.entry_services():
                reached |= set(self.topo.entry_reach(e, critical_only=False))
            cands = [s for s in self._istio_services() if s not in forbidden and s in reached]
            if not cands:
                cands = [s for s in self._istio_services() if s not in forbidden]
            if not cands:
                return None
            name = rng.choice(cands)
        if spec.mode == "stable":
            rate = spec.error_rate or rng.uniform(0.04, 0.08)
            start, end = self.start_us, self.end_us
        else:
            rate = spec.error_rate or rng.uniform(0.3, 0.5)
            ref = incidents[0].onset_us if incidents else (self.start_us + self.end_us) // 2
            start = self.start_us + int(spec.start_s * S) if spec.start_s is not None else \
                ref - int(rng.uniform(3, 12) * 60 * S)
            dur = int((spec.duration_s or rng.uniform(15, 30) * 60) * S)
            start = max(self.start_us + 5 * 60 * S, start)
            end = min(self.end_us, start + dur)
        return Noisy(name, spec.mode, rate, start, end)

    # ------------------------------------------------------------------ changes
    def _actor(self, spec_actor: str | None, kind: str) -> str:
        if spec_actor:
            return spec_actor
        if kind == "Deployment":
            return self.rng.choice(["argocd", "helm", "bob"])
        return self.rng.choice(["alice", "argocd", "bob"])

    def _key(self, obj: dict[str, Any]) -> str:
        return f"{obj['kind']}/{obj['metadata']['namespace']}/{obj['metadata']['name']}"

    def _put(self, ts: int, actor: str, obj: dict[str, Any], role: str, service: str | None,
             incident: str | None, description: str, body: dict[str, Any] | None = None,
             helm: bool = False) -> Change:
        key = self._key(obj)
        created = key not in self.objects and obj["kind"] not in ("Deployment", "ConfigMap")
        # Argo CD applies server-side: a PATCH even when it creates the object
        verb = "create" if created and actor != "argocd" else "patch"
        self.objects[key] = obj
        helm_release = None
        if helm or actor == "helm":  # one chart per service: its release holds all the service's objects
            rel = service or obj["metadata"]["name"]
            self.helm_rev[rel] = self.helm_rev.get(rel, self.rng.randint(4, 30)) + 1
            helm_release = (rel, self.helm_rev[rel])
            actor = "helm"
        ch = Change(ts_us=ts, actor=actor, kind=obj["kind"], namespace=obj["metadata"]["namespace"],
                    name=obj["metadata"]["name"], verb=verb, role=role, service=service, obj=obj, body=body,
                    incident=incident, description=description, helm_release=helm_release, created=created)
        self.changes.append(ch)
        return ch

    def _delete(self, ts: int, actor: str, key: str, role: str, service: str | None, incident: str | None,
                description: str) -> Change:
        obj = self.objects.pop(key)
        ch = Change(ts_us=ts, actor=actor, kind=obj["kind"], namespace=obj["metadata"]["namespace"],
                    name=obj["metadata"]["name"], verb="delete", role=role, service=service, obj=None,
                    incident=incident, description=description)
        self.changes.append(ch)
        return ch

    def _deploy_obj(self, svc: Service, version: str, env: dict[str, str] | None = None,
                    helm: bool = False) -> dict[str, Any]:
        return O.deployment(svc, f"{svc.image_repo}:{version}", self.cluster.deployments[svc.name].replicas,
                            env, helm_release=svc.name if helm else None)

    @staticmethod
    def _bump(version: str, rng: random.Random) -> str:
        parts = version.lstrip("v").split(".")
        while len(parts) < 3:
            parts.append("0")
        major, minor, patch = (int(p) if p.isdigit() else 0 for p in parts[:3])
        if rng.random() < 0.7:
            patch += 1
        else:
            minor, patch = minor + 1, 0
        return f"{major}.{minor}.{patch}"

    def _image_change(self, ts: int, svc: Service, actor: str, role: str, incident: str | None,
                      description: str, undo: bool = False) -> Change:
        """A Deployment image change; the version and object are filled in at replay (time order)."""
        helm = actor == "helm"
        obj = self._deploy_obj(svc, self.versions[svc.name], helm=helm)
        ch = self._put(ts, actor, obj, role, svc.name, incident, description, helm=helm)
        ch._undo = undo  # type: ignore[attr-defined]
        return ch

    def _cause(self, inc: Incident, spec: IncidentSpec) -> None:
        rng = self.rng
        svc = self.topo.services[inc.target]
        kind_of = {"authz_deny": "AuthorizationPolicy", "route_broken": "VirtualService",
                   "bad_rollout": "Deployment", "tls_failure": "DestinationRule", "rate_limit": "EnvoyFilter",
                   "latency": "ConfigMap" if inc.variant == "slow_config" else "Deployment"}
        kind = kind_of[inc.kind]
        actor = self._actor(spec.actor, kind)
        if kind == "Deployment" and actor == "alice":
            actor = "bob"
        delay = spec.change_delay_s if spec.change_delay_s is not None else (
            rng.uniform(30, 90) if kind == "Deployment" else rng.uniform(2, 40))
        ts = inc.onset_us - int(delay * S)
        if kind == "AuthorizationPolicy":
            caller = self.topo.services[inc.caller or ""]
            obj = O.authorization_policy(svc, "deny_caller", inc.policy_name or "", [caller])
            ch = self._put(ts, actor, obj, "cause", svc.name, inc.id,
                           f"DENY policy on {svc.name} whose rule matches {caller.name}'s principal")
        elif kind == "VirtualService":
            weight = int(round(inc.severity * 100))
            obj, _ = O.virtual_service(svc, inc.variant, weight)
            ch = self._put(ts, actor, obj, "cause", svc.name, inc.id,
                           "route only matches x-canary header" if inc.variant == "no_route"
                           else f"{weight}% of traffic split to undefined subset v3")
        elif kind == "DestinationRule":
            obj = O.destination_rule(svc, "bad_tls")
            ch = self._put(ts, actor, obj, "cause", svc.name, inc.id,
                           "tls mode MUTUAL with a CA that does not verify the mesh certificates")
        elif kind == "EnvoyFilter":
            obj = O.envoy_filter(svc, "ratelimit", tokens_per_minute=rng.choice([60, 100, 120, 200]))
            ch = self._put(ts, actor, obj, "cause", svc.name, inc.id, "local rate limit far below traffic")
        elif kind == "ConfigMap":
            data = O.default_config(svc)
            data["DB_POOL_SIZE"] = "2"
            obj = O.config_map(svc, data)
            ch = self._put(ts, actor, obj, "cause", svc.name, inc.id, "DB_POOL_SIZE 32 -> 2")
        else:
            ch = self._image_change(ts, svc, actor, "cause", inc.id, "")
            ch._first_ready = inc.onset_us  # type: ignore[attr-defined]
        inc.cause = ch
        if spec.rollback and inc.end_us < self.end_us:
            rb_ts = inc.end_us - int((rng.uniform(30, 60) if kind == "Deployment" else rng.uniform(2, 10)) * S)
            rb_actor = "alice" if ch.actor in ("alice", "bob") else ch.actor
            if kind == "Deployment":
                rb = self._image_change(rb_ts, svc, rb_actor if rb_actor != "helm" else "bob", "rollback",
                                        inc.id, "kubectl rollout undo", undo=True)
                rb._first_ready = inc.end_us  # type: ignore[attr-defined]
            elif kind in ("AuthorizationPolicy", "EnvoyFilter"):
                rb = self._delete(rb_ts, rb_actor, self._key(ch.obj or {}), "rollback", svc.name, inc.id,
                                  "deleted the bad policy")
            elif kind == "ConfigMap":
                rb = self._put(rb_ts, rb_actor, O.config_map(svc, O.default_config(svc)), "rollback", svc.name,
                               inc.id, "DB_POOL_SIZE back to 32")
            elif kind == "VirtualService":
                obj, _ = O.virtual_service(svc, "retries")
                rb = self._put(rb_ts, rb_actor, obj, "rollback", svc.name, inc.id, "restored default route")
            else:
                obj = O.destination_rule(svc, "pool")
                rb = self._put(rb_ts, rb_actor, obj, "rollback", svc.name, inc.id, "ISTIO_MUTUAL restored")
            inc.rollback = rb

    def _free(self, services: set[str], ts: int) -> bool:
        return all(not (services & svcs) or not (lo <= ts <= hi) for svcs, lo, hi in self.protected)

    def _namespace_free(self, ns: str, ts: int) -> bool:
        members = {n for n, s in self.topo.services.items() if s.namespace == ns}
        return self._free(members, ts)

    def _change_kinds(self) -> list[str]:
        return ["Deployment", "Deployment", "Scale", "ConfigMap", "VirtualService", "DestinationRule",
                "AuthorizationPolicy", "PeerAuthentication", "EnvoyFilter"]

    def _random_change(self, ts: int, role: str, incident: str | None, kind: str | None = None,
                       avoid: set[str] | None = None) -> Change | None:
        rng = self.rng
        kind = kind or rng.choice(self._change_kinds())
        pool = self._istio_services()
        if kind in ("Deployment", "Scale", "ConfigMap"):  # plain Kubernetes objects: Linkerd workloads too
            pool = [n for n, s in sorted(self.topo.services.items()) if not s.worker]
        cands = [s for s in pool if self._free({s}, ts) and s not in (avoid or set())]
        if kind == "PeerAuthentication":
            namespaces = sorted({self.topo.services[s].namespace for s in cands})
            namespaces = [n for n in namespaces if self._namespace_free(n, ts)
                          and f"PeerAuthentication/{n}/default" not in self.objects]
            if not namespaces:
                kind = "ConfigMap"
            else:
                ns = rng.choice(namespaces)
                return self._put(ts, self._actor(None, kind), O.peer_authentication(ns), role, None, incident,
                                 f"namespace {ns} mTLS STRICT (all workloads already meshed)")
        if not cands:
            return None
        svc = self.topo.services[rng.choice(cands)]
        if kind == "Deployment":
            actor = rng.choice(["argocd", "helm", "bob"])
            return self._image_change(ts, svc, actor, role, incident, "")
        if kind == "Scale":
            dep = self.cluster.deployments[svc.name]
            n = max(1, min(6, dep.replicas + rng.choice([-1, 1, 1])))
            if n == dep.replicas:
                n += 1
            obj = self._deploy_obj(svc, self.versions[svc.name])
            obj["spec"]["replicas"] = n
            ch = self._put(ts, "hpa", obj, role, svc.name, incident, f"HPA scaled {svc.name} to {n}")
            ch.subresource = "scale"
            ch.verb = "update"  # the HPA PUTs deployments/scale
            ch._replicas = n  # type: ignore[attr-defined]
            return ch
        if kind == "ConfigMap":
            data = O.default_config(svc)
            choice = rng.choice(["LOG_LEVEL", "CACHE_TTL_SECONDS", "FEATURE_FLAGS"])
            data[choice] = {"LOG_LEVEL": "debug", "CACHE_TTL_SECONDS": "600",
                            "FEATURE_FLAGS": "new-pricing=true,async-audit=true"}[choice]
            return self._put(ts, rng.choice(["argocd", "alice", "bob"]), O.config_map(svc, data), role,
                             svc.name, incident, f"{choice} changed")
        if kind == "VirtualService":
            obj, _ = O.virtual_service(svc, rng.choice(["retries", "canary_weights"]))
            return self._put(ts, self._actor(None, kind), obj, role, svc.name, incident,
                             "retries/timeouts or canary cohort header (no behaviour change)")
        if kind == "DestinationRule":
            obj = O.destination_rule(svc, rng.choice(["pool", "outlier"]))
            return self._put(ts, self._actor(None, kind), obj, role, svc.name, incident,
                             "connection pool / outlier detection tuning")
        if kind == "AuthorizationPolicy":
            if rng.random() < 0.5:
                callers = [self.topo.services[c] for c in self.topo.callers(svc.name) if c in self.topo.services]
                obj = O.authorization_policy(svc, "allow_callers", f"{svc.name}-allow-callers", callers)
                desc = "ALLOW policy listing every current caller"
            else:
                obj = O.authorization_policy(svc, "deny_admin", f"{svc.name}-deny-admin")
                desc = "DENY admin/debug paths (no traffic uses them)"
            return self._put(ts, rng.choice(["alice", "argocd"]), obj, role, svc.name, incident, desc)
        obj = O.envoy_filter(svc, "idle_timeout")
        return self._put(ts, rng.choice(["bob", "argocd"]), obj, role, svc.name, incident, "HCM idle timeout")

    def _decoys(self, inc: Incident, spec: IncidentSpec) -> None:
        rng = self.rng
        avoid = set(inc.path) | {inc.target} | {e.split("->")[0] for e in inc.affected_edges} | \
            {e.split("->")[1] for e in inc.affected_edges}
        cause_kind = inc.cause.kind if inc.cause else {
            "latency": "Deployment", "connection_failure": "DestinationRule", "tls_failure": "DestinationRule",
            "rate_limit": "EnvoyFilter", "app_errors": "Deployment"}.get(inc.kind, "Deployment")
        plans: list[tuple[float, str | None]] = [
            (-rng.uniform(4, 15) * 60, cause_kind),       # same kind as the real cause, elsewhere, earlier
            (-rng.uniform(0.3, 3) * 60, None),            # something else, very close to the onset
            (rng.uniform(1, 6) * 60, None),               # after the onset: cannot be the cause
        ]
        while len(plans) < spec.decoys:
            plans.append((rng.uniform(-20, 5) * 60, None))
        for off, kind in plans[: spec.decoys]:
            ts = inc.onset_us + int(off * S)
            if inc.cause and abs(ts - inc.cause.ts_us) < 5 * S:
                ts -= 20 * S
            if not self.start_us < ts < self.end_us:
                continue
            ch = self._random_change(ts, "decoy", inc.id, kind=kind, avoid=avoid)
            if ch is not None:
                inc.decoys.append(ch)

    def _benign(self) -> None:
        rng = self.rng
        hours = (self.end_us - self.start_us) / (3600 * S)
        n = int(round(self.sc.benign_changes_per_hour * hours))
        for _ in range(n):
            ts = self.start_us + int(rng.uniform(0.02, 0.98) * (self.end_us - self.start_us))
            self._random_change(ts, "benign", None)

    # ------------------------------------------------------------------ cluster effects
    def _apply_to_cluster(self, incidents: list[Incident]) -> None:
        """Replay Deployment changes on the cluster (rollouts, scales) in time order, numbering image
        versions as they happen and rebuilding each Deployment object with the replicas of that moment."""
        for ch in self.changes:
            if ch.kind != "Deployment":
                continue
            svc = self.topo.services[ch.name]
            dep = self.cluster.deployments[ch.name]
            if ch.subresource == "scale":
                self.cluster.scale(ch.name, ch.ts_us, ch._replicas)  # type: ignore[attr-defined]
                ch.obj = self._deploy_obj(svc, dep.rs_history[-1][1])
                continue
            old = dep.rs_history[-1][1]
            undo = getattr(ch, "_undo", False) and len(dep.rs_history) >= 2
            version = dep.rs_history[-2][1] if undo else self._bump(old, self.rng)
            image = f"{svc.image_repo}:{version}"
            ch.obj = self._deploy_obj(svc, version, helm=ch.helm_release is not None)
            ch.body = O.image_patch(svc, image) if ch.actor in ("bob", "helm") else None
            ch.description = (ch.description + ": " if ch.description else "") + \
                f"image {svc.image_repo}:{old} -> {version}"
            first_ready = getattr(ch, "_first_ready", ch.ts_us + self.rng.randint(25, 50) * S)
            reuse = dep.rs_history[-2][0] if undo else None
            rs = self.cluster.rollout(ch.name, first_ready, version, reuse_rs=reuse)
            for inc in incidents:
                if inc.cause is ch:
                    inc.bad_rs = rs
        for inc in incidents:
            if inc.variant in ("slow_node", "node_down") or (inc.kind == "tls_failure" and inc.variant == "expired"):
                pods = sorted(self.cluster.pods_of(inc.target, inc.onset_us), key=lambda p: p.name)
                if inc.kind == "tls_failure":
                    bad: list[Pod] = pods
                else:
                    frac = inc.severity if inc.kind == "connection_failure" else 0.5
                    k = max(1, min(len(pods) - 1 if len(pods) > 1 else 1, int(round(len(pods) * frac))))
                    bad = self.rng.sample(pods, k)
                inc.bad_pods = {p.name for p in bad}
