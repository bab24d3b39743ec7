"""The Kubernetes / Istio objects the simulated actors create and change.

Each builder returns the full object as stored by the API server (minus server-set metadata), shaped
like the examples in the Istio docs: a DENY ``AuthorizationPolicy`` with a ``from.source.principals``
rule, a ``VirtualService`` whose only route needs a header (everything else: 404 NR) or splits to an
undefined subset (503 NC), a ``DestinationRule`` switching to ``MUTUAL`` TLS with a CA that does not
verify the mesh certificates, the ``EnvoyFilter`` local-rate-limit recipe from the Istio rate-limit task.
"""

from __future__ import annotations

from typing import Any

from meshlens.simulate.topology import Service


def fqdn(svc: Service) -> str:
    return f"{svc.name}.{svc.namespace}.svc.cluster.local"


def principal(svc: Service) -> str:
    return f"cluster.local/ns/{svc.namespace}/sa/{svc.name}"


def _meta(name: str, ns: str, **labels: str) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": ns}
    if labels:
        md["labels"] = dict(labels)
    return md


def virtual_service(svc: Service, variant: str, weight: int = 100) -> tuple[dict[str, Any], str]:
    """(object, route name that Envoy logs as %ROUTE_NAME% for matched requests)."""
    host = svc.name
    route_name = f"{svc.name}-route"
    http: list[dict[str, Any]]
    if variant == "no_route":
        route_name = f"{svc.name}-canary"
        http = [{"name": route_name,
                 "match": [{"headers": {"x-canary": {"exact": "true"}}}],
                 "route": [{"destination": {"host": host, "subset": "v2"}}]}]
    elif variant == "no_cluster":
        route_name = f"{svc.name}-split"
        http = [{"name": route_name,
                 "route": [{"destination": {"host": host, "subset": "v1"}, "weight": 100 - weight},
                           {"destination": {"host": host, "subset": "v3"}, "weight": weight}]}]
    elif variant == "canary_weights":
        http = [{"name": route_name,
                 "route": [{"destination": {"host": host, "subset": "v1"}, "weight": 90},
                           {"destination": {"host": host, "subset": "v1"}, "weight": 10,
                            "headers": {"request": {"set": {"x-canary-cohort": "b"}}}}]}]
    else:  # retries / timeout tuning
        http = [{"name": route_name, "route": [{"destination": {"host": host, "subset": "v1"}}],
                 "retries": {"attempts": 2, "perTryTimeout": "2s", "retryOn": "connect-failure,refused-stream"},
                 "timeout": "10s"}]
    obj = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
           "metadata": _meta(svc.name, svc.namespace, app=svc.name),
           "spec": {"hosts": [host], "http": http}}
    return obj, route_name


def destination_rule(svc: Service, variant: str) -> dict[str, Any]:
    policy: dict[str, Any]
    if variant == "bad_tls":
        policy = {"tls": {"mode": "MUTUAL", "clientCertificate": "/etc/certs/cert-chain.pem",
                          "privateKey": "/etc/certs/key.pem", "caCertificates": "/etc/certs/root-cert.pem",
                          "sni": fqdn(svc)}}
    elif variant == "outlier":
        policy = {"outlierDetection": {"consecutive5xxErrors": 7, "interval": "30s", "baseEjectionTime": "30s",
                                       "maxEjectionPercent": 50}}
    else:  # connection pool tuning
        policy = {"connectionPool": {"tcp": {"maxConnections": 200, "connectTimeout": "2s"},
                                     "http": {"http1MaxPendingRequests": 1024, "maxRequestsPerConnection": 0,
                                              "idleTimeout": "300s"}}}
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": _meta(svc.name, svc.namespace, app=svc.name),
            "spec": {"host": fqdn(svc), "trafficPolicy": policy,
                     "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                 {"name": "v2", "labels": {"version": "v2"}}]}}


def authorization_policy(svc: Service, variant: str, name: str,
                         callers: list[Service] | None = None) -> dict[str, Any]:
    if variant == "deny_caller":
        assert callers
        spec: dict[str, Any] = {
            "selector": {"matchLabels": {"app": svc.name}}, "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [principal(c) for c in callers]}}]}]}
    elif variant == "deny_admin":
        spec = {"selector": {"matchLabels": {"app": svc.name}}, "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin*", "/debug/*", "/actuator/*"]}}]}]}
    else:  # allow the current callers (and the mesh's own namespaces) explicitly
        assert callers is not None
        spec = {"selector": {"matchLabels": {"app": svc.name}}, "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": sorted(principal(c) for c in callers)
                                                + ["cluster.local/ns/istio-system/sa/istio-ingressgateway"]}}]},
                          {"to": [{"operation": {"paths": ["/healthz", "/ready"]}}]}]}
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": _meta(name, svc.namespace), "spec": spec}


