"""Incidents across a window: grouping, entry services, the bundled samples, the CLI, the change fix, and
the measured accuracy over simulated multi-incident windows (:mod:`meshlens.simulate.windows`).

Evaluation size: 4 windows of 4 h at 0.5 user requests/s (2-3 incidents each, simulated and ingested two
at a time: a few minutes on the shared 2-core machine). ``MESHLENS_SLOW=1`` runs 12 windows of 5 h at
0.6/s. Targets (issue 16): each incident found (onset within 5 min, right root cause) >= 90 %, its change
right >= 90 %, at most one spurious incident per three windows. The accuracy table is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from meshlens import notebook as nbhelp
from meshlens.analysis import changes, incidents
from meshlens.store import open_store
from tests.support.mesh import T0, incident_mesh, open_ro

SLOW = os.environ.get("MESHLENS_SLOW") == "1"
N_WINDOWS, DURATION_S, ENTRY_RATE = (12, 5 * 3600.0, 0.6) if SLOW else (4, 4 * 3600.0, 0.5)


# -- pieces ---------------------------------------------------------------------------------------------


def test_entry_services_are_what_the_ingress_gateway_calls() -> None:
    edges = pd.DataFrame({"caller": ["istio-ingressgateway", "frontend", "order-worker", "frontend"],
                          "callee": ["frontend", "checkout", "shipping", "ads"]})
    assert incidents.entry_services(edges) == ["frontend"]  # a worker's callee is not where users are
    no_gateway = edges[edges["caller"] != "istio-ingressgateway"]
    # without a gateway, every root caller's callees (frontend is a root here: nobody calls it)
    assert incidents.entry_services(no_gateway) == ["ads", "checkout", "shipping"]
    assert incidents.entry_services(edges.iloc[:0]) == []


def _anoms(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["scope", "target", "metric", "onset"])
    df["onset"] = pd.to_datetime(df["onset"], utc=True)
    df["end"] = df["onset"] + pd.Timedelta(minutes=20)
    df["score"] = 20.0
    df["kind"] = "metric"
    df["baseline"], df["observed"] = 0.01, 0.2  # a failure ratio up 19 points: hurts
    return df


def test_grouping_follows_the_call_graph_and_time() -> None:
    anoms = _anoms([
        ("service", "payments", "denials", "2024-05-01T09:21:00Z"),
        ("service", "checkout", "errors_5xx", "2024-05-01T09:21:00Z"),
        ("service", "frontend", "errors_5xx", "2024-05-01T09:24:00Z"),
        ("service", "ads", "errors_5xx", "2024-05-01T09:20:00Z"),  # same time, not adjacent: apart
        ("service", "payments", "errors_5xx", "2024-05-01T12:00:00Z"),  # same service hours later
        ("service", "checkout", "errors_5xx", "2024-05-01T12:03:00Z"),
        ("edge", "istio-ingressgateway->frontend", "errors_5xx", "2024-05-01T12:05:00Z"),
    ])
    edges = pd.DataFrame({"caller": ["istio-ingressgateway", "frontend", "checkout", "recommendation"],
                          "callee": ["frontend", "checkout", "payments", "ads"], "requests": 100})
    groups = incidents._groups(anoms, {"frontend": {"checkout", "istio-ingressgateway"},
                                       "checkout": {"frontend", "payments"}, "payments": {"checkout"},
                                       "ads": {"recommendation"}, "recommendation": {"ads"}})
    assert sorted(map(sorted, groups)) == [[0, 1, 2], [3], [4, 5, 6]]
    found, background = incidents._candidate_groups(anoms, edges, ["frontend"])
    assert [g.symptom for g in found] == ["frontend", "frontend"]  # the edge into frontend counts
    assert background == {3}  # ads never reaches users
    # a significant but tiny rise at the entry (0.1 points) does not hurt users
    weak = anoms.copy()
    weak.loc[[2, 6], "observed"] = 0.011
    found, background = incidents._candidate_groups(weak, edges, ["frontend"])
    assert found == [] and background == {0, 1, 2, 3, 4, 5, 6}


# -- the bundled samples ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = nbhelp.samples_dir()
    if d is None or not (d / "ground_truth.json").exists():
        pytest.skip("data/samples/ has no simulated dataset with ground truth")
    from meshlens.ingest import ingest_files

    db = tmp_path_factory.mktemp("inc-samples") / "samples.duckdb"
    ingest_files(str(db), sorted(str(p) for p in d.glob("*.jsonl.gz")), progress=False)
    return db, json.loads((d / "ground_truth.json").read_text())


def test_samples_show_both_planted_incidents_with_their_causes(samples: tuple[Path, dict]) -> None:
    """The issue's complaint: over the whole 12 h, root cause by symptom finds only the payments incident."""
    from meshlens.simulate.windows import score_window

    db, truth = samples
    with open_store(db, read_only=True) as store:
        report = incidents.find_incidents(store, truth["window_start"], truth["window_end"])
    score = score_window(report.items, truth)
    assert score["found"] == score["change_ok"] == len(truth["incidents"]) == 2, score["misses"]
    assert score["spurious"] == 0, score["misses"]
    by_cause = {i["root_cause"]["target"]: i for i in report.items}
    denial = next(i for i in truth["incidents"] if i["change"] is not None)
    item = next(v for k, v in by_cause.items() if k in denial["accepted_root_causes"])
    assert item["change"]["actor"] == denial["change"]["actor"] == "alice@example.com"
    assert "alice@example.com" in item["summary"] and item["symptom"] == denial["symptom_service"]
    assert item["kind"] == "errors" and item["end"] is not None
    # the loud recommendation service (6 % errors all day, absorbed by the frontend) is no incident
    noisy = truth["noisy"]["service"]
    assert all(i["root_cause"]["target"].split("->")[-1] != noisy for i in report.items)


