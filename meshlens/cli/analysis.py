"""``meshlens analyze``: anomalies, root cause, change correlation and the call graph from the CLI.

A thin typer layer over :mod:`meshlens.analysis` (same names, same defaults), wired into the main app
by ``register(app)``. Every command opens the store read-only (the published snapshot), prints a
readable table by default and, with ``--json``, a JSON array best first -- the machine contract:

* ``analyze anomalies``: ``rank, kind, scope, target, namespace, metric, direction, onset, end, baseline,
  observed, peak, score, evidence``;
* ``analyze root-cause``: ``rank, kind (service|edge), target (service, or client->server),
  namespace, score, evidence`` plus ``failure_share, latency_share, onset, symptom`` and, for scripts,
  ``incident, episode`` (onset, end, before/after rates), ``signature`` (status, flags, details, policy)
  and ``example_request_ids``; a run that finds nothing prints one item with ``incident`` false;
* ``analyze changes``: ``rank, target (Kind/namespace/name), actor, ts, score (>= 0.5: likely cause),
  evidence`` plus ``kind, namespace, name, verb, likely, dt_s`` and the features ``f_*``;
* ``analyze incidents``: ``rank, onset, end (null while ongoing), services, symptom, root_cause (the top
  item of root-cause), change (the top item of changes when likely, else null), summary`` plus
  ``severity, kind, signature, confidence, requests_affected, bad_before, bad_during, anomalies``.

Times accept RFC 3339, Unix seconds, ``now`` and relative forms such as ``-24h``. Bad input (unknown
service, empty range, missing store) exits 1 with one line on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from meshlens.cli.common import read_store, run_command
from meshlens.errors import ConfigError
from meshlens.timeutil import TIME_FORMS, parse_time_ns

analyze_app = typer.Typer(help="Incident analyses: anomalies, root cause along the call graph, change "
                               "correlation.", no_args_is_help=True)

DbOpt = Annotated[Path, typer.Option("--db", help="DuckDB store (read-only: the published snapshot).")]
FromOpt = Annotated[str, typer.Option("--from", help="Window start: RFC 3339, Unix seconds, now, -24h, "
                                      "latest-6h (6 h before the store's newest event).")]
ToOpt = Annotated[str, typer.Option("--to", help="Window end (exclusive); same forms as --from.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON array, best first.")]
ReqFromOpt = Annotated[str, typer.Option("--from", help="Window start (required): RFC 3339, Unix seconds, now, "
                                                        "-24h.")]
ReqToOpt = Annotated[str, typer.Option("--to", help="Window end (required, exclusive); same forms as --from.")]
ServiceOpt = Annotated[str, typer.Option("--service", help="Symptom service (short name, e.g. frontend).")]


_store = read_store


def _run(fn: Callable[[], None]) -> None:
    """Expected errors -> one line on stderr and the common exit code (also without ``main``)."""
    run_command(fn)


def _emit_json(items: list[dict[str, Any]]) -> None:
    typer.echo(json.dumps(items, indent=2, default=str))


def _time(value: str, option: str, required: bool = False) -> int | str | None:
    """Parse a time option early, so errors name the option (``--from``/``--to``)."""
    from meshlens.analysis.common import bound_ns

    if not value or not value.strip():
        if required:
            raise ConfigError(f"{option} is required ({TIME_FORMS})")
        return None
    if value.strip().startswith("latest"):
        try:
            parse_time_ns(value, latest_ns=0)  # syntax checked now; the analysis resolves it on the store
        except ConfigError as exc:
            raise ConfigError(f"{option}: {exc}") from None
        return value
    return bound_ns(value, option)


@analyze_app.command("anomalies")
def anomalies_cmd(
    db: DbOpt,
    start: FromOpt = "",
    end: ToOpt = "",
    bucket: Annotated[int, typer.Option("--bucket", help="Bucket width in seconds (default: ~240 buckets).")] = 0,
    top: Annotated[int, typer.Option("--top", help="Show at most this many anomalies.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Metric anomalies (rates, errors, denials, TLS failures, flags, latency) per service, edge and
    mesh-wide, and categorical ones (new edges, new callers of sensitive paths, plaintext, new denials)."""

    def run() -> None:
        from meshlens.analysis.anomalies import anomalies_json, detect_anomalies

        if bucket < 0:
            raise ConfigError(f"--bucket must be a positive number of seconds, got {bucket}")
        with _store(db) as store:
            df = detect_anomalies(store, _time(start, "--from"), _time(end, "--to"), bucket_s=bucket or None,
                                  top=top)
        if as_json:
            _emit_json(anomalies_json(df))
            return
        if df.empty:
            typer.echo("no anomalies")
            return
        for r in df.itertuples(index=False):
            typer.echo(f"{r.rank:>3}. [{r.score:7.1f}] {r.scope:<7} {r.target}: {r.metric} {r.direction} "
                       f"from {r.onset:%Y-%m-%d %H:%M:%S}Z")
            typer.echo(f"       {r.evidence[0]}")

    _run(run)


