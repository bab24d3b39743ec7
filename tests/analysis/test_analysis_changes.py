"""Change correlation: features, calibration, and ranking on hand-built incidents with decoys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from meshlens.analysis import changes
from tests.support.mesh import T0, Mesh, cached_store, incident_mesh, open_ro

ONSET = T0 + 25 * 60
END = T0 + 40 * 60


def _deployment(app: str, image: str) -> dict:
    return {"replicas": 2, "selector": {"matchLabels": {"app": app}},
            "template": {"metadata": {"labels": {"app": app}}, "spec": {"containers": [{"name": app, "image": image}]}}}


def _policy(app: str) -> dict:
    return {"action": "DENY", "selector": {"matchLabels": {"app": app}},
            "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}


def _decoys(mesh: Mesh) -> Mesh:
    """Changes that must not be blamed: same kind elsewhere shortly before, something else right
    before, a change on the broken service after the onset, one on it long before, a namespace-wide
    one long before."""
    mesh.change(ONSET - 300, "Deployment", "shop", "ads", verb="patch", user="bob@example.com",
                spec=_deployment("ads", "ads:7"), group="apps", resource="deployments")
    mesh.change(ONSET - 30, "VirtualService", "shop", "legacy", spec={"hosts": ["legacy"]},
                group="networking.istio.io", resource="virtualservices")
    mesh.change(ONSET + 180, "AuthorizationPolicy", "shop", "ratings-deny-admin", spec=_policy("ratings"))
    mesh.change(ONSET - 1200, "ConfigMap", "shop", "ratings-config", verb="patch", data={"LOG_LEVEL": "debug"},
                group="", resource="configmaps")
    mesh.change(T0 + 60, "PeerAuthentication", "shop", "default", spec={"mtls": {"mode": "STRICT"}},
                resource="peerauthentications")
    return mesh


@pytest.fixture(scope="module")
def caused_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(d: Path) -> Path:
        mesh = _decoys(incident_mesh())
        mesh.change(ONSET - 60, "Deployment", "shop", "ratings", verb="patch", user="argocd",
                    spec=_deployment("ratings", "ratings:2.0.1"), group="apps", resource="deployments")
        return mesh.ingest(d)

    return cached_store(tmp_path_factory, "changes-caused", build)


@pytest.fixture(scope="module")
def uncaused_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_store(tmp_path_factory, "changes-uncaused", lambda d: _decoys(incident_mesh()).ingest(d))


# -- features and calibration -------------------------------------------------------------------------


def test_targets_match_services_by_name_or_name_prefix() -> None:
    services = ["thumbnails", "thumbnails-bff", "auth", "authors"]
    assert changes._match("auth", services) == "auth"
    assert changes._match("thumbnails-bff-config", services) == "thumbnails-bff"  # the longest prefix wins
    assert changes._match("thumbnails-v2", services) == "thumbnails"
    assert changes._match("authors-config", services) == "authors"
    assert changes._match("authz", services) is None  # no dash: not a prefix match


def test_time_feature_allows_rollouts_and_rules_out_later_changes() -> None:
    assert changes._time_feature(90.0, "Deployment") == 1.0  # new pods take time to start
    assert changes._time_feature(90.0, "VirtualService") < 1.0  # proxies load config in seconds
    assert changes._time_feature(-30.0, "VirtualService") == 0.7  # within the onset's uncertainty
    assert changes._time_feature(-120.0, "Deployment") == 0.0  # made after the symptom started
    assert changes._time_feature(3600.0, "Deployment") < 0.01
    assert changes._time_feature(float("nan"), "Deployment") == 0.0


def test_kind_feature_matches_the_failure_signature() -> None:
    denials = {"authz": 0.95, "app": 0.05}
    assert changes._kind_feature("AuthorizationPolicy", denials) > 0.9
    assert changes._kind_feature("VirtualService", denials) < 0.2
    assert changes._kind_feature("DestinationRule", {"tls": 1.0}) == 1.0
    assert changes._kind_feature("EnvoyFilter", {"ratelimit": 1.0}) == 1.0
    assert changes._kind_feature("SomethingNew", denials) == changes.UNKNOWN_KIND_COMPAT


def test_calibration_needs_a_change_on_the_blamed_service_shortly_before() -> None:
    def score(path: float, time: float, kind: float, shift: float) -> float:
        z = (changes.W_BIAS + changes.W_PATH_TIME * path * time + changes.W_KIND * kind
             + changes.W_SHIFT * shift * path + changes.W_TIME * time)
        return float(1 / (1 + np.exp(-z)))

    grid = np.linspace(0, 1, 6)
    # not on the blamed services: never "likely", whatever its timing, kind and shift
    assert max(score(0, t, k, s) for t in grid for k in grid for s in grid) < changes.LIKELY
    # merely on the bad paths (relays the failure): never likely either
    assert max(score(changes.PATH_RELEVANCE, t, k, s) for t in grid for k in grid for s in grid) < changes.LIKELY
    # on the blamed service but long before (no shift at the time): not likely
    assert score(1, 0.02, 1, 0) < changes.LIKELY
    # the real thing, and a weaker version of it
    assert score(1, 1, 1, 1) > 0.95
    assert score(0.9, 0.8, 0.6, 0.3) > changes.LIKELY


# -- ranking ------------------------------------------------------------------------------------------


def test_the_causing_deployment_ranks_first_and_decoys_stay_unlikely(caused_db: Path) -> None:
    with open_ro(caused_db) as store:
        report = changes.correlate(store, "frontend", T0, END)
    c = report.candidates
    assert c.iloc[0]["target"] == "Deployment/shop/ratings"
    assert c.iloc[0]["likely"] and c.iloc[0]["score"] >= 0.9
    assert c.iloc[0]["actor"] == "argocd"
    ev = " | ".join(c.iloc[0]["evidence"])
    assert "before the onset" in ev and "targets ratings: the top root-cause candidate" in ev
    assert "Deployment fits the failure signature" in ev
    rest = c.iloc[1:]
    assert len(rest) == 5 and (rest["score"] < changes.LIKELY).all()
    after = c[c["target"] == "AuthorizationPolicy/shop/ratings-deny-admin"].iloc[0]
    assert after["f_time"] == 0 and any("cannot have caused it" in e for e in after["evidence"])
    assert "1 likely cause" in report.message


def test_no_likely_verdict_when_no_change_caused_it(uncaused_db: Path) -> None:
    with open_ro(uncaused_db) as store:
        report = changes.correlate(store, "frontend", T0, END)
    assert report.root_cause.candidates.iloc[0]["target"] == "ratings"  # the incident is still explained
    assert not report.candidates.empty and (report.candidates["score"] < changes.LIKELY).all()
    assert "no config change explains" in report.message


def test_a_delete_inherits_the_targets_of_the_object_it_deletes(tmp_path: Path) -> None:
    mesh = incident_mesh(minutes=30)
    mesh.change(T0 + 120, "AuthorizationPolicy", "shop", "deny-legacy", spec=_policy("reviews"))
    mesh.change(T0 + 26 * 60, "AuthorizationPolicy", "shop", "deny-legacy", verb="delete")
    with open_ro(mesh.ingest(tmp_path)) as store:
        raw = changes._load_changes(store, T0 * 10**9, (T0 + 1800) * 10**9)
    assert raw["targets"].tolist() == [["reviews"], ["reviews"]]
    assert raw["verb"].tolist() == ["create", "delete"]


def test_json_contract_and_lookback(caused_db: Path) -> None:
    with open_ro(caused_db) as store:
        items = changes.correlate(store, "frontend", T0, END).to_json()
        short = changes.correlate(store, "frontend", T0 + 600, END, lookback="1s")
        long = changes.correlate(store, "frontend", T0 + 600, END, lookback="1h")
    json.dumps(items)
    for i, item in enumerate(items, 1):
        assert item["rank"] == i
        assert {"rank", "target", "actor", "ts", "score", "evidence", "likely"} <= set(item)
        assert 0 <= item["score"] <= 1 and item["target"].count("/") == 2
        assert item["ts"].startswith("2024-05-01T")
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    # the PeerAuthentication (T0 + 1 min) and the ConfigMap (T0 + 5 min) are before this window:
    # candidates only with enough lookback
    assert len(short.candidates) == 4 and len(long.candidates) == 6
    assert short.candidates.iloc[0]["target"] == "Deployment/shop/ratings"
