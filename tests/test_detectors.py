"""Face-detection layer: real MTCNN on real face pixels, RetinaFace loading/batching with random
weights (no downloads), the JSON detection cache and the BIWI tracking rules."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from dataprep.detectors import (
    Detection,
    DetectionCache,
    Detector,
    DetectorWeightsError,
    create_detector,
    select_face,
    track_sequence,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- helpers
def det(cx: float, cy: float, score: float = 0.99, size: float = 100.0) -> Detection:
    h = size / 2
    return Detection(box=(cx - h, cy - h, cx + h, cy + h), score=score)


class FakeDetector(Detector):
    """One face per image whose x position is the image's mean pixel value; records each batch."""

    name = "fake"

    def __init__(self, fingerprint: str = "f" * 64, batch_size: int = 16):
        self.fingerprint = fingerprint
        self.batch_size = batch_size
        self.batches: list[tuple[int, ...]] = []

    def _detect_batch(self, batch):
        self.batches.append(batch.shape)
        return [[det(float(img.mean()), 50.0, 0.5), det(float(img.mean()), 10.0, 0.9)] for img in batch]


def test_detection_json_roundtrip():
    d = Detection(box=np.array([1.5, 2, 3, 4], dtype=np.float32), score=np.float32(0.75), landmarks=np.ones((5, 2)))
    assert isinstance(d.box[0], float) and isinstance(d.score, float)
    again = Detection.from_json(json.loads(json.dumps(d.to_json())))
    assert again == d and hash(again) == hash(d)
    assert Detection.from_json(Detection((0, 0, 1, 1), 0.5).to_json()).landmarks is None


def test_detect_groups_by_size_and_batches():
    fake = FakeDetector(batch_size=2)
    images = [np.full((10, 20, 3), i, np.uint8) for i in range(3)] + [np.full((8, 8, 3), 7, np.uint8)]
    images.insert(1, np.full((8, 8, 3), 9, np.uint8))
    out = fake.detect(images)
    assert [faces[0].center[0] for faces in out] == [0, 9, 1, 2, 7]  # order kept
    assert all(faces[0].score == 0.9 for faces in out)  # most confident first
    assert sorted(fake.batches) == sorted([(2, 10, 20, 3), (1, 10, 20, 3), (2, 8, 8, 3)])
    with pytest.raises(ValueError, match="uint8"):
        fake.detect([np.zeros((4, 4, 3), np.float32)])
    assert fake.detect([]) == []


def test_detect_drops_faces_outside_the_frame():
    """Every detector's boxes may reach past the border, but a box with no pixel of its image in it
    (or none at all: degenerate) is not a face of that image."""

    class Scattered(FakeDetector):
        def _detect_batch(self, batch):
            h, w = batch.shape[1:3]
            boxes = [(-30, 5, -1, 25), (w + 1, 5, w + 40, 25), (5, h, 25, h + 30), (5, -40, 25, 0),  # outside
                     (10, 10, 10, 30),  # no width
                     (-30, -30, 1, 1), (w - 1, h - 1, w + 30, h + 30), (5, 5, 25, 25)]  # inside, by 1 px or more
            return [[Detection(box, score=0.1 * (i + 1)) for i, box in enumerate(boxes)] for _ in batch]

    (faces,) = Scattered().detect([np.zeros((40, 60, 3), np.uint8)])
    assert [f.box for f in faces] == [(5, 5, 25, 25), (59, 39, 90, 70), (-30, -30, 1, 1)]  # most confident first


# --------------------------------------------------------------------------------------------- MTCNN
@pytest.fixture(scope="module")
def mtcnn():
    return create_detector("mtcnn", device="cpu", batch_size=8)