@analyze_app.command("root-cause")
def root_cause_cmd(
    db: DbOpt,
    service: ServiceOpt,
    start: ReqFromOpt = "",
    end: ReqToOpt = "",
    top: Annotated[int, typer.Option("--top", help="Number of candidates.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Detect the symptom's onset and rank the services/edges that explain its failing or slow requests."""

    def run() -> None:
        from meshlens.analysis.rootcause import analyze

        lo, hi = _time(start, "--from", True), _time(end, "--to", True)
        with _store(db) as store:
            report = analyze(store, service, lo, hi, top=top)
        if as_json:
            _emit_json(report.to_json(say_no_incident=True))
            return
        typer.echo(report.message)
        for r in report.candidates.itertuples(index=False):
            typer.echo(f"{r.rank:>3}. {r.kind:<7} {r.target} ({r.namespace})  score {r.score:.3f}")
            for line in r.evidence:
                typer.echo(f"       - {line}")

    _run(run)


@analyze_app.command("changes")
def changes_cmd(
    db: DbOpt,
    service: ServiceOpt,
    start: ReqFromOpt = "",
    end: ReqToOpt = "",
    lookback: Annotated[str, typer.Option("--lookback", help="Also consider changes this long before --from.")]
    = "2h",
    top: Annotated[int, typer.Option("--top", help="Number of candidates.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Rank config changes (Kubernetes audit) by how likely each caused the symptom (score >= 0.5: likely)."""

    def run() -> None:
        from meshlens.analysis.changes import correlate

        lo, hi = _time(start, "--from", True), _time(end, "--to", True)
        with _store(db) as store:
            report = correlate(store, service, lo, hi, lookback=lookback, top=top)
        if as_json:
            _emit_json(report.to_json())
            return
        typer.echo(report.root_cause.message)
        typer.echo(report.message)
        for r in report.candidates.itertuples(index=False):
            verdict = "LIKELY" if r.likely else "unlikely"
            typer.echo(f"{r.rank:>3}. {r.target}  score {r.score:.3f} ({verdict})  {r.ts:%Y-%m-%d %H:%M:%S}Z "
                       f"by {r.actor}")
            for line in r.evidence[:4]:
                typer.echo(f"       - {line}")

    _run(run)


@analyze_app.command("incidents")
def incidents_cmd(
    db: DbOpt,
    start: FromOpt = "",
    end: ToOpt = "",
    lookback: Annotated[str, typer.Option("--lookback", help="Also consider changes this long before each "
                                                             "incident's analysis window.")] = "2h",
    as_json: JsonOpt = False,
) -> None:
    """What happened: the window's incidents (most severe first), each with its symptom, root cause and
    likely change, then the anomalies that never reached users. No symptom service needed."""

    def run() -> None:
        from meshlens.analysis.incidents import find_incidents

        lo, hi = _time(start, "--from", True), _time(end, "--to", True)
        with _store(db) as store:
            report = find_incidents(store, lo, hi, lookback=lookback)
        if as_json:
            _emit_json(report.to_json())
            return
        typer.echo(f"{len(report.items)} incident(s) from {report.window.describe()}"
                   + (f" (users enter at {', '.join(report.entries)})" if report.entries else ""))
        for item in report.items:
            rc, ch = item["root_cause"], item["change"]
            typer.echo(f"\n#{item['rank']} {item['onset']} .. {item['end'] or 'ongoing'}  {item['symptom']}: "
                       f"{item['kind']}, ~{item['requests_affected']} requests affected")
            typer.echo(f"   {item['summary']}")
            if rc:
                typer.echo(f"   root cause: {rc['kind']} {rc['target']} (score {rc['score']:.2f})")
            if ch:
                typer.echo(f"   change: {ch['target']} by {ch['actor']} at {str(ch['ts'])[:19]}Z "
                           f"(score {ch['score']:.2f})")
            typer.echo(f"   services: {', '.join(item['services'])}")
        typer.echo(f"\nbackground anomalies (never reached users): {len(report.background)}")
        for a in report.background[:5]:
            typer.echo(f"  [{a['score']:7.1f}] {a['scope']:<7} {a['target']}: {a['metric']} {a['direction']} "
                       f"from {a['onset']}")
        if len(report.background) > 5:
            typer.echo(f"  ... and {len(report.background) - 5} more (meshlens analyze anomalies lists them all)")

    _run(run)


@analyze_app.command("graph")
def graph_cmd(
    db: DbOpt,
    start: FromOpt = "",
    end: ToOpt = "",
    namespace: Annotated[str, typer.Option("--namespace", help="Only edges touching this namespace.")] = "",
    service: Annotated[str, typer.Option("--service", help="Only edges touching this service.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """The call graph: one line per edge with requests, failures, latency and mTLS share."""

    def run() -> None:
        from meshlens.analysis.common import records
        from meshlens.analysis.graph import service_graph

        with _store(db) as store:
            df = service_graph(store, _time(start, "--from"), _time(end, "--to"), namespace=namespace or None,
                               service=service or None)
        if as_json:
            _emit_json(records(df))
            return
        if df.empty:
            typer.echo("no proxied requests in the window")
            return
        for r in df.itertuples(index=False):
            typer.echo(f"{r.src} -> {r.dst}: {r.requests} requests, {r.failed} failed ({100 * r.error_ratio:.1f}%), "
                       f"p50 {r.p50_ms} ms, p99 {r.p99_ms} ms")

    _run(run)


def register(app: typer.Typer) -> None:
    """Add ``meshlens analyze ...`` to the main app."""
    app.add_typer(analyze_app, name="analyze")
