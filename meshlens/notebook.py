"""Small helpers the notebooks call, so every notebook stays "a parameters cell, then package calls".

Why these live in the package and not in the notebooks: notebooks are hard to test, review and reuse;
the same helpers run interactively in JupyterLab, under papermill in a scheduled report and in tests.

How a notebook plugs in (the contract :mod:`meshlens.reports` and :mod:`meshlens.schedule` rely on)
-------------------------------------------------------------------------------------------------
1. Put the notebook in ``notebooks/<name>.ipynb`` (the report name is the file stem).
2. Its first code cell is tagged ``parameters`` (papermill) and holds plain literal assignments only.
   Standard names, so the scheduler and ``meshlens report run -p`` work the same for every report::

       db = ""          # store path; empty: $MESHLENS_DB, else the bundled samples (see resolve_db)
       start = ""       # empty: from the first event; RFC 3339, Unix s, now, -24h, now-2h, latest-6h
       end = ""         # empty: up to the last event; same forms
       namespace = ""   # empty: every namespace
       service = ""     # empty: every service (root cause: the symptom service)
       # ... notebook-specific thresholds as int/float/str/bool literals ...

   Comments must not contain ``=`` (papermill's own parameter parser gives up on such lines).
   Never a credential: :func:`meshlens.reports.run_report` rejects parameters named like
   password/token/secret/api_key. Sources read credentials from the environment, not from notebooks.
3. The next cell calls :func:`setup`::

       from meshlens import notebook as nb
       session = nb.setup(db, start, end)      # read-only store, resolved window, offline charts
       store, window = session.store, session.window

   then analysis functions (``meshlens.analysis.*``: they take the store and ``window.start`` /
   ``window.end``) and display helpers: Altair charts from :mod:`meshlens.viz` (just leave the chart as
   the last expression), :func:`show_table`, :func:`note`.
4. Commit the notebook with outputs cleared and add it to the notebook list in ``tests/reports/test_reports.py``
   so it is executed with papermill in CI.

Charts render offline everywhere, interactive where a renderer exists: :func:`configure_altair` enables
the ``meshlens`` Altair renderer, which emits each chart as a mime bundle of the compiled Vega spec
(JupyterLab draws it with its built-in Vega extension: tooltips, no network), the Vega-Lite spec and a
static SVG drawn by vl-convert in the kernel (nbviewer, GitHub). The HTML report turns each bundle into
the SVG plus its spec, inlines the vega-embed bundle once (:func:`vega_embed_bundle`,
:data:`UPGRADE_JS`) and upgrades every chart to an interactive one -- no CDN is ever contacted.
"""

from __future__ import annotations

import fcntl
import hashlib
import html
import itertools
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd

from meshlens.errors import ConfigError, StoreError
from meshlens.store import Store
from meshlens.store import open_store as _open_store
from meshlens.timeutil import ns_to_rfc3339, parse_time_ns

DB_ENV = "MESHLENS_DB"
CACHE_ENV = "MESHLENS_CACHE_DIR"
RENDERER = "meshlens"
MAX_CHART_ROWS = 50_000

# ------------------------------------------------------------------------------------------------
# Where things are
# ------------------------------------------------------------------------------------------------


