"""Write-shard stage: plain, deterministic tar shards any tar tool or webdataset reads.

* Members are ``<key>.<ext>`` in sorted extension order, mode 0444, fixed owner and mtime, so the
  same samples give byte-identical shards.
* A shard is written under ``<name>.tmp`` and renamed when complete: a final name never holds a
  half-written shard. The sha256 is computed while writing (no second read).
* Destinations are local folders or any fsspec URL (``file://``, ``s3://`` ...).
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re

import fsspec
import webdataset as wds

#: Fixed tar mtime (2020-01-01T00:00:00Z): determinism without pretending the epoch.
TAR_MTIME = 1577836800.0
SAFE_MEMBER = re.compile(r"^[A-Za-z0-9_-]+$")
SAFE_EXTENSION = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)*$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class _HashingWriter(io.RawIOBase):
    """File-like wrapper that hashes what passes through to ``target``."""

    def __init__(self, target):
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)


def check_member(key: str, extension: str) -> None:
    """Refuse member names that could escape a folder or confuse webdataset (dots, slashes)."""
    if not SAFE_MEMBER.match(key):
        raise ValueError(f"unsafe sample key {key!r}: only letters, digits, '_' and '-' are allowed")
    if not SAFE_EXTENSION.match(extension):
        raise ValueError(f"unsafe member extension {extension!r}")


def write_shard(fs: fsspec.AbstractFileSystem, path: str, samples: list[dict[str, bytes]]) -> dict:
    """Write ``samples`` (dicts with ``__key__`` and extension -> bytes) to ``path`` atomically.

    Returns ``{"sha256", "bytes", "samples"}``.
    """
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as raw:
        hashing = _HashingWriter(raw)
        writer = wds.TarWriter(hashing, user="dataprep", group="dataprep", mode=0o444, encoder=False, mtime=TAR_MTIME)
        for sample in samples:
            for ext in sample:
                if ext != "__key__":
                    check_member(sample["__key__"], ext)
            writer.write(sample)
        writer.close()
    fs.mv(tmp, path)
    return {"sha256": hashing.sha256.hexdigest(), "bytes": hashing.size, "samples": len(samples)}


def sha256_of(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dumps_json(obj) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces) so records and manifests are deterministic."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def write_info(fs: fsspec.AbstractFileSystem, out: str, name: str, shards: list[dict]) -> dict:
    """``_info.json`` as timm's webdataset reader reads it: per split, sample count and shard names."""
    splits: dict[str, dict] = {}
    for shard in shards:
        entry = splits.setdefault(shard["split"], {"name": shard["split"], "num_samples": 0, "filenames": [], "shard_lengths": []})
        entry["num_samples"] += shard["samples"]
        entry["filenames"].append(shard["name"])
        entry["shard_lengths"].append(shard["samples"])
    info = {"name": name, "splits": splits}
    with fs.open(posixpath.join(out, "_info.json"), "wb") as f:
        f.write(json.dumps(info, indent=2, sort_keys=True).encode("utf-8") + b"\n")
    return info
