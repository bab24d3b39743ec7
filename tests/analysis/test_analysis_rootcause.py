"""Root cause: onset detection, failures followed to their origin, latency by self time, placement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meshlens.analysis import rootcause
from meshlens.errors import ConfigError
from tests.support.mesh import NS, T0, cached_store, incident_mesh, open_ro

ONSET = T0 + 25 * 60


@pytest.fixture(scope="module")
def errors_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_store(tmp_path_factory, "incident", lambda d: incident_mesh().ingest(d))


@pytest.fixture(scope="module")
def latency_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_store(tmp_path_factory, "latency", lambda d: incident_mesh(kind="latency").ingest(d))


@pytest.fixture(scope="module")
def quiet_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_store(tmp_path_factory, "quiet", lambda d: incident_mesh(onset_min=99).ingest(d))


# -- detectors --------------------------------------------------------------------------------------


def test_epidemic_changepoint_finds_the_planted_interval() -> None:
    rng = np.random.default_rng(1)
    n = np.full(120, 40.0)
    p = np.where((np.arange(120) >= 70) & (np.arange(120) < 100), 0.2, 0.01)
    k = rng.binomial(40, p).astype(float)
    a, b, llr = rootcause._epidemic(k, n)
    assert abs(a - 70) <= 1 and abs(b - 99) <= 1 and llr > 50
    # the same rate everywhere: nothing significant
    _, _, flat = rootcause._epidemic(rng.binomial(40, 0.01, 120).astype(float), n)
    assert flat < rootcause.MIN_LLR


def test_latency_changepoint_needs_a_real_shift() -> None:
    rng = np.random.default_rng(2)
    n = np.full(100, 30.0)
    shift = np.where(np.arange(100) >= 60, 0.8, 0.0)
    x = rng.normal(shift[:, None], 0.4, (100, 30))
    a, b, llr = rootcause._epidemic_mean(n, x.sum(axis=1), (x ** 2).sum(axis=1))
    assert abs(a - 60) <= 1 and b == 99 and llr > 100
    tiny = rng.normal(np.where(np.arange(100) >= 60, 0.03, 0.0)[:, None], 0.4, (100, 30))
    _, _, small = rootcause._epidemic_mean(n, tiny.sum(axis=1), (tiny ** 2).sum(axis=1))
    assert small < rootcause.MIN_LLR  # a 3 % shift is noise-level: no episode


def test_onset_is_refined_to_the_request() -> None:
    bad = np.array([0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert rootcause._refine(bad, p_in=0.7, p_out=0.05) == 7


def test_placement_by_fan_in_and_fan_out() -> None:
    """TLS failures decided by the client: many callers failing towards one service blame the service;
    one caller failing towards many services blames the caller (its certificate, its config)."""
    def leaves(edges: list[tuple[str, str]], n: int = 20) -> pd.DataFrame:
        rows = [{"rid": f"{a}{b}{i}", "period": "inc", "caller": a, "callee": b, "side": "edge"}
                for a, b in edges for i in range(n)]
        return pd.DataFrame(rows)

    health = pd.DataFrame({"caller": ["x"], "callee": ["y"], "n": [100], "f": [0]})
    fan_in = rootcause._side_weights(leaves([("a", "t"), ("b", "t")]), health).set_index("caller")
    assert (fan_in["w_callee"] > fan_in["w_caller"]).all()
    fan_out = rootcause._side_weights(leaves([("c", "t1"), ("c", "t2")]), health).set_index("callee")
    assert (fan_out["w_caller"] > fan_out["w_callee"]).all()
    server = leaves([("a", "t")]).assign(side="server")
    w = rootcause._side_weights(server, health).iloc[0]
    assert (w["w_callee"], w["w_caller"]) == (1.0, 0.0)


# -- analyses on hand-built stores -------------------------------------------------------------------


def test_error_incident_onset_and_cause(errors_db: Path) -> None:
    with open_ro(errors_db) as store:
        report = rootcause.analyze(store, "frontend", T0, T0 + 40 * 60)
    onset = report.onset
    assert onset is not None and onset.signal == "errors"
    assert abs(onset.onset_ns / NS - ONSET) < 10
    assert onset.failed_incident > 0.4 and onset.failed_baseline < 0.02
    top = report.candidates.iloc[0]
    assert (top["kind"], top["target"], top["namespace"]) == ("service", "ratings", "shop")
    assert top["score"] > 0.9
    assert any("500 via_upstream" in e for e in top["evidence"])
    assert any(e.startswith("example request ids: req-") for e in top["evidence"])
    targets = report.candidates["target"].tolist()
    assert targets[1] == "reviews->ratings"
    # ads fails a third of its calls all along: loud, but it neither changed nor explains the symptom
    ads = report.candidates[report.candidates["target"].str.contains("ads")]
    assert ads.empty or ads["score"].max() < 0.1
    assert report.signature["app"] > 0.9
    assert set(report.path_services["service"]) >= {"frontend", "reviews", "ratings"}


def test_latency_incident_is_attributed_by_self_time(latency_db: Path) -> None:
    with open_ro(latency_db) as store:
        report = rootcause.analyze(store, "frontend", T0, T0 + 40 * 60)
    assert report.onset is not None and report.onset.signal == "latency"
    assert abs(report.onset.onset_ns / NS - ONSET) < 10
    top = report.candidates.iloc[0]
    assert top["target"] == "reviews" and top["latency_share"] > 0.9
    assert "self time" in top["evidence"][0]
    assert report.candidates.iloc[1]["target"] == "frontend->reviews"
    # frontend relays the slowness but its own time did not grow
    fe = report.candidates[report.candidates["target"] == "frontend"]
    assert fe.empty or fe["score"].iloc[0] < 0.1


def test_success_sampling_keeps_the_answer_and_the_rates(errors_db: Path, tmp_path: Path) -> None:
    """Ingest-time success sampling keeps 20 % of successful requests (weight 5) and every failure:
    the weighted rates stay close to the full data's and the answer is the same."""
    from meshlens.filters import FilterConfig

    sampled_db = incident_mesh().ingest(tmp_path, filters=FilterConfig(sample_success=0.2))
    with open_ro(errors_db) as store:
        full = rootcause.analyze(store, "frontend", T0, T0 + 40 * 60)
    with open_ro(sampled_db) as store:
        stored = store.scalar("SELECT count(*) FROM events WHERE record_kind = 'access_log'")
        sampled = rootcause.analyze(store, "frontend", T0, T0 + 40 * 60)
    assert stored < 0.5 * 40 * 30 * 8  # most successful records were not stored
    assert sampled.candidates.iloc[0]["target"] == "ratings"
    assert abs(sampled.onset.onset_ns - full.onset.onset_ns) / NS < 30
    assert sampled.onset.failed_incident == pytest.approx(full.onset.failed_incident, abs=0.08)
    assert sampled.onset.requests_incident == pytest.approx(full.onset.requests_incident, rel=0.2)


