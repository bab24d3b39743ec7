"""Seeded, deterministic service-mesh simulator: realistic proxy + audit logs with known ground truth.

Why: meshlens's parsers, store and analyses need data that looks exactly like production (real Istio
text/JSON access-log layouts, Linkerd JSON, Kubernetes audit events, logcli exports) *and* whose
answer is known (which service broke, which change did it), so that accuracy can be measured rather
than hoped for. Real logs never come with the answer; this does.

Quick use::

    from meshlens.simulate import Scenario, IncidentSpec, simulate, scenarios_for_evaluation
    gt = simulate(Scenario(incidents=[IncidentSpec(kind="authz_deny")]), "out/")
    gt.incidents[0]["root_cause_service"], gt.incidents[0]["change"]["target"]

Command line: ``python -m meshlens.simulate --out data/samples --seed 7`` (the shipped sample).

Modules: :mod:`.topology` (service graphs), :mod:`.cluster` (pods/IPs/rollouts), :mod:`.plan` (incident
targets, causing/decoy/benign changes, noisy service), :mod:`.engine` (call trees and both sidecars'
records), :mod:`.render` (byte-exact formats), :mod:`.audit` (API-server audit events),
:mod:`.runner` (orchestration and output), :mod:`.scenarios` (sample and evaluation scenarios).
"""

from meshlens.simulate.model import (
    INCIDENT_KINDS,
    VARIANTS,
    GroundTruth,
    IncidentSpec,
    NoisySpec,
    Scenario,
)
from meshlens.simulate.runner import AUDIT_FILE, simulate
from meshlens.simulate.scenarios import (
    EVAL_CASES,
    GRPC_FAULT_CASES,
    REAL_FAULT_CASES,
    SHORT_BASELINE_CASES,
    default_scenario,
    scenarios_for_evaluation,
    scenarios_for_real_faults,
)
from meshlens.simulate.topology import NAMED_TOPOLOGIES, get_topology, random_topology

__all__ = [
    "AUDIT_FILE",
    "EVAL_CASES",
    "INCIDENT_KINDS",
    "NAMED_TOPOLOGIES",
    "VARIANTS",
    "GroundTruth",
    "IncidentSpec",
    "NoisySpec",
    "Scenario",
    "default_scenario",
    "get_topology",
    "random_topology",
    "scenarios_for_evaluation",
    "scenarios_for_real_faults",
    "REAL_FAULT_CASES",
    "GRPC_FAULT_CASES",
    "SHORT_BASELINE_CASES",
    "simulate",
]
