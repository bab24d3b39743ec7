"""Load the Online Boutique half of IntelligentDDS/Nezha (FSE'23) and render it as Istio sidecar records.

Nezha's ``rca_data/<day>/`` holds, per injected fault, one-minute trace files (``trace/HH_MM_trace.csv``:
``TraceID, SpanID, ParentID, PodName, OperationName, StartTimeUnixNano, EndTimeUnixNano, Duration`` in
microseconds) for the minute of the injection and the two after it, and ``<day>-fault_list.json`` with the
labels (``inject_time``, ``inject_pod`` -> root-cause service, ``inject_type`` -> fault kind). The Online
Boutique days are 2022-08-22 and 2022-08-23; the Train Ticket days (2023-01-*) are a hidden judge and are
never read here (:data:`OB_DAYS` is the only list of days this module opens).

Rendering (what Envoy sidecars would have written, nothing invented beyond addressing):

* an RPC is a span whose parent span ran in another pod: the parent is the *client* span (its caller's
  sidecar writes an ``outbound`` record with the client span's duration), the child the *server* span
  (the callee's sidecar writes an ``inbound`` record with the server span's duration);
* a root span (``hipstershop.Frontend/Recv.``, the load generator's HTTP request) gets only the entry
  service's inbound record -- the load generator is not meshed;
* spans within one pod (internal functions, SQL queries) are not sidecar traffic and are dropped;
* Nezha's traces carry no status: every record is ``200`` (gRPC over HTTP/2, ``grpc-status`` 0), exactly
  what the traces show. Faults that change only return values or throw exceptions handled inside a
  service therefore leave only their timing (and call-mix) footprint, which is the point of the test;
* request id = trace id (Envoy propagates ``x-request-id`` along the call tree the same way); addresses
  are derived from pod names (stable, fake IPs) so records pair up as real ones do.

The mirror is a bare git directory (``fetch github:IntelligentDDS/Nezha``); files are read with
``git show``. Some large trace files are absent from the mirror: a case needs its injection minute (the
pre-fault traffic) and at least one later minute, else it is skipped with the reason.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from meshlens.simulate.render import AccessRecord, istio_json, logcli_jsonl, logcli_labels_prefix

DEFAULT_MIRROR = "/work/.mirror/IntelligentDDS+Nezha/repo"
MIRROR_ENV = "MESHLENS_NEZHA"
OB_DAYS = ("2022-08-22", "2022-08-23")
"""Online Boutique only (the Train Ticket days are held back)."""
GRPC_PORT = 5050
NAMESPACE = "default"


def mirror_path(arg: str | None = None) -> Path:
    return Path(arg or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR)


def _git(mirror: Path, *args: str) -> bytes | None:
    r = subprocess.run(["git", "--git-dir", str(mirror), *args], capture_output=True)
    return r.stdout if r.returncode == 0 else None


def _show(mirror: Path, path: str) -> bytes | None:
    return _git(mirror, "show", f"HEAD:{path}")


def service_of(pod: str) -> str:
    """``frontend-579b9bff58-t2dbm`` -> ``frontend`` (Deployment pods: name-<rs hash>-<suffix>)."""
    parts = pod.split("-")
    return "-".join(parts[:-2]) if len(parts) > 2 else pod


@dataclass
class Case:
    """One labelled fault: where, what, when, and which minute files the mirror holds."""

    day: str
    inject_ns: int
    service: str
    kind: str
    minutes: list[str]
    present: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.day}T{pd.Timestamp(self.inject_ns, unit='ns'):%H:%M:%S}-{self.service}-{self.kind}"

    @property
    def usable(self) -> tuple[bool, str]:
        """Whether the mirror holds the fault's first trace file (the only one with pre-fault traffic)."""
        if not self.present:
            return False, "no trace file of this fault in the mirror"
        if self.present[0] != self.minutes[0]:
            return False, f"the injection minute's traces ({self.minutes[0]}) are absent: no pre-fault traffic"
        return True, ""


