"""Which record a stored search document carries (Elasticsearch/OpenSearch ``_source``).

Why here and not in the source: what a document *is* -- the proxy's own line kept by a shipper, an
already-structured ECS document, Istio JSON keys merged into the document -- is format knowledge; the
Elasticsearch source only pages through hits and hands each ``_source`` to :func:`document_record`.

* the proxy's own line (Fluent Bit ``log``, Filebeat ``message``) is emitted as is, so the mesh
  parsers read it exactly as they read files and Loki;
* a document that is already structured with ECS request fields is emitted as its canonical JSON
  (``json.dumps(_source, sort_keys=True)``) for :func:`meshlens.formats.ecs.parse_ecs`;
* Istio JSON keys merged into the document (Fluent Bit ``Merge_Log``) become the Istio JSON line;
* any other document is emitted as canonical JSON and the format detector decides (Kubernetes audit
  events, Linkerd JSON) or rejects it with its reason.
"""

from __future__ import annotations

import json
from typing import Any

from meshlens.formats.bulk import ENVOY_FIELDS, EXTRA_FIELDS, ISTIO_JSON_MARKERS
from meshlens.formats.ecs import looks_like_ecs

# Istio/Envoy JSON access-log keys, as the JSON parser knows them (defaults plus custom Telemetry keys).
ISTIO_JSON_KEYS: tuple[str, ...] = (*ENVOY_FIELDS, *(k for keys in EXTRA_FIELDS.values() for k in keys))


def istio_line(src: dict[str, Any]) -> str | None:
    """Istio's JSON access-log keys merged into the document -> the JSON line (None: not such a document)."""
    if not any(k in src for k in ISTIO_JSON_MARKERS):
        return None
    present = [k for k in ISTIO_JSON_KEYS if k in src]
    if len(present) < 5:
        return None
    return json.dumps({k: src[k] for k in present}, separators=(",", ":"))


def document_record(src: dict[str, Any]) -> tuple[str, str | None]:
    """The record text a document carries, and a reject reason when it carries none."""
    if looks_like_ecs(src):
        return json.dumps(src, sort_keys=True, ensure_ascii=False), None
    for key in ("log", "message"):
        raw = src.get(key)
        if isinstance(raw, str):
            if not raw.strip():
                return raw, f"the {key!r} field is empty"
            return raw.rstrip("\r\n"), None
    istio = istio_line(src)
    if istio is not None:
        return istio, None
    return json.dumps(src, sort_keys=True, ensure_ascii=False), None
