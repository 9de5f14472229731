"""The box stage with detectors inside real builds: protocol defaults, BIWI tracking, the cache,
RetinaFace weights through the user's path."""
from __future__ import annotations

import json

import pytest
import torch

from dataprep import box_stage
from dataprep.boxes import iou
from dataprep.build import BuildOptions, build
from dataprep.detectors import Detection
from build_runs import assert_same_shards, build_killed_at_shard
from shard_reading import label_records


def _opts(root, out, dataset, cache, **kw):
    kw.setdefault("progress", False)
    return BuildOptions(dataset=dataset, root=str(root), out=str(out), cache_dir=str(cache), device="cpu", **kw)


class CountingDetector:
    """Wraps a real detector and counts the images it is asked to detect."""

    def __init__(self, inner):
        self.inner, self.images = inner, 0
        self.name, self.fingerprint = inner.name, inner.fingerprint

    def detect(self, images):
        self.images += len(images)
        return self.inner.detect(images)


@pytest.fixture
def counting(monkeypatch):
    made = []
    real = box_stage.create_detector

    def create(*a, **kw):
        made.append(CountingDetector(real(*a, **kw)))
        return made[-1]

    monkeypatch.setattr(box_stage, "create_detector", create)
    return made


def test_biwi_protocol2_defaults_to_mtcnn_with_tracking_and_caches(sample_tree, tmp_path, counting):
    cache = tmp_path / "cache"
    manifest = build(_opts(sample_tree / "hpdb", tmp_path / "a", "biwi", cache, protocol="2"))
    assert manifest["settings"]["detector"] == "mtcnn"
    assert manifest["settings"]["biwi_tracking"] == "previous"
    recs = label_records(tmp_path / "a")
    assert len(recs) == manifest["counts"]["written"] > 0
    for rec in recs.values():
        assert rec["box_source"] == "mtcnn"
        assert rec["box_scores"]["mtcnn"] > 0.95
        assert rec["tracking"]["mode"] == "previous"
        # the real detector finds the real face pixels where the labels put the head
        assert iou(rec["boxes"]["mtcnn"], rec["boxes"]["gt"]) > 0.3
    c = manifest["counts"]
    assert c["read"] == c["written"] + c["rejected"] == 72
    assert counting[0].images == 72

    # A rebuild (another output, same images and detector) answers from the cache. With another
    # --batch-size too: the detector's floats depend on the batch (~1e-4 px), the cached answers do not.
    build(_opts(sample_tree / "hpdb", tmp_path / "b", "biwi", cache, protocol="2", batch_size=5))
    assert counting[1].images == 0
    assert_same_shards(tmp_path / "a", tmp_path / "b")


class ScriptedDetector:
    """Returns scripted detections per BIWI frame (by image content order within a sequence)."""

    name = "mtcnn"
    fingerprint = "scripted"

    def __init__(self, script):
        self.script = script  # list of detection lists, consumed in order

    def detect(self, images):
        return [self.script.pop(0) for _ in images]


def test_biwi_tracking_rejections_and_reuse_land_in_manifest(sample_tree, tmp_path, monkeypatch):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "test": ["01"]}))
    a = Detection((400, 300, 480, 400), 0.99)
    far = Detection((100, 100, 180, 200), 0.99)  # centre 300 px away: a jump
    weak = Detection((400, 300, 480, 400), 0.5)

    def run(mode, script):
        monkeypatch.setattr(box_stage, "create_detector", lambda *a, **k: ScriptedDetector(list(script)))
        out = tmp_path / f"o-{mode}"
        m = build(_opts(sample_tree / "hpdb", out, "biwi", tmp_path / f"c-{mode}", protocol="1",
                        split_file=str(split), biwi_tracking=mode))
        return m, label_records(out)

    # frames of sequence 01 in order: a face, a jump, a weak face
    m, recs = run("none", [[a], [far], [weak]])
    assert m["counts"]["written"] == 1
    assert sorted(r["reason"] for r in m["rejected"]) == ["box_jump", "no_face"]
    m, recs = run("previous", [[a], [far], [weak]])
    assert m["counts"]["written"] == 3 and not m["rejected"]
    reused = sorted(r["tracking"]["reused"] for r in recs.values())
    assert reused == [False, True, True]
    assert all(r["box"] == [400, 300, 480, 400] for r in recs.values())


