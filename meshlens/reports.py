"""Run a notebook as a report: papermill executes it, nbconvert writes a self-contained HTML page.

``run_report("mesh_audit", db, {"start": "-24h"}, "reports/")`` writes
``reports/mesh_audit/<UTC timestamp>/`` holding ``report.html`` (code hidden by default), the executed
``mesh_audit.ipynb`` and ``run.json`` (parameters, status, timings), then refreshes
``reports/index.html``. The scheduler (:mod:`meshlens.schedule`) and ``meshlens report run`` both come
through here, so a scheduled report and a hand-run one are the same thing.

Finding notebooks (source checkout and installed package)
---------------------------------------------------------
A report name is a notebook's file stem. :func:`find_notebook` looks, in order, in: an explicit path;
the directories in ``$MESHLENS_NOTEBOOKS`` (``os.pathsep``-separated, for your own notebooks); the
source checkout's ``notebooks/`` (the canonical copies, edited there); and the installed package's
``meshlens/notebooks/`` (the same files packaged into the wheel as package data).

Parameters
----------
A notebook declares its parameters in the cell tagged ``parameters`` (contract in
:mod:`meshlens.notebook`). :func:`resolve_parameters` rejects unknown names (a typo must not silently run
the default), coerces command-line strings to the type of the default, makes ``db`` absolute, and turns
relative times in ``start``/``end`` (and ``*_start``/``*_end``) -- ``now``, ``-24h``, ``now-2h`` -- into
RFC 3339 at the run's reference time, so the executed notebook and the index show the exact window.
``latest``-relative times are left for the notebook, which resolves them against the store.

Offline HTML
------------
The page loads nothing from the network: nbconvert's lab template is extended to drop require.js,
MathJax, mermaid and the widget manager (all CDN scripts), and to inline vega-embed from vl-convert once;
each chart already carries a static SVG (see :mod:`meshlens.notebook`) that the inlined script upgrades
to an interactive view.

Credentials (never in a report)
-------------------------------
* Parameters named like a credential (password, token, secret, api_key, ...) are refused before
  anything runs, as is any parameter whose value equals a configured secret.
* The kernel runs with credential variables removed from its environment (see :func:`secret_values`).
* Before anything is written, the executed notebook and the HTML are scanned for every configured
  secret value (raw, JSON-, HTML-, URL- and base64-encoded, and ``user:password`` in base64). A hit
  refuses the report: no HTML or notebook is written, ``run.json`` records ``refused`` and names the
  variable (never the value). This catches leaks through data too (a token logged in a URL).

Status, findings, empty windows
-------------------------------
A run's ``status`` is ``ok``, ``empty``, ``failed`` or ``refused``. ``empty``: the window/scope held no
events (:func:`meshlens.notebook.setup` raised :class:`~meshlens.notebook.NoEventsError`); the page
says so and names the range the store does hold -- never a green page of zeros. A failing notebook
still produces its HTML, with papermill's banner linking to the error cell, the one-line cause first
and the traceback folded; the result records ``failed`` and the exception. A cell that ran into the
cell timeout is ``failed`` even if its reply arrived at the very end.

``findings`` (in the result, ``run.json`` and ``index.html``) are the report's headline lines, recorded
by the notebook with :func:`meshlens.notebook.finding`; ``effective`` holds the parameters as the
analysis used them (the window resolved against the store).

Why a custom kernel client (the explore report's "600 s and still ok")
----------------------------------------------------------------------
jupyter_client's ``Session.send`` writes to an asyncio socket through a *blocking shadow* of it. A
libzmq send also processes the socket's pending commands, which resets the socket's edge-triggered
ZMQ_FD -- so when the kernel's ``execute_reply`` has just arrived, the asyncio poller waiting for it
never wakes, and nbclient only finds the reply when the poll times out (``poll(0)`` at the deadline),
the whole cell timeout later, as a success. nbclient sends on the shell channel during a cell only for
ipywidgets ``Output`` widgets (its output-widget mimic syncs every captured output back to the kernel),
which is why only the explorer hit it, intermittently. :class:`ReportKernelClient` sends shell messages
through the asyncio socket itself, which re-checks the socket's events after each send.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import copy
import html
import io
import json
import os
import re
import shutil
import tempfile
import time
import tokenize
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets import DottedObjectName, Type

from meshlens import notebook as nbhelp
from meshlens.errors import ConfigError, MeshlensError
from meshlens.timeutil import ns_to_rfc3339, parse_time_ns

NOTEBOOKS_ENV = "MESHLENS_NOTEBOOKS"
SECRET_ENV_LIST = "MESHLENS_SECRET_ENV"
RUN_FILE = "run.json"
HTML_FILE = "report.html"
INDEX_FILE = "index.html"
OK_STATUSES = ("ok", "empty")
REPORT_ORDER = ("triage",)
"""Reports listed first (the landing page), before the others in name order."""
RUN_DIR_RE = re.compile(r"^\d{8}T\d{6}Z(-\d+)?$")
SAFE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

DEFAULT_SECRET_ENV: tuple[str, ...] = (
    "LOKI_PASSWORD", "LOKI_BEARER_TOKEN", "LOKI_BEARER_TOKEN_FILE",
    "ES_PASSWORD", "ES_API_KEY", "ES_BEARER_TOKEN", "ES_CLOUD_AUTH",
    "ELASTIC_PASSWORD", "ELASTICSEARCH_PASSWORD", "ELASTICSEARCH_API_KEY", "ELASTICSEARCH_BEARER_TOKEN",
    "OPENSEARCH_PASSWORD", "OPENSEARCH_API_KEY",
    "MESHLENS_ES_PASSWORD", "MESHLENS_ES_API_KEY", "MESHLENS_LOKI_PASSWORD", "MESHLENS_LOKI_TOKEN",
)
"""Credential variables the sources read; scanned for and removed from the kernel's environment."""

