"""dataprep.loader on tiny synthetic shards written with webdataset.TarWriter.

``write_synthetic_shards`` is also used by ``benchmarks/loader_augment.py``.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from dataprep import augment as A
from dataprep import boxes as box_rules
from dataprep import labels
from dataprep import crop as crop_ops
from dataprep.crop import crop_and_resize
from dataprep.loader import IMAGENET_MEAN, IMAGENET_STD, collate, decode_image, make_dataset, make_loader

N_SHARDS, PER_SHARD, CROP = 3, 4, 64


# --------------------------------------------------------------------------------------------
# Synthetic shards (schema of the build's records)
# --------------------------------------------------------------------------------------------
def synthetic_sample(index: int, crop_size: int, rng: np.random.Generator) -> dict:
    """One source image with a face box, 68 landmarks and labels, and its stored square crop."""
    w, h = int(rng.integers(crop_size * 2, crop_size * 3)), int(rng.integers(crop_size * 2, crop_size * 3))
    small = rng.integers(0, 256, size=(max(2, h // 12), max(2, w // 12), 3), dtype=np.uint8)
    source = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    bw, bh = rng.uniform(0.3, 0.5) * w, rng.uniform(0.3, 0.5) * h
    x1, y1 = rng.uniform(0.1 * w, w - bw - 0.1 * w), rng.uniform(0.1 * h, h - bh - 0.1 * h)
    box = [float(x1), float(y1), float(x1 + bw), float(y1 + bh)]
    landmarks = np.stack([rng.uniform(box[0], box[2], 68), rng.uniform(box[1], box[3], 68)], 1).astype(np.float32)
    yaw, pitch, roll = (float(v) for v in rng.uniform(-90, 90, 3))
    crop, window = crop_and_resize(source, box_rules.square_pad(box, 0.25), crop_size)
    key = f"300w_lp_SYN_{index:05d}"
    record = {
        "key": key,
        "dataset": "300w_lp",
        "split": "train",
        "source": f"SYN/{index:05d}.jpg",
        "group": "SYN",
        "yaw": yaw,
        "pitch": pitch,
        "roll": roll,
        "rotation": labels.rotation_from_euler(yaw, pitch, roll).tolist(),
        "image_size": [w, h],
        "boxes": {"gt": box, "pt2d": box, "pt2d_valid": box},
        "box_source": "gt",
        "box": box,
        "crop_rule": "square",
        "crop": window,
        "crop_size": [crop_size, crop_size],
        "augment": [],
    }
    return {"key": key, "source": source, "crop": crop, "record": record, "landmarks": landmarks}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def sample_members(s: dict, extra: dict | None = None) -> dict:
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(s["crop"], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    members = {"__key__": s["key"], "jpg": jpg.tobytes(), "json": json.dumps(s["record"]).encode(),
               "pts.npy": _npy_bytes(s["landmarks"])}
    members.update(extra or {})
    return members


def write_synthetic_shards(directory, n_shards: int = N_SHARDS, per_shard: int = PER_SHARD,
                           crop_size: int = CROP, seed: int = 0, prefix: str = "train"):
    """Write ``n_shards`` tars of ``per_shard`` samples; returns (brace pattern, samples by key)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = {}
    for shard in range(n_shards):
        with wds.TarWriter(str(directory / f"{prefix}-{shard:06d}.tar")) as sink:
            for i in range(per_shard):
                s = synthetic_sample(shard * per_shard + i, crop_size, rng)
                samples[s["key"]] = s
                # a pickle-looking member the loader must skip without reading
                extra = {"pyd": b"\x80\x04not really a pickle"} if i == 0 else None
                sink.write(sample_members(s, extra))
    pattern = str(directory / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")
    return pattern, samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))


