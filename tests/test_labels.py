"""Label conventions (dataprep.labels) checked against known values and round trips."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dataprep import labels
from dataprep.datasets import biwi

BIWI_KNOWN = {"pitch": 7.607223, "yaw": 3.290995, "roll": -1.566632}  # real hpdb/01/frame_00003_pose.txt


def test_biwi_known_value_real_sample(real_samples):
    M, t = biwi.read_pose_txt(real_samples / "hpdb" / "01" / "frame_00003_pose.txt")
    yaw, pitch, roll = labels.biwi_matrix_to_euler(M)
    assert yaw == pytest.approx(BIWI_KNOWN["yaw"], abs=1e-5)
    assert pitch == pytest.approx(BIWI_KNOWN["pitch"], abs=1e-5)
    assert roll == pytest.approx(BIWI_KNOWN["roll"], abs=1e-5)
    assert labels.is_rotation(M)


@pytest.mark.parametrize("angles", [(3.290995, 7.607223, -1.566632), (-45.0, 20.0, 10.0), (70.0, -35.5, -28.0)])
def test_biwi_generated_pose_txt(tmp_path, angles):
    yaw, pitch, roll = angles
    M = labels.rotation_from_euler(yaw, pitch, roll).T  # pose.txt holds M, with R = M.T
    path = tmp_path / "frame_00003_pose.txt"
    path.write_text(biwi.format_pose_txt(M, [51.9, 38.3, 881.8]))
    M_read, t_read = biwi.read_pose_txt(path)
    assert labels.biwi_matrix_to_euler(M_read) == pytest.approx(angles, abs=1e-3)
    assert t_read == pytest.approx([51.9, 38.3, 881.8])
    # the stored rotation is rotation_from_euler(...), which for BIWI is M.T
    np.testing.assert_allclose(labels.rotation_from_euler(*labels.biwi_matrix_to_euler(M_read)), M_read.T, atol=1e-5)


def test_pose_para_order_and_units():
    pose = np.array([[0.1, -0.2, 0.3, 200.0, 210.0, -80.0, 0.0012]], dtype=np.float32)
    yaw, pitch, roll = labels.pose_para_to_euler(pose)
    assert pitch == pytest.approx(math.degrees(0.1), rel=1e-6)
    assert yaw == pytest.approx(math.degrees(-0.2), rel=1e-6)
    assert roll == pytest.approx(math.degrees(0.3), rel=1e-6)
    with pytest.raises(ValueError):
        labels.pose_para_to_euler([0.1, 0.2])


def test_euler_round_trip_random():
    rng = np.random.default_rng(1)
    for yaw, pitch, roll in rng.uniform(-89, 89, size=(500, 3)):
        r = labels.rotation_from_euler(yaw, pitch, roll)
        assert labels.is_rotation(r, tol=1e-9)
        assert labels.rotation_to_euler(r) == pytest.approx((yaw, pitch, roll), abs=1e-9)


def test_flip_rotation_matches_flip_euler():
    rng = np.random.default_rng(2)
    for yaw, pitch, roll in rng.uniform(-89, 89, size=(200, 3)):
        flipped = labels.flip_rotation(labels.rotation_from_euler(yaw, pitch, roll))
        np.testing.assert_allclose(flipped, labels.rotation_from_euler(*labels.flip_euler(yaw, pitch, roll)),
                                   atol=1e-12)
        assert labels.flip_euler(yaw, pitch, roll) == (-yaw, pitch, -roll)


def test_bins():
    h = labels.HOPENET_BINS
    assert h.count == 66
    assert h.to_bin(99.0) == 65
    assert h.to_bin(-99) == 0
    assert h.to_bin(-99.0 + 3.0) == 1
    assert h.to_bin(1000.0) == 65 and h.to_bin(-1000.0) == 0
    np.testing.assert_array_equal(h.to_bin([-99.0, 0.0, 98.9]), [0, 33, 65])
    assert labels.EHPNET_BINS.count == 62
    assert labels.WHENET_YAW_BINS.count == 120
    one_hot = np.zeros(66)
    one_hot[33] = 1.0
    assert h.decode(one_hot) == pytest.approx(3 * 33 - 99)  # the papers' decode: 3 * E[idx] - 99
    assert h.decode(np.full(66, 1 / 66)) == pytest.approx(3 * 32.5 - 99)
    assert h.centers()[33] == pytest.approx(0.5 * 3)


def test_angles_in_range():
    assert labels.angles_in_range(99.0, -99.0, 0.0)
    assert not labels.angles_in_range(99.01, 0.0, 0.0)
    assert not labels.angles_in_range(float("nan"), 0.0, 0.0)


def test_rotation_round_trip_past_90_degrees_of_yaw_keeps_the_label_triple():
    # AFLW2000 / 300W-LP hold |yaw| up to 99 and beyond with small pitch and roll: the formulas give
    # (180 - yaw, pitch - 180, roll - 180) for those; rotation_to_euler returns the label's triple
    import torch

    for yaw, pitch, roll in ((95.0, 10.0, 5.0), (-97.0, -20.0, 3.0), (120.0, 10.0, 5.0), (-135.0, -20.0, 30.0),
                             (123.25, 38.09, -3.80), (150.0, -20.0, 10.0), (95.0, 90.0, 10.0), (30.0, 100.0, 10.0)):
        r = labels.rotation_from_euler(yaw, pitch, roll)
        assert labels.rotation_to_euler(r) == pytest.approx((yaw, pitch, roll), abs=1e-9)
        got = labels.rotation_to_euler(torch.tensor(r[None], dtype=torch.float64))[0].tolist()
        assert got == pytest.approx([yaw, pitch, roll], abs=1e-9)
        # float32 (MNN's decode): a pitch of exactly 90 must not flip the triple on rounding noise
        got = labels.rotation_to_euler(torch.tensor(r[None], dtype=torch.float32))[0].tolist()
        assert got == pytest.approx([yaw, pitch, roll], abs=1e-3)
    # the README's example, by the formulas alone: the other triple of the same rotation
    r = labels.rotation_from_euler(123.25, 38.09, -3.80)
    formula = (-math.degrees(math.atan2(-r[2, 0], math.hypot(r[2, 1], r[2, 2]))),
               math.degrees(math.atan2(r[2, 1], r[2, 2])), -math.degrees(math.atan2(r[1, 0], r[0, 0])))
    assert formula == pytest.approx((56.75, -141.91, 176.20), abs=1e-9)
    # pitch and roll near the protocols' 99 limit: still the label (the other triple's largest is 180)
    r = labels.rotation_from_euler(0.0, 82.0, 99.0)
    assert labels.rotation_to_euler(r) == pytest.approx((0.0, 82.0, 99.0), abs=1e-9)
    # all three past 180 - the largest (no head pose): the other triple, whose largest is smaller
    r = labels.rotation_from_euler(95.0, 100.0, 120.0)
    assert labels.rotation_to_euler(r) == pytest.approx((85.0, -80.0, -60.0), abs=1e-9)


def test_the_sample_writers_conversions_invert_the_readers():
    """``euler_to_pose_para`` / ``euler_to_biwi_matrix`` (what the sample data writes) give back the
    angles through the readers' ``pose_para_to_euler`` / ``biwi_matrix_to_euler``; ``mirror_points``
    mirrors in place of order (300W-LP's _Flip pt2d), ``mirror_landmarks`` also re-indexes."""
    rng = np.random.default_rng(5)
    for yaw, pitch, roll in rng.uniform(-85, 85, (50, 3)):
        pose = labels.euler_to_pose_para(yaw, pitch, roll)
        assert pose[1] == pytest.approx(np.deg2rad(yaw))  # Pose_Para is [pitch, yaw, roll]
        assert labels.pose_para_to_euler(pose) == pytest.approx((yaw, pitch, roll))
        assert labels.biwi_matrix_to_euler(labels.euler_to_biwi_matrix(yaw, pitch, roll)) == pytest.approx((yaw, pitch, roll))
    pts = rng.uniform(0, 450, (68, 2))
    mirrored = labels.mirror_points(pts, 450.0, 1.0)
    assert np.array_equal(mirrored[:, 1], pts[:, 1]) and np.allclose(mirrored[:, 0], 451.0 - pts[:, 0])
    assert np.array_equal(labels.mirror_landmarks(pts, 450.0, 1.0), mirrored[labels.MIRROR_68])
