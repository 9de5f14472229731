"""300W-LP reader (``--root`` = the ``300W_LP`` folder).

Samples are ``<SUBSET>/<NAME>.jpg`` + ``<NAME>.mat`` in the eight subset folders below; anything else
under the root (``landmarks/``, ``Code/``, ...) is ignored. The ``*_Flip`` subsets hold the mirrored
images with their pose re-fitted (their own ``Pose_Para``, read like any other), but their ``pt2d``
is the original's points mirrored (x -> W + 1 - x) in the original's order: point 36, the right
eye's outer corner, sits on the left eye. The reader re-indexes them (``labels.MIRROR_68``), so that
landmark i is the same facial point in every record, as it is after our own flip.

The synthesized views ``NAME_k`` (k > 0: the photo ``NAME_0`` turned further) carry ``NAME_0``'s
``pt2d`` unchanged (the real ``AFW_134212_1_1.mat`` holds ``AFW_134212_1_0``'s points): their
landmarks and pt2d-based boxes are the unturned face's, as in the papers' loaders. The views' own
points in ``landmarks/`` are not read (no real file of that folder to check a reader against).
"""
from __future__ import annotations

from pathlib import Path

from .. import labels
from ..records import RawSample, SampleRef
from ..boxes import bbox_of_points, pt2d_boxes
from . import common, matfile

NAME = "300w_lp"
DEFAULT_ROOT_NAME = "300W_LP"
SUBSETS = ("AFW", "HELEN", "IBUG", "LFPW", "AFW_Flip", "HELEN_Flip", "IBUG_Flip", "LFPW_Flip")


def list_samples(root: Path) -> list[SampleRef]:
    """Every ``<SUBSET>/*.jpg``, and every ``.mat`` there without its image (sorted by path)."""
    root = common.require_root(root, "300W-LP", DEFAULT_ROOT_NAME)
    # a subset folder in another case (afw_flip) would be passed over without a word, and read as
    # its own name it would lose what the name says (_Flip: landmarks to re-index)
    canonical = {s.lower(): s for s in SUBSETS}
    miscased = sorted(p.name for p in root.iterdir()  # (a case-blind file system finds them by either name)
                      if p.name.lower() in canonical and p.name not in SUBSETS and p.is_dir()
                      and not (root / canonical[p.name.lower()]).is_dir())
    if miscased:
        shown = ", ".join(f"{name} (rename it {canonical[name.lower()]})" for name in miscased)
        raise FileNotFoundError(f"300W-LP subset folder(s) named in another case under {root}: {shown}; the "
                                "reader takes the dataset's own names, in which _Flip marks the mirrored images")
    common.require_folders(root, [root / s for s in SUBSETS], "300W-LP subset", "samples", "the dataset's folder")
    found = [s for s in SUBSETS if (root / s).is_dir()]
    if not found:
        raise FileNotFoundError(f"no 300W-LP subset folders ({', '.join(SUBSETS)}) in {root}; "
                                + common.where_to_point(root, DEFAULT_ROOT_NAME, lambda name: name in SUBSETS))
    return matfile.list_mat_refs(NAME, root, found)


input_files = matfile.image_and_mat_files
image_size = matfile.image_size


@common.reader_errors
def read_sample(root: Path, ref: SampleRef) -> RawSample:
    image, mat, display = matfile.image_and_mat(root, ref.source)
    yaw, pitch, roll, pose_para = matfile.pose_labels(mat, display)
    pt2d = matfile.require_finite(matfile.require_array(mat, "pt2d", (2, 68), display), "pt2d", display)
    landmarks = pt2d.T.copy()
    if ref.group.endswith("_Flip"):
        landmarks = landmarks[labels.MIRROR_68]
    return RawSample.from_angles(
        ref, image, yaw, pitch, roll,
        boxes={"gt": bbox_of_points(landmarks), **pt2d_boxes(landmarks)},
        landmarks=landmarks,
        extra={"pose_para": pose_para},
    )
