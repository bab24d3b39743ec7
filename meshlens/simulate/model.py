"""What a simulation is asked to do (:class:`Scenario`) and what it reports back (:class:`GroundTruth`).

Scenarios are plain dataclasses so that an evaluation can build dozens of them in a list
comprehension, print them, and store them in the ground truth next to the logs they produced.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshlens.errors import ConfigError

INCIDENT_KINDS = (
    "authz_deny",          # bad AuthorizationPolicy: 403 rbac_access_denied_matched_policy on the target's inbound
    "route_broken",        # VirtualService change: 404 NR route_not_found / 503 NC cluster_not_found at callers
    "bad_rollout",         # Deployment change: new pods return 500 (errors) or flap (503 UH / UC)
    "tls_failure",         # DestinationRule TLS change (verify_failed) or an expired client cert (expired)
    "latency",             # target gets slow (new image, or a slow node with no change); callers time out (UT)
    "rate_limit",          # EnvoyFilter local rate limit (429 RL), or a traffic surge into an existing limit
    "connection_failure",  # node/network problem, no change: 503 UF to the target's pods on the bad node
    "app_errors",          # target's own dependency outside the mesh fails, no change: 500 via_upstream
)

# kinds that never have a causing change, and kinds that always have one
NO_CHANGE_ONLY = ("connection_failure", "app_errors")
CHANGE_ONLY = ("authz_deny", "route_broken", "bad_rollout")

VARIANTS: dict[str, tuple[str, ...]] = {
    "authz_deny": ("deny_caller",),
    "route_broken": ("no_route", "no_cluster"),
    "bad_rollout": ("errors", "crashloop"),
    "tls_failure": ("verify_failed", "expired"),
    "latency": ("slow_release", "slow_config", "slow_node", "starved_caller", "minority_route"),
    "rate_limit": ("low_limit", "surge"),
    "connection_failure": ("node_down",),
    "app_errors": ("dependency_down",),
}

EXPLICIT_ONLY: frozenset[tuple[str, str]] = frozenset({("latency", "starved_caller"),
                                                      ("latency", "minority_route")})
"""Variants never picked at random for an unset ``variant`` (they came later: picking them would change
what existing seeds simulate). ``starved_caller``: the target is CPU-starved -- its own processing and
its client-side call durations grow, its callees' server-side durations do not. ``minority_route``: one
operation of the target, reached by a small share of the users' requests, becomes ``severity`` times
slower (default 30)."""

ACTORS = ("alice", "bob", "argocd", "helm")


@dataclass
class IncidentSpec:
    """One injected incident. Unset fields are chosen deterministically from the scenario seed.

    ``target`` is the root-cause service (for ``tls_failure``/``expired`` the service whose client
    certificate expired), ``caller`` the denied client for ``authz_deny``. ``onset_s`` is seconds after
    the window start; ``duration_s`` None means "until the end of the window" (unless ``rollback``).
    ``severity`` is the failing fraction (errors), the added median latency in ms (latency), the
    traffic multiplier (rate_limit/surge) or the limit as a fraction of normal load (rate_limit/low_limit).
    """

    kind: str
    variant: str | None = None
    with_change: bool | None = None
    target: str | None = None
    caller: str | None = None
    symptom: str | None = None
    onset_s: float | None = None
    duration_s: float | None = None
    severity: float | None = None
    actor: str | None = None
    change_delay_s: float | None = None
    rollback: bool = False
    decoys: int = 3

    def validate(self) -> None:
        if self.kind not in INCIDENT_KINDS:
            raise ConfigError(f"unknown incident kind {self.kind!r}; use one of {', '.join(INCIDENT_KINDS)}")
        if self.variant is not None and self.variant not in VARIANTS[self.kind]:
            raise ConfigError(f"incident kind {self.kind} has no variant {self.variant!r}; use one of "
                              f"{', '.join(VARIANTS[self.kind])}")
        if self.with_change is True and self.kind in NO_CHANGE_ONLY:
            raise ConfigError(f"incident kind {self.kind} never has a causing change (it is a node/network "
                              "or external-dependency failure); set with_change=False or None")
        if self.with_change is False and self.kind in CHANGE_ONLY:
            raise ConfigError(f"incident kind {self.kind} is caused by a config change by definition; "
                              "set with_change=True or None")
        if self.actor is not None and self.actor not in ACTORS:
            raise ConfigError(f"unknown actor {self.actor!r}; use one of {', '.join(ACTORS)}")
        if self.decoys < 0:
            raise ConfigError("decoys must be >= 0")


@dataclass
class NoisySpec:
    """An unrelated service with errors of its own that must not be blamed for the incident.

    ``stable``: an elevated but constant error rate over the whole window. ``burst``: a loud error
    burst of its own near the incident onset (from ``start_s`` for ``duration_s``; defaults put it
    around the first incident's onset).
    """

    service: str | None = None
    mode: str = "stable"
    error_rate: float | None = None
    start_s: float | None = None
    duration_s: float | None = None

    def validate(self) -> None:
        if self.mode not in ("stable", "burst"):
            raise ConfigError(f"noisy mode must be 'stable' or 'burst', not {self.mode!r}")
        if self.error_rate is not None and not 0 < self.error_rate <= 1:
            raise ConfigError(f"noisy error_rate must be in (0, 1], got {self.error_rate}")


@dataclass
class Scenario:
    """Everything that determines a simulated dataset. Same scenario -> byte-identical output.

    ``topology``: ``shop``, ``bank``, ``streaming``, ``random`` (graph from ``seed``) or ``random-<n>``;
    ``linkerd`` adds the Linkerd-meshed booksapp namespace. ``entry_rate``: mean root requests per
    second (gateway users + workers) at load 1; the load follows a 24 h cosine
    (``diurnal_amplitude``, peak at ``diurnal_peak_hour`` UTC). ``istio_format``: Istio access-log
    encoding per namespace. ``details_style``: Envoy's reset-detail rendering (``comma``: older
    ``{connection_failure,TLS_error:_...}`` with a spaced transport reason; ``pipe``: newer
    ``{remote_connection_failure|TLS_error:|...:TLS_error_end}``). ``json_cluster_semicolon``: the
    istio#54219 trailing ``;`` on JSON ``upstream_cluster``. ``grpc``: the services speak gRPC to each
    other (``POST /<namespace>.<Service>/<Method>`` over HTTP/2; the gateway's hop to the entry service
    stays HTTP): a failure is HTTP **200** with a non-zero ``grpc-status`` -- the application's own
    (INTERNAL, UNAVAILABLE, NOT_FOUND...) and Envoy's local replies too (200 with the flags and the status
    Envoy maps the HTTP code to: 503 UH -> UNAVAILABLE, envoy#16667 / #29052). The default Istio formats do
    not log a gRPC status, so every Istio namespace then logs JSON with one added key, ``"grpc_status":
    "%GRPC_STATUS%"`` (Envoy's default name rendering: ``OK``, ``Unavailable``...). ``baseline_s`` /
    ``after_s``: the logs hold only this much before / after the first incident's onset (a short window
    around a fault, as fault-injection datasets and freshly enabled logging give: 20-120 s of baseline,
    a few dozen requests); the traffic is simulated as always and the records outside are not written,
    the ground truth's window is the kept one. ``background_error_rate``: per-hop
    probability of ordinary failures (500s, 503 UC/UF). ``noisy``: the unrelated noisy service (None for
    none). ``benign_changes_per_hour`` / ``read_only_per_hour``: audit background.
    """

    name: str = "default"
    seed: int = 7
    topology: str = "shop"
    linkerd: bool = False
    start: str = "2024-05-01T00:00:00Z"
    duration_s: float = 2 * 3600.0
    entry_rate: float = 2.0
    diurnal_amplitude: float = 0.35
    diurnal_peak_hour: float = 15.0
    istio_format: str = "text"  # text | json | mixed (alternating per namespace)
    details_style: str = "comma"  # comma: {connection_failure,TLS_error:_...}; pipe: {remote_connection_failure|...}
    json_cluster_semicolon: bool = False
    background_error_rate: float = 0.002
    incidents: list[IncidentSpec] = field(default_factory=list)
    noisy: NoisySpec | None = field(default_factory=NoisySpec)
    benign_changes_per_hour: float = 1.0
    read_only_per_hour: float = 10.0
    health_check_period_s: float = 600.0
    proxy_lines: bool = True
    grpc: bool = False
    baseline_s: float | None = None
    after_s: float | None = None

    def validate(self) -> None:
        if self.duration_s < 600:
            raise ConfigError(f"scenario {self.name}: duration_s must be at least 600 (got {self.duration_s})")
        if self.entry_rate <= 0:
            raise ConfigError(f"scenario {self.name}: entry_rate must be > 0 requests/s")
        if self.istio_format not in ("text", "json", "mixed"):
            raise ConfigError(f"scenario {self.name}: istio_format must be text, json or mixed")
        if self.details_style not in ("comma", "pipe"):
            raise ConfigError(f"scenario {self.name}: details_style must be comma or pipe")
        if not 0 <= self.diurnal_amplitude < 1:
            raise ConfigError(f"scenario {self.name}: diurnal_amplitude must be in [0, 1)")
        parse_ts(self.start)
        for name in ("baseline_s", "after_s"):
            v = getattr(self, name)
            if v is not None and (not self.incidents or v <= 0):
                raise ConfigError(f"scenario {self.name}: {name} needs an incident and must be > 0 s")
        for inc in self.incidents:
            inc.validate()
        if self.noisy is not None:
            self.noisy.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scenario:
        d = dict(d)
        d["incidents"] = [IncidentSpec(**i) for i in d.get("incidents", [])]
        noisy = d.get("noisy")
        d["noisy"] = NoisySpec(**noisy) if isinstance(noisy, dict) else None
        return cls(**d)


def parse_ts(value: str) -> int:
    """RFC 3339 UTC timestamp -> Unix microseconds (only ``Z``/``+00:00`` accepted: no local times)."""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"bad timestamp {value!r}: use RFC 3339 like 2024-05-01T00:00:00Z") from exc
    if dt.tzinfo is None or dt.utcoffset() != UTC.utcoffset(None):
        raise ConfigError(f"timestamp {value!r} must be UTC (end it with Z)")
    return int(round(dt.timestamp() * 1_000_000))


def fmt_ts(us: int) -> str:
    """Unix microseconds -> ``2024-05-01T09:12:00.000000Z`` (the ground truth's timestamp format)."""
    secs, rem = divmod(us, 1_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{rem:06d}Z"


@dataclass
class GroundTruth:
    """What really happened in a simulated dataset, written as ``ground_truth.json`` beside the logs.

    ``incidents[i]`` holds the root cause (``root_cause_service``, ``root_cause_edge``, and
    ``accepted_root_causes``: every answer that names the cause -- the service or one of the affected
    edges ``client->server``), the symptom (the entry service where users see it), onset/end, the
    failure signature, and the causing change (``target`` ``Kind/namespace/name``, actor, ts) or None.
    ``changes`` lists every config change with its ``role``: cause, decoy, benign or rollback.
    """

    scenario: dict[str, Any]
    window_start: str
    window_end: str
    topology: dict[str, Any]
    incidents: list[dict[str, Any]]
    changes: list[dict[str, Any]]
    noisy: dict[str, Any] | None
    files: dict[str, dict[str, Any]]
    counts: dict[str, int]
    generator: dict[str, Any] = field(default_factory=dict)

    @property
    def decoys(self) -> list[dict[str, Any]]:
        return [c for c in self.changes if c["role"] == "decoy"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoys"] = self.decoys
        return d

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        d.pop("decoys", None)
        return cls(**d)
