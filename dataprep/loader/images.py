"""Images in the loader: decoding, the reduced-scale cut, and writing a finished image into a batch
(uint8 RGB planes, or normalised float model input)."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from .. import codec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``None``: RGB in [0, 1]; ``"imagenet"``: RGB, /255, ImageNet mean/std; ``"raw_bgr"``: BGR 0-255
#: floats (FSA-Net's input); ``"bgr_128"``: BGR, ``(x - 127.5) / 128`` (EHPNet's code's input).
NORMALIZATIONS = (None, "imagenet", "raw_bgr", "bgr_128")
#: ``"float"``: ``image`` normalised float (3, H, W); ``"uint8"``: ``image`` RGB uint8 (3, H, W), to
#: normalise later (e.g. on the GPU with :func:`normalize_images`); ``"jpeg"``: no decoding, ``jpeg``
#: (the stored bytes, uint8) and ``window`` (the crop to cut from the decoded stored image).
IMAGE_FORMATS = ("float", "uint8", "jpeg")


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> H x W x 3 uint8 RGB."""
    img = codec.decode_rgb(data)
    if img is None:
        raise ValueError("cannot decode image bytes")
    return img


def normalize_images(x: torch.Tensor, normalize: str | None) -> torch.Tensor:
    """RGB images ``(..., 3, H, W)`` with 0-255 values (uint8 or float, on any device) -> float32
    model input, contiguous, per ``normalize`` (one of :data:`NORMALIZATIONS`). ``x`` is not changed."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "raw_bgr":
        return x.flip(-3).to(torch.float32, memory_format=torch.contiguous_format)
    if normalize == "bgr_128":
        return x.flip(-3).to(torch.float32, memory_format=torch.contiguous_format).sub_(127.5).div_(128.0)
    out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True).div_(255.0)
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=out.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=out.device).view(3, 1, 1)
        out = out.sub_(mean).div_(std)
    return out


#: Interpolations ``cv2.warpAffine`` does exactly as ``cv2.resize`` defines them (reduced decoding).
_WARP_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)


def _reduction(window, size: int, interpolation) -> int:
    """The JPEG decoding scale (1, 2, 4 or 8) for cutting ``window`` at ``size``: the largest whose
    reduced window still has at least ``size`` pixels each way (decoding never loses pixels the
    resize would keep). 1 for interpolations a warp cannot reproduce (``INTER_AREA`` / None)."""
    if interpolation not in _WARP_INTERPOLATIONS:
        return 1
    ww, wh = window[2] - window[0], window[3] - window[1]
    for f in (8, 4, 2):
        if ww >= f * size and wh >= f * size:
            return f
    return 1


def _decode_bgr(data: bytes, reduction: int = 1) -> np.ndarray:
    """JPEG/PNG bytes -> H x W x 3 uint8 BGR (a JPEG at 1/``reduction`` scale, in the DCT domain);
    ValueError for bytes that do not decode, or a JPEG whose picture data is damaged (checked at
    full scale: :func:`codec.decode_bgr_checked`), which would train on gray or garbled pixels."""
    img, damage = codec.decode_bgr_checked(data, reduction)
    if damage is not None:
        raise ValueError(damage)
    if img is None:
        raise ValueError("cannot decode image bytes")
    return img


def _warp_reduced(img: np.ndarray, window, size: int, reduction: int, interpolation) -> np.ndarray:
    """The crop ``window`` (stored-image pixels, black outside the image) at ``size`` x ``size``
    from ``img``, the stored image decoded at 1/``reduction`` scale, cut exactly: one sub-pixel
    ``cv2.warpAffine`` with ``cv2.resize``'s pixel-centre mapping."""
    x1, y1, x2, y2 = window
    sx, sy = (x2 - x1) / size, (y2 - y1) / size
    # reduced pixel i covers stored pixels [i f, (i + 1) f): stored x = f * reduced x
    m = np.array([[sx / reduction, 0.0, (x1 + 0.5 * sx) / reduction - 0.5],
                  [0.0, sy / reduction, (y1 + 0.5 * sy) / reduction - 0.5]])
    return cv2.warpAffine(img, m, (size, size), flags=interpolation | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _write_planes(dst: np.ndarray, image: np.ndarray, bgr: bool) -> None:
    """H x W x 3 uint8 ``image`` (BGR or RGB) -> ``dst`` (3, H, W) uint8 RGB planes (``cv2.split``
    into the given planes: one SIMD pass)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    planes = [dst[2], dst[1], dst[0]] if bgr else [dst[0], dst[1], dst[2]]
    got = cv2.split(np.ascontiguousarray(image), planes)
    for plane, want in zip(got, planes):
        if plane is not want:
            want[...] = plane  # OpenCV chose its own output arrays


#: ``normalize`` -> per output channel (RGB source plane, scale, offset): ``out = x * scale + offset``.
_NORMALIZE_COEFFS = {
    None: [(c, 1.0 / 255.0, 0.0) for c in range(3)],
    "imagenet": [(c, 1.0 / (255.0 * IMAGENET_STD[c]), -IMAGENET_MEAN[c] / IMAGENET_STD[c]) for c in range(3)],
    "raw_bgr": [(2 - c, 1.0, 0.0) for c in range(3)],
    "bgr_128": [(2 - c, 1.0 / 128.0, -127.5 / 128.0) for c in range(3)],
}


def _write_image(dst: np.ndarray, image: np.ndarray, bgr: bool, normalize: str | None, scratch: dict) -> None:
    """H x W x 3 uint8 ``image`` (BGR or RGB) -> ``dst`` (3, H, W): uint8 RGB planes, or float32
    model input per ``normalize`` (:func:`normalize_images`' values up to float rounding: one
    ``x * scale + offset`` per plane). ``scratch``: reusable arrays (per process)."""
    if dst.dtype == np.uint8:
        _write_planes(dst, image, bgr)
        return
    planes = scratch.get(dst.shape)
    if planes is None:
        planes = scratch[dst.shape] = np.empty(dst.shape, np.uint8)
    _write_planes(planes, image, bgr)
    for c, (source, scale, offset) in enumerate(_NORMALIZE_COEFFS[normalize]):
        out = dst[c]
        got = cv2.addWeighted(planes[source], scale, planes[source], 0.0, offset, dst=out, dtype=cv2.CV_32F)
        if got is not out:
            out[...] = got  # OpenCV chose its own output array