MIN_SIDE_S = 20.0
"""A case needs this much traffic before and after the injection (a file ``HH_MM`` holds about the minute
before ``HH:MM:20``, so the pre-fault part is 20-80 s)."""


def coverage(records: pd.DataFrame, inject_ns: int) -> tuple[bool, str]:
    """Whether the rendered records hold :data:`MIN_SIDE_S` of traffic on each side of the injection."""
    before = (inject_ns - records["start_ns"].min()) / 1e9
    after = (records["start_ns"].max() - inject_ns) / 1e9
    if before < MIN_SIDE_S or after < MIN_SIDE_S:
        return False, f"{before:.0f} s of traffic before the injection and {after:.0f} s after (< {MIN_SIDE_S:.0f} s)"
    return True, ""


def load_cases(mirror: Path) -> list[Case]:
    """All Online Boutique fault labels, with the trace minutes the mirror holds for each."""
    cases = []
    for day in OB_DAYS:
        raw = _show(mirror, f"rca_data/{day}/{day}-fault_list.json")
        if raw is None:
            continue
        listing = _git(mirror, "ls-tree", "-l", "HEAD", f"rca_data/{day}/trace/") or b""
        have = set()
        for line in listing.decode().splitlines():
            meta, path = line.split("\t")
            if _git(mirror, "cat-file", "-e", meta.split()[2]) is not None:  # listed but maybe absent
                have.add(Path(path).name[:5])
        for faults in json.loads(raw).values():
            for f in faults:
                ts = pd.Timestamp(int(f["inject_timestamp"]), unit="s")
                minutes = [(ts.floor("min") + pd.Timedelta(minutes=k)).strftime("%H_%M") for k in range(3)]
                cases.append(Case(day=day, inject_ns=ts.value, service=service_of(f["inject_pod"]),
                                  kind=f["inject_type"], minutes=minutes,
                                  present=[m for m in minutes if m in have]))
    return sorted(cases, key=lambda c: c.inject_ns)


def read_spans(mirror: Path, case: Case) -> pd.DataFrame:
    """The spans of the case's present minutes (a missing middle minute is a gap in the logs, as a log
    pipeline outage would leave)."""
    frames = []
    for m in case.present:
        raw = _show(mirror, f"rca_data/{case.day}/trace/{m}_trace.csv")
        if raw is None:
            continue
        frames.append(pd.read_csv(io.BytesIO(raw), dtype={"TraceID": str, "SpanID": str, "ParentID": str}))
    return pd.concat(frames, ignore_index=True).drop_duplicates("SpanID") if frames else pd.DataFrame()


def _ip(pod: str) -> str:
    h = hashlib.sha1(pod.encode()).digest()
    return f"10.{h[0]}.{h[1]}.{max(h[2], 2)}"


def rpc_records(spans: pd.DataFrame) -> pd.DataFrame:
    """One row per sidecar record: ``pod, direction, start_ns, dur_us, trace, callee, op``."""
    s = spans.rename(columns={"TraceID": "trace", "SpanID": "span", "ParentID": "parent", "PodName": "pod",
                              "OperationName": "op", "StartTimeUnixNano": "start_ns", "Duration": "dur_us"})
    s = s[["trace", "span", "parent", "pod", "op", "start_ns", "dur_us"]]
    parent = s[["span", "pod", "op", "start_ns", "dur_us"]].rename(
        columns={"span": "parent", "pod": "ppod", "op": "pop", "start_ns": "pstart", "dur_us": "pdur"})
    j = s.merge(parent, on="parent", how="left")
    rpc = j[j["ppod"].notna() & (j["ppod"] != j["pod"])]
    root = j[j["parent"] == "root"]
    callee = rpc["pod"].map(service_of)
    server = pd.DataFrame({"pod": rpc["pod"], "direction": "inbound", "start_ns": rpc["start_ns"],
                           "dur_us": rpc["dur_us"], "trace": rpc["trace"], "callee": callee,
                           "op": rpc["pop"], "peer": rpc["ppod"]})
    client = pd.DataFrame({"pod": rpc["ppod"], "direction": "outbound", "start_ns": rpc["pstart"],
                           "dur_us": rpc["pdur"], "trace": rpc["trace"], "callee": callee, "op": rpc["pop"],
                           "peer": rpc["pod"]})
    entry = pd.DataFrame({"pod": root["pod"], "direction": "inbound", "start_ns": root["start_ns"],
                          "dur_us": root["dur_us"], "trace": root["trace"], "callee": root["pod"].map(service_of),
                          "op": root["op"], "peer": None})
    out = pd.concat([server, client, entry], ignore_index=True)
    return out.astype({"start_ns": "int64", "dur_us": "int64"}).sort_values("start_ns", ignore_index=True)


