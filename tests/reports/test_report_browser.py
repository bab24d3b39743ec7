"""The HTML report draws its charts in a real browser with no network (headless Debian chromium).

Chromium gets a proxy that goes nowhere and a resolver that resolves nothing, so any fetch from a CDN
would fail; the test then reads the DOM after the page's scripts ran and requires every chart to have
been re-drawn by the inlined vega-embed (``data-rendered="vega-embed"``, the static SVG fallback gone,
a Vega SVG with marks in its place).

CI set-up: ``apt-get update && apt-get install -y chromium``. Without chromium the test is skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meshlens import reports
from tests.support.audit_store import build_audit_store

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after its scripts ran, rendered offline."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
        "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=20000", "--dump-dom", page.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def chart_blocks(dom: str) -> list[str]:
    """The HTML of each chart container (up to the next chart)."""
    starts = [m.start() for m in re.finditer(r'<div[^>]*class="meshlens-chart"', dom)]
    return [dom[a:b] for a, b in zip(starts, [*starts[1:], len(dom)], strict=True)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> reports.ReportResult:
    db = build_audit_store(tmp_path_factory.mktemp("store") / "audit.duckdb")
    result = reports.run_report("mesh_audit", db, {}, tmp_path_factory.mktemp("out"))
    assert result.status == "ok", result.error
    return result


def test_report_charts_draw_in_headless_chromium_without_network(report: reports.ReportResult, tmp_path: Path) -> None:
    source = Path(report.html).read_text()
    expected = len(re.findall(r'class="meshlens-chart-spec"', source))
    assert expected >= 4
    dom = dump_dom(Path(report.html), tmp_path / "profile")
    blocks = chart_blocks(dom)
    assert len(blocks) == expected
    for block in blocks:
        head = block[: block.index(">")]
        assert 'data-rendered="vega-embed"' in head, head
        assert "data-error" not in head
        assert "meshlens-chart-static" not in block  # the static fallback was replaced
        assert re.search(r'<div[^>]*class="meshlens-chart-view[^"]*vega-embed', block)  # drawn by vega-embed
        assert re.search(r'<svg[^>]*class="marks"', block)
        assert re.search(r'<g class="mark-(rect|line|rule|symbol|text|area)', block)
    # The banner and tables are there too (the page as a whole rendered).
    assert 'data-status="ok"' in dom and "deny-legacy" in dom


def test_index_page_renders_with_links(report: reports.ReportResult, tmp_path: Path) -> None:
    index = Path(report.run_dir).parent.parent / reports.INDEX_FILE
    dom = dump_dom(index, tmp_path / "profile")
    assert "mesh_audit" in dom and ">ok<" in dom
    rel = Path(report.html).relative_to(index.parent).as_posix()
    assert f'href="{rel}"' in dom


MEASURE_JS = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var clipped = [], align = [], raw = [];
  document.querySelectorAll('table.meshlens-table td, table.meshlens-table th').forEach(function (td) {
    if (td.scrollWidth > td.clientWidth + 1) { clipped.push(td.getAttribute('data-col') || td.textContent.slice(0, 30)); }
    var a = getComputedStyle(td).textAlign;
    if (a !== 'left' && a !== 'start') { align.push(a); }
    if (/^(None|<NA>|NaN|NaT|nan)$/.test(td.textContent.trim())) { raw.push(td.textContent); }
  });
  var wraps = [];
  document.querySelectorAll('.meshlens-table-wrap').forEach(function (d) { wraps.push(getComputedStyle(d).overflowX); });
  document.body.setAttribute('data-measure', JSON.stringify({clipped: clipped, align: align, raw: raw, wraps: wraps}));
}, 0); });
</script>"""


def test_tables_are_left_aligned_never_clipped_and_scroll(report: reports.ReportResult, tmp_path: Path) -> None:
    import html as _html
    import json

    page = tmp_path / "measured.html"
    page.write_text(Path(report.html).read_text().replace("</body>", MEASURE_JS + "</body>"))
    dom = dump_dom(page, tmp_path / "profile")
    m = json.loads(_html.unescape(re.search(r'data-measure="([^"]*)"', dom).group(1)))
    assert m["wraps"] and set(m["wraps"]) == {"auto"}  # every table scrolls inside its own box
    assert m["clipped"] == [] and m["align"] == [] and m["raw"] == [], m
    assert 'data-col="meshes"' in dom  # the denied table's meshes column is there, unclipped


def _tiny(tmp: Path, name: str, *cells: str) -> Path:
    from tests.support.notebooks import make_notebook

    return make_notebook(tmp / "nbs" / f"{name}.ipynb", 'db = ""\n', *cells)