def test_biwi_unreadable_frame_is_rejected_as_unreadable_not_as_no_face(sample_tree, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "hpdb"
    shutil.copytree(sample_tree / "hpdb", root)
    frames = sorted((root / "01").glob("*_rgb.png"))
    frames[1].write_bytes(frames[1].read_bytes()[:200])  # a truncated download (its header whole)
    frames[2].write_bytes(b"")  # an empty file
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "test": ["01"]}))
    a = Detection((400, 300, 480, 400), 0.99)
    monkeypatch.setattr(box_stage, "create_detector", lambda *a_, **k: ScriptedDetector([[a], [a]]))
    m = build(_opts(root, tmp_path / "o", "biwi", tmp_path / "c", protocol="1", split_file=str(split),
                    biwi_tracking="none"))
    assert m["counts"]["written"] == len(frames) - 2
    truncated, empty = sorted(m["rejected"], key=lambda r: r["key"])
    assert truncated["reason"] == "corrupt_image" and frames[1].name in truncated["message"]
    assert "truncated" in truncated["message"]
    assert empty["reason"] == "unreadable_image" and frames[2].name in empty["message"]


def test_a_biwi_frame_the_tracking_rejects_is_rejected_for_its_damaged_files_first(sample_tree, tmp_path, monkeypatch):
    """A frame without a face (or whose box jumped) was rejected as ``no_face`` / ``box_jump``
    without being read: its missing pose file or truncated depth map went unnamed, as they are not
    for the frames the tracking accepts (and for AFLW2000 and 300W-LP, read before the box)."""
    import shutil

    root = tmp_path / "hpdb"
    shutil.copytree(sample_tree / "hpdb", root)
    frames = sorted((root / "01").glob("*_rgb.png"))
    depth = root / "01" / frames[1].name.replace("_rgb.png", "_depth.bin")
    depth.write_bytes(depth.read_bytes()[:1000])
    pose = root / "01" / frames[2].name.replace("_rgb.png", "_pose.txt")
    pose.unlink()
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "test": ["01"]}))
    a = Detection((400, 300, 480, 400), 0.99)
    far = Detection((100, 100, 180, 200), 0.99)
    monkeypatch.setattr(box_stage, "create_detector", lambda *a_, **k: ScriptedDetector([[a], [far], []]))
    m = build(_opts(root, tmp_path / "o", "biwi", tmp_path / "c", protocol="1", split_file=str(split),
                    biwi_tracking="none"))
    got = sorted((r["reason"], r["message"].split(":")[0]) for r in m["rejected"])
    assert got == [("corrupt_depth", f"hpdb/01/{depth.name}"), ("missing_pose", f"hpdb/01/{pose.name}")]


def test_biwi_frame_of_another_size_is_no_frame_to_the_tracking(sample_tree, tmp_path, monkeypatch):
    """A resized first frame (rejected as wrong_image_size) was accepted by the tracking, and its
    box, in the small picture's pixels, was reused for every later frame of its sequence: crops
    of the wrong place, marked reused, with nothing said. It is left out of the tracking now."""
    import shutil

    import cv2

    root = tmp_path / "hpdb"
    shutil.copytree(sample_tree / "hpdb", root)
    frames = sorted((root / "01").glob("*_rgb.png"))
    small = cv2.resize(cv2.imread(str(frames[0])), (320, 240))
    frames[0].write_bytes(cv2.imencode(".png", small)[1].tobytes())
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "test": ["01"]}))
    detector = CentreFaceDetector()  # a face in the middle of each picture: 160 px apart in the two sizes
    monkeypatch.setattr(box_stage, "create_detector", lambda *a, **k: detector)
    m = build(_opts(root, tmp_path / "o", "biwi", tmp_path / "c", protocol="1", split_file=str(split),
                    biwi_tracking="previous"))
    assert [(r["reason"], r["source"]) for r in m["rejected"]] == [("wrong_image_size", "01/" + frames[0].name)]
    recs = label_records(tmp_path / "o")
    assert len(recs) == len(frames) - 1
    for rec in recs.values():
        assert rec["box"] == [160.0, 96.0, 480.0, 384.0]  # the frame's own face, in its own pixels
        assert rec["tracking"] == {"mode": "previous", "reused": False}
    assert sum(detector.calls) == len(frames) - 1  # the resized frame is not detected


