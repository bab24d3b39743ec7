"""Seeds and checks shared by the hypothesis tests (tests/formats/test_fuzz_parsers.py) and the atheris target
(fuzz/fuzz_parsers.py): one definition of "a parser entry point behaved" for both.

The invariant, for any input: parsing yields events or rejects and never raises; every record of a
batch is in exactly one of the two outputs (events + rejects == records, each position once); the file
container layer never drops a non-blank line silently.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from meshlens.errors import MeshlensError
from meshlens.formats import containers
from meshlens.formats.base import Reject
from meshlens.formats.detect import FORMATS, Parser
from meshlens.records import RawBatch
from meshlens.sources.files import read_file

ROOT = Path(__file__).resolve().parents[2]
_SIBLING = ROOT.parent / "shared" / "samples"
SAMPLES = Path(os.environ.get("MESHLENS_SHARED_SAMPLES")
               or (_SIBLING if _SIBLING.exists() else ROOT / "tests" / "data" / "shared-samples"))
FORMAT_NAMES = sorted(FORMATS)


@lru_cache(maxsize=1)
def sample_lines() -> tuple[str, ...]:
    """Up to a few hundred real record lines (every format) to mutate."""
    out: list[str] = []
    if SAMPLES.exists():
        for f in sorted(SAMPLES.rglob("*")):
            if f.is_file() and f.suffix in (".log", ".jsonl", ".json", ".txt"):
                text = f.read_text(encoding="utf-8", errors="replace")
                out.extend(ln for ln in text.splitlines()[:40] if ln.strip())
    return tuple(out) or ('[2020-11-25T21:26:18.409Z] "GET / HTTP/1.1" 200 - via_upstream - "-" 0 1 2 3 "-" '
                          '"curl" "id" "a:1" "1.2.3.4:80" outbound|80||a 1.1.1.1:1 2.2.2.2:80 1.1.1.1:2 - d',)


@cache
def parser(fmt: str) -> Parser:
    """One parser per format for the whole process (each owns an in-memory DuckDB connection)."""
    return Parser(fmt)


def check_batch(fmt: str, lines: list[str], labels: dict[str, str] | None = None,
                ts: int | None = None) -> tuple[int, int]:
    """Parse ``lines`` with ``fmt``; assert conservation (each record in exactly one output)."""
    positions = [f"p{i}" for i in range(len(lines))]
    batch = RawBatch(source="fuzz", lines=list(lines), ts_ns=[ts] * len(lines), labels=[labels] * len(lines),
                     positions=positions)
    events, rejects = parser(fmt).parse(batch)
    got = events.column("position").to_pylist() + rejects.column("position").to_pylist()
    assert sorted(got) == sorted(positions), f"conservation broken for {fmt}: {got} vs {positions}"
    assert events.num_rows + rejects.num_rows == len(lines)
    assert all(r for r in rejects.column("reason").to_pylist()), "a reject without a reason"
    return events.num_rows, rejects.num_rows


def check_record(fmt: str, line: str) -> None:
    """One record through the Python dispatch: an event dict or :class:`Reject`; the exceptions the
    batch parser turns into rejects (``PARSER_ERRORS``) are tolerated there but reported here as bugs."""
    try:
        _name, ev = parser(fmt)._dispatch(line, {})
    except Reject as r:
        assert r.reason
        return
    assert isinstance(ev, dict)


def check_file_bytes(tmp: Path, data: bytes, name: str = "x.log", compress: bool = False) -> int:
    """Read arbitrary bytes as a file, parse every batch; no silent drop of a non-blank line."""
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    texts: list[str] = []
    n = 0
    try:
        for batch in read_file(path, batch_size=7):
            check_batch("auto", batch.texts()) if batch.reject_reasons is None else _check_prerejects(batch)
            texts.extend(batch.texts())
            n += len(batch)
    except MeshlensError:
        return n
    assert n >= 1, "a file produced no record at all (not even an 'empty file' reject)"
    kind = containers.sniff([ln for ln in data.split(b"\n")[:5]], str(path))
    if kind == "lines":
        joined = "\n".join(texts)
        for raw in data.split(b"\n"):
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            if line.strip():
                assert line.strip() in joined, f"line {line!r} vanished"
    return n


def _check_prerejects(batch: RawBatch) -> None:
    positions = [f"p{i}" for i in range(len(batch))]
    b = RawBatch(source="fuzz", lines=batch.lines, ts_ns=batch.ts_ns, labels=batch.labels, positions=positions,
                 reject_reasons=batch.reject_reasons)
    events, rejects = parser("auto").parse(b)
    assert sorted(events.column("position").to_pylist() + rejects.column("position").to_pylist()) == positions


def check_loki_response(obj: Any) -> int:
    """A saved Loki response of any shape -> records (bad parts become rejects), never an exception."""
    if not isinstance(obj, dict):
        return 0
    return sum(1 for _ in containers.loki_response_records(obj, "1"))


def check_logcli_lines(lines: list[bytes]) -> int:
    recs = list(containers.records_from_lines(lines, "x.jsonl", "logcli"))
    return len(recs)


def check_cri_lines(lines: list[bytes]) -> int:
    recs = list(containers.records_from_lines(lines, "/var/log/pods/ns_pod-abc_uid/c/0.log", "cri"))
    return len(recs)


def mutate(line: str, data: bytes) -> str:
    """Deterministic mutation of a real line driven by fuzz bytes (cut, splice, duplicate)."""
    if not data:
        return line
    i = data[0] * len(line) // 256
    op = data[-1] % 4
    junk = data[1:].decode("utf-8", errors="replace")
    if op == 0:
        return line[:i]
    if op == 1:
        return line[:i] + junk + line[i:]
    if op == 2:
        return line[:i] + line[i:][::-1]
    return json.dumps(junk) + line[i:]


def as_file(lines: list[str]) -> bytes:
    buf = io.BytesIO()
    for ln in lines:
        buf.write(ln.encode("utf-8", errors="replace") + b"\n")
    return buf.getvalue()
