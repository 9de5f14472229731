"""BIWI Kinect Head Pose reader and file codecs (``--root`` = the ``hpdb`` folder).

Layout: ``NN/frame_XXXXX_rgb.png`` (640x480), ``NN/frame_XXXXX_depth.bin``, ``NN/frame_XXXXX_pose.txt``,
``NN/rgb.cal``, ``NN/depth.cal`` for the 24 sequences ``01``..``24``, plus ``NN.obj`` head models.

* ``pose.txt``: the 3x3 head rotation ``M`` (3 lines), a blank line, the head centre ``t`` in mm in the
  depth camera's frame, a blank line. Labels: ``labels.biwi_matrix_to_euler(M)``.
* ``.cal``: intrinsics ``K`` (3 lines), blank, 4 distortion values, blank, extrinsics ``R`` (3 lines),
  blank, ``T`` (mm), blank, ``width height``. A depth-camera point ``p`` is ``R @ p + T`` in the RGB
  camera's frame (checked on the real frame 01/00003: that projection lands on the nose; the other
  reading, ``R.T @ (p - T)``, lands on an eye, 28 px away).
* ``depth.bin``: little-endian ``int32 width, int32 height``, then records ``int32 numempty`` (zero
  pixels), ``int32 numfull``, ``numfull x int16`` depths in mm, until ``width * height`` pixels are
  filled in row-major order.

Numbers in the text files are written like C++ ``ostream <<`` (``%g``, 6 significant digits), each
followed by one space.
"""
from __future__ import annotations

import functools
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import labels
from ..boxes import box_problem
from ..records import RawSample, SampleError, SampleRef
from . import common

NAME = "biwi"
DEFAULT_ROOT_NAME = "hpdb"

#: Side of the square ``gt`` box in millimetres at the head centre's depth: the box is
#: ``f * HEAD_SIZE_MM / z`` pixels, centred on the head centre projected into the RGB image.
#: Calibrated on the real frame 01/frame_00003: MTCNN's face box there is 83.2 x 106.1 px
#: (sqrt of the area 94.0 px, mean side 94.6 px) at z = 867.3 mm with f = 517.679 px, i.e.
#: 157.5-158.6 mm; 160 mm gives a 95.5 px box, about MTCNN's face box size.
HEAD_SIZE_MM = 160.0

_SEQUENCE_DIR = re.compile(r"^\d\d$")
_RGB_NAME = re.compile(r"^frame_(\d+)_rgb\.(?i:png)$")  # the extension in any case, as the other readers take it
_POSE_NAME = re.compile(r"^frame_(\d+)_pose\.txt$")


@dataclass(frozen=True)
class Calibration:
    """One camera of a BIWI sequence (``rgb.cal`` / ``depth.cal``)."""

    K: np.ndarray  # 3x3 intrinsics (pixels)
    dist: np.ndarray  # 4 distortion coefficients (all zero in BIWI)
    R: np.ndarray  # 3x3 rotation, depth camera frame -> this camera's frame
    T: np.ndarray  # 3 translation (mm)
    width: int
    height: int

    @property
    def focal(self) -> float:
        return float(self.K[0, 0])

    def project(self, point_camera) -> np.ndarray:
        """A point already in this camera's frame (mm) -> pixel ``(u, v)``."""
        q = self.K @ np.asarray(point_camera, dtype=np.float64)
        return q[:2] / q[2]

    def from_depth_frame(self, point_depth) -> np.ndarray:
        """A point in the depth camera's frame (mm) -> this camera's frame: ``R @ p + T``."""
        return self.R @ np.asarray(point_depth, dtype=np.float64) + self.T


# --------------------------------------------------------------------------------------------
# Text formats
# --------------------------------------------------------------------------------------------
def _fmt(values) -> str:
    """One line the way BIWI's C++ tools wrote it: ``%g`` values, each followed by a space."""
    return "".join(f"{float(v):g} " for v in np.asarray(values, dtype=np.float64).reshape(-1)) + "\n"


#: A number as the dataset's files write them (and as C's strtod reads them): optional sign,
#: digits with an optional point, optional exponent; also nan / inf, which the check after names.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf)", re.IGNORECASE)
#: The largest image side a .cal may give: the Kinect's frames are 640 x 480.
MAX_CAL_SIDE = 16384


