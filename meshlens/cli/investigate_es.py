"""``meshlens investigate es``: scan a range in Elasticsearch/OpenSearch, pull only the evidence, explain it.

A thin typer layer over :func:`meshlens.investigate_es.investigate_es` (phases, fields and limits are
documented there), registered by :mod:`meshlens.cli.investigate`. Connection, auth and index options are
``ingest es``'s (secrets from ``ES_*`` variables or ``--config`` only); the output and ``--json`` are
``investigate loki``'s: ``{"incidents": [...], "pulled": {"lines_pulled", "lines_in_range", "queries"}, ...}``.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from meshlens.cli.common import AsJson, Db, From, Retries, Since, Timeout, To, run_command
from meshlens.cli.es import (
    CaCert,
    Cert,
    CloudId,
    Config,
    Index,
    Insecure,
    Key,
    Query,
    QueryDsl,
    TimeField,
    Url,
    User,
    _conn,
)
from meshlens.cli.investigate import _echo


def investigate_es_cmd(
    index: Index,
    db: Db,
    audit_index: Annotated[str | None, typer.Option("--audit-index", help="Index pattern of the Kubernetes audit log (config changes), e.g. 'k8s-audit-*'.")] = None,
    audit_query: Annotated[str | None, typer.Option("--audit-query", help="Lucene query string narrowing --audit-index.")] = None,
    audit_time_field: Annotated[str, typer.Option("--audit-time-field", help="Time field of the audit documents.")] = "@timestamp",
    url: Url = None,
    since: Since = None,
    from_: From = None,
    to: To = None,
    query: Query = None,
    query_dsl: QueryDsl = None,
    time_field: TimeField = "@timestamp",
    service: Annotated[str | None, typer.Option("--service", help="Only the incidents that involve this service.")] = None,
    namespace_field: Annotated[str | None, typer.Option("--namespace-field", help="Field naming the writer's namespace (default: detected, e.g. kubernetes.namespace_name).")] = None,
    service_field: Annotated[str | None, typer.Option("--service-field", help="Field naming the writing workload (default: detected, e.g. kubernetes.labels.app).")] = None,
    cluster_field: Annotated[str, typer.Option("--cluster-field", help="Field holding Envoy's upstream cluster.")] = "upstream_cluster",
    status_field: Annotated[str, typer.Option("--status-field", help="Field holding the response code.")] = "response_code",
    flags_field: Annotated[str, typer.Option("--flags-field", help="Field holding the response flags.")] = "response_flags",
    details_field: Annotated[str, typer.Option("--details-field", help="Field holding the response code details.")] = "response_code_details",
    transport_failure_field: Annotated[str, typer.Option("--transport-failure-field", help="Field holding the upstream transport failure reason.")] = "upstream_transport_failure_reason",
    duration_field: Annotated[str, typer.Option("--duration-field", help="Field holding the request duration.")] = "duration",
    duration_unit: Annotated[str, typer.Option("--duration-unit", help="Unit of --duration-field: ns, us, ms, s.")] = "ms",
    page_size: Annotated[int, typer.Option("--page-size", help="Composite buckets per page (at most search.max_buckets; halved if refused).")] = 5000,
    parallel: Annotated[int, typer.Option("--parallel", help="Slices read concurrently when pulling.")] = 1,
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
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Do not show progress bars.")] = False,
) -> None:
    """Scan the range with composite aggregations, pull only the suspects' documents, run analyze incidents."""
    from meshlens.investigate_es import EsFields, investigate_es

    def body() -> None:
        fields = EsFields(namespace=namespace_field, service=service_field, cluster=cluster_field,
                          status=status_field, flags=flags_field, details=details_field,
                          transport_failure=transport_failure_field, duration=duration_field,
                          duration_unit=duration_unit)
        res = investigate_es(
            db, index=index, audit_index=audit_index, audit_query=audit_query, audit_time_field=audit_time_field,
            url=url, since=since, start=from_, end=to, query=query, query_dsl=query_dsl, time_field=time_field,
            fields=fields, service=service, parallel=parallel, page_size=page_size,
            progress=not no_progress and not as_json and sys.stderr.isatty(),
            **_conn(cloud_id, config, username, ca_cert, cert, key, insecure, timeout, max_retries),
        )
        _echo(res, as_json)

    run_command(body)
