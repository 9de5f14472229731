"""The streaming shard writer writes exactly the bytes webdataset's TarWriter wrote (the format every
existing build has), holds nothing back, and never leaves a partial shard under a final name."""
from __future__ import annotations

import hashlib
import io
import random

import fsspec
import pytest

from dataprep import shards


def _reference(samples) -> bytes:
    wds = pytest.importorskip("webdataset")
    buf = io.BytesIO()
    writer = wds.TarWriter(buf, user="dataprep", group="dataprep", mode=0o444, encoder=False, mtime=shards.TAR_MTIME)
    for sample in samples:
        writer.write(sample)
    writer.close()
    return buf.getvalue()


def _samples(rnd: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        key = "k" * rnd.choice([1, 40, 99, 100, 101, 150]) + f"_{i}"
        sample = {"__key__": key}
        for ext in rnd.sample(["jpg", "json", "pts.npy", "depth.png"], rnd.randint(1, 4)):
            sample[ext] = rnd.randbytes(rnd.choice([0, 1, 511, 512, 513, 5000, rnd.randint(0, 40000)]))
        out.append(sample)
    return out


@pytest.mark.parametrize("fast", [True, False])
def test_bytes_match_webdataset_tarwriter(tmp_path, monkeypatch, fast):
    if not fast:  # the tarfile fallback a Python whose tarfile writes other headers would take
        monkeypatch.setattr(shards._template(), "usable", False)
    fs = fsspec.filesystem("file")
    rnd = random.Random(7)
    for trial in range(25):
        samples = _samples(rnd, rnd.randint(1, 5))
        path = str(tmp_path / f"{trial}.tar")
        writer = shards.ShardWriter(fs, path, buffer_size=rnd.choice([1, 700, 1 << 20]))
        for sample in samples:
            writer.write(sample)
        result = writer.close()
        expected = _reference(samples)
        data = (tmp_path / f"{trial}.tar").read_bytes()
        assert data == expected
        assert result == {"sha256": hashlib.sha256(expected).hexdigest(), "bytes": len(expected), "samples": len(samples)}
        assert not (tmp_path / f"{trial}.tar.tmp").exists()


def test_write_shard_and_empty_shards(tmp_path):
    fs = fsspec.filesystem("file")
    samples = _samples(random.Random(1), 3)
    shards.write_shard(fs, str(tmp_path / "a.tar"), samples)
    assert (tmp_path / "a.tar").read_bytes() == _reference(samples)
    shards.write_shard(fs, str(tmp_path / "empty.tar"), [])
    assert (tmp_path / "empty.tar").read_bytes() == _reference([])
    got = shards.ShardWriter(fs, str(tmp_path / "none.tar")).close()  # no samples: an empty archive all the same
    assert got["samples"] == 0 and (tmp_path / "none.tar").read_bytes() == _reference([])


def test_an_error_mid_shard_leaves_no_file(tmp_path):
    fs = fsspec.filesystem("file")
    with pytest.raises(ValueError, match="unsafe"):
        with shards.ShardWriter(fs, str(tmp_path / "x.tar"), buffer_size=1) as writer:
            writer.write({"__key__": "fine", "jpg": b"1" * 3000})
            writer.write({"__key__": "../escape", "jpg": b"1"})
    assert list(tmp_path.iterdir()) == []


def test_memory_filesystem(tmp_path):
    fs = fsspec.filesystem("memory")
    samples = _samples(random.Random(2), 2)
    shards.write_shard(fs, "/shard-writer-test/a.tar", samples)
    assert fs.cat_file("/shard-writer-test/a.tar") == _reference(samples)
    fs.rm("/shard-writer-test", recursive=True)
