"""One interface over the two Lokis the tests run against: the in-process server and the real one.

A test written against :class:`Backend` runs twice (``@pytest.fixture(params=BACKENDS)``): once against
:class:`tests.servers.loki.LokiServer`, once against the real Grafana Loki (skipped, with the reason,
when ``../shared/tools/loki`` is absent). The real server is shared by the whole session, so every test
labels its streams with a unique ``test`` value (:attr:`Backend.tag`) and never sees another's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.servers import real_loki
from tests.servers.loki import LokiServer

BACKENDS = ["inproc", "real"]
Entry = tuple[int, str] | tuple[int, str, dict[str, str]]


@dataclass
class Backend:
    kind: str
    url: str
    auth: bool
    server: LokiServer | None = None  # the in-process server (fault injection, request log)
    real: real_loki.RealLoki | None = None
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def push(self, streams: Iterable[tuple[Mapping[str, str], list[Entry]]], tenant: str | None = None) -> int:
        """Push ``[(labels, [(ts, line[, metadata])...])...]``; every stream gets ``test=<tag>``."""
        tagged = [({**labels, "test": self.tag}, list(entries)) for labels, entries in streams]
        if self.real is not None:
            return self.real.push(tagged, tenant=tenant)
        assert self.server is not None
        return sum(self.server.push(dict(labels), entries, **({"tenant": tenant} if tenant else {}))
                   for labels, entries in tagged)

    def selector(self, **matchers: str) -> str:
        """``{test="<tag>", k="v", ...}``: this test's streams only."""
        inner = ", ".join([f'test="{self.tag}"', *(f'{k}="{v}"' for k, v in matchers.items())])
        return "{" + inner + "}"


def make(request: pytest.FixtureRequest, *, auth: bool = False, **server_kw: Any) -> Iterator[Backend]:
    """Yield a Backend for ``request.param`` (``inproc`` or ``real``)."""
    if request.param == "real":
        reason = real_loki.available()
        if reason:
            pytest.skip(reason)
        if not getattr(request.session, "_ml_real_loki_finalizer", False):
            request.session._ml_real_loki_finalizer = True  # type: ignore[attr-defined]
            request.session.addfinalizer(real_loki.stop_all)  # stop it when the session ends
        srv = real_loki.get(auth=auth)
        yield Backend("real", srv.url, auth, real=srv)
        return
    with LokiServer(auth_enabled=auth, **server_kw) as inproc:
        yield Backend("inproc", inproc.url, auth, server=inproc)
