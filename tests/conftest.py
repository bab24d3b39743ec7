"""Shared fixtures: the real sample records in ../shared/samples and small store helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The real sample records from ../shared/samples (public docs, tests and issues; MANIFEST.tsv says where
# each came from). A verbatim copy lives in tests/data/shared-samples so the suite never depends on a
# sibling folder; the sibling wins when present (it may have gained samples) unless overridden.
_SIBLING = ROOT.parent / "shared" / "samples"
SHARED_SAMPLES = Path(os.environ.get("MESHLENS_SHARED_SAMPLES")
                      or (_SIBLING if _SIBLING.exists() else ROOT / "tests" / "data" / "shared-samples"))


@pytest.fixture(scope="session")
def shared_samples() -> Path:
    if not SHARED_SAMPLES.exists():
        pytest.skip(f"shared samples not found at {SHARED_SAMPLES} (set MESHLENS_SHARED_SAMPLES)")
    return SHARED_SAMPLES


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.duckdb"
