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
