"""Box rules, in one place: face boxes from points, and the crop windows users compare.

All boxes are ``[x1, y1, x2, y2]`` floats in source-image pixels.

Crop rules (``CROP_RULES``), each documented against the code it reproduces:

* ``square`` (default, EHPNet's fix): pad the shorter side of the face box by half the difference
  on each side, so the face is not squashed when the crop is resized to a square. ``margin``
  enlarges the square by that fraction of its side on each side (0 = tight).
* ``hopenet``: Hopenet's loose crop (``code/datasets.py``). The corners are updated one after the
  other, so ``x_max`` grows with the already-moved ``x_min`` (kept bug for bug)::

      x1 -= s * k * |x2 - x1|;  y1 -= t * k * |y2 - y1|
      x2 += s * k * |x2 - x1|;  y2 += 0.6 * k * |y2 - y1|

  with the sides ``s`` and top ``t`` of each dataset's class there (``HOPENET_FACTORS``): 300W-LP
  ``s = 0.6, t = 2``; AFLW2000 ``s = 2, t = 2`` (twice as wide: its window is ~1.9 box widths
  across); BIWI ``s = 0.6, t = 1``; and ``k`` uniform in [0.2, 0.4] per sample for 300W-LP, 0.2
  for AFLW2000 and 0.35 for BIWI.
  Hopenet's box is the min/max of *all* ``pt2d`` points, AFLW2000's placeholders included.
  The window is the square of that loose crop Hopenet's network sees (:func:`hopenet_view`): its
  transforms keep the aspect ratio (``Scale`` then a 224 crop), so the window is never squashed;
  a tall window loses its top and bottom, a wide one its sides.
* ``fsanet``: FSA-Net's margin crop (``data/type1/TYY_create_db_type1.py``): ``ad`` of the box
  width/height on each side (:data:`FSANET_MARGINS`: 0.6 for 300W-LP and AFLW2000, 0.4 for BIWI,
  whose far-edge pixel its BIWI scripts include), truncated to integers and clipped to the image.
  Its box is ``pt2d_valid``: the readers drop the points FSA-Net drops first
  (:func:`fsanet_points_mask`). The window is not square (squashed on resize).
* ``box``: the face box as it is.
"""
from __future__ import annotations

import math
import numpy as np

Box = list  # [x1, y1, x2, y2]

#: Which ground-truth box each rule reads when ``--detector gt`` (the one the paper's code used).
RULE_GT_BOX = {"square": "gt", "box": "gt", "hopenet": "pt2d", "fsanet": "pt2d_valid"}

def rule_box_name(boxes: dict, box_source: str, rule: str) -> str:
    """The box a crop rule reads. In a detector build, the detector's box (``box_source``) for
    every rule; otherwise the ground-truth box the rule's own code used (``RULE_GT_BOX``: Hopenet's
    ``pt2d``, FSA-Net's ``pt2d_valid``) when the sample has it, else ``gt``."""
    if box_source in boxes and box_source not in RULE_GT_BOX.values():
        return box_source
    wanted = RULE_GT_BOX.get(rule, "gt")
    return wanted if wanted in boxes else "gt"


HOPENET_K = {"300w_lp": (0.2, 0.4), "aflw2000": (0.2, 0.2), "biwi": (0.35, 0.35)}
#: Hopenet's (side, top) factors of k per dataset (its Pose_300W_LP, AFLW2000 and BIWI classes).
HOPENET_FACTORS = {"300w_lp": (0.6, 2.0), "aflw2000": (2.0, 2.0), "biwi": (0.6, 1.0)}
#: FSA-Net's margin (a fraction of the box width / height on each side) per dataset: its 300W-LP and
#: AFLW2000 script (``data/type1/TYY_create_db_type1.py``, run with ``--ad 0.6``) 0.6; its BIWI
#: scripts (``data/TYY_create_db_biwi.py``, ``..._biwi_70_30.py``) 0.4, and they cut
#: ``img[y1:y2 + 1, x1:x2 + 1]``, the end pixel included (the type1 script cuts ``img[y1:y2, x1:x2]``).
FSANET_MARGINS = {"300w_lp": 0.6, "aflw2000": 0.6, "biwi": 0.4}
#: The widest of them: the room a square crop needs for every FSA-Net window (``ROOM_MARGIN``).
FSANET_MARGIN = max(FSANET_MARGINS.values())


