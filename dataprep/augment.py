"""Augmentation: small, composable, seedable transforms on ``(image, record, landmarks)``.

Every transform is called as ``t(image, record, landmarks, rng)`` and returns a new
``(image, record, landmarks)`` triple:

* ``image``: ``H x W x 3`` ``uint8`` RGB, the stored face crop (never modified in place);
* ``record``: the shard's JSON label record (a new dict is returned; the input is not touched);
* ``landmarks``: ``(68, 2)`` points in **source-image** pixels, or ``None``;
* ``rng``: a ``numpy.random.Generator``. Random parameters are drawn from it and nothing else, so
  the same generator state gives the same output. ``None`` means a fresh, unseeded generator.

Each transform appends ``{"op": name, **params}`` to ``record["augment"]`` with the parameters it
actually drew, so a sample says exactly what was done to it.

All geometry in a record is in source-image pixels (``image_size = [W, H]``). A horizontal flip of
the stored crop is the crop of the mirrored source image at the mirrored window, so it maps the crop
window ``x -> W - x``, and boxes and landmarks ``x -> W + c - x`` with ``c`` twice the coordinate of
pixel column 0's centre, less 1 (1 for 300W-LP / AFLW2000 MATLAB coordinates: :func:`labels.mirror_offset`), and re-indexes
the landmarks so point ``i`` is still the same facial point. Label math comes from
:mod:`dataprep.labels` only.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

from . import boxes as box_rules
from . import labels
from .labels import MIRROR_68, mirror_landmarks

__all__ = [
    "MIRROR_68",
    "DOWNSAMPLE_FACTORS",
    "Transform",
    "HorizontalFlip",
    "GaussianBlur",
    "BoxBlur",
    "RingBlur",
    "DownUpSample",
    "Brightness",
    "Contrast",
    "RandomCropScale",
    "FsanetAugment",
    "EhpnetAugment",
    "Compose",
    "RandomApply",
    "SPEC_NAMES",
    "augment_names",
    "parse_augment_spec",
    "offline_variants",
    "variant_suffixes",
    "key_rng",
    "mirror_landmarks",
]

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _clone(value):
    """Deep copy of JSON-like data (dicts, lists, scalars; arrays copied), faster than deepcopy."""
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (str, int, float, bool, type(None), tuple)):
        return value
    return copy.deepcopy(value)


def _new_record(record: dict, entry: dict) -> dict:
    """Deep copy of ``record`` with ``entry`` appended to its ``augment`` list."""
    out = _clone(record)
    out["augment"] = list(out.get("augment") or []) + [entry]
    return out


def _rng(rng) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


def _range(value, name: str) -> tuple[float, float]:
    """A scalar ``v`` -> ``(v, v)``; a pair -> itself (checked ``lo <= hi``)."""
    if np.isscalar(value):
        return float(value), float(value)
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ValueError(f"{name}: range ({lo}, {hi}) has low > high")
    return lo, hi


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo if lo == hi else float(rng.uniform(lo, hi))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.dtype != np.uint8:
        got = getattr(image, "shape", type(image)), getattr(image, "dtype", None)
        raise ValueError(f"expected an H x W x 3 uint8 image, got {got}")


class Transform:
    """Base class: ``t(image, record, landmarks=None, rng=None) -> (image, record, landmarks)``."""

    name = "transform"

    def __call__(self, image, record, landmarks=None, rng=None):  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
class HorizontalFlip(Transform):
    """Mirror the crop left-right and every label with it (deterministic; ``rng`` is unused).

    Yaw and roll are negated and pitch kept (:func:`labels.flip_euler`), ``rotation`` becomes
    :func:`labels.flip_rotation`, boxes / ``box`` / ``crop`` map ``[x1, y1, x2, y2] ->
    [W + c - x2, y1, W + c - x1, y2]`` with ``W = image_size[0]`` and ``c`` the coordinates' pixel
    origin (:func:`labels.mirror_offset`: 1 for 300W-LP / AFLW2000 landmark boxes, 0 for the rest,
    and for ``crop``, whose mirror is exactly the mirrored crop), and landmarks are mirrored the same
    way and re-indexed with :data:`MIRROR_68`. ``extra`` (e.g. ``pose_para``) keeps the source's
    unflipped values.
    """

    name = "flip"

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        width = float(record["image_size"][0])
        out = _new_record(record, {"op": self.name})
        out["yaw"], out["pitch"], out["roll"] = labels.flip_euler(record["yaw"], record["pitch"], record["roll"])
        if record.get("rotation") is not None:
            out["rotation"] = labels.flip_rotation(record["rotation"]).tolist()
        dataset = record.get("dataset", "")
        if isinstance(record.get("boxes"), dict):
            out["boxes"] = {k: labels.mirror_box(v, width, labels.mirror_offset(dataset, k))
                            for k, v in record["boxes"].items()}
        if record.get("box") is not None:
            offset = labels.mirror_offset(dataset, record.get("box_source", "gt"))
            out["box"] = labels.mirror_box(record["box"], width, offset)
        if record.get("crop") is not None:
            crop = record["crop"]
            mirrored = labels.mirror_box(crop, width)
            if all(isinstance(v, (int, np.integer)) for v in crop):
                mirrored = [int(round(v)) for v in mirrored]
            out["crop"] = mirrored
        lm = None
        if landmarks is not None:
            lm = mirror_landmarks(landmarks, width, labels.mirror_offset(dataset)).astype(np.asarray(landmarks).dtype)
        return cv2.flip(image, 1).reshape(image.shape), out, lm


def _resample_window(image: np.ndarray, current, window, size) -> np.ndarray:
    """Resample the part of ``image`` (which covers source window ``current``) that covers source
    window ``window``, to ``size = (w, h)``; what ``image`` does not cover is black."""
    h, w = image.shape[:2]
    out_w, out_h = size
    sx, sy = w / (current[2] - current[0]), h / (current[3] - current[1])
    step_x = (window[2] - window[0]) / out_w
    step_y = (window[3] - window[1]) / out_h
    # output pixel centre u + 0.5 -> source x -> input pixel coordinate (centres at integers)
    matrix = np.array(
        [
            [step_x * sx, 0.0, (window[0] - current[0] + 0.5 * step_x) * sx - 0.5],
            [0.0, step_y * sy, (window[1] - current[1] + 0.5 * step_y) * sy - 0.5],
        ]
    )
    return cv2.warpAffine(
        image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )


class RandomCropScale(Transform):
    """FSA-Net-style random re-crop: a window of the crop's size times ``s ~ U(scale)``, its centre
    moved by ``U(-shift, shift)`` times the crop's width/height, cut from the stored crop.

    The new window is rounded to whole source pixels and recorded as ``crop`` (and as the entry's
    ``window``, with the window it was cut from as ``from``); the output keeps the input's size.
    Parts of the window the stored crop does not cover come out black. Landmarks and
    boxes are in source pixels and do not change.
    """

    name = "cropscale"

    def __init__(self, scale=(0.8, 1.2), shift=0.1):
        self.scale = _range(scale, "scale")
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.shift = _range((-shift, shift) if np.isscalar(shift) else shift, "shift")

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        rng = _rng(rng)
        s = _uniform(rng, *self.scale)
        dx, dy = _uniform(rng, *self.shift), _uniform(rng, *self.shift)
        cur = [float(v) for v in record["crop"]]
        cw, ch = cur[2] - cur[0], cur[3] - cur[1]
        cx, cy = (cur[0] + cur[2]) / 2.0 + dx * cw, (cur[1] + cur[3]) / 2.0 + dy * ch
        window = box_rules.integer_window([cx - s * cw / 2, cy - s * ch / 2, cx + s * cw / 2, cy + s * ch / 2])
        h, w = image.shape[:2]
        out_img = _resample_window(image, cur, window, (w, h))
        # "from": the window the input showed; the new window's part outside it is black
        out = _new_record(record, {"op": self.name, "scale": s, "shift": [dx, dy], "window": window,
                                   "from": list(record["crop"])})
        out["crop"] = window
        return out_img, out, None if landmarks is None else np.array(landmarks, copy=True)


class FsanetAugment(Transform):
    """FSA-Net's training augmentation (``TYY_generators.augment_data``, which its
    ``data_generator_pose`` applies to every training batch), on the model-input crop:

    * one of, a quarter of the time each: trim ``dn ~ 1..15`` pixels off each axis at a random
      offset and resize back (bicubic); move the crop's content by up to ``dn`` pixels over a black
      canvas; the same over a white one; nothing;
    * then, 70% of the time, zoom each axis by its own factor in [0.8, 1.2] about the centre
      (above 1 shows more; edge pixels repeated; Keras' ``random_zoom``).

    The record's ``crop`` becomes the source window the new image shows (where it is filled,
    black, white or repeated edges, not the source's pixels); angles and landmarks (source pixels)
    do not change.
    """

    name = "fsanet_augment"

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        rng = _rng(rng)
        h, w = image.shape[:2]
        out, window, ops = image.copy(), [0.0, 0.0, float(w), float(h)], []
        r = rng.random()
        if r < 0.75:
            dn = int(rng.integers(15)) + 1
            dx, dy = int(rng.integers(dn)), int(rng.integers(dn))
            part = image[dy:h - (dn - dy), dx:w - (dn - dx)]
            if r < 0.25:  # random_crop
                out = cv2.resize(part, (w, h), interpolation=cv2.INTER_CUBIC)
                window = [float(dx), float(dy), float(w - (dn - dx)), float(h - (dn - dy))]
                ops.append({"trim": dn, "at": [dx, dy]})
            else:  # random_crop_black / random_crop_white
                fill = 0 if r < 0.5 else 255
                sx, sy = int(rng.integers(dn)), int(rng.integers(dn))
                out = np.full_like(image, fill)
                out[sy:h - (dn - sy), sx:w - (dn - sx)] = part
                window = [float(dx - sx), float(dy - sy), float(dx - sx + w), float(dy - sy + h)]
                ops.append({"shift": [dx - sx, dy - sy], "trim": dn, "fill": fill})
        if rng.random() > 0.3:  # random_zoom
            zx, zy = (float(z) for z in rng.uniform(0.8, 1.2, 2))
            cx, cy = (w - 1) / 2.0, (h - 1) / 2.0  # pixel-centre coordinates of the middle
            matrix = np.array([[zx, 0.0, cx * (1 - zx)], [0.0, zy, cy * (1 - zy)]])
            out = cv2.warpAffine(out, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_REPLICATE)
            mx, my = (window[0] + window[2]) / 2.0, (window[1] + window[3]) / 2.0
            ww, wh = (window[2] - window[0]) * zx, (window[3] - window[1]) * zy
            window = [mx - ww / 2.0, my - wh / 2.0, mx + ww / 2.0, my + wh / 2.0]
            ops.append({"zoom": [zx, zy]})
        new = _new_record(record, {"op": self.name, "steps": ops})
        new["crop"] = box_rules.box_from_crop_coords(window, record["crop"], (w, h))
        return out, new, _copy(landmarks)


#: EHPNet's sharpening kernel (``datasets.py``: ``cv2.filter2D`` with it).
_SHARPEN_KERNEL = np.array([[-1, -1, -1], [-1, 9, -1], [-1, -1, -1]], np.float32)


def _sharpness(image: np.ndarray) -> float:
    """EHPNet's ``is_blur``: the variance of the colour image's Laplacian (64-bit floats, all
    channels together); its augmentation changes only images sharper than 120."""
    return float(cv2.Laplacian(image, cv2.CV_64F).var())


class EhpnetAugment(Transform):
    """EHPNet's training augmentation (``transform`` in maskpose's ``datasets.py``, which
    ``Pose_300W_LPA_60bin`` applies after its flip), on the model-input crop (112 x 112), each
    step drawing as the code does:

    * half the time, brightness and contrast ``cv2.convertScaleAbs(alpha ~ U[0.75, 1.25), beta in
      {-15, -13, ..., 13})``; a darkening pair (``alpha < 1.05`` and ``beta < 0``) only on images
      whose mean grey is above 200;
    * then, each only while the image is sharp (:func:`_sharpness` > 120, measured again before
      each step): half the time trim ``r in 5..10`` pixels off every side and resize back; 70% of
      the time resize down to ``n in {30, 33, ..., 99}`` pixels square and back up; 40% of the time
      a Gaussian blur (kernel 3, 5, 7 or 9), else 70% of the time a 3 x 3 sharpening; half the time
      shrink by ``2 p`` pixels (``p in 2..5``) inside a black border of ``p``;
    * 30% of the time grey. The code converts its BGR image with ``COLOR_RGB2GRAY`` (so blue weighs
      0.299 and red 0.114) and feeds the grey as the first (blue) plane with the other two at the
      normalisation's zero (pixel 127.5): here the blue plane is that grey and red and green are 128
      (the nearest 8-bit level, 1/256 off in the model input).

    The code's fixed 112 is the input size here (the same for EHPNet's 112 px input). The record's
    ``crop`` follows the trim and the border (the source window the image shows); angles and
    landmarks (source pixels) do not change.
    """

    name = "ehpnet_augment"

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        rng = _rng(rng)
        h, w = image.shape[:2]
        out, window, steps = image.copy(), [0.0, 0.0, float(w), float(h)], []
        if rng.random() > 0.5:
            alpha, beta = 0.75 + 0.5 * float(rng.random()), int(rng.choice(np.arange(-15, 15, 2)))
            if not (alpha < 1.05 and beta < 0) or float(np.mean(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY))) > 200:
                out = cv2.convertScaleAbs(out, alpha=alpha, beta=beta)
                steps.append({"contrast": alpha, "brightness": beta})
        if _sharpness(out) > 120 and rng.random() > 0.5:
            r = int(rng.choice(np.arange(5, 11)))
            out = cv2.resize(out[r:h - r, r:w - r], (w, h))
            window = box_rules.box_from_crop_coords([r, r, w - r, h - r], window, (w, h))
            steps.append({"trim": r})
        if _sharpness(out) > 120 and rng.random() > 0.3:
            n = int(rng.choice(np.arange(30, 100, 3)))
            out = cv2.resize(cv2.resize(out, (n, n)), (w, h))
            steps.append({"down_up": n})
        if _sharpness(out) > 120:
            if rng.random() > 0.6:
                k = int(rng.choice(np.arange(3, 10, 2)))
                out = cv2.GaussianBlur(out, (k, k), 0)
                steps.append({"blur": k})
            elif rng.random() > 0.3:
                out = cv2.filter2D(out, -1, _SHARPEN_KERNEL)
                steps.append({"sharpen": True})
        if _sharpness(out) > 120 and rng.random() > 0.5:
            p = int(rng.choice(np.arange(2, 6)))
            out = cv2.copyMakeBorder(cv2.resize(out, (w - 2 * p, h - 2 * p)), p, p, p, p, cv2.BORDER_CONSTANT, value=0)
            # the shrunk image fills [p, size - p]: the border is ex, ey pixels of the image before
            ex, ey = p * w / (w - 2 * p), p * h / (h - 2 * p)
            window = box_rules.box_from_crop_coords([-ex, -ey, w + ex, h + ey], window, (w, h))
            steps.append({"border": p})
        if rng.random() > 0.7:
            grey = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)  # the code's RGB2GRAY on a BGR image
            out = np.full_like(out, 128)
            out[:, :, 2] = grey
            steps.append({"grey": True})
        new = _new_record(record, {"op": self.name, "steps": steps})
        new["crop"] = box_rules.box_from_crop_coords(window, record["crop"], (w, h))
        return out, new, _copy(landmarks)


# --------------------------------------------------------------------------------------------
# Blur and resolution
# --------------------------------------------------------------------------------------------
class GaussianBlur(Transform):
    """Gaussian blur with ``sigma ~ U(sigma)`` pixels (of the stored crop; 0 is the identity)."""

    name = "blur"

    def __init__(self, sigma=(0.5, 2.0)):
        self.sigma = _range(sigma, "sigma")
        if self.sigma[0] < 0:  # it would blur nothing and record a negative sigma as done
            raise ValueError(f"sigma must be >= 0, got {sigma}")

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        s = _uniform(_rng(rng), *self.sigma)
        out_img = cv2.GaussianBlur(image, (0, 0), sigmaX=s, sigmaY=s) if s > 0 else image.copy()
        return out_img, _new_record(record, {"op": self.name, "sigma": s}), _copy(landmarks)


class BoxBlur(Transform):
    """Mean filter with a square kernel of ``k`` pixels, ``k`` a random integer in ``kernel``
    (inclusive); ``k = 1`` is the identity."""

    name = "boxblur"

    def __init__(self, kernel=(3, 7)):
        lo, hi = _range(kernel, "kernel")
        if lo < 1 or lo != int(lo) or hi != int(hi):
            raise ValueError(f"kernel sizes must be integers >= 1, got {kernel}")
        self.kernel = (int(lo), int(hi))

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        lo, hi = self.kernel
        k = lo if lo == hi else int(_rng(rng).integers(lo, hi + 1))
        out_img = cv2.blur(image, (k, k)) if k > 1 else image.copy()
        return out_img, _new_record(record, {"op": self.name, "kernel": k}), _copy(landmarks)


#: PIL's ``ImageFilter.BLUR``: the 16 pixels of a 5 x 5 window's ring, averaged.
_RING_KERNEL = np.ones((5, 5), np.float32)
_RING_KERNEL[1:4, 1:4] = 0.0
_RING_KERNEL /= _RING_KERNEL.sum()


class RingBlur(Transform):
    """PIL's ``ImageFilter.BLUR`` (Hopenet's training blur): each pixel the mean of the 16 pixels
    of the ring around it in a 5 x 5 window, the image's edge pixels repeated past it."""

    name = "ringblur"

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        out_img = cv2.filter2D(image, -1, _RING_KERNEL, borderType=cv2.BORDER_REPLICATE)
        return out_img, _new_record(record, {"op": self.name}), _copy(landmarks)