def keys_of(loader_or_ds) -> list[str]:
    out = []
    for item in loader_or_ds:
        out.extend(item["key"] if isinstance(item["key"], list) else [item["key"]])
    return out


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_batches_shapes_and_labels(shards):
    pattern, samples = shards
    loader = make_loader(pattern, batch_size=5, shuffle=0)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [5, 5, 2]
    b = batches[0]
    assert b["image"].shape == (5, 3, CROP, CROP) and b["image"].dtype == torch.float32
    assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0
    assert b["angles"].shape == (5, 3) and b["angles"].dtype == torch.float32
    assert b["landmarks"].shape == (5, 68, 2)
    keys = [k for b in batches for k in b["key"]]
    assert keys == sorted(samples)  # shuffle=0 keeps file order
    for b in batches:
        for key, angles, rec, img, lm_src, lm in zip(b["key"], b["angles"], b["record"], b["image"], b["landmarks_source"], b["landmarks"]):
            want = samples[key]["record"]
            assert rec == want
            np.testing.assert_allclose(angles.numpy(), [want["yaw"], want["pitch"], want["roll"]], rtol=1e-6)
            # the image is the stored jpg, decoded to RGB
            got = np.rint(img.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
            bgr = cv2.imdecode(np.frombuffer(sample_members(samples[key])["jpg"], np.uint8), cv2.IMREAD_COLOR)
            np.testing.assert_array_equal(got, bgr[:, :, ::-1])
            np.testing.assert_array_equal(lm_src, samples[key]["landmarks"])
            # into model-input pixels (pixel j's centre at j) from 300W-LP's MATLAB coordinates (pixel
            # i's centre at i + 1): continuous x - 0.5, through the crop, less half an output pixel
            c = np.asarray(rec["crop"], np.float64)
            want = (np.asarray(lm_src, np.float64) - 0.5 - c[:2]) * (CROP / (c[2:] - c[:2])) - 0.5
            np.testing.assert_allclose(lm.numpy(), want, rtol=0, atol=1e-4)


def test_batch_landmarks_masks_missing_and_odd_shapes_and_map_each_sample_exactly():
    from dataprep.loader.batches import _batch_landmarks

    rng = np.random.default_rng(3)
    sources = [rng.uniform(-50, 400, (68, 2)).astype(np.float32), None, rng.uniform(0, 300, (5, 2)),
               rng.uniform(0, 300, (136,))]  # float32, missing, another shape, float64 pairs in a row
    crops = [[10.5, -20.25, 310.0, 279.75], [0, 0, 1, 1], [0, 0, 9, 9], [-3, 7, 197, 207]]
    datasets = ["300w_lp", "aflw2000", "300w_lp", "biwi"]  # MATLAB coordinates, and continuous ones
    records = [{"crop": c, "dataset": d} for c, d in zip(crops, datasets)]
    sizes = [(224, 224), (64, 64), (64, 64), (64, 48)]
    got = _batch_landmarks(sources, records, sizes)
    assert got["landmarks"].dtype == np.float32 and got["landmarks"].shape == (4, 68, 2)
    assert got["landmarks_mask"].tolist() == [True, False, False, True]
    for i, origin in ((0, 1.0), (3, 0.0)):  # labels.mirror_offset: where pixel 0's centre is, less 0.5
        single = _batch_landmarks([sources[i]], [records[i]], [sizes[i]])["landmarks"][0]
        np.testing.assert_array_equal(got["landmarks"][i], single)  # a batch maps as one sample does
        c = np.asarray(crops[i], np.float64)
        want = (np.asarray(sources[i], np.float64).reshape(-1, 2) - 0.5 * origin - c[:2]) * (
            np.asarray(sizes[i], np.float64) / (c[2:] - c[:2])) - 0.5
        np.testing.assert_allclose(got["landmarks"][i], want, rtol=0, atol=1e-4)
    assert not got["landmarks"][1:3].any()
    assert _batch_landmarks([None, None], records[:2], sizes[:2]) == {}


def test_brace_list_file_url_and_fsspec_urls(shards, tmp_path):
    pattern, samples = shards
    first = pattern.replace("{000000..000002}", "000000")
    assert sorted(keys_of(make_dataset(pattern, shuffle=0))) == sorted(samples)
    assert len(keys_of(make_dataset(first, shuffle=0))) == PER_SHARD
    assert sorted(keys_of(make_dataset("file://" + pattern, shuffle=0))) == sorted(samples)
    assert len(keys_of(make_dataset([first, Path(pattern.replace("{000000..000002}", "000001"))], shuffle=0))) == 2 * PER_SHARD
    # any fsspec filesystem (here the in-memory one)
    import fsspec

    fs = fsspec.filesystem("memory")
    with open(first, "rb") as src, fs.open("/dataprep-test/train-000000.tar", "wb") as dst:
        dst.write(src.read())
    assert keys_of(make_dataset("memory://dataprep-test/train-000000.tar", shuffle=0)) == keys_of(make_dataset(first, shuffle=0))
    # a missing local shard (a wrong folder or pattern) fails at once, naming it; with a handler the
    # handler decides at read time
    with pytest.raises(FileNotFoundError, match=r"2 of 3 shard\(s\) not found: .*missing-000000.tar, .*missing-000001.tar"):
        make_dataset([first, str(tmp_path / "missing-000000.tar"), "file://" + str(tmp_path / "missing-000001.tar")])
    with pytest.raises(FileNotFoundError, match="missing-000000.tar"):
        make_loader(str(tmp_path / "missing-{000000..000001}.tar"), batch_size=2)
    skipped = make_dataset([first, str(tmp_path / "missing-000000.tar")], shuffle=0, handler=wds.warn_and_continue)
    with pytest.warns(UserWarning, match="missing-000000.tar"):
        assert len(keys_of(skipped)) == PER_SHARD


def test_member_extensions_in_upper_case_are_read(shards, tmp_path):
    """``KEY.JPG`` is the sample's ``jpg`` (webdataset lower-cases suffixes), not a member dropped
    before that, which left every sample without its image."""
    import tarfile

    pattern, _ = shards
    first = pattern.replace("{000000..000002}", "000000")
    upper = tmp_path / "train-000000.tar"
    with tarfile.open(first) as src, tarfile.open(upper, "w") as dst:
        for member in src:
            data = src.extractfile(member)
            if member.name.endswith(".jpg"):
                member.name = member.name[:-4] + ".JPG"
            dst.addfile(member, data)
    assert keys_of(make_dataset(str(upper), shuffle=0)) == keys_of(make_dataset(first, shuffle=0))


def test_shuffle_is_reproducible_per_seed_and_epoch(shards):
    pattern, samples = shards
    a = keys_of(make_dataset(pattern, shuffle=8, seed=1))
    b = keys_of(make_dataset(pattern, shuffle=8, seed=1))
    c = keys_of(make_dataset(pattern, shuffle=8, seed=2))
    assert a == b and sorted(a) == sorted(samples)
    assert a != c and a != sorted(samples)
    loader = make_loader(pattern, batch_size=4, shuffle=8, seed=1)
    epoch0, epoch1 = keys_of(loader), keys_of(loader)
    assert epoch0 == a and epoch1 != epoch0 and sorted(epoch1) == sorted(a)
    fresh = make_loader(pattern, batch_size=4, shuffle=8, seed=1)
    fresh.set_epoch(1)
    assert keys_of(fresh) == epoch1


def test_transforms_run_per_sample_and_record_ops(shards):
    pattern, samples = shards
    aug = [A.RandomApply(A.HorizontalFlip(), 0.5), A.GaussianBlur((0.5, 1.5)), A.DownUpSample("randint")]
    runs = []
    for _ in range(2):
        loader = make_loader(pattern, batch_size=6, shuffle=8, seed=3, transforms=aug)
        runs.append([(k, r, img) for b in loader for k, r, img in zip(b["key"], b["record"], b["image"])])
    for (k1, r1, i1), (k2, r2, i2) in zip(*runs):
        assert k1 == k2 and r1 == r2 and torch.equal(i1, i2)  # same seed -> same outputs
    flipped = 0
    sigmas = set()
    for key, rec, _ in runs[0]:
        ops = [a["op"] for a in rec["augment"]]
        assert ops[-2:] == ["blur", "downsample"] and ops[:-2] in ([], ["flip"])
        sigmas.add(rec["augment"][-2]["sigma"])
        want = samples[key]["record"]
        if ops[0] == "flip":
            flipped += 1
            assert rec["yaw"] == -want["yaw"] and rec["roll"] == -want["roll"] and rec["pitch"] == want["pitch"]
            w = want["image_size"][0]
            assert rec["crop"] == [w - want["crop"][2], want["crop"][1], w - want["crop"][0], want["crop"][3]]
        else:
            assert rec["yaw"] == want["yaw"]
    assert 0 < flipped < len(samples)
    assert len(sigmas) == len(samples)  # drawn per sample


def test_augmentation_does_not_depend_on_order_or_workers(shards):
    pattern, _ = shards
    aug = [A.GaussianBlur(), A.Brightness()]
    by_key = lambda ds: {s["key"]: s["record"]["augment"] for s in ds}  # noqa: E731
    plain = by_key(make_dataset(pattern, shuffle=0, seed=5, transforms=aug))
    shuffled = by_key(make_dataset(pattern, shuffle=8, seed=5, transforms=aug))
    assert plain == shuffled
    loader = make_loader(pattern, batch_size=3, workers=2, shuffle=8, seed=5, transforms=aug)
    got = {k: r["augment"] for b in loader for k, r in zip(b["key"], b["record"])}
    assert got == plain  # every sample exactly once, same draws in worker processes


def test_recrop_and_normalize(shards):
    pattern, samples = shards
    loader = make_loader(pattern, batch_size=4, shuffle=0, crop_rule="box", size=32)
    plain = make_loader(pattern, batch_size=4, shuffle=0, crop_rule="box", size=32, normalize="imagenet")
    for b, n in zip(loader, plain):
        assert b["image"].shape == (4, 3, 32, 32) and b["landmarks"].shape == (4, 68, 2)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(n["image"], (b["image"] - mean) / std)
        for key, rec, img in zip(b["key"], b["record"], b["image"]):
            s = samples[key]
            assert rec["crop_rule"] == "box" and rec["crop_size"] == [32, 32]
            # the recorded window is what the image shows: compare with a crop of the source
            np.testing.assert_allclose(rec["crop"], s["record"]["box"], atol=s["record"]["crop"][2] / CROP)
            direct, _ = crop_and_resize(s["source"], rec["crop"], 32)
            assert np.abs(img.permute(1, 2, 0).numpy() * 255.0 - direct).mean() < 6.0
    raw_bgr = next(iter(make_loader(pattern, batch_size=2, shuffle=0, normalize="raw_bgr")))["image"]
    rgb = next(iter(make_loader(pattern, batch_size=2, shuffle=0)))["image"]
    torch.testing.assert_close(raw_bgr, rgb.flip(1) * 255.0)
    bgr_128 = next(iter(make_loader(pattern, batch_size=2, shuffle=0, normalize="bgr_128")))["image"]
    torch.testing.assert_close(bgr_128, (rgb.flip(1) * 255.0 - 127.5) / 128.0)  # EHPNet's (x - 127.5) * 0.0078125


def test_resampled_epoch_length_and_errors(shards):
    pattern, samples = shards
    ds = make_dataset(pattern, resampled=True, samples_per_epoch=7, seed=0)
    a, b = keys_of(ds), keys_of(ds)
    assert len(a) == 7 and a == b and set(a) <= set(samples)
    ds.set_epoch(1)
    assert keys_of(ds) != a
    with pytest.raises(ValueError, match="crop rule"):
        make_dataset(pattern, crop_rule="nope")
    with pytest.raises(ValueError, match="normalize"):
        make_dataset(pattern, normalize="bgr")


def test_bad_sample_handler(tmp_path):
    s = synthetic_sample(0, 32, np.random.default_rng(0))
    good = synthetic_sample(1, 32, np.random.default_rng(1))
    with wds.TarWriter(str(tmp_path / "bad-000000.tar")) as sink:
        sink.write(sample_members(s, {"jpg": b"not a jpeg"}))
        sink.write(sample_members(good))
    with pytest.raises(ValueError, match="300w_lp_SYN_00000"):
        list(make_dataset(str(tmp_path / "bad-000000.tar"), shuffle=0))
    kept = keys_of(make_dataset(str(tmp_path / "bad-000000.tar"), shuffle=0, handler=wds.ignore_and_continue))
    assert kept == [good["key"]]


def test_collate_rejects_mixed_sizes():
    s = {"image": torch.zeros(3, 4, 4), "angles": torch.zeros(3), "key": "a", "record": {}, "landmarks": None, "landmarks_source": None}
    t = dict(s, image=torch.zeros(3, 5, 5))
    assert "landmarks" not in collate([s, s])
    with pytest.raises(ValueError, match="size"):
        collate([s, t])
    # landmarks of the most common shape are stacked, the rest masked out as zeros
    lms = [np.full((68, 2), 1.5, np.float32), None, np.ones((5, 2), np.float32), np.full((68, 2), 2.5, np.float32)]
    batch = collate([dict(s, landmarks=lm) for lm in lms])
    assert batch["landmarks_mask"].tolist() == [True, False, False, True]
    assert batch["landmarks"].shape == (4, 68, 2) and batch["landmarks"].dtype == torch.float32
    assert batch["landmarks"][0].eq(1.5).all() and batch["landmarks"][3].eq(2.5).all()
    assert not batch["landmarks"][1:3].any()


def test_persistent_workers_get_a_new_epoch_each_pass(shards):
    pattern, samples = shards
    kw = dict(batch_size=3, workers=2, shuffle=8, seed=7, transforms=[A.GaussianBlur((0.5, 1.5))])
    persistent = make_loader(pattern, persistent_workers=True, **kw)
    runs = [[(k, r["augment"]) for b in persistent for k, r in zip(b["key"], b["record"])] for _ in range(3)]
    orders = [[k for k, _ in run] for run in runs]
    assert all(sorted(o) == sorted(samples) for o in orders)
    assert len({tuple(o) for o in orders}) == 3  # a new shuffle every epoch
    sigmas = [{k: a[-1]["sigma"] for k, a in run} for run in runs]
    for a, b in zip(sigmas, sigmas[1:]):
        assert all(a[k] != b[k] for k in samples)  # a new augmentation draw every epoch
    # the same epochs as workers started afresh each epoch, and the same draws as one process
    fresh = make_loader(pattern, **kw)
    single = make_loader(pattern, **dict(kw, workers=0))
    for epoch, run in enumerate(runs):
        fresh.set_epoch(epoch)
        assert [(k, r["augment"]) for b in fresh for k, r in zip(b["key"], b["record"])] == run
        single.set_epoch(epoch)
        assert {k: r["augment"] for b in single for k, r in zip(b["key"], b["record"])} == dict(run)
    # started persistent workers count their own epochs: set_epoch cannot send them elsewhere
    persistent.set_epoch(3)  # the one that comes next anyway
    with pytest.raises(RuntimeError, match="persistent"):
        persistent.set_epoch(0)


def _boxes_that_differ(record: dict, rng: np.random.Generator) -> dict:
    """The record with distinct gt / pt2d / pt2d_valid boxes (so the box choice shows)."""
    box = np.asarray(record["box"], float)
    jitter = lambda: [float(v) for v in box + rng.uniform(-6, 6, 4)]  # noqa: E731
    return dict(record, boxes={"gt": record["box"], "pt2d": jitter(), "pt2d_valid": jitter()})


@pytest.mark.parametrize("rule", sorted(box_rules.CROP_RULES))
def test_rule_window_is_the_window_recrop_cuts(shards, rule):
    _, samples = shards
    rng = np.random.default_rng(11)
    for s in list(samples.values())[:4]:
        gt_build = _boxes_that_differ(s["record"], rng)
        detector_build = dict(gt_build, box_source="scrfd", boxes=dict(gt_build["boxes"], scrfd=gt_build["boxes"]["pt2d"]))
        for record, box_name, reads in ((gt_build, None, box_rules.RULE_GT_BOX[rule]), (detector_build, None, "scrfd"),
                                        (gt_build, "pt2d_valid", "pt2d_valid")):
            window = crop_ops.rule_window(record, rule, rng=np.random.default_rng(5), margin=0.1, box_name=box_name)
            assert window == box_rules.crop_window(rule, record["boxes"][reads], dataset=record["dataset"],
                                                   image_size=record["image_size"], rng=np.random.default_rng(5),
                                                   margin=0.1)
            got = crop_ops.recrop(s["crop"], record, rule, 40, rng=np.random.default_rng(5), margin=0.1, box_name=box_name)
            mapped = box_rules.box_to_crop_coords(window, record["crop"], (CROP, CROP))
            want, taken = crop_and_resize(s["crop"], mapped, 40)
            np.testing.assert_array_equal(got, want)
            assert taken == crop_ops.recrop_window(record, rule, (CROP, CROP), rng=np.random.default_rng(5), margin=0.1,
                                                   box_name=box_name)



def test_padded_windows_are_snapped_and_recorded_as_cut(shards):
    """The default cut of Hopenet's loose window (mostly past the tight stored crop): the record's
    crop is the snapped window the picture shows (landmarks follow it), within about an output
    pixel of the exact cut's window, and the picture is the exact cut's up to the snap."""
    pattern, samples = shards
    kw = dict(shuffle=0, crop_rule="hopenet", size=48, image_format="uint8", random_crop=False)
    fast = list(make_dataset(pattern, **kw))
    exact = list(make_dataset(pattern, exact_cut=True, **kw))
    snapped = past = 0
    for f, e in zip(fast, exact):
        assert f["key"] == e["key"]
        fc, ec = np.array(f["record"]["crop"]), np.array(e["record"]["crop"])
        out_px = (ec[2:] - ec[:2]) / 48  # source pixels per output pixel
        assert (np.abs(fc - ec) <= 1.5 * np.tile(out_px, 2)).all(), (fc, ec)
        snapped += not np.allclose(fc, ec)
        np.testing.assert_allclose(f["landmarks"], box_rules.points_to_input_pixels(
            f["landmarks_source"][None], [f["record"]["crop"]], [(48, 48)], [1.0])[0], rtol=1e-5, atol=1e-4)
        diff = (f["image"].float() - e["image"].float()).abs()
        assert float(diff.mean()) < 8.0, float(diff.mean())
        # what the picture shows is the stored crop where the record says it is
        stored = samples[f["key"]]["record"]["crop"]
        inside = box_rules.to_crop_coords(np.array([stored[:2], stored[2:]]), f["record"]["crop"], (48, 48))
        (i1, j1), (i2, j2) = np.clip(inside, 0, 48)
        np.testing.assert_allclose([i1, j1, i2, j2], np.round([i1, j1, i2, j2]), atol=1e-4)
        img = f["image"].numpy()
        i1, j1, i2, j2 = (int(round(v)) for v in (i1, j1, i2, j2))
        outside = np.ones((48, 48), bool)
        outside[j1:j2, i1:i2] = False
        if outside.any():  # the window reaches past the stored crop: black there, and snapped
            past += 1
            assert img[:, outside].max() == 0
    assert snapped == past > len(fast) // 2  # most Hopenet windows reach past the tight stored crops

def test_jpeg_format_window_gives_the_decoded_pixels(shards):
    pattern, samples = shards
    kw = dict(batch_size=4, shuffle=0, crop_rule="hopenet", size=32, seed=2)
    raw = list(make_loader(pattern, image_format="jpeg", **kw))
    decoded = list(make_loader(pattern, image_format="uint8", exact_cut=True, **kw))
    assert sum(len(b["key"]) for b in raw) == len(samples)
    for r, d in zip(raw, decoded):
        assert "image" not in r and r["window"].shape == (len(r["key"]), 4) and d["image"].dtype == torch.uint8
        assert r["record"] == d["record"]
        torch.testing.assert_close(r["landmarks"], d["landmarks"])
        assert r["landmarks_mask"].all()
        for jpeg, window, img in zip(r["jpeg"], r["window"], d["image"]):
            cut, _ = crop_and_resize(decode_image(jpeg.numpy().tobytes()), window.tolist(), 32,
                                     interpolation=cv2.INTER_LINEAR)  # the loader's default
            np.testing.assert_array_equal(cut, img.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="normali"):
        make_dataset(pattern, image_format="uint8", normalize="imagenet")
    with pytest.raises(ValueError, match="size"):
        make_dataset(pattern, image_format="jpeg")


def _fake_world(monkeypatch, how: str, rank: int, world: int = 2) -> dict:
    """Pretend to be ``rank`` of ``world`` DDP processes; returns the make_loader keywords it needs."""
    for name in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    if how == "env":  # what torchrun sets; webdataset reads it first
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        return {"distributed": True}
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    return {}  # found by make_dataset itself


@pytest.mark.parametrize("how", ["dist", "env"])
def test_ddp_with_fewer_shards_than_ranks_is_refused_without_resampling(tmp_path, monkeypatch, how):
    # rank 1 of 2 would get no shard, and its DDP peers would wait for it for ever
    pattern, _ = write_synthetic_shards(tmp_path, n_shards=1, per_shard=4, crop_size=32)
    extra = _fake_world(monkeypatch, how, rank=0)
    with pytest.raises(ValueError, match=r"^1 shard\(s\) for 2 ranks: .*so rank 1 would get none.*resampled=True"):
        make_dataset(pattern, **extra)
    assert len(keys_of(make_dataset(pattern, resampled=True, samples_per_epoch=4, **extra))) == 2


@pytest.mark.parametrize("how", ["dist", "env"])
def test_ddp_ranks_resampled_same_batches_split_disjoint_shards(tmp_path, monkeypatch, how):
    per_shard = 2
    pattern, samples = write_synthetic_shards(tmp_path, n_shards=5, per_shard=per_shard, crop_size=32)
    shard_of = {key: i // per_shard for i, key in enumerate(sorted(samples))}
    resampled, split = {}, {}
    for rank in (0, 1):
        with monkeypatch.context() as mp:
            extra = _fake_world(mp, how, rank)
            loader = make_loader(pattern, batch_size=2, workers=2, persistent_workers=True, resampled=True,
                                 samples_per_epoch=20, seed=1, **extra)
            assert loader.batches_per_epoch == len(loader) == 5  # 20 samples // (2 ranks x 2 per batch)
            resampled[rank] = [[b["key"] for b in loader] for _ in range(2)]
            plain = make_loader(pattern, batch_size=2, workers=2, shuffle=4, seed=1, **extra)
            with pytest.raises(TypeError, match="no fixed length: count one with batches_in_epoch"):
                len(plain)
            split[rank] = [k for b in plain for k in b["key"]]
    for rank, epochs in resampled.items():
        assert [len(e) for e in epochs] == [5, 5] and all(len(b) == 2 for e in epochs for b in e)
        assert epochs[0] != epochs[1]
    assert resampled[0] != resampled[1]  # ranks draw apart
    # without resampling each rank reads whole shards of its own: together every sample once
    assert not set(split[0]) & set(split[1])
    assert sorted(split[0] + split[1]) == sorted(samples)
    shards_of = [{shard_of[k] for k in split[rank]} for rank in (0, 1)]
    assert sorted(map(len, shards_of)) == [2, 3] and not shards_of[0] & shards_of[1]  # 5 shards: 3 + 2, whole


# --------------------------------------------------------------------------------------------
# Speed paths: tar reading, batch buffers, reduced JPEG decoding
# --------------------------------------------------------------------------------------------
def _webdataset_samples(path: str) -> list[dict]:
    from webdataset import tariterators

    from dataprep.loader.tar_reader import _wanted_member

    with open(path, "rb") as stream:
        files = tariterators.tar_file_expander([{"url": path, "stream": stream}], select_files=_wanted_member)
        return list(tariterators.group_by_keys(files))


def _our_samples(path: str) -> list[dict]:
    from dataprep.loader import open_url
    from dataprep.loader.tar_reader import _tar_samples

    with open_url(path) as stream:
        return list(_tar_samples(stream, path, wds.reraise_exception))


@pytest.mark.parametrize("fmt,mode", [("pax", "w"), ("gnu", "w"), ("ustar", "w"), ("pax", "w:gz")])
def test_tar_members_as_webdataset_groups_them(tmp_path, fmt, mode):
    import tarfile

    formats = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}
    path = str(tmp_path / f"odd-{fmt}.tar")
    deep = "d" * 60 + "/" + "e" * 60  # > 100 characters: ustar prefix, PAX path or GNU long name
    names = ["a.jpg", "a.json", "a.pts.npy", "a.depth.png", "a.JSON.extra", "__meta__", "__x__/b.jpg",
             f"{deep}/k.jpg", f"{deep}/k.json", "noext", "sub.dir/c.jpg", "sub.dir/c.json", "b.jpg"]
    if fmt == "pax":
        names.append("ü-unicode.json")
    with tarfile.open(path, mode, format=formats[fmt]) as tar:
        info = tarfile.TarInfo("folder")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        link = tarfile.TarInfo("a.link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
        for i, name in enumerate(names):
            data = (f"{name}:{i}".encode() * (i * 37 + 1))[: i * 300 + 7]
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1577836800
            tar.addfile(info, io.BytesIO(data))
    ours, theirs = _our_samples(path), _webdataset_samples(path)
    assert ours == theirs and len(ours) >= 4


def test_tar_header_checksum_follows_tarfiles_rule_on_any_bytes():
    """The reader's header check (a fast byte sum) accepts exactly the headers whose chksum field
    holds tarfile's unsigned or signed sum, whatever the bytes (high bytes included)."""
    from dataprep.loader.tar_reader import _checksum_ok

    rng = np.random.default_rng(0)
    for trial in range(300):
        block = bytearray(rng.integers(0, 256 if trial % 2 else 128, 512, dtype=np.uint8).tobytes())
        unsigned, signed = tarfile.calc_chksums(bytes(block))
        block[148:156] = b"%06o\0 " % (unsigned if trial % 3 else signed)
        assert _checksum_ok(bytes(block))
        i = int(rng.integers(0, 512))
        if 148 <= i < 156:
            continue
        block[i] = (block[i] + int(rng.integers(1, 256))) % 256  # any other byte changed: refused
        assert not _checksum_ok(bytes(block))


def test_tar_reader_rejects_broken_shards(tmp_path):
    pattern, _ = write_synthetic_shards(tmp_path / "ok", n_shards=1, per_shard=2)
    data = Path(pattern.replace("{000000..000000}", "000000")).read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(data[:1500])  # inside a member's data
    with pytest.raises(Exception, match="end of data"):
        list(make_dataset(str(cut), shuffle=0))
    bad = bytearray(data)
    bad[100] ^= 0xFF  # mode field of the first header: checksum no longer matches
    (tmp_path / "bad-000000.tar").write_bytes(bytes(bad))
    with pytest.raises(Exception, match="checksum"):
        list(make_dataset(str(tmp_path / "bad-000000.tar"), shuffle=0))
    (tmp_path / "empty-000000.tar").write_bytes(b"")
    with pytest.raises(Exception, match="empty"):
        list(make_dataset(str(tmp_path / "empty-000000.tar"), shuffle=0))
    kept = keys_of(make_dataset([str(cut), pattern], shuffle=0, handler=wds.ignore_and_continue))
    assert len(kept) == 2  # the broken shard skipped, the good one read


def test_option_mistakes_are_refused_up_front(tmp_path):
    """Mistakes that used to pass silently (or fail at the first sample, in a worker) are refused
    when the dataset is made; shuffle=True means shuffling, as in torch's DataLoader."""
    from dataprep.augment import HorizontalFlip

    pattern, _ = write_synthetic_shards(tmp_path, n_shards=1, per_shard=4)
    assert make_dataset(pattern, shuffle=True).state.shuffle == 1000  # was int(True) == 1: file order
    assert make_dataset(pattern, shuffle=False).state.shuffle == 0
    refused = [
        (dict(shuffle=-5), ValueError, "shuffle is a buffer size"),
        (dict(size=2.7), ValueError, "size must be a whole number"),
        (dict(size="64"), ValueError, "size must be a whole number"),
        (dict(samples_per_epoch=2.5, resampled=True), ValueError, "samples_per_epoch must be a whole number"),
        (dict(crop_rule="hopenet", crop_margin=0.5), ValueError, "for crop_rule='square' only"),  # was ignored
        (dict(crop_rule="square", crop_margin=-0.6), ValueError, "a margin >= 0"),  # was a 1.6 px window
        (dict(transforms=HorizontalFlip), TypeError, r"the class HorizontalFlip; pass HorizontalFlip\(\)"),
        (dict(transforms=["flip"]), TypeError, "got 'flip'"),
    ]
    for kwargs, error, message in refused:
        with pytest.raises(error, match=message):
            make_dataset(pattern, **kwargs)
    for batch_size in (None, 0, 2.0):
        with pytest.raises(ValueError, match="batch_size must be a whole number"):
            make_loader(pattern, batch_size)
    assert make_dataset(pattern, crop_rule="square", crop_margin=0.25, size=16) is not None


def test_batches_in_epoch_counts_each_workers_partial_batch(tmp_path):
    """Workers share the shards and each ends on its own partial batch: the count the loader gives
    for an epoch is what the epoch yields, for every epoch's shard order (not samples // batch)."""
    sizes = [1, 3, 1]  # 5 samples: 1 batch of 4, or none when the 3 goes to a worker alone
    for i, n in enumerate(sizes):
        write_synthetic_shards(tmp_path, n_shards=1, per_shard=n, prefix=f"s{i}", seed=i)
    urls = [str(tmp_path / f"s{i}-000000.tar") for i in range(len(sizes))]
    for workers, drop_last in ((2, True), (2, False), (0, True)):
        loader = make_loader(urls, batch_size=4, workers=workers, drop_last=drop_last, shuffle=10, seed=3,
                             size=16, image_format="uint8", persistent_workers=bool(workers))
        got, want = [], []
        for epoch in range(6):
            want.append(loader.batches_in_epoch(epoch, sizes))
            got.append(sum(1 for _ in loader))
        assert got == want, (workers, drop_last)
        if workers == 2 and drop_last:
            assert min(want) < sum(sizes) // 4  # the case samples // batch_size gets wrong
            assert len(set(want)) > 1  # and it moves with the epoch's shard order
    with pytest.raises(ValueError, match="3 shards"):
        loader.batches_in_epoch(0, [5, 3])


def test_a_broken_shard_is_named_in_one_line(tmp_path):
    """What reading a broken shard raises says which shard and what to do, in one line, also as a
    handler sees it and as it reaches the main process from a DataLoader worker."""
    from dataprep.loader import UnreadableShard, shard_error_line

    pattern, _ = write_synthetic_shards(tmp_path, n_shards=1, per_shard=2)
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(Path(pattern.replace("{000000..000000}", "000000")).read_bytes()[:1500])
    want = (f"{cut} is not a readable tar shard (truncated or not a tar file? unexpected end of data); rebuild it "
            f"or run `dataprep verify {tmp_path}`")
    with pytest.raises(tarfile.ReadError) as exc:  # still a ReadError for those who catch them
        list(make_dataset(str(cut), shuffle=0))
    assert isinstance(exc.value, UnreadableShard) and str(exc.value) == want == shard_error_line(exc.value)
    with pytest.warns(UserWarning, match=re.escape(want)):
        assert keys_of(make_dataset(str(cut), shuffle=0, handler=wds.warn_and_continue)) == []
    with pytest.raises(UnreadableShard) as exc:
        list(make_loader(str(cut), batch_size=1, workers=1, shuffle=0))
    assert "Traceback" in str(exc.value) and shard_error_line(exc.value) == want


def test_a_shard_folder_is_answered_with_its_brace_patterns(tmp_path):
    """A build folder given where shards are wanted: the error gives each split's brace pattern
    from its ``_info.json`` (dataprep.shards.write_info's format)."""
    from dataprep.loader import brace_pattern, require_local_shards

    assert brace_pattern("d", ["train-000000.tar", "train-000001.tar", "train-000002.tar"]) == \
        "d/train-{000000..000002}.tar"
    assert brace_pattern("d/", ["test-000000.tar"]) == "d/test-000000.tar"
    assert brace_pattern("d", ["a-000000.tar", "a-000002.tar"]) == "d/a-000000.tar::d/a-000002.tar"  # a gap
    assert brace_pattern("d", ["a-000009.tar", "a-000010.tar"]) == "d/a-{000009..000010}.tar"
    info = {"name": "x", "splits": {
        "test": {"name": "test", "num_samples": 4, "filenames": ["test-000000.tar"], "shard_lengths": [4]},
        "train": {"name": "train", "num_samples": 8, "filenames": ["train-000000.tar", "train-000001.tar"],
                  "shard_lengths": [4, 4]}}}
    built = tmp_path / "built"
    built.mkdir()
    (built / "_info.json").write_text(json.dumps(info))
    with pytest.raises(FileNotFoundError) as exc:
        make_dataset(str(built))
    assert str(exc.value) == (f"{built} is a shard folder, not a shard: give the shards of a split, as its "
                              f"_info.json lists them: {built}/test-000000.tar (test, 4 samples) or "
                              f"{built}/train-{{000000..000001}}.tar (train, 8 samples)")
    # the build's own JSON files given for its shards were "not a readable tar shard ...; rebuild it"
    (built / "manifest.json").write_text("{}")
    for name in ("_info.json", "manifest.json"):
        with pytest.raises(FileNotFoundError) as exc:
            make_loader(str(built / name), 2)
        assert str(exc.value) == (f"{built}/{name} is a build's {name}, not a shard: give the shards of a split, as "
                                  f"the folder's _info.json lists them: {built}/test-000000.tar (test, 4 samples) or "
                                  f"{built}/train-{{000000..000001}}.tar (train, 8 samples)")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{bare}/manifest.json is a build's manifest.json, not a "
                                                          f"shard: give the shards of its folder as a path or brace "
                                                          f"pattern, e.g. {bare}/train-{{000000..000003}}.tar")):
        require_local_shards([str(bare / "manifest.json")])
    with pytest.raises(FileNotFoundError, match=re.escape(f"{bare} is a folder, not a shard: give its shards as a "
                                                          f"path or brace pattern, e.g. {bare}/train-{{000000..000003}}.tar")):
        require_local_shards([str(bare)])
    with pytest.raises(FileNotFoundError, match=r"^1 of 2 shard\(s\) not found: .*gone.tar; check .*; .*bare is a folder"):
        require_local_shards([str(tmp_path / "gone.tar"), str(bare)])
    # a shell-style wildcard is no pattern here: said so, with what to give instead
    with pytest.raises(FileNotFoundError, match=re.escape(f"{built}/*.tar: wildcards are not expanded (webdataset's "
                                                          "URLs neither); give a brace pattern")):
        make_dataset(f"{built}/*.tar")


