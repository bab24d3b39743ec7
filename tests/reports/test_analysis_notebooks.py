"""The analysis notebooks, run as reports with their defaults on the bundled samples, name the planted
incident (read from the samples' ground truth, not hard-coded): the root cause, the causing change."""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

import pytest

from meshlens import notebook as nbhelp
from meshlens import reports


def _text(html_path: str) -> str:
    t = Path(html_path).read_text()
    t = re.sub(r"<script.*?</script>|<style.*?</style>|<svg.*?</svg>", " ", t, flags=re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", t)))


@pytest.fixture(scope="module")
def incident() -> dict:
    d = nbhelp.samples_dir()
    if d is None or not (d / "ground_truth.json").exists():
        pytest.skip("data/samples/ has no simulated dataset with ground truth")
    truth = json.loads((d / "ground_truth.json").read_text())
    return next(i for i in truth["incidents"] if i["change"] is not None)


@pytest.fixture
def samples_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.delenv(nbhelp.DB_ENV, raising=False)
    monkeypatch.setenv(nbhelp.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "samples-cache"))


@pytest.mark.usefixtures("samples_env")
def test_root_cause_report_names_the_planted_cause(incident: dict, tmp_path: Path) -> None:
    r = reports.run_report("root_cause", None, {}, tmp_path, timeout_s=300)
    assert r.status == "ok", r.error
    text = _text(r.html)
    assert f"Symptom {incident['symptom_service']}" in text
    first = re.search(r"rank kind target namespace score .*? 1 (service|edge) (\S+) (\S+) ", text)
    assert first is not None and first.group(2) in incident["accepted_root_causes"], text[:3000]
    assert incident["onset"][:15] in text  # the onset found is in the planted minute's ten-minute slot


@pytest.mark.usefixtures("samples_env")
def test_change_correlation_report_names_the_planted_change(incident: dict, tmp_path: Path) -> None:
    r = reports.run_report("change_correlation", None, {}, tmp_path, timeout_s=300)
    assert r.status == "ok", r.error
    text = _text(r.html)
    change = incident["change"]
    assert f"Likely cause: {change['target']}" in text
    assert change["actor"] in text