def bbox_of_points(points, mask=None) -> Box:
    """Min/max box of ``(N, 2)`` points (optionally only where ``mask`` is True)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if mask is not None:
        p = p[np.asarray(mask, dtype=bool)]
    if len(p) == 0:
        raise ValueError("no valid points to build a box from")
    return [float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())]


def fsanet_points_mask(points) -> np.ndarray:
    """FSA-Net's filter of ``pt2d`` points: keep ``x > 0``, or ``y > 0`` when that keeps fewer
    (its comment: "I found negative value in AFLW2000"); drops AFLW2000's x = -1 placeholders."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    keep_x, keep_y = p[:, 0] > 0, p[:, 1] > 0
    return keep_y if keep_x.sum() > keep_y.sum() else keep_x


def pt2d_boxes(points) -> dict[str, Box]:
    """The boxes the papers' code derives from a ``.mat``'s ``pt2d`` points, kept for comparison:
    ``pt2d`` (Hopenet: min/max of all points, placeholders included) and ``pt2d_valid`` (FSA-Net).
    ``pt2d_valid`` is left out where FSA-Net's filter keeps no point (all placeholders, or all off
    the image's left or top edge: its code fails there); a rule that reads it takes ``gt``
    (:func:`rule_box_name`), whose own checks then judge the sample."""
    keep = fsanet_points_mask(points)
    found = {"pt2d": bbox_of_points(points)}
    if keep.any():
        found["pt2d_valid"] = bbox_of_points(points, keep)
    return found


def width_height(box) -> tuple[float, float]:
    return float(box[2] - box[0]), float(box[3] - box[1])


def center(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def center_distance(a, b) -> float:
    """Distance between two boxes' centres (pixels)."""
    (ax, ay), (bx, by) = center(a), center(b)
    return math.hypot(ax - bx, ay - by)


def aspect_ratio(box) -> float:
    """Width / height (1.0 for a square)."""
    w, h = width_height(box)
    return w / h if h > 0 else math.inf


def square_distortion(box) -> float:
    """How much resizing ``box`` to a square squashes it: ``max(w, h) / min(w, h) - 1``."""
    w, h = width_height(box)
    lo = min(w, h)
    return max(w, h) / lo - 1.0 if lo > 0 else math.inf


def area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def intersection(a, b) -> Box:
    """The overlap of two boxes (zero :func:`area` where they do not meet)."""
    return [max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])]


def iou(a, b) -> float:
    inter = area(intersection(a, b))
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def clip_to_image(box, image_size) -> Box:
    w, h = image_size
    return [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]


def is_inside_image(box, image_size, tolerance: float = 0.0) -> bool:
    w, h = image_size
    t = tolerance
    return box[0] >= -t and box[1] >= -t and box[2] <= w + t and box[3] <= h + t


#: A face box narrower or lower than this (pixels) cannot be a face: points that coincide.
MIN_BOX_SIDE = 2.0
#: The least share of a face box that must lie inside its image. Real 300W-LP / AFLW2000 boxes of
#: profile faces reach a little past the edge; one mostly outside is a broken label.
MIN_BOX_INSIDE = 0.25


def inside_fraction(box, image_size) -> float:
    """The share of ``box``'s area inside a ``(w, h)`` image (1.0 for a box without area)."""
    total = area(box)
    return area(clip_to_image(box, image_size)) / total if total > 0 else 1.0


def box_problem(box, image_size) -> str | None:
    """Why ``box`` cannot be a face box of a ``(w, h)`` image, or None: non-finite coordinates,
    degenerate (a side under :data:`MIN_BOX_SIDE`), or mostly outside the image (under
    :data:`MIN_BOX_INSIDE` of its area inside). The build rejects such a sample (``bad_box``)
    rather than write a black or one-pixel crop."""
    if not all(math.isfinite(v) for v in box):
        return "has coordinates that are not finite numbers"
    bw, bh = width_height(box)
    if bw < MIN_BOX_SIDE or bh < MIN_BOX_SIDE:
        return f"is degenerate ({bw:g} x {bh:g} px)"
    inside = inside_fraction(box, image_size)
    if inside < MIN_BOX_INSIDE:
        w, h = image_size
        return f"lies mostly outside the {w} x {h} image ({inside:.0%} of it inside)"
    return None


def square_pad(box, margin: float = 0.0) -> Box:
    """Square window around ``box``: the shorter side padded by half the difference on each side,
    then ``margin`` x side added on every side."""
    w, h = width_height(box)
    cx, cy = center(box)
    half = max(w, h) / 2.0 * (1.0 + 2.0 * margin)
    return [cx - half, cy - half, cx + half, cy + half]


