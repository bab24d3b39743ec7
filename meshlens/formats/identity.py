"""Workload identity from stream labels and mesh names -- shared by the bulk SQL and record parsers.

Why here: the same rules (which label names a namespace/pod/app, how a pod name maps to its workload,
how Istio/Consul cluster names and SNIs encode a service) are needed by the vectorized SQL path and the
per-record Python parsers. The regexes are declared once and used by both.
"""

from __future__ import annotations

import re

# Deployment pods are <workload>-<replicaset hash 6-10>-<5 chars>; DaemonSet/Job pods <workload>-<5>;
# StatefulSet pods <workload>-<ordinal>.
POD_SUFFIX_RE = r"(-[a-z0-9]{6,10})?-[a-z0-9]{5}$|-[0-9]+$"
_POD_SUFFIX = re.compile(POD_SUFFIX_RE)

NAMESPACE_LABELS = ("namespace", "namespace_name", "k8s_namespace_name", "kubernetes_namespace_name")
POD_LABELS = ("pod", "pod_name", "k8s_pod_name", "instance")
APP_LABELS = ("app", "workload", "app_kubernetes_io_name", "k8s_deployment_name", "service_name")
CONTAINER_LABELS = ("container", "container_name", "k8s_container_name")

# cluster.local service host: <svc>.<ns>.svc.<domain>
SVC_HOST_RE = r"^([^.]+)\.([^.]+)\.svc(\..*)?$"
# Istio SNI: outbound_.<port>_.<subset>_.<host>
ISTIO_SNI_RE = r"^outbound_\.(\d+)_\.[^.]*_\.(.+)$"
# Consul upstream cluster/SNI: <svc>.<ns>.<dc>.internal.<trust-domain>.consul (ns optional in OSS)
CONSUL_HOST_RE = r"^([^.]+)\.(?:([^.]+)\.)?[^.]+\.internal\.[^.]+\.consul$"
SPIFFE_RE = r"^(?:spiffe://)?[^/]+/ns/([^/]+)/sa/([^/]+)$"
LINKERD_ID_RE = r"^([^.]+)\.([^.]+)\.serviceaccount\.identity\.linkerd\..+$"

_SVC_HOST = re.compile(SVC_HOST_RE)
_SPIFFE = re.compile(SPIFFE_RE)
_LINKERD_ID = re.compile(LINKERD_ID_RE)


def first_label(labels: dict[str, str] | None, names: tuple[str, ...]) -> str | None:
    if not labels:
        return None
    for n in names:
        v = labels.get(n)
        if v:
            return v
    return None


def workload_from_pod(pod: str | None) -> str | None:
    """``reviews-v1-6584ddcf65-k78wz`` -> ``reviews-v1``."""
    if not pod:
        return None
    return _POD_SUFFIX.sub("", pod) or pod


def self_identity(labels: dict[str, str] | None) -> tuple[str | None, str | None]:
    """(workload, namespace) of the proxy that wrote a line, from its stream labels."""
    ns = first_label(labels, NAMESPACE_LABELS)
    app = first_label(labels, APP_LABELS)
    if not app:
        app = workload_from_pod(first_label(labels, POD_LABELS))
    return app, ns


def service_from_host(host: str | None) -> tuple[str | None, str | None]:
    """``reviews.default.svc.cluster.local`` -> (reviews, default); ``reviews:9080`` -> (reviews, None)."""
    if not host or host == "-":
        return None, None
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    m = _SVC_HOST.match(host)
    if m:
        return m.group(1), m.group(2)
    parts = host.split(".")
    if len(parts) == 2 and not parts[1].isdigit():
        return parts[0], parts[1]
    return (parts[0] if not host[0].isdigit() else host), None


def principal_identity(principal: str | None) -> tuple[str | None, str | None]:
    """(namespace, service account) from a SPIFFE id or Linkerd identity."""
    if not principal:
        return None, None
    m = _SPIFFE.match(principal)
    if m:
        return m.group(1), m.group(2)
    m = _LINKERD_ID.match(principal)
    if m:
        return m.group(2), m.group(1)
    return None, None


def ip_of(addr: str | None) -> str | None:
    """``10.0.0.1:8080`` -> ``10.0.0.1``; ``[::1]:80`` -> ``::1``; ``-`` -> None."""
    if not addr or addr == "-":
        return None
    if addr.startswith("["):
        return addr[1:].split("]", 1)[0]
    if addr.count(":") == 1:
        return addr.split(":", 1)[0]
    return addr


def port_of(addr: str | None) -> int | None:
    if not addr or ":" not in addr:
        return None
    tail = addr.rsplit(":", 1)[1]
    return int(tail) if tail.isdigit() else None
