"""``investigate es``: scan with composite aggregations, pull only the suspects' documents, explain them.

What a user relies on: the same incidents and root causes as the full path (``ingest es`` of the whole
range, then ``analyze incidents``) with fewer documents pulled; ``lines_in_range`` as the cluster counts
it; ``search.max_buckets`` absorbed; documents without parsed fields refused with the fallback named;
the ``--json`` contract. Runs against the in-process Elasticsearch test server (composite
``after_key`` paging, ``.keyword`` sub-fields of dynamically mapped strings, bucket limits).

Data: a simulated multi-incident window (:func:`meshlens.simulate.windows.incident_windows`, 4 h, Istio
JSON access logs, about 50k documents) shipped as Fluent Bit ``Merge_Log`` documents
(:mod:`tests.support.es_sim`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from meshlens.analysis.incidents import find_incidents
from meshlens.errors import ConfigError
from meshlens.investigate_es import investigate_es
from meshlens.simulate import simulate
from meshlens.simulate.windows import incident_windows, score_window
from meshlens.sources.elasticsearch import ingest_es
from meshlens.store import open_store
from tests.servers.elasticsearch import EsTestServer, generate
from tests.support.es_sim import ACCESS_INDEX, AUDIT_INDEX, load_simulation, simulation_docs


def _answers(items: list[dict]) -> list[tuple]:
    return sorted((i["symptom"], (i.get("root_cause") or {}).get("target"), (i.get("change") or {}).get("target"),
                   i["onset"][:16]) for i in items)


class Sim:
    def __init__(self, root: Path) -> None:
        self.scenario = incident_windows(2, duration_s=4 * 3600.0, entry_rate=0.5)[1]  # JSON, 3 incidents
        self.dir = root / "sim"
        self.truth = simulate(self.scenario, self.dir).to_dict()
        self.start = self.scenario.start
        self.end = (pd.Timestamp(self.start) + pd.Timedelta(seconds=self.scenario.duration_s)).isoformat()
        lo, hi = pd.Timestamp(self.start).value, pd.Timestamp(self.end).value
        self.access_in_range = sum(1 for idx, _, d in simulation_docs(self.dir)
                                   if idx == ACCESS_INDEX and lo <= pd.Timestamp(d["@timestamp"]).value < hi)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    return Sim(tmp_path_factory.mktemp("investigate_es"))


@pytest.fixture(scope="module")
def es(sim: Sim):
    with EsTestServer("es8") as srv:
        load_simulation(srv, sim.dir)
        yield srv


@pytest.fixture(scope="module")
def full_path(sim: Sim, es: EsTestServer, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What the full pull answers: every document ingested (access range + audit lookback), then analyze
    incidents over the range."""
    db = tmp_path_factory.mktemp("full") / "full.duckdb"
    ingest_es(db, index=ACCESS_INDEX, url=es.url, start=sim.start, end=sim.end, progress=False)
    ingest_es(db, index=AUDIT_INDEX, url=es.url, start=(pd.Timestamp(sim.start) - pd.Timedelta(hours=2)).isoformat(),
              end=sim.end, progress=False)
    with open_store(db, read_only=True) as st:
        return find_incidents(st, sim.start, sim.end).items


def test_investigate_es_answers_like_the_full_ingest_with_fewer_documents(
        sim: Sim, es: EsTestServer, full_path: list[dict], tmp_path: Path) -> None:
    res = investigate_es(tmp_path / "inv.duckdb", index=ACCESS_INDEX, audit_index=AUDIT_INDEX, url=es.url,
                         start=sim.start, end=sim.end, progress=False)
    assert res.incidents and _answers(res.incidents) == _answers(full_path)
    assert score_window(res.incidents, sim.truth)["found"] == len(sim.truth["incidents"])
    p = res.to_json()["pulled"]
    audit = len(es.all_docs(AUDIT_INDEX))
    assert p["lines_in_range"] == sim.access_in_range + audit  # the cluster's _count, access + audit range
    # three incidents and a noisy service in 4 h: most of this range is evidence
    assert 0 < p["lines_pulled"] < 0.9 * p["lines_in_range"]
    assert p["queries"] > 0
    with open_store(tmp_path / "inv.duckdb", read_only=True) as st:
        metrics = set(st.query("SELECT DISTINCT metric FROM series")["metric"])
        assert {"investigate_requests", "investigate_p50_ms", "investigate_p99_ms"} <= metrics
        # every access document of the whole buckets of the range is counted once in the request counts
        counted = st.scalar("SELECT sum(value) FROM series WHERE metric = 'investigate_requests'")
        assert 0.99 * sim.access_in_range <= counted <= sim.access_in_range
        assert st.scalar("SELECT count(*) FROM events") > 0
    # the scan asked only aggregations and counts of the access index; documents only for the pull
    comps = [r.body for r in es.requests if isinstance(r.body, dict) and "meshlens" in (r.body.get("aggs") or {})]
    assert comps and all(b["size"] == 0 for b in comps)