def hopenet_loose(box, k: float, dataset: str) -> Box:
    """Hopenet's loose crop window (sequential corner updates, see module docstring)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side, top = HOPENET_FACTORS.get(dataset, HOPENET_FACTORS["300w_lp"])
    x1 -= side * k * abs(x2 - x1)
    y1 -= top * k * abs(y2 - y1)
    x2 += side * k * abs(x2 - x1)
    y2 += 0.6 * k * abs(y2 - y1)
    return [x1, y1, x2, y2]


#: Hopenet's transforms: ``train_hopenet.py`` ``Scale(240)``, ``RandomCrop(224)``;
#: ``test_hopenet.py`` ``Scale(224)``, ``CenterCrop(224)`` (``Scale(n)``: the shorter side to n).
HOPENET_TRAIN_SCALE, HOPENET_INPUT = 240, 224


def hopenet_view(loose, rng=None) -> Box:
    """The square of Hopenet's ``loose`` window that its network sees. Training (``rng`` given, for
    the offsets): a square of 224/240 of the shorter side anywhere in the window; testing (None):
    the centred square of the shorter side."""
    x1, y1, x2, y2 = (float(v) for v in loose)
    w, h = x2 - x1, y2 - y1
    if rng is None:
        side = min(w, h)
        ox, oy = (w - side) / 2.0, (h - side) / 2.0
    else:
        side = min(w, h) * HOPENET_INPUT / HOPENET_TRAIN_SCALE
        ox, oy = float(rng.uniform(0.0, w - side)), float(rng.uniform(0.0, h - side))
    return [x1 + ox, y1 + oy, x1 + ox + side, y1 + oy + side]


def hopenet_k(dataset: str, rng) -> float:
    """Hopenet's k for ``dataset``: drawn with ``rng.uniform(lo, hi)`` (a ``np.random.Generator`` or
    a ``random.Random``) where the dataset has a range, its midpoint without ``rng``."""
    lo, hi = HOPENET_K.get(dataset, (0.2, 0.2))
    if lo == hi:
        return lo
    if rng is None:
        return (lo + hi) / 2.0
    return float(rng.uniform(lo, hi))


def fsanet_margin(box, image_size, dataset: str = "300w_lp") -> Box:
    """FSA-Net's window for ``dataset``: integer box, its margin (:data:`FSANET_MARGINS`) x w/h on
    each side, the far edge clipped to the image's last pixel (and, on BIWI, that pixel included,
    as its BIWI scripts cut)."""
    margin = FSANET_MARGINS.get(dataset, FSANET_MARGINS["300w_lp"])
    end = 1 if dataset == "biwi" else 0
    w_img, h_img = image_size
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = x2 - x1, y2 - y1
    return [
        float(max(int(x1 - margin * w), 0)),
        float(max(int(y1 - margin * h), 0)),
        float(min(int(x2 + margin * w), w_img - 1) + end),
        float(min(int(y2 + margin * h), h_img - 1) + end),
    ]


def crop_window(rule: str, box, *, dataset: str, image_size, rng=None, margin: float = 0.0) -> Box:
    """The crop window of ``rule`` around face ``box`` (source pixels, may extend past the image)."""
    if rule == "square":
        return square_pad(box, margin)
    if rule == "hopenet":
        return hopenet_view(hopenet_loose(box, hopenet_k(dataset, rng), dataset), rng)
    if rule == "fsanet":
        return fsanet_margin(box, image_size, dataset)
    if rule == "box":
        return [float(v) for v in box]
    raise ValueError(f"unknown crop rule {rule!r}; choose one of {sorted(CROP_RULES)}")


CROP_RULES: dict[str, str] = {
    "square": "square-padded face box (EHPNet); default",
    "hopenet": "the square of Hopenet's loose crop its network sees (k in [0.2,0.4] 300W-LP, 0.2 AFLW2000, 0.35 BIWI)",
    "fsanet": "FSA-Net's margin crop (0.6 of the box per side; BIWI 0.4), clipped to the image",
    "box": "the face box itself",
}

#: The build ``--margin`` (square crops, ``square_pad``) whose stored crops hold a rule's whole
#: window, so that a load-time re-crop to it sees no black padding: Hopenet's window reaches
#: 2k = 0.8 box heights above the box at k = 0.4 (half side 0.5 + 0.8 = 1.3 = 0.5 (1 + 2 x 0.8));
#: FSA-Net's 0.6 of the box on each side (0.5 + 0.6 = 0.5 (1 + 2 x 0.6)).
ROOM_MARGIN: dict[str, float] = {"square": 0.0, "box": 0.0, "hopenet": 0.8, "fsanet": FSANET_MARGIN}


def integer_window(window) -> list[int]:
    """Round a window to whole pixels (the crop actually taken; recorded as ``crop``): its corner
    and its width and height each rounded, so a square window stays square (rounding both edges
    instead made a third of square windows 1 px off, squashing the face on resize)."""
    x1, y1 = int(math.floor(window[0] + 0.5)), int(math.floor(window[1] + 0.5))
    fw, fh = window[2] - window[0], window[3] - window[1]
    w = max(int(math.floor(fw + 0.5)), 1)
    # a square's two sides, computed from different corners, can differ in the last bit: at a
    # half-pixel size that would round them apart
    h = w if math.isclose(fw, fh, rel_tol=1e-9, abs_tol=1e-9) else max(int(math.floor(fh + 0.5)), 1)
    return [x1, y1, x1 + w, y1 + h]


def to_crop_coords(points, crop, size) -> np.ndarray:
    """Map source-pixel points ``(N, 2)`` (or a box as 2 points) into the stored crop's pixels.

    ``crop`` is the record's window ``[x1, y1, x2, y2]``; ``size`` the stored image ``(w, h)``.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    sx = size[0] / (crop[2] - crop[0])
    sy = size[1] / (crop[3] - crop[1])
    # one broadcast op pair (per sample in the loader's sample dicts): the same float64 arithmetic
    # per element as stacked_to_crop_coords (kept apart: that one costs 2 us more for one sample)
    return (p - np.array([crop[0], crop[1]], np.float64)) * np.array([sx, sy], np.float64)