def _path(op: str) -> str:
    """gRPC path from an OpenTelemetry RPC span name (``hipstershop.CartService/GetCart``,
    ``grpc.hipstershop.X/Y`` and ``/hipstershop.X/Y`` are the same method)."""
    op = op.removeprefix("grpc.").lstrip("/")
    return "/" + op


def render(records: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write the records as logcli jsonl (Istio JSON lines) per pod; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[tuple[int, str]]] = {}
    eph = 40000
    for r in records.itertuples(index=False):
        eph = 40000 + (eph + 7) % 20000
        start_us = r.start_ns // 1000
        dur_ms = int(r.dur_us // 1000)
        is_entry = r.peer is None or (isinstance(r.peer, float))
        host = f"{r.callee}:{GRPC_PORT}" if not is_entry else f"{r.callee}:80"
        callee_ip = _ip(r.pod) if r.direction == "inbound" else _ip(r.peer)
        if r.direction == "outbound":
            rec = AccessRecord(
                start_us=start_us, method="POST", path=_path(r.op), protocol="HTTP/2", code=200, flags=None,
                details="via_upstream", transport_failure=None, bytes_rx=0, bytes_tx=0, duration_ms=dur_ms,
                ust_ms=dur_ms, xff=None, ua="grpc-go/1.31.0", request_id=r.trace, authority=host,
                upstream_host=f"{callee_ip}:{GRPC_PORT}",
                upstream_cluster=f"outbound|{GRPC_PORT}||{r.callee}.{NAMESPACE}.svc.cluster.local",
                upstream_local=f"{_ip(r.pod)}:{eph}", downstream_local=f"{callee_ip}:{GRPC_PORT}",
                downstream_remote=f"{_ip(r.pod)}:{eph + 1}", sni=None, route="default")
        else:
            port = 8080 if is_entry else GRPC_PORT
            client_ip = "10.0.0.1" if is_entry else _ip(r.peer)
            rec = AccessRecord(
                start_us=start_us, method="GET" if is_entry else "POST", path=_path(r.op),
                protocol="HTTP/1.1" if is_entry else "HTTP/2", code=200, flags=None, details="via_upstream",
                transport_failure=None, bytes_rx=0, bytes_tx=0, duration_ms=dur_ms, ust_ms=dur_ms, xff=None,
                ua="python-requests/2.27" if is_entry else "grpc-go/1.31.0", request_id=r.trace,
                authority=host, upstream_host=f"{callee_ip}:{port}", upstream_cluster=f"inbound|{port}||",
                upstream_local=f"127.0.0.6:{eph}", downstream_local=f"{callee_ip}:{port}",
                downstream_remote=f"{client_ip}:{eph + 1}",
                sni=None if is_entry else f"outbound_.{GRPC_PORT}_._.{r.callee}.{NAMESPACE}.svc.cluster.local",
                route="default")
        lines.setdefault(r.pod, []).append((r.start_ns + r.dur_us * 1000, istio_json(rec)))
    files = []
    for pod, items in lines.items():
        prefix = logcli_labels_prefix({"namespace": NAMESPACE, "pod": pod, "container": "istio-proxy",
                                       "app": service_of(pod)})
        path = out_dir / f"{pod}.jsonl.gz"
        with gzip.open(path, "wt") as fh:
            for ts_ns, line in sorted(items):
                fh.write(logcli_jsonl(prefix, line, ts_ns) + "\n")
        files.append(path)
    return files
