"""The mesh simulator: deterministic, byte-exact real formats, coherent request chains, visible incidents,
consistent ground truth. Formats are checked against the real records in ../shared/samples."""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshlens.errors import ConfigError
from meshlens.simulate import (
    AUDIT_FILE,
    EVAL_CASES,
    GroundTruth,
    IncidentSpec,
    NoisySpec,
    Scenario,
    default_scenario,
    get_topology,
    scenarios_for_evaluation,
    simulate,
)
from meshlens.simulate.cluster import Cluster
from meshlens.simulate.model import parse_ts
from meshlens.simulate.plan import Planner
from meshlens.simulate.render import go_json_string, go_rfc3339_nano

ROOT = Path(__file__).resolve().parents[2]

# The Istio default TEXT layout, written from the istio.io access-log task sample; validated on the real
# sample lines in test_text_regex_matches_real_samples before being trusted on ours.
TEXT_RE = re.compile(
    r'^\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<proto>\S+)" (?P<code>\d+) (?P<flags>\S+) '
    r'(?P<details>\S+) (?P<term>\S+) "(?P<tfr>[^"]*)" (?P<rx>\d+) (?P<tx>\d+) (?P<dur>\d+) (?P<ust>\d+|-) '
    r'"(?P<xff>[^"]*)" "(?P<ua>[^"]*)" "(?P<rid>[^"]*)" "(?P<auth>[^"]*)" "(?P<uhost>[^"]*)" (?P<cluster>\S+) '
    r'(?P<ulocal>\S+) (?P<dlocal>\S+) (?P<dremote>\S+) (?P<sni>\S+) (?P<route>\S+)$')
TOKEN_RE = re.compile(r'"[^"]*"|\[[^\]]*\]|\S+')
GO_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?Z$")
ENVOY_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _signature(line: str) -> list[str]:
    return ["t" if t.startswith("[") else "q" if t.startswith('"') else "b" for t in TOKEN_RE.findall(line)]


