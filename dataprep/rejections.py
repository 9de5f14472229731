"""Why a build rejects a sample: every reason code, what it means and what to do about it.

A rejected sample lands in the manifest's ``rejected`` list as ``{"key", "source", "split", "reason",
"message"}``: the message names the file and what is wrong with it; the reason is one of the stable
codes below, counted in the build's summary table, where each code's advice is printed once. The
README's table of reasons is this one (a test keeps them equal), and so is every code the readers
and stages raise (a test reads them from the source).
"""
from __future__ import annotations

from typing import NamedTuple


class Reason(NamedTuple):
    meaning: str
    action: str


_REFETCH = "re-download or re-extract the file"

#: reason code -> what it means, what to do; in pipeline order (read raw -> box -> crop -> write).
REASONS: dict[str, Reason] = {
    # reading the raw files
    "non_utf8_name": Reason("a file name that is not valid UTF-8 (keys, records and the manifest are UTF-8 text)",
                            "rename the file and its label files in UTF-8"),
    "missing_image": Reason("a label file whose image is not there (an incomplete download)",
                            "restore the image, or delete the label file too"),
    "unreadable_image": Reason("the image file cannot be read (permissions, not a regular file) or decoded at all",
                               f"check the file's permissions; else {_REFETCH}"),
    "corrupt_image": Reason("libjpeg or the PNG chunk checks find the picture data damaged", _REFETCH),
    "wrong_image_size": Reason("the image's size is not the one its labels were made in",
                               "use the dataset's original files: never resize the raw images"),
    "missing_mat": Reason("an image without its .mat label file (300W-LP, AFLW2000)", "restore the .mat file"),
    "unreadable_mat": Reason("the .mat file cannot be read (permissions, not a regular file)",
                             "check the file's permissions"),
    "corrupt_mat": Reason("the .mat file is not a readable MAT file (truncated, damaged, a variable twice)", _REFETCH),
    "missing_key": Reason("the .mat file lacks a variable the labels need (Pose_Para, pt2d, pt3d_68)", _REFETCH),
    "bad_shape": Reason("a .mat variable has the wrong size or is not numbers", _REFETCH),
    "nan_label": Reason("NaN or infinite values in the labels", _REFETCH),
    "bad_pose": Reason("the pose cannot be a head pose: angles past ±180 degrees, a BIWI pose.txt that does not "
                       "parse or puts the head behind the camera or off both cameras' pictures", _REFETCH),
    "missing_pose": Reason("a BIWI frame without its frame_XXXXX_pose.txt", "restore the pose file"),
    "not_rotation": Reason("a BIWI pose matrix that is not a rotation", _REFETCH),
    "bad_calibration": Reason("a BIWI rgb.cal / depth.cal that does not parse or puts the head off the camera's "
                              "picture", "restore the sequence's .cal files"),
    "missing_depth": Reason("a BIWI frame without its frame_XXXXX_depth.bin", "restore the depth file"),
    "corrupt_depth": Reason("a BIWI depth.bin that is truncated, damaged or unreadable", _REFETCH),
    "read_error": Reason("the reader failed in a way it does not foresee",
                         "if the file is fine, this is a dataprep bug: please report it with the message"),
    # boxes
    "no_face": Reason("the detector found no face above its score threshold (or none overlapping the ground "
                      "truth's box)", "expected for a few images; --detector gt takes the box from the labels "
                      "instead"),
    "box_jump": Reason("BIWI, --biwi-tracking none: the face box jumped from the previous accepted frame (FSA-Net's "
                       "rule)", "expected for a few frames; --biwi-tracking previous reuses the last good box instead"),
    "no_box": Reason("the sample has no box of the kind its crop rule reads",
                     "choose another --crop-rule for this dataset"),
    "bad_box": Reason("a face box no face can have (a side under 2 px, or mostly outside the image)",
                      "check the sample's label file (landmarks that coincide or lie off the image)"),
    # the protocol
    "angle_out_of_range": Reason("an angle past the protocol's filter (e.g. protocol 1's ±99 degrees)",
                                 "none: the protocol leaves these out on purpose (--protocol none keeps them)"),
    # writing
    "encode_failed": Reason("the crop could not be encoded as JPEG/PNG", "please report it with the message"),
    "unexpected_error": Reason("a stage after reading failed in a way it does not foresee",
                               "this is a dataprep bug: please report it with the message"),
}


def advice(reason: str) -> str | None:
    """What to do about samples rejected for ``reason`` (None for a code this version does not know:
    a manifest written by another version)."""
    known = REASONS.get(reason)
    return None if known is None else known.action
