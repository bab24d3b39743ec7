"""The call graph: hops from both sidecars' records, edges, request chains, deepest failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlens.analysis.common import resolve_window, temp_name
from meshlens.analysis.graph import deepest_failures_sql, hop_table, request_hops, service_graph
from tests.support.mesh import T0, Mesh, cached_store, incident_mesh, open_ro, request


@pytest.fixture(scope="module")
def hand_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(d: Path) -> Path:
        m = Mesh()
        request(m, T0, "r-ok")
        request(m, T0 + 1, "r-fail", ratings_fail=True, ads_fail=True)
        request(m, T0 + 2, "r-ads", ads_fail=True)
        # an Envoy local reply with no route: no upstream cluster, so the record does not say it is the client's
        m.hop(T0 + 3, "frontend", "reviews", "r-nr", path="/nope", code=404, flags="NR", details="route_not_found",
              server=False, cluster=False)
        return m.ingest(d)

    return cached_store(tmp_path_factory, "graph-hand", build)


@pytest.fixture(scope="module")
def incident_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_store(tmp_path_factory, "incident", lambda d: incident_mesh().ingest(d))


def _hops(db: Path) -> list[dict]:
    with open_ro(db) as store, hop_table(store, resolve_window(store)) as h:
        return store.query(f"SELECT * FROM {h} ORDER BY ts_ns").to_dict("records")


def test_both_sidecars_records_make_one_hop_with_the_servers_view(hand_db: Path) -> None:
    hops = _hops(hand_db)
    # 3 requests x 4 calls + the local reply: every call once although most were logged twice
    assert len(hops) == 13
    by = {(h["request_id"], h["caller"], h["callee"]): h for h in hops}
    ok = by[("r-ok", "reviews", "ratings")]
    assert not ok["failed"] and ok["has_client"] and not ok["srv_failed"] and ok["callee_ns"] == "shop"
    bad = by[("r-fail", "reviews", "ratings")]
    assert bad["failed"] and bad["srv_failed"] and bad["srv_status"] == 500 and bad["srv_details"] == "via_upstream"
    assert by[("r-ok", "istio-ingressgateway", "frontend")]["caller_ns"] == "istio-system"


def test_record_of_unknown_side_gets_its_caller_from_the_client_ip(hand_db: Path) -> None:
    nr = [h for h in _hops(hand_db) if h["request_id"] == "r-nr"]
    assert len(nr) == 1
    h = nr[0]
    assert (h["caller"], h["callee"], h["flags"], h["failed"]) == ("frontend", "reviews", "NR", True)
    assert not h["has_client"] and not h["srv_failed"]  # nothing says the server decided it


def test_service_graph_counts_each_call_once(hand_db: Path) -> None:
    with open_ro(hand_db) as store:
        g = service_graph(store).set_index(["src", "dst"])
        assert g.loc[("reviews", "ratings"), "requests"] == 3
        assert g.loc[("reviews", "ratings"), "failed"] == 1
        assert g.loc[("frontend", "ads"), "error_ratio"] == pytest.approx(2 / 3, abs=1e-3)
        assert g.loc[("frontend", "reviews"), "requests"] == 4  # three calls + the no-route reply
        only = service_graph(store, service="ads")
        assert set(only["dst"]) == {"ads"}
        assert service_graph(store, namespace="nowhere").empty


def test_request_drill_down_lists_the_chain_in_order(hand_db: Path) -> None:
    with open_ro(hand_db) as store:
        chain = request_hops(store, "r-fail")
    assert list(zip(chain["caller"], chain["callee"], strict=True)) == [
        ("istio-ingressgateway", "frontend"), ("frontend", "reviews"), ("reviews", "ratings"), ("frontend", "ads")]
    assert list(chain["status"]) == [503, 503, 500, 500]


def test_deepest_failure_is_followed_down_the_chain_and_recovered_calls_are_ignored(incident_db: Path) -> None:
    """ratings fails and the failure climbs up to the gateway; ads fails too, but the frontend recovers
    from it (optional call): an ads failure only counts where the request failed anyway (it is then a
    failing hop whose caller failed), never in the many requests the frontend saved."""
    with open_ro(incident_db) as store:
        w = resolve_window(store)
        req = temp_name("req")
        store.con.execute(
            f"""CREATE TEMP TABLE {req} AS
                SELECT hash(coalesce(request_id, trace_id, event_id)) AS rid, 'inc' AS period,
                       bool_or(status >= 500) AS sym_failed
                FROM events WHERE dst_service = 'frontend' AND direction = 'outbound' GROUP BY 1""")
        with hop_table(store, w) as h:
            leaves = store.query(f"SELECT caller, callee, side, count(*) AS n FROM ({deepest_failures_sql(h, req)}) "
                                 f"GROUP BY ALL").set_index(["caller", "callee"])
            failing = store.scalar(f"SELECT count(*) FROM {req} WHERE sym_failed")
            ads_failed = store.scalar(f"SELECT count(*) FROM {h} WHERE callee = 'ads' AND failed")
            ads_in_failing = store.scalar(
                f"SELECT count(*) FROM {h} JOIN {req} USING (rid) WHERE callee = 'ads' AND failed AND sym_failed")
    assert set(leaves.index) == {("reviews", "ratings"), ("frontend", "ads")}
    assert leaves.loc[("reviews", "ratings"), "n"] == failing  # every failing request is explained
    assert leaves.loc[("reviews", "ratings"), "side"] == "server"  # ratings' own sidecar logged the 500
    assert leaves.loc[("frontend", "ads"), "n"] == ads_in_failing < ads_failed / 3


def test_linkerd_server_only_records_are_hops(tmp_path: Path) -> None:
    """Linkerd proxies log only the server side, with the client's identity: each record is a hop."""
    from meshlens.simulate import NoisySpec, Scenario
    from tests.support.mesh import simulated_store

    sc = Scenario(name="linkerd-graph", seed=3, topology="shop", linkerd=True, duration_s=900, entry_rate=0.4,
                  incidents=[], noisy=NoisySpec(service=None, mode="stable", error_rate=0.05),
                  benign_changes_per_hour=0, read_only_per_hour=0, proxy_lines=False)
    db, gt = simulated_store(tmp_path, sc)
    with open_ro(db) as store:
        g = service_graph(store)
        records = store.scalar("SELECT count(*) FROM events WHERE mesh = 'linkerd' AND dst_service = 'books' "
                               "AND coalesce(user_agent, '') NOT LIKE 'kube-probe%'")
    edges = set(zip(g["src"], g["dst"], strict=True))
    topo_edges = {(e["client"], e["server"]) for e in gt["topology"]["edges"]}
    assert ("webapp", "books") in edges
    assert int(g.set_index(["src", "dst"]).loc[("webapp", "books"), "requests"]) == records
    # every hop found is a real call of the topology (callers resolved right, nothing invented)
    assert edges <= topo_edges