def test_the_box_stage_does_not_decode_a_picture_bigger_than_any_dataset_frame(monkeypatch):
    """A PNG whose header says 20000 x 20000 (a few hundred KB on disk) is not decoded for
    detection: that took GBs per image in each process; the shard worker rejects it by its size."""
    import struct
    import zlib

    import cv2
    import numpy as np

    from dataprep import codec

    png = bytearray(cv2.imencode(".png", np.zeros((480, 640, 3), np.uint8))[1].tobytes())
    assert codec.decode_rgb_capped(bytes(png)).shape == (480, 640, 3)
    png[16:24] = struct.pack(">II", 20000, 20000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))

    def no_decoding(data):
        raise AssertionError("decoded")

    monkeypatch.setattr(codec, "decode_rgb_checked", no_decoding)
    assert codec.decode_rgb_capped(bytes(png)) is None


def test_resumed_tracking_build_follows_a_fixed_frame_through_its_sequence(sample_tree, tmp_path):
    import shutil

    import cv2
    import numpy as np

    root = tmp_path / "hpdb"
    shutil.copytree(sample_tree / "hpdb", root)
    frames = sorted((root / "01").glob("*_rgb.png"))
    first = frames[0].read_bytes()
    black = cv2.imencode(".png", np.zeros((480, 640, 3), np.uint8))[1].tobytes()
    for frame in frames[:2]:
        frame.write_bytes(black)  # no face: with no earlier box, nothing to reuse
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "test": ["01"]}))
    kw = dict(protocol="1", split_file=str(split), biwi_tracking="previous", shard_size=1)
    out = tmp_path / "o"
    m = build(_opts(root, out, "biwi", tmp_path / "c", **kw))
    assert sorted(r["reason"] for r in m["rejected"]) == ["no_face", "no_face"]
    frames[0].write_bytes(first)  # the user fixes the first frame: the second now reuses its box
    again = build(_opts(root, out, "biwi", tmp_path / "c", **kw))
    fresh = build(_opts(root, tmp_path / "fresh", "biwi", tmp_path / "c", **kw))
    assert again["counts"] == fresh["counts"] and fresh["counts"]["written"] == len(frames)
    assert_same_shards(tmp_path / "fresh", out)


def test_aflw2000_mtcnn_picks_the_face_on_the_ground_truth(sample_tree, tmp_path):
    split = tmp_path / "split.json"
    names = sorted(p.name for p in (sample_tree / "AFLW2000").glob("*.jpg"))[:4]
    split.write_text(json.dumps({"by": "source", "test": names}))
    m = build(_opts(sample_tree / "AFLW2000", tmp_path / "o", "aflw2000", tmp_path / "c", protocol="none",
                    detector="mtcnn", split_file=str(split)))
    recs = label_records(tmp_path / "o")
    assert m["counts"]["read"] == 4
    for rec in recs.values():
        assert set(rec["boxes"]) >= {"gt", "pt2d", "mtcnn"}
        assert iou(rec["boxes"]["mtcnn"], rec["boxes"]["gt"]) > 0
        assert 0 < rec["box_scores"]["mtcnn"] <= 1