def test_index_lists_triage_first_with_findings_and_empty_and_failed_runs_read_right(
    tmp_path: Path, report: reports.ReportResult,
) -> None:
    out = tmp_path / "out"
    finding = "from meshlens import notebook as nb\nnb.finding('**2 incidents**: payments denied `checkout`')"
    for name in ("alpha", "triage"):
        r = reports.run_report(_tiny(tmp_path, name, finding), None, {}, out)
        assert r.status == "ok" and r.findings == ["2 incidents: payments denied checkout"], r.error
    boom = reports.run_report(_tiny(tmp_path, "boom", "def f():\n    raise RuntimeError('cause-line-42')\nf()"),
                              None, {}, out)
    assert boom.status == "failed"
    db = Path(report.parameters["db"])
    empty = reports.run_report("mesh_audit", db, {"start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z"}, out)
    assert empty.status == "empty"

    dom = dump_dom(out / reports.INDEX_FILE, tmp_path / "profile")
    latest = dom[dom.index('<table class="latest"'):dom.index("</table>")]
    names = re.findall(r'data-report="([^"]+)"', latest)
    assert names[0] == "triage" and set(names) == {"triage", "alpha", "boom", "mesh_audit"}
    assert "2 incidents: payments denied checkout" in latest  # the findings, on the index
    assert "cause-line-42" in latest and "no events in" in latest

    failed = dump_dom(Path(boom.html), tmp_path / "profile")
    banner = failed[failed.index('class="meshlens-banner'):failed.index("</header>")]
    assert "cause-line-42" in banner and 'data-status="failed"' in failed
    folded = re.search(r"<details( [^>]*)?><summary>traceback</summary>", failed)
    assert folded is not None and "open" not in (folded.group(1) or "")  # folded, not shown
    empty_dom = dump_dom(Path(empty.html), tmp_path / "profile")
    assert 'data-status="empty"' in empty_dom and "Nothing to report" in empty_dom and "the store holds" in empty_dom


def test_chart_tooltips_show_the_time_of_day_in_the_report_and_as_compiled_for_jupyterlab(tmp_path: Path) -> None:
    """Hover a point: the tooltip says the UTC time of day. Checked for the Vega-Lite spec the HTML report
    draws and for the compiled Vega spec JupyterLab's Vega renderer draws (JupyterLab 4 bundles Vega 5;
    the same check passed against vega@5.33 + vega-embed@6 from npm when this was written)."""
    import json

    import pandas as pd

    from meshlens import notebook as nbhelp
    from meshlens import viz

    ts = pd.date_range("2024-05-01T23:40:00Z", periods=8, freq="5min")
    df = pd.DataFrame({"ts": list(ts) * 2, "value": list(range(8)) * 2, "series": ["requests"] * 8 + ["failed"] * 8})
    changes = pd.DataFrame({"ts": [ts[2]], "label": ["AuthorizationPolicy/shop/deny-all"], "actor": ["alice"]})
    spec = viz.time_series(df, color="series", onset=ts[3], changes=changes, y_title="requests").to_dict()
    probe = """.then(function () {
      var p = document.querySelector('#v svg .mark-symbol path'), box = p.getBoundingClientRect();
      ['pointermove', 'mousemove'].forEach(function (k) {
        p.dispatchEvent(new MouseEvent(k, {bubbles: true, clientX: box.x + box.width / 2, clientY: box.y + box.height / 2}));
      });
      setTimeout(function () { var t = document.getElementById('vg-tooltip-element');
        document.body.setAttribute('data-tooltip', t ? t.textContent : 'none'); }, 300);
    }).catch(function (e) { document.body.setAttribute('data-error', String(e)); });"""
    for name, chart, mode in (("report", spec, "vega-lite"), ("lab", nbhelp.chart_vega(spec), "vega")):
        page = tmp_path / f"{name}.html"
        page.write_text(f"<html><head><script>{nbhelp.vega_embed_bundle()}</script></head><body><div id='v'></div>"
                        f"<script>vegaEmbed('#v', {json.dumps(chart)}, {{mode: '{mode}', actions: false, "
                        f"renderer: 'svg'}}){probe}</script></body></html>")
        dom = dump_dom(page, tmp_path / f"profile-{name}")
        tip = re.search(r'data-tooltip="([^"]*)"', dom)
        assert tip is not None, dom[-2000:]
        assert "2024-05-01 23:40:00" in tip.group(1) and "requests per 5 min" in tip.group(1), tip.group(1)
