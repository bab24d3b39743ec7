"""What a Loki test server holds vs what a store holds, for Loki source and fault tests."""

from __future__ import annotations

from meshlens.redact import redact_text
from meshlens.store import Store
from tests.servers.loki import NS, LokiServer

T0 = 1_700_000_000 * NS


Q = '{container="istio-proxy"}'


def stored_events(store: Store) -> set[tuple[tuple[tuple[str, str], ...], str, str]]:
    rows = store.con.execute("SELECT labels, position, raw FROM events").fetchall()
    return {(tuple(sorted(lb.items())), pos, raw) for lb, pos, raw in rows}


def server_as_events(srv: LokiServer, query: str = Q, tenant: str = "fake", start: int = T0,
                     end: int = T0 + 600 * NS) -> set[tuple[tuple[tuple[str, str], ...], str, str]]:
    """What the store must hold: every line, with ``raw`` as the ingest stores it (PII-redacted)."""
    return {(lb, f"{query}@{ts}", redact_text(line)) for lb, ts, line in srv.holdings(tenant, start, end)}
