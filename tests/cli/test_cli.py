"""The CLI contract: commands, --json fields, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "meshlens.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_ingest_file_json_counts_and_summary(shared_samples: Path, db: Path) -> None:
    r = run("ingest", "file", str(shared_samples / "istio"), "--db", str(db), "--json")
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert set(counts) >= {"records_read", "events_stored", "duplicates_skipped", "rejects", "run_id"}
    assert counts["records_read"] == (counts["events_stored"] + counts["duplicates_skipped"] + counts["rejects"]
                                      + counts["filtered"])
    again = json.loads(run("ingest", "file", str(shared_samples / "istio"), "--db", str(db), "--json").stdout)
    assert again["events_stored"] == 0 and again["duplicates_skipped"] == counts["events_stored"]
    s = run("summary", "--db", str(db), "--json")
    assert s.returncode == 0, s.stderr
    summary = json.loads(s.stdout)
    assert summary["events"] == counts["events_stored"]
    assert summary["by_event_type"]["authz"] >= 2


def test_text_output_prints_the_four_numbers(shared_samples: Path, db: Path) -> None:
    r = run("ingest", "file", str(shared_samples / "linkerd"), "--db", str(db), "--no-progress")
    assert r.returncode == 0
    for label in ("records read", "events stored", "duplicates skipped", "rejects"):
        assert label in r.stdout


@pytest.mark.parametrize("args,code,msg", [
    (("ingest", "file", "/definitely/missing.log", "--db", "{db}"), 1, "no such file"),
    (("ingest", "file", "{samples}", "--db", "{db}", "--format", "bogus"), 2, "unknown format"),
    (("summary", "--db", "{tmp}/never.duckdb"), 2, "does not exist"),
    (("ingest", "file"), 2, ""),
])
def test_errors_are_one_line_and_nonzero(shared_samples: Path, db: Path, tmp_path: Path, args, code, msg) -> None:
    args = [a.format(db=db, samples=shared_samples / "istio", tmp=tmp_path) for a in args]
    r = run(*args)
    assert r.returncode == code
    assert "Traceback" not in r.stderr
    assert msg in r.stderr


def test_help_on_every_command() -> None:
    for args in (["--help"], ["ingest", "--help"], ["ingest", "file", "--help"], ["summary", "--help"],
                 ["schema", "--help"], ["demo", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and "Usage" in r.stdout, (args, r.stderr)


def test_cli_reference_is_current() -> None:
    from meshlens.cli.reference import markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    assert doc.read_text() == markdown(), "regenerate: python -m meshlens.cli.reference > docs/cli.md"