def test_an_empty_shard_url_is_named_with_what_to_give(tmp_path):
    """An empty URL (a blank --train, a list with an empty item, a stray '::') is refused up front
    saying where it is and what to give; it was "1 of 1 shard(s) not found: " naming nothing, and
    with a handler no error at all."""
    pattern, _ = write_synthetic_shards(tmp_path, n_shards=1, per_shard=2)
    give = re.escape("; give a shard path or URL, a brace pattern (e.g. out/train-{000000..000003}.tar), URLs "
                     "joined by '::', or a list of those")
    refused = [
        ("", r"^shard URLs '': it is an empty string" + give + "$"),
        ("  ", r"^shard URLs '  ': it is a blank string"),
        ([pattern, ""], r"^shard URLs \[.*, ''\]: item 1 is an empty string" + give),
        (pattern + "::", r"it has an empty part between '::' separators"),
    ]
    for urls, says in refused:
        for handler in (None, wds.warn_and_continue):  # a handler skips unreadable shards, not this
            with pytest.raises(FileNotFoundError, match=says):
                make_dataset(urls, handler=handler)
        with pytest.raises(FileNotFoundError, match=says):
            make_loader(urls, batch_size=2)
    # what is no path at all (an unset option, a number) is named as well, not "'NoneType' object is not
    # iterable"; any iterable of paths is fine (Path.glob's generator)
    for urls, says in [(None, r"^shard URLs None: not a path or URL" + give + "$"),
                       (3, r"^shard URLs 3: not a path or URL"),
                       ([pattern, None], r"None in the list is not a path or URL")]:
        with pytest.raises(TypeError, match=says):
            make_dataset(urls)
    shard_paths = sorted(Path(tmp_path).glob("*.tar"))
    assert len(list(make_dataset(p for p in shard_paths))) == 2


