"""Real records nobody on this team wrote parse the way a careful human reads them (issue 13).

Convention: one directory per family, ``tests/data/real/<family>/``, holding verbatim record files (only
formatting wrappers such as markdown fences stripped) and ``MANIFEST.yaml``, a list of::

    - file: NAME                      # a file in this directory
      source: URL                     # where the records were copied from (https://...)
      format: FORMAT-NAME             # optional: ingest with --format FORMAT-NAME instead of auto-detection
      note: ...                       # optional
      records:                        # in record order (file order; one entry per record meshlens reads)
        - event_type: request|authz|tls|authn|access|config_change
          fields: {schema_column: value, ...}   # every schema field the record states, as a human reads it
        - reject: true
          reason_contains: "..."      # a word of the reason the reject must name

The expected values come from reading the record, never from running meshlens. Each file is ingested
through the real file pipeline (``sources.files.read_file`` -> ``ingest.ingest_batches``, which is what
``ingest_files`` does) with the default filters off, so nothing is silently dropped; events and rejects
are put back in record order by their position (line number or line range) and matched to the manifest
entries in order. Values are compared field by field: timestamps as exact UTC nanoseconds, numbers as
numbers, ``null`` means the column must be NULL.

``-s`` prints the tallies per family and per format (records parsed as expected %, field accuracy %);
the tests fail below the issue's targets (>= 98% records, >= 99% fields) and on any crash.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlens import schema
from meshlens.filters import FilterConfig
from meshlens.ingest import ingest_batches
from meshlens.sources.files import read_file
from meshlens.store import Store, open_store

REAL = Path(__file__).resolve().parents[1] / "data" / "real"
RECORD_TARGET = 0.98
FIELD_TARGET = 0.99
MIN_RECORDS = 150
MIN_SOURCES = 40

# Columns a manifest may state. Not: identity/bookkeeping columns nobody reads in a record.
NOT_COMPARED = {"event_id", "source", "position", "raw", "ingested_at", "sample_weight"}
COMPARABLE = {c.name: c.type for c in schema.EVENT_COLUMNS if c.name not in NOT_COMPARED}
_URL = re.compile(r"^https?://[^\s/]+\.[^\s/]+(/\S*)?$")


def families() -> list[str]:
    return sorted(p.name for p in REAL.iterdir() if p.is_dir()) if REAL.exists() else []


def load_manifest(family: str) -> list[dict[str, Any]]:
    path = REAL / family / "MANIFEST.yaml"
    if not path.is_file():
        return []  # reported by test_manifests_are_well_formed
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, list) else []


# -- value comparison ----------------------------------------------------------------------------------
_TS = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)$")


def expected_ns(value: Any) -> int:
    """A manifest timestamp -> Unix ns. Strings must carry an explicit offset (``Z`` or ``+hh:mm``) so
    the expectation is never ambiguous; YAML-parsed datetimes without tzinfo are UTC (PyYAML converts)."""
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
    m = _TS.match(str(value).strip())
    if not m:
        raise ValueError(f"manifest timestamp {value!r} is not RFC 3339 with an offset")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    base = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC)
    ns = int(base.timestamp()) * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        ns -= sign * (int(tz[1:3]) * 3600 + int(tz[-2:]) * 60) * 1_000_000_000
    return ns


def same(column: str, expected: Any, actual: Any, row: dict[str, Any]) -> bool:
    """Is the stored ``actual`` what the manifest ``expected``? Strict, but types read sensibly."""
    typ = COMPARABLE[column]
    if expected is None:
        return actual is None or actual == [] or actual == {}
    if column in ("ts", "ts_ns"):
        want = expected if column == "ts_ns" and isinstance(expected, int) else expected_ns(expected)
        return row.get("ts_ns") == want
    if actual is None:
        return False
    if typ in ("INTEGER", "BIGINT"):
        if isinstance(expected, bool) or isinstance(actual, bool):
            return False
        try:
            return int(str(expected)) == int(actual)
        except ValueError:
            return False
    if typ == "DOUBLE":
        try:
            return math.isclose(float(expected), float(actual), rel_tol=1e-9, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if typ == "BOOLEAN":
        if isinstance(expected, str):
            expected = {"true": True, "false": False}.get(expected.lower(), expected)
        return expected is actual or expected == actual and isinstance(expected, bool)
    if typ == "JSON":
        got = json.loads(actual) if isinstance(actual, str) else actual
        want = json.loads(expected) if isinstance(expected, str) else expected
        return bool(got == want)
    if typ == "VARCHAR[]":
        want_list = expected if isinstance(expected, list) else [expected]
        return sorted(map(str, want_list)) == sorted(map(str, actual))
    if typ.startswith("MAP"):
        got_map = dict(actual)
        return isinstance(expected, dict) and all(got_map.get(k) == str(v) for k, v in expected.items())
    return str(expected) == str(actual)


# -- running the pipeline ------------------------------------------------------------------------------
def _position_key(position: str) -> tuple[int, ...]:
    """``"12"``, ``"3-40"``, ``"1#result[0].values[2]"`` -> sortable numbers (record order in the file)."""
    return tuple(int(n) for n in re.findall(r"\d+", position or "")) or (0,)


@dataclass
class Outcome:
    """One record as meshlens stored it: an event row or a reject row."""

    position: str
    row: dict[str, Any] | None = None  # events row
    reject: dict[str, Any] | None = None  # rejects row


@dataclass
class FileResult:
    family: str
    file: str
    outcomes: list[Outcome] = field(default_factory=list)
    crash: str | None = None


def _rows(store: Store, table: str, source: str) -> list[dict[str, Any]]:
    cur = store.con.execute(f"SELECT * FROM {table} WHERE source = ?", [source])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def ingest_one(family: str, entry: dict[str, Any]) -> FileResult:
    """Ingest one manifest file into its own in-memory store (no dedup across files) and read it back."""
    path = REAL / family / str(entry.get("file"))
    res = FileResult(family, str(entry.get("file")))
    store = open_store(":memory:")
    try:
        batches = list(read_file(path))
        sources = {b.source for b in batches}
        ingest_batches(store, batches, source=f"real:{family}/{res.file}", fmt=entry.get("format"),
                       progress=False, filters=FilterConfig())
        for src in sources:
            res.outcomes += [Outcome(r["position"], row=r) for r in _rows(store, "events", src)]
            res.outcomes += [Outcome(r["position"], reject=r) for r in _rows(store, "rejects", src)]
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported with the file
        res.crash = f"{type(exc).__name__}: {exc}"
    finally:
        store.close()
    res.outcomes.sort(key=lambda o: _position_key(o.position))
    return res


# -- scoring -------------------------------------------------------------------------------------------
@dataclass
class Tally:
    records: int = 0
    records_ok: int = 0
    fields: int = 0
    fields_ok: int = 0

    def add(self, other: Tally) -> None:
        self.records += other.records
        self.records_ok += other.records_ok
        self.fields += other.fields
        self.fields_ok += other.fields_ok

    @property
    def record_rate(self) -> float:
        return self.records_ok / self.records if self.records else 1.0

    @property
    def field_rate(self) -> float:
        return self.fields_ok / self.fields if self.fields else 1.0


@dataclass
class Score:
    by_family: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    by_format: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    crashes: list[str] = field(default_factory=list)


def score_file(entry: dict[str, Any], res: FileResult, score: Score) -> None:
    """Match the manifest's records to the stored outcomes in order and tally them field by field.

    An expected event counts ``event_type`` plus each stated field; an expected reject counts one field
    (rejected with a reason naming the stated word). A missing or extra outcome fails its record.
    """
    where = f"{res.family}/{res.file}"
    if res.crash:
        score.crashes.append(f"{where}: {res.crash}")
    expected = entry.get("records") or []
    for i, want in enumerate(expected):
        got = res.outcomes[i] if i < len(res.outcomes) else None
        t = Tally(records=1)
        issues: list[str] = []
        fmt_key = (want.get("fields") or {}).get("format") or entry.get("format")
        if want.get("reject"):
            t.fields = 1
            word = str(want.get("reason_contains") or "")
            if got is None:
                issues.append("missing (expected a reject)")
            elif got.reject is None:
                issues.append(f"parsed as {got.row['format']} {got.row['event_type']}, expected a reject "
                              f"naming {word!r}")
            elif word.lower() not in str(got.reject["reason"]).lower():
                issues.append(f"rejected with {got.reject['reason']!r}, expected a reason naming {word!r}")
            else:
                t.fields_ok = 1
            fmt_key = fmt_key or (got.reject["format"] if got is not None and got.reject else None) or "(reject)"
        else:
            fields = want.get("fields") or {}
            t.fields = 1 + len(fields)
            if got is None or got.row is None:
                why = "missing" if got is None else f"rejected ({got.reject['reason']})"  # type: ignore[index]
                issues.append(f"{why}; expected {want.get('event_type')}")
            else:
                row = got.row
                fmt_key = fmt_key or row["format"]
                if row["event_type"] == want.get("event_type"):
                    t.fields_ok += 1
                else:
                    issues.append(f"event_type {row['event_type']!r}, expected {want.get('event_type')!r}")
                for col, value in fields.items():
                    if same(col, value, row.get(col), row):
                        t.fields_ok += 1
                    else:
                        shown = row.get("ts_ns") if col == "ts" else row.get(col)
                        issues.append(f"{col}: got {shown!r}, expected {value!r}")
        t.records_ok = int(not issues)
        pos = got.position if got is not None else "?"
        for msg in issues:
            score.problems[where].append(f"record {i + 1} (position {pos}): {msg}")
        score.by_family[res.family].add(t)
        score.by_format[str(fmt_key or "?")].add(t)
    for extra in res.outcomes[len(expected):]:
        score.problems[where].append(f"extra outcome at position {extra.position} (not in the manifest): "
                                     + (f"{extra.row['format']} {extra.row['event_type']}" if extra.row
                                        else f"reject {extra.reject['reason']!r}"))  # type: ignore[index]
        t = Tally(records=1, fields=1)
        score.by_family[res.family].add(t)
        score.by_format["(extra)"].add(t)


@pytest.fixture(scope="module")
def real_score() -> Score:
    """Ingest every manifest file once (redaction off: this measures parsing, not masking)."""
    old = os.environ.get("MESHLENS_REDACT")
    os.environ["MESHLENS_REDACT"] = "off"
    try:
        score = Score()
        for fam in families():
            for entry in load_manifest(fam):
                if isinstance(entry, dict) and (REAL / fam / str(entry.get("file"))).is_file():
                    score_file(entry, ingest_one(fam, entry), score)
        return score
    finally:
        if old is None:
            os.environ.pop("MESHLENS_REDACT", None)
        else:
            os.environ["MESHLENS_REDACT"] = old


def _table(title: str, tallies: dict[str, Tally]) -> str:
    lines = [f"{title:<24} {'records':>8} {'as expected':>12} {'fields':>7} {'field acc.':>11}"]
    total = Tally()
    for key in sorted(tallies):
        t = tallies[key]
        total.add(t)
        lines.append(f"{key:<24} {t.records:>8} {t.record_rate:>11.1%} {t.fields:>7} {t.field_rate:>10.1%}")
    lines.append(f"{'TOTAL':<24} {total.records:>8} {total.record_rate:>11.1%} {total.fields:>7} "
                 f"{total.field_rate:>10.1%}")
    return "\n".join(lines)


def _problems(score: Score, family: str | None = None, limit: int = 60) -> str:
    out = []
    for where, msgs in sorted(score.problems.items()):
        if family is None or where.startswith(family + "/"):
            out += [f"  {where}: {m}" for m in msgs]
    return "\n".join(out[:limit]) + (f"\n  ... {len(out) - limit} more" if len(out) > limit else "")


# -- the tests -----------------------------------------------------------------------------------------
def test_real_records_tallies(real_score: Score) -> None:
    """Print the per-family and per-format tallies; fail on a crash or below the overall targets."""
    print("\n" + _table("family", real_score.by_family) + "\n\n" + _table("format", real_score.by_format))
    if real_score.problems:
        print("\nmismatches:\n" + _problems(real_score, limit=400))
    assert not real_score.crashes, "ingest crashed:\n" + "\n".join(real_score.crashes)
    assert families(), f"no record families under {REAL}"
    total = Tally()
    for t in real_score.by_family.values():
        total.add(t)
    assert total.records, "no real records found under tests/data/real"
    assert total.record_rate >= RECORD_TARGET and total.field_rate >= FIELD_TARGET, (
        f"records as expected {total.record_rate:.1%} (target {RECORD_TARGET:.0%}), field accuracy "
        f"{total.field_rate:.1%} (target {FIELD_TARGET:.0%}):\n{_problems(real_score)}")


@pytest.mark.parametrize("family", families())
def test_real_family_meets_targets(real_score: Score, family: str) -> None:
    """Each family on its own reaches the targets (a strong family cannot hide a broken one)."""
    t = real_score.by_family.get(family, Tally())
    crashes = [c for c in real_score.crashes if c.startswith(family + "/")]
    assert not crashes, "\n".join(crashes)
    assert t.records, f"{family}: no records scored"
    assert t.record_rate >= RECORD_TARGET and t.field_rate >= FIELD_TARGET, (
        f"{family}: records as expected {t.record_rate:.1%}, field accuracy {t.field_rate:.1%}:\n"
        + _problems(real_score, family))


def _check_record(where: str, i: int, rec: Any) -> Iterator[str]:
    if not isinstance(rec, dict):
        yield f"{where} record {i}: not a mapping"
        return
    if rec.get("reject") is True:
        if not isinstance(rec.get("reason_contains"), str) or not rec["reason_contains"].strip():
            yield f"{where} record {i}: a reject needs reason_contains"
        if set(rec) - {"reject", "reason_contains", "note"}:
            yield f"{where} record {i}: unexpected keys {sorted(set(rec) - {'reject', 'reason_contains', 'note'})}"
        return
    if rec.get("event_type") not in schema.EVENT_TYPES:
        yield f"{where} record {i}: event_type {rec.get('event_type')!r} is not one of {schema.EVENT_TYPES}"
    fields = rec.get("fields")
    if not isinstance(fields, dict) or not fields:
        yield f"{where} record {i}: fields must be a non-empty mapping"
        return
    for col, value in fields.items():
        if col not in COMPARABLE:
            yield f"{where} record {i}: {col!r} is not a comparable schema column"
        elif col in ("ts", "ts_ns") and value is not None and not (col == "ts_ns" and isinstance(value, int)):
            try:
                expected_ns(value)
            except ValueError as exc:
                yield f"{where} record {i}: {exc}"
    if set(rec) - {"event_type", "fields", "note"}:
        yield f"{where} record {i}: unexpected keys {sorted(set(rec) - {'event_type', 'fields', 'note'})}"


def test_manifests_are_well_formed() -> None:
    """Every file is listed, every listed file exists, sources are URLs, records are well-formed."""
    assert families(), f"no record families under {REAL}"
    problems: list[str] = []
    for fam in families():
        mf = REAL / fam / "MANIFEST.yaml"
        if not mf.is_file():
            problems.append(f"{fam}: no MANIFEST.yaml")
            continue
        raw = yaml.safe_load(mf.read_text(encoding="utf-8"))
        if not isinstance(raw, list):
            problems.append(f"{fam}/MANIFEST.yaml: must be a list of entries")
            continue
        listed: list[str] = []
        for n, entry in enumerate(raw):
            where = f"{fam}/MANIFEST.yaml entry {n} ({entry.get('file') if isinstance(entry, dict) else '?'})"
            if not isinstance(entry, dict):
                problems.append(f"{where}: not a mapping")
                continue
            listed.append(str(entry.get("file")))
            if not (REAL / fam / str(entry.get("file"))).is_file():
                problems.append(f"{where}: file does not exist")
            if not isinstance(entry.get("source"), str) or not _URL.match(entry["source"]):
                problems.append(f"{where}: source {entry.get('source')!r} is not a URL")
            if set(entry) - {"file", "source", "format", "note", "records"}:
                problems.append(f"{where}: unexpected keys {sorted(set(entry) - {'file', 'source', 'format', 'note', 'records'})}")
            records = entry.get("records")
            if not isinstance(records, list) or not records:
                problems.append(f"{where}: records must be a non-empty list")
                continue
            for i, rec in enumerate(records, 1):
                problems += list(_check_record(where, i, rec))
        dupes = {f for f in listed if listed.count(f) > 1}
        if dupes:
            problems.append(f"{fam}: files listed twice: {sorted(dupes)}")
        on_disk = {p.name for p in (REAL / fam).iterdir() if p.is_file() and p.name != "MANIFEST.yaml"}
        unlisted = on_disk - set(listed)
        if unlisted:
            problems.append(f"{fam}: files not in MANIFEST.yaml: {sorted(unlisted)}")
    assert not problems, "\n".join(problems)


def _source_key(url: str) -> str:
    """Distinct sources: one page/file/thread, whatever line anchor or commit of it was cited."""
    url = url.split("#", 1)[0].rstrip("/")
    return re.sub(r"/(blob|raw|tree)/[0-9a-f]{7,40}/", "/blob/*/", url)


def collection_counts() -> tuple[int, int]:
    records, sources = 0, set()
    for fam in families():
        for entry in load_manifest(fam):
            if isinstance(entry, dict):
                records += len(entry.get("records") or [])
                sources.add(_source_key(str(entry.get("source"))))
    return records, len(sources)


def test_collection_is_large_enough() -> None:
    """Issue 13: at least 150 real records from at least 40 distinct public sources, across families.

    """
    records, sources = collection_counts()
    assert records >= MIN_RECORDS and sources >= MIN_SOURCES, (
        f"{records} records from {sources} distinct sources; need {MIN_RECORDS} / {MIN_SOURCES}")


def test_no_record_is_a_shared_sample(shared_samples: Path) -> None:
    """The real set is new material: no record line is copied from ../shared/samples."""
    known = {ln.strip() for p in shared_samples.rglob("*") if p.is_file()
             for ln in p.read_text(encoding="utf-8", errors="replace").splitlines() if len(ln.strip()) > 60}
    copied = [f"{p.relative_to(REAL)}: {ln.strip()[:80]}" for p in REAL.rglob("*")
              if p.is_file() and p.name != "MANIFEST.yaml"
              for ln in p.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip() in known]
    assert not copied, "records already in ../shared/samples:\n" + "\n".join(copied[:20])
