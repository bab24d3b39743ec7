"""A small hand-built mesh for analysis tests.

Istio access lines (client and server sidecar) and Kubernetes audit events, written as logcli jsonl
and ingested for real. Shared by the analysis and CLI tests."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from meshlens.ingest import ingest_files
from meshlens.store import open_store

_ids = itertools.count(1)
_CACHE: dict[str, Path] = {}
T0 = 1_714_550_400  # 2024-05-01T08:00:00Z


NS = 1_000_000_000


SERVICES = {  # name -> (namespace, pod ip)
    "istio-ingressgateway": ("istio-system", "10.1.0.2"),
    "frontend": ("shop", "10.1.0.10"), "reviews": ("shop", "10.1.0.11"), "ratings": ("shop", "10.1.0.12"),
    "ads": ("shop", "10.1.0.13"), "admin": ("shop", "10.1.0.14"), "legacy": ("shop", "10.1.0.15"),
}


def _iso_ms(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(round((ts % 1) * 1000)) % 1000:03d}Z"


def _rfc_ns(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{int((ts % 1) * 1e9):09d}Z"


def _logcli(service: str, line: str, ts: float) -> str:
    ns, _ = SERVICES[service]
    labels = {"app": service, "container": "istio-proxy", "namespace": ns, "pod": f"{service}-6b7f9-abcde"}
    return json.dumps({"labels": labels, "line": line, "timestamp": _rfc_ns(ts + 0.5)}, separators=(",", ":"))


@dataclass
class Mesh:
    """Writes hop records (both sidecars) and audit events for a tiny mesh, then ingests them."""

    lines: list[str] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)

    def hop(self, ts: float, caller: str, callee: str, rid: str, *, path: str = "/api", code: int = 200,
            flags: str = "-", details: str = "via_upstream", dur: int = 10, server: bool = True,
            server_code: int | None = None, server_details: str | None = None, mtls: bool = True,
            method: str = "GET", cluster: bool = True) -> None:
        """One call: the caller's outbound record, and (``server``) the callee's inbound record.

        ``cluster=False`` writes the client record of an Envoy local reply that matched no route: no
        upstream cluster, so nothing in the record says it was the client side."""
        c_ns, c_ip = SERVICES[caller]
        s_ns, s_ip = SERVICES[callee]
        port = next(_ids) % 20000 + 30000
        upstream = f"{s_ip}:8080" if server else "-"
        up_cluster = f"outbound|8080||{callee}.{s_ns}.svc.cluster.local" if cluster else "-"
        local = f"{c_ip}:{port}" if cluster else "-"
        out = (f'[{_iso_ms(ts)}] "{method} {path} HTTP/1.1" {code} {flags} {details} - "-" 0 120 {dur} '
               f'{dur if server else "-"} "-" "curl/8.5.0" "{rid}" "{callee}.{s_ns}:8080" "{upstream}" '
               f'{up_cluster} {local} 10.96.0.{len(callee)}:8080 {c_ip}:{port + 1} - {"default" if cluster else "-"}')
        self.lines.append(_logcli(caller, out, ts + dur / 1000))
        if server:
            sc = code if server_code is None else server_code
            sd = details if server_details is None else server_details
            sni = f"outbound_.8080_._.{callee}.{s_ns}.svc.cluster.local" if mtls else "-"
            inn = (f'[{_iso_ms(ts + 0.001)}] "{method} {path} HTTP/1.1" {sc} - {sd} - "-" 0 120 {max(dur - 1, 0)} '
                   f'{max(dur - 2, 0)} "-" "curl/8.5.0" "{rid}" "{callee}.{s_ns}:8080" "{s_ip}:8080" '
                   f'inbound|8080|| 127.0.0.6:{port + 2} {s_ip}:8080 {c_ip}:{port} {sni} default')
            self.lines.append(_logcli(callee, inn, ts + dur / 1000))

    def change(self, ts: float, kind: str, namespace: str, name: str, *, verb: str = "create",
               user: str = "alice@example.com", spec: dict | None = None, data: dict | None = None,
               group: str = "security.istio.io", resource: str = "authorizationpolicies") -> None:
        """A Kubernetes audit event for a mutating API call (what ``config_change`` events come from)."""
        obj: dict = {"apiVersion": f"{group}/v1" if group else "v1", "kind": kind,
                     "metadata": {"name": name, "namespace": namespace}}
        if data is not None:
            obj["data"] = data
        else:
            obj["spec"] = spec or {}
        prefix = f"/apis/{group}/v1" if group else "/api/v1"
        ev = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "RequestResponse",
              "auditID": f"00000000-0000-4000-8000-{next(_ids):012d}", "stage": "ResponseComplete",
              "requestURI": f"{prefix}/namespaces/{namespace}/{resource}" + ("" if verb == "create" else f"/{name}"),
              "verb": verb, "user": {"username": user, "groups": ["system:authenticated"]},
              "sourceIPs": ["10.0.0.9"], "userAgent": "kubectl/v1.29.0",
              "objectRef": {"resource": resource, "namespace": namespace, "name": name,
                            "apiGroup": group, "apiVersion": "v1"},
              "responseStatus": {"metadata": {}, "code": 201 if verb == "create" else 200},
              "requestObject": obj if verb != "delete" else None, "responseObject": obj if verb != "delete" else None,
              "requestReceivedTimestamp": _rfc_ns(ts), "stageTimestamp": _rfc_ns(ts + 0.01)}
        ev = {k: v for k, v in ev.items() if v is not None}
        line = json.dumps(ev, separators=(",", ":"))
        self.audit.append(json.dumps({"labels": {"job": "kube-apiserver-audit"}, "line": line,
                                      "timestamp": _rfc_ns(ts + 0.2)}, separators=(",", ":")))

    def ingest(self, tmp: Path, filters: object | None = None) -> Path:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "mesh.jsonl").write_text("\n".join(self.lines) + "\n")
        paths = [str(tmp / "mesh.jsonl")]
        if self.audit:
            (tmp / "audit.jsonl").write_text("\n".join(self.audit) + "\n")
            paths.append(str(tmp / "audit.jsonl"))
        db = tmp / "store.duckdb"
        ingest_files(str(db), paths, progress=False, filters=filters)  # type: ignore[arg-type]
        return db


def request(mesh: Mesh, ts: float, rid: str, *, ratings_fail: bool = False, ads_fail: bool = False,
            slow_reviews: int = 0) -> None:
    """gateway -> frontend -> reviews -> ratings (critical), frontend -> ads (optional)."""
    status = 500 if ratings_fail else 200
    mesh.hop(ts, "istio-ingressgateway", "frontend", rid, path="/product/12", code=503 if ratings_fail else 200,
             dur=40 + slow_reviews)
    mesh.hop(ts + 0.002, "frontend", "reviews", rid, path="/reviews/12", code=503 if ratings_fail else 200,
             dur=20 + slow_reviews)
    mesh.hop(ts + 0.004, "reviews", "ratings", rid, path="/ratings/12", code=status, dur=5)
    mesh.hop(ts + 0.010, "frontend", "ads", rid, path="/ads", code=500 if ads_fail else 200, dur=3)


def incident_mesh(minutes: int = 40, onset_min: int = 25, per_min: int = 30, *,
                  noisy: bool = True, kind: str = "errors") -> Mesh:
    """Normal traffic, then from ``onset_min`` ratings answers 500 to half the requests (which fail up
    to the frontend) -- or, ``kind="latency"``, reviews gets 300 ms slower -- while ``ads`` fails a third
    of its calls all along (optional: the frontend recovers)."""
    rng = np.random.default_rng(7)
    mesh = Mesh()
    for m in range(minutes):
        for i in range(per_min):
            ts = T0 + m * 60 + i * (60 / per_min) + float(rng.uniform(0, 0.5))
            during = m >= onset_min
            request(mesh, ts, f"req-{m:03d}-{i:03d}", ratings_fail=during and kind == "errors" and i % 2 == 0,
                    ads_fail=noisy and i % 3 == 0,
                    slow_reviews=int(rng.integers(250, 350)) if during and kind == "latency" else int(rng.integers(0, 8)))
    return mesh


def open_ro(db: Path):
    return open_store(db, read_only=True)


def cached_store(tmp_path_factory: pytest.TempPathFactory, key: str, build) -> Path:
    """Build a store once per test session (several test files share the same small datasets)."""
    if key not in _CACHE:
        _CACHE[key] = build(tmp_path_factory.mktemp(key))
    return _CACHE[key]


def simulated_store(tmp: Path, scenario) -> tuple[Path, dict]:
    """Simulate ``scenario`` into ``tmp`` and ingest it; returns (db, ground truth dict)."""
    from meshlens.simulate import simulate

    gt = simulate(scenario, tmp)
    db = tmp / "store.duckdb"
    ingest_files(str(db), sorted(str(p) for p in tmp.glob("*.jsonl.gz")), progress=False)
    return db, gt.to_dict()