@pytest.mark.parametrize("image_format,normalize", [("float", None), ("float", "imagenet"), ("float", "raw_bgr"),
                                                    ("float", "bgr_128"), ("uint8", None)])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_dataset_samples(shards, image_format, normalize, workers):
    pattern, samples = shards
    kw = dict(shuffle=0, crop_rule="hopenet", size=40, seed=4, image_format=image_format, normalize=normalize)
    want = {s["key"]: s for s in make_dataset(pattern, **kw)}
    loader = make_loader(pattern, batch_size=5, workers=workers, **kw)
    kept = list(loader)  # all batches kept at once: each its own buffer
    loader.set_epoch(0)
    for source in (kept, loader):  # then batches dropped as they go: buffers used again
        for b in source:
            assert b["image"].dtype == (torch.uint8 if image_format == "uint8" else torch.float32)
            for key, img, rec in zip(b["key"], b["image"], b["record"]):
                assert torch.equal(img, want[key]["image"]) and rec == want[key]["record"]
    if image_format == "float":
        # the one-pass normalisation gives normalize_images' values
        from dataprep.loader import normalize_images

        u8 = make_dataset(pattern, **dict(kw, image_format="uint8", normalize=None))
        for s in u8:
            torch.testing.assert_close(want[s["key"]]["image"], normalize_images(s["image"], normalize))


