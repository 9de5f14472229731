"""dataprep.codec: the fast decoder gives exactly OpenCV's pixels, and OpenCV still decides every
file it is not sure of (Exif orientation, corrupt data, PNG, CMYK)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from dataprep import codec


def _picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    return cv2.GaussianBlur(img, (5, 5), 2)  # photo-like: smooth, with detail left


def _jpeg(img: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, list(params))
    assert ok
    return buf.tobytes()


def _cv2(data: bytes, flags: int = cv2.IMREAD_COLOR):
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and np.array_equal(a, b))


JPEG_KINDS = {
    "420 q95": (lambda: _picture(224, 224), [cv2.IMWRITE_JPEG_QUALITY, 95]),
    "420 q50 odd size": (lambda: _picture(77, 101, 1), [cv2.IMWRITE_JPEG_QUALITY, 50]),
    "444": (lambda: _picture(120, 90, 2), [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]),
    "422": (lambda: _picture(121, 64, 3), [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422]),
    "progressive": (lambda: _picture(450, 450, 4), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    "restart markers": (lambda: _picture(200, 150, 5), [cv2.IMWRITE_JPEG_RST_INTERVAL, 4]),
    "optimised huffman": (lambda: _picture(64, 64, 6), [cv2.IMWRITE_JPEG_OPTIMIZE, 1]),
    "grayscale": (lambda: _picture(99, 66, 7)[:, :, 0], []),
}


@pytest.mark.parametrize("kind", sorted(JPEG_KINDS))
def test_jpegs_decode_to_opencvs_pixels(kind):
    make, params = JPEG_KINDS[kind]
    data = _jpeg(make(), *params)
    want = _cv2(data)
    got = codec.decode_bgr(data)
    assert got.dtype == np.uint8 and got.shape == want.shape and got.shape[2] == 3
    assert np.array_equal(got, want)
    assert np.array_equal(codec.decode_rgb(data), cv2.cvtColor(want, cv2.COLOR_BGR2RGB))


@pytest.mark.parametrize("reduction,flag", [(2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                            (8, cv2.IMREAD_REDUCED_COLOR_8)])
def test_reduced_decoding_is_opencvs(reduction, flag):
    data = _jpeg(_picture(230, 181, 8))
    got = codec.decode_bgr(data, reduction)
    assert got.shape == (-(-181 // reduction), -(-230 // reduction), 3)
    assert np.array_equal(got, _cv2(data, flag))


def test_plain_jpegs_do_not_go_through_opencv(monkeypatch):
    data = _jpeg(_picture(64, 48))
    want = _cv2(data)

    def refuse(*_):
        raise AssertionError("cv2.imdecode called for a plain JPEG")

    monkeypatch.setattr(codec.cv2, "imdecode", refuse)
    assert np.array_equal(codec.decode_bgr(data), want)
    assert np.array_equal(codec.decode_rgb(data), want[:, :, ::-1])


def _with_exif_orientation(data: bytes, orientation: int) -> bytes:
    """The JPEG with an Exif APP1 segment (one IFD entry: Orientation) right after SOI, as cameras
    write it."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    body = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[2:]


def test_exif_orientation_is_applied_as_opencv_does():
    img = _picture(80, 40, 9)
    data = _with_exif_orientation(_jpeg(img), 6)  # 6: turn 90 degrees clockwise to view
    want = _cv2(data)
    assert want.shape[:2] == (80, 40)  # OpenCV read the tag: the picture stands upright
    assert np.array_equal(codec.decode_bgr(data), want)
    assert np.array_equal(codec.decode_rgb(data), cv2.cvtColor(want, cv2.COLOR_BGR2RGB))
    # a raw dataset image keeps its stored grid, where its labels are (the face turned by the tag
    # would no longer match its landmarks and box): the pixels as if there were no tag
    stored, damage = codec.decode_rgb_checked(data)
    assert damage is None and stored.shape[:2] == (40, 80)
    assert np.array_equal(stored, codec.decode_rgb(_jpeg(img)))
    unturned = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert np.array_equal(stored, cv2.cvtColor(unturned, cv2.COLOR_BGR2RGB))


