"""The analysis notebooks, run as reports with their defaults on the bundled samples, name the planted
incidents (read from the samples' ground truth, not hard-coded): the root cause, the causing change --
and say so first, in a verdict above the first chart, with the method text at the end."""

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


def _body(html_path: str) -> str:
    """The report's content after the banner (which repeats the findings)."""
    t = Path(html_path).read_text()
    return t[t.index("</header>"):]


@pytest.fixture(scope="module")
def truth() -> dict:
    d = nbhelp.samples_dir()
    if d is None or not (d / "ground_truth.json").exists():
        pytest.skip("data/samples/ has no simulated dataset with ground truth")
    return json.loads((d / "ground_truth.json").read_text())


@pytest.mark.usefixtures("samples_env")
def test_root_cause_report_names_the_planted_cause(incident: dict, tmp_path: Path) -> None:
    r = reports.run_report("root_cause", None, {}, tmp_path, timeout_s=300)
    assert r.status == "ok", r.error
    declared = reports.notebook_parameters(reports.find_notebook("root_cause"))
    assert declared["start"]["default"] == "latest-6h"  # the store's latest data, not a fixed 2024 window
    assert r.effective["start"].startswith("2024-05-01T05:59")  # 6 h before the samples' newest event
    text = _text(r.html)
    first = re.search(r"rank kind target namespace score .*? 1 (service|edge) (\S+) (\S+) ", text)
    assert first is not None and first.group(2) in incident["accepted_root_causes"], text[:3000]
    assert incident["onset"][:15] in text  # the onset found is in the planted minute's ten-minute slot
    # The answer first: culprit, failure signature and likely change before the first chart.
    body = _body(r.html)
    card = body[body.index('class="meshlens-verdict'):body.index("</section>")]
    chart = body.index('class="meshlens-chart"')
    assert body.index('class="meshlens-verdict') < chart
    culprit = first.group(2)
    assert f"{culprit} is the root cause of {incident['symptom_service']}" in unescape(card)
    assert "failure signature" in card and "authorization denials" in card
    assert incident["change"]["target"] in card and incident["change"]["actor"] in card
    assert body.rindex("How this analysis works") > body.rindex('class="meshlens-chart"')  # method at the end
    assert any(culprit in f for f in r.findings) and any(incident["change"]["target"] in f for f in r.findings)


@pytest.mark.usefixtures("samples_env")
def test_change_correlation_report_names_the_planted_change(incident: dict, tmp_path: Path) -> None:
    r = reports.run_report("change_correlation", None, {}, tmp_path, timeout_s=300)
    assert r.status == "ok", r.error
    text = _text(r.html)
    change = incident["change"]
    assert f"Likely cause: {change['target']}" in text
    assert change["actor"] in text
    assert reports.notebook_parameters(reports.find_notebook("change_correlation"))["start"]["default"] == "latest-6h"
    body = _body(r.html)
    assert body.index('class="meshlens-verdict') < body.index('class="meshlens-chart"')
    assert body.rindex("How the score works") > body.rindex('class="meshlens-chart"')
    assert r.findings and change["target"] in r.findings[0] and change["actor"] in r.findings[0]


@pytest.mark.usefixtures("samples_env")
def test_triage_report_shows_every_planted_incident_with_its_cause(truth: dict, tmp_path: Path) -> None:
    r = reports.run_report("triage", None, {}, tmp_path, timeout_s=600)
    assert r.status == "ok", r.error
    body = _body(r.html)
    cards = re.findall(r'<section class="meshlens-verdict[^"]*" id="incident-\d+".*?</section>', body, flags=re.S)
    assert len(cards) == len(truth["incidents"])  # both planted incidents, no spurious one
    assert body.index("meshlens-verdict") < body.index('class="meshlens-chart"')  # verdicts before evidence
    for planted in truth["incidents"]:
        slot = planted["onset"][:15]  # the ten-minute slot of the planted onset
        card = unescape(next(c for c in cards if slot in unescape(c)))
        assert any(f"caused by {rc}" in card for rc in planted["accepted_root_causes"]), card
        if planted["change"]:
            assert planted["change"]["target"] in card and planted["change"]["actor"] in card
        else:
            assert "none: no config change" in card
    assert len([f for f in r.findings if f.startswith("Incident ")]) == len(truth["incidents"])
    assert "background anomalies" in body.lower()