def repo_root() -> Path | None:
    """The source checkout holding this package (``notebooks/`` and ``data/`` beside it), or None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() else None


def samples_dir() -> Path | None:
    """``data/samples`` of a source checkout, when it exists and is not empty."""
    root = repo_root()
    d = root / "data" / "samples" if root else None
    return d if d is not None and d.is_dir() and any(d.iterdir()) else None


SAMPLE_DOCS = ("README*", "*.md", "ground_truth*", ".*")
"""Files of data/samples that describe the dataset rather than hold logs (not ingested)."""


def _is_sample_doc(p: Path) -> bool:
    return any(p.match(pattern) for pattern in SAMPLE_DOCS)


def _samples_fingerprint(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(x for x in d.rglob("*") if x.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(d)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def samples_store() -> Path:
    """A store holding the bundled ``data/samples``, ingested once and cached by content fingerprint.

    Why: a notebook must run "with its defaults on the bundled samples" without any set-up, while the
    samples are compressed logs, not a DuckDB file. The cache lives in ``$MESHLENS_CACHE_DIR`` (default
    ``~/.cache/meshlens``); a file lock keeps two kernels from building it at once.
    """
    d = samples_dir()
    if d is None:
        raise ConfigError(
            "no store given: pass db=PATH (meshlens report run NAME --db PATH), set $MESHLENS_DB, or run "
            "from a source checkout that has data/samples/ to use the bundled samples"
        )
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "meshlens")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"samples-{_samples_fingerprint(d)}.duckdb"
    with open(cache / "samples.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            from meshlens.ingest import ingest_files  # imported lazily: needed once per sample set

            tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
            logs = [p for p in sorted(d.rglob("*")) if p.is_file() and not _is_sample_doc(p)]
            try:
                ingest_files(str(tmp), logs, progress=False)
                for suffix in (".snapshot", ""):  # the main file last: its presence marks the cache complete
                    src = Path(str(tmp) + suffix)
                    if src.exists():
                        os.replace(src, str(target) + suffix)
            finally:
                for leftover in tmp.parent.glob(tmp.name + "*"):
                    leftover.unlink()
    return target


def resolve_db(db: str | os.PathLike[str] | None) -> Path:
    """The store a notebook should read: ``db``, else ``$MESHLENS_DB``, else the bundled samples."""
    value = str(db or "").strip() or os.environ.get(DB_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    return samples_store()


def open_store(db: str | os.PathLike[str] | None = "") -> Store:
    """Open the store read-only (the published snapshot when there is one, see :mod:`meshlens.store`).

    Read-only is what lets a JupyterLab kernel, scheduled reports and a running ingest share one file.
    """
    path = resolve_db(db)
    if not path.exists() and not Path(str(path) + ".snapshot").exists():
        raise StoreError(
            f"store {str(path)!r} does not exist; ingest into it first (meshlens ingest file ... --db {path})"
        )
    return _open_store(path, read_only=True)


# ------------------------------------------------------------------------------------------------
# Time ranges
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    """A resolved, half-open analysis window ``[start, end)`` in UTC; None means unbounded."""

    start: pd.Timestamp | None
    end: pd.Timestamp | None

    @property
    def start_ns(self) -> int | None:
        return None if self.start is None else int(self.start.value)

    @property
    def end_ns(self) -> int | None:
        return None if self.end is None else int(self.end.value)

    def describe(self) -> str:
        lo = ns_to_rfc3339(self.start_ns) if self.start is not None else "the first event"
        hi = ns_to_rfc3339(self.end_ns) if self.end is not None else "the last event"
        return f"{lo} to {hi}"


def _latest_ns(store: Store | None) -> int:
    if store is None:
        raise ConfigError("a time relative to 'latest' needs the store (pass store=...)")
    from meshlens.analysis.common import latest_event_ns

    return latest_event_ns(store)  # just after the newest event, so "latest" as an end includes it


def parse_time(value: Any, *, now_ns: int | None = None, store: Store | None = None) -> pd.Timestamp | None:
    """One time bound: ``""``/None (unbounded), anything :func:`meshlens.timeutil.parse_time_ns` takes,
    or ``latest`` / ``latest-6h`` (relative to the newest event in the store: handy on old captures)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    # the one time grammar (meshlens.timeutil); "latest" is resolved against the store only when used
    ns = parse_time_ns(value, now_ns=now_ns, latest_ns=lambda: _latest_ns(store))
    return pd.Timestamp(ns, unit="ns", tz="UTC")


def time_range(start: Any = "", end: Any = "", *, now_ns: int | None = None, store: Store | None = None) -> TimeRange:
    """Resolve the ``start``/``end`` parameters of a notebook into a :class:`TimeRange`."""
    lo = parse_time(start, now_ns=now_ns, store=store)
    hi = parse_time(end, now_ns=now_ns, store=store)
    if lo is not None and hi is not None and lo >= hi:
        raise ConfigError(f"empty time range: start {start!r} ({lo}) is not before end {end!r} ({hi})")
    return TimeRange(lo, hi)


