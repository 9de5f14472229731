"""Fuzz the readers with mutated real-format files: every outcome is a valid sample or a
SampleError naming the file; no other exception ever escapes a reader."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataprep import labels
from dataprep.datasets import get_reader
from dataprep.records import RawSample, SampleError

# derandomize: CI runs the same examples every time (a red run must be reproducible); run with
# HYPOTHESIS_PROFILE=explore locally to search new ones.
FUZZ = settings(max_examples=150, deadline=None, derandomize=os.environ.get("HYPOTHESIS_PROFILE") != "explore",
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.floats(0.0, 1.0), st.binary(min_size=1, max_size=16)),
)


def mutate(data: bytes, mutation) -> bytes:
    kind = mutation[0]
    if kind == "truncate":
        return data[: int(len(data) * mutation[1])]
    if kind == "flip":
        out = bytearray(data)
        for where, mask in mutation[1]:
            if out:
                out[min(int(where * len(out)), len(out) - 1)] ^= mask
        return bytes(out)
    where = int(len(data) * mutation[1])
    return data[:where] + mutation[2] + data[where:]


def check_outcome(dataset: str, root: Path, ref, damaged: Path) -> None:
    reader = get_reader(dataset)
    try:
        sample = reader.read_sample(root, ref)
    except SampleError as err:
        assert err.reason and damaged.name in err.message, err.message
        return
    assert isinstance(sample, RawSample)
    assert all(math.isfinite(a) for a in (sample.yaw, sample.pitch, sample.roll))
    assert sample.image.dtype == np.uint8 and sample.image.ndim == 3
    assert labels.is_rotation(sample.rotation)


@pytest.fixture(scope="module")
def fuzz_root(sample_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(sample_tree / "AFLW2000", root / "AFLW2000")
    shutil.copytree(sample_tree / "300W_LP" / "AFW", root / "300W_LP" / "AFW")
    shutil.copytree(sample_tree / "hpdb" / "01", root / "hpdb" / "01")
    return root


def _case(fuzz_root: Path, dataset: str, folder: str, suffix_of):
    root = fuzz_root / folder
    ref = get_reader(dataset).list_samples(root)[0]
    target = root / suffix_of(ref.source)
    return root, ref, target


FILES = {
    "aflw2000 .mat": ("aflw2000", "AFLW2000", lambda s: s.replace(".jpg", ".mat")),
    "aflw2000 .jpg": ("aflw2000", "AFLW2000", lambda s: s),
    "300w_lp .mat": ("300w_lp", "300W_LP", lambda s: s.replace(".jpg", ".mat")),
    "biwi depth.bin": ("biwi", "hpdb", lambda s: s.replace("_rgb.png", "_depth.bin")),
    "biwi pose.txt": ("biwi", "hpdb", lambda s: s.replace("_rgb.png", "_pose.txt")),
    "biwi rgb.png": ("biwi", "hpdb", lambda s: s),
    "biwi rgb.cal": ("biwi", "hpdb", lambda s: s.split("/")[0] + "/rgb.cal"),
}


@pytest.mark.parametrize("which", sorted(FILES))
@FUZZ
@given(mutation=mutations)
def test_mutated_file_never_escapes_as_another_error(fuzz_root, which, mutation):
    dataset, folder, suffix_of = FILES[which]
    root, ref, target = _case(fuzz_root, dataset, folder, suffix_of)
    original = target.read_bytes()
    try:
        target.write_bytes(mutate(original, mutation))
        check_outcome(dataset, root, ref, target)
    finally:
        target.write_bytes(original)


@FUZZ
@given(values=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)), min_size=0, max_size=15))
def test_garbage_pose_text(fuzz_root, values):
    root, ref, target = _case(fuzz_root, "biwi", "hpdb", FILES["biwi pose.txt"][2])
    original = target.read_bytes()
    try:
        target.write_text(" ".join(str(v) for v in values))
        check_outcome("biwi", root, ref, target)
    finally:
        target.write_bytes(original)