def test_worker_buffers_cross_once_and_go_with_their_loader(shards):
    """A worker's batch buffer crosses to the main process with its first batch; later batches in it
    only name it. Over several epochs of persistent workers every image is still right, the main
    process holds no more buffers than the workers keep, and they go with the loader."""
    import gc

    from dataprep.loader import batches as loader_batches

    pattern, _ = shards
    kw = dict(shuffle=0, crop_rule="hopenet", size=32, seed=3, image_format="uint8", random_crop=False)
    want = {s["key"]: s["image"] for s in make_dataset(pattern, **kw)}
    loader = make_loader(pattern, batch_size=1, workers=2, persistent_workers=True, prefetch_factor=1, **kw)
    named = 0
    real_rebuild = loader_batches._rebuild_batch

    def counting_rebuild(content):
        nonlocal named
        named += "_buffer_ident" in content and "_buffer" not in content
        return real_rebuild(content)

    loader_batches._rebuild_batch, batches = counting_rebuild, 0
    try:
        for _ in range(4):
            for b in loader:
                batches += 1
                for key, img in zip(b["key"], b["image"]):
                    assert torch.equal(img, want[key])
    finally:
        loader_batches._rebuild_batch = real_rebuild
    loader_id = loader._loader_id
    held = loader_batches._RECEIVED[loader_id]
    assert named > 0 and len(held) + named == batches  # most batches named a buffer already there
    assert len(held) <= 2 * (1 + 4)  # at most each worker's pool (prefetch + 4)
    # batches kept past the pool's size get one-off buffers: the main process keeps no copy of those
    kept = list(loader)
    assert len(kept) > 2 * (1 + 4) and len(held) <= 2 * (1 + 4)
    for b in kept:
        for key, img in zip(b["key"], b["image"]):
            assert torch.equal(img, want[key])
    del kept
    del loader, b, img
    gc.collect()
    assert loader_id not in loader_batches._RECEIVED