def test_mtcnn_finds_astronaut_face(mtcnn):
    from skimage.data import astronaut

    image = astronaut()
    (faces,) = mtcnn.detect([image])
    confident = [f for f in faces if f.score > 0.95]
    assert len(confident) == 1
    x1, y1, x2, y2 = confident[0].box
    assert 165 < x1 < 200 and 250 < x2 < 285 and 45 < y1 < 80 and 160 < y2 < 190
    assert confident[0].landmarks is not None and len(confident[0].landmarks) == 5
    assert mtcnn.name == "mtcnn" and len(mtcnn.fingerprint) == 64


def test_mtcnn_batch_of_shifted_copies(mtcnn):
    from skimage.data import astronaut

    image = astronaut()
    shifts = [0, 30, 60, 90, 120]
    images = [np.roll(image, s, axis=1) for s in shifts]
    calls = []
    original = mtcnn._mtcnn.detect

    def spy(img, landmarks=False):
        calls.append(np.shape(img))
        return original(img, landmarks=landmarks)

    mtcnn._mtcnn.detect = spy
    try:
        out = mtcnn.detect(images)
    finally:
        del mtcnn._mtcnn.detect
    assert calls == [(5, 512, 512, 3)]  # the whole batch in one MTCNN call
    for s, faces in zip(shifts, out):
        confident = [f for f in faces if f.score > 0.95]
        assert len(confident) == 1, (s, faces)
        cx, cy = confident[0].center
        assert abs(cx - (225 + s)) < 15 and abs(cy - 117) < 15


def test_mtcnn_finds_no_face_in_an_image_smaller_than_its_least_face(mtcnn):
    """facenet-pytorch fails (an empty torch.cat) on a picture under min_face_size (20 px) a side,
    which stopped the whole build; such a picture holds no face it can find."""
    from skimage.data import astronaut

    tiny = [np.full((8, 8, 3), 128, np.uint8), np.zeros((19, 300, 3), np.uint8)]
    assert mtcnn.detect(tiny) == [[], []]
    out = mtcnn.detect([astronaut(), tiny[0]])  # the picture beside it is still detected
    assert [f for f in out[0] if f.score > 0.95] and out[1] == []


def test_mtcnn_fingerprint_tracks_options(mtcnn):
    other = create_detector("mtcnn", device="cpu", min_score=0.9)
    same = create_detector("mtcnn", device="cpu", batch_size=1)
    assert other.fingerprint != mtcnn.fingerprint
    # The batch size moves boxes by ~1e-4 px (float arithmetic), not which faces are found: cached
    # detections stay valid across batch sizes (the cache is what makes such builds byte-identical).
    assert same.fingerprint == mtcnn.fingerprint


# --------------------------------------------------------------------------------------------- RetinaFace
@pytest.fixture(scope="module")
def retina_files(tmp_path_factory):
    from dataprep.detectors.retinaface import RetinaFaceNet

    root = tmp_path_factory.mktemp("retina")
    torch.manual_seed(0)
    net = RetinaFaceNet()
    state = net.state_dict()  # the released file's layout: the bare network's keys
    assert "body.conv1.weight" in state and "LandmarkHead.2.conv1x1.bias" in state
    pth = root / "retinaface_resnet50_2020-07-20.pth"
    torch.save(state, pth)
    zpath = root / "retinaface_resnet50_2020-07-20-f168fae3c.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(pth, arcname="retinaface_resnet50_2020-07-20.pth")
    state["ClassHead.0.conv1x1.bias"] = state["ClassHead.0.conv1x1.bias"] + 1.0
    other = root / "other.pth"
    # Wrapped, prefixed and without BatchNorm's num_batches_tracked (older torch): still loads.
    wrapped = {f"model.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": wrapped}, other)
    return {"pth": pth, "zip": zpath, "other": other}


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", getattr(torch.hub, "_hub_dir", None))  # restored afterwards
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_retinaface_loads_pth_and_zip_and_detects(retina_files):
    a = create_detector("retinaface", retinaface_weights=retina_files["pth"], device="cpu", min_score=0.0, max_size=128)
    b = create_detector("retinaface", retinaface_weights=retina_files["zip"], device="cpu", min_score=0.0, max_size=128)
    assert a.name == b.name == "retinaface"
    assert a.fingerprint == b.fingerprint  # same weights bytes (the zip's .pth) -> same cache key
    for pa, pb in zip(a.net.state_dict().values(), b.net.state_dict().values()):
        assert torch.equal(pa, pb)

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 80, 3), dtype=np.uint8) for _ in range(3)]
    images.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    calls = []
    forward = a.net.forward
    a.net.forward = lambda x: (calls.append(tuple(x.shape)), forward(x))[1]
    out = a.detect(images)
    assert sorted(calls) == [(1, 3, 128, 128), (3, 3, 128, 107)]  # one forward per size group
    assert len(out) == 4
    for faces in out:
        assert isinstance(faces, list)
        for f in faces:
            assert isinstance(f, Detection) and len(f.box) == 4 and 0.0 <= f.score <= 1.0
            assert f.landmarks is not None and len(f.landmarks) == 5
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    # Batching does not mix images: the same image alone gives the same faces.
    alone = a.detect([images[1]])[0]
    assert len(alone) == len(out[1])
    for x, y in zip(alone, out[1]):
        assert np.allclose(x.box, y.box, atol=1e-2) and abs(x.score - y.score) < 1e-4


