"""AFLW2000-3D reader (``--root`` = the ``AFLW2000`` folder of ``imageNNNNN.jpg`` + ``.mat`` pairs).

``gt`` box: min/max of the 68 fitted ``pt3d_68`` points (x, y rows). ``pt2d`` box: min/max over all
21 AFLW ``pt2d`` points *including* the ``(-1, 452)`` placeholders of unannotated points: the
polluted box Hopenet's loader uses, kept only for the audit; never use it as ``gt``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..records import RawSample, SampleRef
from ..boxes import bbox_of_points, pt2d_boxes
from . import common, matfile

NAME = "aflw2000"
DEFAULT_ROOT_NAME = "AFLW2000"
GROUP = "AFLW2000"


def list_samples(root: Path) -> list[SampleRef]:
    """Every ``*.jpg`` directly in the root, and every ``.mat`` without its image (sorted); the files
    are not opened here. A root with neither raises ``FileNotFoundError`` (usually the wrong folder
    was passed)."""
    root = common.require_root(root, "AFLW2000", DEFAULT_ROOT_NAME)
    refs = matfile.list_mat_refs(NAME, root, [""], group=GROUP)
    if not refs:
        raise FileNotFoundError(f"no .jpg images or .mat labels in {root}; "
                                + common.where_to_point(root, DEFAULT_ROOT_NAME))
    return refs


input_files = matfile.image_and_mat_files
image_size = matfile.image_size


@common.reader_errors
def read_sample(root: Path, ref: SampleRef) -> RawSample:
    image, mat, display = matfile.image_and_mat(root, ref.source)
    yaw, pitch, roll, pose_para = matfile.pose_labels(mat, display)
    pt3d = matfile.require_array(mat, "pt3d_68", (3, 68), display)
    landmarks = matfile.require_finite(pt3d[:2].T.copy(), "pt3d_68", display)
    pt2d = matfile.require_finite(matfile.require_array(mat, "pt2d", (2, 21), display), "pt2d", display)
    missing_x, missing_y = matfile.PT2D_MISSING_XY
    missing = int(np.count_nonzero((pt2d[0] == missing_x) & (pt2d[1] == missing_y)))
    return RawSample.from_angles(
        ref, image, yaw, pitch, roll,
        boxes={"gt": bbox_of_points(landmarks), **pt2d_boxes(pt2d.T)},
        landmarks=landmarks,
        extra={"pose_para": pose_para, "pt2d_missing": missing},
    )
