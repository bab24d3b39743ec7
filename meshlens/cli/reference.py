"""docs/cli.md, generated from the command tree: ``python -m meshlens.cli.reference > docs/cli.md``.

A test compares the file with this output (as docs/schema.md is checked against the schema), so the
reference cannot drift from what the commands accept.
"""

from __future__ import annotations

from typing import Any

import typer

HEADER = """# Command-line reference

Generated from the commands by `python -m meshlens.cli.reference > docs/cli.md` (a test checks it is
current). Every command has `--help`.

## Exit codes (every command)

| code | meaning |
|---|---|
| 0 | done |
| 1 | the data or the servers said no: unreachable or refusing server, credentials refused, a report that failed, a source that could not be read |
| 2 | the command line or a config file is wrong: unknown option or format, bad time or duration, a `--db` that does not exist for a reading command, a secret given as a plain argument |
| 130 | interrupted (Ctrl-C): what was stored before is kept; re-run to continue |

An expected failure prints one line on stderr, `meshlens: error: ...`, saying what was wrong and
what to do.

## Conventions

- Times (`--from`, `--to`, notebook `start`/`end`, schedules): RFC 3339 (`2024-05-01T10:00:00Z`),
  Unix seconds or nanoseconds, `now`, relative to now (`-24h`, `now-2h`) or to the store's newest
  event (`latest`, `latest-6h`). `--since 2h` is a range ending at `--to` (default now).
- Secrets are never plain arguments: `--password`/`--bearer-token` take a reference, `env:VAR`,
  `file:PATH` or `keyring:SERVICE/USER`; the sources also read their usual environment variables
  (`LOKI_PASSWORD`, `ES_PASSWORD`, ...).
- `--json` prints a machine-readable result; its fields are a contract.
"""


# typer builds click-like command objects (its own vendored click in newer releases), so the tree is
# read by attribute, not by isinstance against the click package.
def _walk(cmd: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    out = [(path, cmd)]
    if hasattr(cmd, "commands"):
        for name in sorted(cmd.commands):
            out += _walk(cmd.commands[name], [*path, name])
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type_name(p: Any) -> str:
    """``int``, ``float``, ``path``, ``text``... from the annotation typer read the parameter from."""
    desc = getattr(p, "type_descriptor", None)
    ann = getattr(desc, "annotation", None) if desc is not None else getattr(getattr(p, "type", None), "name", None)
    name = getattr(ann, "__name__", str(ann or "text"))
    return {"str": "text", "Path": "path", "bool": "flag", "list": "text (repeatable)"}.get(name, name)


def _param_row(p: Any) -> str:
    if p.param_type_name == "option":
        names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        kind = "flag" if p.is_flag and not p.secondary_opts else _type_name(p)
        default = p.default
        shown = "" if default in (None, False, (), []) or callable(default) else f"`{default}`"
        req = "yes" if p.required else ""
        return f"| {names} | {kind} | {req} | {shown} | {_cell(p.help or '')} |"
    arg = p.name.upper()
    return f"| `{arg}` (argument) | {_type_name(p)} | {'yes' if p.required else ''} | | |"


def markdown(app: typer.Typer | None = None) -> str:
    """The whole reference as Markdown."""
    if app is None:
        from meshlens.cli import app as main_app

        app = main_app
    root = typer.main.get_command(app)
    parts = [HEADER]
    for path, cmd in _walk(root, ["meshlens"]):
        if cmd.hidden or len(path) == 1:
            continue
        parts.append(f"## `{' '.join(path)}`\n")
        if cmd.help:
            parts.append(" ".join(cmd.help.split()) + "\n")
        if hasattr(cmd, "commands"):
            subs = ", ".join(f"`{n}`" for n in sorted(cmd.commands))
            parts.append(f"Commands: {subs}.\n")
            continue
        params = [p for p in cmd.params if p.name != "help"]
        if params:
            parts.append("| option | type | required | default | meaning |\n|---|---|---|---|---|")
            parts.append("\n".join(_param_row(p) for p in params) + "\n")
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
