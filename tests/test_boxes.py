"""Box rules and the crop stage against hand-computed values."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from dataprep import boxes
from dataprep.crop import crop_and_resize, cut_window, recrop, snap_window


def test_square_pad_pads_the_shorter_side_evenly():
    # 40 wide, 100 tall: the 60 px difference split, 30 px added on each side of x
    assert boxes.square_pad([100, 50, 140, 150]) == [70, 50, 170, 150]
    # margin 0.25 of the 100 px side on every side
    assert boxes.square_pad([100, 50, 140, 150], margin=0.25) == [45, 25, 195, 175]


def test_hopenet_loose_updates_corners_in_sequence():
    # box 100x100 at (100, 100); k = 0.2 (AFLW2000: Hopenet's AFLW2000 class moves the sides by 2k)
    # x1 = 100 - 2*0.2*100 = 60;  y1 = 100 - 2*0.2*100 = 60
    # x2 = 200 + 2*0.2*|200 - 60| = 256 (uses the moved x1, as Hopenet's code does)
    # y2 = 200 + 0.6*0.2*|200 - 60| = 216.8
    got = boxes.hopenet_loose([100, 100, 200, 200], 0.2, "aflw2000")
    assert got == pytest.approx([60, 60, 256, 216.8])
    # 300W-LP (its Pose_300W_LP class: sides 0.6k), k = 0.2 drawn
    got = boxes.hopenet_loose([100, 100, 200, 200], 0.2, "300w_lp")
    assert got == pytest.approx([88, 60, 200 + 0.12 * 112, 216.8])
    # BIWI: k = 0.35, top grows by k (not 2k)
    got = boxes.hopenet_loose([100, 100, 200, 200], 0.35, "biwi")
    assert got == pytest.approx([79, 65, 200 + 0.21 * 121, 200 + 0.21 * 135])


def test_hopenet_rule_is_the_square_its_transforms_cut_from_the_loose_window():
    # test_hopenet.py: Scale(224) (the shorter side), CenterCrop(224): the centred square of the
    # shorter side. AFLW2000's loose window [60, 60, 256, 216.8] is 196 x 156.8: a 156.8 square,
    # 19.6 px in from each side (not the whole window squashed to a square)
    got = boxes.crop_window("hopenet", [100, 100, 200, 200], dataset="aflw2000", image_size=(450, 450))
    assert got == pytest.approx([79.6, 60, 236.4, 216.8])
    # BIWI's [79, 65, 225.41, 228.35] is 146.41 x 163.35: the 146.41 square, 8.47 px down
    got = boxes.crop_window("hopenet", [100, 100, 200, 200], dataset="biwi", image_size=(640, 480))
    assert got == pytest.approx([79, 65 + (163.35 - 146.41) / 2, 225.41, 65 + (163.35 + 146.41) / 2])
    # train_hopenet.py: Scale(240), RandomCrop(224): a square of 224/240 of the shorter side,
    # anywhere inside the window (k drawn too, on 300W-LP)
    for seed in range(50):
        rng = np.random.default_rng(seed)
        k = boxes.hopenet_k("300w_lp", np.random.default_rng(seed))
        loose = boxes.hopenet_loose([100, 100, 200, 200], k, "300w_lp")
        got = boxes.crop_window("hopenet", [100, 100, 200, 200], dataset="300w_lp", image_size=(450, 450), rng=rng)
        side = min(loose[2] - loose[0], loose[3] - loose[1]) * 224 / 240
        assert got[2] - got[0] == pytest.approx(side) and got[3] - got[1] == pytest.approx(side)
        assert loose[0] <= got[0] and got[2] <= loose[2] + 1e-9 and loose[1] <= got[1] and got[3] <= loose[3] + 1e-9


def test_hopenet_k_is_random_in_range_for_300w_lp_and_seeded():
    ks = [boxes.hopenet_k("300w_lp", np.random.default_rng(i)) for i in range(50)]
    assert min(ks) >= 0.2 and max(ks) <= 0.4 and len(set(ks)) > 40
    assert boxes.hopenet_k("300w_lp", np.random.default_rng(3)) == boxes.hopenet_k("300w_lp", np.random.default_rng(3))


def test_fsanet_margin_truncates_and_clips():
    # int box (10, 20, 110, 70): w 100, h 50; 0.6 margins: x 60, y 30 -> clipped at 0 and W-1
    assert boxes.fsanet_margin([10.7, 20.2, 110.9, 70.5], (150, 100)) == [0, 0, 149, 99]
    assert boxes.fsanet_margin([100, 100, 200, 150], (450, 450)) == [40, 70, 260, 180]
    assert boxes.fsanet_margin([100, 100, 200, 150], (450, 450), "aflw2000") == [40, 70, 260, 180]
    # BIWI (FSA-Net's BIWI scripts): 0.4 margins, x 40, y 20, and the far edge's pixel kept
    # (img[y1:y2 + 1, x1:x2 + 1]): an MTCNN box (x 300.6, y 150.2, w 80, h 100) in a 640 x 480 frame
    assert boxes.fsanet_margin([300.6, 150.2, 380.6, 250.2], (640, 480), "biwi") == [268, 110, 413, 291]
    assert boxes.fsanet_margin([600, 400, 640, 480], (640, 480), "biwi") == [584, 368, 640, 480]  # clipped
    assert boxes.crop_window("fsanet", [300.6, 150.2, 380.6, 250.2], dataset="biwi", image_size=(640, 480)) \
        == [268, 110, 413, 291]


def test_fsanet_points_drop_placeholders_but_hopenet_keeps_them():
    pts = np.array([[100, 120], [200, 220], [-1, 452], [150, 180]], dtype=float)
    b = boxes.pt2d_boxes(pts)
    assert b["pt2d"] == [-1, 120, 200, 452]
    assert b["pt2d_valid"] == [100, 120, 200, 220]
    # no point left to FSA-Net's filter (all placeholders): no pt2d_valid box, and its rule reads gt
    only_placeholders = boxes.pt2d_boxes(np.tile([-1.0, 452.0], (21, 1)))
    assert only_placeholders == {"pt2d": [-1, 452, -1, 452]}
    assert boxes.rule_box_name({"gt": [0, 0, 9, 9], **only_placeholders}, "gt", "fsanet") == "gt"


def test_iou_aspect_distortion():
    assert boxes.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert boxes.iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0
    assert boxes.aspect_ratio([0, 0, 60, 100]) == pytest.approx(0.6)
    assert boxes.square_distortion([0, 0, 60, 100]) == pytest.approx(100 / 60 - 1)


def test_crop_pads_black_outside_and_maps_coordinates():
    image = np.full((100, 100, 3), 200, np.uint8)
    out, window = crop_and_resize(image, [-50, -50, 50, 50], 50)
    assert window == [-50, -50, 50, 50]
    assert out[:20, :20].max() == 0 and out[30:, 30:].min() == 200
    pts = boxes.to_crop_coords([[0, 0], [50, 50]], window, (50, 50))
    assert pts.tolist() == [[25, 25], [50, 50]]


@pytest.mark.parametrize("window", [[-40, -180, 264, 236], [-7, 3, 90, 130], [30, -61, 150, 59], [10, 10, 90, 90]])
def test_cut_window_snaps_padding_to_whole_pixels_and_records_what_it_shows(window):
    """The loader's cut of a padded window: the image's edges land on output pixel boundaries, each
    padded edge moves by under one output pixel, and the returned window is what the picture shows
    (a marked source pixel lands where that window maps it, as landmarks are mapped)."""
    size = 64
    image = np.full((120, 100, 3), 200, np.uint8)
    out, taken = cut_window(image, window, size)
    # the image fills whole output pixels: full 200 inside, exactly 0 outside
    inside = boxes.to_crop_coords([[0, 0], [100, 120]], taken, (size, size))
    (i1, j1), (i2, j2) = np.clip(inside, 0, size)
    np.testing.assert_allclose([i1, j1, i2, j2], np.round([i1, j1, i2, j2]), atol=1e-6)
    i1, j1, i2, j2 = (int(round(v)) for v in (i1, j1, i2, j2))
    assert (out[j1:j2, i1:i2] == 200).all() and out.sum() == 200 * 3 * (i2 - i1) * (j2 - j1)
    # a padded edge moves by at most half an output pixel plus (padding / image part) of one
    step_x, step_y = (window[2] - window[0]) / size, (window[3] - window[1]) / size
    for got, want, step, inner in zip(taken, window, (step_x, step_y) * 2, (i2 - i1, j2 - j1) * 2):
        assert abs(got - want) <= step * (0.5 + (size - inner) / inner) + 1e-9
    if window[0] >= 0 and window[1] >= 0 and window[2] <= 100 and window[3] <= 120:
        assert taken == window  # inside the image: crop_and_resize, unchanged
    # a marked pixel lands where the window maps it
    for x, y in ((50, 60), (3, 110), (97, 2)):
        marked = np.zeros((120, 100, 3), np.uint8)
        marked[y, x] = 255
        cut, taken2 = cut_window(marked, window, size, interpolation=cv2.INTER_AREA)
        assert taken2 == taken
        (px, py), = boxes.to_crop_coords([[x + 0.5, y + 0.5]], taken, (size, size))
        if not (0 <= px < size and 0 <= py < size):
            continue
        ys, xs = np.nonzero(cut[..., 0])
        weights = cut[ys, xs, 0].astype(float)
        centre = (np.average(xs, weights=weights) + 0.5, np.average(ys, weights=weights) + 0.5)
        assert abs(centre[0] - px) < 0.75 and abs(centre[1] - py) < 0.75, (centre, (px, py))


def test_cut_window_is_crop_and_resize_up_to_the_snap():
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), (9, 9), 3)
    window = [-40, -180, 264, 236]
    exact, _ = crop_and_resize(image, window, 224, interpolation=cv2.INTER_LINEAR)
    cut, taken = cut_window(image, window, 224)
    again, _ = crop_and_resize(image, taken, 224, interpolation=cv2.INTER_LINEAR)  # integer window
    assert taken != window and snap_window(window, (224, 224), 224)[0] == taken
    inner = (slice(130, 200), slice(60, 150))  # away from the image's edges
    assert np.abs(cut[inner].astype(int) - exact[inner].astype(int)).mean() < 2.0
    assert snap_window([-50, -50, -10, 30], (100, 100), 32) is None  # misses the image


def test_depth_crops_keep_exact_millimetres():
    depth = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100)
    out, _ = crop_and_resize(depth, [0, 0, 100, 100], 50)
    assert out.dtype == np.uint16 and set(np.unique(out)) <= set(np.unique(depth))


def test_recrop_applies_another_rule_from_the_record():
    # A stored 200 px crop of window [0, 0, 400, 400]; the record's gt box is (100, 100, 300, 300).
    stored = np.zeros((200, 200, 3), np.uint8)
    stored[50:150, 50:150] = 255  # the face box area, in stored-crop pixels
    record = {"boxes": {"gt": [100, 100, 300, 300]}, "box": [100, 100, 300, 300], "box_source": "gt",
              "dataset": "aflw2000", "image_size": [400, 400], "crop": [0, 0, 400, 400]}
    out = recrop(stored, record, "box", 64)
    assert out.shape == (64, 64, 3) and out.min() == 255


def test_rule_box_name_is_the_same_choice_for_build_and_load_time():
    gt_built = {"gt": [0, 0, 1, 1], "pt2d": [0, 0, 2, 2], "pt2d_valid": [0, 0, 3, 3]}
    # a Hopenet-built shard (box_source pt2d) re-cropped square reads gt, as a square build does
    assert boxes.rule_box_name(gt_built, "pt2d", "square") == "gt"
    assert boxes.rule_box_name(gt_built, "gt", "hopenet") == "pt2d"
    assert boxes.rule_box_name(gt_built, "pt2d", "fsanet") == "pt2d_valid"
    assert boxes.rule_box_name({"gt": [0, 0, 1, 1]}, "gt", "fsanet") == "gt"  # BIWI: no pt2d boxes
    detected = {**gt_built, "mtcnn": [5, 5, 9, 9]}
    assert all(boxes.rule_box_name(detected, "mtcnn", r) == "mtcnn" for r in boxes.CROP_RULES)


class _Extreme:
    """An rng drawing the top of Hopenet's k range (0.4 on 300W-LP: its loosest window), and each
    view offset (ranges from 0) at the end ``corner`` says: the view in one corner of the window."""

    def __init__(self, corner=(1, 1)):
        self.ends = list(corner)

    def uniform(self, lo, hi):
        if lo != 0.0:
            return hi
        return hi if self.ends.pop(0) else lo


@pytest.mark.parametrize("rule", ["hopenet", "fsanet", "square", "box"])
def test_room_margin_is_the_smallest_square_crop_that_holds_the_rule(rule):
    """``ROOM_MARGIN[rule]``: a square crop built with that ``--margin`` holds the rule's loosest
    window (any dataset, wide, tall or square boxes); 0.05 less does not, where the margin is > 0."""
    big = (10_000, 10_000)  # no clipping to the image

    def holds(margin, box, dataset):
        room = boxes.square_pad(box, margin)
        for corner in ((0, 0), (0, 1), (1, 0), (1, 1)):  # Hopenet's training view, in each corner
            window = boxes.crop_window(rule, box, dataset=dataset, image_size=big, rng=_Extreme(corner))
            if not (all(room[i] <= window[i] + 1.0 for i in (0, 1)) and all(room[i] >= window[i] - 1.0 for i in (2, 3))):
                return False
        return True

    margin = boxes.ROOM_MARGIN[rule]
    for box in ([4000, 4000, 4200, 4200], [4000, 4000, 4300, 4150], [4000, 4000, 4150, 4300]):
        for dataset in ("300w_lp", "aflw2000", "biwi"):
            assert holds(margin, box, dataset), (box, dataset)
    if margin > 0:
        assert not holds(margin - 0.05, [4000, 4000, 4200, 4200], "300w_lp")


def test_rule_coverage_counts_the_window_pixels_the_stored_crop_holds():
    from dataprep.crop import rule_coverage

    box = [100.0, 100.0, 200.0, 200.0]
    record = {"box": box, "boxes": {"gt": box}, "box_source": "gt", "dataset": "aflw2000",
              "image_size": [450, 450], "crop": boxes.integer_window(boxes.square_pad(box))}
    window = boxes.crop_window("hopenet", box, dataset="aflw2000", image_size=(450, 450))
    assert rule_coverage(record, "hopenet") == pytest.approx(100 * 100 / boxes.area(window), rel=0.02)
    assert rule_coverage(record, "square") == 1.0
    roomy = dict(record, crop=boxes.integer_window(boxes.square_pad(box, boxes.ROOM_MARGIN["hopenet"])))
    assert rule_coverage(roomy, "hopenet") == 1.0
    # only the part of the window inside the source image counts (Hopenet pads past the image too)
    corner = [0.0, 0.0, 100.0, 100.0]
    at_edge = dict(record, box=corner, boxes={"gt": corner}, crop=[0, 0, 160, 160])
    window = boxes.crop_window("hopenet", corner, dataset="aflw2000", image_size=(450, 450))
    assert window[0] < 0 and window[1] < 0 and window[2] < 160 and window[3] < 160
    assert rule_coverage(at_edge, "hopenet") == 1.0


def test_square_windows_stay_square_in_whole_pixels():
    """The square rule's window, rounded to the pixels actually cut, is square: rounding each edge
    on its own made a third of them 1 px off (161 x 162), a squash the rule exists to avoid."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        x1, y1 = rng.uniform(-50, 400, 2)
        box = [x1, y1, x1 + rng.uniform(20, 300), y1 + rng.uniform(20, 300)]
        window = boxes.square_pad(box, rng.choice([0.0, 0.25, 0.8]))
        x1, y1, x2, y2 = boxes.integer_window(window)
        assert x2 - x1 == y2 - y1
        assert all(abs(a - b) <= 1.0 for a, b in zip((x1, y1, x2, y2), window))  # within a pixel of it
    for _ in range(2000):  # half-pixel sides, where the two sides' last bits decide the rounding
        cx, cy, half = rng.uniform(0, 400), rng.uniform(0, 400), rng.integers(10, 150) + 0.25
        x1, y1, x2, y2 = boxes.integer_window([cx - half, cy - half, cx + half, cy + half])
        assert x2 - x1 == y2 - y1
    assert boxes.integer_window([10.4, 20.6, 10.45, 20.61]) == [10, 21, 11, 22]  # never empty
    assert boxes.integer_window([135.2, 156.4, 296.5, 318.1]) == [135, 156, 296, 318]