def _read_jsonl_gz(path: Path) -> list[tuple[str, dict[str, Any]]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [(raw.rstrip("\n"), json.loads(raw)) for raw in fh]


def _access(rec: dict[str, Any]) -> dict[str, Any] | None:
    """Normalize one of our Istio access lines (text or JSON) to a dict; None for other lines."""
    line = rec["line"]
    if line.startswith("[20"):  # Linkerd's own log lines start with "[  <seconds>s]"
        m = TEXT_RE.match(line)
        assert m, f"text line does not match the Istio layout: {line}"
        d = m.groupdict()
        d["code"] = int(d["code"])
        d["dur"] = int(d["dur"])
        d["ust"] = None if d["ust"] == "-" else int(d["ust"])
        d["_format"] = "text"
    elif line.startswith("{") and '"start_time"' in line:
        j = json.loads(line)
        d = {"start": j["start_time"], "method": j["method"], "path": j["path"], "code": j["response_code"],
             "flags": j["response_flags"], "details": j["response_code_details"] or "-",
             "dur": j["duration"], "ust": None if j["upstream_service_time"] is None else int(j["upstream_service_time"]),
             "rid": j["request_id"], "auth": j["authority"], "uhost": j["upstream_host"] or "-",
             "cluster": (j["upstream_cluster"] or "-").rstrip(";"), "ulocal": j["upstream_local_address"] or "-",
             "dlocal": j["downstream_local_address"], "dremote": j["downstream_remote_address"],
             "sni": j["requested_server_name"] or "-", "ua": j["user_agent"], "tfr": j["upstream_transport_failure_reason"],
             "_format": "json"}
    else:
        return None
    d["pod"] = rec["labels"]["pod"]
    d["app"] = rec["labels"]["app"]
    d["ns"] = rec["labels"]["namespace"]
    d["start_ms"] = parse_ts(d["start"]) // 1000
    return d


def _small(name: str = "t", **kw: Any) -> Scenario:
    base = dict(name=name, seed=11, topology="shop", duration_s=1800, entry_rate=1.0, istio_format="mixed",
                incidents=[IncidentSpec(kind="authz_deny", onset_s=900, decoys=3)],
                noisy=NoisySpec(mode="burst"), benign_changes_per_hour=4, read_only_per_hour=20,
                health_check_period_s=300)
    base.update(kw)
    return Scenario(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    out = tmp_path_factory.mktemp("sim")
    gt = simulate(_small(linkerd=True), out)
    return out, gt


@pytest.fixture(scope="module")
def records(small: tuple[Path, GroundTruth]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    out, gt = small
    return {name: _read_jsonl_gz(out / name) for name in gt.files}


@pytest.fixture(scope="module")
def access(records: dict[str, list[tuple[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    rows = []
    for name, recs in records.items():
        if name == AUDIT_FILE:
            continue
        for _raw, rec in recs:
            a = _access(rec)
            if a is not None:
                rows.append(a)
    return rows


# ---------------------------------------------------------------- determinism

def test_same_seed_gives_identical_bytes(tmp_path: Path, small: tuple[Path, GroundTruth]) -> None:
    out, gt = small
    again = tmp_path / "again"
    simulate(_small(linkerd=True), again)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    # gzip header: no file name, mtime 0
    head = (out / "storefront.jsonl.gz").read_bytes()[:10]
    assert head[:3] == b"\x1f\x8b\x08" and head[3] == 0 and head[4:8] == b"\x00\x00\x00\x00"


def test_other_seed_gives_other_data(tmp_path: Path, small: tuple[Path, GroundTruth]) -> None:
    out, _ = small
    simulate(replace(_small(linkerd=True), seed=12), tmp_path)
    assert (out / "storefront.jsonl.gz").read_bytes() != (tmp_path / "storefront.jsonl.gz").read_bytes()


# ---------------------------------------------------------------- formats

def test_logcli_jsonl_envelope(records: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
    seen_amp = False
    for name, recs in records.items():
        assert recs, name
        last = ""
        for raw, rec in recs:
            # Go's json.Marshal of a map: keys sorted -> labels, line, timestamp; HTML-safe escaping
            assert raw.startswith('{"labels":{') and list(rec) == ["labels", "line", "timestamp"]
            assert not re.search(r"[<>&]", raw), raw
            seen_amp = seen_amp or "\\u0026" in raw
            assert GO_TIME_RE.match(rec["timestamp"]), rec["timestamp"]
            assert rec["timestamp"] >= last  # export order = Loki timestamp order
            last = rec["timestamp"]
            labels = rec["labels"]
            assert list(labels) == sorted(labels)
            if name == AUDIT_FILE:
                assert labels == {"job": "kube-apiserver-audit"}
            else:
                assert set(labels) == {"app", "container", "namespace", "pod"}
                assert labels["container"] in ("istio-proxy", "linkerd-proxy")
                assert re.fullmatch(re.escape(labels["app"]) + r"-[bcdfghjklmnpqrstvwxz2456789]{9,10}-"
                                    r"[bcdfghjklmnpqrstvwxz2456789]{5}", labels["pod"]), labels["pod"]
                assert name == f"{labels['namespace']}.jsonl.gz"
    assert seen_amp, "query strings with & should appear, escaped as \\u0026 like Go does"


def test_go_encoding_helpers() -> None:
    assert go_rfc3339_nano(1714557600_123456789) == "2024-05-01T10:00:00.123456789Z"
    assert go_rfc3339_nano(1714557600_120000000) == "2024-05-01T10:00:00.12Z"
    assert go_rfc3339_nano(1714557600_000000000) == "2024-05-01T10:00:00Z"
    assert go_json_string('a<b>&"c"\n\u2028') == '"a\\u003cb\\u003e\\u0026\\"c\\"\\n\\u2028"'


def test_text_regex_matches_real_samples(shared_samples: Path) -> None:
    lines = (shared_samples / "istio/istio_io_access_log_task.log").read_text().splitlines()
    lines += (shared_samples / "istio/istio_pr27903_response_code_details.log").read_text().splitlines()[:1]
    lines += (shared_samples / "istio/istio_issue40944_rbac_bad_custom_action.log").read_text().splitlines()
    for line in lines:
        assert TEXT_RE.match(line), line
        assert _signature(line) == _signature(lines[0])


def test_text_lines_have_the_real_token_layout(shared_samples: Path, access: list[dict[str, Any]],
                                               records: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
    real = (shared_samples / "istio/istio_io_access_log_task.log").read_text().splitlines()[0]
    sig = _signature(real)
    n = 0
    for recs in records.values():
        for _raw, rec in recs:
            if rec["line"].startswith("[20"):
                assert _signature(rec["line"]) == sig, rec["line"]
                n += 1
    assert n > 1000
    for a in access:
        assert ENVOY_TIME_RE.match(a["start"])
        assert a["cluster"] == "-" or re.fullmatch(r"outbound\|\d+\|\|[a-z0-9-]+\.[a-z0-9-]+\.svc\.cluster\.local"
                                                   r"|inbound\|\d+\|\|", a["cluster"]), a["cluster"]


def test_json_lines_have_the_real_keys_and_types(shared_samples: Path,
                                                 records: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
    sample = json.loads((shared_samples / "istio/istio_issue48018_json_typed.jsonl").read_text().splitlines()[0])
    assert len(sample) == 24
    orders = set()
    n = 0
    for recs in records.values():
        for _raw, rec in recs:
            line = rec["line"]
            if not (line.startswith("{") and '"start_time"' in line):
                continue
            j = json.loads(line)
            assert set(j) == set(sample)
            for k, v in j.items():
                if isinstance(sample[k], int):
                    assert isinstance(v, int), (k, v)
                else:  # strings (or null when empty) -- never numbers, never "-" except response_flags
                    assert v is None or isinstance(v, str), (k, v)
                    assert v != "-" or k == "response_flags", (k, line)
            assert isinstance(j["upstream_service_time"], str | None)
            assert j["response_flags"] is not None
            orders.add(tuple(j))
            n += 1
    assert n > 1000
    assert len(orders) > 1, "key order is per proxy (Envoy SortProperties=false), not one global order"


def test_linkerd_json_matches_real_sample(shared_samples: Path,
                                          records: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
    sample = json.loads((shared_samples / "linkerd/linkerd_docs_2.12_access_log_json.jsonl").read_text()
                        .splitlines()[0])
    recs = [json.loads(r["line"]) for _, r in records["booksapp.jsonl.gz"] if r["line"].startswith("{")]
    assert len(recs) > 50
    for j in recs:
        assert list(j) == list(sample)  # same keys, same (sorted) order
        assert isinstance(j["status"], int)
        assert all(isinstance(j[k], str) for k in j if k != "status")
        assert j["total_ns"].isdigit() and re.fullmatch(r"\d{4}-.*T.*\.\d{9}Z", j["timestamp"])
    assert any(j["client.id"].endswith(".serviceaccount.identity.linkerd.cluster.local") for j in recs)
    assert any(j["user_agent"].startswith("kube-probe/") and j["client.id"] == "-" for j in recs)


def test_non_access_proxy_lines_and_health_checks(tmp_path: Path, access: list[dict[str, Any]]) -> None:
    sc = _small(name="rollout", seed=4, linkerd=True, benign_changes_per_hour=12,
                incidents=[IncidentSpec(kind="bad_rollout", variant="errors", onset_s=900)])
    gt = simulate(sc, tmp_path)
    other = [r["line"] for name in gt.files if name != AUDIT_FILE for _, r in _read_jsonl_gz(tmp_path / name)
             if not r["line"].startswith(("[20", "{"))]
    assert len(other) == gt.counts["proxy_lines"] > 0
    # a rollout starts new pods: their istio-proxy prints pilot-agent start-up lines (istio#31555 layout)
    assert any(re.fullmatch(r"\S+Z\tinfo\tEnvoy proxy is ready", x) for x in other)
    assert any(re.fullmatch(r"\S+Z\tinfo\tInitialization took \d+\.\d+s", x) for x in other)
    assert any("xdsproxy\tconnected to upstream XDS server" in x for x in other)
    new_pods = {p["pod"] for p in gt.topology["pods"] if p["start"]}
    assert new_pods
    probes = [a for a in access if a["ua"] == "kube-probe/1.29"]
    assert probes and all(a["path"] in ("/healthz", "/ready") and a["cluster"].startswith("inbound|")
                          and a["sni"] == "-" for a in probes)


# ---------------------------------------------------------------- request chains and timing

def test_every_hop_has_client_and_server_records(access: list[dict[str, Any]]) -> None:
    servers = [a for a in access if a["cluster"].startswith("inbound|") and a["ua"] != "kube-probe/1.29"]
    clients = [a for a in access if a["cluster"].startswith("outbound|")]
    by_socket = {(c["rid"], c["ulocal"]): c for c in clients}
    assert len(servers) > 1000
    for s in servers:
        c = by_socket.get((s["rid"], s["dremote"]))
        assert c is not None, f"no client record for server record {s}"
        port, host = re.fullmatch(r"outbound\|(\d+)\|\|(.+)", c["cluster"]).groups()  # type: ignore[union-attr]
        assert s["sni"] == f"outbound_.{port}_._.{host}"
        assert s["cluster"] == f"inbound|{c['uhost'].rsplit(':', 1)[1]}||"
        assert c["uhost"] == s["dlocal"] and s["path"] == c["path"] and s["auth"] == c["auth"]
        if c["app"] != "istio-ingressgateway":
            same_ns = host.split(".")[1] == c["ns"]
            svc = host.split(".")[0]
            assert c["auth"] == (f"{svc}:{port}" if same_ns else f"{svc}.{host.split('.')[1]}:{port}")
    # every client record that reached an Istio upstream has its server record
    server_keys = {(s["rid"], s["dremote"]) for s in servers}
    reached = [c for c in clients if c["details"] == "via_upstream" and not c["cluster"].startswith(
        "outbound|700")]  # booksapp (Linkerd) servers log in their own format
    assert reached and all((c["rid"], c["ulocal"]) in server_keys for c in reached)
    # one request id follows a request through several hops
    hops = defaultdict(int)
    for s in servers:
        hops[s["rid"]] += 1
    assert max(hops.values()) >= 4


def test_latencies_compose(access: list[dict[str, Any]]) -> None:
    clients = {(a["rid"], a["ulocal"]): a for a in access if a["cluster"].startswith("outbound|")}
    by_pod_rid = defaultdict(list)
    for a in access:
        if a["cluster"].startswith("outbound|"):
            by_pod_rid[(a["pod"], a["rid"])].append(a)
    checked = 0
    for s in access:
        if not s["cluster"].startswith("inbound|") or s["ua"] == "kube-probe/1.29" or s["code"] == 0:
            continue
        c = clients[(s["rid"], s["dremote"])]
        assert c["dur"] >= s["dur"] and c["ust"] is not None and c["ust"] >= s["dur"]
        assert s["ust"] is None or s["ust"] <= s["dur"]
        assert c["start_ms"] <= s["start_ms"]
        for child in by_pod_rid[(s["pod"], s["rid"])]:
            if s["start_ms"] <= child["start_ms"] <= s["start_ms"] + s["dur"] and child["flags"] != "UT":
                assert child["dur"] <= s["dur"], (s, child)
                assert child["start_ms"] + child["dur"] <= s["start_ms"] + s["dur"] + 1
                checked += 1
    assert checked > 1000


def test_errors_propagate_to_the_symptom(access: list[dict[str, Any]], small: tuple[Path, GroundTruth]) -> None:
    _, gt = small
    inc = gt.incidents[0]
    onset, end = parse_ts(inc["onset"]) // 1000, parse_ts(inc["end"]) // 1000
    caller, target = inc["affected_edges"][0].split("->")
    denied = {a["rid"] for a in access if a["app"] == caller and a["code"] == 403
              and a["cluster"].endswith(f"||{target}.{inc['root_cause_namespace']}.svc.cluster.local")}
    assert denied
    symptom_inbound = {a["rid"]: a for a in access if a["app"] == inc["symptom_service"]
                       and a["cluster"].startswith("inbound|") and a["ua"] != "kube-probe/1.29"}
    codes = [symptom_inbound[r]["code"] for r in denied if r in symptom_inbound]
    assert codes and all(c >= 500 for c in codes)
    gateway = [a for a in access if a["app"] == "istio-ingressgateway" and a["rid"] in denied]
    assert gateway and all(a["code"] >= 500 and a["details"] == "via_upstream" for a in gateway)
    assert all(onset <= a["start_ms"] < end + 1 for a in gateway)


# ---------------------------------------------------------------- incidents show up at the onset

def _edge_ratio(access: list[dict[str, Any]], gt: GroundTruth, pred: Any, side: str = "client") -> tuple[float, float]:
    inc = gt.incidents[0]
    onset, end = parse_ts(inc["onset"]) // 1000, parse_ts(inc["end"]) // 1000
    edges = {tuple(e.split("->")) for e in inc["affected_edges"]}
    before, after = [], []
    for a in access:
        if a["ua"] == "kube-probe/1.29":
            continue
        m = re.fullmatch(r"outbound\|\d+\|\|([^.]+)\..*", a["cluster"]) if side == "client" else None
        if side == "client":
            if not m and a["flags"] not in ("NR", "NC"):
                continue
            tgt = m.group(1) if m else a["auth"].split(":")[0].split(".")[0]
            if (a["app"], tgt) not in edges:
                continue
        else:
            if not a["cluster"].startswith("inbound|") or a["app"] != inc["root_cause_service"]:
                continue
        if a["start_ms"] < onset - 30_000:
            before.append(pred(a))
        elif onset + 60_000 <= a["start_ms"] < end:
            after.append(pred(a))
    assert len(before) > 20 and len(after) > 20, (len(before), len(after))
    return sum(before) / len(before), sum(after) / len(after)


@pytest.mark.parametrize("kind,variant,check,side,lo,hi", [
    ("authz_deny", None, lambda a: a["code"] == 403 and "rbac_access_denied_matched_policy[ns[" in a["details"],
     "server", 0.0, 0.95),
    ("route_broken", "no_route", lambda a: a["code"] == 404 and a["flags"] == "NR" and a["details"] == "route_not_found",
     "client", 0.0, 0.95),
    ("route_broken", "no_cluster", lambda a: a["code"] == 503 and a["flags"] == "NC", "client", 0.0, 0.3),
    ("tls_failure", "verify_failed", lambda a: a["flags"] == "UF,URX" and "CERTIFICATE_VERIFY_FAILED" in a["details"]
     and "CERTIFICATE_VERIFY_FAILED" in (a["tfr"] or ""), "client", 0.0, 0.95),
    ("rate_limit", "low_limit", lambda a: a["code"] == 429 and a["flags"] == "RL", "server", 0.0, 0.2),
    ("bad_rollout", "errors", lambda a: a["code"] == 500, "server", 0.02, 0.5),
    ("connection_failure", None, lambda a: a["code"] == 503 and a["flags"] == "UF,URX", "client", 0.01, 0.2),
    ("app_errors", None, lambda a: a["code"] == 503, "server", 0.02, 0.3),
])
def test_incident_signature_appears_at_onset(tmp_path: Path, kind: str, variant: str | None, check: Any,
                                            side: str, lo: float, hi: float) -> None:
    sc = _small(name=kind, seed=21, topology="bank", istio_format="text", details_style="comma",
                incidents=[IncidentSpec(kind=kind, variant=variant, onset_s=900, decoys=2)], noisy=None)
    gt = simulate(sc, tmp_path)
    rows = [a for name in gt.files if name != AUDIT_FILE for _, r in _read_jsonl_gz(tmp_path / name)
            if (a := _access(r)) is not None]
    before, after = _edge_ratio(rows, gt, check, side)
    assert before <= lo, (before, after)
    assert after >= hi, (before, after)


def test_latency_incident_slows_target_and_callers(tmp_path: Path) -> None:
    sc = _small(name="lat", seed=5, topology="streaming", istio_format="json",
                incidents=[IncidentSpec(kind="latency", variant="slow_release", onset_s=900, severity=250)],
                noisy=None)
    gt = simulate(sc, tmp_path)
    rows = [a for name in gt.files if name != AUDIT_FILE for _, r in _read_jsonl_gz(tmp_path / name)
            if (a := _access(r)) is not None]
    before, after = _edge_ratio(rows, gt, lambda a: a["dur"], side="server")
    assert after > 2.5 * max(before, 1)
    inc = gt.incidents[0]
    onset = parse_ts(inc["onset"]) // 1000
    via_target = {a["rid"] for a in rows if a["app"] == inc["root_cause_service"] and a["cluster"].startswith("inbound|")}
    sym = [a for a in rows if a["app"] == inc["symptom_service"] and a["cluster"].startswith("inbound|")
           and a["rid"] in via_target]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    # users' requests that go through the slow service get slower (latency propagates up the path)
    assert med([a["dur"] for a in sym if a["start_ms"] > onset + 120_000]) > \
        2 * med([a["dur"] for a in sym if a["start_ms"] < onset])
    # the new (slow) pods come from a new ReplicaSet
    assert inc["bad_replicaset"] and any(inc["bad_replicaset"] in a["pod"] for a in rows)


def test_tls_pipe_style_matches_newer_envoy(tmp_path: Path, shared_samples: Path) -> None:
    sc = _small(name="tls", seed=3, topology="shop", istio_format="text", details_style="pipe",
                incidents=[IncidentSpec(kind="tls_failure", variant="verify_failed", onset_s=900)], noisy=None)
    gt = simulate(sc, tmp_path)
    lines = [r["line"] for name in gt.files if name != AUDIT_FILE for _, r in _read_jsonl_gz(tmp_path / name)
             if "TLS_error" in r["line"]]
    assert lines
    real = [x for x in (shared_samples / "istio/istio_pr52886_hbone_transport_errors.log").read_text().splitlines()
            if "TLS_error" in x][0]
    real_reason = re.search(r'"(TLS_error:\|[^"]+)"', real).group(1)  # type: ignore[union-attr]
    ours = re.search(r'"(TLS_error:\|[^"]+)"', lines[0]).group(1)  # type: ignore[union-attr]
    assert re.sub(r"\|[^|]*CERTIFICATE_VERIFY_FAILED", "", real_reason).startswith("TLS_error:")
    assert ours.endswith(":CERTIFICATE_VERIFY_FAILED:TLS_error_end") and real_reason.endswith(
        ":CERTIFICATE_VERIFY_FAILED:TLS_error_end")
    assert " 503 UF,URX upstream_reset_before_response_started{remote_connection_failure|TLS_error:|" in lines[0]


# ---------------------------------------------------------------- audit events and ground truth

def test_audit_events_have_the_required_fields(shared_samples: Path, small: tuple[Path, GroundTruth],
                                               records: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
    _, gt = small
    sample = json.loads((shared_samples / "k8s-audit/falco_create_secret.json").read_text())
    events = [json.loads(r["line"]) for _, r in records[AUDIT_FILE]]
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        assert set(ev) <= set(sample) | {"impersonatedUser"}
        for k in ("kind", "apiVersion", "level", "auditID", "stage", "requestURI", "verb", "user", "sourceIPs",
                  "userAgent", "objectRef", "responseStatus", "requestReceivedTimestamp", "stageTimestamp",
                  "annotations"):
            assert k in ev, (k, ev)
        assert ev["kind"] == "Event" and ev["apiVersion"] == "audit.k8s.io/v1"
        assert ev["stage"] in ("ResponseComplete", "ResponseStarted")
        assert ev["requestReceivedTimestamp"] <= ev["stageTimestamp"]
        assert ev["annotations"]["authorization.k8s.io/decision"] in ("allow", "forbid")
        by_id[ev["auditID"]].append(ev)
        if ev["verb"] in ("create", "patch", "update", "delete") and ev["level"] == "RequestResponse":
            assert "requestObject" in ev and "responseObject" in ev
            if ev["verb"] != "delete" and ev["objectRef"]["resource"] != "configmaps":
                assert "spec" in ev["requestObject"] and "spec" in ev["responseObject"], ev
    for evs in by_id.values():  # only watches have two stages, and then Started + Complete
        assert len(evs) == 1 or sorted(e["stage"] for e in evs) == ["ResponseComplete", "ResponseStarted"]
    verbs = {ev["verb"] for ev in events}
    assert {"get", "list", "watch", "create", "patch"} <= verbs
    users = {ev["user"]["username"] for ev in events}
    assert {"alice@example.com", "system:serviceaccount:argocd:argocd-application-controller"} <= users
    # every change in the ground truth is one audit event, with the same target
    for ch in gt.changes:
        evs = by_id[ch["audit_id"]]
        assert len(evs) == 1, ch
        ref = evs[0]["objectRef"]
        assert (ref["namespace"], ref["name"]) == (ch["namespace"], ch["name"])
        assert evs[0]["stageTimestamp"][:19] == ch["ts"][:19]
        assert evs[0]["user"]["username"] == ch["actor"] and evs[0]["verb"] == ch["verb"]
        assert ref["resource"] == {"AuthorizationPolicy": "authorizationpolicies", "VirtualService": "virtualservices",
                                   "DestinationRule": "destinationrules", "EnvoyFilter": "envoyfilters",
                                   "PeerAuthentication": "peerauthentications", "Deployment": "deployments",
                                   "ConfigMap": "configmaps"}[ch["kind"]]


def test_helm_upgrade_is_audited_like_helm_does(tmp_path: Path) -> None:
    sc = _small(name="helm", seed=8, incidents=[IncidentSpec(kind="bad_rollout", actor="helm", onset_s=900)],
                noisy=None)
    gt = simulate(sc, tmp_path)
    events = [json.loads(r["line"]) for _, r in _read_jsonl_gz(tmp_path / AUDIT_FILE)]
    helm = [ev for ev in events if ev["userAgent"].startswith("Helm/")]
    secrets = [ev for ev in helm if ev["objectRef"]["resource"] == "secrets"]
    assert secrets and all(ev["level"] == "Metadata" and "requestObject" not in ev for ev in secrets)
    names = [ev["objectRef"].get("name", "") for ev in secrets]
    assert any(re.fullmatch(r"sh\.helm\.release\.v1\.[a-z-]+\.v\d+", n) for n in names)
    assert {ev["verb"] for ev in secrets} == {"list", "create", "update"}
    change = gt.incidents[0]["change"]
    assert change["actor"] == "system:serviceaccount:ci:helm-deployer" and change["kind"] == "Deployment"
    assert change["helm_release"] and f"HelmRelease/{change['namespace']}/{change['name']}" in change["accepted_targets"]
    patch = next(ev for ev in helm if ev["auditID"] == change["audit_id"])
    image = patch["responseObject"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert patch["verb"] == "patch" and patch["requestObject"]["spec"]["template"]["spec"]["containers"][0]["image"] == image
    assert any(image.endswith(":" + p["image"].rsplit(":", 1)[1]) and p["replicaset"] == gt.incidents[0]["bad_replicaset"]
               for p in gt.topology["pods"])


def test_ground_truth_is_consistent(small: tuple[Path, GroundTruth]) -> None:
    out, gt = small
    loaded = GroundTruth.load(out / "ground_truth.json")
    assert loaded.to_dict() == json.loads(json.dumps(gt.to_dict()))
    assert Scenario.from_dict(loaded.scenario) == _small(linkerd=True)  # the scenario can be re-run
    topo = gt.topology
    edges = {e["edge"] for e in topo["edges"]}
    services = {s["name"] for s in topo["services"]}
    entries = {e["service"] for e in topo["entries"] if e["host"]}
    w0, w1 = parse_ts(gt.window_start), parse_ts(gt.window_end)
    for inc in gt.incidents:
        onset, end = parse_ts(inc["onset"]), parse_ts(inc["end"])
        assert w0 < onset < end <= w1
        assert inc["symptom_service"] in entries and inc["root_cause_service"] in services
        path = inc["symptom_path"]
        assert path[0] == inc["symptom_service"] and path[-1] == inc["root_cause_service"]
        assert all(f"{a}->{b}" in edges for a, b in zip(path, path[1:], strict=False))
        assert set(inc["affected_edges"]) <= edges
        assert inc["root_cause_service"] in inc["accepted_root_causes"]
        ch = inc["change"]
        assert ch is not None and ch["role"] == "cause"
        assert parse_ts(ch["ts"]) < onset and ch["target"].split("/")[0] == "AuthorizationPolicy"
        decoys = [c for c in gt.changes if c["role"] == "decoy" and c["incident"] == inc["id"]]
        assert len(decoys) >= 2 and [d["target"] for d in decoys] == inc["decoy_targets"]
        for d in decoys:
            assert abs(parse_ts(d["ts"]) - onset) < 25 * 60 * 1_000_000
            assert d["service"] not in path and d["target"] != ch["target"]
    assert gt.noisy is not None
    assert gt.noisy["service"] not in gt.incidents[0]["symptom_path"]
    for name, f in gt.files.items():
        assert (out / name).stat().st_size == f["bytes"]
    assert sum(f["records"] for n, f in gt.files.items() if n != AUDIT_FILE) == \
        gt.counts["access_records"] + gt.counts["proxy_lines"]


def test_evaluation_scenarios_are_varied_and_resolvable() -> None:
    scs = scenarios_for_evaluation(24)
    assert len(scs) == 24 and len({s.name for s in scs}) == 24
    assert {s.topology.split("-")[0] for s in scs} >= {"shop", "bank", "streaming", "random"}
    assert {s.istio_format for s in scs} == {"text", "json", "mixed"}
    assert {(s.incidents[0].kind, s.incidents[0].variant) for s in scs} == set(EVAL_CASES)
    with_change = 0
    for sc in scs:
        assert sc.noisy is not None and sc.incidents[0].decoys >= 2
        start = parse_ts(sc.start)
        end = start + int(sc.duration_s * 1e6)
        topo = get_topology(sc.topology, linkerd=sc.linkerd, seed=sc.seed)
        plan = Planner(sc, topo, Cluster(topo, sc.seed, start), start, end).plan()
        inc = plan.incidents[0]
        with_change += inc.cause is not None
        assert len(inc.decoys) >= 2 and plan.noisy is not None
        assert plan.noisy.service not in inc.path and plan.noisy.service != inc.target
        assert all(d.service not in inc.path for d in inc.decoys)
    assert 8 <= with_change <= 18


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown incident kind"):
        simulate(_small(incidents=[IncidentSpec(kind="meteor")]), tmp_path)
    with pytest.raises(ConfigError, match="never has a causing change"):
        simulate(_small(incidents=[IncidentSpec(kind="connection_failure", with_change=True)]), tmp_path)
    with pytest.raises(ConfigError, match="unknown topology"):
        simulate(_small(topology="mesh9000"), tmp_path)
    with pytest.raises(ConfigError, match="must be UTC"):
        simulate(_small(start="2024-05-01T00:00:00+02:00"), tmp_path)


# ---------------------------------------------------------------- integration with the real parser

def test_ingest_has_no_access_rejects(tmp_path: Path, small: tuple[Path, GroundTruth]) -> None:
    ingest = pytest.importorskip("meshlens.ingest")
    import duckdb

    out, gt = small
    db = tmp_path / "sim.duckdb"
    files = sorted(str(out / n) for n in gt.files)
    counts = ingest.ingest_files(db, files, progress=False)
    assert counts.read == sum(f["records"] for f in gt.files.values())
    con = duckdb.connect(str(db), read_only=True)
    try:
        rejects = con.sql("SELECT raw FROM rejects").fetchall()
        stats = dict(con.sql("SELECT event_type, count(*) FROM events GROUP BY 1").fetchall())
    finally:
        con.close()
    started = sum(1 for _, r in _read_jsonl_gz(out / AUDIT_FILE) if '"stage":"ResponseStarted"' in r["line"])
    access_like = [r for (r,) in rejects if r.startswith("[20") or '"start_time"' in r or '"client.addr"' in r]
    assert access_like == [], access_like[:3]
    assert len(rejects) == gt.counts["proxy_lines"] + started
    assert stats.get("config_change", 0) >= gt.counts["config_changes"]
    # health checks are filtered at ingest by default (counted, not lost)
    assert stats["request"] + stats.get("authz", 0) + stats.get("tls", 0) + counts.filtered == \
        gt.counts["access_records"]


# ---------------------------------------------------------------- CLI and the shipped sample

def test_cli_writes_dataset_and_readme(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from meshlens.cli.simulate import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "d"
    res = CliRunner().invoke(app, ["--out", str(out), "--preset", "eval", "--index", "2", "--hours", "0.5",
                                   "--rate", "0.5", "--format", "json"])
    assert res.exit_code == 0, res.output
    readme = (out / "README.md").read_text()
    assert f"python -m meshlens.simulate --out {out} --seed 7 --preset eval --index 2" in readme
    assert (out / "ground_truth.json").exists() and (out / AUDIT_FILE).exists()
    bad = CliRunner().invoke(app, ["--out", str(out), "--preset", "nope"])
    assert bad.exit_code != 0


def test_shipped_sample_is_reproducible(tmp_path: Path) -> None:
    samples = ROOT / "data" / "samples"
    if not (samples / "ground_truth.json").exists():
        pytest.skip("data/samples not generated yet (python -m meshlens.simulate --out data/samples --seed 7)")
    gt = GroundTruth.load(samples / "ground_truth.json")
    assert gt.scenario == default_scenario(7).to_dict()
    total = sum((samples / n).stat().st_size for n in gt.files)
    assert total <= 6_500_000
    again = simulate(default_scenario(7), tmp_path)
    assert (samples / "ground_truth.json").read_bytes() == (tmp_path / "ground_truth.json").read_bytes()
    for name in again.files:  # content, not deflate bytes: another zlib build may compress differently
        assert gzip.decompress((samples / name).read_bytes()) == gzip.decompress((tmp_path / name).read_bytes()), name


# ---------------------------------------------------------------- gRPC meshes and short log windows


def test_grpc_failures_are_http_200_with_a_grpc_status(tmp_path: Path) -> None:
    """Scenario.grpc: service-to-service calls are gRPC (POST /<ns>.<Service>/<Method>, HTTP/2) and logged
    with Envoy's %GRPC_STATUS% names; failing calls are HTTP 200 with a failing status -- application
    errors and Envoy's local replies alike -- and ingest turns the names into codes the analyses count."""
    from meshlens.analysis.common import GRPC_FAILED
    from meshlens.ingest import ingest_files
    from meshlens.store import open_store

    sc = _small("grpc", grpc=True, istio_format="text", duration_s=1200,
                incidents=[IncidentSpec(kind="app_errors", onset_s=700, decoys=0, severity=0.8)])
    gt = simulate(sc, tmp_path)
    grpc_lines = []
    for name in gt.files:
        if name == AUDIT_FILE:
            continue
        for _raw, rec in _read_jsonl_gz(tmp_path / name):
            line = rec["line"]
            if line.startswith("{") and '"grpc_status"' in line:
                grpc_lines.append(json.loads(line))
    called = [j for j in grpc_lines if j["grpc_status"] is not None]
    assert called and all(j["protocol"] == "HTTP/2" and j["method"] == "POST" for j in called)
    assert all(re.fullmatch(r"/[a-z-]+\.[A-Za-z]+/[A-Za-z]+", j["path"]) for j in called)
    codes = {j["response_code"] for j in called if j["grpc_status"] != "OK"}
    assert codes <= {0, 200} and {j["grpc_status"] for j in called} >= {"OK", "Unavailable"}
    db = tmp_path / "s.duckdb"
    ingest_files(str(db), sorted(str(p) for p in tmp_path.glob("*.jsonl.gz")), progress=False)
    with open_store(str(db), read_only=True) as store:
        failed = store.scalar(f"SELECT count(*) FROM events WHERE status = 200 AND grpc_status IN "
                              f"({', '.join(map(str, GRPC_FAILED))})")
        target = gt.incidents[0]["root_cause_service"]
        at_target = store.scalar("SELECT count(*) FROM events WHERE status = 200 AND grpc_status = 14 "
                                 "AND direction = 'inbound' AND dst_service = $t", {"t": target})
    assert failed > 0 and at_target > 0


def test_short_log_window_keeps_only_the_records_around_the_onset(tmp_path: Path) -> None:
    sc = _small("short", baseline_s=45, after_s=300, duration_s=1500,
                incidents=[IncidentSpec(kind="app_errors", onset_s=700, decoys=0)])
    gt = simulate(sc, tmp_path)
    onset = parse_ts(gt.incidents[0]["onset"])
    assert parse_ts(gt.window_start) == onset - 45_000_000 and parse_ts(gt.window_end) == onset + 300_000_000
    stamps = [parse_ts(rec["timestamp"].replace("Z", "").ljust(26, "0")[:26] + "Z")
              for name in gt.files if name != AUDIT_FILE for _raw, rec in _read_jsonl_gz(tmp_path / name)]
    assert stamps and min(stamps) >= onset - 45_000_000 and max(stamps) < onset + 300_000_000
    with pytest.raises(ConfigError, match="baseline_s"):
        simulate(_small("bad", baseline_s=30, incidents=[]), tmp_path / "bad")
