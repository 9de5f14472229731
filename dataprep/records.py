"""The data types that pass between pipeline stages: read raw -> box -> crop -> augment -> write shard."""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from .shards import NAME_CHARS

DATASETS = ("300w_lp", "aflw2000", "biwi")


class SampleError(Exception):
    """A sample that cannot be written. ``reason`` is a short stable code for the summary table;
    the message names the file and says what is wrong (and, where it helps, what to do)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


_KEY_UNSAFE = re.compile(f"[^{NAME_CHARS}]+")
_STEM_SAFE = re.compile(f"^[/{NAME_CHARS}]*$")  # a path of such names


def make_key(dataset: str, relative_stem: str) -> str:
    """Stable sample key from the dataset name and the image path without extension.

    webdataset cuts keys at the first dot and treats ``/`` as a folder, so both become ``_``.
    Example: ``300w_lp`` + ``AFW_Flip/AFW_134212_1_0`` -> ``300w_lp_AFW_Flip_AFW_134212_1_0``.
    Every file name in the real datasets is made of letters, digits, ``_`` and ``-``; a stem with
    anything else (``image.00111``, a space) would share its key with another file
    (``image_00111``), so its key ends with ``-`` and 8 hex digits of the stem's sha1.
    """
    key = _KEY_UNSAFE.sub("_", f"{dataset}_{relative_stem}")
    return key if _STEM_SAFE.match(relative_stem) else distinct_key(key, relative_stem)


def distinct_key(key: str, name: str) -> str:
    """``key`` told apart from others that sanitise alike: ``-`` and 8 hex digits of ``name``'s sha1."""
    return f"{key}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def keys_apart_from_variants(refs: Sequence[SampleRef], suffixes: Sequence[str]) -> list[SampleRef]:
    """``refs`` (same order) where no sample's key is also a key ``--augment`` gives another
    sample's variant (``KEY`` + each of ``suffixes``: a file named ``image00111_flip.jpg`` beside
    ``image00111.jpg`` built with ``flip``): each such sample's key gets :func:`distinct_key` of its
    source, as two files whose keys sanitise alike do. Otherwise a shard would hold two samples of
    one name, which webdataset refuses to read."""
    refs = list(refs)
    for _ in range(len(suffixes) + 1):
        variants = Counter(r.key + s for r in refs for s in suffixes)
        keys = {r.key for r in refs}
        taken = {k for k, n in variants.items() if n > 1 or k in keys}
        if not taken:
            return refs
        refs = [replace(r, key=distinct_key(r.key, r.source))
                if r.key in taken or any(r.key + s in taken and r.key + s not in keys for s in suffixes) else r
                for r in refs]
    raise ValueError("sample keys still coincide with --augment variant keys after renaming")


@dataclass(frozen=True, slots=True)
class SampleRef:
    """A raw sample found on disk, before anything is read (cheap to list, picklable)."""

    dataset: str  # one of DATASETS
    key: str  # stable id, no dots (see make_key)
    source: str  # image path relative to --root, POSIX
    group: str  # 300W-LP subset ("AFW_Flip"), BIWI sequence ("01"), AFLW2000: "AFLW2000"


@dataclass
class RawSample:
    """One sample read from the raw files, labels converted to our convention (see labels.py)."""

    ref: SampleRef
    image: np.ndarray  # H x W x 3 uint8, RGB
    yaw: float  # degrees
    pitch: float
    roll: float
    rotation: np.ndarray  # 3x3, labels.rotation_from_euler(yaw, pitch, roll)
    #: Ground-truth-derived face boxes in source pixels, name -> [x1, y1, x2, y2].
    boxes: dict[str, list[float]] = field(default_factory=dict)
    #: 68 facial landmarks (x, y) in source pixels where the dataset has them.
    landmarks: np.ndarray | None = None
    #: BIWI depth map aligned to the depth camera, H x W uint16 millimetres (0 = no reading).
    depth: np.ndarray | None = None
    #: JSON-able extras carried into the label record (e.g. ``pose_para``, ``head_center_mm``).
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_angles(cls, ref: SampleRef, image: np.ndarray, yaw: float, pitch: float, roll: float, **fields) -> "RawSample":
        """A sample whose ``rotation`` is built from its angles in our convention (labels.py)."""
        from .labels import rotation_from_euler

        return cls(ref=ref, image=image, yaw=yaw, pitch=pitch, roll=roll,
                   rotation=rotation_from_euler(yaw, pitch, roll), **fields)