def test_nothing_to_explain_without_a_change(quiet_db: Path) -> None:
    with open_ro(quiet_db) as store:
        report = rootcause.analyze(store, "frontend", T0, T0 + 40 * 60)
    assert report.onset is None and report.candidates.empty
    assert "nothing to explain" in report.message
    assert report.to_json() == []


def test_json_contract(errors_db: Path) -> None:
    with open_ro(errors_db) as store:
        items = rootcause.analyze(store, "frontend", T0, T0 + 40 * 60, top=3).to_json()
    json.dumps(items)
    assert [i["rank"] for i in items] == list(range(1, len(items) + 1)) and 2 <= len(items) <= 3
    for i in items:
        assert {"rank", "kind", "target", "namespace", "score", "evidence", "onset", "symptom"} <= set(i)
        assert i["kind"] in ("service", "edge") and isinstance(i["evidence"], list)
        assert all(isinstance(e, str) for e in i["evidence"])
    assert items[0]["onset"].startswith("2024-05-01T08:25:")


def test_bad_input_is_refused(errors_db: Path) -> None:
    with open_ro(errors_db) as store:
        with pytest.raises(ConfigError, match="received no requests"):
            rootcause.analyze(store, "checkout", T0, T0 + 600)
        with pytest.raises(ConfigError, match="empty time range"):
            rootcause.analyze(store, "frontend", T0 + 600, T0)


# -- local evidence: where a delay or an error is born ---------------------------------------------