def test_retinaface_build_takes_user_weights_file(sample_tree, tmp_path):
    from dataprep.detectors.retinaface import RetinaFaceNet

    torch.manual_seed(0)
    weights = tmp_path / "retinaface_resnet50_2020-07-20.pth"
    torch.save(RetinaFaceNet().state_dict(), weights)
    split = tmp_path / "split.json"
    names = sorted(p.name for p in (sample_tree / "AFLW2000").glob("*.jpg"))[:2]
    split.write_text(json.dumps({"by": "source", "test": names}))
    m = build(_opts(sample_tree / "AFLW2000", tmp_path / "o", "aflw2000", tmp_path / "c", protocol="none",
                    detector="retinaface", retinaface_weights=str(weights), split_file=str(split)))
    # random weights find no face on the ground truth: each sample is rejected with a reason, none lost
    c = m["counts"]
    assert c["read"] == 2 == c["written"] + c["rejected"]
    assert all(r["reason"] == "no_face" for r in m["rejected"])
    assert m["settings"]["detector_fingerprint"]


def test_missing_retinaface_weights_says_which_option(sample_tree, tmp_path, monkeypatch, capsys):
    from dataprep.cli import main

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    rc = main(["build", "--dataset", "aflw2000", "--root", str(sample_tree / "AFLW2000"), "--out", str(tmp_path / "o"),
               "--detector", "retinaface", "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--retinaface-weights" in err


class CentreFaceDetector:
    """One confident face over the middle of each image, so every 300W-LP sample keeps a box;
    records the size of each ``detect`` call."""

    name = "mtcnn"
    fingerprint = "c" * 64

    def __init__(self):
        self.calls: list[int] = []

    def detect(self, images):
        self.calls.append(len(images))
        return [[Detection((0.25 * im.shape[1], 0.2 * im.shape[0], 0.75 * im.shape[1], 0.8 * im.shape[0]), 0.99)]
                for im in images]


def test_a_picture_the_reader_rejects_for_its_size_is_not_detected(sample_tree, tmp_path, monkeypatch):
    """An upscaled AFLW2000 picture went through the detector before the reader rejected it as
    wrong_image_size: a 6000 px one cost MTCNN 1.6 GB and 11 s, a batch of them more memory than a
    machine has."""
    import shutil

    import cv2

    root = tmp_path / "AFLW2000"
    shutil.copytree(sample_tree / "AFLW2000", root)
    big = sorted(root.glob("*.jpg"))[0]
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(big)), (900, 900)))
    detector = CentreFaceDetector()
    monkeypatch.setattr(box_stage, "create_detector", lambda *a, **k: detector)
    m = build(_opts(root, tmp_path / "o", "aflw2000", tmp_path / "c", protocol="none", detector="mtcnn"))
    assert ("wrong_image_size", big.name) in [(r["reason"], r["source"]) for r in m["rejected"]]
    assert sum(detector.calls) == m["counts"]["read"] - 1  # every picture but that one


def test_detector_build_decides_shard_by_shard_and_resumes_without_detecting_finished_shards(
        sample_tree, tmp_path, monkeypatch):
    from dataprep.pipeline import PROGRESS_DIR

    root = sample_tree / "300W_LP"
    made: list[CentreFaceDetector] = []
    monkeypatch.setattr(box_stage, "create_detector", lambda *a, **k: made.append(CentreFaceDetector()) or made[-1])
    reference = tmp_path / "reference"
    m = build(_opts(root, reference, "300w_lp", tmp_path / "c0", detector="mtcnn", shard_size=3))
    assert m["counts"]["written"] == m["counts"]["read"] > 6
    # the detector saw one shard at a time (its batches never span shards), every image once
    assert max(made[0].calls) <= 3 and sum(made[0].calls) == m["counts"]["read"]
    assert all(r["box_source"] == "mtcnn" for r in label_records(reference).values())
    assert not list((reference / PROGRESS_DIR).glob("*.boxes.json")), "spooled decisions are removed once written"

    out = tmp_path / "interrupted"
    finished = build_killed_at_shard(monkeypatch, _opts(root, out, "300w_lp", tmp_path / "c1", detector="mtcnn", shard_size=3))
    assert len(finished) == 2
    # a fresh cache: only the shards still to write reach the detector
    m2 = build(_opts(root, out, "300w_lp", tmp_path / "c2", detector="mtcnn", shard_size=3))
    finished_samples = sum(s["samples"] for s in m2["shards"] if s["name"] in finished)
    assert sum(made[-1].calls) == m2["counts"]["read"] - finished_samples
    assert_same_shards(reference, out)
