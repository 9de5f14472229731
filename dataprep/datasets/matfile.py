"""The 300W-LP / AFLW2000-3D ``.mat`` logic shared by their two readers (what every reader shares,
BIWI's included, is in :mod:`.common`).

Both MAT datasets come from the same 3DDFA fitting code, so their files share one layout (MAT v5,
zlib-compressed, written by MATLAB on PCWIN64)::

    Pose_Para   (1, 7)    float32   [pitch, yaw, roll (radians), tx, ty, tz, scale]
    pt2d        (2, N)    float64   x row, y row (300W-LP: N=68; AFLW2000: N=21, missing = (-1, 452))
    roi         (1, 4)    int16
    Illum_Para  (1, 10)   float64
    Color_Para  (1, 7)    float32
    Tex_Para    (199, 1)  float64
    Shape_Para  (199, 1)  float64 (float32 in 300W-LP ``*_Flip``)
    Exp_Para    (29, 1)   float64 (float32 in 300W-LP ``*_Flip``)
    pt3d_68     (3, 68)   float32   AFLW2000 only: x, y, z rows

The readers only *require* the keys they use (``Pose_Para``, ``pt2d`` and, for AFLW2000,
``pt3d_68``).
"""
from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadWarning

from .. import labels
from ..errors import first_line
from ..records import SampleError, SampleRef
from .common import broken_link_note, display_path, list_refs, read_file_bytes, read_image
from .mat5 import read_numeric_mat

#: Size of every 300W-LP and AFLW2000 image (width, height); ``pt2d`` is in these pixels.
MAT_IMAGE_SIZE = (450, 450)

#: AFLW2000's ``pt2d`` placeholder for a point that was not annotated.
PT2D_MISSING_XY = (-1.0, 452.0)

#: Fixed 116-byte MAT header text for files we write (savemat would stamp the current time).
SAMPLE_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: PCWIN64, Created on: Thu Jan  1 00:00:00 1970"


def mat_sample_stem(path: Path) -> str | None:
    """A 300W-LP / AFLW2000 sample's image: ``NAME.jpg`` (any case). By name only: a ``.jpg`` that
    is a folder, pipe or dangling link is a sample too, rejected when read, so the counts show it."""
    return path.stem if path.suffix.lower() == ".jpg" else None


def mat_label_stem(path: Path) -> str | None:
    """A sample's label file ``NAME.mat`` (any case), by name only as :func:`mat_sample_stem`."""
    return path.stem if path.suffix.lower() == ".mat" else None


def list_mat_refs(dataset: str, root: Path, folders: Sequence[str], group: str | None = None) -> list[SampleRef]:
    """The samples of a MAT dataset: every ``NAME.jpg``, and every ``NAME.mat`` without one."""
    return list_refs(dataset, root, folders, mat_sample_stem, mat_label_stem, lambda stem: f"{stem}.jpg", group)


# --------------------------------------------------------------------------------------------
# Reading .mat files
# --------------------------------------------------------------------------------------------
def load_mat(path: Path, display: str) -> dict[str, Any]:
    """The variables of a ``.mat`` file as ``scipy.io.loadmat`` gives them, with our errors:
    ``missing_mat`` / ``unreadable_mat`` (no permission, not a regular file) / ``corrupt_mat``. The
    datasets' files (compressed numeric matrices) are parsed by :func:`mat5.read_numeric_mat`, 3x
    faster with the same arrays; anything else by ``loadmat``."""
    try:
        data = read_file_bytes(path)
    except FileNotFoundError:
        raise SampleError("missing_mat", f"{display}: label file not found"
                          + (broken_link_note(path) or " (the image has no .mat next to it)")) from None
    except OSError as exc:
        raise SampleError("unreadable_mat", f"{display}: cannot read the file ({exc})") from None
    try:
        fast = read_numeric_mat(data)
        if fast is not None:
            return fast
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", MatReadWarning)
            mat = scipy.io.loadmat(io.BytesIO(data))
        trouble = [w for w in said if issubclass(w.category, MatReadWarning)]
        if trouble:  # e.g. a variable stored twice: scipy keeps the last one and prints no file name
            raise SampleError("corrupt_mat", f"{display}: damaged MAT file (scipy: {first_line(trouble[0].message)}); "
                                             "re-download the file")
        return mat
    except (MemoryError, SampleError):
        raise
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for a bad file
        detail = f"{type(exc).__name__}: {exc}".strip()
        # a MAT v5 header (endian mark at byte 126) on bytes scipy cannot read: an incomplete download, most often
        what = "damaged or truncated MAT file" if data[126:128] in (b"IM", b"MI") else "not a MAT file"
        raise SampleError(
            "corrupt_mat", f"{display}: {what} ({len(data)} bytes; scipy: {detail}); re-download the file"
        ) from exc


#: What to do about a label file whose values are wrong (the dataset's own files never are).
REFETCH = "the file is damaged or not the dataset's: re-download or re-extract it"


