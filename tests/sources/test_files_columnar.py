"""The plain-file fast path (Arrow columns cut from 4 MiB chunks) must yield exactly what the
per-line reference path yields: same texts, same line numbers, same skipped blanks and fallbacks."""

from __future__ import annotations

import io
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.formats.containers import Chunk, _plain, plain_chunks
from meshlens.sources.files import read_file


def _fast(data: bytes, chunk_bytes: int) -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = []
    for item in plain_chunks(io.BytesIO(data), "x.log", [], chunk_bytes=chunk_bytes):
        if isinstance(item, Chunk):
            out += [(t, p, None) for t, p in zip(item.texts.to_pylist(), item.positions.to_pylist(), strict=True)]
        else:
            out.append((item.text, item.position, item.reject_reason))
    return out


def _reference(data: bytes) -> list[tuple[str, str, str | None]]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [(r.text, r.position, r.reject_reason) for r in _plain(lines, "x.log", 8 << 20)]


PIECES = [b'[2024-05-01T10:00:00.000Z] "GET / HTTP/1.1" 200 - via_upstream - "-" 0 1 2 3 "-" "ua" "id" "a" "b"',
          b'{"response_code": 200, "upstream_cluster": "outbound|80||a.b.svc.cluster.local"}',
          b"", b"   ", b"\t", b"\r", b"x\r", b"\xc2\xa0", b"\xe2\x80\x83 ", b"\x1c", b"caf\xc3\xa9", b"{", b"  [ ",
          b"}", b'"quoted start', b"\xff\xfe bad utf8", b"plain text line", b" leading space", b"trailing tab\t"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=40), st.booleans(),
       st.sampled_from([16, 64, 200, 4 << 20]))
def test_fast_path_equals_per_line_path(pieces: list[bytes], final_newline: bool, chunk_bytes: int) -> None:
    data = b"\n".join(pieces) + (b"\n" if final_newline else b"")
    assert _fast(data, chunk_bytes) == _reference(data)


def test_columnar_batches_keep_line_numbers_and_skip_blanks(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    # blank = ASCII whitespace only (as the per-line path); a non-breaking space is a record (it will be
    # rejected with a reason, never silently dropped)
    p.write_bytes(b"one\r\n\r\n \t\x0b\nfour\n\xc2\xa0\nsix")
    batches = list(read_file(p))
    assert [b.texts() for b in batches] == [["one", "four", "\xa0", "six"]]
    assert batches[0].position_list() == ["1", "4", "5", "6"]