def test_retinaface_fingerprint_changes_with_file_and_unwraps_prefixes(retina_files):
    a = create_detector("retinaface", retinaface_weights=retina_files["pth"], device="cpu")
    c = create_detector("retinaface", retinaface_weights=retina_files["other"], device="cpu")
    assert a.fingerprint != c.fingerprint
    assert torch.equal(c.net.state_dict()["ClassHead.0.conv1x1.bias"], a.net.state_dict()["ClassHead.0.conv1x1.bias"] + 1)
    d = create_detector("retinaface", retinaface_weights=retina_files["pth"], device="cpu", min_score=0.5)
    assert d.fingerprint != a.fingerprint  # thresholds are part of the key


def test_retinaface_decoding_maps_priors_to_source_pixels(retina_files):
    """Scripted network output: zero offsets at one prior -> that prior box in source pixels."""
    from dataprep.detectors.retinaface import MIN_SIZES, STEPS

    rf = create_detector("retinaface", retinaface_weights=retina_files["pth"], device="cpu", max_size=64)
    h, w = 100, 50  # resized to 64 x 32 (non-square: checks x and y scale separately)
    n_priors = sum((-(-64 // s)) * (-(-32 // s)) * len(m) for s, m in zip(STEPS, MIN_SIZES))
    # prior index of stride 8, row 3, col 2, the 32 px anchor: ((3 * 4) + 2) * 2 + 1
    k = (3 * 4 + 2) * 2 + 1

    class Scripted(torch.nn.Module):
        def forward(self, x):
            b = x.shape[0]
            conf = torch.zeros(b, n_priors, 2)
            conf[:, :, 0] = 10.0
            conf[:, k] = torch.tensor([-10.0, 10.0])
            return torch.zeros(b, n_priors, 4), conf, torch.zeros(b, n_priors, 10)

    rf.net = Scripted()
    (faces,) = rf.detect([np.zeros((h, w, 3), np.uint8)])
    assert len(faces) == 1
    cx, cy = (2 + 0.5) * 8 / 32 * w, (3 + 0.5) * 8 / 64 * h  # prior centre, normalised -> source
    bw, bh = 32 / 32 * w, 32 / 64 * h
    assert np.allclose(faces[0].box, (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), atol=1e-3)
    assert np.allclose(faces[0].landmarks, [(cx, cy)] * 5, atol=1e-3)


def test_retinaface_weights_from_hub_cache(retina_files, empty_hub):
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    target = checkpoints / "retinaface_resnet50_2020-07-20-f168fae3c.zip"
    try:
        os.link(retina_files["zip"], target)
    except OSError:
        target.write_bytes(retina_files["zip"].read_bytes())
    rf = create_detector("retinaface", device="cpu")
    assert rf.weights_path == target


def test_retinaface_missing_weights_error(empty_hub, tmp_path):
    with pytest.raises(DetectorWeightsError, match="--retinaface-weights") as info:
        create_detector("retinaface", device="cpu")
    assert "retinaface_resnet50_2020-07-20" in str(info.value) and "https://" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(DetectorWeightsError, match="--retinaface-weights"):
        create_detector("retinaface", device="cpu", retinaface_weights=tmp_path / "nope.pth")
    unpacked = tmp_path / "retinaface_resnet50_2020-07-20-f168fae3c"  # the zip unpacked, passed as it is
    unpacked.mkdir()
    with pytest.raises(DetectorWeightsError, match=f"^{unpacked} is a folder, not a RetinaFace weights file\n"):
        create_detector("retinaface", device="cpu", retinaface_weights=unpacked)
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(DetectorWeightsError, match="does not fit"):
        create_detector("retinaface", device="cpu", retinaface_weights=bad)
    with pytest.raises(ValueError, match="unknown detector"):
        create_detector("dlib")


def test_retinaface_weights_of_another_model_are_named_in_one_line(retina_files, empty_hub, tmp_path):
    """Another network's file is summed up in one line with a few keys of each kind (torch's own
    message listed every key, ~15,000 characters for a ResNet-18), naming the file by its path."""
    import torchvision

    def detail(weights=None) -> str:
        with pytest.raises(DetectorWeightsError) as info:
            create_detector("retinaface", device="cpu", retinaface_weights=weights)
        first, advice = str(info.value).split("\n")
        assert "--retinaface-weights" in advice
        return first

    resnet18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet18)
    line = detail(resnet18)
    assert line.startswith(f"{resnet18} does not fit the RetinaFace-ResNet50 network: it lacks ")
    assert "(body.conv1.weight, body.bn1.weight, body.bn1.bias, ...)" in line
    assert "the network does not have (conv1.weight, bn1.weight, bn1.bias, ...)" in line and len(line) < 400

    state = torch.load(retina_files["pth"], weights_only=True)
    state["ClassHead.0.conv1x1.weight"] = torch.zeros(6, 256, 1, 1)  # a head of 3 anchors, not 2
    reshaped = tmp_path / "reshaped.pth"
    torch.save(state, reshaped)
    assert detail(reshaped) == (f"{reshaped} does not fit the RetinaFace-ResNet50 network: 1 of another shape "
                                "(ClassHead.0.conv1x1.weight (6, 256, 1, 1) instead of (4, 256, 1, 1))")

    # a damaged file found in the hub cache is named where it lies, not only by its name
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    damaged = checkpoints / "retinaface_resnet50_2020-07-20-f168fae3c.zip"
    damaged.write_bytes(retina_files["zip"].read_bytes()[:1000])
    assert detail().startswith(f"Cannot read RetinaFace weights {damaged}: damaged")


# --------------------------------------------------------------------------------------------- cache
def test_cache_skips_detector_on_hits(tmp_path):
    """The box stage's ``detect_all``: misses batched into one detector call, hits answered from the
    cache, an image shown by two files detected once, detectors kept apart by fingerprint."""
    import cv2

    from dataprep.box_stage import detect_all
    from dataprep.records import SampleRef

    cache = DetectionCache(tmp_path / "cache")
    fake = FakeDetector()
    calls = []
    detect = fake.detect
    fake.detect = lambda images: (calls.append(len(images)), detect(images))[1]
    root = tmp_path / "images"
    root.mkdir()

    def refs_of(values):
        refs = []
        for i, v in enumerate(values):
            name = f"{i}_{v}.png"
            cv2.imwrite(str(root / name), np.full((4, 4, 3), v, np.uint8))
            refs.append(SampleRef("d", f"k{i}_{v}", name, "g"))
        return refs

    refs = refs_of((1, 2, 3))
    first = detect_all(refs, root, fake, cache, progress=False)
    assert calls == [3] and len(fake.batches) == 1  # misses batched into one call
    second = detect_all(refs, root, fake, cache, progress=False)
    assert calls == [3] and second == first  # no detector run

    more = refs_of((1, 9, 9))  # the same picture as refs[0], and one new picture in two files
    third = detect_all(more, root, fake, cache, progress=False)
    assert calls == [3, 1] and third[more[1].key] == third[more[2].key] and third[more[0].key] == first[refs[0].key]

    other = FakeDetector(fingerprint="0" * 64)
    detect_all(refs[:1], root, other, cache, progress=False)
    assert len(other.batches) == 1  # keys separate by fingerprint

    files = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len(files) == 5 and all(p.suffix == ".json" for p in files)
    for p in files:
        data = json.loads(p.read_text())
        assert set(data) == {"version", "fingerprint", "image_key", "detections"}
        assert p.parent.name == p.stem[:2]
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_cache_that_cannot_be_written_is_read_and_said_once(tmp_path, capsys):
    """A cache that cannot be written (read-only, full, or here a file where an entry's folder
    belongs, which refuses root too) stopped the build at its first detection, with advice about
    --out and --root; now its entries are still read, the rest detected, and the build told once."""
    import cv2

    from dataprep.box_stage import detect_all
    from dataprep.detectors import image_key_from_bytes
    from dataprep.records import SampleRef

    root = tmp_path / "images"
    root.mkdir()
    refs = []
    for v in (1, 2, 3):
        cv2.imwrite(str(root / f"{v}.png"), np.full((4, 4, 3), v, np.uint8))
        refs.append(SampleRef("d", f"k{v}", f"{v}.png", "g"))
    fake = FakeDetector()
    cache = DetectionCache(tmp_path / "cache")
    cached = detect_all(refs[:1], root, fake, cache, progress=False)  # an entry someone stored earlier
    folders = [cache.path_for(image_key_from_bytes((root / r.source).read_bytes()), fake.fingerprint).parent
               for r in refs[1:]]
    for folder in folders:
        assert not folder.exists()  # another folder than the stored entry's
        folder.write_text("")
    fake.batches.clear()

    first = detect_all(refs, root, fake, cache, progress=False)
    second = detect_all(refs, root, fake, cache, progress=False)
    assert first == second and len(first) == 3 and first[refs[0].key] == cached[refs[0].key]
    assert fake.batches == [(2, 4, 4, 3), (2, 4, 4, 3)]  # the stored entry read, the others detected
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"the detection cache {cache.directory} cannot be written" in err
    assert f"({folders[0]})" in err and "--cache-dir" in err


def test_cache_empty_result_and_corrupt_file(tmp_path):
    cache = DetectionCache(tmp_path)
    path = cache.put("ab" * 32, "fp", [])
    assert cache.get("ab" * 32, "fp") == []  # "no face" is a hit, not a miss
    assert path.name == "ab" * 32 + ".json" and path.parent.name == "ab"
    path.write_text("{trunc")
    assert cache.get("ab" * 32, "fp") is None
    faces = [det(1, 2, 0.3), Detection((0, 0, 1, 1), 0.9, landmarks=[(0, 0)] * 5)]
    cache.put("ab" * 32, "fp", faces)
    assert cache.get("ab" * 32, "fp") == faces


# --------------------------------------------------------------------------------------------- tracking
W, H = 640, 480
AX, AY = 427, 320  # integer point next to (2W/3, 2H/3) = (426.7, 320): exact distances below


def test_select_face_takes_the_face_overlapping_the_labelled_box_most():
    far = det(500, 400, 0.99)
    labelled = det(100, 100, 0.6)  # the ground-truth box's own face: IoU 1
    shifted = det(120, 110, 0.8)  # IoU 7200 / 12800 = 0.5625
    touching = det(190, 190, 0.9999)  # a neighbour's face over the box's corner: IoU 100 / 19900
    ref = (50, 50, 150, 150)
    assert select_face([far, touching, shifted, labelled], reference_box=ref) == labelled
    assert select_face([far, touching, shifted], reference_box=ref) == shifted
    # the labelled face missed: a confident neighbour merely touching the box is someone else
    assert select_face([far, touching], reference_box=ref) is None
    assert select_face([touching], reference_box=ref, min_iou=0.001) == touching
    assert select_face([far, labelled, shifted]) == far  # no reference: the most confident
    assert select_face([far], reference_box=(0, 0, 100, 100)) is None
    assert select_face([labelled, shifted], reference_box=ref, min_score=0.7) == shifted
    assert select_face([labelled, shifted], min_score=0.9) is None
    # equal overlap: the more confident
    twin = det(100, 100, 0.7)
    assert select_face([labelled, twin], reference_box=ref) == twin
    assert select_face([]) is None


def test_track_none_mode_rules():
    frames = [
        [det(AX, AY, 0.99)],  # accepted
        [],  # no face
        [det(AX + 50, AY, 0.89), det(AX + 1, AY, 0.95)],  # low score ignored
        [det(AX + 80, AY, 0.99)],  # 79 px from the last accepted (AX + 1): kept
        [det(AX + 80 + 80, AY, 0.99)],  # exactly 80 px: jump
        [det(AX + 80 + 48, AY + 64, 0.99)],  # 80 px diagonally (48, 64): jump
        [det(AX + 80 + 47, AY + 64, 0.99)],  # 79.4 px: kept
        [det(AX + 500, AY, 0.99)],  # the only face, far away: jump
        [det(AX + 100, AY, 0.999), det(100, 100, 0.999)],  # several: nearest to (2W/3, 2H/3) wins
        [det(AX, AY, 0.90)],  # score must be > 0.90
    ]
    res = track_sequence(frames, image_size=(W, H), mode="none")
    assert [r.rejected for r in res] == [None, "no_face", None, None, "box_jump", "box_jump", None, "box_jump", None, "no_face"]
    assert not any(r.reused for r in res)
    assert res[2].box == det(AX + 1, AY).box and res[2].score == 0.95
    assert res[3].box == det(AX + 80, AY).box
    assert res[8].box == det(AX + 100, AY).box
    assert res[1].box is None and res[1].score is None and not res[1].accepted


def test_track_previous_mode_reuses_last_accepted_box():
    frames = [
        [det(AX, AY, 0.99)],  # first frame missing below -> this one is the first accepted
        [],  # no face -> reuse
        [det(AX + 80, AY, 0.99)],  # jump -> reuse
        [det(AX + 10, AY, 0.94)],  # below 0.95 -> reuse
        [det(AX + 79, AY, 0.97)],  # 79 px: accepted
    ]
    res = track_sequence([[]] + frames, image_size=(W, H), mode="previous")
    assert res[0].rejected == "no_face" and res[0].box is None  # nothing to reuse yet
    first = res[1]
    assert first.accepted and not first.reused and first.score == 0.99
    for r in res[2:5]:
        assert r.accepted and r.reused and r.box == first.box and r.score == 0.99
    assert res[5].accepted and not res[5].reused and res[5].box == det(AX + 79, AY).box

    # A jump before anything was accepted cannot happen (no previous); a first-frame miss is rejected.
    res = track_sequence([[det(AX, AY, 0.9)], [det(AX, AY, 0.96)]], mode="previous")
    assert [r.rejected for r in res] == ["no_face", None]
    # Thresholds are parameters.
    res = track_sequence([[det(AX, AY, 0.9)], [det(AX + 30, AY)]], mode="none", min_score=0.5, max_jump=20)
    assert [r.rejected for r in res] == [None, "box_jump"]
    with pytest.raises(ValueError):
        track_sequence([], mode="kalman")
