"""Image decoding: one place, the fastest decoder that gives OpenCV's pixels.

Every reader, the box stage, the loader, ``verify`` and the audit decode pictures through here, so
a picture is the same array wherever it is read (16-bit depth PNGs, which are not pictures, are
read with ``cv2.IMREAD_UNCHANGED`` where they are used).

* Baseline and progressive JPEGs decode with libjpeg-turbo's TurboJPEG API (``simplejpeg``): the
  same library and settings as ``cv2.imdecode`` (accurate integer IDCT, fancy upsampling), so the
  same pixels, without OpenCV's per-call overhead. Measured on one core: a 224 px stored crop
  0.136 ms against 0.175 ms; a 450 px 300W-LP image 0.29-0.46 ms against 0.31-1.08 ms (OpenCV's
  cost there depends on the allocator's state).
  Tests check that both give the same arrays (``tests/test_codec.py``).
* Everything else goes to ``cv2.imdecode``, whose behaviour is the reference: PNG (BIWI's frames,
  depth maps), JPEGs with an Exif block (OpenCV turns the picture as its Orientation tag says; raw
  dataset images, read with :func:`decode_rgb_checked`, keep their stored grid, where their labels are),
  CMYK JPEGs, and any JPEG the TurboJPEG API refuses, such as one with corrupt data that OpenCV
  still decodes with a warning (or not at all: None, as OpenCV says). The dataset readers decode
  with :func:`decode_rgb_checked`, which names such damage instead, so they can reject the file
  (and the loader its stored crops with :func:`decode_bgr_checked`).
* ``reduction`` 2, 4 or 8 decodes a JPEG at that fraction of its size in the DCT domain
  (``cv2.IMREAD_REDUCED_COLOR_*``: SIMD there; the TurboJPEG API's scaled IDCTs are slower).
"""
from __future__ import annotations

import contextlib
import zlib

import cv2
import numpy as np
import simplejpeg

__all__ = ["decode_bgr", "decode_rgb", "decode_rgb_checked", "decode_cv2", "encode_jpeg_rgb", "encode_png", "is_jpeg",
           "decode_bgr_checked", "damaged_png", "png_damage", "header_size",
           "decode_rgb_capped", "MAX_DECODE_PIXELS"]

_SOI = b"\xff\xd8"
_CV2_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
              8: cv2.IMREAD_REDUCED_COLOR_8}