def test_buffer_pool_names_only_pooled_buffers_and_says_which_it_dropped():
    """What the main process may keep: pooled buffers only; a buffer of a shape the pool makes room
    for replaces a stale one, and the next batch tells the main process to drop that one too."""
    from dataprep.loader import batches as loader_batches

    pool = loader_batches._BufferPool(limit=2)
    small, big = (1, 3, 4, 4), (1, 3, 8, 8)
    a, b = pool.acquire(small, np.uint8), pool.acquire(small, np.uint8)  # a is busy: b is new
    a.sent = b.sent = True  # as after their first batches
    c = pool.acquire(big, np.uint8)  # pool full of the other shape: replaces a
    assert c.pooled and c.forget == [a.ident] and a not in pool.buffers
    d = pool.acquire(big, np.uint8)  # replaces b (b.sent too)
    assert d.pooled and d.forget == [b.ident]
    e = pool.acquire(big, np.uint8)  # both busy, none stale: a one-off, never named
    assert not e.pooled and e not in pool.buffers
    loader_batches._RECEIVED[-1] = {a.ident: a.tensor, b.ident: b.tensor}
    try:
        loader_batches._rebuild_batch({"_forget": [(-1,) + a.ident]})
        assert list(loader_batches._RECEIVED[-1]) == [b.ident]
    finally:
        loader_batches._RECEIVED.pop(-1, None)


def test_lent_batch_memory_stays_until_the_last_reference_goes(shards):
    pattern, _ = shards
    loader = make_loader(pattern, batch_size=4, shuffle=0)
    it = iter(loader)
    first = next(it)
    view = first["image"][1]  # a view keeps the whole buffer lent
    arr = first["image"][2].numpy()
    saved_view, saved_arr = view.clone(), arr.copy()
    ptr = first["image"].data_ptr()
    del first
    later = [next(it)["image"].data_ptr() for _ in range(2)]
    assert ptr not in later and torch.equal(view, saved_view) and (arr == saved_arr).all()
    del view, arr
    ptrs = {b["image"].data_ptr() for b in loader}
    assert len(ptrs) <= 3  # dropped batches' buffers come back


def test_unfinished_and_pinned_batches_hand_their_buffer_back(shards, monkeypatch):
    import pickle

    from dataprep.loader import batches as loader_batches

    pattern, _ = shards
    ds = make_dataset(pattern, shuffle=0, crop_rule="box", size=16)
    ds.state.assemble, ds.state.granule = True, 3
    items = iter(ds)
    batch = loader_batches._collate_items([next(items) for _ in range(3)])
    flat = batch["_buffer"]
    assert int(flat[batch["_flag_at"]]) == 1
    received = pickle.loads(pickle.dumps(batch))  # as the main process gets it (the same memory here)
    received["_buffer"] = flat
    del received  # dropped unfinished (an epoch left early)
    assert int(flat[batch["_flag_at"]]) == 0
    flat[batch["_flag_at"]] = 1
    monkeypatch.setattr(loader_batches, "_pinned", lambda x: x.clone())  # no CUDA here: a plain copy
    pinned = batch.pin_memory()
    assert int(flat[batch["_flag_at"]]) == 0  # copied out, handed back at once
    assert pinned["image"].shape == (3, 3, 16, 16) and pinned["angles"].shape == (3, 3)


def test_reduced_jpeg_decoding_cuts_the_same_window(tmp_path):
    pattern, samples = write_synthetic_shards(tmp_path, n_shards=1, per_shard=6, crop_size=128)
    kw = dict(shuffle=0, crop_rule="box", size=24, image_format="uint8", random_crop=False)
    reduced = list(make_dataset(pattern, **kw))
    full = list(make_dataset(pattern, exact_cut=True, **kw))
    area = list(make_dataset(pattern, interpolation=None, **kw))
    assert any(crop_ops.recrop_window(s["record"], "box", (128, 128))[2] - crop_ops.recrop_window(s["record"], "box", (128, 128))[0] >= 48
               for s in samples.values())  # windows at least twice the output: decoded at 1/2 or less
    for r, f, a in zip(reduced, full, area):
        assert r["record"] == f["record"] == a["record"]
        torch.testing.assert_close(r["landmarks"], f["landmarks"])
        diff = (r["image"].float() - a["image"].float()).abs().mean()
        assert float(diff) < 6.0, float(diff)  # the same window, a different (box-filtered) downscale


def test_a_damaged_shard_keeps_the_samples_read_whole_before_the_damage(tmp_path):
    pattern, _ = write_synthetic_shards(tmp_path, n_shards=1, per_shard=3)
    path = Path(pattern.replace("{000000..000000}", "000000"))
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = sorted({m.name.split(".", 1)[0] for m in members})
    third = next(m for m in members if m.name.startswith(keys[2] + "."))
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(path.read_bytes()[:third.offset_data + 10])  # inside the third sample's first member
    assert keys_of(make_dataset(str(cut), shuffle=0, handler=wds.ignore_and_continue)) == keys[:2]
    assert [s["__key__"] for s in wds.WebDataset(str(cut), shardshuffle=False, handler=wds.ignore_and_continue)] == keys[:2]


def test_a_resampled_stream_over_unreadable_shards_stops(tmp_path):
    """With a handler that passes over bad shards, a resampled stream whose shards all fail to open
    or to read would draw them forever: it stops, saying so."""
    from dataprep.loader import NoSamples

    (tmp_path / "garbage-000000.tar").write_bytes(b"not a tar file at all" * 50)
    for url in (str(tmp_path / "missing-000000.tar"), str(tmp_path / "garbage-000000.tar")):
        ds = make_dataset(url, resampled=True, samples_per_epoch=8, handler=wds.ignore_and_continue)
        with pytest.raises(NoSamples, match=r"shards in a row gave no sample .*unreadable"):
            keys_of(ds)