# ------------------------------------------------------------------------------------------------
# Offline Altair rendering
# ------------------------------------------------------------------------------------------------

_ID_RE = re.compile(r'\bid="([^"]+)"')
_chart_ids = itertools.count(1)

# Runs once in the HTML report (after the vega-embed bundle): upgrades every static chart to an
# interactive vega-embed view, and marks it so tests can tell a browser-drawn chart from the fallback.
UPGRADE_JS = """
(function () {
  function upgrade(el) {
    var specEl = el.querySelector('script.meshlens-chart-spec');
    var target = el.querySelector('.meshlens-chart-view');
    var fallback = el.querySelector('.meshlens-chart-static');
    if (!specEl || !target || typeof vegaEmbed !== 'function') { return; }
    var spec = JSON.parse(specEl.textContent);
    vegaEmbed(target, spec, {renderer: 'svg', actions: false, mode: 'vega-lite'})
      .then(function () {
        if (fallback) { fallback.remove(); }
        el.setAttribute('data-rendered', 'vega-embed');
      })
      .catch(function (err) {
        el.setAttribute('data-rendered', 'static');
        el.setAttribute('data-error', String(err));
      });
  }
  function all() { document.querySelectorAll('.meshlens-chart').forEach(upgrade); }
  if (document.readyState === 'loading') { document.addEventListener('DOMContentLoaded', all); }
  else { all(); }
})();
"""


@lru_cache(maxsize=1)
def vega_embed_bundle() -> str:
    """vega + vega-lite + vega-embed as one inline script, from vl-convert-python (no CDN)."""
    import vl_convert as vlc
    from altair.utils.html import vl_version_for_vl_convert

    return vlc.javascript_bundle(vl_version=vl_version_for_vl_convert())


def _uniquify_svg_ids(svg: str, prefix: str) -> str:
    """Prefix the ids in one SVG: several inline SVGs on a page must not share clip-path ids."""
    for old in set(_ID_RE.findall(svg)):
        new = f"{prefix}-{old}"
        svg = svg.replace(f'id="{old}"', f'id="{new}"').replace(f"url(#{old})", f"url(#{new})")
        svg = svg.replace(f'href="#{old}"', f'href="#{new}"')
    return svg


def chart_html(spec: dict[str, Any], svg: str | None = None) -> str:
    """A chart as HTML: static SVG (``svg``, else drawn now by vl-convert) plus its spec for an
    in-browser upgrade by the report's inlined vega-embed."""
    chart_id = f"mlc{os.getpid()}-{next(_chart_ids)}"
    svg = _uniquify_svg_ids(svg if svg is not None else chart_svg(spec), chart_id)
    spec_json = json.dumps(spec).replace("</", "<\\/").replace("<!--", "<\\!--")
    return (
        f'<div class="meshlens-chart" id="{chart_id}" data-rendered="static">'
        f'<div class="meshlens-chart-static">{svg}</div><div class="meshlens-chart-view"></div>'
        f'<script type="application/json" class="meshlens-chart-spec">{spec_json}</script></div>'
    )


VEGA_MIME = "application/vnd.vega.v5+json"
SVG_MIME = "image/svg+xml"
VEGA_SCHEMA = "https://vega.github.io/schema/vega/v5.json"


def vegalite_mime() -> str:
    """The Vega-Lite mimetype of the installed Altair (``application/vnd.vegalite.v6+json``)."""
    return f"application/vnd.vegalite.v{alt.SCHEMA_VERSION.lstrip('v').split('.')[0]}+json"


def chart_svg(spec: dict[str, Any]) -> str:
    """The chart drawn as a static SVG by vl-convert, in the kernel (no browser, no network)."""
    import vl_convert as vlc
    from altair.utils.html import vl_version_for_vl_convert

    return vlc.vegalite_to_svg(spec, vl_version=vl_version_for_vl_convert())