#: Factor sets for :class:`DownUpSample`. ``hopenet``: the factors of the Hopenet paper;
#: ``hopenet_code``: what Hopenet's ``datasets.py`` actually draws (``1 + randint(0, 4) * 5``);
#: ``randint``: a random integer 1..10.
DOWNSAMPLE_FACTORS: dict[str, tuple[int, ...]] = {
    "hopenet": (1, 6, 11, 16, 21),
    "hopenet_code": (1, 6, 11, 16),
    "randint": tuple(range(1, 11)),
}


class DownUpSample(Transform):
    """Nearest-neighbour down-sampling by an integer factor then back up to the same size.

    ``factors``: an int (fixed factor), a name in :data:`DOWNSAMPLE_FACTORS` (``"hopenet"``,
    ``"hopenet_code"``, ``"randint"``) or a sequence of ints to choose from uniformly.
    Down-sampled size is ``max(1, size // factor)`` (Hopenet's integer division); factor 1 is
    the identity.
    """

    name = "downsample"

    def __init__(self, factors="hopenet"):
        if isinstance(factors, str):
            if factors not in DOWNSAMPLE_FACTORS:
                raise ValueError(f"unknown factor set {factors!r}; choose one of {sorted(DOWNSAMPLE_FACTORS)} or give ints")
            choices = DOWNSAMPLE_FACTORS[factors]
        elif np.isscalar(factors):
            choices = (factors,)
        else:
            choices = tuple(factors)
        if not choices or any(int(f) != f or f < 1 for f in choices):
            raise ValueError(f"down-sampling factors must be integers >= 1, got {factors!r}")
        self.factors = factors
        self.choices = tuple(int(f) for f in choices)

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        f = self.choices[0] if len(self.choices) == 1 else int(_rng(rng).choice(self.choices))
        h, w = image.shape[:2]
        if f == 1:
            out_img = image.copy()
        else:
            small = cv2.resize(image, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_NEAREST_EXACT)
            out_img = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
            out_img = out_img.reshape(image.shape)  # cv2 drops a trailing channel axis of size 1
        return out_img, _new_record(record, {"op": self.name, "factor": f}), _copy(landmarks)


