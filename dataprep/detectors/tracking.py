"""Choosing one face per image, and FSA-Net's BIWI per-sequence rules. Pure Python, no torch.

BIWI (``track_sequence``), after FSA-Net's ``data/TYY_create_db_biwi.py`` (protocol 1, "noTrack")
and ``data/TYY_create_db_biwi_70_30.py`` (protocol 2), restated on box centres:

* keep faces with ``score > min_score`` (0.90 for ``mode="none"``, 0.95 for ``mode="previous"``);
* of those, take the face whose box centre is nearest (Euclidean) to ``(2W/3, 2H/3)``;
* a "jump" is a chosen box whose centre is ``max_jump`` (80) px or more from the centre of the
  previous *accepted* box of the sequence;
* ``mode="none"``: no face -> frame rejected ``"no_face"``; jump -> rejected ``"box_jump"``;
* ``mode="previous"``: no face or jump -> the previous accepted box is reused (``reused=True``), or,
  before any box was accepted, the frame is rejected (``"no_face"`` / ``"box_jump"``).

Differences from FSA-Net's scripts (which use the TensorFlow ``mtcnn`` package): FSA-Net measures
both distances on the top-left corner of the box enlarged by 40 % and clipped to the image
(nearest face: ``|xw1 - 2W/3| + |yw1 - 2H/3|``; jump: ``|xw1 - xw1_prev|``, x only); it always
accepts a sequence's first frame, and compares later frames with a zero box while nothing has been
accepted yet (so a sequence whose first frame has no face loses most of its frames); in protocol 1 a
frame whose faces are all below 0.90 silently reuses the previous chosen box instead of being dropped;
in protocol 2 a first frame with no face is cropped at the zero box. Here a frame with nothing
accepted before it is accepted if it has a face, and rejected otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..boxes import center_distance
from ..boxes import iou
from .base import Box, Detection

MODES = ("none", "previous")
DEFAULT_MIN_SCORE = {"none": 0.90, "previous": 0.95}
DEFAULT_MAX_JUMP = 80.0


#: The least IoU between a detected face and the ground-truth-derived box for that face to be the
#: labelled one. The labelled face's MTCNN box against its landmark box: IoU 0.59-0.77 on the real
#: samples; a neighbour's face touching the box: under 0.1.
MATCH_IOU = 0.3


def select_face(
    detections: Sequence[Detection],
    reference_box: Sequence[float] | None = None,
    min_score: float = 0.0,
    min_iou: float = MATCH_IOU,
) -> Detection | None:
    """The face to crop from one image.

    With a ``reference_box`` (a ground-truth-derived box): among the faces with ``score >=
    min_score``, the one overlapping it most, if by IoU ``>= min_iou``; else None (the labelled
    face was not found: a face elsewhere, or one merely touching the box, is someone else, however
    confident the detector is). Without one: the most confident face. Ties go to the more confident,
    then the earlier detection.
    """
    best: Detection | None = None
    best_key = None
    for det in detections:
        if det.score < min_score:
            continue
        if reference_box is None:
            key = (det.score,)
        else:
            overlap = iou(det.box, reference_box)
            if overlap < min_iou or overlap <= 0.0:
                continue
            key = (overlap, det.score)
        if best_key is None or key > best_key:
            best, best_key = det, key
    return best


@dataclass(frozen=True)
class TrackResult:
    """What to crop for one frame: ``box``/``score`` (None when ``rejected``), ``reused`` when the box is
    the previous accepted frame's, ``rejected`` ``"no_face"``/``"box_jump"`` when the frame is dropped."""

    box: Box | None
    score: float | None
    reused: bool = False
    rejected: str | None = None

    @property
    def accepted(self) -> bool:
        return self.rejected is None


def nearest_to_anchor(
    detections: Sequence[Detection], anchor: tuple[float, float], min_score: float
) -> Detection | None:
    """The face with ``score > min_score`` whose centre is nearest to ``anchor`` (ties: higher score, then first)."""
    best: Detection | None = None
    best_key: tuple[float, float] | None = None
    for det in detections:
        if not det.score > min_score:
            continue
        cx, cy = det.center
        key = (math.hypot(cx - anchor[0], cy - anchor[1]), -det.score)
        if best_key is None or key < best_key:
            best, best_key = det, key
    return best


def track_sequence(
    frames: Sequence[Sequence[Detection]],
    image_size: tuple[int, int] = (640, 480),
    mode: str = "none",
    *,
    min_score: float | None = None,
    max_jump: float = DEFAULT_MAX_JUMP,
    anchor: tuple[float, float] = (2.0 / 3.0, 2.0 / 3.0),
) -> list[TrackResult]:
    """Apply the BIWI rules to one sequence's detections, in frame order (see the module docstring).

    ``image_size`` is ``(W, H)``; ``anchor`` is the preferred face centre as fractions of it.
    ``min_score`` defaults to 0.90 (``"none"``) / 0.95 (``"previous"``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    threshold = DEFAULT_MIN_SCORE[mode] if min_score is None else float(min_score)
    width, height = image_size
    point = (anchor[0] * width, anchor[1] * height)
    previous: TrackResult | None = None  # last accepted frame (own or reused box)
    results: list[TrackResult] = []
    for detections in frames:
        chosen = nearest_to_anchor(detections, point, threshold)
        if chosen is None:
            problem = "no_face"
        elif previous is not None and center_distance(chosen.box, previous.box) >= max_jump:
            problem = "box_jump"
        else:
            problem = None
        if problem is None:
            result = TrackResult(box=chosen.box, score=chosen.score)
            previous = result
        elif mode == "previous" and previous is not None:
            result = TrackResult(box=previous.box, score=previous.score, reused=True)
            previous = result
        else:
            result = TrackResult(box=None, score=None, rejected=problem)
        results.append(result)
    return results


