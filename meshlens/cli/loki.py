"""``meshlens ingest loki`` and ``meshlens aggregate loki``: thin typer commands over meshlens.sources.loki.

The lead's ``meshlens/cli.py`` wires them in with ``register(ingest_app, aggregate_app)``. Credentials
also come from logcli's ``LOKI_*`` environment variables, so existing Loki users need no new flags.
Failures print one actionable line (no traceback for :class:`~meshlens.errors.MeshlensError`) and exit
non-zero: 1 for errors, 2 for bad options, 130 when interrupted.
"""

from __future__ import annotations

import sys
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

Url = Annotated[str | None, typer.Option("--url", help="Loki base URL, e.g. http://loki:3100 (default $LOKI_ADDR).")]
OrgId = Annotated[str | None, typer.Option("--org-id", "--tenant",
                                          help="Tenant (X-Scope-OrgID); a|b queries several (default $LOKI_ORG_ID).")]
Header = Annotated[list[str] | None, typer.Option("--header", help="Extra header 'Name: value' (repeatable).")]
User = Annotated[str | None, typer.Option("--username", help="Basic-auth user (default $LOKI_USERNAME).")]
Password = Annotated[str | None, typer.Option("--password", help="Basic-auth password as a reference: env:VAR, "
                                            "file:PATH or keyring:SERVICE/USER (default $LOKI_PASSWORD).")]
Token = Annotated[str | None, typer.Option("--bearer-token", help="Bearer token as a reference: env:VAR, file:PATH "
                                         "or keyring:SERVICE/USER (default $LOKI_BEARER_TOKEN).")]
TokenFile = Annotated[str | None, typer.Option("--bearer-token-file",
                                              help="File holding a bearer token (default $LOKI_BEARER_TOKEN_FILE).")]
