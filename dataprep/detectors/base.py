"""The detector interface: ``Detection`` (one face) and ``Detector`` (images -> faces per image).

Nothing here imports torch, so the cache and the tracking rules can be used (and tested) without it.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import boxes as box_rules

Box = tuple[float, float, float, float]


class DetectorWeightsError(RuntimeError):
    """A detector's weights are missing, unreadable or do not fit the network."""


@dataclass(frozen=True)
class Detection:
    """One detected face.

    ``box`` is ``(x1, y1, x2, y2)`` in source-image pixels (it may reach past the image border),
    ``score`` the detector's confidence in [0, 1], ``landmarks`` five ``(x, y)`` points (eyes,
    nose, mouth corners, in the detector's order) or None.
    """

    box: Box
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        # Normalise numpy scalars/arrays to plain floats and tuples: hashable, JSON round-trips exactly.
        box = tuple(float(v) for v in np.asarray(self.box, dtype=np.float64).reshape(-1))
        if len(box) != 4:
            raise ValueError(f"Detection.box needs 4 numbers (x1, y1, x2, y2), got {self.box!r}")
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "score", float(self.score))
        if self.landmarks is not None:
            pts = np.asarray(self.landmarks, dtype=np.float64).reshape(-1, 2)
            object.__setattr__(self, "landmarks", tuple((float(x), float(y)) for x, y in pts))

    @property
    def center(self) -> tuple[float, float]:
        return box_rules.center(self.box)

    def overlaps_frame(self, width: int, height: int) -> bool:
        """Whether the box covers any of a ``width`` x ``height`` image (a box entirely outside the
        frame, or degenerate, is no use to anyone)."""
        return box_rules.area(box_rules.intersection(self.box, (0.0, 0.0, width, height))) > 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "score": self.score,
            "landmarks": None if self.landmarks is None else [list(p) for p in self.landmarks],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Detection":
        return cls(box=tuple(data["box"]), score=data["score"], landmarks=data.get("landmarks"))


def make_fingerprint(payload: dict[str, Any]) -> str:
    """Stable sha256 of a JSON-able description of everything that changes a detector's output."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_images(images: Sequence[np.ndarray]) -> None:
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            desc = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
            raise ValueError(f"detect() wants RGB uint8 H x W x 3 numpy images; image {i} is {desc.strip()}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"detect(): image {i} is empty (shape {image.shape})")


class Detector(ABC):
    """Face detector: ``detect(images) -> faces per image``, most confident face first.

    Subclasses set ``name`` and ``fingerprint`` and implement ``_detect_batch`` for a stack of
    equal-size images; ``detect`` groups the input by size and cuts each group into batches of at
    most ``batch_size`` so that every batch is one forward pass, and drops the faces that do not
    overlap their image (:meth:`Detection.overlaps_frame`).
    """

    name: str = ""
    fingerprint: str = ""
    batch_size: int = 16

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        images = list(images)
        check_images(images)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        results: list[list[Detection] | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape[:2], []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = np.stack([images[i] for i in chunk])
                found = self._detect_batch(batch)
                if len(found) != len(chunk):  # pragma: no cover - a subclass bug
                    raise RuntimeError(f"{self.name}: {len(found)} results for {len(chunk)} images")
                height, width = batch.shape[1:3]
                for i, faces in zip(chunk, found):
                    results[i] = sorted((f for f in faces if f.overlaps_frame(width, height)), key=lambda d: -d.score)
        return results  # type: ignore[return-value]

    @abstractmethod
    def _detect_batch(self, batch: np.ndarray) -> list[list[Detection]]:
        """Faces in each image of an ``N x H x W x 3`` uint8 RGB stack (one forward pass)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} fingerprint={self.fingerprint[:12]}>"