def test_damaged_and_foreign_bytes_get_opencvs_answer(tmp_path: Path):
    img = _picture(160, 120, 10)
    data = _jpeg(img, cv2.IMWRITE_JPEG_QUALITY, 90)
    scan = data.rindex(b"\xff\xda")
    damaged = bytearray(data)
    damaged[scan + 200] ^= 0x5A  # a flipped byte in the entropy-coded data
    cases = {
        "truncated": data[: len(data) // 2],
        "damaged scan": bytes(damaged),
        "not an image": b"definitely not a picture" * 4,
        "empty": b"",
        "soi only": b"\xff\xd8",
        "png": cv2.imencode(".png", img)[1].tobytes(),
        "png gray": cv2.imencode(".png", img[:, :, 1])[1].tobytes(),
    }
    for name, raw in cases.items():
        want = _cv2(raw) if raw else None
        assert _same(codec.decode_bgr(raw), want), name
        rgb = codec.decode_rgb(raw)
        assert _same(rgb, None if want is None else cv2.cvtColor(want, cv2.COLOR_BGR2RGB)), name
    assert codec.decode_bgr(cases["not an image"]) is None and codec.decode_bgr(b"") is None
    assert codec.decode_bgr(cases["png"]) is not None


def _damaged_scan(data: bytes) -> bytes:
    """The JPEG with a stray marker over two bytes in the middle of its picture data (as a bad copy
    can leave it): libjpeg stops that scan there and fills the rest gray, with a warning."""
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    return data[:middle] + b"\xff\xd9" + data[middle + 2:]


def test_damaged_jpeg_data_is_named_while_opencv_decodes_it_anyway():
    img = _picture(160, 120, 11)
    data = _jpeg(img, cv2.IMWRITE_JPEG_QUALITY, 90)
    damaged = _damaged_scan(data)
    assert _cv2(damaged) is not None  # OpenCV decodes it, printing libjpeg's warning without a file name
    image, damage = codec.decode_rgb_checked(damaged)
    assert image is None and damage.startswith(("damaged JPEG data (libjpeg: Corrupt JPEG data",
                                                "damaged JPEG data (libjpeg: Premature end"))
    # a stray unknown marker in the picture data: an error for libjpeg (TurboJPEG refuses the file),
    # yet OpenCV returns a picture, its lower part gray
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    stray = data[:middle] + b"\xff\x3c" + data[middle + 2:]
    assert _cv2(stray) is not None and not np.array_equal(_cv2(stray), _cv2(data))
    image, damage = codec.decode_rgb_checked(stray)
    assert image is None and damage.startswith("damaged JPEG data (libjpeg: Unsupported marker type")
    assert codec.decode_bgr_checked(stray) == (None, damage)
    # a warning about metadata only (a JFIF version libjpeg does not know): the picture is intact,
    # and is decoded as OpenCV decodes it
    at = data.index(b"JFIF\x00") + 5
    odd_version = data[:at] + b"\x02" + data[at + 1:]
    image, damage = codec.decode_rgb_checked(odd_version)
    assert damage is None and np.array_equal(image, cv2.cvtColor(_cv2(data), cv2.COLOR_BGR2RGB))
    # the same through OpenCV's path (an Exif JPEG) is checked too
    image, damage = codec.decode_rgb_checked(_with_exif_orientation(damaged, 1))
    assert image is None and damage is not None
    # intact pictures have no damage, whatever their kind; undecodable bytes give (None, None)
    for kind, (make, params) in JPEG_KINDS.items():
        intact = _jpeg(make(), *params)
        image, damage = codec.decode_rgb_checked(intact)
        assert damage is None and np.array_equal(image, codec.decode_rgb(intact)), kind
        image, damage = codec.decode_bgr_checked(intact)  # the loader's: decode_bgr's pixels
        assert damage is None and np.array_equal(image, codec.decode_bgr(intact)), kind
    assert codec.decode_rgb_checked(_with_exif_orientation(data, 6))[1] is None
    assert codec.decode_rgb_checked(cv2.imencode(".png", img)[1].tobytes())[1] is None
    assert codec.decode_rgb_checked(b"not a picture") == (None, None)


def _png_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each chunk of a PNG."""
    out, i = [], 8
    while i < len(data):
        length = struct.unpack(">I", data[i:i + 4])[0]
        out.append((i, data[i + 4:i + 8]))
        i += 12 + length
    return out


def test_damaged_png_is_named_by_chunk_and_offset_without_libpngs_nameless_line(capfd):
    img = _picture(160, 120, 12)
    data = codec.encode_png(img)
    chunks = _png_chunks(data)
    idat = next(at for at, kind in chunks if kind == b"IDAT")
    assert codec.png_damage(data) is None and _same(codec.decode_rgb_checked(data)[0], codec.decode_rgb(data))
    flipped = bytearray(data)
    flipped[idat + 8 + 100] ^= 0x10  # a flipped bit in the compressed picture data
    flipped = bytes(flipped)
    assert codec.png_damage(flipped) == f"chunk IDAT at byte {idat}: CRC mismatch"
    capfd.readouterr()
    assert _cv2(flipped) is None and "libpng error" in capfd.readouterr().err  # what OpenCV does: a nameless line
    assert codec.decode_rgb_checked(flipped) == (None, f"damaged PNG data (chunk IDAT at byte {idat}: CRC mismatch)")
    assert capfd.readouterr().err == ""  # not decoded, so libpng prints nothing
    cut = data[:idat + 50]
    assert codec.png_damage(cut) == f"chunk IDAT at byte {idat} runs past the end of the file at byte {len(cut)}: truncated"
    no_end = data[:chunks[-1][0]]  # every chunk whole, IEND missing
    assert codec.png_damage(no_end) == f"the file ends at byte {len(no_end)} before the IEND chunk (truncated)"
    text = b"tEXt" + b"Comment\x00before the header"
    text_first = data[:8] + struct.pack(">I", len(text) - 4) + text + struct.pack(">I", zlib.crc32(text)) + data[8:]
    assert codec.png_damage(text_first) == "the first chunk is tEXt, not IHDR"
    # a 16-bit depth PNG is checked the same way; JPEGs and other bytes are not PNGs
    depth = codec.encode_png(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64))
    assert codec.png_damage(depth) is None and codec.png_damage(depth[:-5]) is not None
    assert codec.png_damage(_jpeg(img)) is None and codec.png_damage(b"") is None


def test_real_dataset_images_are_not_damaged(real_samples: Path):
    files = sorted(real_samples.rglob("*.jpg")) + sorted(real_samples.rglob("*.png"))
    assert files
    for path in files:
        assert codec.decode_rgb_checked(path.read_bytes())[1] is None, path


def test_real_dataset_images_decode_to_opencvs_pixels(real_samples: Path):
    files = sorted(real_samples.rglob("*.jpg")) + sorted(real_samples.rglob("*.png"))
    assert files
    for path in files:
        data = path.read_bytes()
        want = _cv2(data)
        assert want is not None, path
        assert np.array_equal(codec.decode_bgr(data), want), path


def test_encoders_give_what_decoders_read_back():
    """codec's encoders (the build's crops and depth crops, the sample data): a JPEG of the
    picture, a lossless 16-bit PNG; an array OpenCV cannot encode is a ValueError, not an assert."""
    rng = np.random.default_rng(2)
    rgb = cv2.GaussianBlur(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8), (5, 5), 2)
    data = codec.encode_jpeg_rgb(rgb, 95)
    assert data == cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    back = codec.decode_rgb(data)  # RGB in, RGB back (not the channels swapped)
    assert back.shape == rgb.shape and np.abs(back.astype(int) - rgb).mean() < 6
    assert np.abs(back.astype(int) - rgb[..., ::-1]).mean() > 10
    depth = rng.integers(0, 4000, (30, 40), dtype=np.uint16)
    assert np.array_equal(cv2.imdecode(np.frombuffer(codec.encode_png(depth), np.uint8), cv2.IMREAD_UNCHANGED), depth)
    with pytest.raises(ValueError, match="could not encode"):
        codec.encode_jpeg_rgb(np.zeros((0, 0, 3), np.uint8), 95)