def require_array(mat: Mapping[str, Any], key: str, shape: tuple[int, ...], display: str,
                  *, size_only: bool = False) -> np.ndarray:
    """``mat[key]`` as a float64 array of ``shape``.

    ``size_only``: accept any shape holding ``prod(shape)`` values (returned flattened).
    Raises ``missing_key`` / ``bad_shape`` (also for non-numeric data).
    """
    if key not in mat:
        present = sorted(k for k in mat if not k.startswith("__"))
        raise SampleError("missing_key", f"{display}: no '{key}' in the MAT file (keys: {present})")
    arr = np.asarray(mat[key])
    if arr.dtype.kind not in "fiu":
        raise SampleError("bad_shape", f"{display}: '{key}' is {arr.dtype} data, expected numbers; {REFETCH}")
    if size_only:
        if arr.size != int(np.prod(shape)):
            raise SampleError("bad_shape", f"{display}: '{key}' has {arr.size} values {arr.shape}, "
                                           f"expected {int(np.prod(shape))}; {REFETCH}")
        return arr.astype(np.float64).reshape(-1)
    if arr.shape != tuple(shape):
        raise SampleError("bad_shape", f"{display}: '{key}' has shape {arr.shape}, expected {tuple(shape)}; {REFETCH}")
    return arr.astype(np.float64)


def require_finite(arr: np.ndarray, what: str, display: str) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise SampleError("nan_label", f"{display}: {what} contains NaN or infinite values; {REFETCH}")
    return arr


def pose_labels(mat: Mapping[str, Any], display: str) -> tuple[float, float, float, list[float]]:
    """``Pose_Para`` -> ``(yaw, pitch, roll, pose_para)``: degrees (labels.pose_para_to_euler) and
    the 7 raw values as Python floats (kept in the record's extras)."""
    pose = require_array(mat, "Pose_Para", (1, 7), display, size_only=True)
    # all 7: the translation and scale go into the record too, and JSON has no NaN
    require_finite(pose, "Pose_Para (pitch, yaw, roll, tx, ty, tz, scale)", display)
    yaw, pitch, roll = labels.pose_para_to_euler(pose)
    past = {k: v for k, v in (("yaw", yaw), ("pitch", pitch), ("roll", roll)) if abs(v) > labels.MAX_ANGLE}
    if past:  # no head turns that far, and no rotation gives such an angle back (labels.rotation_to_euler)
        shown = ", ".join(f"{k} {v:.6g}" for k, v in past.items())
        raise SampleError("bad_pose", f"{display}: Pose_Para gives {shown} degrees, past ±{labels.MAX_ANGLE:g} (a "
                                      f"damaged or hand-made file?); {REFETCH}")
    return yaw, pitch, roll, [float(v) for v in pose]


def image_and_mat_files(root: Path, ref) -> list[str]:
    """The two files :func:`image_and_mat` reads for ``ref`` (relative paths): the ``input_files``
    of both MAT readers."""
    return [ref.source, _mat_beside(root, ref.source)]


def _mat_beside(root: Path, source: str) -> str:
    """The relative path of ``source``'s label file: ``NAME.mat``, or, when there is none, the one
    file ``NAME.<mat in any case>`` beside it (``NAME.MAT``: the listing matches extensions in any
    case; the stem must match exactly, so ``a.jpg`` never takes ``A.mat``'s labels)."""
    rel = Path(source).with_suffix(".mat")
    if (root / rel).exists():
        return rel.as_posix()
    found = [n for n in _folder_names(str(root / rel.parent))
             if Path(n).stem == rel.stem and Path(n).suffix.lower() == ".mat"]
    return rel.with_name(found[0]).as_posix() if len(found) == 1 else rel.as_posix()


def _folder_names(folder: str) -> tuple[str, ...]:
    """The names in ``folder`` (() when it cannot be listed), listed once per folder and state:
    every sample of a partial download without its labels asks, and a 300W-LP folder holds
    thousands of files."""
    try:
        return _listing(folder, os.stat(folder).st_mtime_ns)
    except OSError:
        return ()


@functools.lru_cache(maxsize=64)
def _listing(folder: str, mtime_ns: int) -> tuple[str, ...]:
    return tuple(os.listdir(folder))


def image_size(root: Path, ref) -> tuple[int, int]:
    """The (width, height) ``read_sample`` requires of a sample's image: 450 x 450 for every
    300W-LP and AFLW2000 picture (the readers' ``image_size``)."""
    return MAT_IMAGE_SIZE


def image_and_mat(root: Path, source: str) -> tuple[np.ndarray, dict[str, Any], str]:
    """The common first step of both MAT readers: image (450x450 RGB) and its parsed ``.mat``.
    Returns ``(image, mat, mat_display_name)``. The .mat is checked first: a missing label is the
    more useful message."""
    image_path = root / source
    mat_rel = _mat_beside(root, source)
    mat_display = display_path(root, mat_rel)
    mat = load_mat(root / mat_rel, mat_display)
    image = read_image(image_path, display_path(root, source), MAT_IMAGE_SIZE)
    return image, mat, mat_display


# --------------------------------------------------------------------------------------------
# Writing .mat files (sample data generator)
# --------------------------------------------------------------------------------------------
def mat_bytes(arrays: Mapping[str, np.ndarray], header: bytes = SAMPLE_MAT_HEADER) -> bytes:
    """MAT v5 compressed file bytes for ``arrays`` (in order, dtypes and shapes kept as given).

    Deterministic: scipy stamps the current time into the 116-byte text header; we overwrite it.
    """
    buf = io.BytesIO()
    scipy.io.savemat(buf, dict(arrays), do_compression=True, format="5", oned_as="column")
    data = bytearray(buf.getvalue())
    if len(header) > 116:
        raise ValueError("MAT header text is limited to 116 bytes")
    data[:116] = header.ljust(116, b" ")
    return bytes(data)


def write_mat(path: Path, arrays: Mapping[str, np.ndarray], header: bytes = SAMPLE_MAT_HEADER) -> None:
    """Write ``arrays`` as a MAT v5 compressed file, byte-identical for identical input."""
    Path(path).write_bytes(mat_bytes(arrays, header))