SECRET_NAME_RE = re.compile(
    r"(^|[_\W])(PASS|PASSWORD|PASSWD|PASSPHRASE|TOKEN|SECRET|API_?KEY|APIKEY|CREDENTIALS?|ACCESS_KEY|"
    r"PRIVATE_KEY|AUTH)([_\W]|$)",
    re.IGNORECASE,
)
"""Any other environment variable whose name looks like a credential is treated as one too."""
MIN_SECRET_LEN = 4          # configured names: shorter values cannot be searched for meaningfully
MIN_PATTERN_SECRET_LEN = 8  # names found by pattern: avoid refusing reports over "true" or "8080"
MAX_SECRET_FILE = 64 * 1024

CONTENT_TEMPLATE = "meshlens_report.html.j2"
_TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}
<script type="text/javascript">{{ resources.meshlens.vega_bundle }}</script>
<script type="text/javascript">{{ resources.meshlens.upgrade_js }}</script>
{%- endblock html_head_js -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block extra_css %}<style type="text/css">{{ resources.meshlens.css }}</style>{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
{{ resources.meshlens.banner }}
{%- endblock body_header -%}
{%- block data_widget_view scoped -%}
<div class="meshlens-widget-note jp-OutputArea-output">Interactive controls: open this notebook in
JupyterLab (<code>meshlens lab</code>) to use them.</div>
{%- endblock data_widget_view -%}
"""
_CSS = """
.meshlens-banner { font-family: var(--jp-ui-font-family, sans-serif); margin: 1em 0 1.5em; padding: .8em 1em;
  border-left: 6px solid #4c78a8; background: #f5f7fa; }
.meshlens-banner.failed, .meshlens-banner.refused { border-left-color: #d62728; background: #fdf0f0; }
.meshlens-banner h1 { margin: 0 0 .3em; font-size: 1.5em; }
.meshlens-banner table { border-collapse: collapse; font-size: .9em; }
.meshlens-banner td { padding: .1em .8em .1em 0; vertical-align: top; }
.meshlens-banner ul.meshlens-findings { margin: .4em 0 .6em; padding-left: 1.2em; font-size: 1.05em; }
.meshlens-banner .meshlens-reason, .meshlens-banner .meshlens-error-line { font-size: 1.05em; }
.meshlens-banner.empty { border-left-color: #e6a700; background: #fffaf0; }
.meshlens-table-wrap { overflow-x: auto; max-width: 100%; }
.jp-RenderedHTMLCommon table.meshlens-table { table-layout: auto; font-size: .85em; margin: 0; }
.jp-RenderedHTMLCommon .meshlens-table th, .jp-RenderedHTMLCommon .meshlens-table td { text-align: left;
  vertical-align: top; white-space: normal; overflow-wrap: break-word; max-width: none; }
.meshlens-error details pre { white-space: pre-wrap; font-size: .85em; }
.meshlens-error-cause { color: #b00; }
.meshlens-verdict { border: 1px solid #ccd; border-left: 6px solid #d62728; border-radius: 4px; padding: .6em 1em;
  margin: .8em 0; background: #fff; }
.meshlens-verdict.none { border-left-color: #4c78a8; }
.meshlens-verdict h3 { margin: 0 0 .3em; }
.meshlens-verdict dl { display: grid; grid-template-columns: max-content 1fr; gap: .15em 1em; margin: .3em 0; }
.meshlens-verdict dt { font-weight: bold; } .meshlens-verdict dd { margin: 0; }
.meshlens-widget-note { color: #666; font-style: italic; }
"""


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class ReportResult:
    """What one report run did. ``status`` is ``ok``, ``empty`` (no events in the window/scope; the page
    says which range the store holds), ``failed`` (notebook error or cell timeout; HTML still written) or
    ``refused`` (output contained a secret; nothing but ``run.json`` written). ``findings``: the report's
    headline lines; ``effective``: its parameters as the analysis used them."""

    name: str
    notebook: str
    status: str
    run_dir: str
    parameters: dict[str, Any]
    requested: dict[str, Any]
    started_at: str
    finished_at: str
    duration_s: float
    html: str | None = None
    ipynb: str | None = None
    error: str | None = None
    findings: list[str] = field(default_factory=list)
    effective: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """The run did its job: ``ok``, or ``empty`` (an honest "no data in this window")."""
        return self.status in OK_STATUSES

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Notebooks
# ------------------------------------------------------------------------------------------------


def notebook_dirs() -> list[Path]:
    """Where report notebooks are looked up, in order (see the module docstring)."""
    dirs = [Path(p).expanduser() for p in os.environ.get(NOTEBOOKS_ENV, "").split(os.pathsep) if p.strip()]
    root = nbhelp.repo_root()
    if root is not None:
        dirs.append(root / "notebooks")
    packaged = resources.files("meshlens") / "notebooks"
    if packaged.is_dir():
        dirs.append(Path(str(packaged)))
    return [d for d in dirs if d.is_dir()]


def list_notebooks() -> dict[str, Path]:
    """Report name -> notebook path; an earlier directory wins over a later one with the same name."""
    found: dict[str, Path] = {}
    for d in notebook_dirs():
        for p in sorted(d.glob("*.ipynb")):
            if not p.name.startswith(".") and ".ipynb_checkpoints" not in p.parts:
                found.setdefault(p.stem, p)
    return found


def find_notebook(name_or_path: str | os.PathLike[str]) -> Path:
    """Resolve a report name (``mesh_audit``) or a notebook path to an existing notebook file."""
    text = str(name_or_path)
    p = Path(text).expanduser()
    if p.suffix == ".ipynb" or os.sep in text:
        if p.is_file():
            return p.resolve()
        raise ConfigError(f"notebook {text!r} does not exist")
    found = list_notebooks()
    if text in found:
        return found[text]
    where = ", ".join(str(d) for d in notebook_dirs()) or "(no notebook directory found)"
    raise ConfigError(
        f"no report notebook named {text!r}; known: {', '.join(sorted(found)) or 'none'} (searched {where}; "
        f"add directories with ${NOTEBOOKS_ENV})"
    )


def notebook_parameters(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The notebook's ``parameters`` cell: name -> ``{"default": value, "help": trailing comment}``.

    Parsed with :mod:`ast` (papermill's own inspector gives up on a line whose comment holds ``=``).
    Only ``name = <literal>`` assignments count; anything else in the cell is an error, since the
    scheduler must know every parameter's type.
    """
    try:
        nb = nbformat.read(str(path), as_version=4)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read notebook {str(path)!r}: {exc}") from exc
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise ConfigError(f"notebook {str(path)!r} has no cell tagged `parameters`; see meshlens.notebook")
    source = cells[0].source
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ConfigError(f"the parameters cell of {str(path)!r} is not valid Python: {exc}") from exc
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    out: dict[str, dict[str, Any]] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if not isinstance(target, ast.Name):
            raise ConfigError(f"the parameters cell of {str(path)!r} may only hold `name = literal` lines "
                              f"(line {node.lineno})")
        try:
            default = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"parameter {target.id!r} of {str(path)!r} must default to a literal "
                              f"(line {node.lineno})") from None
        out[target.id] = {"default": default, "help": comments.get(node.lineno, "")}
    return out


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

TIME_PARAM_RE = re.compile(r"^(start|end|.+_(start|end))$")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Command-line strings take the type of the parameter's default (int, float, bool, list...)."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            low = value.strip().lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list | dict | tuple):
            parsed = json.loads(value)
            if not isinstance(parsed, type(default)):
                raise ValueError(value)
            return parsed
    except ValueError:
        raise ConfigError(
            f"parameter {name!r}: {value!r} is not a valid {type(default).__name__} (default {default!r})"
        ) from None
    return value


def _resolve_time(name: str, value: Any, now_ns: int) -> Any:
    if not isinstance(value, str) or not value.strip() or value.strip().startswith("latest"):
        return value
    try:
        ns = parse_time_ns(value, now_ns=now_ns)
    except ConfigError as exc:
        raise ConfigError(f"parameter {name!r}: {exc}") from None
    relative = value.strip().startswith(("now", "-", "+"))
    return ns_to_rfc3339(ns) if relative else value


def check_parameter_names(params: Mapping[str, Any], secrets: Mapping[str, str] | None = None) -> None:
    """Refuse credential-like parameter names, and values equal to a configured secret."""
    for name, value in params.items():
        if SECRET_NAME_RE.search(name):
            raise ConfigError(
                f"parameter {name!r} looks like a credential; credentials are never notebook parameters. "
                "Sources read them from the environment (e.g. LOKI_PASSWORD) and reports only read the store."
            )
        for var, secret in (secrets or {}).items():
            if isinstance(value, str) and secret and value == secret:
                raise ConfigError(f"parameter {name!r} holds the value of the secret ${var}; refusing to run")


def resolve_parameters(
    path: str | os.PathLike[str], db: str | os.PathLike[str] | None, params: Mapping[str, Any] | None,
    *, now: datetime | None = None, secrets: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate and resolve the parameters to inject (see the module docstring). Returns them all."""
    declared = notebook_parameters(path)
    given = dict(params or {})
    check_parameter_names(given, secrets)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown} for notebook {Path(path).name}; it takes: {', '.join(declared)}"
        )
    if "db" not in declared:
        raise ConfigError(f"notebook {Path(path).name} has no `db` parameter; see meshlens.notebook for the contract")
    if db is not None and str(db):
        given["db"] = str(db)
    if given.get("db"):
        given["db"] = str(Path(str(given["db"])).expanduser().resolve())
    now_ns = int((now or datetime.now(UTC)).timestamp() * 1_000_000_000)
    resolved = {}
    for name, value in given.items():
        value = _coerce(name, value, declared[name]["default"])
        if TIME_PARAM_RE.match(name):
            value = _resolve_time(name, value, now_ns)
        resolved[name] = value
    return resolved


# ------------------------------------------------------------------------------------------------
# Secrets
# ------------------------------------------------------------------------------------------------


def _secret_names(extra: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(configured names, names matched by pattern) currently set in the environment."""
    configured = list(DEFAULT_SECRET_ENV) + list(extra)
    configured += [n.strip() for n in os.environ.get(SECRET_ENV_LIST, "").split(",") if n.strip()]
    pattern = [n for n in os.environ if n not in configured and SECRET_NAME_RE.search(n)]
    return [n for n in dict.fromkeys(configured) if n in os.environ], pattern


def _read_secret_file(path: str) -> str | None:
    try:
        p = Path(path)
        if p.is_file() and p.stat().st_size <= MAX_SECRET_FILE:
            return p.read_text(errors="replace").strip() or None
    except OSError:
        return None
    return None


def secret_values(extra_names: Iterable[str] = ()) -> dict[str, str]:
    """Secret label -> value for everything that must never appear in a report.

    Sources: :data:`DEFAULT_SECRET_ENV`, names in ``$MESHLENS_SECRET_ENV`` (comma-separated) and
    ``extra_names``, plus any variable whose name matches :data:`SECRET_NAME_RE`. ``*_FILE`` variables
    contribute the file's content. A ``*PASSWORD`` with a sibling ``*USERNAME``/``*USER`` also adds the
    base64 ``user:password`` of HTTP basic auth.
    """
    configured, pattern = _secret_names(extra_names)
    out: dict[str, str] = {}
    for names, min_len in ((configured, MIN_SECRET_LEN), (pattern, MIN_PATTERN_SECRET_LEN)):
        for name in names:
            value = os.environ.get(name, "")
            if name.endswith("_FILE"):
                content = _read_secret_file(value)
                if content and len(content) >= min_len:
                    out[f"{name} (file content)"] = content
                continue
            if len(value.strip()) >= min_len and value.strip().lower() not in _TRUE | _FALSE:
                out[name] = value.strip()
    for name, value in list(out.items()):
        if name.upper().endswith(("PASSWORD", "PASSWD")):
            prefix = name[: name.upper().rfind("PASS")]
            for user_var in (prefix + "USERNAME", prefix + "USER"):
                user = os.environ.get(user_var)
                if user:
                    out[f"{name} (basic auth with {user_var})"] = base64.b64encode(f"{user}:{value}".encode()).decode()
    return out


def _variants(value: str) -> set[str]:
    forms = {
        value,
        json.dumps(value)[1:-1],
        html.escape(value),
        html.escape(value, quote=False),
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        base64.b64encode(value.encode()).decode().rstrip("="),
    }
    forms |= {json.dumps(f)[1:-1] for f in list(forms)}  # e.g. an HTML-escaped value inside notebook JSON
    return {f for f in forms if f}


def find_secrets(text: str, secrets: Mapping[str, str]) -> list[str]:
    """Labels of the secrets that occur in ``text`` in any of their encodings."""
    return [label for label, value in secrets.items() if any(v in text for v in _variants(value))]


def scan_notebook(nb: nbformat.NotebookNode, secrets: Mapping[str, str]) -> list[str]:
    """Where secrets occur in a notebook: ``"<label> in cell N (In [k])"`` -- N counts from 1 over the
    executed notebook's cells (papermill's injected-parameters cell included); sources, outputs, metadata."""
    hits = []
    for i, cell in enumerate(nb.cells, start=1):
        count = cell.get("execution_count")
        where = f"cell {i}" + (f" (In [{count}])" if count else "")
        for label in find_secrets(json.dumps(cell), secrets):
            hits.append(f"{label} in {where}")
    for label in find_secrets(json.dumps(nb.metadata), secrets):
        hits.append(f"{label} in notebook metadata")
    return hits


def scrubbed_env(extra_names: Iterable[str] = (), base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) minus every credential variable -- the report
    kernel's environment."""
    configured, pattern = _secret_names(extra_names)
    drop = set(configured) | set(pattern)
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if k not in drop and not SECRET_NAME_RE.search(k)}


class ReportShellChannel(AsyncZMQSocketChannel):
    """The shell channel, sending through the asyncio socket (see "Why a custom kernel client" in the
    module docstring): a send can no longer swallow the wake-up for a reply that has just arrived."""

    def send(self, msg: dict[str, Any]) -> None:  # type: ignore[override]
        """Inside the running event loop (nbclient's cell execution, where a poll may be waiting): send
        through the asyncio socket. Outside it (papermill's synchronous ``kernel_info()``) nothing can
        be waiting -- the next poll checks the socket's events first -- so the plain send is safe, and
        needs no event loop."""
        assert self.socket is not None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            super().send(msg)
            return
        self.socket.send_multipart(self.session.serialize(msg))  # a Future, already done in practice


class ReportKernelClient(AsyncKernelClient):
    """The kernel client papermill drives for a report: :class:`ReportShellChannel` for the shell."""

    shell_channel_class = Type(ReportShellChannel)  # type: ignore[assignment]


class ScrubbedKernelManager(AsyncKernelManager):
    """A kernel manager that starts the kernel without credential variables in its environment, and
    sends the kernel process's own log (start-up warnings, shutdown noise) to ``stderr_path`` instead of
    the scheduler's terminal; cell output is unaffected (it travels over the kernel protocol)."""

    extra_secret_names: tuple[str, ...] = ()
    stderr_path: str | None = None
    client_class = DottedObjectName("meshlens.reports.ReportKernelClient")
    client_factory = Type(klass=ReportKernelClient)

    async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
        kw["env"] = scrubbed_env(self.extra_secret_names, kw.get("env"))
        if self.stderr_path is None:
            await super().start_kernel(**kw)
            return
        with open(self.stderr_path, "ab") as err:  # Popen duplicates the descriptor
            await super().start_kernel(stderr=err, **kw)


def _kernel_manager_for(extra_names: Iterable[str], stderr_path: Path | None) -> type[ScrubbedKernelManager]:
    return type("ConfiguredScrubbedKernelManager", (ScrubbedKernelManager,),
                {"extra_secret_names": tuple(extra_names), "stderr_path": str(stderr_path) if stderr_path else None})


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------


def _banner(title: str, status: str, started: str, params: Mapping[str, Any], error: str | None,
            findings: Iterable[str] = (), effective: Mapping[str, Any] | None = None) -> str:
    """The page header: the answer first (status, the findings or the one-line cause), then the parameters."""
    shown = dict(params)
    for k, v in (effective or {}).items():  # what the analysis used, e.g. latest-6h resolved
        if k in ("start", "end") and str(shown.get(k, "")) != str(v):
            shown[k] = f"{shown.get(k) or '(default)'} = {v}" if shown.get(k) else str(v)
    if effective and "events" in effective:
        shown["events in window"] = f"{int(effective['events']):,}"
    rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(repr(v) if not isinstance(v, str) else v or '(default)')}</td></tr>"
        for k, v in shown.items()
    )
    lines = [html.escape(f) for f in findings]
    answer = ""
    if status == "empty":
        answer = f'<p class="meshlens-reason"><b>Nothing to report:</b> {lines[0] if lines else "no events"}.</p>'
    elif lines:
        answer = '<ul class="meshlens-findings">' + "".join(f"<li>{x}</li>" for x in lines) + "</ul>"
    err = f'<p class="meshlens-error-line"><b>Error:</b> {html.escape(_one_line(error))}</p>' if error else ""
    return (
        f'<header class="meshlens-banner {html.escape(status)}" data-status="{html.escape(status)}">'
        f"<h1>{html.escape(title)}</h1><p>status <b>{html.escape(status)}</b> &middot; run at "
        f"{html.escape(started)}</p>{err}{answer}<details class=\"meshlens-params\"><summary>parameters</summary>"
        f"<table>{rows}</table></details></header>"
    )


def _one_line(text: str | None) -> str:
    """The first meaningful line of an error (papermill's messages span many lines)."""
    for line in (text or "").splitlines():
        if line.strip() and not set(line.strip()) <= set("-="):
            return line.strip()
    return (text or "").strip()


def _folded_error(output: Mapping[str, Any]) -> dict[str, Any]:
    """An error output as HTML: the one-line cause first, the traceback folded under it."""
    from nbconvert.filters.ansi import ansi2html

    cause = f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"
    tb = "\n".join(output.get("traceback") or [])
    body = (f'<div class="meshlens-error"><p class="meshlens-error-cause"><b>{html.escape(_one_line(cause))}</b></p>'
            f"<details><summary>traceback</summary><pre>{ansi2html(tb)}</pre></details></div>")
    return nbformat.v4.new_output("display_data", data={"text/html": body, "text/plain": cause})


def _is_papermill_banner(cell: Mapping[str, Any]) -> bool:
    return "papermill-error-cell-tag" in cell.get("metadata", {}).get("tags", [])


def _html_notebook(nb: nbformat.NotebookNode, status: str) -> nbformat.NotebookNode:
    """The executed notebook as the HTML shows it: charts as SVG + spec for the in-page upgrade, errors
    folded; for an ``empty`` run, papermill's error banner and the cells after the stop are dropped."""
    nb = copy.deepcopy(nb)
    cells = []
    for cell in nb.cells:
        if status == "empty" and _is_papermill_banner(cell):
            continue
        outputs = []
        stop = False
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                stop = True
                if status != "empty":
                    outputs.append(_folded_error(out))
                continue
            data = out.get("data")
            if isinstance(data, dict):
                chart = nbhelp.chart_bundle_to_html(data)
                if chart is not None:
                    out["data"] = chart
            outputs.append(out)
        if cell.cell_type == "code":
            cell.outputs = outputs
        cells.append(cell)
        if stop and status == "empty":
            break
    nb.cells = cells
    return nb


def render_html(nb: nbformat.NotebookNode, *, title: str, status: str, started: str, params: Mapping[str, Any],
                error: str | None = None, hide_code: bool = True, findings: Iterable[str] = (),
                effective: Mapping[str, Any] | None = None) -> str:
    """The executed notebook as one self-contained, offline HTML page (see the module docstring)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[DictLoader({CONTENT_TEMPLATE: _TEMPLATE})],
        template_file=CONTENT_TEMPLATE,
        exclude_input=hide_code,
        exclude_input_prompt=hide_code,
        exclude_output_prompt=hide_code,
        embed_images=True,
    )
    extra = {
        "vega_bundle": nbhelp.vega_embed_bundle(),
        "upgrade_js": nbhelp.UPGRADE_JS,
        "css": _CSS,
        "banner": _banner(title, status, started, params, error, findings, effective),
    }
    nb = _html_notebook(nb, status)
    nb.metadata["title"] = title
    body, _ = exporter.from_notebook_node(nb, resources={"meshlens": extra})
    return body


@dataclass
class _Digest:
    """What an executed notebook tells the runner through output metadata (see meshlens.notebook)."""

    findings: list[str]
    effective: dict[str, Any] | None
    empty: str | None
    timed_out: str | None


def digest(nb: nbformat.NotebookNode, timeout_s: float | None = None) -> _Digest:
    """Findings, effective parameters, the empty-window reason and a cell that ran into the timeout."""
    findings: list[str] = []
    effective: dict[str, Any] | None = None
    empty: str | None = None
    timed_out: str | None = None
    for i, cell in enumerate(nb.cells, start=1):
        for out in cell.get("outputs", []):
            meta = (out.get("metadata") or {}).get(nbhelp.META_KEY) or {}
            if meta.get("finding"):
                findings.append(str(meta["finding"]))
            findings.extend(str(f) for f in meta.get("findings") or [])
            if isinstance(meta.get("effective"), dict) and effective is None:
                effective = dict(meta["effective"])
            if meta.get("status") == "empty":
                empty = str(meta.get("reason") or "no events in the window")
            if out.get("output_type") == "error" and out.get("ename") == nbhelp.NoEventsError.__name__ and not empty:
                empty = str(out.get("evalue") or "no events in the window")
        duration = (cell.get("metadata", {}).get("papermill") or {}).get("duration")
        if timeout_s and duration is not None and float(duration) >= float(timeout_s) and timed_out is None:
            count = cell.get("execution_count")
            timed_out = (f"cell {i}" + (f" (In [{count}])" if count else "")
                         + f" ran into the {timeout_s:g} s cell timeout ({float(duration):.0f} s)")
    return _Digest(findings, effective, empty, timed_out)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def _utc(dt: datetime | None) -> datetime:
    dt = dt or datetime.now(UTC)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _new_run_dir(report_dir: Path, started: datetime) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    for i in range(1000):
        d = report_dir / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise MeshlensError(f"cannot create a run directory under {report_dir}: 1000 runs in one second?")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _error_text(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        cell = getattr(exc, "exec_count", None)
        where = f" in cell [{cell}]" if cell is not None else ""
        return f"{ename}: {evalue}{where}"
    return f"{type(exc).__name__}: {exc}"


def _execute(path: Path, out_nb: Path, params: dict[str, Any], workdir: Path, timeout_s: float | None,
             secret_names: Iterable[str]) -> str | None:
    """Run the notebook with papermill; returns the error text, or None if every cell succeeded.

    When the kernel itself failed (not a cell), the end of its log is added to the error text.
    """
    import papermill

    kernel_log = workdir / "kernel.log"
    try:
        papermill.execute_notebook(
            str(path), str(out_nb), parameters=params, cwd=str(workdir), progress_bar=False, log_output=False,
            execution_timeout=timeout_s, kernel_manager_class=_kernel_manager_for(secret_names, kernel_log),
        )
    except Exception as exc:  # noqa: BLE001 - any failure of the run is recorded, never raised
        text = _error_text(exc)
        if not getattr(exc, "ename", None) and kernel_log.exists():
            tail = kernel_log.read_text(errors="replace").strip().splitlines()[-5:]
            text += (" | kernel log: " + " / ".join(tail)) if tail else ""
        return text
    return None


def run_report(
    name_or_path: str | os.PathLike[str],
    db: str | os.PathLike[str] | None,
    params: Mapping[str, Any] | None,
    out_dir: str | os.PathLike[str],
    *,
    hide_code: bool = True,
    report_name: str | None = None,
    now: datetime | None = None,
    clock: Callable[[], datetime] | None = None,
    timeout_s: float | None = 600,
    secret_env: Iterable[str] = (),
    update_index: bool = True,
) -> ReportResult:
    """Execute a report notebook and write ``out_dir/<name>/<UTC timestamp>/`` (see the module docstring).

    ``now`` is the reference time for relative parameters (the scheduler passes the cron slot);
    ``clock`` gives the wall time for the run directory and timings (injectable for tests).
    Raises :class:`ConfigError` for bad names/parameters (nothing runs); a notebook that fails or
    leaks a secret gives a result with status ``failed`` / ``refused`` instead of raising.
    """
    clock = clock or (lambda: datetime.now(UTC))
    path = find_notebook(name_or_path)
    name = report_name or path.stem
    if not SAFE_NAME_RE.fullmatch(name):
        raise ConfigError(f"report name {name!r} must be letters, digits, '.', '_' or '-'")
    secret_env = tuple(secret_env)
    secrets = secret_values(secret_env)
    requested = dict(params or {})
    started = _utc(clock())
    resolved = resolve_parameters(path, db, requested, now=_utc(now) if now else started.replace(microsecond=0),
                                  secrets=secrets)
    leaked = find_secrets(json.dumps(resolved, default=str), secrets)
    if leaked:
        raise ConfigError(f"a parameter value contains a configured secret ({', '.join(leaked)}); refusing to run")
    t0 = time.monotonic()
    started_s = started.strftime("%Y-%m-%dT%H:%M:%SZ")
    result = ReportResult(name=name, notebook=str(path), status="ok", run_dir="", parameters=resolved,
                          requested=requested, started_at=started_s, finished_at="", duration_s=0.0)
    with tempfile.TemporaryDirectory(prefix="meshlens-report-") as tmp:
        tmp_nb = Path(tmp) / path.name
        result.error = _execute(path, tmp_nb, resolved, Path(tmp), timeout_s, secret_env)
        result.status = "failed" if result.error else "ok"
        nb = nbformat.read(tmp_nb, as_version=4) if tmp_nb.exists() else None
        html_text = None
        if nb is not None:
            found = digest(nb, timeout_s)
            result.findings, result.effective = found.findings, found.effective
            if found.timed_out:
                result.status = "failed"
                result.error = found.timed_out + (f"; {result.error}" if result.error else "")
            elif found.empty:
                result.status, result.error = "empty", None
                result.findings = [found.empty, *result.findings]
            try:
                html_text = render_html(nb, title=name, status=result.status, started=started_s,
                                        params=resolved, error=result.error, hide_code=hide_code,
                                        findings=result.findings, effective=result.effective)
            except Exception as exc:  # noqa: BLE001 - a rendering failure is a failed run, recorded
                result.status, result.error = "failed", f"rendering the HTML failed: {_error_text(exc)}"
        leaks = _leaks(nb, html_text, result.error, secrets)
        run_dir = _new_run_dir(Path(out_dir) / name, started)  # created only now: a killed run leaves nothing
        result.run_dir = str(run_dir)
        if leaks:
            result.status = "refused"
            result.error = (
                "refused to write the report: its output contains configured secrets (" + "; ".join(leaks)
                + "). Find what prints them (a logged URL or header in the data?) and remove it; the values "
                "are never written anywhere."
            )
        elif nb is not None and html_text is not None:
            result.html, result.ipynb = str(run_dir / HTML_FILE), str(run_dir / path.name)
            _atomic_write(Path(result.html), html_text)
            _atomic_write(Path(result.ipynb), nbformat.writes(nb))
    result.finished_at = _utc(clock()).strftime("%Y-%m-%dT%H:%M:%SZ")
    result.duration_s = round(time.monotonic() - t0, 3)
    _atomic_write(run_dir / RUN_FILE, json.dumps(result.as_dict(), indent=2, default=str))
    if update_index:
        write_index(out_dir)
    return result


def _leaks(nb: nbformat.NotebookNode | None, html_text: str | None, error: str | None,
           secrets: Mapping[str, str]) -> list[str]:
    """Where configured secrets occur in a run's outputs (empty: safe to write)."""
    leaks = scan_notebook(nb, secrets) if nb is not None else []
    if html_text is not None:  # the inlined vega bundle is our constant code, not report content
        content = html_text.replace(nbhelp.vega_embed_bundle(), "")
        leaks += [f"{label} in the HTML" for label in find_secrets(content, secrets)]
    if error and find_secrets(error, secrets):
        leaks.append("a secret in the error message")
    return list(dict.fromkeys(leaks))


def record_failure(
    out_dir: str | os.PathLike[str], name: str, notebook: str, requested: Mapping[str, Any], error: str,
    *, started: datetime | None = None, update_index: bool = True,
) -> ReportResult:
    """Record a run that could not even start (unknown notebook, bad parameter...) so the index shows it.

    Writes only ``run.json`` (status ``failed``); parameter values or error text holding a configured
    secret are replaced by ``<redacted>``.
    """
    secrets = secret_values()
    requested = {k: "<redacted>" if find_secrets(json.dumps(v, default=str), secrets) else v
                 for k, v in requested.items()}
    if find_secrets(error, secrets):
        error = "<redacted: the error message contained a configured secret>"
    when = _utc(started)
    run_dir = _new_run_dir(Path(out_dir) / name, when)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    result = ReportResult(name=name, notebook=notebook, status="failed", run_dir=str(run_dir),
                          parameters=dict(requested), requested=dict(requested), started_at=stamp,
                          finished_at=stamp, duration_s=0.0, error=error)
    _atomic_write(run_dir / RUN_FILE, json.dumps(result.as_dict(), indent=2, default=str))
    if update_index:
        write_index(out_dir)
    return result


# ------------------------------------------------------------------------------------------------
# Index
# ------------------------------------------------------------------------------------------------


def list_runs(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every recorded run under ``out_dir`` (from each run's ``run.json``), newest first."""
    runs = []
    for run_file in Path(out_dir).glob(f"*/*/{RUN_FILE}"):
        if not RUN_DIR_RE.match(run_file.parent.name):
            continue
        try:
            info = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        info["_dir"] = run_file.parent
        runs.append(info)
    runs.sort(key=lambda r: (r.get("started_at", ""), r["_dir"].name), reverse=True)
    return runs


def _link(base: Path, run_dir: Path, target: str | None, label: str) -> str:
    """A relative link to a file of a run (found beside run.json, so a moved output tree still links)."""
    if not target or not (run_dir / Path(target).name).is_file():
        return ""
    rel = os.path.relpath(run_dir / Path(target).name, base)
    return f'<a href="{html.escape(urllib.parse.quote(rel))}">{html.escape(label)}</a>'


def report_sort_key(name: str) -> tuple[int, str]:
    """Landing-page order: :data:`REPORT_ORDER` first (``triage``), then by name."""
    return (REPORT_ORDER.index(name) if name in REPORT_ORDER else len(REPORT_ORDER), name)


def _findings_html(r: Mapping[str, Any], limit: int = 6) -> str:
    items = [str(f) for f in (r.get("findings") or [])]
    if not items:
        return ""
    more = f"<li><em>{len(items) - limit} more in the report</em></li>" if len(items) > limit else ""
    return '<ul class="findings">' + "".join(f"<li>{html.escape(f)}</li>" for f in items[:limit]) + more + "</ul>"


def _status_cell(r: Mapping[str, Any]) -> str:
    status = str(r.get("status", "?"))
    err = f'<div class="err">{html.escape(_one_line(str(r.get("error"))))}</div>' if r.get("error") else ""
    return f'<td class="status">{html.escape(status)}{err}</td>'


def write_index(out_dir: str | os.PathLike[str]) -> Path:
    """(Re)write ``out_dir/index.html``: the latest run of each report with its findings (``triage``
    first: the landing page), then every run with time, parameters, status, findings and links. No scripts."""
    base = Path(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    runs = list_runs(base)
    rows = []
    for r in runs:
        params = r.get("parameters") or {}
        shown = "<br>".join(
            f"<code>{html.escape(str(k))}</code>={html.escape(str(v))}" for k, v in params.items() if k != "db"
        )
        status = str(r.get("status", "?"))
        links = " ".join(x for x in (_link(base, r["_dir"], r.get("html"), "report"),
                                     _link(base, r["_dir"], r.get("ipynb"), "notebook")) if x)
        rows.append(
            f'<tr class="{html.escape(status)}"><td>{html.escape(str(r.get("started_at", "")))}</td>'
            f"<td>{html.escape(str(r.get('name', '')))}</td>{_status_cell(r)}"
            f"<td>{_findings_html(r, limit=3)}</td>"
            f"<td>{html.escape(str(r.get('duration_s', '')))} s</td><td>{shown}</td><td>{links}</td></tr>"
        )
    latest: dict[str, dict[str, Any]] = {}
    for r in runs:  # newest first: the first run seen of a name is its latest
        latest.setdefault(str(r.get("name", "")), r)
    cards = []
    for name in sorted(latest, key=report_sort_key):
        r = latest[name]
        status = str(r.get("status", "?"))
        link = _link(base, r["_dir"], r.get("html"), name) or html.escape(name)
        cards.append(
            f'<tr class="{html.escape(status)} latest" data-report="{html.escape(name)}"><td class="name">{link}</td>'
            f"{_status_cell(r)}<td>{_findings_html(r)}</td><td>{html.escape(str(r.get('started_at', '')))}</td></tr>"
        )
    body = "\n".join(rows) or '<tr><td colspan="7"><em>no runs yet</em></td></tr>'
    latest_body = "\n".join(cards) or '<tr><td colspan="4"><em>no runs yet</em></td></tr>'
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>meshlens reports</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }}
tr.failed td.status, tr.refused td.status {{ color: #b00; font-weight: bold; }}
tr.ok td.status {{ color: #060; }} tr.empty td.status {{ color: #8a6d00; font-weight: bold; }}
.err {{ font-weight: normal; font-size: .85em; max-width: 40em; }}
ul.findings {{ margin: 0; padding-left: 1.2em; max-width: 60em; }} td.name {{ font-weight: bold; }}
</style></head><body>
<h1>meshlens reports</h1>
<p>Generated {html.escape(datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))}.</p>
<h2>Latest</h2>
<table class="latest"><thead><tr><th>report</th><th>status</th><th>findings</th><th>time (UTC)</th></tr></thead>
<tbody>
{latest_body}
</tbody></table>
<h2>All runs</h2>
<p>Newest first.</p>
<table class="runs"><thead><tr><th>time (UTC)</th><th>report</th><th>status</th><th>findings</th><th>duration</th>
<th>parameters</th><th>links</th></tr></thead><tbody>
{body}
</tbody></table></body></html>
"""
    index = base / INDEX_FILE
    _atomic_write(index, page)
    return index


def remove_run(run_dir: str | os.PathLike[str]) -> None:
    """Delete one run directory -- only if it is really a meshlens run (named by time, with run.json)."""
    d = Path(run_dir)
    if not RUN_DIR_RE.match(d.name) or not (d / RUN_FILE).is_file():
        raise MeshlensError(f"refusing to delete {d}: not a meshlens report run directory")
    shutil.rmtree(d)
