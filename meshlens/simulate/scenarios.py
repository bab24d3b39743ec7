"""Ready-made scenarios: the shipped sample dataset and the evaluation set for the analyses.

``scenarios_for_evaluation(n)`` cycles through incident kinds x variants (with and without a causing
change), topologies (``shop``, ``bank``, ``streaming``, random graphs), Istio encodings (text, JSON,
mixed) and Envoy detail styles, each with decoy changes near the onset and a noisy service. Each is
sized (1.5 h window, ~1.2 root requests/s) to simulate and ingest in a few seconds.
"""

from __future__ import annotations

from meshlens.simulate.model import IncidentSpec, NoisySpec, Scenario

# (kind, variant): with_change follows from the variant (see plan._VARIANT_CHANGE)
EVAL_CASES: tuple[tuple[str, str], ...] = (
    ("authz_deny", "deny_caller"),
    ("latency", "slow_node"),
    ("route_broken", "no_route"),
    ("connection_failure", "node_down"),
    ("bad_rollout", "errors"),
    ("tls_failure", "expired"),
    ("tls_failure", "verify_failed"),
    ("rate_limit", "surge"),
    ("rate_limit", "low_limit"),
    ("app_errors", "dependency_down"),
    ("latency", "slow_release"),
    ("route_broken", "no_cluster"),
    ("bad_rollout", "crashloop"),
    ("latency", "slow_config"),
)

_TOPOLOGIES = ("shop", "bank", "streaming", "random")
_FORMATS = ("text", "json", "mixed")
_ACTORS = ("alice", "argocd", "helm", "bob")


def default_scenario(seed: int = 7) -> Scenario:
    """The shipped sample (``data/samples``): 12 h of the shop mesh (Istio + a Linkerd namespace).

    06:30 a node goes bad: reviews' pods on it answer ~300 ms slower (no config change) until 07:20; users
    see slow product pages. 09:20 alice applies a DENY AuthorizationPolicy on payments that matches
    checkout's principal: checkout -> payments gets 403 RBAC denials, users get 500s on POST /checkout
    until she deletes the policy at ~09:55. Decoy changes near both onsets (among them an
    AuthorizationPolicy on another service); recommendation fails ~6% of its requests all day.
    """
    return Scenario(
        name="sample-shop-12h", seed=seed, topology="shop", linkerd=True, start="2024-05-01T00:00:00Z",
        duration_s=12 * 3600, entry_rate=0.22, diurnal_amplitude=0.5, diurnal_peak_hour=13.0,
        istio_format="mixed", details_style="comma", background_error_rate=0.002,
        incidents=[
            IncidentSpec(kind="latency", variant="slow_node", target="reviews", symptom="frontend",
                         onset_s=6 * 3600 + 30 * 60, duration_s=50 * 60, severity=300.0, decoys=2),
            IncidentSpec(kind="authz_deny", target="payments", caller="checkout", symptom="frontend",
                         onset_s=9 * 3600 + 20 * 60, actor="alice", rollback=True, duration_s=35 * 60,
                         decoys=3),
        ],
        noisy=NoisySpec(service="recommendation", mode="stable", error_rate=0.06),
        benign_changes_per_hour=1.0, read_only_per_hour=8.0, health_check_period_s=600.0,
    )


def scenarios_for_evaluation(n: int = 24, *, duration_s: float = 5400.0, entry_rate: float = 1.2,
                             base_seed: int = 100) -> list[Scenario]:
    """``n`` varied single-incident scenarios with known answers (see module docstring)."""
    out: list[Scenario] = []
    for i in range(n):
        kind, variant = EVAL_CASES[i % len(EVAL_CASES)]
        topology = _TOPOLOGIES[i % len(_TOPOLOGIES)]
        seed = base_seed + i
        if topology == "random":
            topology = f"random-{seed}"
        noisy_mode = "burst" if i % 3 == 1 else "stable"
        sc = Scenario(
            name=f"eval-{i:02d}-{kind}-{variant}", seed=seed, topology=topology,
            linkerd=(i % 5 == 0), start=f"2024-05-{1 + i % 28:02d}T{8 + i % 10:02d}:00:00Z",
            duration_s=duration_s, entry_rate=entry_rate, diurnal_amplitude=0.3,
            istio_format=_FORMATS[i % len(_FORMATS)], details_style="pipe" if i % 2 else "comma",
            json_cluster_semicolon=(i % 6 == 4), background_error_rate=0.002,
            incidents=[IncidentSpec(kind=kind, variant=variant, actor=_ACTORS[i % len(_ACTORS)],
                                    onset_s=duration_s * (0.58 + 0.04 * (i % 3)), decoys=3)],
            noisy=NoisySpec(mode=noisy_mode),
            benign_changes_per_hour=2.0, read_only_per_hour=10.0, health_check_period_s=300.0,
        )
        if topology.startswith("random-"):
            sc = _feasible_random(sc)
        out.append(sc)
    return out


