"""An ingest, a scheduled-style report run and a notebook-kernel-like reader on one store, at once.

Promise under test (meshlens/store.py docstring): the writer publishes ``<db>.snapshot`` atomically;
readers (reports, notebooks) open the snapshot, so none of the three fails with a lock error, and no
reader ever sees a half-written batch -- every state a reader observes is the store after a whole number
of batches, exactly as an uninterrupted run passes through them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from meshlens import reports
from meshlens.ingest import ingest_batches, ingest_files
from meshlens.store import open_store
from tests.support.crash import _RUNNER, make_log, small_batches

ROOT = Path(__file__).resolve().parents[2]
BATCH = 1500


# A notebook kernel's access pattern: open read-only, query, keep the connection a while, reopen.
_READER = """
import json, sys, time
from pathlib import Path
from meshlens.store import open_store
done = Path(sys.argv[2])
seen = []
while True:
    last = done.exists()
    with open_store(sys.argv[1], read_only=True) as s:
        seen.append([int(s.scalar("SELECT count(*) FROM events")), int(s.scalar("SELECT count(*) FROM rejects")),
                     int(s.scalar("SELECT count(DISTINCT event_id) FROM events"))])
        s.query("SELECT dst_service, status, count(*) FROM events GROUP BY ALL")
        time.sleep(0.05)
    if last:
        break
print(json.dumps(seen))
"""


def _counts(db: Path) -> tuple[int, int]:
    with open_store(db, read_only=True) as s:
        return int(s.scalar("SELECT count(*) FROM events")), int(s.scalar("SELECT count(*) FROM rejects"))


def test_ingest_report_and_reader_at_once(tmp_path: Path) -> None:
    log_a = make_log(tmp_path / "a.log", 3_000)
    log_b = tmp_path / "b.log"
    log_b.write_text(make_log(tmp_path / "b0.log", 33_000).read_text().split("\n", 3_000)[-1])

    # reference: every state an uninterrupted run passes through (after A, then after each batch of B)
    ref_db = tmp_path / "ref.duckdb"
    ingest_files(ref_db, [log_a], progress=False)
    valid = [_counts(ref_db)]
    with open_store(ref_db) as s:
        for batch in small_batches(log_b, BATCH):
            ingest_batches(s, [batch], source="file:log", progress=False)
            s.publish_snapshot()
            valid.append(_counts(ref_db))
    assert len(valid) > 10

    db = tmp_path / "live.duckdb"
    ingest_files(db, [log_a], progress=False)  # a published store exists, as in production
    done = tmp_path / "writer.done"
    writer = subprocess.Popen([sys.executable, "-c", _RUNNER, str(db), str(log_b), str(BATCH), "0"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(db), str(done)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        report = reports.run_report("mesh_audit", db, {}, tmp_path / "out", timeout_s=240)
        w_out, w_err = writer.communicate(timeout=240)
    finally:
        done.touch()
        if writer.poll() is None:
            writer.kill()
    r_out, r_err = reader.communicate(timeout=120)

    assert writer.returncode == 0, w_err[-3000:]
    assert reader.returncode == 0, r_err[-3000:]
    assert report.status == "ok", report.error
    seen = json.loads(r_out)
    states = {(e, r) for e, r, _ in seen}
    assert all(e == d for e, _, d in seen), "a reader saw duplicated events"
    assert states <= set(valid), f"a reader saw a state no whole-batch prefix has: {sorted(states - set(valid))}"
    assert len(states) >= 2, "the reader never saw the store change while the ingest ran; nothing was tested"
    assert _counts(db) == valid[-1]
    run = json.loads((Path(report.run_dir) / "run.json").read_text())
    assert run["status"] == "ok"


def test_open_kernel_does_not_block_ingest_and_keeps_a_consistent_view(tmp_path: Path) -> None:
    """A reader holding the store open (an idle notebook kernel) must not stop an ingest, and its view
    does not change under it; a fresh open sees the new data."""
    db = tmp_path / "s.duckdb"
    ingest_files(db, [make_log(tmp_path / "a.log", 2_000)], progress=False)
    kernel = open_store(db, read_only=True)  # stays open during the next ingest
    try:
        before = kernel.scalar("SELECT count(*) FROM events")
        counts = ingest_files(db, [make_log(tmp_path / "b.log", 2_500)], progress=False)
        assert counts.read == 2_500 and counts.stored > 0
        assert kernel.scalar("SELECT count(*) FROM events") == before
        with open_store(db, read_only=True) as fresh:
            assert fresh.scalar("SELECT count(*) FROM events") == before + counts.stored
    finally:
        kernel.close()
