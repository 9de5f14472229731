"""Persistent detection cache: one small JSON file per (detector fingerprint, image key).

Layout: ``<directory>/<fingerprint[:16]>/<key[:2]>/<key>.json`` where ``key`` is the image key when it
is a hex digest (e.g. sha256 of the image file bytes, see ``image_key_from_bytes``) and the sha256 of
the image key otherwise. Each file records the full fingerprint and image key, which ``get`` checks.
Files are written to a temporary name in the same folder and moved into place with ``os.replace``,
so concurrent readers see either no file or a complete one, and concurrent writers of the same
entry (which write the same content) cannot corrupt it. No pickles.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

from .base import Detection

CACHE_VERSION = 1
_HEX = re.compile(r"^[0-9a-f]{16,128}$")


def image_key_from_bytes(data: bytes) -> str:
    """Cache key of an image file: sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


class DetectionCache:
    """Detections on disk, keyed by ``(image_key, detector_fingerprint)``."""

    def __init__(self, directory) -> None:
        self.directory = Path(directory)
        #: the first error of a ``put`` the box stage met (a read-only or full disk); it then
        #: only reads the cache
        self.write_error: OSError | None = None

    def path_for(self, image_key: str, detector_fingerprint: str) -> Path:
        if not image_key or not detector_fingerprint:
            raise ValueError("image_key and detector_fingerprint must be non-empty strings")
        key = image_key.lower()
        if not _HEX.match(key):
            key = hashlib.sha256(image_key.encode("utf-8")).hexdigest()
        fp = detector_fingerprint.lower()
        if not _HEX.match(fp):
            fp = hashlib.sha256(detector_fingerprint.encode("utf-8")).hexdigest()
        return self.directory / fp[:16] / key[:2] / f"{key}.json"

    def get(self, image_key: str, detector_fingerprint: str) -> list[Detection] | None:
        """The cached detections (possibly ``[]``: no face), or None on a miss or an unreadable entry."""
        path = self.path_for(image_key, detector_fingerprint)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # truncated/corrupt file (e.g. a crash with no fsync): recompute, put() overwrites
        if (
            not isinstance(data, dict)
            or data.get("version") != CACHE_VERSION
            or data.get("fingerprint") != detector_fingerprint
            or data.get("image_key") != image_key
        ):
            return None
        try:
            return [Detection.from_json(d) for d in data["detections"]]
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, image_key: str, detector_fingerprint: str, detections: Sequence[Detection]) -> Path:
        path = self.path_for(image_key, detector_fingerprint)
        record = {
            "version": CACHE_VERSION,
            "fingerprint": detector_fingerprint,
            "image_key": image_key,
            "detections": [d.to_json() for d in detections],
        }
        text = json.dumps(record, separators=(",", ":"), allow_nan=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path