def test_a_session_over_records_read_once_analyses_the_same(samples: tuple[Path, dict]) -> None:
    """What ``analyze incidents`` does to stay fast (each symptom's records read once per window, the kept
    onset attempt analysed on its own session) must not change an answer."""
    from meshlens.analysis import rootcause
    from meshlens.analysis.common import NS

    db, truth = samples
    inc = truth["incidents"][0]
    svc = inc["symptom_service"]
    onset_ns = int(pd.Timestamp(inc["onset"]).value)
    lo, hi = onset_ns - 30 * 60 * NS, onset_ns + 40 * 60 * NS
    with open_store(db, read_only=True) as store:
        with rootcause.session(store, svc, lo, hi) as sess:
            plain = rootcause.analyze_session(sess)
        symptoms = incidents._Symptoms(store, incidents.resolve_window(store, truth["window_start"],
                                                                        truth["window_end"]))
        try:
            with rootcause.session(store, svc, lo, hi, records=symptoms.records(svc)) as sess:
                prepared = rootcause.session_onset(sess)
                cached = rootcause.analyze_session(sess, prepared=prepared)
            assert symptoms.records(svc) in set(symptoms.tables.values())  # built once, reused
        finally:
            symptoms.close()
        assert not store.query("SELECT table_name FROM duckdb_tables() WHERE temporary").shape[0]  # dropped
    assert plain.onset is not None and plain.onset == cached.onset == prepared[0]
    pd.testing.assert_frame_equal(plain.candidates, cached.candidates)
    assert plain.to_json() == cached.to_json() and plain.message == cached.message


# -- the CLI ---------------------------------------------------------------------------------------------


CLI = [sys.executable, "-m", "meshlens.cli", "analyze", "incidents"]


def test_cli_json_and_text(samples: tuple[Path, dict]) -> None:
    db, truth = samples
    args = [*CLI, "--db", str(db), "--from", truth["window_start"], "--to", truth["window_end"]]
    r = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    assert [i["rank"] for i in items] == [1, 2]
    assert [i["severity"] for i in items] == sorted((i["severity"] for i in items), reverse=True)
    for i in items:
        assert {"rank", "onset", "end", "services", "symptom", "root_cause", "change", "summary"} <= set(i)
        assert i["onset"].endswith("Z") and i["symptom"] in i["services"]
        assert {"rank", "kind", "target", "score", "evidence", "onset", "symptom"} <= set(i["root_cause"])
        assert i["change"] is None or (i["change"]["score"] >= changes.LIKELY
                                       and {"target", "actor", "ts", "score", "evidence"} <= set(i["change"]))
    t = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert t.returncode == 0, t.stderr
    assert t.stdout.startswith("2 incident(s) from ") and "#1 " in t.stdout and "#2 " in t.stdout
    assert "alice@example.com" in t.stdout and "background anomalies (never reached users):" in t.stdout


