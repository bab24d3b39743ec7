"""``simulate(scenario, out_dir)``: plan, run the traffic, write the logcli exports and the ground truth.

Output, one gzip file per Kubernetes namespace (``<namespace>.jsonl.gz``: every proxy stream of that
namespace, as ``logcli query --output jsonl`` would export it, sorted by the Loki timestamp) plus
``kube-apiserver-audit.jsonl.gz`` (stream ``{job="kube-apiserver-audit"}``) and ``ground_truth.json``.
Gzip headers carry no file name and mtime 0 and nothing reads the clock, so the same scenario always
gives byte-identical files.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path
from typing import Any

from meshlens.errors import ConfigError
from meshlens.simulate.audit import ACTOR_USERNAMES, AuditLog
from meshlens.simulate.cluster import Cluster
from meshlens.simulate.engine import Engine
from meshlens.simulate.model import GroundTruth, Scenario, fmt_ts, parse_ts
from meshlens.simulate.plan import Incident, Planner
from meshlens.simulate.render import (
    go_json_string,
    go_rfc3339_nano,
    istio_agent_startup,
    istio_xds_reconnect,
    linkerd_startup,
    logcli_jsonl,
    logcli_labels_prefix,
)
from meshlens.simulate.topology import GATEWAY, GATEWAY_NS, Topology, get_topology

S = 1_000_000
AUDIT_FILE = "kube-apiserver-audit.jsonl.gz"
AUDIT_LABELS = {"job": "kube-apiserver-audit"}
SIMULATOR_VERSION = 1


def namespace_formats(scenario: Scenario, topo: Topology) -> dict[str, str]:
    """Istio access-log encoding per namespace (``mixed`` alternates, starting with text)."""
    out: dict[str, str] = {GATEWAY_NS: "text" if scenario.istio_format != "json" else "json"}
    istio_ns = [n.name for n in topo.namespaces if n.mesh == "istio"]
    for i, ns in enumerate(istio_ns):
        if scenario.grpc:
            out[ns] = "json"  # the default text format has no gRPC status: a custom JSON format logs it
        elif scenario.istio_format == "mixed":
            out[ns] = "text" if i % 2 == 0 else "json"
        else:
            out[ns] = scenario.istio_format
    for n in topo.namespaces:
        if n.mesh == "linkerd":
            out[n.name] = "linkerd_json"
    return out


def _write_gz(path: Path, lines: list[str]) -> int:
    data = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                compresslevel=6) as gz:
        gz.write(data)
    return path.stat().st_size


class _Load:
    """Relative load over time: diurnal sinusoid times any traffic surge (rate-limit incidents)."""

    def __init__(self, scenario: Scenario, incidents: list[Incident]) -> None:
        self.amp = scenario.diurnal_amplitude
        self.peak = scenario.diurnal_peak_hour
        self.surges = [(inc.symptom, inc.onset_us, inc.end_us, inc.surge) for inc in incidents
                       if inc.kind == "rate_limit" and inc.variant == "surge"]

    def diurnal(self, t_us: int) -> float:
        hour = (t_us / 3_600_000_000) % 24
        return 1.0 + self.amp * math.cos(2 * math.pi * (hour - self.peak) / 24)

    def surge(self, service: str, t_us: int) -> float:
        m = 1.0
        for svc, lo, hi, f in self.surges:
            if svc == service and lo <= t_us < hi:
                m *= f
        return m


def simulate(scenario: Scenario, out_dir: str | Path) -> GroundTruth:
    """Simulate ``scenario`` and write its logs and ``ground_truth.json`` into ``out_dir``.

    Existing files of the same names are overwritten; other files in ``out_dir`` are left alone.
    """
    scenario.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start_us = parse_ts(scenario.start)
    end_us = start_us + int(scenario.duration_s * S)
    topo = get_topology(scenario.topology, linkerd=scenario.linkerd, seed=scenario.seed)
    cluster = Cluster(topo, scenario.seed, start_us)
    plan = Planner(scenario, topo, cluster, start_us, end_us).plan()
    formats = namespace_formats(scenario, topo)
    engine = Engine(topo, cluster, plan.incidents, plan.noisy, seed=scenario.seed, formats=formats,
                    details_style=scenario.details_style, cluster_semicolon=scenario.json_cluster_semicolon,
                    background_error_rate=scenario.background_error_rate, grpc=scenario.grpc)
    load = _Load(scenario, plan.incidents)
    if scenario.baseline_s is not None or scenario.after_s is not None:
        # a short log window around the fault: simulate everything, write only what falls inside
        onset = min(inc.onset_us for inc in plan.incidents)
        keep_lo = max(start_us, onset - int(scenario.baseline_s * S)) if scenario.baseline_s else start_us
        keep_hi = min(end_us, onset + int(scenario.after_s * S)) if scenario.after_s else end_us
        engine.rec.keep_ns = (keep_lo * 1000, keep_hi * 1000)
    roots = _run_traffic(scenario, topo, engine, load, start_us, end_us)
    _health_checks(scenario, topo, cluster, engine, plan.changes, start_us, end_us)
    if scenario.proxy_lines:
        _proxy_lines(scenario, cluster, engine, start_us, end_us)
    audit = AuditLog(scenario.seed)
    rng = random.Random(f"{scenario.seed}:audit-plan")
    for ch in plan.changes:
        audit.record_change(ch, start_us - rng.randint(2, 90) * 86400 * S)
    _read_only(scenario, topo, audit, rng, start_us, end_us)
    files = _write_files(out, engine, audit, formats, scenario.seed)
    lo_us, hi_us = (start_us, end_us) if engine.rec.keep_ns is None else \
        (engine.rec.keep_ns[0] // 1000, engine.rec.keep_ns[1] // 1000)
    gt = _ground_truth(scenario, topo, plan, files, engine, roots, lo_us, hi_us)
    gt.write(out / "ground_truth.json")
    return gt


def _run_traffic(scenario: Scenario, topo: Topology, engine: Engine, load: _Load, start_us: int,
                 end_us: int) -> int:
    rng = random.Random(f"{scenario.seed}:arrivals")
    total_w = sum(e.weight for e in topo.entries)
    roots = 0
    for entry in topo.entries:
        rate = scenario.entry_rate * entry.weight / total_w  # per second at load 1
        max_surge = max([f for svc, _, _, f in load.surges if svc == entry.service] + [1.0])
        lam_max = rate * (1 + load.amp) * max_surge
        if lam_max <= 0:
            continue
        t = float(start_us)
        while True:
            t += rng.expovariate(lam_max) * S
            if t >= end_us:
                break
            ti = int(t)
            lv = load.diurnal(ti) * load.surge(entry.service, ti)
            if rng.random() * lam_max > rate * lv:
                continue
            roots += 1
            if entry.host is not None:
                engine.gateway_request(entry, ti, lv)
            else:
                engine.worker_job(entry, ti, lv)
    return roots


def _health_checks(scenario: Scenario, topo: Topology, cluster: Cluster, engine: Engine, changes: list,
                   start_us: int, end_us: int) -> None:
    period = int(scenario.health_check_period_s * S)
    if period <= 0:
        return
    strict_from = {ch.namespace: ch.ts_us for ch in changes if ch.kind == "PeerAuthentication"}
    rng = random.Random(f"{scenario.seed}:probes")
    for pod in sorted(cluster.all_pods(), key=lambda p: p.name):
        if pod.deployment == GATEWAY or topo.services[pod.deployment].worker:
            continue
        lo = max(start_us, pod.start_us)
        hi = min(end_us, pod.end_us if pod.end_us is not None else end_us)
        hi = min(hi, strict_from.get(pod.namespace, hi))
        t = lo + rng.randint(0, period)
        while t < hi:
            engine.health_check(pod, t)
            t += period + rng.randint(-period // 10, period // 10)


def _proxy_lines(scenario: Scenario, cluster: Cluster, engine: Engine, start_us: int, end_us: int) -> None:
    rng = random.Random(f"{scenario.seed}:proxylines")
    for pod in sorted(cluster.all_pods(), key=lambda p: p.name):
        hi = min(end_us, pod.end_us if pod.end_us is not None else end_us)
        if pod.container == "linkerd-proxy":
            if start_us <= pod.start_us < end_us:
                boot = pod.start_us - rng.randint(800_000, 2_000_000)
                identity = f"{pod.deployment}.{pod.namespace}.serviceaccount.identity.linkerd.cluster.local"
                for off, line in linkerd_startup(identity):
                    engine.rec.add(pod, boot + int(off * S), line, access=False)
            continue
        if start_us <= pod.start_us < end_us:
            init_s = rng.uniform(0.9, 2.6)
            boot = pod.start_us - int(init_s * S) - rng.randint(200_000, 900_000)
            for t, line in istio_agent_startup(boot, init_s, rng.uniform(3.0, 160.0)):
                engine.rec.add(pod, t, line, access=False)
        t = max(start_us, pod.start_us) + rng.randint(60, 1800) * S
        while t < hi:
            engine.rec.add(pod, t, istio_xds_reconnect(t), access=False)
            t += rng.randint(1500, 1800) * S


def _read_only(scenario: Scenario, topo: Topology, audit: AuditLog, rng: random.Random, start_us: int,
               end_us: int) -> None:
    hours = (end_us - start_us) / (3600 * S)
    n = int(round(scenario.read_only_per_hour * hours))
    namespaces = sorted({s.namespace for s in topo.services.values()})
    istio_kinds = ["VirtualService", "DestinationRule", "AuthorizationPolicy", "PeerAuthentication", "EnvoyFilter"]
    for _ in range(n):
        ts = start_us + int(rng.uniform(0.0, 0.995) * (end_us - start_us))
        r = rng.random()
        if r < 0.35:
            audit.read_only(ts, "istiod", "watch", rng.choice(istio_kinds), None, None)
        elif r < 0.55:
            audit.read_only(ts, "argocd", "list", rng.choice(["Deployment", "ConfigMap", "VirtualService"]),
                            rng.choice(namespaces), None)
        elif r < 0.85:
            svc = topo.services[rng.choice(sorted(topo.services))]
            kind = rng.choice(["Deployment", "Pod", "ConfigMap"])
            actor = rng.choice(["alice", "bob", "dave"])
            if kind == "Pod":
                audit.read_only(ts, actor, "list", "Pod", svc.namespace, None)
            else:
                name = f"{svc.name}-config" if kind == "ConfigMap" else svc.name
                audit.read_only(ts, actor, "get", kind, svc.namespace, name)
        else:
            svc = topo.services[rng.choice(sorted(topo.services))]
            audit.forbidden_get(ts, "dave", "Secret", svc.namespace, f"{svc.name}-db-credentials")


def _write_files(out: Path, engine: Engine, audit: AuditLog, formats: dict[str, str],
                 seed: int) -> dict[str, dict[str, Any]]:
    by_ns: dict[str, list[tuple[int, int, str]]] = {}
    counts: dict[str, dict[str, int]] = {}
    seq = 0
    for pod in sorted(engine.rec.lines, key=lambda p: p.name):
        entries = engine.rec.lines[pod]
        bucket = by_ns.setdefault(pod.namespace, [])
        c = counts.setdefault(pod.namespace, {"records": 0, "streams": 0})
        c["streams"] += 1
        for ts_ns, line in entries:
            bucket.append((ts_ns, seq, logcli_jsonl(pod.labels_prefix, line, ts_ns)))
            seq += 1
        c["records"] += len(entries)
    files: dict[str, dict[str, Any]] = {}
    for ns in sorted(by_ns):
        rows = by_ns[ns]
        rows.sort()
        name = f"{ns}.jsonl.gz"
        size = _write_gz(out / name, [r[2] for r in rows])
        fmt = formats.get(ns, "text")
        files[name] = {"namespace": ns, "format": {"text": "istio_text", "json": "istio_json"}.get(fmt, fmt),
                       "records": counts[ns]["records"], "streams": counts[ns]["streams"], "bytes": size}
    rng = random.Random(f"{seed}:audit-ts")
    prefix = logcli_labels_prefix(AUDIT_LABELS)
    rows = []
    for i, (ts_us, ev) in enumerate(audit.events):
        ts_ns = ts_us * 1000 + rng.randint(1_000_000, 400_000_000)
        body = json.dumps(ev, separators=(",", ":"), ensure_ascii=False)
        rows.append((ts_ns, i, prefix + go_json_string(body) + ',"timestamp":"' + go_rfc3339_nano(ts_ns) + '"}'))
    rows.sort()
    size = _write_gz(out / AUDIT_FILE, [r[2] for r in rows])
    files[AUDIT_FILE] = {"namespace": None, "format": "k8s_audit", "records": len(rows), "streams": 1,
                         "bytes": size, "labels": AUDIT_LABELS}
    return files


def _ground_truth(scenario: Scenario, topo: Topology, plan: Any, files: dict[str, dict[str, Any]],
                  engine: Engine, roots: int, start_us: int, end_us: int) -> GroundTruth:
    incidents = []
    ns_of = {n: s.namespace for n, s in topo.services.items()}
    for inc in plan.incidents:
        crit = inc.kind != "latency"
        share = topo.entry_reach(inc.symptom, critical_only=crit).get(inc.target, 1.0)
        edges = topo.edge_reach(inc.symptom, critical_only=crit)
        if inc.kind == "authz_deny":
            share = edges.get((inc.caller or "", inc.target), 0.0)
        elif inc.kind == "tls_failure" and inc.variant == "expired":
            share = sum(w for (a, _b), w in edges.items() if a == inc.target)
        change = None
        if inc.cause is not None:
            change = inc.cause.truth()
            change["ts"] = fmt_ts(inc.cause.ts_us)
        rollback = None
        if inc.rollback is not None:
            rollback = inc.rollback.truth()
            rollback["ts"] = fmt_ts(inc.rollback.ts_us)
        accepted = [inc.target] + list(inc.affected_edges)
        incidents.append({
            "id": inc.id, "kind": inc.kind, "variant": inc.variant, "has_change": inc.cause is not None,
            "root_cause_service": inc.target, "root_cause_namespace": ns_of[inc.target],
            "root_cause_edge": inc.root_cause_edge, "affected_edges": inc.affected_edges,
            "accepted_root_causes": accepted,
            "denied_caller": inc.caller,
            "symptom_service": inc.symptom, "symptom_namespace": ns_of[inc.symptom],
            "symptom_path": inc.path, "symptom_share": round(min(1.0, share), 4),
            "onset": fmt_ts(inc.onset_us), "end": fmt_ts(inc.end_us),
            "severity": inc.severity, "signature": inc.signature,
            "change": change, "rollback": rollback,
            "decoy_targets": [d.target for d in inc.decoys],
            "bad_pods": sorted(inc.bad_pods), "bad_replicaset": inc.bad_rs,
            "stats": dict(sorted(inc.stats.items())),
        })
    changes = []
    for ch in plan.changes:
        t = ch.truth()
        t["ts"] = fmt_ts(ch.ts_us)
        changes.append(t)
    noisy = None
    if plan.noisy is not None:
        nz = plan.noisy
        noisy = {"service": nz.service, "namespace": ns_of[nz.service], "mode": nz.mode,
                 "error_rate": round(nz.error_rate, 4), "start": fmt_ts(nz.start_us), "end": fmt_ts(nz.end_us)}
    counts = {"root_requests": roots, "access_records": engine.rec.access_count,
              "proxy_lines": engine.rec.other_count,
              "audit_events": files[AUDIT_FILE]["records"],
              "config_changes": len(plan.changes)}
    pods = [{"pod": p.name, "namespace": p.namespace, "workload": p.deployment, "ip": p.ip, "replicaset": p.rs,
             "image": p.image, "start": fmt_ts(p.start_us) if p.start_us >= start_us else None,
             "end": fmt_ts(p.end_us) if p.end_us is not None and p.end_us < end_us else None}
            for p in sorted(engine.cluster.all_pods(), key=lambda p: p.name)]
    topo_d = topo.to_dict()
    topo_d["pods"] = pods
    topo_d["namespace_formats"] = namespace_formats(scenario, topo)
    return GroundTruth(
        scenario=scenario.to_dict(), window_start=fmt_ts(start_us), window_end=fmt_ts(end_us),
        topology=topo_d, incidents=incidents, changes=changes, noisy=noisy, files=files, counts=counts,
        generator={"name": "meshlens.simulate", "version": SIMULATOR_VERSION,
                   "actors": dict(sorted(ACTOR_USERNAMES.items()))})


def check_out_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"output path {p} exists and is not a directory: choose a directory for the dataset")
    return p
