"""The format registry is the one place formats are declared: detection, --format, README and fuzz
list all come from it, and the Envoy flag table drives the analyses' SQL."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

from meshlens.analysis import common, graph
from meshlens.errors import ConfigError
from meshlens.formats import envoy, registry
from meshlens.formats.detect import FORMATS, Parser
from meshlens.records import RawBatch
from tests.support import fuzz_inputs

ROOT = Path(__file__).resolve().parents[2]


def test_readme_format_table_is_generated_from_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    assert registry.readme_table() in readme, "regenerate: python -m meshlens.formats.registry (README 'Formats')"


def test_every_registered_name_is_a_format_option_and_fuzzed() -> None:
    names = set(registry.names())
    assert names == set(FORMATS)
    assert set(fuzz_inputs.FORMAT_NAMES) == names
    for spec in registry.FORMATS:
        assert spec.kind in ("bulk", "json", "unwrap", "text")
        assert (spec.bulk_class is not None) == (spec.kind == "bulk")
        assert spec.kind in ("bulk", "unwrap") or spec.parse is not None
        if spec.kind != "unwrap":
            Parser(fmt=spec.name)  # every record format can be forced
    with pytest.raises(ConfigError, match="unknown format"):
        Parser(fmt="nope")


def test_format_help_lists_the_readme_formats() -> None:
    help_text = registry.format_help()
    for spec in registry.FORMATS:
        if spec.readme:
            assert spec.name in help_text


def _parse(lines: list[str], fmt: str | None = None) -> tuple[list[dict], list[dict]]:
    ev, rej = Parser(fmt=fmt).parse(RawBatch(lines=lines, source="t"))
    return ev.to_pylist(), rej.to_pylist()


def test_a_registered_text_format_is_detected_and_forced() -> None:
    line = "2024-05-01T10:00:00.123Z debug envoy rbac enforced denied, matched policy ns[foo]-policy[deny]-rule[0]"
    ev, rej = _parse([line])
    assert not rej and ev[0]["format"] == "envoy_rbac_debug" and ev[0]["authz_decision"] == "deny"
    # forcing another format rejects the line with that format's reason, never a crash
    ev, rej = _parse([line], fmt="linkerd_apache")
    assert not ev and rej[0]["format"] == "linkerd_apache"


def test_json_without_a_claiming_format_is_rejected_with_its_keys() -> None:
    ev, rej = _parse(['{"foo": 1, "bar": 2}'])
    assert not ev and "unknown shape (keys: bar, foo)" in rej[0]["reason"]


def test_flag_table_drives_failure_sql_and_root_cause_classes() -> None:
    # every failure flag of the table makes FAILED_SQL true, every other flag does not
    con = duckdb.connect()
    for code, flag in envoy.FLAGS.items():
        got = con.execute(f"SELECT {common.FAILED_SQL} FROM (SELECT 200 AS status, NULL AS authz_decision, NULL::INT AS grpc_status, "
                          f"'DI,' || ? AS response_flags)", [code]).fetchone()[0]
        assert got is flag.failure, code
    assert set(common.FAILURE_FLAGS) == {c for c, f in envoy.FLAGS.items() if f.failure}
    assert "DC" not in common.FAILURE_FLAGS
    # the graph's 'callee' side comes from the owner column
    sql = graph.deepest_failures_sql("h", "r")
    assert envoy.flags_regex(envoy.flags_where(owner="callee")) in sql
    assert set(envoy.flags_where(owner="callee")) == {"UT", "UH", "UC", "UO", "LH"}
    rx = re.compile(envoy.flags_regex(envoy.flags_where(klass="route")))
    assert rx.search("UF,NR") and not rx.search("NRX") and not rx.search("UF")


def test_formats_doc_sections_name_registered_formats() -> None:
    doc = (ROOT / "docs" / "formats.md").read_text()
    sections = re.findall(r"^## `([a-z_0-9]+)`", doc, flags=re.M)
    assert sections and set(sections) <= set(registry.BY_NAME)
    # the Envoy/Istio family documents every one of its formats
    for name in ("istio_text", "envoy_default", "istio_json", "envoy_rbac_debug", "envoy_log", "ztunnel"):
        assert name in sections, name