CaCert = Annotated[str | None, typer.Option("--ca-cert", help="CA bundle to verify the server (default $LOKI_CA_CERT_PATH).")]
Cert = Annotated[str | None, typer.Option("--cert", help="Client certificate (default $LOKI_CLIENT_CERT_PATH).")]
Key = Annotated[str | None, typer.Option("--key", help="Client key (default $LOKI_CLIENT_KEY_PATH).")]
Insecure = Annotated[bool, typer.Option("--insecure", help="Skip TLS verification (testing only; or LOKI_TLS_SKIP_VERIFY).")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar (on a terminal).")]


def _auth(username: str | None, password: str | None, bearer_token: str | None, bearer_token_file: str | None,
          headers: list[str] | None, ca_cert: str | None, cert: str | None, key: str | None, insecure: bool,
          timeout: float, max_retries: int) -> dict[str, Any]:
    from meshlens.secrets import secret_option

    password = secret_option(password, "--password", "LOKI_PASSWORD")
    bearer_token = secret_option(bearer_token, "--bearer-token", "LOKI_BEARER_TOKEN")
    return {"username": username, "password": password, "bearer_token": bearer_token,
            "bearer_token_file": bearer_token_file, "headers": headers or [], "ca_cert": ca_cert,
            "client_cert": cert, "client_key": key, "insecure": True if insecure else None,
            "timeout_s": timeout, "max_retries": max_retries}


def ingest_loki_cmd(
    query: Annotated[str, typer.Option("--query", "-q", help="LogQL log query, e.g. '{namespace=\"shop\", container=\"istio-proxy\"}'.")],
    db: Db,
    url: Url = None,
    since: Since = None,
    from_: From = None,
    to: To = None,
    parallel: Annotated[int, typer.Option("--parallel", help="Shards (stream x hour) fetched concurrently (one writer).")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Lines per request (Loki's limit; max 5000 by default).")] = 5000,
    shard: Annotated[str | None, typer.Option("--shard", help="Shard width, e.g. 1h (default: whole hours per stream, aligned to Loki's query splits).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the stored watermark for this url+tenant+query.")] = False,
    resume_overlap: Annotated[str, typer.Option("--resume-overlap", help="Re-read this much before the last run's end, for late-arriving lines.")] = "60s",
    fmt: Annotated[str | None, typer.Option("--format", help="Force a log format (default: detected per line).")] = None,
    org_id: OrgId = None,
    header: Header = None,
    username: User = None,
    password: Password = None,
    bearer_token: Token = None,
    bearer_token_file: TokenFile = None,
    ca_cert: CaCert = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
    timeout: Timeout = 60.0,
    max_retries: Retries = 8,
    as_json: AsJson = False,
    progress: Progress = True,
    filter_config: FilterConfigOpt = None,
    no_default_filters: NoDefaultFiltersOpt = False,
    sample_success: SampleSuccessOpt = None,
) -> None:
    """Pull every line of a LogQL range from Loki into the store (exact, parallel, resumable)."""
    from meshlens.sources.loki import ingest_loki

    def body() -> None:
        counts = ingest_loki(
            db, query=query, url=url, since=since, start=from_, end=to, parallel=parallel,
            batch_size=batch_size, shard=shard, resume=resume, resume_overlap=resume_overlap, fmt=fmt,
            progress=progress and not as_json and sys.stderr.isatty(), org_id=org_id,
            **_auth(username, password, bearer_token, bearer_token_file, header, ca_cert, cert, key, insecure,
                    timeout, max_retries),
            ingest_options=filter_options(filter_config, no_default_filters, sample_success),
        )
        # every line rejected or filtered: one line, before the counts (as the source's own warnings)
        warning = counts.empty_warning(unit="lines")
        if warning:
            typer.echo(warning, err=True)
        echo_ingest_counts(counts, as_json)

    run_command(body)


def aggregate_loki_cmd(
    db: Db,
    selector: Annotated[str | None, typer.Option("--selector", "-s", help="Stream selector for the presets, e.g. '{namespace=\"shop\", container=\"istio-proxy\"}'.")] = None,
    query: Annotated[str | None, typer.Option("--query", "-q", help="A custom LogQL metric query (instead of presets).")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="Name to store a custom query under.")] = None,
    preset: Annotated[list[str] | None, typer.Option("--preset", help="Preset metric(s): requests, errors_5xx, authz_denials, p50_duration_ms, p99_duration_ms (repeatable).")] = None,
    step: Annotated[str, typer.Option("--step", help="Bucket width / query step, e.g. 1m, 5m.")] = "1m",
    log_format: Annotated[str, typer.Option("--log-format", help="Access-log encoding for presets: json, text or auto.")] = "auto",
    url: Url = None,
    since: Since = None,
    from_: From = None,
    to: To = None,
    org_id: OrgId = None,
    header: Header = None,
    username: User = None,
    password: Password = None,
    bearer_token: Token = None,
    bearer_token_file: TokenFile = None,
    ca_cert: CaCert = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
    timeout: Timeout = 60.0,
    max_retries: Retries = 8,
    as_json: AsJson = False,
) -> None:
    """Run LogQL metric queries in Loki (push-down) and store the time series in the `series` table."""
    from meshlens.sources.loki import aggregate_loki

    def body() -> None:
        counts = aggregate_loki(
            db, selector=selector, query=query, metric_name=metric, metrics=preset or None, step=step,
            log_format=log_format, url=url, since=since, start=from_, end=to, org_id=org_id,
            **_auth(username, password, bearer_token, bearer_token_file, header, ca_cert, cert, key, insecure,
                    timeout, max_retries),
        )
        echo_aggregate_counts(counts, as_json)

    run_command(body)


def register(ingest_app: typer.Typer, aggregate_app: typer.Typer) -> None:
    """Add ``ingest loki`` and ``aggregate loki`` to the lead's typer sub-apps."""
    ingest_app.command("loki")(ingest_loki_cmd)
    aggregate_app.command("loki")(aggregate_loki_cmd)