def stacked_to_crop_coords(points, crops, sizes) -> np.ndarray:
    """:func:`to_crop_coords` of a stack: points ``(B, N, 2)``, one crop ``(B, 4)`` and one size
    ``(B, 2)`` each -> ``(B, N, 2)`` float64. One broadcast op pair for a whole batch (the loader
    maps each batch's landmarks this way); the same float64 arithmetic per element."""
    p = np.asarray(points, dtype=np.float64)
    c = np.asarray(crops, dtype=np.float64).reshape(-1, 4)
    scale = np.asarray(sizes, dtype=np.float64).reshape(-1, 2) / (c[:, 2:] - c[:, :2])
    return (p - c[:, None, :2]) * scale[:, None, :]


def points_to_input_pixels(points, crops, sizes, origins) -> np.ndarray:
    """Landmarks ``(B, N, 2)`` in their records' source coordinates -> model-input pixel
    coordinates with pixel ``j``'s centre at ``j`` (as array indices, OpenCV's drawing and heatmap
    grids take them), through each sample's ``crop`` window resized to its ``size``. ``origins``
    ``(B,)``: each record's ``labels.mirror_offset``, twice the coordinate of source pixel 0's
    centre less 1 (1 for 300W-LP / AFLW2000's MATLAB coordinates, 0 for continuous ones). Mapping MATLAB points
    as continuous ones instead puts them ``0.5 x scale + 0.5`` output pixels off."""
    p = np.asarray(points, dtype=np.float64) - 0.5 * np.asarray(origins, dtype=np.float64).reshape(-1, 1, 1)
    return stacked_to_crop_coords(p, crops, sizes) - 0.5


def box_from_crop_coords(box, crop, size) -> Box:
    """A box in the pixels of a ``size`` = ``(w, h)`` image cut from the source window ``crop``
    -> source pixels (the inverse of :func:`box_to_crop_coords`; plain floats): the source window a
    part of a stored crop shows."""
    crop = [float(v) for v in crop]
    sx, sy = (crop[2] - crop[0]) / size[0], (crop[3] - crop[1]) / size[1]
    return [crop[0] + box[0] * sx, crop[1] + box[1] * sy, crop[0] + box[2] * sx, crop[1] + box[3] * sy]


def box_to_crop_coords(box, crop, size) -> Box:
    """``to_crop_coords`` for one box, in plain floats (the same float64 operations, no NumPy:
    this runs per sample in the loader)."""
    sx = size[0] / (crop[2] - crop[0])
    sy = size[1] / (crop[3] - crop[1])
    return [(float(box[0]) - crop[0]) * sx, (float(box[1]) - crop[1]) * sy,
            (float(box[2]) - crop[0]) * sx, (float(box[3]) - crop[1]) * sy]

