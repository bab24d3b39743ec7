"""Reports: papermill execution of the shipped notebooks, the offline HTML, parameters, secrets, the CLI.

Every notebook in notebooks/ is executed (failing on any error cell): mesh_audit and explore on a store
with planted findings (their content is checked), and every notebook with its defaults on the bundled
samples once data/samples exists.
"""

from __future__ import annotations

import base64
import html
import json
import re
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from typer import Typer
from typer.testing import CliRunner

from meshlens import notebook as nbhelp
from meshlens import reports, viz
from meshlens.cli.reports import register
from meshlens.errors import ConfigError, MeshlensError
from meshlens.store import writing
from tests import conftest
from tests.support.audit_store import DENY_POLICY, LEGACY, audit_rows, build_audit_store, events_table
from tests.support.notebooks import make_notebook

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb"))
SHARED_SAMPLES = (conftest.SHARED_SAMPLES,)
SECRET = "s3cr3t-Loki-pw-9f2Q"  # what the secret tests plant in the environment


def error_outputs(ipynb: str | Path) -> list[str]:
    nb = nbformat.read(ipynb, as_version=4)
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def all_text(directory: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_audit_store(tmp_path_factory.mktemp("store") / "audit.duckdb")


@pytest.fixture(scope="module")
def audit_report(audit_db: Path, tmp_path_factory: pytest.TempPathFactory) -> reports.ReportResult:
    return reports.run_report("mesh_audit", audit_db, {"max_rows": "40"}, tmp_path_factory.mktemp("out"))


# -- the shipped notebooks -------------------------------------------------------------------------


def test_shipped_notebooks_are_committed_cleared_with_the_parameters_contract() -> None:
    assert {"mesh_audit", "explore"} <= set(SHIPPED)
    for name in SHIPPED:
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
        assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell is not `parameters`"
        params = reports.notebook_parameters(REPO / "notebooks" / f"{name}.ipynb")
        assert {"db", "start", "end"} <= set(params), name
        assert all("=" not in p["help"] for p in params.values()), f"{name}: '=' in a parameter comment"


def test_mesh_audit_report_on_planted_store(audit_report: reports.ReportResult) -> None:
    r = audit_report
    assert r.status == "ok", r.error
    assert error_outputs(r.ipynb) == []
    html_text = Path(r.html).read_text()
    for finding in (DENY_POLICY, LEGACY, "deny-legacy", "alice@example.com", "CERTIFICATE_VERIFY_FAILED",
                    "/admin/users", "bookinfo/details"):
        assert finding in html_text, finding
    assert r.parameters["max_rows"] == 40  # "40" from the command line became the default's type
    run = json.loads((Path(r.run_dir) / "run.json").read_text())
    assert run["status"] == "ok" and run["html"] == r.html
    assert Path(r.run_dir).parent.name == "mesh_audit" and reports.RUN_DIR_RE.match(Path(r.run_dir).name)


def test_report_html_is_offline_self_contained_and_hides_code(audit_report: reports.ReportResult) -> None:
    html_text = Path(audit_report.html).read_text()
    external = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//[^"'\s>]+""", html_text)
    assert external == []
    assert "cdn." not in html_text.lower() and "require.min.js" not in html_text
    assert html_text.count("window.vegaEmbed=") == 1  # the bundle, inlined once
    charts = re.findall(r'<div class="meshlens-chart"[^>]*data-rendered="static"', html_text)
    assert len(charts) >= 4
    assert html_text.count('class="meshlens-chart-spec"') == len(charts)
    assert "audit.denied_requests(" not in html_text  # code hidden by default
    assert 'data-status="ok"' in html_text


def test_explore_notebook_runs_with_widgets_and_sql(audit_db: Path, tmp_path: Path) -> None:
    r = reports.run_report("explore", audit_db, {"event_type": "authz", "limit": "5"}, tmp_path, hide_code=False)
    assert r.status == "ok", r.error
    assert error_outputs(r.ipynb) == []
    nb = nbformat.read(r.ipynb, as_version=4)
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "application/vnd.jupyter.widget-view+json" in outputs  # the explorer was displayed
    assert "config_change" in outputs  # the %%sql cell's result table
    html_text = Path(r.html).read_text()
    assert "jp-InputArea-editor" in html_text and "setup_sql" in html_text  # --show-code
    assert "Interactive controls: open this notebook in" in html_text


@pytest.mark.parametrize("name", SHIPPED)
def test_every_notebook_runs_with_defaults_on_bundled_samples(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if nbhelp.samples_dir() is None:
        pytest.skip("data/samples/ is empty (the sample dataset has not been generated yet)")
    monkeypatch.delenv(nbhelp.DB_ENV, raising=False)
    monkeypatch.setenv(nbhelp.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "samples-cache"))
    r = reports.run_report(name, None, {}, tmp_path, timeout_s=300)  # a hung cell fails instead of hanging
    assert r.status == "ok", r.error
    assert error_outputs(r.ipynb) == []


# -- failures ----------------------------------------------------------------------------------


def test_failing_notebook_still_writes_html_with_the_error_cell(tmp_path: Path) -> None:
    nbp = make_notebook(tmp_path / "nb" / "boom.ipynb", 'db = ""\n', "print('before')",
                        "raise ValueError('boom-marker-123')", "print('never')")
    r = reports.run_report(nbp, tmp_path / "x.duckdb", {}, tmp_path / "out")
    assert r.status == "failed" and not r.ok
    assert "ValueError" in r.error and "boom-marker-123" in r.error
    html_text = Path(r.html).read_text()
    assert "boom-marker-123" in html_text and 'data-status="failed"' in html_text
    assert "An Exception was encountered" in html_text  # papermill's banner linking the error cell
    assert error_outputs(r.ipynb) == ["ValueError: boom-marker-123"]
    index = (tmp_path / "out" / "index.html").read_text()
    assert "boom" in index and 'class="failed"' in index


# -- parameters ----------------------------------------------------------------------------------


def test_parameters_are_validated_coerced_and_times_resolved(tmp_path: Path) -> None:
    nbp = make_notebook(tmp_path / "p.ipynb",
                        'db = ""\nstart = ""\nend = ""\nbaseline_start = ""\nlimit = 10\nratio = 0.5\nflag = False\n')
    now = datetime(2024, 5, 2, 10, 0, tzinfo=UTC)
    got = reports.resolve_parameters(nbp, tmp_path / "s.duckdb", {
        "start": "-24h", "end": "now", "baseline_start": "latest-2h", "limit": "7", "ratio": "0.25",
        "flag": "yes"}, now=now)
    assert got["start"] == "2024-05-01T10:00:00Z" and got["end"] == "2024-05-02T10:00:00Z"
    assert got["baseline_start"] == "latest-2h"  # resolved by the notebook against the store
    assert (got["limit"], got["ratio"], got["flag"]) == (7, 0.25, True)
    assert got["db"] == str((tmp_path / "s.duckdb").resolve())
    assert reports.resolve_parameters(nbp, None, {"start": "2024-01-01T00:00:00Z"})["start"] == "2024-01-01T00:00:00Z"
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['servce'\]"):
        reports.resolve_parameters(nbp, None, {"servce": "x"})
    with pytest.raises(ConfigError, match="'limit': 'ten' is not a valid int"):
        reports.resolve_parameters(nbp, None, {"limit": "ten"})
    with pytest.raises(ConfigError, match="'start': invalid time"):
        reports.resolve_parameters(nbp, None, {"start": "yesterday"})
    for bad in ("password", "loki_token", "api_key", "ES_APIKEY", "client_secret", "credentials"):
        with pytest.raises(ConfigError, match="looks like a credential"):
            reports.resolve_parameters(nbp, None, {bad: "x"})
    no_db = make_notebook(tmp_path / "nodb.ipynb", 'start = ""\n')
    with pytest.raises(ConfigError, match="no `db` parameter"):
        reports.resolve_parameters(no_db, None, {})


def test_notebook_lookup_order_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert reports.find_notebook("mesh_audit") == REPO / "notebooks" / "mesh_audit.ipynb"
    mine = make_notebook(tmp_path / "mine" / "mesh_audit.ipynb", 'db = ""\n')
    monkeypatch.setenv(reports.NOTEBOOKS_ENV, str(tmp_path / "mine"))
    assert reports.find_notebook("mesh_audit") == mine  # $MESHLENS_NOTEBOOKS comes first
    assert reports.find_notebook(str(mine)) == mine.resolve()
    assert "explore" in reports.list_notebooks()
    with pytest.raises(ConfigError, match="no report notebook named 'nope'; known: .*explore"):
        reports.find_notebook("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        reports.find_notebook(str(tmp_path / "missing.ipynb"))


# -- secrets ---------------------------------------------------------------------------------------


def test_secret_variants_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKI_USERNAME", "svc-meshlens")
    monkeypatch.setenv("LOKI_PASSWORD", 'p"w<&>/?=é')
    monkeypatch.setenv("MESHLENS_SECRET_ENV", "MY_VAULT_THING")
    monkeypatch.setenv("MY_VAULT_THING", "vault-value-1234")
    monkeypatch.setenv("FOO_API_KEY", "pattern-found-key-5678")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a credential name
    monkeypatch.setenv("BAR_TOKEN", "true")  # credential-like name, but no secret value
    secrets = reports.secret_values()
    assert {"LOKI_PASSWORD", "MY_VAULT_THING", "FOO_API_KEY"} <= set(secrets)
    assert not any(k.startswith(("TOKENIZERS", "BAR_TOKEN")) for k in secrets)
    pw = 'p"w<&>/?=é'
    for text in (pw, json.dumps(pw), html.escape(pw), urllib.parse.quote(pw, safe=""),
                 "Authorization: Basic " + base64.b64encode(f"svc-meshlens:{pw}".encode()).decode()):
        assert any(k.startswith("LOKI_PASSWORD") for k in reports.find_secrets(text, secrets)), text
    assert reports.find_secrets("nothing to see", secrets) == []


def test_token_file_content_is_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("bearer-from-file-abcdef\n")
    monkeypatch.setenv("LOKI_BEARER_TOKEN_FILE", str(tmp_path / "token"))
    assert reports.secret_values()["LOKI_BEARER_TOKEN_FILE (file content)"] == "bearer-from-file-abcdef"


def test_notebook_printing_a_secret_is_refused_and_kernel_env_is_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOKI_PASSWORD", SECRET)
    nbp = make_notebook(
        tmp_path / "leak.ipynb", 'db = ""\n',
        "import os\nprint('kernel sees:', os.environ.get('LOKI_PASSWORD'))",
        "print('s3cr3t-Loki' + '-pw-9f2Q')  # a leak through data, not through the environment",
    )
    r = reports.run_report(nbp, tmp_path / "s.duckdb", {}, tmp_path / "out")
    assert r.status == "refused"
    assert "LOKI_PASSWORD in cell 4 (In [4])" in r.error and SECRET not in r.error
    assert r.html is None and r.ipynb is None
    files = sorted(p.name for p in Path(r.run_dir).iterdir())
    assert files == ["run.json"]
    assert SECRET not in all_text(tmp_path / "out")
    assert "refused" in (tmp_path / "out" / "index.html").read_text()

    quiet = make_notebook(tmp_path / "env.ipynb", 'db = ""\n',
                          "import os\nprint('kernel sees:', os.environ.get('LOKI_PASSWORD'))")
    ok = reports.run_report(quiet, tmp_path / "s.duckdb", {}, tmp_path / "out")
    assert ok.status == "ok"
    assert "kernel sees: None" in Path(ok.ipynb).read_text()


def test_secret_logged_in_the_data_refuses_the_audit_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = "es-api-key-Zm9vYmFyYmF6cXV4"
    rows = audit_rows()
    rows.append({**rows[0], "event_id": "leaky", "request_id": "leak-1", "path": f"/admin/export?api_key={token}",
                 "raw": "leaky"})
    db = tmp_path / "leaky.duckdb"
    with writing(db) as store:
        store.insert_batch(events_table(rows))
    monkeypatch.setenv("ES_API_KEY", token)
    r = reports.run_report("mesh_audit", db, {}, tmp_path / "out")
    assert r.status == "refused" and "ES_API_KEY" in r.error
    assert token not in all_text(tmp_path / "out")


def test_reports_with_secrets_in_the_environment_never_contain_them(
    audit_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOKI_PASSWORD", SECRET)
    monkeypatch.setenv("LOKI_BEARER_TOKEN", "tok-" + SECRET[::-1])
    r = reports.run_report("mesh_audit", audit_db, {"namespace": "bookinfo"}, tmp_path)
    assert r.status == "ok", r.error
    text = all_text(tmp_path)
    assert SECRET not in text and SECRET[::-1] not in text
    with pytest.raises(ConfigError, match="holds the value of the secret \\$LOKI_PASSWORD"):
        reports.run_report("mesh_audit", audit_db, {"namespace": SECRET}, tmp_path)


# -- CLI -------------------------------------------------------------------------------------------


def _cli() -> Typer:
    app = Typer()

    @app.callback()
    def main() -> None:
        """meshlens (test harness)"""

    register(app)
    return app


def test_cli_report_run_list_and_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    app = _cli()
    ok_nb = make_notebook(tmp_path / "hello.ipynb", 'db = ""\nwho = "world"\n', "print('hello', who)")
    res = runner.invoke(app, ["report", "run", str(ok_nb), "--db", str(tmp_path / "s.duckdb"), "--out",
                              str(tmp_path / "out"), "-p", "who", "mesh", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["status"] == "ok" and data["parameters"]["who"] == "mesh"
    assert "hello mesh" in Path(data["ipynb"]).read_text()

    boom = make_notebook(tmp_path / "boom.ipynb", 'db = ""\n', "1/0")
    res = runner.invoke(app, ["report", "run", str(boom), "--db", "x", "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "failed" in res.output

    res = runner.invoke(app, ["report", "run", "mesh_audit", "--db", "x", "--out", str(tmp_path / "o2"),
                              "-p", "servce", "reviews"])
    assert res.exit_code == 2 and "unknown parameter" in res.output
    assert not (tmp_path / "o2").exists()  # nothing ran, nothing written
    res = runner.invoke(app, ["report", "run", "mesh_audit", "--db", "x", "--out", "o", "-p", "start"])
    assert res.exit_code == 2 and "needs a KEY and a VALUE" in res.output

    res = runner.invoke(app, ["report", "list", "--json"])
    assert res.exit_code == 0
    listed = {r["name"]: r for r in json.loads(res.stdout)}
    assert listed["mesh_audit"]["parameters"]["max_rows"]["default"] == 25


def test_cli_lab_without_jupyterlab_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jupyterlab" else real(name, *a))
    res = CliRunner().invoke(_cli(), ["lab"])
    assert res.exit_code == 2 and "pip install 'meshlens[lab]'" in res.output


# -- notebook helpers --------------------------------------------------------------------------------


def test_default_store_is_the_bundled_samples_ingested_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = next((d for d in SHARED_SAMPLES if d.is_dir()), None)
    if shared is None:
        pytest.skip("the shared sample logs (../shared/samples) are not on this machine")
    samples = tmp_path / "samples"
    samples.mkdir()
    for f in ("istio/istio_io_access_log_task.log", "linkerd/linkerd_docs_2.12_access_log_json.jsonl"):
        (samples / Path(f).name).write_bytes((shared / f).read_bytes())
    monkeypatch.setattr(nbhelp, "samples_dir", lambda: samples)
    monkeypatch.setenv(nbhelp.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(nbhelp.DB_ENV, raising=False)
    first = nbhelp.resolve_db("")
    built = first.stat().st_mtime_ns
    assert nbhelp.resolve_db("") == first and first.stat().st_mtime_ns == built  # cached, not rebuilt
    with nbhelp.open_store("") as store:
        assert store.read_only and store.scalar("SELECT count(*) FROM events") > 0
    monkeypatch.setenv(nbhelp.DB_ENV, str(tmp_path / "elsewhere.duckdb"))
    assert nbhelp.resolve_db("") == tmp_path / "elsewhere.duckdb"  # $MESHLENS_DB wins over the samples
    assert nbhelp.resolve_db(str(tmp_path / "x.duckdb")) == tmp_path / "x.duckdb"  # explicit db wins over all


def test_time_range_parameters(audit_db: Path) -> None:
    with nbhelp.open_store(audit_db) as store:
        w = nbhelp.time_range("latest-30m", "latest", store=store)
        newest = store.scalar("SELECT max(ts_ns) FROM events")
        assert w.end.value == newest + 1  # "latest" as an end bound includes the newest event
        assert w.end.value - w.start.value == 30 * 60 * 10**9
        assert nbhelp.time_range("", "") == nbhelp.TimeRange(None, None)
        assert nbhelp.time_range("-1h", "now", now_ns=3_600 * 10**9).start.value == 0
        assert "the first event" in nbhelp.time_range().describe()
        with pytest.raises(ConfigError, match="empty time range"):
            nbhelp.time_range("2024-05-02T00:00:00Z", "2024-05-01T00:00:00Z")


def test_inlined_chart_library_is_not_mistaken_for_a_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = nbhelp.vega_embed_bundle()
    piece = next(bundle[i:i + 12] for i in range(5000, len(bundle), 997)
                 if re.fullmatch(r"[A-Za-z0-9]{12}", bundle[i:i + 12]))  # looks like a password, lives in the JS
    monkeypatch.setenv("LOKI_PASSWORD", piece)
    nbp = make_notebook(tmp_path / "plain.ipynb", 'db = ""\n', "print('nothing secret here')")
    r = reports.run_report(nbp, tmp_path / "s.duckdb", {}, tmp_path / "out")
    assert r.status == "ok", r.error
    assert piece in Path(r.html).read_text()  # present, but only inside the constant library code


# -- charts ----------------------------------------------------------------------------------------


def test_layered_layout_places_callers_left_and_survives_cycles() -> None:
    edges = pd.DataFrame({"src": ["gw", "gw", "front", "front", "api", "db"],
                          "dst": ["front", "api", "api", "cache", "db", "api"]})  # api <-> db is a cycle
    pos = viz.layered_layout(edges).set_index("node")
    assert pos.loc["gw", "layer"] == 0 and pos.loc["front", "layer"] == 1
    assert pos.loc["api", "layer"] == 2 and pos.loc["db", "layer"] == 3
    assert pos.loc["cache", "layer"] == 2
    assert sorted(pos.index) == ["api", "cache", "db", "front", "gw"]


def test_charts_mark_onset_changes_and_the_highlighted_path() -> None:
    ts = pd.date_range("2024-05-01T10:00:00Z", periods=6, freq="10min")
    series = pd.DataFrame({"ts": ts, "value": [1, 1, 1, 9, 9, 9]})
    changes = pd.DataFrame({"ts": [ts[2]], "label": ["AuthorizationPolicy/shop/deny-all"], "actor": ["alice"]})
    chart = viz.time_series(series, onset=ts[3], changes=changes, title="errors")
    spec = chart.to_dict()
    rules = [layer for layer in spec["layer"] if layer["mark"]["type"] == "rule"]
    assert len(rules) == 2 and rules[0]["mark"]["color"] == viz.ONSET_COLOR
    assert any(t.get("field") == "label" for t in rules[1]["encoding"]["tooltip"])

    edges = pd.DataFrame({"src": ["gw", "front", "front"], "dst": ["front", "api", "cache"],
                          "requests": [100, 80, 20], "error_ratio": [0.3, 0.35, 0.0]})
    graph = viz.service_graph(edges, highlight=["gw", "front", "api"])
    data = {name: values for name, values in graph.to_dict()["datasets"].items()}
    flags = {(r["edge"], r["highlighted"]) for rows in data.values() for r in rows if "edge" in r}
    assert flags == {("gw -> front", True), ("front -> api", True), ("front -> cache", False)}
    html_text = nbhelp.chart_html(graph.to_dict())  # draws offline with vl-convert
    assert "<svg" in html_text and 'class="meshlens-chart-spec"' in html_text
    with pytest.raises(ValueError, match="mark must be one of"):
        viz.time_series(series, mark="pie")


# -- answers first: findings, effective parameters, empty windows, failures ----------------------------


def test_report_records_findings_and_effective_parameters(audit_report: reports.ReportResult) -> None:
    r = audit_report
    assert any("denied by an authorization policy" in f for f in r.findings), r.findings
    run = json.loads((Path(r.run_dir) / "run.json").read_text())
    assert run["findings"] == r.findings and run["status"] == "ok"
    assert run["effective"]["events"] > 0 and run["effective"]["start"] == "(first event)"
    html_text = Path(r.html).read_text()
    banner = html_text[html_text.index('class="meshlens-banner'):]
    assert banner.index("meshlens-findings") < banner.index("</header>")  # the answer is in the banner
    assert "Effective parameters" in html_text
    index = (Path(r.run_dir).parent.parent / "index.html").read_text()
    assert html.escape(r.findings[0]) in index  # the index shows the headline lines


def test_latest_window_is_shown_resolved(audit_db: Path, tmp_path: Path) -> None:
    r = reports.run_report("mesh_audit", audit_db, {"start": "latest-30m"}, tmp_path)
    assert r.status == "ok", r.error
    with nbhelp.open_store(audit_db) as store:
        newest = store.scalar("SELECT max(ts_ns) FROM events")
    from meshlens.timeutil import ns_to_rfc3339
    assert r.effective["start"] == ns_to_rfc3339(newest + 1 - 30 * 60 * 10**9)
    assert r.parameters["start"] == "latest-30m"  # what was asked stays recorded too
    assert f"latest-30m = {r.effective['start']}" in html.unescape(Path(r.html).read_text())


@pytest.mark.parametrize("params", [{"start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z"},
                                    {"service": "no-such-service"}])
def test_window_or_scope_without_events_is_empty_not_a_green_page_of_zeros(
    audit_db: Path, tmp_path: Path, params: dict[str, str],
) -> None:
    r = reports.run_report("mesh_audit", audit_db, params, tmp_path)
    assert r.status == "empty" and r.ok and r.error is None
    reason = r.findings[0]
    assert reason.startswith("no events in") and "the store holds" in reason
    assert "2024-05-01T" in reason  # which range the store does hold
    if "service" in params:
        assert "service 'no-such-service'" in reason
    html_text = Path(r.html).read_text()
    assert 'data-status="empty"' in html_text and "Nothing to report" in html_text
    assert "An Exception was encountered" not in html_text and "Traceback" not in html_text
    assert "Audit checks" not in html_text  # no table of zeros after the stop
    assert 'class="empty' in (tmp_path / "index.html").read_text()
    res = CliRunner().invoke(_cli(), ["report", "run", "mesh_audit", "--db", str(audit_db), "--out", str(tmp_path),
                                      *sum((["-p", k, v] for k, v in params.items()), []), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["status"] == "empty"


def test_failed_report_shows_the_cause_first_and_folds_the_traceback(tmp_path: Path) -> None:
    nbp = make_notebook(tmp_path / "nb" / "deep.ipynb", 'db = ""\n',
                        "def inner():\n    raise KeyError('missing-column-xyz')\n\ndef outer():\n    inner()\n\nouter()")
    r = reports.run_report(nbp, tmp_path / "x.duckdb", {}, tmp_path / "out")
    assert r.status == "failed" and r.error.startswith("KeyError: 'missing-column-xyz'")
    dom = Path(r.html).read_text()
    banner = dom[dom.index('class="meshlens-banner'):dom.index("</header>")]
    assert "meshlens-error-line" in banner and "missing-column-xyz" in banner
    cause, folded = dom.index('class="meshlens-error-cause"'), dom.index("<details><summary>traceback</summary>")
    assert cause < folded and "inner()" in dom[folded:]  # the traceback is there, folded under the cause
    assert error_outputs(r.ipynb) == ["KeyError: 'missing-column-xyz'"]  # the notebook keeps the real error


def test_a_cell_that_hits_the_timeout_fails_the_report(tmp_path: Path) -> None:
    nbp = make_notebook(tmp_path / "slow.ipynb", 'db = ""\n', "import time\ntime.sleep(30)")
    r = reports.run_report(nbp, tmp_path / "x.duckdb", {}, tmp_path / "out", timeout_s=2)
    assert r.status == "failed" and "timed out" in r.error.lower(), r.error
    # A reply that only arrives at the deadline (the explore bug) is a timeout too, not a success.
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    nb.cells[0].metadata["papermill"] = {"duration": 600.02}
    nb.cells[0].execution_count = 3
    assert "cell 1 (In [3]) ran into the 600 s cell timeout" in reports.digest(nb, 600).timed_out
    assert reports.digest(nb, None).timed_out is None


def test_shell_sends_cannot_swallow_the_wakeup_for_a_reply(tmp_path: Path) -> None:
    """The explore report's "600 s and still ok": a blocking send on the shell socket (jupyter_client's
    Session.send uses a shadow socket) processes the socket's pending commands and resets its
    edge-triggered FD, so the asyncio poll for a reply that has just arrived sleeps until its timeout.
    ReportShellChannel sends through the asyncio socket, which re-checks events after the send."""
    import asyncio
    import time as _time

    import zmq
    import zmq.asyncio
    from jupyter_client.session import Session

    async def wait_after_send() -> float:
        ctx = zmq.asyncio.Context()
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        try:
            port = router.bind_to_random_port("tcp://127.0.0.1")
            dealer.connect(f"tcp://127.0.0.1:{port}")
            session = Session()
            channel = reports.ReportShellChannel(dealer, session)
            channel.send(session.msg("execute_request", {}))
            ident, *_ = await router.recv_multipart()
            poll = asyncio.ensure_future(dealer.poll(5000))  # nbclient waiting for the execute_reply
            await asyncio.sleep(0.1)
            await router.send_multipart([ident, b"reply"])
            _time.sleep(0.3)  # the reply lands while the loop is busy (processing a widget output) ...
            channel.send(session.msg("comm_msg", {}))  # ... which nbclient syncs back on the shell channel
            t0 = _time.monotonic()
            assert await poll
            return _time.monotonic() - t0
        finally:
            ctx.destroy(linger=0)

    loop = asyncio.new_event_loop()  # not asyncio.run: it would leave the main thread without an event loop
    try:
        assert loop.run_until_complete(wait_after_send()) < 1.0
    finally:
        loop.close()
    # Outside a running loop (papermill's synchronous kernel_info()) the channel needs no event loop.
    ctx = zmq.asyncio.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect("tcp://127.0.0.1:9")  # nobody there: the message just queues
        reports.ReportShellChannel(sock, Session()).send(Session().msg("kernel_info_request", {}))
    finally:
        ctx.destroy(linger=0)  # closes every socket, shadows included, then terminates


def test_report_kernels_use_the_fixed_shell_channel() -> None:
    km = reports._kernel_manager_for((), None)()
    assert isinstance(km.client(), reports.ReportKernelClient)
    assert km.client().shell_channel_class is reports.ReportShellChannel


# -- tables and charts -------------------------------------------------------------------------------


def test_tables_have_no_raw_missing_values_and_scroll_instead_of_clipping() -> None:
    df = pd.DataFrame({"policy": ["p", None], "meshes": [["istio", None], ["kubernetes"]],
                       "n": pd.array([1, None], dtype="Int64"), "ts": [pd.Timestamp("2024-05-01T10:00:00Z"), pd.NaT],
                       "evidence": ["x " * 100, pd.NA]})
    text = nbhelp.table_html(df)
    for raw in ("None", "&lt;NA&gt;", "<NA>", "NaT", "nan"):
        assert raw not in text, raw
    assert "istio" in text and "2024-05-01 10:00:00 UTC" in text
    assert 'class="meshlens-table-wrap" style="overflow-x:auto' in text
    assert "text-align:left" in text and "white-space:normal" in text and "table-layout:auto" in text


def test_bars_never_stack_two_changes_into_one_score() -> None:
    ts = pd.to_datetime(["2024-05-01T09:19:43Z", "2024-05-01T09:25:00Z", "2024-05-01T09:30:00Z"], utc=True)
    table = pd.DataFrame({"target": ["AuthorizationPolicy/shop/deny", "AuthorizationPolicy/shop/deny", "Deployment/shop/x"],
                          "score": [0.9, 0.7, 0.2], "ts": ts, "actor": ["alice", "bob", "ci"]})
    spec = viz.bar_chart(table, label="target", value="score", max_value=1.0, tooltip=["actor", "ts"]).to_dict()
    rows = next(iter(spec["datasets"].values()))
    labels = [r["target"] for r in rows]
    assert len(set(labels)) == 3 and all(r["score"] <= 1 for r in rows)
    assert spec["encoding"]["x"]["scale"]["domain"] == [0, 1.0] and spec["encoding"]["x"]["stack"] is None
    tips = spec["encoding"]["tooltip"]
    assert any(t.get("field") == "ts" and t.get("timeUnit") == "utcyearmonthdatehoursminutesseconds"
               and "%H:%M:%S" in t.get("format", "")
               for t in tips)


def test_time_series_axes_legends_and_colours() -> None:
    ts = pd.date_range("2024-05-01T23:40:00Z", periods=8, freq="5min")
    df = pd.DataFrame({"ts": list(ts) * 2, "events": [1] * 16, "event_type": ["authz"] * 8 + ["request"] * 8})
    changes = pd.DataFrame({"ts": [ts[2]], "label": ["AuthorizationPolicy/shop/deny-all"], "actor": ["alice"]})
    spec = viz.time_series(df, y="events", color="event_type", mark="bar", onset=ts[3], changes=changes,
                           y_title="events").to_dict()
    main, markers = spec["layer"]
    assert main["encoding"]["y"]["axis"]["title"] == "events per 5 min"  # the bucket width is on the axis
    assert "utcFormat" in main["encoding"]["x"]["axis"]["labelExpr"]  # one UTC format, date on day change
    color = main["encoding"]["color"]["scale"]
    assert dict(zip(color["domain"], color["range"], strict=True)) == {
        "request": viz.EVENT_TYPE_COLORS["request"], "authz": viz.EVENT_TYPE_COLORS["authz"]}
    marker_scales = [layer["encoding"]["color"]["scale"] for layer in markers["layer"]]
    assert all(s["domain"] == ["onset", "config change"] for s in marker_scales)  # markers are in a legend
    assert marker_scales[0]["range"] == [viz.ONSET_COLOR, viz.CHANGE_COLOR]
    assert spec["resolve"]["scale"]["color"] == "independent"
    ratio = viz.time_series(pd.DataFrame({"ts": ts, "value": [0.1] * 8}), percent=True, y_title="5xx ratio").to_dict()
    axis = ratio["layer"][0]["encoding"]["y"]["axis"]
    assert axis["format"] == ".0%" and axis["title"] == "5xx ratio (%, 5 min buckets)"
    svg = nbhelp.chart_svg(spec)
    assert "2024-05-01" in svg and "2024-05-02" in svg and "config change" in svg  # the day change is labelled
    graph = viz.service_graph(pd.DataFrame({"src": ["a"], "dst": ["b"], "requests": [1], "error_ratio": [0.5]}),
                              highlight=["a", "b"]).to_dict()
    assert {layer["encoding"]["color"]["title"] for layer in graph["layer"][:2]} == {"calls", "services"}


def test_charts_are_interactive_in_jupyterlab_too() -> None:
    nbhelp.configure_altair()
    spec = viz.time_series(pd.DataFrame({"ts": pd.date_range("2024-05-01", periods=3, freq="h", tz="UTC"),
                                         "value": [1, 2, 3]})).to_dict()
    bundle = nbhelp._meshlens_renderer(spec)
    vega = bundle[nbhelp.VEGA_MIME]
    assert vega["$schema"].endswith("/vega/v5.json") and any("tooltip" in json.dumps(m) for m in vega["marks"])
    assert bundle[nbhelp.SVG_MIME].startswith("<svg") and bundle[nbhelp.vegalite_mime()] == spec
    converted = nbhelp.chart_bundle_to_html(bundle)
    assert 'class="meshlens-chart-spec"' in converted["text/html"]
    import importlib.util

    if importlib.util.find_spec("jupyterlab") is not None:  # JupyterLab's own Vega renderer takes that mimetype
        import sys as _sys

        static = Path(_sys.prefix) / "share" / "jupyter" / "lab" / "static"
        assert any(nbhelp.VEGA_MIME in p.read_text(errors="ignore") for p in static.glob("*.js")), static


# -- JupyterLab, CLI messages ---------------------------------------------------------------------------


def test_lab_opens_a_working_copy_never_the_tracked_notebooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshlens.cli import reports as cli_reports

    monkeypatch.chdir(tmp_path)
    directory, copied, kept = cli_reports.lab_dir()
    assert directory == tmp_path / "meshlens-notebooks" and set(copied) == set(SHIPPED) and kept == []
    mine = directory / "mesh_audit.ipynb"
    mine.write_text(mine.read_text().replace("Mesh audit", "My audit"))
    _, _, kept = cli_reports.lab_dir()
    assert "mesh_audit" in kept and "My audit" in mine.read_text()  # the analyst's copy is kept
    cli_reports.lab_dir(refresh=True)
    assert "My audit" not in mine.read_text()
    for tracked in (REPO / "notebooks", REPO / "meshlens" / "notebooks"):
        with pytest.raises(MeshlensError, match="autosave"):
            cli_reports.lab_dir(tracked)
    if "triage" in SHIPPED:
        assert copied[0] == "triage"  # the landing page first
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert ".ipynb_checkpoints/" in ignored and "/meshlens-notebooks/" in ignored
    assert (REPO / "meshlens" / "notebooks").resolve() == (REPO / "notebooks").resolve()  # one source


def test_cli_messages_match_behaviour(tmp_path: Path) -> None:
    from meshlens.cli import app

    runner = CliRunner()
    for args in (["summary", "--help"], ["report", "run", "--help"], ["analyze", "root-cause", "--help"]):
        res = runner.invoke(app, args, env={"COLUMNS": "200", "TERM": "dumb"})
        assert res.exit_code == 0 and "<bool>" not in res.output, res.output
    assert "created if missing" not in runner.invoke(app, ["summary", "--help"], env={"COLUMNS": "200"}).output
    assert "Window start (required)" in runner.invoke(app, ["analyze", "changes", "--help"],
                                                      env={"COLUMNS": "200"}).output
    notdb = tmp_path / "access.log"
    notdb.write_text('[2024-05-01T10:00:00.000Z] "GET / HTTP/1.1" 200\n' * 50)
    res = runner.invoke(app, ["summary", "--db", str(notdb)])
    assert res.exit_code == 1
    assert "is not a DuckDB file" in str(res.exception or res.output) or "is not a DuckDB file" in res.output
    assert "Another process" not in str(res.exception) + res.output
    junk = tmp_path / "junk.log"
    junk.write_text("not a log line\n" * 3)
    res = runner.invoke(app, ["ingest", "file", str(junk), "--db", str(tmp_path / "j.duckdb"), "--no-progress"])
    assert res.exit_code == 0 and "0 events were stored" in res.output


def test_sql_write_on_the_read_only_store_says_read_only_in_one_line(audit_db: Path, tmp_path: Path) -> None:
    nbp = make_notebook(tmp_path / "sqldel.ipynb", 'db = ""\n',
                        "from meshlens import notebook as nb\nnb.setup_sql(nb.open_store(db));",
                        "%sql DELETE FROM events")
    r = reports.run_report(nbp, audit_db, {}, tmp_path / "out")
    assert r.status == "failed"
    err = [o for o in nbformat.read(r.ipynb, as_version=4).cells[-1].outputs if o.output_type == "error"][0]
    assert len(err.traceback) == 1 and "read-only" in err.traceback[0] and "DELETE" in err.traceback[0]
    with nbhelp.open_store(audit_db) as store:
        assert store.scalar("SELECT count(*) FROM events") > 0
    assert nbhelp.read_only_message("SELECT 1", ValueError("x")) is None