def test_a_bad_sample_is_named_in_one_line_with_what_to_do(tmp_path):
    from dataprep.loader import BadSample

    pattern, samples = write_synthetic_shards(tmp_path, n_shards=1, per_shard=2)
    path = Path(pattern.replace("{000000..000000}", "000000"))
    first = sorted(samples)[0]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != f"{first}.json"]
    broken = tmp_path / "broken-000000.tar"
    with tarfile.open(broken, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(BadSample) as exc:
        list(make_dataset(str(broken), shuffle=0))
    assert str(exc.value) == (f"sample {first!r} in {broken}: ValueError: sample {first!r} has no json member; check "
                              "the shards with `dataprep verify` on their folder, or pass "
                              "handler=webdataset.warn_and_continue to skip such samples")
    assert isinstance(exc.value, ValueError) and isinstance(exc.value.__cause__, ValueError)
    with pytest.warns(UserWarning, match=re.escape(f"sample {first!r} in {broken}")):
        assert keys_of(make_dataset(str(broken), shuffle=0, handler=wds.warn_and_continue)) == sorted(samples)[1:]


def _shard_of(tmp_path, name: str, samples: list[dict]) -> str:
    """One shard of ``samples`` (members dicts) named ``name``; its path."""
    path = tmp_path / name
    with wds.TarWriter(str(path)) as sink:
        for members in samples:
            sink.write(members)
    return str(path)


@pytest.mark.parametrize("field, value, says", [
    ("yaw", None, "record yaw is None, not a finite number of degrees"),
    ("pitch", float("nan"), "record pitch is nan, not a finite number of degrees"),
    ("roll", "12.5", "record roll is '12.5', not a finite number of degrees"),
    ("crop", [0, 0, 64], "record crop is [0, 0, 64], not a window [x1, y1, x2, y2]"),
    ("crop", None, "record crop is None, not a window"),
    ("crop_size", [100.5, 100], "record crop_size is [100.5, 100], not [width, height] in pixels"),
    # the record's key was taken over the member's: two samples could share a key in one batch
    ("key", "300w_lp_SYN_00000", "the record's key '300w_lp_SYN_00000' is not its member name's '300w_lp_SYN_00001'"),
])
@pytest.mark.parametrize("image_format", ["float", "jpeg"])
def test_a_record_the_loader_cannot_use_is_a_bad_sample_naming_the_field(tmp_path, field, value, says, image_format):
    """NaN or null angles went into the batch (training on NaN without an error); a short or
    missing crop failed while the batch was made, naming no sample, past any handler."""
    from dataprep.loader import BadSample

    rng = np.random.default_rng(0)
    good, bad = synthetic_sample(0, CROP, rng), synthetic_sample(1, CROP, rng)
    record = dict(bad["record"], **{field: value})
    url = _shard_of(tmp_path, "bad-000000.tar", [sample_members(good), sample_members(bad, {"json": json.dumps(record).encode()})])
    size = dict(crop_rule="hopenet", size=32) if image_format == "jpeg" else {}
    with pytest.raises(BadSample, match=re.escape(f"sample {bad['key']!r} in {url}: ValueError: {says}")):
        list(make_loader(url, 2, workers=0, shuffle=0, image_format=image_format, **size))
    kept = make_loader(url, 1, workers=0, shuffle=0, image_format=image_format, handler=wds.ignore_and_continue, **size)
    assert keys_of(kept) == [good["key"]]


@pytest.mark.parametrize("landmarks", [np.zeros(3, np.float32), np.zeros((4, 17), np.float32), np.array(["a", "b"])])
def test_landmarks_that_are_not_points_are_a_bad_sample(tmp_path, landmarks):
    from dataprep.loader import BadSample

    s = synthetic_sample(0, CROP, np.random.default_rng(0))
    url = _shard_of(tmp_path, "bad-000000.tar", [sample_members(s, {"pts.npy": _npy_bytes(landmarks)})])
    with pytest.raises(BadSample, match=r"landmarks \(pts\.npy\) are .* not points as rows of \(x, y\)"):
        list(make_loader(url, 1, workers=0, shuffle=0))


def test_a_resampled_stream_of_nothing_but_bad_samples_stops(tmp_path):
    """With a handler that skips bad samples, a resampled stream whose every sample is bad drew
    samples forever (the shard guard counts shards that give no raw sample; these give samples)."""
    from dataprep.loader import NoSamples

    rng = np.random.default_rng(0)
    bad = [synthetic_sample(i, CROP, rng) for i in range(3)]
    url = _shard_of(tmp_path, "bad-000000.tar", [sample_members(s, {"json": b"{not json"}) for s in bad])
    loader = make_loader(url, 2, workers=0, resampled=True, samples_per_epoch=8, handler=wds.ignore_and_continue)
    with pytest.raises(NoSamples, match=r"1000 samples in a row were skipped as unusable .*dataprep verify"):
        keys_of(loader)


def test_the_jpeg_format_cuts_by_the_pictures_own_size(tmp_path):
    """``image_format="jpeg"`` took the window from the record's crop_size, so a record that says
    another size gave a silently wrong window; a stored image that is not a JPEG is a bad sample
    here, not a nameless decode error on the device later."""
    from dataprep.loader import BadSample

    rng = np.random.default_rng(0)
    s = synthetic_sample(0, CROP, rng)
    url = _shard_of(tmp_path, "a-000000.tar", [sample_members(s)])
    want = next(iter(make_loader(url, 1, workers=0, shuffle=0, image_format="jpeg", crop_rule="hopenet", size=32)))
    wrong = dict(s["record"], crop_size=[100, 100])
    url = _shard_of(tmp_path, "b-000000.tar", [sample_members(s, {"json": json.dumps(wrong).encode()})])
    got = next(iter(make_loader(url, 1, workers=0, shuffle=0, image_format="jpeg", crop_rule="hopenet", size=32)))
    assert got["window"].tolist() == want["window"].tolist()
    png = cv2.imencode(".png", s["crop"])[1].tobytes()
    url = _shard_of(tmp_path, "c-000000.tar", [sample_members(s, {"jpg": png})])
    with pytest.raises(BadSample, match="the stored image is not a JPEG whose header reads"):
        list(make_loader(url, 1, workers=0, shuffle=0, image_format="jpeg", size=32))


def test_damage_inside_a_samples_own_member_drops_that_sample(tmp_path):
    """A shard cut inside the second member of a sample: that sample (its record cut off) is not
    passed on as a sample without a record; the shard's damage is what is said."""
    from dataprep.loader import UnreadableShard

    pattern, samples = write_synthetic_shards(tmp_path, n_shards=1, per_shard=3)
    path = Path(pattern.replace("{000000..000000}", "000000"))
    keys = sorted(samples)
    with tarfile.open(path) as tar:
        record = next(m for m in tar.getmembers() if m.name == f"{keys[1]}.json")
    for cut_at in (record.offset + 200, record.offset_data + 10):  # in its header, in its data
        cut = tmp_path / f"cut{cut_at}-000000.tar"
        cut.write_bytes(path.read_bytes()[:cut_at])
        with pytest.raises(UnreadableShard, match=r"is not a readable tar shard"):
            list(make_dataset(str(cut), shuffle=0))
        assert keys_of(make_dataset(str(cut), shuffle=0, handler=wds.ignore_and_continue)) == keys[:1]


def test_a_batch_of_two_crop_sizes_names_a_sample_of_each(tmp_path):
    rng = np.random.default_rng(0)
    small, big = synthetic_sample(0, CROP, rng), synthetic_sample(1, 2 * CROP, rng)
    url = _shard_of(tmp_path, "mixed-000000.tar", [sample_members(small), sample_members(big)])
    with pytest.raises(ValueError, match=re.escape(f"images of different sizes in one batch: (3, 64, 64) (e.g. {small['key']}), "
                                                   f"(3, 128, 128) (e.g. {big['key']}): shards of builds with different --crop-size")):
        list(make_loader(url, 2, workers=0, shuffle=0))


def _write_info(folder, shards: dict[str, int]) -> None:
    """The build's ``_info.json`` for shards of split train: name -> samples."""
    import fsspec

    from dataprep.shards import write_info

    write_info(fsspec.filesystem("file"), str(folder), "synthetic",
               [{"split": "train", "name": name, "samples": n} for name, n in shards.items()])


def test_a_shard_cut_at_a_member_boundary_is_short_of_its_recorded_samples(tmp_path):
    """A tar cut where a member ends (or missing its last samples) reads as a valid shorter tar:
    where the folder's _info.json records the shard's samples, ending with fewer is an
    UnreadableShard naming the shard, both counts and dataprep verify, as a cut inside a member is;
    a shard whose stream stops early (samples_per_epoch, resampled draws, workers) is no alarm."""
    from dataprep.loader import UnreadableShard, shard_error_line

    pattern, samples = write_synthetic_shards(tmp_path, n_shards=2, per_shard=3)
    _write_info(tmp_path, {"train-000000.tar": 3, "train-000001.tar": 3})
    for kwargs in (dict(), dict(samples_per_epoch=2), dict(resampled=True, samples_per_epoch=20, shuffle=4)):
        assert len(keys_of(make_dataset(pattern, **kwargs))) == kwargs.get("samples_per_epoch", 6)  # intact: no alarm
    assert sorted(keys_of(make_loader(pattern, 2, workers=2, shuffle=0))) == sorted(samples)
    path = tmp_path / "train-000001.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last = sorted(samples)[-1]
    first_of_last = min(m.offset for m in members if m.name.startswith(last + "."))
    path.write_bytes(path.read_bytes()[:first_of_last])  # `head -c`: its last sample's members gone
    assert len(list(wds.WebDataset(str(path), shardshuffle=False))) == 2  # a tar, for tar and webdataset
    want = (f"{path} is not a readable tar shard (truncated or not a tar file? it holds 2 samples, the folder's "
            f"_info.json says 3); rebuild it or run `dataprep verify {tmp_path}`")
    with pytest.raises(UnreadableShard) as exc:
        list(make_dataset(pattern, shuffle=0))
    assert str(exc.value) == want
    with pytest.warns(UserWarning, match=re.escape(want)):
        assert keys_of(make_dataset(pattern, shuffle=0, handler=wds.warn_and_continue)) == sorted(samples)[:-1]
    with pytest.raises(UnreadableShard) as exc:  # from the worker that read it
        list(make_loader(pattern, 2, workers=2, shuffle=0))
    assert shard_error_line(exc.value) == want
    with pytest.raises(UnreadableShard, match=re.escape(want)):
        keys_of(make_dataset(pattern, resampled=True, samples_per_epoch=20))


def test_what_a_handler_skips_is_counted_per_epoch_across_workers(tmp_path):
    """With a handler that skips (warn_and_continue, ignore_and_continue) the loader says what an
    epoch lost, all workers together: samples skipped as unusable, shards passed over and the
    samples those lacked against _info.json; counted afresh each epoch, also by persistent workers."""
    rng = np.random.default_rng(0)
    made = [synthetic_sample(i, 32, rng) for i in range(9)]
    keys = [s["key"] for s in made]
    urls = [_shard_of(tmp_path, f"train-{i:06d}.tar", [sample_members(s) for s in made[3 * i:3 * i + 3]])
            for i in range(3)]
    _write_info(tmp_path, {f"train-{i:06d}.tar": 3 for i in range(4)})  # train-000003.tar is not there
    _shard_of(tmp_path, "train-000001.tar", [sample_members(made[3], {"jpg": b"not a jpeg"})]
              + [sample_members(s) for s in made[4:6]])
    cut = Path(urls[2])
    with tarfile.open(cut) as tar:
        last = min(m.offset for m in tar.getmembers() if m.name.startswith(keys[8] + "."))
    cut.write_bytes(cut.read_bytes()[:last])  # short of its last sample
    urls.append(str(tmp_path / "train-000003.tar"))
    lost = {"samples": 1, "shards": 2, "missing": 1 + 3}
    ds = make_dataset(urls, shuffle=0, handler=wds.ignore_and_continue)
    assert ds.skipped == {"samples": 0, "shards": 0, "missing": 0}
    assert keys_of(ds) == keys[:3] + keys[4:8] and ds.skipped == lost
    for workers, persistent in ((0, False), (2, True), (2, False)):
        loader = make_loader(urls, 2, workers=workers, persistent_workers=persistent, handler=wds.ignore_and_continue)
        for _ in range(2):  # each epoch's own counts, not added up
            assert sorted(keys_of(loader)) == keys[:3] + keys[4:8] and loader.skipped == lost, (workers, persistent)
    loader = make_loader(urls[:1], 2, workers=2, handler=wds.ignore_and_continue)
    assert sorted(keys_of(loader)) == keys[:3] and loader.skipped == {"samples": 0, "shards": 0, "missing": 0}


@pytest.mark.parametrize("image_format", ["float", "uint8"])
def test_a_stored_jpeg_with_damaged_picture_data_is_a_bad_sample(tmp_path, image_format):
    """A shard whose JPEG member is damaged inside its picture data (a bad copy): OpenCV decoded it
    anyway, its lower part gray, printing libjpeg's warning with no name, and the model trained on
    it; now it is a BadSample naming the sample and libjpeg's words, as the build's readers do."""
    from dataprep.loader import BadSample

    rng = np.random.default_rng(0)
    good, bad = synthetic_sample(0, CROP, rng), synthetic_sample(1, CROP, rng)
    members = sample_members(bad)
    data = members["jpg"]
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    stray = data[:middle] + b"\xff\x3c" + data[middle + 2:]  # a stray marker where picture data was
    assert cv2.imdecode(np.frombuffer(stray, np.uint8), cv2.IMREAD_COLOR) is not None  # what was read
    url = _shard_of(tmp_path, "damaged-000000.tar", [sample_members(good), dict(members, jpg=stray)])
    with pytest.raises(BadSample, match=re.escape(f"sample {bad['key']!r} in {url}: ValueError: damaged JPEG data "
                                                  "(libjpeg: Unsupported marker type")):
        list(make_loader(url, 2, workers=0, shuffle=0, image_format=image_format))
    kept = make_loader(url, 1, workers=0, shuffle=0, image_format=image_format, handler=wds.ignore_and_continue)
    assert keys_of(kept) == [good["key"]] and kept.skipped["samples"] == 1


def test_an_epoch_over_shards_without_a_sample_says_so(tmp_path):
    """Shards holding no sample (a build writes an empty shard where every sample was rejected: an
    empty split) gave an epoch of no batch without a word, so a training or evaluation loop over
    them did nothing; now NoSamples names them, from every worker count and epoch. With drop_last,
    where fewer samples than a batch give no batch too, only where _info.json records none."""
    import fsspec

    from dataprep.loader import NoSamples, shard_error_line
    from dataprep.shards import write_shard

    empty = tmp_path / "empty" / "train-000000.tar"
    empty.parent.mkdir()
    write_shard(fsspec.filesystem("file"), str(empty), [])
    says = (f"epoch {{}} gave no sample from {empty} (empty shards: every sample rejected when they were built? "
            "see the build's manifest.json)")
    for workers, persistent in ((0, False), (2, False), (2, True)):
        loader = make_loader(str(empty), 2, workers=workers, persistent_workers=persistent)
        for epoch in range(2):
            with pytest.raises(NoSamples) as exc:
                keys_of(loader)
            assert shard_error_line(exc.value) == says.format(epoch), (workers, persistent)
    assert keys_of(make_loader(str(empty), 2, drop_last=True)) == []  # too few for a batch? it cannot tell
    _write_info(empty.parent, {"train-000000.tar": 0})
    with pytest.raises(NoSamples, match=re.escape(says.format(0))):
        keys_of(make_loader(str(empty), 2, drop_last=True))
    # beside shards with samples, an empty one is no alarm; nor are samples too few for a full batch
    pattern, samples = write_synthetic_shards(tmp_path / "full", n_shards=1, per_shard=3)
    assert sorted(keys_of(make_loader([str(empty), pattern], 2))) == sorted(samples)
    _write_info(tmp_path / "full", {"train-000000.tar": 3})
    assert keys_of(make_loader(pattern, 4, drop_last=True)) == []


class _Raises:
    def __call__(self, image, record, landmarks, rng):
        raise KeyError("box")


class _Gray:
    def __call__(self, image, record, landmarks, rng):
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), record, landmarks


