"""``dataprep verify OUT``: re-hash every shard against the manifest and decode every record."""
from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass, field

import cv2
import fsspec
import numpy as np

from . import codec
from .build import MANIFEST
from .shards import sha256_of


@dataclass
class VerifyReport:
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _decode_member(name: str, data: bytes) -> None:
    ext = name.split(".", 1)[1]
    if ext == "json":
        record = json.loads(data)
        for k in ("key", "yaw", "pitch", "roll", "rotation", "box", "crop", "source"):
            if k not in record:
                raise ValueError(f"label record lacks {k!r}")
    elif ext == "jpg":
        if codec.decode_bgr(data) is None:
            raise ValueError("JPEG does not decode")
    elif ext == "pts.npy":
        np.load(io.BytesIO(data), allow_pickle=False)
    elif ext == "depth.png":
        depth = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if depth is None or depth.dtype != np.uint16:
            raise ValueError("depth PNG does not decode to 16 bits")


def check_shard(fileobj, expected_samples: int) -> tuple[int, str | None]:
    """Decode every member; returns (samples, first problem or None)."""
    keys: list[str] = []
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            name = member.name
            if not member.isfile() or name.startswith("/") or ".." in name.split("/"):
                return len(keys), f"member {name!r} is not a plain relative file"
            key = name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
            try:
                data = tar.extractfile(member).read()
                _decode_member(name, data)
                if name.endswith(".json") and json.loads(data)["key"] != key:
                    raise ValueError("record key differs from the member name")
            except Exception as err:  # noqa: BLE001 - report any decode failure
                return len(keys), f"sample {key!r} ({name}): {err}"
    if len(keys) != expected_samples:
        return len(keys), f"holds {len(keys)} samples, the manifest says {expected_samples}"
    return len(keys), None


def verify(out: str, decode: bool = True) -> VerifyReport:
    fs, base = fsspec.core.url_to_fs(out)
    report = VerifyReport()
    manifest_path = posixpath.join(base, MANIFEST)
    if not fs.exists(manifest_path):
        report.problems.append(f"{manifest_path}: no manifest; is this a dataprep build folder?")
        return report
    manifest = json.loads(fs.cat_file(manifest_path))
    counts = manifest["counts"]
    if counts["read"] != counts["written"] + counts["rejected"]:
        report.problems.append(f"manifest counts do not add up: read {counts['read']} != written {counts['written']} + rejected {counts['rejected']}")
    for shard in manifest["shards"]:
        path = posixpath.join(base, shard["name"])
        report.shards_checked += 1
        if not fs.exists(path):
            report.problems.append(f"{shard['name']}: missing")
            break
        digest = sha256_of(fs, path)
        if digest != shard["sha256"]:
            report.problems.append(f"{shard['name']}: sha256 {digest[:16]}... differs from the manifest's {shard['sha256'][:16]}...")
            break
        if decode:
            with fs.open(path, "rb") as f:
                n, problem = check_shard(f, shard["samples"])
            report.samples_checked += n
            if problem:
                report.problems.append(f"{shard['name']}: {problem}")
                break
    return report
