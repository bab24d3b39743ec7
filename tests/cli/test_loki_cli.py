"""``meshlens ingest loki`` / ``meshlens aggregate loki`` via the register() hook: counts, --json, and
one-line errors with the right exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from meshlens.cli.loki import register
from meshlens.store import open_store
from tests.servers.loki import NS, LokiServer, generate

T0 = 1_700_000_000 * NS
RANGE = ["--from", str(T0), "--to", str(T0 + 600 * NS)]


@pytest.fixture
def app() -> typer.Typer:
    root, ingest, aggregate = typer.Typer(), typer.Typer(), typer.Typer()
    root.add_typer(ingest, name="ingest")
    root.add_typer(aggregate, name="aggregate")
    register(ingest, aggregate)
    return root


def test_ingest_prints_the_four_counts_and_json(app: typer.Typer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "m.duckdb"
    with LokiServer(auth_enabled=True) as srv:
        generate(srv, lines=400, streams=2, start_ns=T0, span_ns=600 * NS, tenant="ops")
        srv.push({"app": "x", "container": "istio-proxy"}, [(T0 + 5, "not an access log line")], tenant="ops")
        monkeypatch.setenv("LOKI_ADDR", srv.url)  # logcli's variables work without flags
        monkeypatch.setenv("LOKI_ORG_ID", "ops")
        r = CliRunner().invoke(app, ["ingest", "loki", "--query", '{container="istio-proxy"}', "--db", str(db),
                                     "--parallel", "2", *RANGE])
        assert r.exit_code == 0, r.output
        assert r.output.splitlines() == ["records read:       401", "events stored:      400",
                                         "duplicates skipped: 0", "rejects:            1"]
        r = CliRunner().invoke(app, ["ingest", "loki", "-q", '{container="istio-proxy"}', "--db", str(db),
                                     "--json", "--header", "X-Debug: 1", *RANGE])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.output)
        assert {k: doc[k] for k in ("records_read", "events_stored", "duplicates_skipped", "rejects")} == {
            "records_read": 401, "events_stored": 0, "duplicates_skipped": 400, "rejects": 1}
        assert srv.query_requests()[-1].headers["X-Debug"] == "1"
    with open_store(db, read_only=True) as s:  # the snapshot was published for readers
        assert s.scalar("SELECT count(*) FROM events") == 400


def test_failures_are_one_line_with_exit_codes(app: typer.Typer, tmp_path: Path) -> None:
    db = str(tmp_path / "e.duckdb")
    with LokiServer(bearer_token="right") as srv:
        r = CliRunner().invoke(app, ["ingest", "loki", "--url", srv.url, "--bearer-token", "env:ML_T", "-q",
                                     '{a="b"}', "--db", db, *RANGE], env={"ML_T": "wrong"})
        assert r.exit_code == 1 and r.exception is None or isinstance(r.exception, SystemExit)
        assert r.output.startswith("meshlens: error: Loki at ") and "HTTP 401" in r.output and "wrong" not in r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
        r = CliRunner().invoke(app, ["ingest", "loki", "--url", srv.url, "--bearer-token", "env:ML_T", "-q",
                                     '{a="b"', "--db", db, *RANGE], env={"ML_T": "right"})
        assert r.exit_code == 1 and "parse error at line 1" in r.output
        r = CliRunner().invoke(app, ["ingest", "loki", "--url", srv.url, "-q", '{a="b"}', "--db", db,
                                     "--since", "2h", "--from", "now-3h"])
        assert r.exit_code == 2 and "either --since or --from" in r.output
        srv.inject(status=503, times=100, retry_after="0")
        r = CliRunner().invoke(app, ["ingest", "loki", "--url", srv.url, "--bearer-token", "env:ML_T", "-q",
                                     '{a="b"}', "--db", db, "--max-retries", "1", *RANGE], env={"ML_T": "right"})
        assert r.exit_code == 1 and "--resume" in r.output


def test_aggregate_command(app: typer.Typer, tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    with LokiServer() as srv:
        generate(srv, lines=300, streams=2, start_ns=T0, span_ns=600 * NS)
        r = CliRunner().invoke(app, ["aggregate", "loki", "--url", srv.url, "--selector", '{container="istio-proxy"}',
                                     "--preset", "requests", "--preset", "p50_duration_ms", "--step", "5m",
                                     "--db", str(db), "--json", *RANGE])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.output)
        assert doc["log_format"] == "text" and set(doc["metrics"]) == {"requests", "p50_duration_ms"}
        assert doc["samples"] == sum(doc["metrics"].values()) > 0


def test_a_plain_secret_argument_is_refused_before_anything_runs(app: typer.Typer, tmp_path: Path) -> None:
    """One secrets policy: a secret on the command line is only a reference (env:, file:, keyring:)."""
    db = tmp_path / "p.duckdb"
    for opt in ("--password", "--bearer-token"):
        r = CliRunner().invoke(app, ["ingest", "loki", "--url", "http://127.0.0.1:9", opt, "hunter2", "-q",
                                     '{a="b"}', "--db", str(db), *RANGE])
        assert r.exit_code == 2, r.output
        assert f"{opt}: secrets are not accepted as plain arguments" in r.output and "env:VAR" in r.output
        assert "hunter2" not in r.output
    assert not db.exists()


def test_a_second_run_prints_reread_rejects_apart_from_new_ones(app: typer.Typer, tmp_path: Path) -> None:
    db = tmp_path / "m.duckdb"
    with LokiServer() as srv:
        srv.push({"app": "x"}, [(T0 + i, f"not an access log line {i}") for i in range(3)])
        args = ["ingest", "loki", "-q", '{app="x"}', "--url", srv.url, "--db", str(db), *RANGE]
        assert CliRunner().invoke(app, args).output.splitlines()[-1] == "rejects:            3"
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[-1] == ("rejects:            3 (lines read that did not parse; 0 new in the "
                                             "rejects table, 3 already there)")


def test_connection_refused_is_one_line_exit_1(app: typer.Typer, tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = CliRunner().invoke(app, ["ingest", "loki", "-q", '{app="x"}', "--url", f"http://127.0.0.1:{port}",
                                 "--db", str(tmp_path / "m.duckdb"), *RANGE])
    assert r.exit_code == 1
    assert r.output.strip() == (f"meshlens: error: cannot connect to http://127.0.0.1:{port} (connection refused): "
                                "is Loki running there?")


DROP_ALL = "default_filters: false\nrules:\n  - name: drop-all-requests\n    event_type: [request]\n    keep_failures: false\n"


def test_an_ingest_that_stores_nothing_warns_why_in_one_line(app: typer.Typer, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(DROP_ALL)
    with LokiServer() as srv:
        srv.push({"app": "junk"}, [(T0 + i, f"not an access log line {i}") for i in range(5)])
        generate(srv, lines=20, streams=1, start_ns=T0, span_ns=600 * NS)  # {container="istio-proxy"}
        db = tmp_path / "r.duckdb"
        r = CliRunner().invoke(app, ["ingest", "loki", "--url", srv.url, "-q", '{app="junk"}', "--db", str(db),
                                     "--no-progress", *RANGE])
        assert r.exit_code == 0, r.output
        (warn,) = [ln for ln in r.stderr.splitlines() if "0 events were stored" in ln]
        assert warn.startswith("warning: loki:") and '{app="junk"}' in warn  # which ingest
        # why: the commonest reason, without the record text each reason quotes
        assert ("5 lines read but 0 events were stored: all rejected (top reason, 5 of them: unrecognised format: "
                "no parser matched '…')") in warn
        assert r.stdout.splitlines()[:2] == ["records read:       5", "events stored:      0"]  # stdout as before

        r = CliRunner().invoke(app, ["ingest", "loki", "--url", srv.url, "-q", '{container="istio-proxy"}',
                                     "--db", str(tmp_path / "f.duckdb"), "--filter-config", str(rules), *RANGE])
        assert r.exit_code == 0, r.output
        (warn,) = [ln for ln in r.stderr.splitlines() if "0 events were stored" in ln]
        assert "20 lines read but 0 events were stored: all filtered by rule 'drop-all-requests' (20)" in warn

        # something stored, or a selector that matched nothing (the source's own warning): no such line
        for query in ('{container="istio-proxy"}', '{app="nothere"}'):
            r = CliRunner().invoke(app, ["ingest", "loki", "--url", srv.url, "-q", query,
                                         "--db", str(tmp_path / "ok.duckdb"), *RANGE])
            assert r.exit_code == 0 and "0 events were stored" not in r.output, r.output