def test_one_service_pulls_only_its_episodes_and_the_json_contract(
        sim: Sim, es: EsTestServer, full_path: list[dict], tmp_path: Path) -> None:
    from meshlens.cli import app

    r = CliRunner().invoke(app, ["investigate", "es", "--url", es.url, "-i", ACCESS_INDEX, "--audit-index",
                                 AUDIT_INDEX, "--from", sim.start, "--to", sim.end, "--db",
                                 str(tmp_path / "cli.duckdb"), "--service", "metadata", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.splitlines()[0])
    assert set(out["pulled"]) == {"lines_pulled", "lines_in_range", "queries"}
    assert out["incidents"], out
    for it in out["incidents"]:  # the items of analyze incidents, only those involving the service
        assert {"rank", "onset", "end", "services", "symptom", "root_cause", "change", "summary"} <= set(it)
        assert "metadata" in it["services"]
    want = _answers([i for i in full_path if "metadata" in i["services"]])
    assert _answers(out["incidents"]) == want
    assert out["pulled"]["lines_pulled"] < 0.5 * out["pulled"]["lines_in_range"]


def test_bucket_limit_halves_the_composite_page(sim: Sim, es: EsTestServer, tmp_path: Path) -> None:
    """search.max_buckets below the page size: too_many_buckets_exception, then smaller pages, same scan."""
    es.engine.max_buckets = 700
    try:
        n = len(es.requests)
        res = investigate_es(tmp_path / "lim.duckdb", index=ACCESS_INDEX, url=es.url, start=sim.start,
                             end=sim.end, page_size=5000, progress=False)
        sizes = [r.body["aggs"]["meshlens"]["composite"]["size"] for r in es.requests[n:]
                 if isinstance(r.body, dict) and "meshlens" in (r.body.get("aggs") or {})]
    finally:
        es.engine.max_buckets = 65_536
    assert 5000 in sizes and max(s for s in sizes if s <= 700) == 625  # 5000 -> 2500 -> 1250 -> 625
    ref = investigate_es(tmp_path / "ref.duckdb", index=ACCESS_INDEX, url=es.url, start=sim.start, end=sim.end,
                         progress=False)
    assert res.suspects == ref.suspects and _answers(res.incidents) == _answers(ref.incidents)


def test_raw_lines_only_name_the_fallback(tmp_path: Path) -> None:
    """Filebeat documents with the raw line in ``message``: the scan needs parsed fields and says so."""
    with EsTestServer("es8") as srv:
        srv.create_index("filebeat-1", mappings={"@timestamp": {"type": "date"}})
        srv.add_docs("filebeat-1", generate(500, layout="filebeat", step_ms=1000))
        with pytest.raises(ConfigError) as err:
            investigate_es(tmp_path / "raw.duckdb", index="filebeat-1", url=srv.url, start=1_717_200_000,
                           end=1_717_200_000 + 3600, progress=False)
    msg = str(err.value)
    assert "raw access-log line in 'message'" in msg and "parsed fields" in msg and "ingest es" in msg


def test_investigating_again_resumes_and_stores_no_duplicate(sim: Sim, es: EsTestServer, tmp_path: Path) -> None:
    db = tmp_path / "again.duckdb"
    first = investigate_es(db, index=ACCESS_INDEX, audit_index=AUDIT_INDEX, url=es.url, start=sim.start,
                           end=sim.end, service="metadata", progress=False)
    with open_store(db, read_only=True) as st:
        n = st.scalar("SELECT count(*) FROM events")
        s = st.scalar("SELECT count(*) FROM series")
    again = investigate_es(db, index=ACCESS_INDEX, audit_index=AUDIT_INDEX, url=es.url, start=sim.start,
                           end=sim.end, service="metadata", progress=False)
    with open_store(db, read_only=True) as st:
        assert st.scalar("SELECT count(*) FROM events") == n
        assert st.scalar("SELECT count(*) FROM series") == s  # the scan upserts its buckets
    assert again.lines_pulled < first.lines_pulled  # the watermarks say the windows are done
    assert _answers(again.incidents) == _answers(first.incidents)


def test_an_empty_range_says_so(es: EsTestServer, tmp_path: Path) -> None:
    res = investigate_es(tmp_path / "empty.duckdb", index=ACCESS_INDEX, url=es.url, start="2020-01-01T00:00:00Z",
                         end="2020-01-01T04:00:00Z", progress=False)
    assert res.incidents == [] and res.lines_in_range == 0 and res.lines_pulled == 0
    assert "no documents" in res.warnings[0] and ACCESS_INDEX in res.warnings[0]
