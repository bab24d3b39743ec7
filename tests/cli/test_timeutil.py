"""The one time grammar shared by the CLI, the notebooks and the schedules (meshlens.timeutil)."""

from __future__ import annotations

import pytest

from meshlens.errors import ConfigError
from meshlens.timeutil import parse_time_ns

NOW = 1_714_557_600_000_000_000  # 2024-05-01T10:00:00Z
H = 3_600_000_000_000


@pytest.mark.parametrize("text,expected", [
    ("2024-05-01T10:00:00Z", NOW), ("2024-05-01T12:00:00+02:00", NOW), ("1714557600", NOW),
    (str(NOW), NOW), ("now", NOW), ("-2h", NOW - 2 * H), ("now-2h", NOW - 2 * H), ("now+30m", NOW + H // 2),
])
def test_absolute_and_now_relative_forms(text: str, expected: int) -> None:
    assert parse_time_ns(text, now_ns=NOW) == expected


def test_latest_is_relative_to_the_store_and_computed_only_when_needed() -> None:
    calls: list[int] = []

    def latest() -> int:
        calls.append(1)
        return NOW

    assert parse_time_ns("now", now_ns=NOW, latest_ns=latest) == NOW and not calls
    assert parse_time_ns("latest-6h", latest_ns=latest) == NOW - 6 * H
    assert parse_time_ns("latest", latest_ns=NOW) == NOW
    assert parse_time_ns(" latest - 90m ".replace(" - ", "-"), latest_ns=NOW) == NOW - 90 * 60 * 10**9


@pytest.mark.parametrize("text,message", [
    ("latest-6h", "relative to the newest event of a store"),
    ("soon", "invalid time 'soon'"),
    ("-2 hours", "invalid duration"),
])
def test_errors_name_the_value_and_the_forms(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_time_ns(text, now_ns=NOW)


def test_latest_with_garbage_is_refused() -> None:
    with pytest.raises(ConfigError, match="latest-6h"):
        parse_time_ns("latestish", latest_ns=NOW)


def _reference_rfc3339_ns(text: str) -> int | None:
    """The pre-cache implementation, kept as the oracle for the cached one."""
    import re
    from datetime import UTC, datetime

    m = re.match(r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:[.,](\d{1,9}))?\d*\s*(Z|z|[+-]\d\d:?\d\d)?$",
                 text.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        base = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC)
    except ValueError:
        return None
    ns = int(base.timestamp()) * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    if tz and tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        ns -= sign * (int(tz[1:3]) * 3600 + int(tz[-2:]) * 60) * 1_000_000_000
    return ns


@pytest.mark.parametrize("text", [
    "2022-08-23T20:28:20.071809491Z", "2022-08-23T20:28:20Z", "2022-08-23 20:28:20,5", "2022-08-23T20:28:20.1234567891234Z",
    "2022-08-23T22:28:20+02:00", "2022-08-23T18:58:20-0130", "2022-08-23T20:28:20.071809491z", " 2022-08-23T20:28:20Z ",
    "2022-02-30T00:00:00Z", "2016-12-31T23:59:60Z", "2022-08-23T24:00:00Z", "2022-08-23", "20:28:20", "", "garbage",
    "2024-02-29T00:00:00Z", "1969-12-31T23:59:59.999999999Z",
])
def test_rfc3339_matches_the_uncached_parser(text: str) -> None:
    from meshlens.timeutil import parse_rfc3339_ns

    assert parse_rfc3339_ns(text) == _reference_rfc3339_ns(text)
    assert parse_rfc3339_ns(text) == _reference_rfc3339_ns(text)  # again, now from the seconds cache


def test_rfc3339_cache_is_bounded_and_stays_exact() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from meshlens import timeutil

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, 4_102_444_800 * 10**9), st.sampled_from(["Z", "+05:30", "-08:00", ""]),
           st.integers(0, 9))
    def check(ns: int, tz: str, digits: int) -> None:
        sec, frac = divmod(ns, 10**9)
        import time as _t

        text = _t.strftime("%Y-%m-%dT%H:%M:%S", _t.gmtime(sec)) + (f".{frac:09d}"[:digits + 1] if digits else "") + tz
        assert timeutil.parse_rfc3339_ns(text) == _reference_rfc3339_ns(text)

    check()
    for i in range(timeutil._SECONDS_MAX + 10):  # fill past the bound: it is cleared, never grows past it
        timeutil.parse_rfc3339_ns(f"2030-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z")
        assert len(timeutil._SECONDS) <= timeutil._SECONDS_MAX
