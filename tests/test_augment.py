"""Property tests for dataprep.augment (and the bin edges it relies on)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataprep import augment as A
from dataprep import boxes as box_rules
from dataprep import labels
from dataprep.crop import crop_and_resize

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
@st.composite
def samples(draw, max_side: int = 48, yaw_limit: float = 99.0):
    """(image, record, landmarks) following the shard schema, geometry inside a W x H source."""
    w_src = draw(st.integers(40, 400))
    h_src = draw(st.integers(40, 400))
    x1 = draw(st.floats(0, w_src * 0.6, allow_nan=False))
    y1 = draw(st.floats(0, h_src * 0.6, allow_nan=False))
    bw = draw(st.floats(4, w_src - x1, allow_nan=False))
    bh = draw(st.floats(4, h_src - y1, allow_nan=False))
    box = [x1, y1, x1 + bw, y1 + bh]
    crop = box_rules.integer_window(box_rules.square_pad(box, 0.25))
    yaw = draw(st.floats(-yaw_limit, yaw_limit, allow_nan=False))
    pitch = draw(st.floats(-99, 99, allow_nan=False))
    roll = draw(st.floats(-99, 99, allow_nan=False))
    side_w = draw(st.integers(2, max_side))
    side_h = draw(st.integers(2, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(side_h, side_w, 3), dtype=np.uint8)
    lm = np.stack([rng.uniform(box[0], box[2], 68), rng.uniform(box[1], box[3], 68)], axis=1).astype(np.float32)
    dataset = draw(st.sampled_from(["300w_lp", "aflw2000", "biwi"]))
    box_source = draw(st.sampled_from(["gt", "mtcnn"]))
    record = {
        "key": f"{dataset}_sample_{seed}",
        "dataset": dataset,
        "split": "train",
        "source": "AFW/sample.jpg",
        "group": "AFW",
        "yaw": yaw,
        "pitch": pitch,
        "roll": roll,
        "rotation": labels.rotation_from_euler(yaw, pitch, roll).tolist(),
        "image_size": [w_src, h_src],
        "boxes": {"gt": list(box), "pt2d": [box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], "missing": None,
                  "mtcnn": [box[0] + 2, box[1] + 1, box[2] - 1, box[3] - 2]},
        "box_source": box_source,
        "box": list(box),
        "crop_rule": "square",
        "crop": crop,
        "crop_size": [side_w, side_h],
        "augment": [],
    }
    return image, record, lm


def _frozen(image, record, landmarks):
    return image.copy(), copy.deepcopy(record), None if landmarks is None else landmarks.copy()


def _assert_unchanged(before, image, record, landmarks):
    np.testing.assert_array_equal(before[0], image)
    assert before[1] == record
    if landmarks is not None:
        np.testing.assert_array_equal(before[2], landmarks)


ALL_TRANSFORMS = [
    A.HorizontalFlip(),
    A.GaussianBlur(),
    A.BoxBlur(),
    A.DownUpSample("hopenet"),
    A.DownUpSample("randint"),
    A.DownUpSample(10),
    A.Brightness(),
    A.Contrast(),
    A.RandomCropScale(),
    A.Compose([A.RandomApply(A.HorizontalFlip(), 0.5), A.GaussianBlur(), A.RandomCropScale()]),
    A.RandomApply(A.Brightness(), 0.5),
]


# --------------------------------------------------------------------------------------------
# Horizontal flip
# --------------------------------------------------------------------------------------------
def test_mirror_permutation_is_an_involution_fixing_the_centre_line():
    p = A.MIRROR_68
    assert sorted(p.tolist()) == list(range(68))
    np.testing.assert_array_equal(p[p], np.arange(68))
    fixed = set(np.flatnonzero(p == np.arange(68)).tolist())
    assert fixed == {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}
    assert p[36] == 45 and p[39] == 42 and p[48] == 54 and p[0] == 16 and p[17] == 26 and p[31] == 35


@FAST
@given(samples())
def test_flip_twice_is_identity(sample):
    image, record, lm = sample
    before = _frozen(*sample)
    flip = A.HorizontalFlip()
    i1, r1, l1 = flip(image, record, lm)
    i2, r2, l2 = flip(i1, r1, l1)
    _assert_unchanged(before, image, record, lm)
    np.testing.assert_array_equal(i2, image)
    assert (r2["yaw"], r2["pitch"], r2["roll"]) == (record["yaw"], record["pitch"], record["roll"])
    np.testing.assert_allclose(r2["rotation"], record["rotation"], atol=1e-12)
    assert r2["crop"] == record["crop"] and all(isinstance(v, int) for v in r2["crop"])
    np.testing.assert_allclose(r2["box"], record["box"], atol=1e-9)
    assert r2["boxes"].keys() == record["boxes"].keys() and r2["boxes"]["missing"] is None
    for name in ("gt", "pt2d"):
        np.testing.assert_allclose(r2["boxes"][name], record["boxes"][name], atol=1e-9)
    np.testing.assert_allclose(l2, lm, atol=1e-3)
    assert l2.dtype == lm.dtype
    assert r2["augment"] == [{"op": "flip"}, {"op": "flip"}]
    other = {k: v for k, v in r2.items() if k not in ("rotation", "box", "boxes", "augment")}
    assert other == {k: v for k, v in record.items() if k not in ("rotation", "box", "boxes", "augment")}


@FAST
@given(samples())
def test_flip_labels_and_geometry(sample):
    image, record, lm = sample
    out_img, out, out_lm = A.HorizontalFlip()(image, record, lm)
    assert out["yaw"] == -record["yaw"] and out["roll"] == -record["roll"] and out["pitch"] == record["pitch"]
    np.testing.assert_array_equal(out_img, image[:, ::-1])
    w = record["image_size"][0]
    # 300W-LP / AFLW2000 landmarks and the boxes made from them are MATLAB pixel coordinates, which
    # mirror as x -> W + 1 - x (as 300W-LP's own _Flip files have it); detector boxes, BIWI's and the
    # crop window (array slicing) as x -> W - x
    matlab = 1.0 if record["dataset"] in ("300w_lp", "aflw2000") else 0.0
    mirrored = {"gt": w + matlab, "pt2d": w + matlab, "mtcnn": w}
    for name, m in mirrored.items():
        x1, y1, x2, y2 = record["boxes"][name]
        np.testing.assert_allclose(out["boxes"][name], [m - x2, y1, m - x1, y2])
    x1, y1, x2, y2 = record["box"]
    m = mirrored[record["box_source"]]
    np.testing.assert_allclose(out["box"], [m - x2, y1, m - x1, y2])
    c = record["crop"]
    assert out["crop"] == [w - c[2], c[1], w - c[0], c[3]]
    assert out["image_size"] == record["image_size"]
    assert labels.is_rotation(out["rotation"])
    # landmarks keep their meaning: new point i is the mirror of old point MIRROR_68[i]
    np.testing.assert_allclose(out_lm[36], [w + matlab - lm[45, 0], lm[45, 1]], atol=1e-3)
    np.testing.assert_allclose(out_lm[:, 0], w + matlab - lm[A.MIRROR_68, 0], atol=1e-3)


@FAST
@given(samples(yaw_limit=85.0))
def test_flipped_rotation_matches_flipped_angles(sample):
    _, record, _ = sample
    _, out, _ = A.HorizontalFlip()(*sample)
    want = (out["yaw"], out["pitch"], out["roll"])
    # the matrix itself: comparing angles read back from it failed on the few triples whose Euler
    # angles are ambiguous (all three past 180 minus the largest, e.g. 82, 82, 98: README)
    np.testing.assert_allclose(out["rotation"], labels.rotation_from_euler(*want), atol=1e-9)
    assert want == labels.flip_euler(record["yaw"], record["pitch"], record["roll"])


def test_flip_keeps_left_eye_on_the_left():
    """A frontal face: subject's right eye (36-41) on the image left. After the flip the points
    still named 36-41 (now the mirrored left eye) are again on the image left."""
    w = 200
    lm = np.zeros((68, 2), np.float32)
    lm[:, 1] = 100
    lm[36:42, 0] = np.linspace(60, 80, 6)  # right eye, image left
    lm[42:48, 0] = np.linspace(120, 140, 6)  # left eye, image right
    lm[48, 0], lm[54, 0] = 70, 130
    record = {"image_size": [w, 200], "yaw": 10.0, "pitch": 0.0, "roll": 5.0, "crop": [40, 40, 160, 160]}
    _, out, new = A.HorizontalFlip()(np.zeros((8, 8, 3), np.uint8), record, lm)
    assert new[36, 0] == pytest.approx(w - lm[45, 0])
    assert new[36:42, 0].max() < new[42:48, 0].min()
    assert new[48, 0] < new[54, 0]
    assert out["augment"] == [{"op": "flip"}] and "augment" not in record


def test_flip_of_the_crop_is_the_crop_of_the_mirrored_source():
    rng = np.random.default_rng(3)
    src = cv2_smooth(rng, 150, 210)
    w = src.shape[1]
    window = [37, 20, 141, 124]
    crop, used = crop_and_resize(src, window, 64)
    flipped_img, out, _ = A.HorizontalFlip()(crop, {"image_size": [w, 150], "yaw": 0, "pitch": 0, "roll": 0, "crop": used}, None)
    direct, _ = crop_and_resize(np.ascontiguousarray(src[:, ::-1]), out["crop"], 64)
    assert out["crop"] == [w - 141, 20, w - 37, 124]
    assert np.abs(direct.astype(int) - flipped_img.astype(int)).max() <= 1


def test_flip_rejects_non_68_landmarks():
    with pytest.raises(ValueError, match="68"):
        A.HorizontalFlip()(np.zeros((4, 4, 3), np.uint8), {"image_size": [4, 4], "yaw": 0, "pitch": 0, "roll": 0}, np.zeros((21, 2)))


# --------------------------------------------------------------------------------------------
# Resolution, blur, photometric
# --------------------------------------------------------------------------------------------
@FAST
@given(samples(max_side=64), st.sampled_from(["hopenet", "hopenet_code", "randint", 1, 2, 10, 21, (3, 7)]), st.integers(0, 2**31))
def test_downsample_keeps_size_and_dtype(sample, factors, seed):
    image, record, lm = sample
    t = A.DownUpSample(factors)
    out, rec, _ = t(image, record, lm, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.uint8
    f = rec["augment"][-1]["factor"]
    assert rec["augment"][-1]["op"] == "downsample" and f in t.choices
    if f == 1:
        np.testing.assert_array_equal(out, image)
    # nearest-neighbour: every output pixel is one of the input's pixels
    assert set(map(tuple, out.reshape(-1, 3))) <= set(map(tuple, image.reshape(-1, 3)))


def test_downsample_factor_sets():
    assert A.DownUpSample("hopenet").choices == (1, 6, 11, 16, 21)
    assert A.DownUpSample("randint").choices == tuple(range(1, 11))
    assert A.DownUpSample(10).choices == (10,)
    with pytest.raises(ValueError):
        A.DownUpSample("nope")
    with pytest.raises(ValueError):
        A.DownUpSample(0)
    img = np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3)
    out, _, _ = A.DownUpSample(10)(img, {"augment": []}, None)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) == 4  # 2 x 2 blocks


@FAST
@given(samples(), st.integers(0, 2**31))
def test_same_seed_same_output_and_inputs_untouched(sample, seed):
    image, record, lm = sample
    before = _frozen(*sample)
    for t in ALL_TRANSFORMS:
        a = t(image, record, lm, np.random.default_rng(seed))
        b = t(image, record, lm, np.random.default_rng(seed))
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
        np.testing.assert_array_equal(a[2], b[2])
        assert a[0].shape == image.shape and a[0].dtype == np.uint8
        assert a[1] is not record and a[1]["augment"] is not record["augment"]
        _assert_unchanged(before, image, record, lm)


def test_ops_are_recorded_with_their_parameters():
    img = np.full((32, 32, 3), 100, np.uint8)
    rec = {"augment": [], "crop": [0, 0, 32, 32], "image_size": [32, 32], "yaw": 1.0, "pitch": 2.0, "roll": 3.0}
    t = A.Compose([A.GaussianBlur((1.0, 1.0)), A.BoxBlur(5), A.Brightness(10), A.Contrast(1.5), A.DownUpSample(2)])
    out, r, _ = t(img, rec, None, np.random.default_rng(0))
    assert r["augment"] == [
        {"op": "blur", "sigma": 1.0}, {"op": "boxblur", "kernel": 5}, {"op": "brightness", "delta": 10.0},
        {"op": "contrast", "factor": 1.5}, {"op": "downsample", "factor": 2},
    ]
    assert (out == 110).all()  # blur/contrast of a flat image change nothing; brightness adds 10
    assert rec["augment"] == []


def test_photometric_clips():
    img = np.array([[[0, 128, 255]]], np.uint8)
    assert A.Brightness(50)(img, {}, None)[0].tolist() == [[[50, 178, 255]]]
    assert A.Brightness(-50)(img, {}, None)[0].tolist() == [[[0, 78, 205]]]
    two = np.array([[[0, 0, 0]], [[200, 200, 200]]], np.uint8)
    assert A.Contrast(2.0)(two, {}, None)[0][:, 0, 0].tolist() == [0, 255]
    assert A.Contrast(0.0)(two, {}, None)[0][:, 0, 0].tolist() == [100, 100]


def test_blur_refuses_a_negative_sigma_it_would_record_without_blurring():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for sigma in (-1.0, (-1.0, 1.0)):
        with pytest.raises(ValueError, match="sigma must be >= 0"):
            A.GaussianBlur(sigma)
    out, rec, _ = A.GaussianBlur(0.0)(img, {}, None)
    assert np.array_equal(out, img) and rec["augment"] == [{"op": "blur", "sigma": 0.0}]


def test_random_apply_probability():
    img = np.zeros((4, 4, 3), np.uint8)
    rec = {"augment": [], "image_size": [4, 4], "yaw": 1.0, "pitch": 0.0, "roll": 0.0}
    rng = np.random.default_rng(0)
    hits = sum(bool(A.RandomApply(A.HorizontalFlip(), 0.3)(img, rec, None, rng)[1]["augment"]) for _ in range(400))
    assert 80 < hits < 160
    assert A.RandomApply(A.HorizontalFlip(), 0.0)(img, rec, None, rng)[1]["augment"] == []
    assert A.RandomApply(A.HorizontalFlip(), 1.0)(img, rec, None, rng)[1]["augment"] == [{"op": "flip"}]


# --------------------------------------------------------------------------------------------
# RandomCropScale
# --------------------------------------------------------------------------------------------
def cv2_smooth(rng, h, w):
    """A smooth random RGB image (survives resampling with small differences)."""
    import cv2

    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def test_cropscale_identity_when_scale_one_and_no_shift():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    rec = {"crop": [10, 20, 110, 120], "augment": []}
    out, r, _ = A.RandomCropScale(scale=1.0, shift=0.0)(img, rec, None, rng)
    np.testing.assert_array_equal(out, img)
    assert r["crop"] == [10, 20, 110, 120]


@FAST
@given(st.integers(0, 2**31))
def test_cropscale_equals_cropping_the_source_at_the_new_window(seed):
    rng = np.random.default_rng(seed)
    src = cv2_smooth(rng, 240, 260)
    window = [60, 50, 180, 170]
    stored, used = crop_and_resize(src, window, 96)
    rec = {"crop": used, "augment": [], "image_size": [260, 240]}
    out, r, _ = A.RandomCropScale((0.8, 1.2), 0.1)(stored, rec, None, rng)
    new = r["crop"]
    assert out.shape == stored.shape and all(isinstance(v, int) for v in new)
    op = r["augment"][-1]
    assert op["op"] == "cropscale" and 0.8 <= op["scale"] <= 1.2 and max(map(abs, op["shift"])) <= 0.1
    assert new == op["window"]
    side = new[2] - new[0]
    assert abs(side - op["scale"] * 120) <= 1.0
    direct, _ = crop_and_resize(src, new, 96)
    # compare where the stored crop covers the new window (the rest is black by design)
    to_out = box_rules.box_to_crop_coords(used, new, (96, 96))
    x1, y1 = max(0, int(math.ceil(to_out[0]))) + 2, max(0, int(math.ceil(to_out[1]))) + 2
    x2, y2 = min(96, int(to_out[2])) - 2, min(96, int(to_out[3])) - 2
    assert x2 - x1 > 40 and y2 - y1 > 40
    diff = np.abs(out[y1:y2, x1:x2].astype(int) - direct[y1:y2, x1:x2].astype(int))
    assert diff.mean() < 1.5  # a 2-pixel misplacement gives ~9
    if new[0] < used[0] - 2:  # window reaches left of the stored crop: black there
        assert out[:, : max(1, int(to_out[0]) - 1)].max() == 0


# --------------------------------------------------------------------------------------------
# Spec parsing and offline variants
# --------------------------------------------------------------------------------------------
def test_parse_augment_spec():
    ts = A.parse_augment_spec("flip, blur,downsample,boxblur,brightness,contrast,cropscale")
    assert [type(t) for t in ts] == [
        A.HorizontalFlip, A.GaussianBlur, A.DownUpSample, A.BoxBlur, A.Brightness, A.Contrast, A.RandomCropScale,
    ]
    assert ts[2].choices == (1, 6, 11, 16, 21)
    assert A.parse_augment_spec("") == [] and A.parse_augment_spec(None) == []
    assert [type(t) for t in A.parse_augment_spec(["flip"])] == [A.HorizontalFlip]
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        A.parse_augment_spec("flip,rotate")
    with pytest.raises(ValueError, match="twice"):
        A.parse_augment_spec("flip,flip")


@FAST
@given(samples(), st.integers(0, 2**31))
def test_offline_variants(sample, seed):
    image, record, lm = sample
    before = _frozen(*sample)
    names = ["flip", "blur", "downsample", "cropscale"]
    variants = A.offline_variants(image, record, lm, ",".join(names), np.random.default_rng(seed))
    again = A.offline_variants(image, record, lm, names, np.random.default_rng(seed))
    _assert_unchanged(before, image, record, lm)
    assert [v[0] for v in variants] == ["_flip", "_blur", "_downsample", "_cropscale"]
    for (suffix, img, rec, l), name, (_, img2, rec2, _) in zip(variants, names, again):
        assert rec["key"] == record["key"] + suffix and "." not in rec["key"]
        assert rec["source"] == record["source"]
        assert rec["augment"][-1]["op"] == name and len(rec["augment"]) == 1
        assert img.shape == image.shape and img.dtype == np.uint8
        np.testing.assert_array_equal(img, img2)
        assert rec == rec2
    assert variants[2][2]["augment"][-1]["factor"] in (6, 11, 16, 21)
    assert variants[0][2]["yaw"] == -record["yaw"]
    matlab = 1.0 if record["dataset"] in ("300w_lp", "aflw2000") else 0.0
    np.testing.assert_allclose(variants[0][3][36, 0], record["image_size"][0] + matlab - lm[45, 0], atol=1e-3)


def test_key_rng_is_stable():
    a = A.key_rng("300w_lp_AFW_1", 7).integers(0, 2**31, 4)
    b = A.key_rng("300w_lp_AFW_1", 7).integers(0, 2**31, 4)
    c = A.key_rng("300w_lp_AFW_2", 7).integers(0, 2**31, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------------------------------------
# Bins: edge labels stay inside the class count (Hopenet's digitize crash)
# --------------------------------------------------------------------------------------------
def test_bin_edges_do_not_overflow():
    assert labels.HOPENET_BINS.count == 66 and labels.EHPNET_BINS.count == 62
    assert labels.HOPENET_BINS.to_bin(99.0) == 65
    assert labels.EHPNET_BINS.to_bin(93.0) == 61
    assert labels.HOPENET_BINS.to_bin(-99.0) == 0 and labels.EHPNET_BINS.to_bin(-93.0) == 0


@FAST
@given(st.floats(-99, 99, allow_nan=False))
def test_flipped_angle_bins_stay_in_range(yaw):
    fy, _, _ = labels.flip_euler(yaw, 0.0, 0.0)
    assert 0 <= labels.HOPENET_BINS.to_bin(fy) <= 65


def test_ring_blur_is_pils_blur_filter():
    import PIL.Image
    import PIL.ImageFilter

    from dataprep.augment import RingBlur

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    record = {"augment": []}
    out, rec, _ = RingBlur()(image, record, None, rng)
    pil = np.asarray(PIL.Image.fromarray(image).filter(PIL.ImageFilter.BLUR))
    inner = (slice(2, -2), slice(2, -2))  # PIL's border handling aside
    assert np.abs(out[inner].astype(int) - pil[inner].astype(int)).max() <= 1
    assert rec["augment"] == [{"op": "ringblur"}] and record == {"augment": []}


def test_fsanet_augment_records_the_window_its_image_shows():
    """FSA-Net's augment_data (trim and resize, shift over black or white, per-axis zoom): on an
    image whose pixels encode their own source coordinates, the record's new ``crop`` predicts
    every central pixel (the content there is the source's, whatever was drawn)."""
    from dataprep.augment import FsanetAugment

    w = h = 64
    xs = np.arange(w, dtype=np.float64) + 0.5  # continuous pixel centres
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.round(2 * xs)[None, :]
    image[..., 1] = np.round(2 * xs)[:, None]
    record = {"crop": [100.0, 50.0, 164.0, 114.0], "augment": []}  # the source window: 1 source px a pixel
    seen = set()
    for seed in range(60):
        out, rec, _ = FsanetAugment()(image, record, None, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8 and record["augment"] == []
        (entry,) = rec["augment"]
        seen.update(next(iter(s)) for s in entry["steps"])
        x1, y1, x2, y2 = rec["crop"]
        sx, sy = (x2 - x1) / w, (y2 - y1) / h
        u = np.arange(20, 44) + 0.5
        want_x = 2 * (x1 + u * sx - 100.0)  # the source x each output column shows, as the ramp encodes it
        want_y = 2 * (y1 + u * sy - 50.0)
        centre = out[20:44, 20:44].astype(np.float64)
        assert np.abs(centre[..., 0] - want_x[None, :]).max() <= 2.0, (seed, entry)
        assert np.abs(centre[..., 1] - want_y[:, None]).max() <= 2.0, (seed, entry)
    assert seen == {"trim", "shift", "zoom"}


class _ScriptedDraws:
    """A stand-in for the generator that answers EhpnetAugment's draws from two lists, so a test
    picks the path: ``random()`` from ``randoms``, ``choice(options)`` from ``choices`` (each
    checked to be one of the options the code offers)."""

    def __init__(self, randoms, choices=()):
        self.randoms, self.choices = list(randoms), list(choices)

    def random(self):
        return self.randoms.pop(0)

    def choice(self, options):
        value = self.choices.pop(0)
        assert value in list(options), (value, list(options))
        return value


def _sharp_ramp(size: int = 112) -> np.ndarray:
    """Red and green encode each pixel's x and y (2 levels a pixel); blue a checkerboard, so the
    image is sharp (EHPNet changes only images whose Laplacian variance is above 120)."""
    xs = np.arange(size, dtype=np.float64) + 0.5
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = np.round(2 * xs)[None, :]
    image[..., 1] = np.round(2 * xs)[:, None]
    image[..., 2] = 255 * ((np.arange(size)[:, None] + np.arange(size)[None, :]) % 2)
    return image


def test_ehpnet_augment_trim_and_border_record_the_window_their_image_shows():
    from dataprep.augment import EhpnetAugment, _sharpness

    image = _sharp_ramp()
    assert _sharpness(image) > 120
    record = {"crop": [100.0, 50.0, 212.0, 162.0], "augment": []}  # 1 source px a pixel
    # no brightness (0.1), trim 7 (0.9), no down-up (0.1), neither blur (0.1) nor sharpening (0.1),
    # border 3 (0.9), no grey (0.1)
    draws = _ScriptedDraws([0.1, 0.9, 0.1, 0.1, 0.1, 0.9, 0.1], [7, 3])
    out, rec, _ = EhpnetAugment()(image, record, None, draws)
    assert not draws.randoms and not draws.choices and record["augment"] == []
    assert rec["augment"] == [{"op": "ehpnet_augment", "steps": [{"trim": 7}, {"border": 3}]}]
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not out[:3].any() and not out[-3:].any() and not out[:, :3].any() and not out[:, -3:].any()
    x1, y1, x2, y2 = rec["crop"]
    s = (x2 - x1) / 112
    u = np.arange(30, 82) + 0.5
    want_x, want_y = 2 * (x1 + u * s - 100.0), 2 * (y1 + u * s - 50.0)
    centre = out[30:82, 30:82].astype(np.float64)
    assert np.abs(centre[..., 0] - want_x[None, :]).max() <= 2.0
    assert np.abs(centre[..., 1] - want_y[:, None]).max() <= 2.0
    # the trim shows less (7 px off each side of 112), the border more (3 px of black each side)
    side = 98 * 112 / 106
    assert rec["crop"] == pytest.approx([156 - side / 2, 106 - side / 2, 156 + side / 2, 106 + side / 2])


def test_ehpnet_augment_grey_is_fed_as_its_code_feeds_it():
    import cv2

    from dataprep.augment import EhpnetAugment

    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    record = {"crop": [0.0, 0.0, 112.0, 112.0], "augment": []}
    out, rec, _ = EhpnetAugment()(image, record, None, _ScriptedDraws([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9]))
    assert rec["augment"][0]["steps"] == [{"grey": True}] and rec["crop"] == record["crop"]
    # the code's COLOR_RGB2GRAY of its BGR image: blue weighs 0.299, red 0.114; the grey is its
    # first (blue) plane, the others the normalisation's zero (127.5; 128 here)
    bgr = image[..., ::-1]
    assert np.array_equal(out[..., 2], cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_RGB2GRAY))
    assert (out[..., :2] == 128).all()


def test_ehpnet_augment_darkens_only_bright_images_and_leaves_blurry_ones_mostly_alone():
    import cv2

    from dataprep.augment import EhpnetAugment

    record = {"crop": [0.0, 0.0, 112.0, 112.0], "augment": []}
    dark, bright = np.full((112, 112, 3), 90, np.uint8), np.full((112, 112, 3), 230, np.uint8)
    # alpha 0.75 + 0.5 * 0.2 = 0.85 with beta -5: a darkening pair, applied to bright images only;
    # flat images are not sharp, so only the grey draw follows (0.1: none)
    for image, applied in ((dark, False), (bright, True)):
        out, rec, _ = EhpnetAugment()(image, record, None, _ScriptedDraws([0.9, 0.2, 0.1], [-5]))
        steps = rec["augment"][0]["steps"]
        assert steps == ([{"contrast": 0.85, "brightness": -5}] if applied else [])
        assert np.array_equal(out, cv2.convertScaleAbs(image, alpha=0.85, beta=-5) if applied else image)
    # a brightening pair applies to any image
    out, rec, _ = EhpnetAugment()(dark, record, None, _ScriptedDraws([0.9, 0.8, 0.1], [3]))
    assert rec["augment"][0]["steps"] == [{"contrast": 1.15, "brightness": 3}]
    assert np.array_equal(out, cv2.convertScaleAbs(dark, alpha=1.15, beta=3))
    # drawn with a real generator: a blurry image gets only the colour steps, a sharp one all kinds
    seen = {"blurry": set(), "sharp": set()}
    for seed in range(80):
        for kind, image in (("blurry", np.full((112, 112, 3), 120, np.uint8)), ("sharp", _sharp_ramp())):
            out, rec, _ = EhpnetAugment()(image, record, None, np.random.default_rng(seed))
            assert out.shape == image.shape and out.dtype == np.uint8
            seen[kind].update(next(iter(step)) for step in rec["augment"][0]["steps"])
    assert seen["blurry"] == {"contrast", "grey"}
    assert seen["sharp"] == {"contrast", "trim", "down_up", "blur", "sharpen", "border", "grey"}


def test_ehpnet_and_its_teachers_train_with_its_flip_and_augmentation():
    import train_minimal.models  # noqa: F401 - registers the models
    from train_minimal import registry

    from dataprep.augment import EhpnetAugment, HorizontalFlip

    for name in ("ehpnet", "ehpnet_resnet101", "ehpnet_res2net101", "ehpnet_res2net101d", "ehpnet_botnet"):
        flip, augment = registry.get(name).train_transforms().transforms
        assert isinstance(flip.transform, HorizontalFlip) and flip.p == 0.5, name
        assert isinstance(augment, EhpnetAugment), name
