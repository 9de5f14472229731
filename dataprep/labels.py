"""Label math, written once: Euler conventions, rotation matrices, flips and classification bins.

Convention (Hopenet's, used by every record this tool writes)
-------------------------------------------------------------
Angles are in **degrees**, named ``yaw, pitch, roll``.

* 300W-LP / AFLW2000-3D ``Pose_Para`` is ``[pitch, yaw, roll, tx, ty, tz, scale]`` with the
  angles in **radians**: ``pitch = p[0], yaw = p[1], roll = p[2]`` (times 180/pi).
* BIWI ``pose.txt`` holds a rotation matrix ``M`` (rows as written). With ``R = M.T``::

      roll  = -atan2(R[1,0], R[0,0])
      yaw   = -atan2(-R[2,0], sqrt(R[2,1]**2 + R[2,2]**2))
      pitch =  atan2(R[2,1], R[2,2])

  This is the Z-Y-X decomposition ``R = Rz(-roll) @ Ry(-yaw) @ Rx(pitch)``.

The ``rotation`` stored in every record is ``rotation_from_euler(yaw, pitch, roll)``, the matrix in
that same convention (for BIWI ``M.T`` made exactly orthonormal through its angles: ``pose.txt``'s
six printed digits leave ``M`` a rotation to ~1e-6 only, and the two differ by as little), and
``rotation_to_euler(record["rotation"])`` gives back the record's angles (below: for every head pose;
a matrix from elsewhere, a network's output, loses precision near |yaw| = 90, where this convention
has its gimbal lock). The formulas above return |yaw| <= 90; a rotation
with |yaw| > 90 (AFLW2000 and 300W-LP hold a few; protocol 1 keeps yaw up to 99) comes out of them
as the other angle triple of the same rotation, ``(±180 - yaw, pitch ∓ 180, roll ∓ 180)``, pitch
and roll both past 90. ``rotation_to_euler`` returns the triple whose largest angle is smaller
instead: the label's, for every head pose (BIWI's angles are the formulas' exactly).

A horizontal image flip negates yaw and roll and keeps pitch; on the matrix it is the conjugation
``S @ R @ S`` with ``S = diag(-1, 1, 1)``. Points and boxes mirror as ``x -> W + c - x`` where ``c``
is twice the coordinate of pixel column 0's centre, less 1 (:func:`mirror_offset`: 1 for MATLAB
coordinates, centre at 1; 0 for continuous ones, centre at 0.5), and
68 landmarks are re-indexed (:data:`MIRROR_68`) so that index i is the same facial point after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RAD2DEG = 180.0 / math.pi
DEG2RAD = math.pi / 180.0

#: Mirror across the image's vertical axis (x -> -x).
MIRROR_X = np.diag([-1.0, 1.0, 1.0])


#: The largest |angle| a label may have, in degrees: Euler angles of a rotation lie within ±180
#: (:func:`rotation_to_euler`), and the readers reject labels past it.
MAX_ANGLE = 180.0


def finite_number(value) -> bool:
    """Whether a value read from a label record (JSON) is a finite number (a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def angle_problem(record: dict, angle: str, limit: float | None = None) -> str | None:
    """Why ``record[angle]`` (``yaw``, ``pitch`` or ``roll``) is no usable label, or None: not a
    finite number of degrees, or (with ``limit``) past ±``limit``. ``verify`` and the loader say it
    in these words."""
    value = record.get(angle)
    if not finite_number(value):
        return f"record {angle} is {value!r}, not a finite number of degrees"
    if limit is not None and abs(value) > limit:
        return f"record {angle} is {value!r}, past ±{limit:g} degrees"
    return None


#: How far a record's ``rotation`` may be from :func:`rotation_from_euler` of its angles (both are
#: written from the same float64 angles and read back exactly, so any difference is an edit).
ROTATION_TOLERANCE = 1e-6


def rotation_problem(record: dict) -> str | None:
    """Why ``record["rotation"]`` is not the rotation of the record's (finite) angles, or None: not
    a 3x3 matrix of finite numbers, or off :func:`rotation_from_euler` by more than
    :data:`ROTATION_TOLERANCE` (a record edited, or written with another angle convention)."""
    try:
        m = np.asarray(record.get("rotation"), dtype=np.float64)
    except (TypeError, ValueError):
        m = None
    if m is None or m.shape != (3, 3) or not np.all(np.isfinite(m)):
        return f"record rotation is {record.get('rotation')!r:.80}, not a 3x3 matrix of finite numbers"
    off = float(np.abs(m - rotation_from_euler(record["yaw"], record["pitch"], record["roll"])).max())
    if off > ROTATION_TOLERANCE:
        return (f"record rotation is not the rotation of its yaw, pitch and roll (off by up to {off:.3g}; "
                "README, Label conventions): an edited record, or one written with another convention")
    return None


def pose_para_to_euler(pose_para) -> tuple[float, float, float]:
    """``Pose_Para`` (any shape holding >= 3 values, radians) -> ``(yaw, pitch, roll)`` degrees."""
    p = np.asarray(pose_para, dtype=np.float64).reshape(-1)
    if p.size < 3:
        raise ValueError(f"Pose_Para needs at least 3 values, got {p.size}")
    pitch, yaw, roll = p[0] * RAD2DEG, p[1] * RAD2DEG, p[2] * RAD2DEG
    return float(yaw), float(pitch), float(roll)


def euler_to_pose_para(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``(yaw, pitch, roll)`` degrees -> ``Pose_Para``'s first three values ``[pitch, yaw, roll]``
    in radians (the inverse of :func:`pose_para_to_euler`; the sample data writes them)."""
    return np.array([pitch, yaw, roll]) * DEG2RAD


def rotation_to_euler(rotation):
    """Rotation matrix ``R`` in our convention -> ``(yaw, pitch, roll)`` degrees: of the rotation's
    two angle triples, the Z-Y-X formulas above (|yaw| <= 90) and ``(±180 - yaw, pitch ∓ 180,
    roll ∓ 180)``, the one whose largest angle is smaller (ties: the formulas'). A label comes back
    exactly unless all three of its angles are past ``180 - its largest`` (for labels within ±99,
    all three past 81 degrees: no head pose). A torch tensor of matrices ``(..., 3, 3)`` gives a
    tensor ``(..., 3)`` (the trainer's MNN decode)."""
    if _is_tensor(rotation):
        torch = _torch()
        r = rotation
        roll = torch.rad2deg(-torch.atan2(r[..., 1, 0], r[..., 0, 0]))
        yaw = torch.rad2deg(-torch.atan2(-r[..., 2, 0], torch.hypot(r[..., 2, 1], r[..., 2, 2])))
        pitch = torch.rad2deg(torch.atan2(r[..., 2, 1], r[..., 2, 2]))
        half = torch.full_like(yaw, 180.0)
        alt = (torch.copysign(half, yaw) - yaw, pitch - torch.copysign(half, pitch), roll - torch.copysign(half, roll))
        largest = torch.stack([yaw, pitch, roll], dim=-1).abs().amax(dim=-1)
        other = torch.stack(alt, dim=-1).abs().amax(dim=-1) < largest
        return torch.stack([torch.where(other, a, f) for a, f in zip(alt, (yaw, pitch, roll))], dim=-1)
    r = np.asarray(rotation, dtype=np.float64)
    roll = -math.atan2(r[1, 0], r[0, 0]) * RAD2DEG
    yaw = -math.atan2(-r[2, 0], math.hypot(r[2, 1], r[2, 2])) * RAD2DEG
    pitch = math.atan2(r[2, 1], r[2, 2]) * RAD2DEG
    alt = (math.copysign(180.0, yaw) - yaw, pitch - math.copysign(180.0, pitch), roll - math.copysign(180.0, roll))
    if max(map(abs, alt)) < max(abs(yaw), abs(pitch), abs(roll)):
        return alt
    return yaw, pitch, roll


def biwi_matrix_to_euler(m) -> tuple[float, float, float]:
    """BIWI ``pose.txt`` matrix ``M`` (as written, row by row) -> ``(yaw, pitch, roll)`` degrees."""
    return rotation_to_euler(np.asarray(m, dtype=np.float64).T)


def euler_to_biwi_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``(yaw, pitch, roll)`` degrees -> the matrix BIWI's ``pose.txt`` holds, ``M = R^T`` (the
    inverse of :func:`biwi_matrix_to_euler`; the sample data writes it)."""
    return rotation_from_euler(yaw, pitch, roll).T


def _rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def _ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def rotation_from_euler(yaw, pitch, roll):
    """``(yaw, pitch, roll)`` degrees -> rotation matrix ``Rz(-roll) @ Ry(-yaw) @ Rx(pitch)``. Torch
    tensors of angles ``(...)`` give a float32 tensor of matrices ``(..., 3, 3)`` (the trainer's MNN
    loss; computed in float32 whatever the angles' dtype: ~2e-7 off the NumPy path)."""
    if _is_tensor(yaw):
        return _rotation_from_euler_tensor(yaw, pitch, roll)
    return _rz(-roll * DEG2RAD) @ _ry(-yaw * DEG2RAD) @ _rx(pitch * DEG2RAD)


def _rotation_from_euler_tensor(yaw, pitch, roll):
    torch = _torch()
    z, y, x = (torch.deg2rad(a.float()) for a in (-roll, -yaw, pitch))
    one, zero = torch.ones_like(z), torch.zeros_like(z)

    def matrix(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rz = matrix([[z.cos(), -z.sin(), zero], [z.sin(), z.cos(), zero], [zero, zero, one]])
    ry = matrix([[y.cos(), zero, y.sin()], [zero, one, zero], [-y.sin(), zero, y.cos()]])
    rx = matrix([[one, zero, zero], [zero, x.cos(), -x.sin()], [zero, x.sin(), x.cos()]])
    return rz @ ry @ rx


def flip_euler(yaw: float, pitch: float, roll: float) -> tuple[float, float, float]:
    """Angles after a horizontal image flip: yaw and roll negated, pitch kept."""
    return -yaw, pitch, -roll


def flip_rotation(rotation) -> np.ndarray:
    """Rotation matrix after a horizontal image flip (``S R S``, ``S = diag(-1, 1, 1)``)."""
    r = np.asarray(rotation, dtype=np.float64)
    return MIRROR_X @ r @ MIRROR_X


# --------------------------------------------------------------------------------------------
# Flips of points and boxes; the 68-point mirror permutation (iBUG 300-W / Multi-PIE markup, 0-based)
# --------------------------------------------------------------------------------------------
_MIRROR_PAIRS: tuple[tuple[int, int], ...] = (
    # jaw line 0-16: reversed (8, the chin, stays)
    *((i, 16 - i) for i in range(8)),
    # eyebrows: right 17-21 <-> left 26-22
    (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),
    # nose bridge 27-30 stays; lower nose 31-35: 31<->35, 32<->34 (33 stays)
    (31, 35), (32, 34),
    # eyes: 36-41 <-> 45-42, 47, 46 (outer corner <-> outer corner, upper lid <-> upper lid, ...)
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
    # outer lips 48-59: corners 48<->54; 51 (top) and 57 (bottom) stay
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),
    # inner lips 60-67: corners 60<->64; 62 and 66 stay
    (60, 64), (61, 63), (65, 67),
)


def _mirror_permutation() -> np.ndarray:
    perm = np.arange(68)
    for a, b in _MIRROR_PAIRS:
        perm[a], perm[b] = b, a
    return perm


#: ``mirrored[i] = mirror_x(points[MIRROR_68[i]])``: the point that plays role ``i`` after a flip.
#: It is an involution (``MIRROR_68[MIRROR_68] == arange(68)``).
MIRROR_68: np.ndarray = _mirror_permutation()
MIRROR_68.setflags(write=False)


#: Datasets whose landmarks, and the boxes made from them (:data:`LANDMARK_BOXES`), are MATLAB pixel
#: coordinates: the centre of pixel column i (0-based) is at x = i + 1, so a mirror is
#: ``x -> W + 1 - x``, as 300W-LP's own ``*_Flip`` files have it (their ``pt2d`` x + the original's
#: = 451 in 450 px images). Records keep these values as the datasets give them (the papers' crops
#: read them so). Detector boxes, BIWI's boxes and the integer ``crop`` window are continuous: pixel
#: i spans [i, i + 1), a mirror is ``x -> W - x``.
ONE_BASED_DATASETS = ("300w_lp", "aflw2000")
#: The box variants made from the landmarks (``boxes.bbox_of_points``, ``boxes.pt2d_boxes``).
LANDMARK_BOXES = ("gt", "pt2d", "pt2d_valid")


def mirror_offset(dataset: str, box_name: str | None = None) -> float:
    """The ``c`` of a horizontal mirror ``x -> W + c - x`` for ``dataset``'s landmarks (``box_name``
    None) or its box variant ``box_name``: 1 for MATLAB coordinates (:data:`ONE_BASED_DATASETS`'
    landmarks and landmark boxes), else 0."""
    if dataset in ONE_BASED_DATASETS and (box_name is None or box_name in LANDMARK_BOXES):
        return 1.0
    return 0.0


def mirror_box(box, image_width: float, offset: float = 0.0):
    """``[x1, y1, x2, y2]`` after a horizontal flip of an image ``image_width`` wide (x -> W + offset
    - x, corners swapped so that x1 <= x2 still); None stays None."""
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return [image_width + offset - x2, y1, image_width + offset - x1, y2]


def mirror_points(points, image_width: float, offset: float = 0.0) -> np.ndarray:
    """N x 2 points after a horizontal flip of an image ``image_width`` wide: x -> W + offset - x,
    in the same order (300W-LP's ``_Flip`` files keep ``pt2d``'s order; a new copy)."""
    out = np.array(points, copy=True)
    out[:, 0] = image_width + offset - out[:, 0]
    return out


def mirror_landmarks(landmarks, image_width: float, offset: float = 0.0) -> np.ndarray:
    """68 x 2 landmarks after a horizontal flip of an image ``image_width`` wide: x -> W + offset - x,
    re-indexed with :data:`MIRROR_68` (index i is the same facial point before and after)."""
    p = np.asarray(landmarks)
    if p.shape != (68, 2):
        raise ValueError(f"horizontal flip needs 68 x 2 landmarks (iBUG markup), got shape {p.shape}")
    return mirror_points(p[MIRROR_68], image_width, offset)


def is_rotation(rotation, tol: float = 1e-3) -> bool:
    """True when ``rotation`` is a proper 3x3 rotation (orthonormal, det +1) within ``tol``."""
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape != (3, 3) or not np.all(np.isfinite(r)):
        return False
    return bool(np.allclose(r @ r.T, np.eye(3), atol=tol) and abs(np.linalg.det(r) - 1.0) < tol)


def angles_in_range(yaw: float, pitch: float, roll: float, limit: float = 99.0) -> bool:
    """Protocol 1's filter: every angle finite and inside ``[-limit, limit]``."""
    return all(math.isfinite(a) and -limit <= a <= limit for a in (yaw, pitch, roll))


# --------------------------------------------------------------------------------------------
# Classification bins
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinSpec:
    """Equal-width angle bins over ``[low, high]`` for classification heads.

    ``decode`` follows the papers' code: ``width * E[index] + low`` (Hopenet: ``3 * E - 99``).
    """

    name: str
    low: float
    high: float
    width: float

    @property
    def count(self) -> int:
        return int(round((self.high - self.low) / self.width))

    def to_bin(self, angle):
        """Angle(s) in degrees -> bin index(es) in ``[0, count - 1]`` (a torch tensor gives an int64
        tensor on its device: the trainer's targets).

        Hopenet's ``np.digitize`` puts an angle of exactly ``high`` into bin ``count`` (one past the
        last class) and crashes the cross-entropy; we clip both ends instead.
        """
        if _is_tensor(angle):
            return ((angle.float() - self.low) / self.width).floor().long().clamp(0, self.count - 1)
        a = np.asarray(angle, dtype=np.float64)
        idx = np.floor((a - self.low) / self.width).astype(np.int64)
        idx = np.clip(idx, 0, self.count - 1)
        return int(idx) if idx.ndim == 0 else idx

    def centers(self) -> np.ndarray:
        return self.low + self.width * (np.arange(self.count) + 0.5)

    def decode(self, probabilities):
        """Softmax probabilities ``(..., count)`` -> angle(s) in degrees, as the papers decode (the
        expected bin index: ``width * sum(p * index) + low``; a torch tensor stays one)."""
        if _is_tensor(probabilities):
            index = _torch().arange(self.count, device=probabilities.device, dtype=probabilities.dtype)
            return self.width * (probabilities * index).sum(dim=-1) + self.low
        p = np.asarray(probabilities, dtype=np.float64)
        return self.width * (p * np.arange(self.count)).sum(axis=-1) + self.low


#: Hopenet: 66 bins of 3 degrees over [-99, 99].
HOPENET_BINS = BinSpec("hopenet", -99.0, 99.0, 3.0)
#: EHPNet (and its maskpose follow-up): 62 bins of 3 degrees over [-93, 93].
EHPNET_BINS = BinSpec("ehpnet", -93.0, 93.0, 3.0)
#: WHENet full-range yaw: 120 bins of 3 degrees over [-180, 180].
WHENET_YAW_BINS = BinSpec("whenet_yaw", -180.0, 180.0, 3.0)


def wrapped_angle_difference(a, b):
    """Smallest absolute difference between angles in degrees on the circle (WHENet's yaw loss;
    torch tensors in, a tensor out, gradients kept)."""
    if _is_tensor(a) or _is_tensor(b):
        d = _torch().remainder((a - b).abs(), 360.0)
        return _torch().minimum(d, 360.0 - d)
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


def _is_tensor(x) -> bool:
    """A torch tensor (without importing torch for numpy callers)."""
    return type(x).__module__.startswith("torch")


def _torch():
    import torch

    return torch