@pytest.mark.parametrize("args,message", [
    (("--to", "2024-05-01T12:00:00Z"), "--from is required"),
    (("--from", "soon", "--to", "2024-05-01T12:00:00Z"), "--from: invalid time 'soon'"),
    (("--from", "2024-05-01T12:00:00Z", "--to", "2024-05-01T00:00:00Z"), "empty time range"),
])
def test_cli_bad_input_is_one_line(samples: tuple[Path, dict], args: tuple[str, ...], message: str) -> None:
    r = subprocess.run([*CLI, "--db", str(samples[0]), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- change scoring: unrelated ConfigMaps are not likely -------------------------------------------------


def _config(mesh: object, ts: float, ns: str, name: str) -> None:
    mesh.change(ts, "ConfigMap", ns, name, verb="patch", data={"LOG_LEVEL": "debug"},  # type: ignore[attr-defined]
                group="", resource="configmaps")


def _deploy(mesh: object, ts: float, app: str, configmaps: list[str]) -> None:
    spec = {"replicas": 2, "selector": {"matchLabels": {"app": app}},
            "template": {"metadata": {"labels": {"app": app}}, "spec": {
                "containers": [{"name": app, "image": f"{app}:1", "envFrom": [{"configMapRef": {"name": c}}
                                                                            for c in configmaps]}]}}}
    mesh.change(ts, "Deployment", "shop", app, verb="update", user="argocd", spec=spec,  # type: ignore[attr-defined]
                group="apps", resource="deployments")


def test_unrelated_configmaps_do_not_score_as_likely(tmp_path: Path) -> None:
    """A change-free incident (ratings answers 500s): ConfigMaps changed just before the onset on the
    service that merely calls ratings, with ratings' name in another namespace, and one named after
    ratings that ratings' Deployment does not reference -- none is a likely cause. The one ratings does
    mount (under a name that does not start with ratings) is linked through the Deployment."""
    onset = T0 + 25 * 60
    mesh = incident_mesh()
    _deploy(mesh, T0 - 3600, "ratings", ["shared-db-settings"])  # ratings' spec: what it mounts
    _config(mesh, onset - 40, "shop", "reviews-config")  # the caller of the broken service
    _config(mesh, onset - 50, "other", "ratings-config")  # same name, other namespace
    _config(mesh, onset - 55, "shop", "ratings-dashboards")  # named like ratings, not referenced by it
    with open_ro(mesh.ingest(tmp_path / "a")) as store:
        report = changes.correlate(store, "frontend", T0, T0 + 40 * 60, lookback="2h")
    assert report.root_cause.candidates.iloc[0]["target"] == "ratings"
    c = report.candidates.set_index("target")
    for t in ("ConfigMap/shop/reviews-config", "ConfigMap/other/ratings-config", "ConfigMap/shop/ratings-dashboards"):
        assert c.loc[t, "score"] < changes.LIKELY, report.table().to_string()
    assert c.loc["ConfigMap/other/ratings-config", "f_path"] == 0
    assert c.loc["ConfigMap/shop/ratings-dashboards", "f_path"] == 0

    mesh2 = incident_mesh()
    _deploy(mesh2, T0 - 3600, "ratings", ["shared-db-settings"])
    _config(mesh2, onset - 40, "shop", "shared-db-settings")  # the one ratings reads: the cause
    with open_ro(mesh2.ingest(tmp_path / "b")) as store:
        top = changes.correlate(store, "frontend", T0, T0 + 40 * 60, lookback="2h").candidates.iloc[0]
    assert top["target"] == "ConfigMap/shop/shared-db-settings" and top["likely"]


def test_pod_spec_references() -> None:
    spec = {"template": {"spec": {
        "volumes": [{"name": "a", "configMap": {"name": "cm-a"}}, {"name": "s", "secret": {"secretName": "sec"}},
                    {"name": "p", "projected": {"sources": [{"configMap": {"name": "cm-p"}}]}}],
        "containers": [{"name": "x", "env": [{"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cm-e"}}}]}]}}}
    refs, full = changes._pod_spec_refs(spec)
    assert full and refs == {("ConfigMap", "cm-a"), ("Secret", "sec"), ("ConfigMap", "cm-p"), ("ConfigMap", "cm-e")}
    patch = {"patch": {"spec": {"template": {"spec": {"containers": [{"name": "x", "image": "x:2"}]}}}}}
    assert changes._pod_spec_refs(patch) == (set(), False)  # a patch is not the whole spec


