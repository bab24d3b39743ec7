"""CLI commands for reports, the schedule and JupyterLab: ``meshlens report|schedule|lab``.

A thin layer over :mod:`meshlens.reports` and :mod:`meshlens.schedule` (same names, same options), wired
into the main app by ``register(app)``. Exit codes: 0 success; 1 a report failed or was refused (its
run is still recorded); 2 bad usage or configuration (nothing ran).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from meshlens.cli.common import fail, lazy_module
from meshlens.errors import MeshlensError

# Loaded on first use: the report stack (pandas, altair, papermill, nbconvert) costs seconds to import,
# and `meshlens --help` must not pay for it.
reports = lazy_module("meshlens.reports")
schedule = lazy_module("meshlens.schedule")
notebook = lazy_module("meshlens.notebook")


def _fail(exc: MeshlensError) -> typer.Exit:
    return fail(exc)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _params_from_args(args: list[str]) -> dict[str, str]:
    """``-p KEY VALUE`` pairs (repeatable) from the extra arguments; typer has no repeatable 2-value option."""
    params: dict[str, str] = {}
    i = 0
    while i < len(args):
        if args[i] not in ("-p", "--param"):
            raise typer.BadParameter(f"unexpected argument {args[i]!r}; parameters are given as -p KEY VALUE")
        if len(args) - i < 3:
            raise typer.BadParameter(f"{args[i]} needs a KEY and a VALUE (e.g. -p start -24h)")
        params[args[i + 1]] = args[i + 2]
        i += 3
    return params


def report_run(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Report name (see `meshlens report list`) or path to a .ipynb.")],
    db: Annotated[str, typer.Option("--db", help="DuckDB store to read (opened read-only).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: runs go to OUT/NAME/<UTC time>/.")],
    show_code: Annotated[bool, typer.Option("--show-code", help="Include code cells in the HTML.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Per-cell timeout in seconds.")] = 600,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")] = False,
) -> None:
    """Execute a notebook with papermill and write an offline HTML report plus the executed notebook.

    Notebook parameters: -p KEY VALUE, repeatable (e.g. -p start -24h -p service reviews); see
    `meshlens report list` for each notebook's parameters.
    """
    params = _params_from_args(list(ctx.args))
    try:
        result = reports.run_report(name, db, params, out, hide_code=not show_code, timeout_s=timeout)
    except MeshlensError as exc:
        raise _fail(exc) from None
    if as_json:
        _print_json(result.as_dict())
    else:
        typer.echo(f"{result.name}: {result.status} in {result.duration_s:.1f} s")
        for line in result.findings:
            typer.echo(f"  - {line}")
        if result.error:
            typer.echo(f"  {result.error}", err=True)
        if result.html:
            typer.echo(f"  {result.html}")
        typer.echo(f"  index: {Path(out) / reports.INDEX_FILE}")
    raise typer.Exit(0 if result.ok else 1)


def report_list(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List the report notebooks and their parameters."""
    rows = []
    for name, path in sorted(reports.list_notebooks().items(), key=lambda kv: reports.report_sort_key(kv[0])):
        try:
            params = reports.notebook_parameters(path)
        except MeshlensError as exc:
            params = {"(error)": {"default": None, "help": str(exc)}}
        rows.append({"name": name, "path": str(path), "parameters": params})
    if as_json:
        _print_json(rows)
        return
    if not rows:
        typer.echo(f"no report notebooks found (searched: {', '.join(map(str, reports.notebook_dirs()))})")
    for row in rows:
        typer.echo(f"{row['name']}  ({row['path']})")
        for pname, info in row["parameters"].items():
            typer.echo(f"    {pname} = {info['default']!r}  {('# ' + info['help']) if info['help'] else ''}".rstrip())


def schedule_run_due(
    config: Annotated[Path, typer.Option("--config", help="Schedule file (TOML or YAML).")],
    force: Annotated[bool, typer.Option("--force", help="Run every enabled report now, due or not.")] = False,
    only: Annotated[list[str] | None, typer.Option("--only", help="Only this report (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was done as JSON.")] = False,
) -> None:
    """Run the reports that are due, once (call it from cron or a Kubernetes CronJob)."""
    try:
        result = schedule.run_due(config, force=force, only=only or None)
    except MeshlensError as exc:
        raise _fail(exc) from None
    if as_json:
        _print_json(result.as_dict())
    else:
        for o in result.outcomes:
            line = f"{o.name}: {o.action}" + (f" -> {o.status}" if o.status else "")
            typer.echo(line + (f" ({o.html})" if o.html else ""))
            if o.error:
                typer.echo(f"  {o.error}", err=o.failed)
        for index in result.index:
            typer.echo(f"index: {index}")
    raise typer.Exit(result.exit_code)


