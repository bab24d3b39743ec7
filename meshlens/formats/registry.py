"""The one list of record formats: name, detection, parser, ``--format`` help and the README table.

Why a registry: the detector (:mod:`meshlens.formats.detect`), the CLI's ``--format`` help, the README's
format table (checked by a test, as ``docs/schema.md`` is) and the fuzz list all read this list, so adding
a format is one new module (its ``looks_like``/``parse`` functions) plus one :class:`FormatSpec` entry
below, plus its tests -- nothing else to edit.

Four kinds of entry, tried per record in this order:

* ``bulk``: the high-volume Envoy-family access logs, parsed in DuckDB SQL by :mod:`meshlens.formats.bulk`
  (``bulk_class`` names the SQL extractor; their detection is the SQL fragment ``sql_detect``);
* ``json``: record parsers for JSON objects, tried in list order with ``detect(obj)``;
* ``unwrap``: JSON envelopes that carry another record (Docker ``{"log": ...}``): ``unwrap(obj)`` returns
  the inner text and the envelope's time, and the inner text is detected again;
* ``text``: record parsers for text lines, tried in list order with ``detect(text)``.

A JSON record that no entry claims, or a text line that none claims, is rejected with a reason naming
what it looked like (:data:`TEXT_NOT_RECORDS` names the known non-record shapes, e.g. proxy diagnostics).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshlens.formats import bulk, envoy, envoy_log, k8s_audit, linkerd, ztunnel
from meshlens.formats.base import RecordParser


@dataclass(frozen=True)
class FormatSpec:
    """One record format, as every consumer sees it.

    ``name`` is the ``--format`` value (``aliases`` are accepted too); ``summary`` is the ``--format``
    help and the README's "examples it handles"; ``example`` names a public source of a real record.
    ``bulk_class`` (bulk formats): ``envoy_text`` or ``envoy_json``, the SQL extractor; ``sql_detect``:
    the SQL condition on ``body`` that sends a record to it under auto-detection.
    """

    name: str
    kind: str  # 'bulk' | 'json' | 'unwrap' | 'text'
    summary: str
    example: str = ""
    aliases: tuple[str, ...] = ()
    detect: Callable[[Any], bool] | None = None
    parse: RecordParser | None = None
    unwrap: Callable[[dict[str, Any]], tuple[str, Any]] | None = None
    bulk_class: str | None = None
    sql_detect: str | None = None
    readme: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _loads_lazy(module: str, attr: str) -> Callable[..., Any]:
    """A function of a module imported on first use (ECS is an optional part written with the ES source)."""
    cache: list[Callable[..., Any]] = []

    def call(*args: Any) -> Any:
        if not cache:
            import importlib

            cache.append(getattr(importlib.import_module(module), attr))
        return cache[0](*args)

    call.__name__ = attr
    return call


def _docker_log(obj: dict[str, Any]) -> bool:
    return isinstance(obj.get("log"), str) and len(obj) <= 6


def _docker_unwrap(obj: dict[str, Any]) -> tuple[str, Any]:
    return obj["log"].rstrip("\n"), obj.get("time")


_RBAC_DEBUG = re.compile(r"^\d{4}-\d\d-\d\dT\S+\s+debug\s+envoy\s+rbac\s")
_LINKERD_APACHE = re.compile(r"^\S+:\d+ \S+ - \[")

_ENVOY_JSON_SQL = ("body[1] = '{' AND (" + " OR ".join(
    f"contains(body, '\"{k}\"')" for k in bulk.JSON_MARKER_KEYS) + ")")
_ENVOY_TEXT_SQL = "body[1] = '\"' OR (body[1] = '[' AND regexp_matches(body, '^\\[[^\\]]*\\]\\s*\"'))"

FORMATS: tuple[FormatSpec, ...] = (
    FormatSpec(
        "istio_text", "bulk",
        "Istio's default TEXT format of every release: ≥1.9 with response-code details, 1.8, 1.2–1.7 with the "
        "quoted mixer status (8 quoted fields), 1.1; waypoint records (`inbound-vip|PORT|http|host` clusters, "
        "server side); with or without the leading `[START_TIME]`, TCP records (`\"- - -\"`, code 0), "
        "`kubectl logs --prefix` prefixes",
        "istio/istio#24042 (1.5), istio/istio#35122 (1.9+), kiali/kiali#7899 (waypoint)",
        aliases=("envoy_text",), bulk_class="envoy_text", sql_detect=_ENVOY_TEXT_SQL),
    FormatSpec(
        "envoy_default", "bulk", "Envoy's own default format (gateways, Gloo, Contour)",
        "solo-io/gloo `docs/content/guides/security/access_logging`",
        bulk_class="envoy_text"),
    FormatSpec(
        "istio_json", "bulk",
        "Istio/Consul JSON encoding (values as numbers, strings, `\"-\"` or `null` depending on the version; "
        "trailing `;` on cluster names), Envoy Gateway's default JSON (path in `x-envoy-origin-path`), "
        "Contour's and Gloo's JSON fields, and any key set named after Envoy command operators "
        "(`:authority`, `user-agent`, `upstreamCluster`...); `--format envoy_json --mapping keys.yaml` for "
        "other custom key sets",
        "istio/istio#19056 (1.4), envoyproxy/gateway#7811, solo-io/gloo access-logging docs",
        aliases=("consul_json", "envoy_json"), bulk_class="envoy_json", sql_detect=_ENVOY_JSON_SQL),
    FormatSpec(
        "k8s_audit", "json",
        "`audit.k8s.io/v1` Events (also v1beta1-era, AKS-wrapped, pretty-printed); mutating verbs → "
        "`config_change` with the new spec and targets (Istio CRDs, Deployments, ConfigMaps, Helm release "
        "secrets), reads → `access`; only `ResponseComplete`/`Panic` stages are stored; Secret values are "
        "redacted",
        "kubernetes/website `content/en/docs/tasks/debug/debug-cluster/audit.md`",
        detect=k8s_audit.looks_like_audit, parse=k8s_audit.parse),
    FormatSpec(
        "linkerd_json", "json", "Linkerd proxy JSON access logs (ns timestamps and durations kept)",
        "linkerd/website `proxy-configuration` (access logging)",
        detect=lambda obj: "client.addr" in obj, parse=linkerd.parse_json),
    FormatSpec(
        "cloudwatch_event", "json",
        "CloudWatch Logs events (`aws logs filter-log-events`, subscription/Firehose `logEvents`, S3 exports) "
        "carrying EKS control-plane audit Events in `message`; an export holding many is read event by event",
        "AWS EKS docs `control-plane-logs` (`kube-apiserver-audit-*` streams)",
        detect=k8s_audit.looks_like_cloudwatch_event, parse=k8s_audit.parse_cloudwatch_event),
    FormatSpec(
        "es_search_hit", "json",
        "a saved Elasticsearch/OpenSearch search hit `{_index, _id, _source}` (one per line or pretty-printed): "
        "the record its `_source` carries, read as the Elasticsearch source reads documents",
        "kyma-project/telemetry-manager `docs/contributor/pocs/otlp-logs.md`",
        detect=_loads_lazy("meshlens.formats.ecs", "looks_like_search_hit"),
        parse=_loads_lazy("meshlens.formats.ecs", "parse_search_hit")),
    FormatSpec(
        "otel", "json",
        "OpenTelemetry log records carrying mesh access logs (Istio `envoyOtelAls`, Envoy's OpenTelemetry "
        "access logger): OTLP/JSON, the collector's Elasticsearch exporter (`otel`/`raw` modes), Data Prepper "
        "documents; the body line (or the access-log attributes) is parsed, the record's time, trace id and "
        "resource (`k8s.pod.name`...) complete it",
        "open-telemetry/opentelemetry-proto `examples/logs.json`",
        detect=_loads_lazy("meshlens.formats.otel", "looks_like_otel"),
        parse=_loads_lazy("meshlens.formats.otel", "parse_otel")),
    FormatSpec(
        "linkerd_proxy_json", "json",
        "Linkerd proxy logs in JSON (`proxy-log-format: json`): the same policy denials and identity "
        "failures as `linkerd_proxy`",
        "linkerd/linkerd2 issue #7050",
        detect=linkerd.looks_like_proxy_json, parse=linkerd.parse_proxy_json),
    FormatSpec(
        "shipper_k8s", "json",
        "log shipper records around a proxy line with Kubernetes metadata: Fluent Bit `log` + "
        "`kubernetes{namespace_name,pod_name,container_name}`, Filebeat `message` + `kubernetes.pod.name`...; "
        "the line is parsed with the pod as its writer",
        "fluent/fluent-bit `filter_kubernetes` docs",
        detect=_loads_lazy("meshlens.formats.ecs", "looks_like_shipper"),
        parse=_loads_lazy("meshlens.formats.ecs", "parse_shipper")),
    FormatSpec(
        "docker_json_log", "unwrap", "Docker json-file / Fluent Bit `{\"log\": ...}` records wrapping a line",
        detect=_docker_log, unwrap=_docker_unwrap, readme=False),
    FormatSpec(
        "ztunnel", "json",
        "Istio ambient ztunnel access logs: JSON (`\"scope\":\"access\"`, `\"message\":\"connection complete\"`) "
        "and text (`info access connection complete src.addr=...`, `INFO access: connection complete ...`), "
        "src/dst workload, identity, bytes, policy rejection; `ztunnel::state` policy decisions",
        "istio/ztunnel#1229, istio/ztunnel#2055, kubewarden/network-enforcer ztunnel_lua_test.go",
        detect=ztunnel.looks_like_json, parse=ztunnel.parse_json, extra={"text": "ztunnel_text"}),
    FormatSpec(
        "ecs", "json",
        "Elasticsearch documents in ECS: Elastic Agent's Istio integration (`event.original` -- the proxy's "
        "line -- parsed when present, else `istio.access.*`), its Kubernetes audit integration "
        "(`kubernetes.audit.*`), and already-structured ECS request fields",
        "elastic/integrations `packages/istio/data_stream/access_logs/_dev/test/pipeline`",
        detect=_loads_lazy("meshlens.formats.ecs", "looks_like_ecs"),
        parse=_loads_lazy("meshlens.formats.ecs", "parse_ecs")),
    FormatSpec(
        "envoy_rbac_debug", "text", "`enforced denied` / `shadow denied` / `no engine` RBAC debug lines",
        "istio/istio.io `docs/ops/common-problems/security-issues`",
        detect=_RBAC_DEBUG.match, parse=envoy.parse_rbac_debug),
    FormatSpec(
        "ztunnel_text", "text", "", detect=ztunnel.looks_like_text, parse=ztunnel.parse_text, readme=False),
    FormatSpec(
        "envoy_log", "text",
        "Envoy's own log lines with an authz/authn outcome: native prefix `[YYYY-MM-DD HH:MM:SS.mmm][thread]"
        "[level][component] [source/...:N]` (plain Envoy, Envoy Gateway, `[Envoy (Epoch 0)]` in older Istio) "
        "or Istio's layout; `[rbac]` enforced/shadow denied/allowed with the matched policy, `[ext_authz]` "
        "rejected/accepted, `[jwt]` authentication failures, `[connection]` TLS handshake errors",
        "envoyproxy/envoy#36346, istio/istio#26349, envoyproxy/envoy#32058",
        detect=envoy_log.looks_like, parse=envoy_log.parse),
    FormatSpec(
        "linkerd_apache", "text", "Linkerd proxy access logs, apache style (ns timestamps and durations kept)",
        "linkerd/website `proxy-configuration` (access logging)",
        detect=_LINKERD_APACHE.match, parse=linkerd.parse_apache),
    FormatSpec(
        "linkerd_proxy", "text",
        "Linkerd `Request denied` / `Connection denied` policy lines (their follow-up error line is a "
        "reject, so a denial counts once)",
        "linkerd/linkerd2 issues (policy denials)",
        detect=linkerd.looks_like_proxy, parse=linkerd.parse_proxy),
)
"""Every format, in detection order within its kind."""

TEXT_NOT_RECORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?:\d{4}-\d\d-\d\dT\S+|\[\s*\d+\.\d+s\])\s+(?:info|warn|warning|error|debug|trace|critical|"
                r"INFO|WARN|ERROR|DEBUG|TRACE)\b"),
     "proxy log line (pilot-agent/Envoy/Linkerd diagnostics), not an access or policy record"),
    (re.compile(r"^" + envoy_log.WRAPPER + r"\[\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?\]\[[^\]]*\]\[[a-z]+\]\[[a-z_0-9]+\] "),
     "Envoy log line ([date][thread][level][component] prefix) from a component without an authz/authn "
     "outcome, not an access or policy record"),
)
"""Known text shapes that are not records: (pattern, reject reason)."""

BY_NAME: dict[str, FormatSpec] = {}
for _spec in FORMATS:
    if _spec.kind == "unwrap":  # envelopes are not a record format one could force
        continue
    for _n in (_spec.name, *_spec.aliases):
        BY_NAME[_n] = _spec


def names() -> list[str]:
    """Every accepted ``--format`` value (``auto`` plus names and aliases), sorted."""
    return sorted(["auto", *BY_NAME])


def of_kind(kind: str) -> tuple[FormatSpec, ...]:
    return tuple(s for s in FORMATS if s.kind == kind)


def format_help() -> str:
    """The ``--format`` option's help text."""
    listed = [s.name for s in FORMATS if s.readme]
    return ("Force a record format instead of auto-detection per record (" + ", ".join(listed)
            + "; see README 'Formats').")


def readme_table() -> str:
    """The README's format table (Markdown), checked by a test against README.md."""
    rows = ["| format | examples it handles | example source |", "|---|---|---|"]
    for s in FORMATS:
        if not s.readme:
            continue
        name = " / ".join(f"`{n}`" for n in (s.name, *(a for a in s.aliases if not a.startswith("envoy_"))))
        rows.append(f"| {name} | {s.summary} | {s.example} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m meshlens.formats.registry > the README table
    print(readme_table())
