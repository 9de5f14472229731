"""Shared fixtures: the generated sample tree and the (optional) real research-licensed samples."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataprep.sample_data import write_sample_tree

#: A handful of real raw files, READ ONLY (never copy them into the project). Tests that need
#: them skip when the folder is absent. Override with DATAPREP_REAL_SAMPLES.
REAL_SAMPLES = Path(
    os.environ.get("DATAPREP_REAL_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "real_samples")
)


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory) -> Path:
    """Root of a generated raw tree (``300W_LP/``, ``AFLW2000/``, ``hpdb/``, ``expected_labels.json``),
    written once per session with seed 0 and 3 BIWI frames per sequence. Treat it as read-only:
    tests that damage files copy what they need first."""
    root = tmp_path_factory.mktemp("sample_tree")
    write_sample_tree(root, seed=0)
    return root


@pytest.fixture(scope="session")
def real_samples() -> Path:
    if not REAL_SAMPLES.is_dir():
        pytest.skip(f"real samples not available at {REAL_SAMPLES} (set DATAPREP_REAL_SAMPLES)")
    return REAL_SAMPLES