# --------------------------------------------------------------------------------------------
# Photometric jitter
# --------------------------------------------------------------------------------------------
class Brightness(Transform):
    """Add ``delta ~ U(delta)`` (pixel levels, 0-255 scale) to every channel, clipped to 0-255."""

    name = "brightness"

    def __init__(self, delta=(-32.0, 32.0)):
        self.delta = _range(delta, "delta")

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        d = _uniform(_rng(rng), *self.delta)
        out_img = cv2.LUT(image, _lut(np.arange(256.0) + d))
        return out_img, _new_record(record, {"op": self.name, "delta": d}), _copy(landmarks)


class Contrast(Transform):
    """Scale each channel's deviation from its mean by ``factor ~ U(factor)``, clipped to 0-255."""

    name = "contrast"

    def __init__(self, factor=(0.7, 1.3)):
        self.factor = _range(factor, "factor")
        if self.factor[0] < 0:
            raise ValueError(f"contrast factor must be >= 0, got {factor}")

    def __call__(self, image, record, landmarks=None, rng=None):
        _check_image(image)
        a = _uniform(_rng(rng), *self.factor)
        channels = 1 if image.ndim == 2 else image.shape[2]
        means = np.asarray(cv2.mean(image)[:channels])
        levels = np.arange(256.0)[:, None]
        lut = _lut((levels - means) * a + means)  # 256 x C: one table per channel
        out_img = cv2.LUT(image, lut.reshape(1, 256, channels) if channels > 1 else lut.reshape(256))
        return out_img, _new_record(record, {"op": self.name, "factor": a}), _copy(landmarks)


