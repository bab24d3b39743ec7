"""Property tests over every parser and container entry point: any input gives events or rejects,
never an exception, and the conservation count holds (see tests/support/fuzz_inputs.py for the checks).

Example counts are kept small so the file runs in well under a minute; ``MESHLENS_SLOW=1`` multiplies
them by 20. The coverage-guided atheris target (fuzz/fuzz_parsers.py) complements this.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.errors import MeshlensError
from meshlens.sources import elasticsearch, loki
from tests.support import fuzz_inputs as fi

SCALE = 20 if os.environ.get("MESHLENS_SLOW") == "1" else 1
FAST = settings(max_examples=30 * SCALE, deadline=None, derandomize=SCALE == 1,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_KEYS = ["log", "message", "stream", "time", "kind", "apiVersion", "auditID", "verb", "user", "objectRef",
         "requestURI", "stage", "client.addr", "response_code", "upstream_cluster", "start_time", "path",
         "method", "authority", "@timestamp", "http", "url", "source", "destination", "event", "status", "data",
         "resultType", "result", "values", "labels", "line", "timestamp", "_source", "_id", "_index"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), kids,
                                                            max_size=6),
    max_leaves=20)
json_objects = st.dictionaries(st.sampled_from(_KEYS), json_values, max_size=8)


def _mutated() -> st.SearchStrategy[str]:
    return st.builds(fi.mutate, st.sampled_from(fi.sample_lines()), st.binary(max_size=24))


lines = st.one_of(
    st.text(max_size=200),
    st.sampled_from(fi.sample_lines()),
    _mutated(),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", errors="replace")),
    json_objects.map(json.dumps),
    json_objects.map(lambda o: json.dumps({"log": json.dumps(o)})),
)
labels = st.none() | st.dictionaries(st.sampled_from(["namespace", "pod", "container", "app", "job", "x"]),
                                     st.text(max_size=20), max_size=4)


@FAST
@given(st.sampled_from(fi.FORMAT_NAMES), st.lists(lines, min_size=1, max_size=8), labels,
       st.none() | st.integers(0, 2**63 - 1))
def test_every_format_conserves_any_batch(fmt: str, batch: list[str], lbl: dict[str, str] | None,
                                          ts: int | None) -> None:
    fi.check_batch(fmt, batch, lbl, ts)


@FAST
@given(st.lists(_mutated(), min_size=1, max_size=12))
def test_mutated_real_records_auto(batch: list[str]) -> None:
    fi.check_batch("auto", batch)


@FAST
@given(st.one_of(st.binary(max_size=400),
                 st.lists(lines, max_size=10).map(fi.as_file),
                 st.lists(st.sampled_from(["{", "}", '  "a": 1,', "", "\r", '"GET / HTTP/1.1" 200',
                                           "2024-01-01T00:00:00.000000001Z stdout P part",
                                           "2024-01-01T00:00:00.000000002Z stdout F end"])
                          | lines, max_size=12).map(fi.as_file)),
       st.booleans(),
       st.sampled_from(["x.log", "pods/ns_pod-7d9f8b6c5d-abcde_uid/istio-proxy/0.log", "e.jsonl"]))
def test_file_container_never_drops_or_raises(data: bytes, compress: bool, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        fi.check_file_bytes(Path(d), data, name, compress)


@FAST
@given(st.lists(st.one_of(st.binary(max_size=80), json_objects.map(lambda o: json.dumps(o).encode()),
                          st.builds(lambda line, ts: json.dumps({"labels": {"a": "b"}, "line": line,
                                                                 "timestamp": ts}).encode(),
                                    lines, st.text(max_size=35))), max_size=8))
def test_logcli_and_cri_containers(raw: list[bytes]) -> None:
    assert fi.check_logcli_lines(raw) >= len([r for r in raw if r.strip()])
    fi.check_cri_lines(raw)


@FAST
@given(st.one_of(json_objects, st.fixed_dictionaries(
    {"status": st.sampled_from(["success", "error"]) | json_values,
     "data": st.fixed_dictionaries({"resultType": st.sampled_from(["streams", "matrix"]),
                                    "result": st.lists(st.fixed_dictionaries(
                                        {"stream": st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
                                         "values": st.lists(st.lists(json_values, max_size=3), max_size=3)}),
                                        max_size=3)})})))
def test_saved_loki_response_any_shape(obj: dict) -> None:
    fi.check_loki_response(obj)


@FAST
@given(st.fixed_dictionaries({"resultType": st.just("streams"), "result": st.lists(st.fixed_dictionaries(
    {"stream": st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
     "values": st.lists(st.lists(json_values, max_size=3), max_size=3)}), max_size=3)}) | json_objects)
def test_loki_answer_parse_raises_only_meshlens_errors(data: dict) -> None:
    """A Loki server answering garbage must give a SourceError (retryable/loud), not a TypeError."""
    with contextlib.suppress(MeshlensError):
        loki.parse_streams(data)


@FAST
@given(st.dictionaries(st.sampled_from(["_source", "_id", "_index", "sort", "fields"]), json_values, max_size=4)
       | st.fixed_dictionaries({"_id": st.text(max_size=5), "_index": st.text(max_size=5), "_source": json_objects}))
def test_es_hit_mapping_any_document(hit: dict) -> None:
    try:
        rec = elasticsearch.hit_to_record(hit, "@timestamp")
    except MeshlensError:
        return
    fi.check_batch("auto", [rec.line])


def test_atheris_bounded_run(tmp_path: Path) -> None:
    """The coverage-guided target, for a bounded time (``MESHLENS_FUZZ_SECONDS``, default 15 s)."""
    pytest.importorskip("atheris", reason="atheris>=3.0 is a dev dependency (pip install atheris)")
    seconds = int(os.environ.get("MESHLENS_FUZZ_SECONDS", "15"))
    target = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_parsers.py"
    proc = subprocess.run(
        [sys.executable, str(target), f"-max_total_time={seconds}", "-len_control=0", "-max_len=2048",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=seconds + 120, cwd=tmp_path)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, f"fuzzer found {crashes}:\n{proc.stderr[-4000:]}"
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    assert runs and int(runs.group(1)) > 10, proc.stderr[-2000:]