def chart_vega(spec: dict[str, Any]) -> dict[str, Any]:
    """The chart compiled to a Vega spec (by vl-convert), for JupyterLab's built-in Vega 5 renderer.

    Why compiled: JupyterLab 4 renders ``application/vnd.vega.v5+json`` (and Vega-Lite up to v5)
    interactively, tooltips included, but not Altair 6's Vega-Lite v6 mimetype -- it would fall back to
    the static SVG. The compiled spec only uses Vega 5 features; its ``$schema`` says so, which keeps
    vega-embed from warning about a version mismatch."""
    import vl_convert as vlc
    from altair.utils.html import vl_version_for_vl_convert

    vega = vlc.vegalite_to_vega(spec, vl_version=vl_version_for_vl_convert())
    vega["$schema"] = VEGA_SCHEMA
    return vega


def _meshlens_renderer(spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    """A chart as a mime bundle: the compiled Vega spec (JupyterLab draws it interactively, with
    tooltips), the Vega-Lite spec, a static SVG (nbviewer, GitHub, anything without Vega) and a text
    line. The HTML report turns the bundle into :func:`chart_html` (see
    :func:`meshlens.reports.render_html`)."""
    title = spec.get("title")
    text = title.get("text") if isinstance(title, dict) else title
    return {VEGA_MIME: chart_vega(spec), vegalite_mime(): spec, SVG_MIME: chart_svg(spec),
            "text/plain": f"<meshlens chart: {text or spec.get('mark', 'chart')}>"}


def chart_bundle_to_html(data: dict[str, Any]) -> dict[str, Any] | None:
    """A chart output's mime data as the report's HTML chart (``{"text/html": ...}``), or None if the
    output is not a meshlens chart."""
    spec = data.get(vegalite_mime())
    if not isinstance(spec, dict) or SVG_MIME not in data:
        return None
    svg = data[SVG_MIME]
    svg = "".join(svg) if isinstance(svg, list) else str(svg)
    return {"text/html": chart_html(spec, svg), "text/plain": data.get("text/plain", "")}


def configure_altair() -> None:
    """Enable offline chart rendering (see the module docstring) and allow larger inline data."""
    if RENDERER not in alt.renderers.names():
        alt.renderers.register(RENDERER, _meshlens_renderer)
    alt.renderers.enable(RENDERER)
    alt.data_transformers.enable("default", max_rows=MAX_CHART_ROWS)


# ------------------------------------------------------------------------------------------------
# Display helpers
# ------------------------------------------------------------------------------------------------


def _display(obj: Any) -> None:
    from IPython.display import display

    display(obj)


def note(markdown: str) -> None:
    """Show a Markdown paragraph (headings, findings, "nothing found" messages)."""
    from IPython.display import Markdown

    _display(Markdown(markdown))


TABLE_CLASS = "meshlens-table"


def _cell_text(value: Any) -> str:
    """One table cell as text: missing values (None, NaN, NaT, pd.NA) are blank, lists are joined."""
    if isinstance(value, list | tuple | set):
        return ", ".join(_cell_text(v) for v in value if _cell_text(v))
    if hasattr(value, "tolist") and not isinstance(value, str | bytes | pd.Timestamp):  # numpy arrays
        listed = value.tolist()
        if isinstance(listed, list):
            return _cell_text(listed)
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if value.tzinfo is not None else "")
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def table_html(df: pd.DataFrame, *, title: str | None = None, max_rows: int = 50, empty: str = "none") -> str:
    """A DataFrame as an escaped HTML table with a caption saying how many rows exist and are shown.

    Every cell is text: no raw ``None``/``<NA>``/``NaT`` (blank instead), lists joined with commas,
    times in UTC. The table sits in a scrolling box (a wide table scrolls inside its output, it never
    clips a column); long text (evidence) wraps, left-aligned -- see the report CSS in
    :mod:`meshlens.reports`, which also applies in JupyterLab through the inline ``style``.
    """
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    if df.empty:
        return f'{head}<p class="meshlens-empty"><em>{html.escape(empty)}</em></p>'
    shown = df.head(max_rows)
    caption = f"{len(df)} rows" if len(df) <= max_rows else f"first {max_rows} of {len(df)} rows"
    cell = ("text-align:left;vertical-align:top;white-space:normal;overflow-wrap:break-word;"
            "padding:.2em .6em;border-bottom:1px solid #ddd")
    cols = [str(c) for c in shown.columns]
    header = "".join(f'<th style="{cell};white-space:nowrap">{html.escape(c)}</th>' for c in cols)
    rows = []
    for rec in shown.itertuples(index=False, name=None):
        tds = []
        for c, v in zip(cols, rec, strict=True):
            text = _cell_text(v)
            width = "min-width:24em;" if len(text) > 80 else ""
            tds.append(f'<td data-col="{html.escape(c)}" style="{cell};{width}">{html.escape(text)}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    body = (f'<div class="meshlens-table-wrap" style="overflow-x:auto;max-width:100%">'
            f'<table class="{TABLE_CLASS}" style="table-layout:auto;border-collapse:collapse;margin:0">'
            f"<thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
    return f'{head}{body}<p class="meshlens-caption"><small>{caption}</small></p>'


def show_table(df: pd.DataFrame, *, title: str | None = None, max_rows: int = 50, empty: str = "none") -> None:
    """Display a DataFrame as a table (see :func:`table_html`)."""
    from IPython.display import HTML

    _display(HTML(table_html(df, title=title, max_rows=max_rows, empty=empty)))


# ------------------------------------------------------------------------------------------------
# Findings, effective parameters and empty windows (read back by meshlens.reports)
# ------------------------------------------------------------------------------------------------

META_KEY = "meshlens"
"""Output metadata key under which a notebook tells the report runner what it found."""

_MD_MARKUP = re.compile(r"\*\*|`|&middot;")


def plain(markdown: str) -> str:
    """A Markdown line as plain text (for run.json, the index, an e-mail subject)."""
    return re.sub(r"\s+", " ", _MD_MARKUP.sub(lambda m: "·" if m.group(0) == "&middot;" else "", markdown)).strip()


def _display_meta(obj: Any, meta: dict[str, Any]) -> None:
    from IPython.display import display

    display(obj, metadata={META_KEY: meta})


def finding(markdown: str) -> None:
    """Show one headline line of the report -- what it found -- and record it as a run *finding*.

    :func:`meshlens.reports.run_report` collects every finding into ``run.json`` (``findings``) and
    ``index.html``, so a scheduled report's e-mail or chat message is one line away. Call it for the
    answer (culprit, likely change, "nothing found"), before any chart.
    """
    from IPython.display import Markdown

    _display_meta(Markdown(markdown), {"finding": plain(markdown)})


class NoEventsError(ConfigError):
    """The window (and scope) holds no events: the report is ``empty``, not a report of zeros."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows this one line instead of a traceback (the message says all there is to say)."""
        return [f"{type(self).__name__}: {self}"]


def store_range(store: Store) -> tuple[int, int | None, int | None]:
    """(events, first ts_ns, last ts_ns) of the whole store."""
    row = store.query("SELECT count(*) AS n, min(ts_ns) AS lo, max(ts_ns) AS hi FROM events").iloc[0]
    lo = None if pd.isna(row["lo"]) else int(row["lo"])
    hi = None if pd.isna(row["hi"]) else int(row["hi"])
    return int(row["n"]), lo, hi


def _scope_text(namespace: str, service: str) -> str:
    parts = [f"namespace {namespace!r}" if namespace else "", f"service {service!r}" if service else ""]
    return " and ".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------------
# Session
# ------------------------------------------------------------------------------------------------


@dataclass
class Session:
    """What :func:`setup` gives a notebook: the read-only store, the resolved window and the scope."""

    store: Store
    window: TimeRange
    namespace: str = ""
    service: str = ""
    events: int = 0

    @property
    def start(self) -> pd.Timestamp | None:
        return self.window.start

    @property
    def end(self) -> pd.Timestamp | None:
        return self.window.end

    def effective(self) -> dict[str, Any]:
        """The parameters as the analysis uses them: the window resolved to RFC 3339 (``latest-6h`` is
        relative to the store's newest event), the store, the scope and how many events it holds."""
        return {
            "store": str(self.store.path),
            "start": ns_to_rfc3339(self.window.start_ns) if self.window.start is not None else "(first event)",
            "end": ns_to_rfc3339(self.window.end_ns) if self.window.end is not None else "(last event)",
            **({"namespace": self.namespace} if self.namespace else {}),
            **({"service": self.service} if self.service else {}),
            "events": self.events,
        }


def _effective_html(eff: dict[str, Any]) -> str:
    cells = " &middot; ".join(f"<b>{html.escape(k)}</b> <code>{html.escape(str(v if k != 'events' else f'{v:,}'))}</code>"
                              for k, v in eff.items())
    return f'<p class="meshlens-effective" style="font-size:.85em;color:#555">Effective parameters: {cells}</p>'


def setup(db: str | os.PathLike[str] | None = "", start: Any = "", end: Any = "", *, namespace: str = "",
          service: str = "", quiet: bool = False) -> Session:
    """The one call at the top of every notebook: offline charts, read-only store, resolved window.

    Shows the *effective* parameters (the window resolved, e.g. ``latest-6h`` against the store's
    newest event) and records them for the report. A window/scope with no events raises
    :class:`NoEventsError` naming the range the store does hold: the report is ``empty`` rather than a
    page of zeros (and in JupyterLab, "Run all" stops there with that message).
    """
    from meshlens.analysis import audit

    configure_altair()
    store = open_store(db)
    window = time_range(start, end, store=store)
    n = audit.count_events(store, window.start, window.end, namespace=namespace or None, service=service or None)
    session = Session(store, window, namespace or "", service or "", n)
    eff = session.effective()
    if not quiet:
        from IPython.display import HTML

        _display_meta(HTML(_effective_html(eff)), {"effective": eff})
    if n == 0:
        total, lo, hi = store_range(store)
        scope = _scope_text(namespace, service)
        held = (f"the store holds {total:,} events from {ns_to_rfc3339(lo)} to {ns_to_rfc3339(hi)}"
                if total and lo is not None and hi is not None else "the store holds no events at all")
        message = f"no events in {window.describe()}" + (f" for {scope}" if scope else "") + f"; {held}"
        if not quiet:
            from IPython.display import HTML

            _display_meta(HTML(f'<p class="meshlens-empty-window"><b>Nothing to report:</b> {html.escape(message)}.'
                               "</p>"), {"status": "empty", "reason": message})
        raise NoEventsError(message)
    return session


# ------------------------------------------------------------------------------------------------
# JupySQL
# ------------------------------------------------------------------------------------------------


def setup_sql(store_or_db: Store | str | os.PathLike[str] | None = "", *, alias: str = "meshlens") -> Store:
    """ONE call that makes ``%sql`` / ``%%sql`` cells query the store, read-only.

    JupySQL is given the store's own DuckDB connection (opened read-only on the published snapshot), so
    SQL cells can never write and never block an ingest. Returns the store so Python cells share it.
    """
    store = store_or_db if isinstance(store_or_db, Store) else open_store(store_or_db)
    if not store.read_only:
        raise ConfigError("setup_sql needs a read-only store: open it with meshlens.notebook.open_store(db)")
    try:
        from IPython import get_ipython
    except ImportError as exc:  # pragma: no cover - IPython comes with ipykernel
        raise ConfigError("setup_sql must run inside IPython/Jupyter") from exc
    ip = get_ipython()
    if ip is None:
        raise ConfigError("setup_sql must run inside IPython/Jupyter (a notebook kernel)")
    os.environ.setdefault("PLOOMBER_STATS_ENABLED", "false")
    os.environ.setdefault("PLOOMBER_VERSION_CHECK_DISABLED", "true")
    ip.run_line_magic("load_ext", "sql")
    ip.run_line_magic("config", "SqlMagic.displaycon = False")
    ip.run_line_magic("config", "SqlMagic.feedback = 0")
    ip.run_line_magic("config", "SqlMagic.displaylimit = 50")
    ip.user_ns["_meshlens_sql_con"] = store.con
    ip.run_line_magic("sql", f"_meshlens_sql_con --alias {alias}")
    _explain_read_only_writes(ip)
    return store


WRITE_SQL = re.compile(r"\b(DELETE|INSERT|UPDATE|MERGE|CREATE|DROP|ALTER|TRUNCATE|COPY|ATTACH|DETACH|VACUUM|"
                       r"CHECKPOINT)\b", re.IGNORECASE)


def read_only_message(statement: str, error: BaseException) -> str | None:
    """The one line shown when SQL tries to write to the read-only store, or None for other errors.

    Why: the store is read through views of its published snapshot, so DuckDB's own errors for a write
    ("Can only delete from base table", "attached in read-only mode") do not say what is going on.
    """
    import duckdb

    m = WRITE_SQL.search(statement or "")
    if m is None or not isinstance(error, duckdb.Error):
        return None
    return (f"the store is read-only here ({m.group(1).upper()} is not allowed): notebooks read the published "
            "snapshot and never write; change the store with the meshlens CLI (ingest, retention)")


def _explain_read_only_writes(ip: Any) -> None:
    """Turn a write's DuckDB error in an SQL cell into :func:`read_only_message` (one line, no traceback)."""
    import duckdb

    def handler(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> Any:
        history = shell.user_ns.get("_ih") or [""]
        message = read_only_message(str(history[-1]), value)
        if message is None:
            return shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        shell._showtraceback(etype, value, [f"ReadOnlyStore: {message}"])
        return None

    ip.set_custom_exc((duckdb.Error,), handler)


# ------------------------------------------------------------------------------------------------
# Triage evidence
# ------------------------------------------------------------------------------------------------


def incident_evidence(store: Store, item: dict[str, Any], window: TimeRange, *, max_rows: int = 15) -> None:
    """Show the evidence under one incident's verdict card: the symptom's requests around the onset with
    the onset and the change marked, why the root cause and the change rank first, and the incident's
    anomalies. The symptom's timeline is re-read around the incident (an hour before, half an hour after).
    """
    from meshlens import verdicts, viz
    from meshlens.analysis import rootcause

    onset = pd.Timestamp(item["onset"])
    end = pd.Timestamp(item["end"]) if item.get("end") else window.end
    lo = onset - pd.Timedelta(hours=1)
    hi = (end if end is not None else onset + pd.Timedelta(hours=1)) + pd.Timedelta(minutes=30)
    if window.start is not None:
        lo = max(lo, window.start)
    if window.end is not None:
        hi = min(hi, window.end)
    note(f"### Incident {item['rank']}: {item['symptom']}")
    rc = rootcause.analyze(store, item["symptom"], lo, hi, top=3)
    change = item.get("change")
    markers = (pd.DataFrame({"ts": [pd.Timestamp(change["ts"])], "label": [verdicts.change_text(change)],
                             "actor": [change.get("actor")]}) if change else None)
    if not rc.timeline.empty:
        _display(viz.time_series(rc.timeline_long(), y="value", color="series", onset=onset, changes=markers,
                                 y_title="requests", title=f"{item['symptom']}: requests, failed and slow requests"))
    lines = []
    cause = item.get("root_cause")
    if cause:
        lines.append(f"**Why {cause.get('target')}**:")
        lines += [f"- {e}" for e in cause.get("evidence") or []]
    if change:
        lines.append(f"**Why {change.get('target')}**:")
        lines += [f"- {e}" for e in change.get("evidence") or []]
    if lines:
        note("\n".join(lines))
    anomalies = pd.DataFrame(item.get("anomalies") or [])
    show_table(anomalies, title="the incident's anomalies", max_rows=max_rows, empty="no anomalies listed")