def _lut(values: np.ndarray) -> np.ndarray:
    """Lookup table(s) of 256 levels: rounded (half to even) and clipped to uint8."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _copy(landmarks):
    return None if landmarks is None else np.array(landmarks, copy=True)


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------
class Compose(Transform):
    """Apply transforms in order, all drawing from the same generator."""

    name = "compose"

    def __init__(self, transforms: Iterable):
        self.transforms = list(transforms)

    def __call__(self, image, record, landmarks=None, rng=None):
        rng = _rng(rng)
        if not self.transforms:
            return image.copy(), _clone(record), _copy(landmarks)
        for t in self.transforms:
            image, record, landmarks = t(image, record, landmarks, rng)
        return image, record, landmarks


class RandomApply(Transform):
    """Apply ``transform`` with probability ``p`` (nothing is recorded when it is skipped)."""

    name = "random_apply"

    def __init__(self, transform, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.transform = transform
        self.p = float(p)

    def __call__(self, image, record, landmarks=None, rng=None):
        rng = _rng(rng)
        if rng.random() < self.p:
            return self.transform(image, record, landmarks, rng)
        return image.copy(), _clone(record), _copy(landmarks)


# --------------------------------------------------------------------------------------------
# Build-time spec (``--augment flip,blur,downsample``)
# --------------------------------------------------------------------------------------------
#: ``--augment`` names -> transform factories.
SPEC_NAMES: dict[str, Callable[[], Transform]] = {
    "flip": HorizontalFlip,
    "blur": GaussianBlur,
    "boxblur": BoxBlur,
    "downsample": lambda: DownUpSample("hopenet"),
    "brightness": Brightness,
    "contrast": Contrast,
    "cropscale": RandomCropScale,
}

#: Offline variants are extra copies of a sample, so one that may come out unchanged (Hopenet's
#: factor 1) would only duplicate the original: the ``downsample`` variant draws from 6/11/16/21.
_OFFLINE_FACTORIES = dict(SPEC_NAMES, downsample=lambda: DownUpSample((6, 11, 16, 21)))


def augment_names(spec) -> list[str]:
    """``"flip, Blur"`` (or a list of names) -> ``["flip", "blur"]``: the ops as a build records them
    (trimmed, lower case, empty items dropped); unknown or repeated names are refused."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip().lower() for n in items if n and n.strip()]
    unknown = [n for n in names if n not in SPEC_NAMES]
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(map(repr, unknown))}; choose from {', '.join(SPEC_NAMES)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"augmentation named twice: {', '.join(dupes)}")
    return names


