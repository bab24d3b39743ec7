"""The public Python API (``meshlens.<name>``) that notebooks and scripts use, pinned."""

from __future__ import annotations

import subprocess
import sys

import meshlens

PUBLIC = {
    "AuthError", "ConfigError", "FilterConfig", "IngestCounts", "MeshlensError", "QueryError", "Source",
    "SourceError", "Store", "StoreError", "aggregate_es", "aggregate_loki", "apply_retention",
    "attach_archive", "correlate_changes", "detect_anomalies", "ingest", "ingest_es", "ingest_files",
    "ingest_loki", "load_policy", "open_source", "open_store", "register_source", "root_cause",
    "run_report", "service_graph", "summary", "time_range",
}


def test_the_exported_names_are_pinned_and_all_resolve() -> None:
    assert set(meshlens.__all__) >= PUBLIC, "a public name was removed: add, don't rename"
    for name in meshlens.__all__:
        assert getattr(meshlens, name) is not None, name
    assert meshlens.root_cause.__module__ == "meshlens.analysis.rootcause"
    assert issubclass(meshlens.AuthError, meshlens.SourceError)


def test_import_meshlens_and_the_cli_load_no_heavy_stack() -> None:
    """`import meshlens` and building the command tree import none of the notebook/report stack."""
    code = ("import sys, meshlens, meshlens.cli\n"
            "heavy = ['pandas', 'altair', 'papermill', 'nbconvert', 'nbformat', 'jupyter_client', 'ipywidgets']\n"
            "loaded = [m for m in heavy if m in sys.modules and type(sys.modules[m]).__name__ != '_LazyModule']\n"
            "print(','.join(loaded))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"loaded at import: {out.stdout.strip()}"


def test_help_of_the_main_commands_imports_none_of_the_heavy_stack() -> None:
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom meshlens.cli import app\n"
            "for args in (['--help'], ['ingest', 'file', '--help'], ['analyze', 'root-cause', '--help'],"
            " ['ingest', 'loki', '--help'], ['report', 'run', '--help']):\n"
            "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
            "heavy = ['pandas', 'altair', 'papermill', 'nbconvert', 'nbformat', 'jupyter_client', 'ipywidgets']\n"
            "print(','.join(m for m in heavy if m in sys.modules and type(sys.modules[m]).__name__ != '_LazyModule'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"loaded by --help: {out.stdout.strip()}"
