"""``meshlens ingest es`` and ``meshlens aggregate es``: thin typer commands over meshlens.sources.elasticsearch.

The lead's ``meshlens/cli.py`` wires them in with ``register(ingest_app, aggregate_app)``. Secrets
(password, API key, bearer token) are deliberately not flags: they come from ``ES_*`` environment
variables or a YAML config file (``--config`` / ``$MESHLENS_ES_CONFIG``), so they never land in shell
history, notebooks or reports. Failures print one actionable line and exit non-zero (1 errors, 2 bad
options, 130 interrupted), exactly like the Loki commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from meshlens.cli.common import (
    AsJson,
    Db,
    FilterConfigOpt,
    From,
    NoDefaultFiltersOpt,
    Retries,
    SampleSuccessOpt,
    Since,
    Timeout,
    To,
    echo_aggregate_counts,
    echo_ingest_counts,
    filter_options,
    run_command,
)

Url = Annotated[str | None, typer.Option("--url", help="Elasticsearch/OpenSearch URL (default $ES_URL).")]
Index = Annotated[str, typer.Option("--index", "-i", help="Index pattern, e.g. 'logs-istio-*'.")]
Query = Annotated[str | None, typer.Option("--query", "-q", help="Lucene query string, e.g. 'kubernetes.container_name:istio-proxy'.")]
QueryDsl = Annotated[Path | None, typer.Option("--query-dsl", help="JSON file with a query DSL clause (or {\"query\": ...}).")]
TimeField = Annotated[str, typer.Option("--time-field", help="Document time field.")]
CloudId = Annotated[str | None, typer.Option("--cloud-id", help="Elastic Cloud id instead of --url (default $ES_CLOUD_ID).")]
Config = Annotated[Path | None, typer.Option("--config", help="YAML file with url/cloud_id/username/password/api_key/"
                                                               "bearer_token/ca_cert/... (default $MESHLENS_ES_CONFIG).")]
User = Annotated[str | None, typer.Option("--username", help="Basic-auth user (password from $ES_PASSWORD or --config).")]
CaCert = Annotated[str | None, typer.Option("--ca-cert", help="CA bundle to verify the server (default $ES_CA_CERT).")]
Cert = Annotated[str | None, typer.Option("--cert", help="Client certificate for mutual TLS (default $ES_CLIENT_CERT).")]
Key = Annotated[str | None, typer.Option("--key", help="Client key (default $ES_CLIENT_KEY).")]
Insecure = Annotated[bool, typer.Option("--insecure", help="Skip TLS verification (testing only; or ES_TLS_SKIP_VERIFY).")]


def _conn(cloud_id: str | None, config: Path | None, username: str | None, ca_cert: str | None,
          cert: str | None, key: str | None, insecure: bool, timeout: float, max_retries: int) -> dict[str, Any]:
    return {"cloud_id": cloud_id, "config_file": config, "username": username, "ca_cert": ca_cert,
            "client_cert": cert, "client_key": key, "insecure": insecure, "timeout_s": timeout,
            "max_retries": max_retries}


def ingest_es_cmd(
    index: Index,
    db: Db,
    url: Url = None,
    since: Since = None,
    from_: From = None,
    to: To = None,
    query: Query = None,
    query_dsl: QueryDsl = None,
    time_field: TimeField = "@timestamp",
    parallel: Annotated[int, typer.Option("--parallel", help="Slices read concurrently (sliced PIT/scroll; one writer).")] = 1,
    page_size: Annotated[int, typer.Option("--page-size", help="Documents per request (at most index.max_result_window).")] = 5000,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last run for this url+index+query, or start where it ended.")] = False,
    resume_overlap: Annotated[str, typer.Option("--resume-overlap", help="Re-read this much before the last run's end, for late-indexed documents.")] = "60s",
    scroll: Annotated[bool, typer.Option("--scroll", help="Use scroll instead of point in time (servers/proxies without PIT).")] = False,
    tiebreaker: Annotated[str | None, typer.Option("--tiebreaker", help="Unique sort field for PIT paging (default _shard_doc, or _id on OpenSearch < 3.3; _index goes before it where it is unique per index only).")] = None,
    keep_alive: Annotated[str, typer.Option("--keep-alive", help="PIT/scroll keep-alive between pages.")] = "5m",
    fmt: Annotated[str | None, typer.Option("--format", help="Force a log format (default: detected per record).")] = None,
    cloud_id: CloudId = None,
    config: Config = None,
    username: User = None,
    ca_cert: CaCert = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
    timeout: Timeout = 60.0,
    max_retries: Retries = 8,
    as_json: AsJson = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Do not show a progress bar.")] = False,
    filter_config: FilterConfigOpt = None,
    no_default_filters: NoDefaultFiltersOpt = False,
    sample_success: SampleSuccessOpt = None,
) -> None:
    """Pull every document of a time range from Elasticsearch/OpenSearch into the store (PIT, resumable)."""
    from meshlens.sources.elasticsearch import ingest_es

    def body() -> None:
        counts = ingest_es(
            db, index=index, url=url, since=since, start=from_, end=to, query=query, query_dsl=query_dsl,
            time_field=time_field, parallel=parallel, page_size=page_size, resume=resume,
            resume_overlap=resume_overlap, force_scroll=scroll, tiebreaker=tiebreaker, keep_alive=keep_alive,
            fmt=fmt, progress=not no_progress and not as_json and sys.stderr.isatty(),
            **_conn(cloud_id, config, username, ca_cert, cert, key, insecure, timeout, max_retries),
            ingest_options=filter_options(filter_config, no_default_filters, sample_success),
        )
        # every document rejected or filtered: one line, before the counts (as the source's own warnings)
        warning = counts.empty_warning(unit="documents")
        if warning:
            typer.echo(warning, err=True)
        echo_ingest_counts(counts, as_json)

    run_command(body)


def aggregate_es_cmd(
    index: Index,
    db: Db,
    url: Url = None,
    since: Since = None,
    from_: From = None,
    to: To = None,
    interval: Annotated[str, typer.Option("--interval", "--step", help="Bucket width (date_histogram fixed_interval).")] = "1m",
    by: Annotated[list[str] | None, typer.Option("--by", help="Group by FIELD or LABEL=FIELD (repeatable; default: namespace and service from the documents' layout).")] = None,
    status_field: Annotated[str | None, typer.Option("--status-field", help="HTTP status field, enables errors_5xx (default: detected).")] = None,
    duration_field: Annotated[str | None, typer.Option("--duration-field", help="Duration field, enables p50/p99_duration_ms (default: detected).")] = None,
    duration_unit: Annotated[str | None, typer.Option("--duration-unit", help="Unit of --duration-field: ns, us, ms, s (event.duration is ns).")] = None,
    percent: Annotated[list[float] | None, typer.Option("--percentile", help="Duration percentiles (repeatable; default 50 and 99).")] = None,
    query: Query = None,
    query_dsl: QueryDsl = None,
    time_field: TimeField = "@timestamp",
    cloud_id: CloudId = None,
    config: Config = None,
    username: User = None,
    ca_cert: CaCert = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
    timeout: Timeout = 60.0,
    max_retries: Retries = 8,
    as_json: AsJson = False,
) -> None:
    """Aggregate in Elasticsearch/OpenSearch (composite aggregations) and store the time series in `series`."""
    from meshlens.sources.elasticsearch import aggregate_es

    def body() -> None:
        counts = aggregate_es(
            db, index=index, url=url, since=since, start=from_, end=to, interval=interval, group_by=by,
            status_field=status_field, duration_field=duration_field, duration_unit=duration_unit,
            percents=tuple(percent) if percent else (50.0, 99.0), query=query, query_dsl=query_dsl,
            time_field=time_field,
            **_conn(cloud_id, config, username, ca_cert, cert, key, insecure, timeout, max_retries),
        )
        echo_aggregate_counts(counts, as_json, [
            "grouped by:     " + (", ".join(f"{k}={v}" for k, v in counts.group_by.items()) or "-")])

    run_command(body)


def register(ingest_app: typer.Typer, aggregate_app: typer.Typer) -> None:
    """Add ``ingest es`` and ``aggregate es`` to the lead's typer sub-apps."""
    ingest_app.command("es")(ingest_es_cmd)
    aggregate_app.command("es")(aggregate_es_cmd)