def is_jpeg(data: bytes) -> bool:
    """Whether the bytes start as a JPEG does (the SOI marker)."""
    return data[:2] == _SOI


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_damage(data: bytes) -> str | None:
    """What is broken in a PNG's chunks (one short phrase), or None: every chunk whole, its CRC
    right, IHDR first and IEND reached (or the bytes are not a PNG). libpng finds the same damage
    while decoding, but prints it (``libpng error: IDAT: CRC error``) with no file name and gives
    OpenCV nothing to say; this walk names the chunk and its byte offset first. About 0.2 ms for a
    BIWI frame (zlib's CRC-32), against ~10 ms to decode it (one core)."""
    if data[:8] != _PNG_SIGNATURE:
        return None
    view, i, n = memoryview(data), 8, len(data)
    while True:
        if i + 12 > n:
            return f"the file ends at byte {n} before the IEND chunk (truncated)"
        length = int.from_bytes(view[i:i + 4], "big")
        kind = bytes(view[i + 4:i + 8])
        name = kind.decode("ascii") if kind.isalpha() else repr(kind)
        end = i + 12 + length
        if length >= 2 ** 31 or end > n:
            return f"chunk {name} at byte {i} runs past the end of the file at byte {n}: truncated"
        if zlib.crc32(view[i + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return f"chunk {name} at byte {i}: CRC mismatch"
        if i == 8 and kind != b"IHDR":
            return f"the first chunk is {name}, not IHDR"
        if kind == b"IEND":
            return None
        i = end


def damaged_png(data: bytes) -> str | None:
    """``"damaged PNG data (...)"`` saying what :func:`png_damage` found, or None: the phrase the
    dataset readers and ``verify`` give, for pictures and depth maps alike."""
    damage = png_damage(data)
    return None if damage is None else f"damaged PNG data ({damage})"


def _has_exif(data: bytes) -> bool:
    """Whether a JPEG carries an Exif APP1 segment before its first frame (where OpenCV reads the
    orientation): walks the marker segments after SOI, a few steps for a usual file."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if not (0xE0 <= marker <= 0xEF or marker in (0xFE, 0xDB, 0xC4, 0xDD)):
            return False  # a frame or scan header: past where Exif can be
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            return True
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's frame header or a PNG's IHDR, without decoding (a
    20000 x 20000 picture in a few hundred KB would take GBs to decode); None when the header does
    not say (another format, or damage the decode will name)."""
    if data[:8] == _PNG_SIGNATURE and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if is_jpeg(data):
        try:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
        except ValueError:
            return None
        return int(width), int(height)
    return None


def _turbo(data: bytes, colorspace: str) -> np.ndarray | None:
    """The TurboJPEG decode of a JPEG without Exif, or None to leave it to OpenCV."""
    return _turbo_or_refusal(data, colorspace)[0]


def _turbo_or_refusal(data: bytes, colorspace: str) -> tuple[np.ndarray | None, str | None]:
    """:func:`_turbo`, and libjpeg's words when the TurboJPEG API refused the JPEG (None for a
    decoded one, and for bytes it was not asked to decode: not a JPEG, or Exif)."""
    if len(data) <= 2 or not is_jpeg(data) or _has_exif(data):
        return None, None
    try:
        return simplejpeg.decode_jpeg(data, colorspace), None
    except ValueError as exc:  # CMYK, 12-bit, corrupt data: OpenCV decides, as it always has
        return None, str(exc)


#: The starts of the TurboJPEG API's refusals that say nothing against the picture data: limits of
#: that API (sampling factors it has no name for, 12-bit data, colour conversions it does not do,
#: sizes past its maximum) and libjpeg's warnings about metadata (``Warning: unknown JFIF revision
#: number``, a thumbnail's length, an Adobe transform code). OpenCV decides those. Every other refusal
#: of a JPEG is damage: libjpeg's warnings that picture data is lost (``Corrupt JPEG data``,
#: ``Premature end of JPEG file``, ...), where it would fill what it lost with gray or garbled blocks,
#: and its errors (``Unsupported marker type``, ``Bogus DQT index``, ``Invalid JPEG file structure``,
#: ...), after which OpenCV still returns a picture for some files, half gray (a byte-flip test over
#: 1,500 damaged copies of a JPEG found ~300 such refusals OpenCV decoded anyway).
_NOT_DAMAGE = ("tjDecompressHeader3(): Could not determine subsampling", "Unsupported JPEG data precision",
               "Unsupported color conversion request", "Maximum supported image dimension", "Warning:",
               "Unknown Adobe color transform code")


def _jpeg_damage(refusal: str | None) -> str | None:
    """``"damaged JPEG data (libjpeg: ...)"`` for a refusal of the TurboJPEG API that says the picture
    data is damaged (any but those in ``_NOT_DAMAGE``); None for none, or one that is not damage."""
    if refusal is None or refusal.startswith(_NOT_DAMAGE):
        return None
    return f"damaged JPEG data (libjpeg: {refusal})"


def decode_rgb_checked(data: bytes) -> tuple[np.ndarray | None, str | None]:
    """A raw dataset image: ``(H x W x 3 uint8 RGB, None)`` in the file's stored pixel grid, or
    ``(None, what is damaged)`` for an image whose data is damaged: a JPEG the TurboJPEG API
    refuses (any refusal but those in ``_NOT_DAMAGE``: it would decode with gray or garbled parts,
    or not at all; ``"damaged JPEG data (libjpeg: ...)"``), a PNG with a broken chunk
    (:func:`damaged_png`). The dataset readers reject such files; OpenCV would print the library's
    complaint without a file name, so they are not decoded.

    Unlike :func:`decode_rgb`, an Exif Orientation tag is not applied: the dataset's labels
    (landmarks, boxes, the pose's image axes) were made in the stored grid, as MATLAB's and PIL's
    ``open`` read it, and a picture turned by its tag would no longer match them. Otherwise the same
    pixels as :func:`decode_rgb`."""
    refusal = None
    if len(data) > 2 and is_jpeg(data):  # TurboJPEG applies no Exif orientation, with or without a tag
        try:
            return simplejpeg.decode_jpeg(data, "RGB"), None
        except ValueError as exc:
            refusal = str(exc)
    damage = _jpeg_damage(refusal)
    if damage is not None:
        return None, damage
    damage = damaged_png(data)
    if damage is not None:
        return None, damage
    with _opencv_quiet():  # its complaints (a truncated BMP or TIFF) name no file; the reader's message will
        return _decode_cv2_rgb(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION), None


#: Pictures past this many pixels are not decoded by :func:`decode_rgb_capped` (the datasets' are
#: 640 x 480 at most): a huge picture in a small file would take GBs; the readers reject it by its size.
MAX_DECODE_PIXELS = 64_000_000


def decode_rgb_capped(data: bytes) -> np.ndarray | None:
    """:func:`decode_rgb_checked`'s image, or None when the bytes do not decode, are damaged, or
    their header says more than :data:`MAX_DECODE_PIXELS` (then they are not decoded at all): how
    the box stage and the audit read raw pictures that the readers check again."""
    size = header_size(data)
    if size is not None and size[0] * size[1] > MAX_DECODE_PIXELS:
        return None
    return decode_rgb_checked(data)[0]


@contextlib.contextmanager
def _opencv_quiet():
    """OpenCV's log silenced for a call (its level is global: set back after)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def decode_cv2(data: bytes, reduction: int = 1) -> np.ndarray | None:
    """``cv2.imdecode`` (the reference) -> H x W x 3 uint8 BGR, or None when the bytes do not decode."""
    return _imdecode(data, _CV2_FLAGS[reduction])


def _imdecode(data: bytes, flags: int) -> np.ndarray | None:
    """``cv2.imdecode(data, flags)``; None for no bytes, or bytes that do not decode."""
    if not data:
        return None
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)


def decode_bgr(data: bytes, reduction: int = 1) -> np.ndarray | None:
    """Image bytes (JPEG, PNG, anything OpenCV reads) -> H x W x 3 uint8 BGR, exactly as
    ``cv2.imdecode(..., IMREAD_COLOR)`` gives it (at 1/``reduction`` scale as
    ``IMREAD_REDUCED_COLOR_<reduction>`` does), or None when the bytes do not decode."""
    image = _turbo(data, "BGR") if reduction == 1 else None
    return decode_cv2(data, reduction) if image is None else image


def decode_bgr_checked(data: bytes, reduction: int = 1) -> tuple[np.ndarray | None, str | None]:
    """:func:`decode_bgr`'s image and None, or ``(None, what is damaged)`` for a JPEG whose picture
    data the TurboJPEG API finds damaged (:func:`decode_rgb_checked`'s words), which OpenCV would
    decode gray or garbled, printing libjpeg's warning with no name. Checked at full scale only: a
    reduced decode is OpenCV's, which says nothing of damage. How the loader reads stored crops."""
    if reduction == 1:
        image, refusal = _turbo_or_refusal(data, "BGR")
        damage = _jpeg_damage(refusal)
        if image is not None or damage is not None:
            return image, damage
    return decode_cv2(data, reduction), None


def decode_rgb(data: bytes) -> np.ndarray | None:
    """Image bytes -> H x W x 3 uint8 RGB (:func:`decode_bgr`'s pixels, channels reversed), or None."""
    image = _turbo(data, "RGB")
    return _decode_cv2_rgb(data) if image is None else image


def _decode_cv2_rgb(data: bytes, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    """``cv2.imdecode``'s pixels (:func:`decode_cv2`'s with the default ``flags``) as RGB, or None."""
    image = _imdecode(data, flags)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_jpeg_rgb(rgb: np.ndarray, quality: int) -> bytes:
    """H x W x 3 uint8 RGB -> JPEG bytes at ``quality`` (OpenCV's encoder, 4:2:0); ValueError when
    OpenCV cannot encode it."""
    return _imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, int(quality)], "image as JPEG",
                     convert=lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2BGR))


def encode_png(image: np.ndarray, compression: int | None = None) -> bytes:
    """An 8-bit BGR / 16-bit single-channel array -> PNG bytes (OpenCV's encoder; ``compression``
    0-9, None for OpenCV's default); ValueError when OpenCV cannot encode it."""
    params = [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
    return _imencode(".png", image, params, "array as PNG")


def _imencode(ext: str, image: np.ndarray, params: list, what: str, convert=None) -> bytes:
    """``cv2.imencode`` of ``image`` (first passed through ``convert``), its bytes; ValueError
    naming the array when OpenCV refuses it (returning False, or raising)."""
    try:
        ok, data = cv2.imencode(ext, image if convert is None else convert(image), params)
    except cv2.error:
        ok = False
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} {image.dtype} {what}")
    return data.tobytes()
