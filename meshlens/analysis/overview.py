"""What is in a store: events by type and mesh, services, time span, rejects by reason, ingest runs.

The first thing an SRE wants after an ingest (and what ``make demo`` prints): enough to see that the
data is there, over which time range, and whether anything was rejected and why.
"""

from __future__ import annotations

from typing import Any

from meshlens.store import Store


def summary(store: Store, top: int = 10) -> dict[str, Any]:
    """A JSON-serialisable overview of the store."""
    q = store.query
    span = q("SELECT min(ts) AS first, max(ts) AS last, count(*) AS events, "
             "count(*) FILTER (WHERE ts IS NULL) AS without_ts FROM events")
    by_type = q("SELECT event_type, count(*) AS n FROM events GROUP BY 1 ORDER BY n DESC")
    by_format = q("SELECT mesh, format, count(*) AS n FROM events GROUP BY ALL ORDER BY n DESC")
    services = q("""
        SELECT dst_service AS service, any_value(dst_namespace) AS namespace,
               CAST(round(sum(coalesce(sample_weight, 1.0))) AS BIGINT) AS requests,  -- estimate if sampled
               count(*) FILTER (WHERE status >= 500) AS errors_5xx,
               count(*) FILTER (WHERE authz_decision = 'deny') AS denials
        FROM events WHERE record_kind = 'access_log' AND dst_service IS NOT NULL
        GROUP BY dst_service ORDER BY requests DESC LIMIT ?""", [top])
    changes = q("""
        SELECT resource_kind AS kind, count(*) AS n, count(DISTINCT actor) AS actors
        FROM events WHERE event_type = 'config_change' GROUP BY 1 ORDER BY n DESC LIMIT ?""", [top])
    rejects = q("SELECT reason, count(*) AS n FROM rejects GROUP BY 1 ORDER BY n DESC LIMIT ?", [top])
    n_rejects = store.scalar("SELECT count(*) FROM rejects")
    runs = q("""SELECT source, status, records_read, events_stored, duplicates, rejects, started_at
                FROM ingest_runs ORDER BY started_at DESC LIMIT 5""")
    n_services = store.scalar("SELECT count(DISTINCT dst_service) FROM events WHERE record_kind = 'access_log'")
    first, last = span.iloc[0]["first"], span.iloc[0]["last"]
    return {
        "events": int(span.iloc[0]["events"]),
        "events_without_timestamp": int(span.iloc[0]["without_ts"]),
        "first": None if first is None or str(first) == "NaT" else str(first),
        "last": None if last is None or str(last) == "NaT" else str(last),
        "services": int(n_services or 0),
        "rejects": int(n_rejects or 0),
        "by_event_type": dict(zip(by_type.event_type, map(int, by_type.n), strict=True)),
        "by_format": [{"mesh": m, "format": f, "events": int(n)}
                      for m, f, n in by_format.itertuples(index=False)],
        "top_services": _records(services),
        "config_changes": _records(changes),
        "top_reject_reasons": _records(rejects),
        "recent_ingests": _records(runs),
    }


def _records(df: Any) -> list[dict[str, Any]]:
    """DataFrame -> JSON-friendly dicts (NaN/NaT -> None, numpy ints -> int, timestamps -> str)."""
    import pandas as pd

    out = []
    for rec in df.to_dict(orient="records"):
        row: dict[str, Any] = {}
        for k, v in rec.items():
            if v is None or (not isinstance(v, str) and pd.isna(v)):
                row[k] = None
            elif hasattr(v, "isoformat"):
                row[k] = str(v)
            elif hasattr(v, "item"):
                row[k] = v.item()
            else:
                row[k] = v
        out.append(row)
    return out


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable text of :func:`summary` (the CLI's default output)."""
    lines = [
        f"events: {s['events']}  (first {s['first']}, last {s['last']}; "
        f"{s['events_without_timestamp']} without timestamp)",
        f"services seen: {s['services']}   rejects stored: {s['rejects']}",
        "events by type: " + ", ".join(f"{k}={v}" for k, v in s["by_event_type"].items()),
        "by format: " + ", ".join(f"{r['format']}={r['events']}" for r in s["by_format"]),
    ]
    if s["top_services"]:
        lines.append("top services (requests / 5xx / denials):")
        lines += [f"  {r['service']:<24} {r['namespace'] or '-':<14} {r['requests']:>9} {r['errors_5xx']:>7} "
                  f"{r['denials']:>7}" for r in s["top_services"]]
    if s["config_changes"]:
        lines.append("config changes: " + ", ".join(f"{r['kind']}={r['n']}" for r in s["config_changes"]))
    if s["top_reject_reasons"]:
        lines.append("top reject reasons:")
        lines += [f"  {r['n']:>7}  {r['reason'][:110]}" for r in s["top_reject_reasons"]]
    return "\n".join(lines)