def test_json_fields_for_scripts(errors_db: Path, quiet_db: Path) -> None:
    """The onset, before/after rates, the failure signature and example request ids are fields; a run
    with nothing to explain says so in a field when asked (the CLI does)."""
    with open_ro(errors_db) as store:
        items = rootcause.analyze(store, "frontend", T0, T0 + 40 * 60, top=3).to_json()
    top = items[0]
    assert top["incident"] is True and top["episode"]["onset"] == top["onset"]
    ep = top["episode"]
    assert ep["failed_incident"] > ep["failed_baseline"] and ep["requests_incident"] > 0
    assert top["signature"]["status"] == 500 and top["signature"]["details"] == "via_upstream"
    assert top["signature"]["count"] > 0 and top["example_request_ids"]
    assert all(isinstance(x, str) for x in top["example_request_ids"])
    with open_ro(quiet_db) as store:
        report = rootcause.analyze(store, "frontend", T0, T0 + 40 * 60)
    none = report.to_json(say_no_incident=True)
    assert len(none) == 1 and none[0]["incident"] is False and none[0]["target"] is None
    assert rootcause.NO_SIGNAL in none[0]["message"]


def test_exact_rank_test_for_short_samples() -> None:
    """9 slow calls after 27 fast ones: exact p = 1 / C(36, 9), far beyond the normal approximation."""
    from math import comb
    from statistics import NormalDist

    z = rootcause._mw_exact_z(9 * 27, 9, 27)
    assert z == pytest.approx(-NormalDist().inv_cdf(1 / comb(36, 9)), rel=1e-6)
    assert rootcause._mw_exact_z(0, 9, 27) == 0.0
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.normal(0, 1, 30), rng.normal(0.8, 1, 30)])
    approx = float(rootcause._rank_scan(v, np.array([30]))[0])
    r, _ = rootcause._ranks(v)
    exact = rootcause._mw_exact_z(r[30:].sum() - 30 * 31 / 2, 30, 30)
    assert exact == pytest.approx(approx, abs=0.25)  # same test where the approximation is good


def _records(rng: np.random.Generator, n: int, onset_frac: float, *, caller_starved: bool = False,
             callee_delay: str | None = None, slow_route: str | None = None, born: str | None = None
             ) -> pd.DataFrame:
    """Synthetic sidecar records of ``n`` entry requests into ``fe`` (calls ``a`` and ``b``; ``a`` calls
    ``db``; one request in 12 also calls ``pay``), with one fault after ``onset_frac`` of the window."""
    rows = []
    for i in range(n):
        ts = i * 10**9
        bad = i >= onset_frac * n
        rid = i
        t = ts
        out = 0.0
        calls = [("a", "/a"), ("b", "/b")] + ([("pay", "/pay")] if i % 12 == 0 else [])
        for callee, op in calls:
            srv = float(rng.gamma(4, 2))
            if callee == "a":
                sub = float(rng.gamma(4, 1))
                rows.append((t, rid, True, "a", "db", "GET /db", sub + 1, False))
                rows.append((t, rid, False, None, "db", "GET /db", sub, False))
                srv += sub + 1
            if slow_route == callee and bad:
                srv *= 30
            gap = 1.0 + float(rng.exponential(0.5))
            if callee_delay == callee and bad:
                gap += 80
            if caller_starved and bad:
                gap += 40 + float(rng.exponential(10))
            f_srv = born == callee and bad and rng.random() < 0.5
            rows.append((t, rid, True, "fe", callee, f"GET {op}", srv + gap, f_srv))
            rows.append((t, rid, False, None, callee, f"GET {op}", srv, f_srv))
            out += srv + gap
        own = float(rng.gamma(4, 3)) + (30 if caller_starved and bad else 0)
        rows.append((ts, rid, False, None, "fe", "GET /", own + out, False))
    return pd.DataFrame(rows, columns=["ts_ns", "rid", "cli", "caller", "callee", "op", "d", "failed"])


