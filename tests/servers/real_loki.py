"""The real Grafana Loki from ``../shared/tools/loki`` (beside the project root), for tests.

Tests that use it skip with a reason when the folder is absent (a user's clone has no shared/), and
every server started here is stopped when its context ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("MESHLENS_LOKI_TOOLS", ROOT.parent / "shared" / "tools" / "loki"))


def available() -> tuple[bool, str]:
    """Whether the real Loki can be started here, and if not, why (the skip reason)."""
    if not (TOOLS / "start.sh").exists():
        return False, f"the real Loki is not here ({TOOLS}/start.sh is absent; it lives in ../shared/tools/loki)"
    return True, ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RealLoki:
    """``with RealLoki() as loki: loki.push(labels, entries); loki.url``."""

    def __init__(self, *, auth: bool = False) -> None:
        self.auth = auth
        self.pid: int | None = None
        self.url = ""
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> RealLoki:
        ok, why = available()
        if not ok:
            raise RuntimeError(why)
        self._dir = tempfile.TemporaryDirectory(prefix="meshlens-real-loki-")
        http, grpc = free_port(), free_port()
        args = ["bash", str(TOOLS / "start.sh"), self._dir.name, str(http), str(grpc)] + (["--auth"] if self.auth else [])
        out = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"real Loki did not start: {out.stdout.strip()} {out.stderr.strip()}")
        pid, url = out.stdout.split()[-2:]
        self.pid, self.url = int(pid), url
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(self.pid, 0)
                    time.sleep(0.1)
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None
        if self._dir is not None:
            self._dir.cleanup()

    def push(self, labels: dict[str, str], entries: Iterable[tuple[int, str]], tenant: str | None = None,
             metadata: dict[str, str] | None = None) -> int:
        """Push entries (in time order, in bodies under Loki's ~4 MiB limit); returns how many."""
        headers = {"Content-Type": "application/json"}
        if tenant:
            headers["X-Scope-OrgID"] = tenant
        values: list[list[Any]] = []
        n = 0

        def send() -> None:
            body = {"streams": [{"stream": labels, "values": values}]}
            r = requests.post(f"{self.url}/loki/api/v1/push", data=json.dumps(body), headers=headers, timeout=60)
            if r.status_code != 204:
                raise RuntimeError(f"push refused: HTTP {r.status_code} {r.text[:300]}")

        for ts, line in sorted(entries):
            values.append([str(ts), line, metadata] if metadata else [str(ts), line])
            n += 1
            if len(values) >= 5000:
                send()
                values = []
        if values:
            send()
        return n

    def wait_count(self, selector: str, start_ns: int, end_ns: int, expected: int, tenant: str | None = None,
                   timeout_s: float = 30.0) -> None:
        """Wait until a metric query sees ``expected`` entries (pushes are visible within moments)."""
        headers = {"X-Scope-OrgID": tenant} if tenant else {}
        span_s = max(1, (end_ns - start_ns) // 1_000_000_000 + 1)
        deadline = time.monotonic() + timeout_s
        got = -1
        while time.monotonic() < deadline:
            r = requests.get(f"{self.url}/loki/api/v1/query", headers=headers, timeout=30, params={
                "query": f"sum(count_over_time({selector}[{span_s}s]))", "time": str(end_ns)})
            if r.ok:
                result = r.json()["data"]["result"]
                got = int(float(result[0]["value"][1])) if result else 0
                if got == expected:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"real Loki shows {got} entries for {selector}, expected {expected}")