def peer_authentication(ns: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": _meta("default", ns), "spec": {"mtls": {"mode": "STRICT"}}}


def envoy_filter(svc: Service, variant: str, tokens_per_minute: int = 600) -> dict[str, Any]:
    selector = {"labels": {"app": svc.name}}
    patches: list[dict[str, Any]]
    if variant == "ratelimit":
        patches = [{
            "applyTo": "HTTP_FILTER",
            "match": {"context": "SIDECAR_INBOUND",
                      "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}}},
            "patch": {"operation": "INSERT_BEFORE", "value": {
                "name": "envoy.filters.http.local_ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                    "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                    "value": {
                        "stat_prefix": "http_local_rate_limiter",
                        "token_bucket": {"max_tokens": tokens_per_minute, "tokens_per_fill": tokens_per_minute,
                                         "fill_interval": "60s"},
                        "filter_enabled": {"runtime_key": "local_rate_limit_enabled",
                                           "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                        "filter_enforced": {"runtime_key": "local_rate_limit_enforced",
                                            "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                        "response_headers_to_add": [{"append_action": "APPEND_IF_EXISTS_OR_ADD",
                                                     "header": {"key": "x-local-rate-limit", "value": "true"}}],
                    }}}}}]
        name = f"{svc.name}-local-ratelimit"
    else:
        patches = [{
            "applyTo": "NETWORK_FILTER",
            "match": {"context": "SIDECAR_INBOUND",
                      "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}}},
            "patch": {"operation": "MERGE", "value": {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                             "HttpConnectionManager",
                    "common_http_protocol_options": {"idle_timeout": "3600s"}}}}}]
        name = f"{svc.name}-idle-timeout"
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": _meta(name, svc.namespace), "spec": {"workloadSelector": selector, "configPatches": patches}}


def deployment(svc: Service, image: str, replicas: int, env: dict[str, str] | None = None,
               helm_release: str | None = None) -> dict[str, Any]:
    labels = {"app": svc.name, "version": "v1"}
    md = _meta(svc.name, svc.namespace, **labels)
    if helm_release:
        md["labels"].update({"app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/instance": helm_release})
        md["annotations"] = {"meta.helm.sh/release-name": helm_release,
                             "meta.helm.sh/release-namespace": svc.namespace}
    container: dict[str, Any] = {
        "name": svc.name, "image": image,
        "ports": [{"containerPort": svc.container_port, "name": "http", "protocol": "TCP"}],
        "env": [{"name": k, "value": v} for k, v in sorted((env or {}).items())],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": svc.container_port}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": svc.container_port}, "periodSeconds": 10},
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": md,
            "spec": {"replicas": replicas, "revisionHistoryLimit": 10,
                     "selector": {"matchLabels": {"app": svc.name}},
                     "strategy": {"type": "RollingUpdate",
                                  "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": labels,
                                               "annotations": {"sidecar.istio.io/inject": "true"}},
                                  "spec": {"serviceAccountName": svc.name, "containers": [container]}}}}


def image_patch(svc: Service, image: str) -> dict[str, Any]:
    """``kubectl set image`` / Helm strategic-merge patch body: only the changed container image."""
    return {"spec": {"template": {"spec": {"containers": [{"name": svc.name, "image": image}]}}}}


def config_map(svc: Service, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{svc.name}-config", svc.namespace,
                                                                       app=svc.name),
            "data": dict(sorted(data.items()))}


def default_config(svc: Service) -> dict[str, str]:
    return {"LOG_LEVEL": "info", "CACHE_TTL_SECONDS": "300", "DB_POOL_SIZE": "32",
            "FEATURE_FLAGS": "new-pricing=false,async-audit=true",
            "UPSTREAM_TIMEOUT_MS": "2500"}