REAL_FAULT_CASES: tuple[tuple[str, str, str], ...] = (
    ("latency", "starved_caller", "shop"),
    ("latency", "minority_route", "shop"),
    ("latency", "starved_caller", "bank"),
    ("latency", "minority_route", "streaming"),
    ("app_errors", "dependency_down", "bank"),
    ("latency", "minority_route", "bank"),
)
"""Behaviours seen in real fault-injection data (Nezha) that the first evaluation set lacked: a
CPU-starved caller (its client-side durations grow, its callees' server-side ones do not), a minority
route slowing down many times over, and errors born mid-chain (a service failing without the call it
needed: ``app_errors``). Kept apart from :data:`EVAL_CASES` so the original 24 scenarios stay as they
were."""


GRPC_FAULT_CASES: tuple[tuple[str, str, str], ...] = (
    ("app_errors", "dependency_down", "shop"),
    ("bad_rollout", "errors", "bank"),
    ("connection_failure", "node_down", "streaming"),
    ("authz_deny", "deny_caller", "shop"),
    ("latency", "slow_node", "bank"),
)
"""gRPC meshes (``Scenario.grpc``): every failure between services is HTTP 200 with a failing
``grpc-status`` (the application's, or Envoy's local reply with its flags)."""

SHORT_BASELINE_CASES: tuple[tuple[str, str, str, float, float, bool, float | None], ...] = (
    # kind, variant, topology, seconds of logs before the onset, user requests/s, gRPC, severity
    ("app_errors", "dependency_down", "bank", 20.0, 3.0, False, 0.9),
    ("latency", "slow_release", "shop", 60.0, 0.5, False, None),
    ("connection_failure", "node_down", "streaming", 120.0, 0.8, False, None),
    ("latency", "starved_caller", "bank", 40.0, 1.2, False, None),
    ("latency", "slow_config", "streaming", 90.0, 0.8, True, None),
)
"""Short pre-fault windows (``Scenario.baseline_s``): the logs begin 20-120 s before the onset and hold
20-40 requests of normal traffic at the symptom (the rates are set for that: the symptom gets about
half of the users' requests), then 5 minutes of the fault. A failure must be clear to be told from
chance on so short a baseline (0 failures in 30 requests, then 15 %, is p ~ 0.01 before any scan
correction): the failing dependency is down for 90 % of its calls."""


def scenarios_for_real_faults(*, duration_s: float = 1800.0, entry_rate: float = 1.5,
                              base_seed: int = 500) -> list[Scenario]:
    """One scenario per :data:`REAL_FAULT_CASES` entry: half-hour windows with the onset 11-13 minutes in
    (shorter baselines than the main set), no causing change, a noisy service; then the gRPC meshes of
    :data:`GRPC_FAULT_CASES` and the short pre-fault windows of :data:`SHORT_BASELINE_CASES`."""
    cases: list[tuple[str, str, str, float | None, float, bool, float | None, str]] = [
        (k, v, t, None, entry_rate, False, None, "real") for k, v, t in REAL_FAULT_CASES]
    cases += [(k, v, t, None, entry_rate, True, None, "grpc") for k, v, t in GRPC_FAULT_CASES]
    cases += [(k, v, t, b, r, g, sev, "short") for k, v, t, b, r, g, sev in SHORT_BASELINE_CASES]
    out = []
    for i, (kind, variant, topology, baseline, rate, grpc, severity, tag) in enumerate(cases):
        out.append(Scenario(
            name=f"{tag}-{i:02d}-{kind}-{variant}", seed=base_seed + i, topology=topology, linkerd=False,
            start=f"2024-06-{1 + i % 28:02d}T09:00:00Z", duration_s=duration_s, entry_rate=rate,
            diurnal_amplitude=0.2, istio_format=_FORMATS[i % len(_FORMATS)],
            details_style="pipe" if i % 2 else "comma", background_error_rate=0.002,
            incidents=[IncidentSpec(kind=kind, variant=variant, onset_s=660.0 + 60 * (i % 3), decoys=1,
                                    severity=severity)],
            noisy=NoisySpec(mode="stable"), benign_changes_per_hour=2.0, read_only_per_hour=6.0,
            health_check_period_s=300.0, grpc=grpc, baseline_s=baseline,
            after_s=300.0 if baseline is not None else None))
    return out


def _feasible_random(sc: Scenario) -> Scenario:
    """A random graph may have no service where this incident would reach the users clearly enough, or
    no service unrelated enough to be the noisy one; then try the next graphs (seed + 1000, + 2000, ...)
    -- deterministic, and cheap: planning only."""
    from dataclasses import replace

    from meshlens.errors import ConfigError
    from meshlens.simulate.cluster import Cluster
    from meshlens.simulate.model import parse_ts
    from meshlens.simulate.plan import Planner
    from meshlens.simulate.topology import get_topology

    base = int(sc.topology.split("-", 1)[1])
    start = parse_ts(sc.start)
    for k in range(20):
        cand = replace(sc, topology=f"random-{base + 1000 * k}")
        topo = get_topology(cand.topology, linkerd=cand.linkerd, seed=cand.seed)
        try:
            plan = Planner(cand, topo, Cluster(topo, cand.seed, start), start,
                           start + int(cand.duration_s * 1e6)).plan()
        except ConfigError:
            continue
        if cand.noisy is not None and plan.noisy is None:
            continue  # no service left that is unrelated enough to be the noisy one
        return cand
    raise ConfigError(f"no random topology near {sc.topology} can host scenario {sc.name}")