def test_landmarks_land_on_the_model_input_pixels_they_mark():
    # MATLAB coordinates (300W-LP, AFLW2000): source pixel i's centre at i + 1
    whole = [0.0, 0.0, 10.0, 10.0]
    got = boxes.points_to_input_pixels([[[1.0, 1.0], [10.0, 4.0]]], [whole], [(10, 10)], [1.0])[0]
    np.testing.assert_allclose(got, [[0.0, 0.0], [9.0, 3.0]])  # same size: the same pixels, 0-based
    got = boxes.points_to_input_pixels([[[1.0, 1.0], [10.0, 10.0]]], [whole], [(20, 20)], [1.0])[0]
    np.testing.assert_allclose(got, [[0.5, 0.5], [18.5, 18.5]])  # twice the size: between the two it became
    got = boxes.points_to_input_pixels([[[5.0, 3.0]]], [[2.0, 1.0, 12.0, 11.0]], [(10, 10)], [1.0])[0]
    np.testing.assert_allclose(got, [[2.0, 1.0]])  # source pixel (4, 2) in a window from (2, 1)
    # continuous coordinates (pixel i spans [i, i + 1)): its centre i + 0.5
    got = boxes.points_to_input_pixels([[[0.5, 9.5]]], [whole], [(10, 10)], [0.0])[0]
    np.testing.assert_allclose(got, [[0.0, 9.0]])


def test_box_from_crop_coords_inverts_box_to_crop_coords():
    crop, size = [37.25, -12.5, 301.75, 252.0], (224, 224)
    window = [-10, 5, 180, 230]  # stored-crop pixels, reaching past its edge
    source = boxes.box_from_crop_coords(window, crop, size)
    sx, sy = (crop[2] - crop[0]) / 224, (crop[3] - crop[1]) / 224
    assert source == [crop[0] - 10 * sx, crop[1] + 5 * sy, crop[0] + 180 * sx, crop[1] + 230 * sy]
    assert boxes.box_to_crop_coords(source, crop, size) == pytest.approx(window, abs=1e-9)
    assert boxes.box_from_crop_coords([0, 0, 224, 224], crop, size) == pytest.approx(crop)
