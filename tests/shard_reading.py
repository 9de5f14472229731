"""Reading built shards in tests with plain tarfile only (no dataprep code), as other tools do."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} (webdataset's rule: the key ends at the first dot)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def label_records(out: Path) -> dict[str, dict]:
    """key -> label record of every sample in the shards of a build folder."""
    records = {}
    for shard in sorted(Path(out).glob("*.tar")):
        for key, members in read_tar(shard).items():
            records[key] = json.loads(members["json"])
    return records