def parse_augment_spec(spec: str | Sequence[str] | None) -> list[Transform]:
    """``"flip,blur,downsample"`` (or a list of names) -> transforms, in order.

    Names: ``flip`` (HorizontalFlip), ``blur`` (GaussianBlur), ``boxblur``, ``downsample``
    (DownUpSample with Hopenet's factor set), ``brightness``, ``contrast``, ``cropscale``
    (RandomCropScale). Empty / None -> ``[]``.
    """
    return [SPEC_NAMES[n]() for n in augment_names(spec)]


def variant_suffixes(spec_names) -> list[str]:
    """The key suffixes of the variants ``--augment`` writes, in order: ``"_" + name``
    (``flip`` -> ``KEY_flip``)."""
    return ["_" + name for name in augment_names(spec_names)]


def offline_variants(image, record, landmarks, spec_names, rng) -> list[tuple[str, np.ndarray, dict, np.ndarray | None]]:
    """The extra samples ``--augment`` writes for one sample: one per op name, in order.

    Returns ``[(suffix, image, record, landmarks), ...]`` with ``suffix = "_" + name`` (e.g.
    ``"_flip"``); the variant's ``record["key"]`` is already ``record["key"] + suffix``, its
    ``source`` is the original's and its ``augment`` ends with the op. Pure: inputs are not touched
    and all randomness comes from ``rng`` (see :func:`key_rng` for a per-sample generator that
    does not depend on the order samples are processed in). The ``downsample`` variant never uses
    factor 1 (it would duplicate the sample). Depth maps are not transformed: do not copy a
    sample's depth to a geometric variant (``flip``, ``cropscale``).
    """
    out = []
    for name, suffix in zip(augment_names(spec_names), variant_suffixes(spec_names)):
        t = _OFFLINE_FACTORIES[name]()
        img, rec, lm = t(image, record, landmarks, rng)
        rec["key"] = f"{record['key']}{suffix}"
        out.append((suffix, img, rec, lm))
    return out


def key_rng(key: str, seed: int = 0) -> np.random.Generator:
    """A generator that depends only on ``(seed, key)``, not on the order samples are processed in
    or the worker (stable across processes and runs): the one every build draws a sample's random
    choices from (Hopenet's k, the offline variants), so a rebuild is byte-identical."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), digest]))
