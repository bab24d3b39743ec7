"""``meshlens analyze ...``: the --json contracts, readable output, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mesh import T0, cached_store, incident_mesh

CLI = [sys.executable, "-m", "meshlens.cli", "analyze"]
FROM, TO = "2024-05-01T08:00:00Z", str(T0 + 40 * 60)  # RFC 3339 and Unix seconds both work


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(d: Path) -> Path:
        mesh = incident_mesh()
        mesh.change(T0 + 25 * 60 - 45, "DestinationRule", "shop", "ratings", user="bob@example.com",
                    spec={"host": "ratings.shop.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "MUTUAL"}}},
                    group="networking.istio.io", resource="destinationrules")
        mesh.change(T0 + 20 * 60, "VirtualService", "shop", "ads", spec={"hosts": ["ads"]},
                    group="networking.istio.io", resource="virtualservices")
        return mesh.ingest(d)

    return cached_store(tmp_path_factory, "cli", build)


def test_root_cause_json(db: Path) -> None:
    r = run("root-cause", "--db", str(db), "--service", "frontend", "--from", FROM, "--to", TO, "--json")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    assert items[0]["rank"] == 1 and items[0]["kind"] == "service" and items[0]["target"] == "ratings"
    assert items[0]["namespace"] == "shop" and 0 < items[0]["score"] <= 1
    assert any(i["kind"] == "edge" and i["target"] == "reviews->ratings" for i in items)
    for i in items:
        assert {"rank", "kind", "target", "namespace", "score", "evidence"} <= set(i)
        assert all(isinstance(e, str) for e in i["evidence"])


def test_latest_relative_window_is_the_same_grammar_as_in_notebooks(db: Path) -> None:
    """``--from latest-40m --to latest`` means the last 40 minutes of the store's data (not of today)."""
    fixed = run("root-cause", "--db", str(db), "--service", "frontend", "--from", FROM, "--to", TO, "--json")
    rel = run("root-cause", "--db", str(db), "--service", "frontend", "--from", "latest-3h", "--to", "latest",
              "--json")
    assert rel.returncode == 0, rel.stderr
    assert json.loads(rel.stdout)[0]["target"] == json.loads(fixed.stdout)[0]["target"] == "ratings"
    bad = run("anomalies", "--db", str(db), "--from", "latest+x")
    assert bad.returncode == 2 and "--from: invalid time 'latest+x'" in bad.stderr


def test_changes_json(db: Path) -> None:
    r = run("changes", "--db", str(db), "--service", "frontend", "--from", FROM, "--to", TO, "--json")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    assert [i["target"] for i in items] == ["DestinationRule/shop/ratings", "VirtualService/shop/ads"]
    top, other = items
    assert top["actor"] == "bob@example.com" and top["score"] >= 0.5 and top["likely"]
    assert top["ts"].startswith("2024-05-01T08:24:15")
    assert other["score"] < 0.5
    for i in items:
        assert {"rank", "target", "actor", "ts", "score", "evidence"} <= set(i)


def test_anomalies_and_graph_json(db: Path) -> None:
    r = run("anomalies", "--db", str(db), "--json")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    assert any(i["metric"] == "errors_5xx" and i["target"] == "ratings" for i in items)
    g = run("graph", "--db", str(db), "--from", FROM, "--to", TO, "--json")
    assert g.returncode == 0, g.stderr
    edges = {(e["src"], e["dst"]): e for e in json.loads(g.stdout)}
    assert edges[("reviews", "ratings")]["requests"] == 40 * 30


def test_readable_output(db: Path) -> None:
    r = run("root-cause", "--db", str(db), "--service", "frontend", "--from", FROM, "--to", TO, "--top", "2")
    assert r.returncode == 0, r.stderr
    assert "frontend: errors from 2024-05-01T08:25:" in r.stdout
    assert "1. service ratings (shop)" in r.stdout and "- signature: 500 via_upstream" in r.stdout
    c = run("changes", "--db", str(db), "--service", "frontend", "--from", FROM, "--to", TO)
    assert "DestinationRule/shop/ratings  score" in c.stdout and "(LIKELY)" in c.stdout


@pytest.mark.parametrize("args,message", [
    (("root-cause", "--service", "frontend", "--from", "soon", "--to", TO), "--from: invalid time 'soon'"),
    (("root-cause", "--service", "frontend", "--to", TO), "--from is required"),
    (("root-cause", "--service", "nosuch", "--from", FROM, "--to", TO), "service 'nosuch' received no requests"),
    (("changes", "--service", "frontend", "--from", TO, "--to", FROM), "empty time range"),
    (("changes", "--service", "frontend", "--from", FROM, "--to", TO, "--lookback", "2 hours"), "invalid duration"),
    (("anomalies", "--bucket", "-5"), "--bucket must be a positive"),
])
def test_bad_input_is_one_line_and_nonzero(db: Path, args: tuple[str, ...], message: str) -> None:
    r = run(args[0], "--db", str(db), *args[1:])
    assert r.returncode == 2  # the command line is wrong (meshlens.cli.common.EXIT_USAGE)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_store(tmp_path: Path) -> None:
    r = run("anomalies", "--db", str(tmp_path / "none.duckdb"))
    assert r.returncode == 2 and "store does not exist" in r.stderr