# -- the evaluation ----------------------------------------------------------------------------------------


def _build(args: tuple[str, object]) -> tuple[str, str, dict]:
    from meshlens.ingest import ingest_files
    from meshlens.simulate import simulate

    out, scenario = args
    d = Path(out) / scenario.name  # type: ignore[attr-defined]
    gt = simulate(scenario, d)  # type: ignore[arg-type]
    db = d / "store.duckdb"
    ingest_files(str(db), sorted(str(p) for p in d.glob("*.jsonl.gz")), progress=False)
    return scenario.name, str(db), gt.to_dict()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    from meshlens.simulate.windows import incident_windows, score_window

    windows = incident_windows(N_WINDOWS, duration_s=DURATION_S, entry_rate=ENTRY_RATE)
    out = tmp_path_factory.mktemp("incident-windows")
    with ProcessPoolExecutor(max_workers=2) as pool:
        built = list(pool.map(_build, [(str(out), w) for w in windows]))
    rows = []
    for name, db, gt in built:
        with open_store(db, read_only=True) as store:
            report = incidents.find_incidents(store, gt["window_start"], gt["window_end"])
        s = score_window(report.items, gt)
        rows.append({"window": name, "kinds": ", ".join(f"{i['kind']}/{i['variant']}" for i in gt["incidents"]),
                     "noisy": gt["noisy"]["service"], **s})
    return pd.DataFrame(rows)


def accuracy_table(df: pd.DataFrame) -> str:
    n = int(df["incidents"].sum())
    lines = ["", f"Incidents over {len(df)} simulated windows ({DURATION_S / 3600:.0f} h, {ENTRY_RATE} user "
             f"requests/s, 2-3 incidents each, a loud unrelated service): {n} incidents", "",
             "| window | incidents | found | change right | spurious |", "|---|---|---|---|---|"]
    for r in df.itertuples(index=False):
        lines.append(f"| {r.window} | {r.incidents} | {r.found} | {r.change_ok} | {r.spurious} |")
    lines += ["", f"found {df['found'].sum() / n:.0%}, change right {df['change_ok'].sum() / n:.0%}, "
              f"spurious {int(df['spurious'].sum())} in {len(df)} windows", ""]
    lines += [f"MISS {r.window}: {m}" for r in df.itertuples(index=False) for m in r.misses]
    return "\n".join(lines)


def test_print_incident_accuracy(evaluation: pd.DataFrame, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(accuracy_table(evaluation))
    assert len(evaluation) == N_WINDOWS and (evaluation["incidents"] >= 2).all()


def test_incidents_found_at_least_90_percent(evaluation: pd.DataFrame) -> None:
    assert evaluation["found"].sum() >= 0.9 * evaluation["incidents"].sum(), accuracy_table(evaluation)


def test_changes_right_at_least_90_percent(evaluation: pd.DataFrame) -> None:
    assert evaluation["change_ok"].sum() >= 0.9 * evaluation["incidents"].sum(), accuracy_table(evaluation)


def test_at_most_one_spurious_incident_per_three_windows(evaluation: pd.DataFrame) -> None:
    assert evaluation["spurious"].sum() <= len(evaluation) / 3, accuracy_table(evaluation)
