"""Coverage-guided fuzzing (atheris/libFuzzer) of every parser and container entry point.

The checks are those of the hypothesis tests (tests/support/fuzz_inputs.py): any input gives events or
rejects, never an exception, and the conservation count holds. A finding is an uncaught exception,
written by libFuzzer as ``crash-<sha1>`` under ``-artifact_prefix``.

Run (``pip install 'atheris>=3.0'``)::

    .venv/bin/python fuzz/fuzz_parsers.py -max_total_time=600 -artifact_prefix=out/fuzz/ [corpus_dir]

``tests/formats/test_fuzz_parsers.py::test_atheris_bounded_run`` runs it for 15 s in every ``make test``; set
``MESHLENS_FUZZ_SECONDS`` for a longer run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["meshlens"]):
    from tests.support import fuzz_inputs as fi

_TMP = Path(tempfile.mkdtemp(prefix="meshlens-fuzz-"))
_SAMPLES = fi.sample_lines()


def _lines(fdp: atheris.FuzzedDataProvider) -> list[str]:
    out = []
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        if fdp.ConsumeBool():
            out.append(fi.mutate(_SAMPLES[fdp.ConsumeIntInRange(0, len(_SAMPLES) - 1)], fdp.ConsumeBytes(16)))
        else:
            out.append(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300)))
    return out


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    op = fdp.ConsumeIntInRange(0, 9)
    if op <= 5:  # the per-record Python parsers: fast, so most executions go here
        fmt = fi.FORMAT_NAMES[fdp.ConsumeIntInRange(0, len(fi.FORMAT_NAMES) - 1)]
        for line in _lines(fdp):
            fi.check_record(fmt, line)
    elif op == 6:  # the whole batch path (bulk SQL + record parsers + assembly)
        fmt = fi.FORMAT_NAMES[fdp.ConsumeIntInRange(0, len(fi.FORMAT_NAMES) - 1)]
        fi.check_batch(fmt, _lines(fdp))
    elif op == 7:
        compress = fdp.ConsumeBool()
        name = ["x.log", "pods/ns_pod-7d9f8b6c5d-abcde_uid/istio-proxy/0.log"][fdp.ConsumeIntInRange(0, 1)]
        fi.check_file_bytes(_TMP, fdp.ConsumeBytes(fdp.remaining_bytes()), name, compress)
    elif op == 8:
        raw = fdp.ConsumeBytes(fdp.remaining_bytes()).split(b"\n")
        fi.check_logcli_lines(raw)
        fi.check_cri_lines(raw)
    else:
        try:
            obj = json.loads(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))
        except ValueError:
            return
        fi.check_loki_response(obj)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
