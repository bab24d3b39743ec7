"""The real Grafana Loki from ``../shared/tools/loki`` for tests and benchmarks (start, push, stop).

Why: our in-process server (:mod:`tests.servers.loki`) is our *reading* of Loki's API; the real binary is
the API. Tests that exercise both catch every place where the reading is wrong (status codes, bodies,
limits, timing). A user's clone has no ``../shared``: :func:`available` then says why, and the tests
skip with that reason.

One server per (auth, process): :func:`get` starts it on the first call in a temporary directory, later
calls reuse it, :func:`stop_all` (a session finalizer, and ``atexit`` as a net) kills what was started.
Ports come from 3111-3119 (this engineer's range); a busy port is skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("MESHLENS_LOKI_TOOLS") or (ROOT.parent / "shared" / "tools" / "loki"))
CACHE = os.environ.get("LOKI_CACHE", "/tmp/meshlens-loki")
# MESHLENS_LOKI_PORTS="3150-3159": another port range (one engineer's benchmark beside another's tests)
_lo, _, _hi = os.environ.get("MESHLENS_LOKI_PORTS", "3111-3119").partition("-")
PORTS = range(int(_lo), int(_hi or _lo) + 1)
PUSH_MAX_BYTES = 3 * 1024 * 1024  # Loki refuses push bodies over ~4 MiB


def available() -> str | None:
    """None when the real Loki can be started here, else the reason it cannot (for ``pytest.skip``)."""
    if not (TOOLS / "start.sh").is_file():
        return f"real Loki not available: {TOOLS}/start.sh not found (it ships in ../shared/tools/loki)"
    if shutil.which("xz") is None and not Path(CACHE, "loki").is_file():
        return "real Loki not available: xz is needed to unpack it"
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class RealLoki:
    """A running real Loki: ``url`` (HTTP API), ``grpc_port``, ``pid``, ``data`` dir, ``logcli`` path."""

    pid: int
    url: str
    grpc_port: int
    data: Path
    auth: bool
    logcli: str = str(Path(CACHE) / "logcli")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                    break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
        shutil.rmtree(self.data, ignore_errors=True)

    # -- data --------------------------------------------------------------------------------------
    def push(self, streams: Iterable[tuple[Mapping[str, str], list[tuple[int, str]] | list[tuple[int, str, dict[str, str]]]]],
             tenant: str | None = None) -> int:
        """Push ``[(labels, [(ts_ns, line[, metadata]), ...]), ...]`` in bodies under ~3 MiB; returns lines sent.

        Each stream's entries must be in time order (Loki refuses entries much older than a stream's
        newest one). Raises with Loki's answer on any non-204.
        """
        headers = {"Content-Type": "application/json"}
        if tenant:
            headers["X-Scope-OrgID"] = tenant
        sent = 0
        body: list[dict[str, object]] = []
        size = 0
        with requests.Session() as s:
            def flush() -> None:
                nonlocal body, size
                if body:
                    r = s.post(self.url + "/loki/api/v1/push", data=json.dumps({"streams": body}),
                               headers=headers, timeout=60)
                    if r.status_code != 204:
                        raise RuntimeError(f"push to real Loki failed: HTTP {r.status_code}: {r.text[:300]}")
                body, size = [], 0

            for labels, entries in streams:
                values: list[list[object]] = []
                for e in entries:
                    v: list[object] = [str(e[0]), e[1]]
                    if len(e) > 2 and e[2]:  # type: ignore[misc]
                        v.append(e[2])  # type: ignore[misc]
                    values.append(v)
                    size += len(e[1]) + 40
                    sent += 1
                    if size >= PUSH_MAX_BYTES:
                        body.append({"stream": dict(labels), "values": values})
                        values = []
                        flush()
                if values:
                    body.append({"stream": dict(labels), "values": values})
            flush()
        return sent

    def flush(self) -> None:
        """Ask the ingester to flush its chunks to the store (what a long-running Loki does by itself)."""
        requests.post(self.url + "/flush", timeout=60)


_RUNNING: dict[bool, RealLoki] = {}


def start(auth: bool = False) -> RealLoki:
    """Start a fresh real Loki (caller stops it); RuntimeError with Loki's output when it cannot start."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    for port in PORTS:
        grpc = port + 6000
        if not (_port_free(port) and _port_free(grpc)):
            continue
        data = Path(tempfile.mkdtemp(prefix=f"meshlens-real-loki-{port}-"))
        args = ["bash", str(TOOLS / "start.sh"), str(data), str(port), str(grpc)] + (["--auth"] if auth else [])
        out = subprocess.run(args, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "LOKI_CACHE": CACHE})
        words = out.stdout.strip().split()
        if out.returncode == 0 and len(words) == 2 and words[0].isdigit():
            return RealLoki(pid=int(words[0]), url=words[1], grpc_port=grpc, data=data, auth=auth)
        shutil.rmtree(data, ignore_errors=True)
        if "address already in use" not in out.stdout:
            raise RuntimeError(f"real Loki did not start: {out.stdout.strip()[-400:]} {out.stderr.strip()[-200:]}")
    raise RuntimeError(f"real Loki: no free port pair in {PORTS.start}-{PORTS.stop - 1}")


def get(auth: bool = False) -> RealLoki:
    """The shared real Loki of this process (started on first use)."""
    srv = _RUNNING.get(auth)
    if srv is None:
        srv = _RUNNING[auth] = start(auth)
    return srv


def stop_all() -> None:
    for key in list(_RUNNING):
        _RUNNING.pop(key).stop()


atexit.register(stop_all)


def generate(url: str, *, lines: int, streams: int, start_ns: int, span_ns: int, seed: int = 1,
             tenant: str | None = None, extra_labels: Mapping[str, str] | None = None) -> int:
    """Push the same deterministic Istio data as :func:`tests.servers.loki.generate` to a real Loki.

    Streams are pushed in time order, a few thousand lines of every stream per request, so each
    request stays under Loki's body limit and no entry is "too far behind" its stream's newest one.
    Returns the number of distinct (stream, ts, line) entries pushed (what Loki will hold).
    """
    import random

    from tests.servers.loki import istio_line

    rng = random.Random(seed)
    per = lines // streams
    data: list[tuple[dict[str, str], list[tuple[int, str]]]] = []
    for s in range(streams):
        ns = f"ns{s % 4}"
        app = f"svc{s}"
        labels = {"namespace": ns, "app": app, "pod": f"{app}-7d9c6b-{s:05d}", "container": "istio-proxy",
                  **(extra_labels or {})}
        n = per + (1 if s < lines - per * streams else 0)
        entries = []
        for _ in range(n):
            ts = start_ns + rng.randrange(span_ns)
            entries.append((ts, istio_line(rng, ts, app, ns)))
        entries = sorted(set(entries))
        data.append((labels, entries))
    srv = RealLoki(pid=-1, url=url, grpc_port=0, data=Path("."), auth=tenant is not None)
    step = 2000
    longest = max(len(e) for _, e in data)
    total = 0
    for i in range(0, longest, step):  # interleave streams in time order
        total += srv.push([(lb, e[i:i + step]) for lb, e in data if e[i:i + step]], tenant=tenant)
    return total