def _numbers(text: str, count: int, what: str, display: str, reason: str) -> np.ndarray:
    tokens = text.split()
    if len(tokens) != count:
        raise SampleError(reason, f"{display}: expected {count} numbers in the {what}, found {len(tokens)}")
    odd = next((t for t in tokens if not _NUMBER.fullmatch(t)), None)
    if odd is not None:  # float() also takes "1_0" (10), "infinity", "0x1p3"
        raise SampleError(reason, f"{display}: {what} has a non-number ({odd!r})")
    values = np.array([float(t) for t in tokens], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise SampleError(reason, f"{display}: {what} has NaN or infinite values")
    return values


def _read_text(path: Path, display: str, reason: str, what: str, missing_reason: str | None = None) -> str:
    try:
        return common.read_file_bytes(path).decode("ascii", errors="strict")
    except FileNotFoundError:
        raise SampleError(missing_reason or reason, f"{display}: {what} file not found{common.broken_link_note(path)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleError(reason, f"{display}: cannot read the {what} file ({exc})") from exc


def parse_pose_text(text: str, display: str = "pose.txt") -> tuple[np.ndarray, np.ndarray]:
    """``pose.txt`` text -> ``(M (3x3), t (3,))``; ``SampleError("bad_pose")`` if malformed."""
    v = _numbers(text, 12, "pose (3x3 matrix + head centre)", display, "bad_pose")
    return v[:9].reshape(3, 3), v[9:]


def read_pose_txt(path: Path, display: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``frame_XXXXX_pose.txt`` -> ``(M, t)``. Errors: ``missing_pose`` / ``bad_pose``."""
    display = display or str(path)
    return parse_pose_text(_read_text(path, display, "bad_pose", "pose", "missing_pose"), display)


def format_pose_txt(M, t) -> str:
    """``pose.txt`` text for rotation ``M`` (rows as written) and head centre ``t`` (mm)."""
    m = np.asarray(M, dtype=np.float64).reshape(3, 3)
    return "".join(_fmt(row) for row in m) + "\n" + _fmt(t) + "\n"


def parse_cal_text(text: str, display: str = "cal") -> Calibration:
    """``.cal`` text -> ``Calibration``; ``SampleError("bad_calibration")`` if malformed."""
    v = _numbers(text, 27, "calibration (K, distortion, R, T, width height)", display, "bad_calibration")
    width, height = v[25], v[26]
    if not (0 < width <= MAX_CAL_SIDE and 0 < height <= MAX_CAL_SIDE) or width != int(width) or height != int(height):
        raise SampleError("bad_calibration", f"{display}: image size {width:g} x {height:g} is not valid (whole "
                                             f"numbers from 1 to {MAX_CAL_SIDE}; the Kinect's is 640 x 480)")
    K = v[:9].reshape(3, 3)
    if K[0, 0] <= 0 or K[1, 1] <= 0 or K[2, 2] != 1:
        raise SampleError("bad_calibration", f"{display}: K is not an intrinsics matrix: {K.tolist()}")
    R = v[13:22].reshape(3, 3)
    if not labels.is_rotation(R):
        raise SampleError("bad_calibration", f"{display}: R is not a rotation matrix: {R.tolist()}")
    arrays = [K, v[9:13].copy(), R, v[22:25].copy()]
    for a in arrays:
        a.flags.writeable = False
    return Calibration(*arrays, width=int(width), height=int(height))


@functools.lru_cache(maxsize=256)
def _read_cal_cached(path: str, mtime_ns: int, size: int, display: str) -> Calibration:
    return parse_cal_text(_read_text(Path(path), display, "bad_calibration", "calibration"), display)


def read_cal(path: Path, display: str | None = None) -> Calibration:
    """Read ``rgb.cal`` / ``depth.cal`` (cached per file, refreshed when the file changes).
    Errors: ``bad_calibration`` (also when the file is missing)."""
    display = display or str(path)
    try:
        st = Path(path).stat()
    except OSError:
        raise SampleError("bad_calibration", f"{display}: calibration file not found{common.broken_link_note(path)}") from None
    return _read_cal_cached(str(path), st.st_mtime_ns, st.st_size, display)


def format_cal(cal: Calibration) -> str:
    """``.cal`` text for ``cal`` laid out like BIWI's files (no trailing space on the size line)."""
    return (
        "".join(_fmt(row) for row in np.asarray(cal.K).reshape(3, 3)) + "\n"
        + _fmt(cal.dist) + "\n"
        + "".join(_fmt(row) for row in np.asarray(cal.R).reshape(3, 3)) + "\n"
        + _fmt(cal.T) + "\n"
        + f"{int(cal.width)} {int(cal.height)}\n"
    )


# --------------------------------------------------------------------------------------------
# depth.bin
# --------------------------------------------------------------------------------------------
_I32x2 = struct.Struct("<ii")
_MAX_PIXELS = 10_000_000


def decode_depth_bin(data: bytes, display: str = "depth.bin") -> np.ndarray:
    """``depth.bin`` bytes -> (H, W) uint16 millimetres (0 = no reading).

    One Python step per (zeros, values) record (a few hundred per real frame), numpy for the
    pixels. Bytes after the last record are ignored. Errors: ``SampleError("corrupt_depth")``.
    """
    buf = memoryview(data)
    n_bytes = len(buf)
    if n_bytes < 8:
        raise SampleError("corrupt_depth", f"{display}: {n_bytes} bytes, too short for the size header")
    width, height = _I32x2.unpack_from(buf, 0)
    if width <= 0 or height <= 0 or width * height > _MAX_PIXELS:
        raise SampleError("corrupt_depth", f"{display}: implausible size {width} x {height} in the header")
    total = width * height
    unpack = _I32x2.unpack_from
    lengths: list[int] = []  # zeros, values, zeros, values, ...
    chunks: list[memoryview] = []
    off, filled = 8, 0
    while filled < total:
        if off + 8 > n_bytes:
            raise SampleError(
                "corrupt_depth",
                f"{display}: file ends after {filled} of {total} pixels (truncated; re-extract the file)",
            )
        empty, full = unpack(buf, off)
        off += 8
        end = off + 2 * full
        if empty < 0 or full < 0 or filled + empty + full > total or end > n_bytes:
            if end > n_bytes and empty >= 0 and full >= 0 and filled + empty + full <= total:
                msg = f"file ends inside a run of {full} depth values (truncated; re-extract the file)"
            else:
                msg = f"bad run ({empty} empty, {full} full) at byte {off - 8} after {filled} of {total} pixels"
            raise SampleError("corrupt_depth", f"{display}: {msg}")
        lengths += (empty, full)
        if full:
            chunks.append(buf[off:end])
        off = end
        filled += empty + full
    values = np.frombuffer(b"".join(chunks), dtype="<i2")
    if values.size and values.min() < 0:
        raise SampleError("corrupt_depth", f"{display}: negative depth values (not a BIWI depth file?)")
    depth = np.zeros(total, dtype=np.uint16)
    if values.size:
        full_mask = np.repeat(np.tile(np.array([False, True]), len(lengths) // 2), lengths)
        depth[full_mask] = values
    return depth.reshape(height, width)


def read_depth_bin(path: Path, display: str | None = None) -> np.ndarray:
    """Read ``frame_XXXXX_depth.bin`` -> (H, W) uint16 mm. Errors: ``missing_depth`` / ``corrupt_depth``."""
    display = display or str(path)
    try:
        data = common.read_file_bytes(path)
    except FileNotFoundError:
        raise SampleError("missing_depth", f"{display}: depth file not found{common.broken_link_note(path)}") from None
    except OSError as exc:
        raise SampleError("corrupt_depth", f"{display}: cannot read the file ({exc})") from exc
    return decode_depth_bin(data, display)


def encode_depth_bin(depth: np.ndarray) -> bytes:
    """(H, W) depth in mm (0 = no reading, values <= 32767) -> ``depth.bin`` bytes, run-length coded
    exactly like BIWI's files (a record per zero run + following value run; a final zero run gets
    ``numfull = 0``; an image that starts with a value starts with ``numempty = 0``)."""
    d = np.asarray(depth)
    if d.ndim != 2:
        raise ValueError(f"depth must be 2-D, got shape {d.shape}")
    if d.size and (d.min() < 0 or d.max() > 32767):
        raise ValueError("depth values must be in [0, 32767] (int16 millimetres)")
    height, width = d.shape
    flat = d.reshape(-1)
    n = flat.size
    header = _I32x2.pack(width, height)
    if n == 0:
        return header
    is_zero = flat == 0
    starts = np.flatnonzero(np.r_[True, is_zero[1:] != is_zero[:-1]])
    run_len = np.diff(np.r_[starts, n])
    run_zero = is_zero[starts]
    if not run_zero[0]:  # records always begin with a zero run
        run_len, run_zero = np.r_[0, run_len], np.r_[True, run_zero]
    if run_zero[-1]:  # and end with a value run
        run_len, run_zero = np.r_[run_len, 0], np.r_[run_zero, False]
    records = run_len.reshape(-1, 2).astype("<i4")  # (empty, full)
    full = records[:, 1].astype(np.int64)
    n_rec = len(records)
    rec_off = 8 * np.arange(n_rec) + 2 * np.r_[0, np.cumsum(full)[:-1]]
    out = np.empty(8 * n_rec + 2 * int(full.sum()), dtype=np.uint8)
    hdr_idx = (rec_off[:, None] + np.arange(8)).reshape(-1)
    out[hdr_idx] = records.view(np.uint8).reshape(-1)
    value_mask = np.ones(out.size, dtype=bool)
    value_mask[hdr_idx] = False
    out[value_mask] = flat[~is_zero].astype("<i2").view(np.uint8)
    return header + out.tobytes()


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------
def list_samples(root: Path) -> list[SampleRef]:
    """Every ``NN/frame_XXXXX_rgb.png``, and every ``frame_XXXXX_pose.txt`` without its image (sorted);
    the files are not opened here."""
    root = common.require_root(root, "BIWI", DEFAULT_ROOT_NAME)
    named = [p for p in root.iterdir() if _SEQUENCE_DIR.match(p.name)]
    common.require_folders(root, sorted(named), "BIWI sequence", "frames", "the sequence's folder")
    sequences = sorted(p.name for p in named if p.is_dir())
    if not sequences:
        raise FileNotFoundError(f"no BIWI sequence folders (01..24) in {root}; "
                                + common.where_to_point(root, DEFAULT_ROOT_NAME, _SEQUENCE_DIR.match))
    return common.list_refs(NAME, root, sequences, _frame_of(_RGB_NAME), _frame_of(_POSE_NAME),
                             lambda frame: f"frame_{frame}_rgb.png")


def _frame_of(pattern: re.Pattern) -> Callable[[Path], str | None]:
    """``path`` -> its frame number when ``pattern`` matches its name."""
    return lambda path: m[1] if (m := pattern.match(path.name)) else None


def companion_paths(source: str) -> dict[str, str]:
    """Relative paths of a frame's files, from its image path ``NN/frame_XXXXX_rgb.png``."""
    seq, name = source.split("/", 1)
    frame = name[: -len("_rgb.png")] if name.lower().endswith("_rgb.png") else Path(name).stem  # .PNG too
    return {
        "pose": f"{seq}/{frame}_pose.txt",
        "depth": f"{seq}/{frame}_depth.bin",
        "rgb_cal": f"{seq}/rgb.cal",
        "depth_cal": f"{seq}/depth.cal",
    }


def input_files(root: Path, ref: SampleRef) -> list[str]:
    """The files a frame's sample is read from (relative paths): its image and companions."""
    return [ref.source, *companion_paths(ref.source).values()]


def head_box(t, rgb_cal: Calibration, head_size_mm: float = HEAD_SIZE_MM) -> tuple[list[float], np.ndarray, float]:
    """Square ``gt`` box around the head centre ``t`` (depth frame, mm) in RGB pixels.
    Returns ``(box, centre_px, z_mm)``."""
    p = rgb_cal.from_depth_frame(t)
    z = float(p[2])
    if z <= 0:  # not in front of this camera: no picture of it (the caller names the file)
        return [math.nan] * 4, np.full(2, math.nan), z
    centre = rgb_cal.project(p)
    half = 0.5 * rgb_cal.focal * head_size_mm / z
    box = [float(centre[0] - half), float(centre[1] - half), float(centre[0] + half), float(centre[1] + half)]
    return box, centre, z


def image_size(root: Path, ref: SampleRef) -> tuple[int, int] | None:
    """The (width, height) ``read_sample`` requires of the frame: its sequence's ``rgb.cal``'s;
    None when that cannot be read (``read_sample`` rejects the frame for it)."""
    try:
        cal = read_cal(root / companion_paths(ref.source)["rgb_cal"])
    except SampleError:
        return None
    return cal.width, cal.height


@common.reader_errors
def read_sample(root: Path, ref: SampleRef) -> RawSample:
    files = companion_paths(ref.source)
    shown = {k: common.display_path(root, v) for k, v in files.items()}
    M, t = read_pose_txt(root / files["pose"], shown["pose"])
    if not labels.is_rotation(M):
        raise SampleError(
            "not_rotation",
            f"{shown['pose']}: the 3x3 matrix is not a rotation (M M^T != I or det != 1): {M.tolist()}",
        )
    if t[2] <= 0:
        raise SampleError("bad_pose", f"{shown['pose']}: head centre {t.tolist()} is not in front of the camera")
    rgb_cal = read_cal(root / files["rgb_cal"], shown["rgb_cal"])
    depth_cal = read_cal(root / files["depth_cal"], shown["depth_cal"])
    image = common.read_image(root / ref.source, common.display_path(root, ref.source),
                               (rgb_cal.width, rgb_cal.height), size_from=shown["rgb_cal"])
    depth = read_depth_bin(root / files["depth"], shown["depth"])
    if depth.shape != (depth_cal.height, depth_cal.width):
        raise SampleError(
            "corrupt_depth",
            f"{shown['depth']}: depth map is {depth.shape[1]}x{depth.shape[0]}, depth.cal says "
            f"{depth_cal.width}x{depth_cal.height}",
        )
    box, centre, z = head_box(t, rgb_cal)
    if z <= 0:
        raise SampleError("bad_calibration", f"{shown['pose']}: head centre {t.tolist()} lands behind the RGB camera "
                                              f"of {shown['rgb_cal']}; one of the two files is wrong")
    depth_box, depth_centre, depth_z = head_box(t, depth_cal)  # through depth.cal's R and T, as the RGB box
    if depth_z <= 0:  # pose.txt's centre is in front of the depth camera (checked above): its .cal moved it
        raise SampleError("bad_calibration", f"{shown['depth_cal']}: its rotation and translation put the head "
                                              f"centre {t.tolist()} mm behind the depth camera; restore the file")
    problem = box_problem(depth_box, (depth_cal.width, depth_cal.height))
    if problem:  # a black or huge depth crop
        shown_box = ", ".join(f"{v:.6g}" for v in depth_box)
        if box_problem(box, (rgb_cal.width, rgb_cal.height)):  # both cameras put it off: the head centre is
            raise SampleError("bad_pose", f"{shown['pose']}: head centre {t.tolist()} mm puts the head off both "
                                          f"cameras' pictures (its box in the depth map [{shown_box}] {problem}); "
                                          "re-download or re-extract the file")
        raise SampleError("bad_calibration", f"{shown['depth_cal']}: the head's box in the depth map [{shown_box}] "
                                              f"{problem}; the file's intrinsics or its rotation and translation are off")
    yaw, pitch, roll = labels.biwi_matrix_to_euler(M)
    return RawSample.from_angles(
        ref, image, yaw, pitch, roll,
        boxes={"gt": box},
        landmarks=None,
        depth=depth,
        extra={
            "head_center_mm": [float(v) for v in t],
            "head_center_depth_px": [float(v) for v in depth_centre],
            # The same physical head box in the depth image (the pipeline crops depth with it).
            "depth_box": depth_box,
            "head_center_rgb_px": [float(v) for v in centre],
            "sequence": ref.group,
        },
    )
