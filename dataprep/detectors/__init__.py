"""Face detection: one interface (``Detector.detect(images) -> faces per image``), two detectors
(MTCNN from facenet-pytorch, RetinaFace-ResNet50 from retinaface-pytorch), a persistent cache and
the BIWI tracking rules.

Importing this package does not import torch; the detector modules are loaded by ``create_detector``
(or on first access to ``MTCNNDetector`` / ``RetinaFaceDetector``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..devices import resolve_device
from .base import Detection, Detector, DetectorWeightsError
from .cache import (
    DetectionCache,
    image_key_from_bytes,
)
from .tracking import MATCH_IOU, TrackResult, iou, select_face, track_sequence


def _make_mtcnn(*, device="auto", batch_size=16, retinaface_weights=None, min_score=None, **options) -> Detector:
    from .mtcnn import MTCNNDetector

    return MTCNNDetector(device=device, batch_size=batch_size, min_score=min_score, **options)


def _make_retinaface(*, device="auto", batch_size=16, retinaface_weights=None, min_score=None, **options) -> Detector:
    from .retinaface import RetinaFaceDetector

    return RetinaFaceDetector(
        weights=retinaface_weights, device=device, batch_size=batch_size, min_score=min_score, **options
    )


#: name -> factory taking create_detector's keyword arguments.
DETECTORS: dict[str, Callable[..., Detector]] = {"mtcnn": _make_mtcnn, "retinaface": _make_retinaface}


def create_detector(
    name: str,
    *,
    device: Any = "auto",
    batch_size: int = 16,
    retinaface_weights: str | Path | None = None,
    min_score: float | None = None,
    **options: Any,
) -> Detector:
    """A ready detector. ``device="auto"``: cuda when available, else cpu.

    ``min_score``: MTCNN drops faces below it (default: keep all MTCNN returns, its own stage
    thresholds being 0.6/0.7/0.7); RetinaFace uses it as the confidence threshold (default 0.7).
    ``retinaface_weights``: path to the released ``retinaface_resnet50_2020-07-20`` .zip or .pth
    (default: look in the torch hub checkpoint cache). ``options`` go to the detector class
    (e.g. ``max_size`` / ``nms_threshold`` for RetinaFace, ``min_face_size`` for MTCNN).
    """
    try:
        factory = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}") from None
    return factory(
        device=device, batch_size=batch_size, retinaface_weights=retinaface_weights, min_score=min_score, **options
    )


def __getattr__(attr: str):
    if attr == "MTCNNDetector":
        from .mtcnn import MTCNNDetector

        return MTCNNDetector
    if attr == "RetinaFaceDetector":
        from .retinaface import RetinaFaceDetector

        return RetinaFaceDetector
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = [
    "DETECTORS",
    "Detection",
    "DetectionCache",
    "Detector",
    "DetectorWeightsError",
    "MTCNNDetector",
    "RetinaFaceDetector",
    "TrackResult",
    "create_detector",
    "image_key_from_bytes",
    "iou",
    "resolve_device",
    "select_face",
    "MATCH_IOU",
    "track_sequence",
]