class _Shrinks:
    def __call__(self, image, record, landmarks, rng):
        side = CROP - 1 - int(record["key"][-1])  # 63, 62: another size per sample
        return np.ascontiguousarray(image[:side, :side]), record, landmarks


def test_a_failing_transform_is_named_as_the_transforms_not_the_shards(tmp_path):
    """An error in the caller's transforms was reported as the shard's ("check the shards with
    `dataprep verify`"), and an image of the wrong kind they returned failed while the batch was
    made, naming no sample; both now name the sample and put the fault in the transforms."""
    from dataprep.loader import BadSample

    pattern, samples = write_synthetic_shards(tmp_path, n_shards=1, per_shard=2)
    url = pattern.replace("{000000..000000}", "000000")
    first = sorted(samples)[0]
    for transform, says in ((_Raises(), "KeyError: 'box'"),
                            (_Gray(), f"ValueError: they returned an image of uint8 ({CROP}, {CROP}), not H x W x 3 uint8")):
        with pytest.raises(BadSample) as exc:
            list(make_loader(url, 2, workers=0, shuffle=0, transforms=transform))
        assert str(exc.value) == (f"sample {first!r} in {url}: the transforms failed: {says}; the error is in the "
                                  "transforms given to the loader, not in the shard")
    # images of another size each: the batch's error names the transforms too (size= was given)
    with pytest.raises(ValueError, match=r"images of different sizes in one batch: .*or transforms that change an "
                                         r"image's size"):
        list(make_loader(url, 2, workers=0, shuffle=0, size=CROP, transforms=_Shrinks()))
