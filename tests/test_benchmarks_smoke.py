"""The benchmark scripts run (``--smoke``: tiny data, one round) and end with one JSON line holding
their ratios. No timing is asserted: these only check the scripts work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

EXPECTED_KEYS = {
    "build": {"gt_1job_vs_bare", "gt_njobs_vs_bare", "gt_njobs_cold_vs_bare", "mtcnn_overhead",
              "mtcnn_overhead_in_build", "mtcnn_cached_rate", "rates"},
    "load": {"ours_vs_hopenet", "ours_vs_bare_decode", "ours_vs_bare_decode_cut_float", "stored_crops_vs_hopenet",
             "stored_crops_vs_bare_decode",
             "loose_room_vs_hopenet", "loose_room_vs_bare_decode",
             "rates", "peak_mb"},
    "scale": {"series", "samples"},
    "train_step": {"loader_vs_step", "rates"},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")  # shared: the raw sample tree is written once


@pytest.mark.parametrize("script", sorted(EXPECTED_KEYS))
def test_benchmark_smoke_run_ends_with_json_ratios(script, work):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--smoke", "--work", str(work)],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    payload = json.loads(last)
    assert payload["benchmark"] == script and payload["mode"] == "smoke"
    assert EXPECTED_KEYS[script] <= set(payload), sorted(EXPECTED_KEYS[script] - set(payload))
    if script == "train_step":
        assert payload["loader_vs_step"] and all(v > 0 for v in payload["loader_vs_step"].values())
    elif script == "scale":
        assert set(payload["series"]) == {"ours gt", "ours stub detector", "ours loader"}
        for series in payload["series"].values():
            assert {"rate_ratio_2x_vs_1x", "peak_ratio_2x_vs_1x", "per_sample_ms", "r2"} <= set(series)
    else:
        ratios = {k: v for k, v in payload.items() if k.endswith(("_vs_bare", "_vs_hopenet", "_vs_bare_decode"))}
        assert ratios and all(isinstance(v, float) and v > 0 for v in ratios.values()), ratios