def schedule_serve(
    config: Annotated[Path, typer.Option("--config", help="Schedule file (TOML or YAML); re-read each cycle.")],
) -> None:
    """Keep running: run due reports, sleep until the next cron slot, repeat (stop with SIGTERM/Ctrl-C)."""

    def report(result: schedule.DueResult) -> None:
        for o in result.outcomes:
            if o.action == "ran":
                typer.echo(f"{result.now} {o.name}: {o.status}" + (f" ({o.error})" if o.error else ""))

    try:
        code = schedule.serve(config, on_cycle=report)
    except MeshlensError as exc:
        raise _fail(exc) from None
    raise typer.Exit(code)


LAB_DIR = "meshlens-notebooks"
"""Default working copy for ``meshlens lab``, in the current directory (ignored by git in a checkout)."""


def _source_dirs() -> list[Path]:
    """Directories holding the shipped notebooks, which JupyterLab must never save into."""
    dirs = [Path(str(d)).resolve() for d in reports.notebook_dirs()]
    root = notebook.repo_root()
    if root is not None:
        dirs.append((root / "notebooks").resolve())
    return dirs


def lab_dir(target: Path | None = None, *, refresh: bool = False) -> tuple[Path, list[str], list[str]]:
    """Prepare the working copy JupyterLab opens: ``(directory, copied, kept)``.

    Why a copy: JupyterLab autosaves every notebook it opens (outputs included), so opening the tracked
    ``notebooks/`` (or site-packages) would dirty the sources with outputs and edits. The shipped
    notebooks are copied into ``target`` (default ``./meshlens-notebooks``); a copy that already exists is
    kept -- it holds the analyst's work -- unless ``refresh`` replaces it with the shipped version.
    """
    directory = (target if target is not None else Path.cwd() / LAB_DIR).expanduser().resolve()
    if directory in _source_dirs():
        raise MeshlensError(f"--dir {directory} holds the shipped notebooks; JupyterLab would autosave into "
                            "them. Pick another directory (the default is ./meshlens-notebooks)")
    directory.mkdir(parents=True, exist_ok=True)
    copied, kept = [], []
    for name, path in sorted(reports.list_notebooks().items(), key=lambda kv: reports.report_sort_key(kv[0])):
        dest = directory / f"{name}.ipynb"
        if dest.exists() and not refresh:
            kept.append(name)
            continue
        shutil.copyfile(path, dest)
        copied.append(name)
    return directory, copied, kept


def lab(
    db: Annotated[str | None, typer.Option("--db", help="Store the notebooks use by default ($MESHLENS_DB).")] = None,
    notebook_dir: Annotated[Path | None, typer.Option(
        "--dir", help=f"Working copy to open (default ./{LAB_DIR}); the shipped notebooks are copied into it.")] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Overwrite existing copies with the shipped "
                                                            "notebooks.")] = False,
    extra: Annotated[list[str] | None, typer.Argument(help="Extra arguments for jupyter lab (after --).")] = None,
) -> None:
    """Open JupyterLab on a working copy of the meshlens notebooks with the store configured (needs the
    lab extra). The tracked notebooks are never opened, so autosave cannot write into them."""
    if importlib.util.find_spec("jupyterlab") is None:
        typer.echo("error: JupyterLab is not installed; install it with: pip install 'meshlens[lab]' "
                   "(in a checkout: make lab)", err=True)
        raise typer.Exit(2)
    env = dict(os.environ)
    if db:
        path = Path(db).expanduser().resolve()
        if not path.exists() and not Path(str(path) + ".snapshot").exists():
            typer.echo(f"error: store {str(path)!r} does not exist; ingest into it first", err=True)
            raise typer.Exit(2)
        env["MESHLENS_DB"] = str(path)
    try:
        directory, copied, kept = lab_dir(notebook_dir, refresh=refresh)
    except MeshlensError as exc:
        raise _fail(exc) from None
    if kept:
        typer.echo(f"kept your copies of {', '.join(kept)} (--refresh replaces them with the shipped versions)")
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={directory}", *(extra or [])]
    typer.echo(f"opening JupyterLab on {directory}" + (f" with MESHLENS_DB={env['MESHLENS_DB']}" if db else ""))
    raise typer.Exit(subprocess.call(cmd, env=env))


def register(app: typer.Typer) -> None:
    """Add ``report``, ``schedule`` and ``lab`` to the main meshlens app."""
    report_app = typer.Typer(help="Run notebooks as offline HTML reports.", no_args_is_help=True)
    report_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        report_run)
    report_app.command("list")(report_list)
    schedule_app = typer.Typer(help="Run reports on a cron schedule.", no_args_is_help=True)
    schedule_app.command("run-due")(schedule_run_due)
    schedule_app.command("serve")(schedule_serve)
    app.add_typer(report_app, name="report")
    app.add_typer(schedule_app, name="schedule")
    app.command("lab")(lab)
