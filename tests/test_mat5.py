"""The fast MAT v5 reader gives what scipy.io.loadmat gives, or None (loadmat decides)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from dataprep.datasets import matfile
from dataprep.datasets.mat5 import read_numeric_mat


def _loadmat(data: bytes) -> dict:
    return {k: v for k, v in scipy.io.loadmat(io.BytesIO(data)).items() if not k.startswith("__")}


def _assert_same(ours: dict, ref: dict, what) -> None:
    assert list(ours) == list(ref), what
    for key, want in ref.items():
        got = ours[key]
        assert got.dtype == want.dtype and got.shape == want.shape, (what, key, got.dtype, want.dtype)
        assert np.array_equal(got, want, equal_nan=True), (what, key)
        assert got.flags.writeable  # its own memory, not a view of the file's bytes


def _savemat(arrays: dict, **kw) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, arrays, **kw)
    return buf.getvalue()


def test_the_sample_datasets_mat_files_read_as_loadmat_reads_them(sample_tree):
    files = sorted(sample_tree.rglob("*.mat"))
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        ours = read_numeric_mat(data)
        assert ours is not None, path  # the datasets' layout takes the fast path
        _assert_same(ours, _loadmat(data), path)


def test_real_mat_files_read_as_loadmat_reads_them(real_samples: Path):
    files = sorted(real_samples.rglob("*.mat"))
    assert files
    for path in files:
        data = path.read_bytes()
        ours = read_numeric_mat(data)
        assert ours is not None, path
        _assert_same(ours, _loadmat(data), path)


def test_numeric_types_shapes_and_stored_types():
    rng = np.random.default_rng(0)
    arrays = {
        "f64": rng.random((3, 5)),
        "f32": rng.random((2, 68)).astype(np.float32),
        "whole_doubles": np.array([[1.0, 2.0, 250.0]]),
        "i16": np.array([[-3, 400, 7, 9]], np.int16),
        "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "i64": np.array([[2**40, -5]], np.int64),
        "column": rng.random(4),  # 1-D: a column, as oned_as says
        "cube": rng.random((2, 3, 4)),
        "empty": np.zeros((0, 3)),
        "nan": np.array([[np.nan, np.inf, -0.0]]),
        "scalar": np.array(7.5),
    }
    data = _savemat(arrays, do_compression=True)
    ours = read_numeric_mat(data)
    assert ours is not None
    _assert_same(ours, _loadmat(data), "numeric")


@pytest.mark.parametrize("arrays,kw", [
    ({"x": np.ones((2, 2))}, dict(do_compression=False)),  # uncompressed elements
    ({"name": "text"}, dict(do_compression=True)),  # char
    ({"c": np.array([[1 + 2j]])}, dict(do_compression=True)),  # complex
    ({"b": np.array([[True, False]])}, dict(do_compression=True)),  # logical
    ({"s": {"a": 1.0}}, dict(do_compression=True)),  # struct
    ({"cell": np.array([np.ones(2), "x"], dtype=object)}, dict(do_compression=True)),  # cell
])
def test_other_content_is_left_to_loadmat(arrays, kw):
    data = _savemat(arrays, **kw)
    assert read_numeric_mat(data) is None
    assert read_numeric_mat(data[:100]) is None and read_numeric_mat(b"") is None


def test_damaged_files_are_never_read_where_loadmat_refuses_them(sample_tree):
    """Random byte changes and cuts: whatever this reader returns, loadmat returns the same; where
    loadmat fails, this reader returns None (and load_mat reports loadmat's error)."""
    data = sorted(sample_tree.rglob("*.mat"))[0].read_bytes()
    rng = np.random.default_rng(1)
    read = refused = 0
    for trial in range(400):
        damaged = bytearray(data)
        if trial % 4 == 0:
            damaged = damaged[:int(rng.integers(0, len(data)))]
        elif trial % 4 == 1:  # the header's free text: both read the file
            damaged[int(rng.integers(0, 116))] = int(rng.integers(32, 127))
        else:
            for _ in range(int(rng.integers(1, 4))):
                damaged[int(rng.integers(0, len(damaged)))] = int(rng.integers(0, 256))
        damaged = bytes(damaged)
        ours = read_numeric_mat(damaged)
        try:
            ref = _loadmat(damaged)
        except Exception:  # noqa: BLE001 - loadmat's refusal, whatever its type
            assert ours is None, trial
            refused += 1
            continue
        if ours is not None:
            _assert_same(ours, ref, trial)
            read += 1
    assert read > 10 and refused > 10  # both sides of the property were exercised


def test_load_mat_reads_the_datasets_files_without_loadmat_and_others_with_it(sample_tree, tmp_path, monkeypatch):
    path = sorted(sample_tree.rglob("*.mat"))[0]
    want = _loadmat(path.read_bytes())
    calls = []
    real = scipy.io.loadmat
    monkeypatch.setattr(matfile.scipy.io, "loadmat", lambda *a, **k: calls.append(a) or real(*a, **k))
    _assert_same({k: v for k, v in matfile.load_mat(path, "x.mat").items()}, want, "fast")
    assert calls == []
    other = tmp_path / "plain.mat"
    other.write_bytes(_savemat({"Pose_Para": np.ones((1, 7))}, do_compression=False))
    assert np.array_equal(matfile.load_mat(other, "plain.mat")["Pose_Para"], np.ones((1, 7)))
    assert len(calls) == 1
