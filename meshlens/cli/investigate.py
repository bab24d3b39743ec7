"""``meshlens investigate loki``: scan a range in Loki, pull raw lines only for the evidence, explain it.

A thin typer layer over :func:`meshlens.investigate.investigate_loki` (phases and limits are documented
there). Prints the incidents like ``analyze incidents`` and what the investigation pulled; ``--json`` is
``{"incidents": [...], "pulled": {"lines_pulled", "lines_in_range", "queries"}, ...}``.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from meshlens.cli.common import AsJson, Db, From, Retries, Since, Timeout, To, run_command
from meshlens.cli.loki import (
    CaCert,
    Cert,
    Header,
    Insecure,
    Key,
    OrgId,
    Password,
    Progress,
    Token,
    TokenFile,
    Url,
    User,
    _auth,
)

investigate_app = typer.Typer(help="Investigate a range where the data lives: scan aggregates, pull only the "
                                   "suspects' raw lines, explain.", no_args_is_help=True)


def _echo(res: Any, as_json: bool = False) -> None:
    """The result of either investigation: the ``--json`` object on stdout (warnings on stderr), or text."""
    if as_json:
        typer.echo(json.dumps(res.to_json(), default=str))
        for w in res.warnings:
            typer.echo(f"warning: {w}", err=True)
        return
    p = res.to_json()["pulled"]
    share = f" ({p['lines_pulled'] / p['lines_in_range']:.1%})" if p["lines_in_range"] else ""
    typer.echo(f"{len(res.incidents)} incident(s) from {res.window.describe()}; pulled {p['lines_pulled']} of "
               f"{p['lines_in_range']} lines{share} with {p['queries']} queries")
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)
    for it in res.incidents:
        typer.echo("")
        typer.echo(f"#{it['rank']} {it['onset']} .. {it['end'] or 'ongoing'}  {it['symptom']}: {it['kind']}, "
                   f"~{it['requests_affected']} requests affected")
        typer.echo(f"   {it['summary']}")


def investigate_loki_cmd(
    query: Annotated[str, typer.Option("--query", "-q", help="Stream selector of the proxies' access logs, e.g. '{container=\"istio-proxy\"}'.")],
    db: Db,
    audit_query: Annotated[str | None, typer.Option("--audit-query", help="Stream selector of the Kubernetes audit log (config changes), e.g. '{job=\"kube-apiserver-audit\"}'.")] = None,
    url: Url = None,
    since: Since = None,
    from_: From = None,
    to: To = None,
    service: Annotated[str | None, typer.Option("--service", help="Only the incidents that involve this service.")] = None,
    service_label: Annotated[str, typer.Option("--service-label", help="Stream label naming the writing workload.")] = "app",
    parallel: Annotated[int, typer.Option("--parallel", help="Shards fetched concurrently when pulling.")] = 4,
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
    timeout: Timeout = 120.0,
    max_retries: Retries = 8,
    as_json: AsJson = False,
    progress: Progress = True,
) -> None:
    """Scan the range with LogQL metric queries, pull raw lines only for the suspects, run analyze incidents."""
    from meshlens.investigate import investigate_loki

    def body() -> None:
        res = investigate_loki(
            db, query=query, audit_query=audit_query, url=url, since=since, start=from_, end=to, service=service,
            service_label=service_label, parallel=parallel, org_id=org_id,
            progress=progress and not as_json and sys.stderr.isatty(),
            **_auth(username, password, bearer_token, bearer_token_file, header, ca_cert, cert, key, insecure,
                    timeout, max_retries),
        )
        _echo(res, as_json)

    run_command(body)


def register(app: typer.Typer) -> None:
    """Add the ``investigate`` group (``investigate loki``, ``investigate es``) to the main app."""
    investigate_app.command("loki")(investigate_loki_cmd)
    from meshlens.cli.investigate_es import investigate_es_cmd

    investigate_app.command("es")(investigate_es_cmd)
    app.add_typer(investigate_app, name="investigate")
