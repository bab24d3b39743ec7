"""``parse_streams`` reads well-formed answers column-wise and caches metadata sets: the result must be
exactly what a plain per-entry reading gives (labels, keys, timestamps, lines), whatever the mix of
2- and 3-element entries, and a malformed entry must still be named."""

from __future__ import annotations

from typing import Any

import pytest

from meshlens.errors import SourceError
from meshlens.sources.loki import parse_streams


def _reference(data: dict[str, Any]) -> list[tuple[int, str, dict[str, str]]]:
    """What each entry means, read one by one: stream labels + structured metadata + parsed labels."""
    out = []
    for item in data["result"]:
        labels = {str(k): str(v) for k, v in item["stream"].items()}
        for v in item["values"]:
            extra = v[2] if len(v) > 2 and isinstance(v[2], dict) else {}
            add = {}
            for part in ("structuredMetadata", "parsed"):
                if isinstance(extra.get(part), dict):
                    add.update({str(a): str(b) for a, b in extra[part].items()})
            out.append((int(v[0]), v[1], {**labels, **add}))
    return out


def _got(data: dict[str, Any]) -> list[tuple[int, str, dict[str, str]]]:
    e = parse_streams(data)
    assert [tuple(sorted(lb.items())) for lb in e.labels] == e.lkeys
    return list(zip(e.ts, e.lines, e.labels, strict=True))


def test_mixed_entries_read_exactly() -> None:
    data = {"resultType": "streams", "result": [
        {"stream": {"app": "a", "namespace": "x"}, "values": [
            ["1", "plain two-element"],
            ["2", "info", {"structuredMetadata": {"detected_level": "info"}}],
            ["3", "again info", {"structuredMetadata": {"detected_level": "info"}}],
            ["4", "warn", {"structuredMetadata": {"detected_level": "warn", "trace_id": "abc"}}],
            ["5", "parsed too", {"structuredMetadata": {"detected_level": "info"}, "parsed": {"level": "i"}}],
            ["6", "empty metadata", {}],
            # not strings: converted, and never confused with the string "1" / "True" in the cache
            ["7", "number", {"structuredMetadata": {"n": 1}}],
            ["8", "bool", {"structuredMetadata": {"n": True}}],
            ["9", "string one", {"structuredMetadata": {"n": "1"}}],
        ]},
        {"stream": {"app": "b"}, "values": [["10", "other stream", {"structuredMetadata": {"detected_level": "info"}}]]},
    ]}
    assert _got(data) == _reference(data)
    by_ts = {t: lb for t, _, lb in _got(data)}
    assert by_ts[7]["n"] == "1" and by_ts[8]["n"] == "True" and by_ts[9]["n"] == "1"
    assert by_ts[10] == {"app": "b", "detected_level": "info"}


@pytest.mark.parametrize("bad", [["12x", "line"], [12, "line"], ["12", None], ["12"], "12,line"])
def test_a_malformed_entry_is_still_named(bad: Any) -> None:
    data = {"resultType": "streams", "result": [{"stream": {"app": "a"}, "values": [["1", "fine"], bad]}]}
    with pytest.raises((SourceError, ValueError)) as exc:
        parse_streams(data)
    if isinstance(exc.value, SourceError):
        assert "malformed stream entry" in str(exc.value)