def _blame_of(df: pd.DataFrame) -> tuple[int | None, list[str]]:
    comps = rootcause._components(df)
    lo, hi = int(df["ts_ns"].min()), int(df["ts_ns"].max()) + 1
    onset, _ = rootcause._scan_onset(comps, lo, hi)
    if onset is None:
        return None, []
    changes = [c for k, s in comps.items() if (c := rootcause._change_at(k, s, onset, hi)) is not None
               and c.z >= rootcause.LOCAL_Z]
    b = rootcause._blame(changes, comps)
    return onset, b[b["kind"] == "service"]["target"].tolist()


def test_a_starved_caller_is_blamed_not_its_callees() -> None:
    """fe's calls take longer while a's and b's own (server-side) durations stay flat, and fe's own time
    grows: the delay is in the caller -- an entry service with no caller records."""
    onset, ranked = _blame_of(_records(np.random.default_rng(4), 300, 0.6, caller_starved=True))
    assert onset is not None and abs(onset / NS - 180) < 10
    assert ranked[0] == "fe"


def test_a_callee_network_delay_is_blamed_on_the_callee() -> None:
    onset, ranked = _blame_of(_records(np.random.default_rng(5), 300, 0.6, callee_delay="b"))
    assert onset is not None and abs(onset / NS - 180) < 10
    assert ranked[0] == "b" and "fe" not in ranked[:1]


def test_a_minority_route_slowdown_with_a_short_baseline() -> None:
    """One request in 12 calls pay, 30x slower after the onset: the entry's mean barely moves, but pay's
    own time on 20 calls before and 14 after is an exact rank test far past the bar."""
    onset, ranked = _blame_of(_records(np.random.default_rng(6), 400, 0.6, slow_route="pay"))
    assert onset is not None and abs(onset / NS - 240) < 25
    assert ranked[0] == "pay"


def test_a_rare_call_slowed_on_its_last_eight_calls_is_judged() -> None:
    """A network delay on a callee that one request in 12 reaches, with only ~8 calls after the onset and
    ~18 before: the best exact rank test is z ~ 4, short of a bar set for a busy route's 200 split points
    but past its own share of the scan's 0.05 family-wise level (a dozen split points)."""
    for seed in (9, 10, 11):
        onset, ranked = _blame_of(_records(np.random.default_rng(seed), 300, 0.7, callee_delay="pay"))
        assert onset is not None and abs(onset / NS - 210) < 30, seed
        assert ranked[0] == "pay", seed


def test_the_onset_scan_keeps_its_family_wise_level() -> None:
    """No fault at all, 40 windows: the scan proposes an onset (and blames someone) in about 5 % of them
    at most -- the weighted Bonferroni bar keeps the level it had with one bar for all components."""
    blamed = 0
    for seed in range(100, 140):
        onset, ranked = _blame_of(_records(np.random.default_rng(seed), 300, 2.0))
        blamed += bool(onset is not None and ranked)
    assert blamed <= 2


def test_errors_born_mid_chain() -> None:
    """b answers failures without a failing call under it: the errors are born at b."""
    df = _records(np.random.default_rng(7), 300, 0.6, born="b")
    comps = rootcause._components(df)
    c = rootcause._change_at(("born", "b"), comps[("born", "b")], 180 * NS, 300 * NS)
    assert c is not None and c.z > 5 and c.after > 0.3
    b = rootcause._blame([c], comps)
    assert b.iloc[0]["target"] == "b"


def test_no_change_no_blame() -> None:
    onset, ranked = _blame_of(_records(np.random.default_rng(8), 300, 2.0))
    assert onset is None or not ranked


def test_grpc_failures_under_http_200_count_as_failed() -> None:
    """gRPC answers errors in trailers: HTTP 200 with grpc-status 14 (UNAVAILABLE) is a failure; 5
    (NOT_FOUND) is an answer, like a 404."""
    import duckdb

    from meshlens.analysis.common import FAILED_SQL

    con = duckdb.connect()
    con.execute("CREATE TABLE events (status INTEGER, grpc_status INTEGER, authz_decision VARCHAR, "
                "response_flags VARCHAR)")
    con.execute("INSERT INTO events VALUES (200, 14, NULL, NULL), (200, 5, NULL, NULL), (200, 0, NULL, NULL), "
                "(200, NULL, NULL, NULL), (503, NULL, NULL, 'UH')")
    assert [r[0] for r in con.execute(f"SELECT {FAILED_SQL} FROM events").fetchall()] == \
        [True, False, False, False, True]
