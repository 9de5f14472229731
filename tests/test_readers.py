"""Raw-dataset readers, BIWI codecs and the sample-data generator."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from dataprep.boxes import bbox_of_points

from dataprep import labels
from dataprep.datasets import DATASET_READERS, aflw2000, biwi, get_reader, matfile, w300lp
from dataprep.records import RawSample, SampleError, SampleRef
from dataprep.sample_data import write_sample_tree

ROOTS = {"300w_lp": "300W_LP", "aflw2000": "AFLW2000", "biwi": "hpdb"}


@pytest.fixture(scope="module")
def expected(sample_tree) -> dict:
    return json.loads((sample_tree / "expected_labels.json").read_text())


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
def test_registry():
    assert set(DATASET_READERS) == {"300w_lp", "aflw2000", "biwi"}
    for name, module in DATASET_READERS.items():
        assert module.NAME == name
        assert module.DEFAULT_ROOT_NAME == ROOTS[name]
        assert all(callable(f) for f in (module.list_samples, module.read_sample, module.input_files, module.image_size))
        assert get_reader(name) is module
    assert get_reader("300W_LP") is w300lp and get_reader("hpdb") is biwi and get_reader("AFLW2000") is aflw2000
    with pytest.raises(ValueError, match="unknown dataset"):
        get_reader("celeba")


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_list_samples_wrong_root(tmp_path, name):
    with pytest.raises(FileNotFoundError):
        get_reader(name).list_samples(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=ROOTS[name]):  # exists, but holds nothing of the dataset
        get_reader(name).list_samples(tmp_path)


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_a_root_one_level_off_the_dataset_says_which_folder_to_pass(sample_tree, tmp_path, name):
    """The message said "pass the 300W_LP folder" to a user who had passed one (a zip unpacked into
    ``300W_LP/300W_LP``), and named no folder for a root one level below the dataset's."""
    folder = ROOTS[name]
    nested = tmp_path / folder
    shutil.copytree(sample_tree / folder, nested / folder)
    for too_high in (nested, sample_tree):  # the archive's own folder; the folder of all three datasets
        with pytest.raises(FileNotFoundError) as err:
            get_reader(name).list_samples(too_high)
        assert str(err.value).endswith(f"; it holds the dataset's folder: pass {too_high / folder}")
    inner = {"300w_lp": "AFW_Flip", "biwi": "01"}.get(name)  # AFLW2000 has no folders of its own
    if inner:
        with pytest.raises(FileNotFoundError) as err:
            get_reader(name).list_samples(sample_tree / folder / inner)
        assert str(err.value).endswith(f"; {inner} is one of the dataset's own folders: pass the {folder} folder "
                                       f"above it, {sample_tree / folder}")


def test_a_300wlp_subset_folder_named_in_another_case_stops_the_listing(sample_tree, tmp_path):
    """``afw_flip`` was passed over without a word (its samples never read, under protocol none not
    even counted short); read under its own name it would lose the _Flip that re-indexes its landmarks."""
    root, _ = _copy_sample(sample_tree, tmp_path, "300w_lp", W300_SOURCE)
    (root / "afw_flip").mkdir()
    shutil.copyfile(root / W300_SOURCE, root / "afw_flip" / "AFW_1000207_1_0.jpg")
    with pytest.raises(FileNotFoundError, match=r"300W-LP subset folder\(s\) named in another case under .*: "
                                                r"afw_flip \(rename it AFW_Flip\); the reader takes the dataset's own names"):
        w300lp.list_samples(root)
    (root / "afw_flip").rename(root / "AFW_Flip")
    assert {r.group for r in w300lp.list_samples(root)} == {"AFW", "AFW_Flip"}


def test_a_file_or_a_dangling_link_where_a_dataset_has_a_folder_stops_the_listing(sample_tree, tmp_path, capsys):
    """A file named like a 300W-LP subset, or a dangling link where a BIWI sequence folder would be,
    was passed over without a word: its samples never read, under protocol none not even counted short."""
    from dataprep.cli import main as cli_main

    root, _ = _copy_sample(sample_tree, tmp_path, "300w_lp", W300_SOURCE)
    (root / "HELEN").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"^300W-LP subset\(s\) under .*300W_LP that are not folders: HELEN "
                                                 r"\(a file\); their samples cannot be read: put the dataset's folder"):
        w300lp.list_samples(root)
    (root / "HELEN").unlink()
    (root / "HELEN").symlink_to(tmp_path / "gone")
    with pytest.raises(NotADirectoryError, match=r"HELEN \(a symbolic link to .*gone, which does not exist\)"):
        w300lp.list_samples(root)
    (root / "HELEN").unlink()
    assert {r.group for r in w300lp.list_samples(root)} == {"AFW"}

    root, _ = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    (root / "01").symlink_to(tmp_path / "unmounted" / "01")
    (root / "02").write_text("")
    with pytest.raises(NotADirectoryError, match=r"^BIWI sequence\(s\) under .*hpdb that are not folders: 01 \(a symbolic "
                                                 r"link to .*unmounted/01, which does not exist\), 02 \(a file\); their "
                                                 r"frames cannot be read: put the sequence's folder there"):
        biwi.list_samples(root)
    capsys.readouterr()
    assert cli_main(["build", "--dataset", "biwi", "--protocol", "none", "--root", str(root), "--out",
                     str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dataprep build: error: BIWI sequence(s) under ") and len(err.strip().splitlines()) == 1, err
    (root / "01").unlink()
    (root / "02").unlink()
    assert {r.group for r in biwi.list_samples(root)} == {"03"}


# --------------------------------------------------------------------------------------------
# Round trips on the generated tree
# --------------------------------------------------------------------------------------------
def test_sample_tree_content(sample_tree, expected):
    assert {k: len(v) for k, v in expected.items()} == {"300w_lp": 20, "aflw2000": 12, "biwi": 72}
    lp = sample_tree / "300W_LP"
    assert sorted(p.name for p in lp.iterdir()) == sorted(list(w300lp.SUBSETS) + ["Code", "landmarks"])
    assert sum(e["pt2d_missing"] > 0 for e in expected["aflw2000"]) >= 3
    assert sum(not e["in_range"] for e in expected["aflw2000"]) >= 2
    aspects = [(b[2] - b[0]) / (b[3] - b[1]) for b in (e["gt_box"] for e in expected["aflw2000"])]
    assert min(aspects) < 0.8
    assert min(e["gt_box"][0] for e in expected["aflw2000"]) < 0  # a face over the image border
    hpdb = sample_tree / "hpdb"
    assert sorted(p.name for p in hpdb.iterdir() if p.is_dir()) == [f"{i:02d}" for i in range(1, 25)]
    assert all((hpdb / f"{i:02d}.obj").is_file() for i in range(1, 25))
    assert sorted(p.name for p in (hpdb / "07").iterdir())[:3] == ["depth.cal", "frame_00003_depth.bin",
                                                                   "frame_00003_pose.txt"]
    size = sum(p.stat().st_size for p in sample_tree.rglob("*") if p.is_file())
    assert size < 25e6


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_round_trip(sample_tree, expected, name):
    reader = get_reader(name)
    root = sample_tree / ROOTS[name]
    refs = reader.list_samples(root)
    assert [(r.key, r.source, r.group) for r in refs] == [(e["key"], e["source"], e["group"]) for e in expected[name]]
    assert refs == sorted(refs, key=lambda r: r.source)
    assert all(r.dataset == name and "." not in r.key and "/" not in r.key for r in refs)
    assert len({r.key for r in refs}) == len(refs)
    step = 5 if name == "biwi" else 1
    for ref, exp in list(zip(refs, expected[name]))[::step]:
        s = reader.read_sample(root, ref)
        assert isinstance(s, RawSample) and s.ref == ref
        assert (s.yaw, s.pitch, s.roll) == pytest.approx((exp["yaw"], exp["pitch"], exp["roll"]), abs=1e-9)
        np.testing.assert_allclose(s.rotation, labels.rotation_from_euler(s.yaw, s.pitch, s.roll), atol=1e-12)
        assert s.boxes["gt"] == pytest.approx(exp["gt_box"], abs=1e-6)
        assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.image.shape[2] == 3
        assert reader.image_size(root, ref) == (s.image.shape[1], s.image.shape[0])  # what the box stage detects
        if name == "biwi":
            assert s.image.shape == (480, 640, 3)
            assert s.depth.shape == (480, 640) and s.depth.dtype == np.uint16
            assert s.landmarks is None
            assert s.extra["sequence"] == ref.group
            assert s.extra["head_center_mm"] == pytest.approx(exp["head_center_mm"])
            u, v = (int(round(c)) for c in s.extra["head_center_depth_px"])
            window = s.depth[v - 5:v + 6, u - 5:u + 6]
            assert 700 < np.median(window[window > 0]) < 1000  # the head's surface in front of its centre
        else:
            assert s.image.shape == (450, 450, 3)
            assert s.landmarks.shape == (68, 2)
            assert len(s.extra["pose_para"]) == 7
            assert s.boxes["gt"] == pytest.approx(bbox_of_points(s.landmarks))
        if name == "300w_lp":
            assert s.boxes["pt2d"] == s.boxes["gt"]
        if name == "aflw2000":
            assert s.extra["pt2d_missing"] == exp["pt2d_missing"]
            assert s.boxes["pt2d"] == pytest.approx(exp["pt2d_box"])


def test_300wlp_ignores_other_folders_and_flip_is_mirror(sample_tree, expected):
    root = sample_tree / "300W_LP"
    refs = w300lp.list_samples(root)
    assert {r.group for r in refs} == set(w300lp.SUBSETS)
    assert not any(r.source.startswith(("Code/", "landmarks/")) for r in refs)
    by_source = {r.source: r for r in refs}
    ref = next(r for r in refs if r.group == "HELEN")
    orig = w300lp.read_sample(root, ref)
    flip = w300lp.read_sample(root, by_source["HELEN_Flip/" + ref.source.split("/", 1)[1]])
    assert flip.ref.key == "300w_lp_HELEN_Flip_" + Path(ref.source).stem
    assert flip.yaw == pytest.approx(-orig.yaw, abs=1.0) and flip.roll == pytest.approx(-orig.roll, abs=1.0)
    assert flip.pitch == pytest.approx(orig.pitch, abs=1.0)
    assert np.abs(flip.image.astype(int) - orig.image[:, ::-1].astype(int)).mean() < 3  # two JPEG encodes
    # the _Flip .mat mirrors the points in MATLAB pixel coordinates (x -> 451 - x in 450 px images)
    # without re-indexing them; the reader re-indexes, so landmark i is the same facial point
    assert flip.boxes["gt"] == pytest.approx([451 - orig.boxes["gt"][2], orig.boxes["gt"][1],
                                              451 - orig.boxes["gt"][0], orig.boxes["gt"][3]])
    np.testing.assert_allclose(flip.landmarks, labels.mirror_landmarks(orig.landmarks, 450, 1.0), atol=1e-4)
    assert flip.landmarks[36, 0] < flip.landmarks[45, 0]  # the right eye's outer corner on the image's left


def test_aflw2000_placeholders_never_in_gt(sample_tree, expected):
    root = sample_tree / "AFLW2000"
    with_missing = [e for e in expected["aflw2000"] if e["pt2d_missing"]]
    refs = {r.source: r for r in aflw2000.list_samples(root)}
    for e in with_missing:
        s = aflw2000.read_sample(root, refs[e["source"]])
        assert s.extra["pt2d_missing"] == e["pt2d_missing"] > 0
        x1, y1, x2, y2 = s.boxes["pt2d"]
        assert x1 == -1.0 and y2 == 452.0  # Hopenet's polluted box, kept for the audit
        assert not np.any((s.landmarks[:, 0] == -1.0) & (s.landmarks[:, 1] == 452.0))
        assert s.boxes["gt"][0] > -1.0 and s.boxes["gt"][3] < 452.0
        assert s.boxes["gt"] != s.boxes["pt2d"]


def test_sample_tree_is_deterministic(sample_tree, expected, tmp_path):
    """Same seed -> byte-identical files. A tree with 1 BIWI frame per sequence is, file for file,
    the first frames of the session tree (3 frames), so one small extra tree checks it."""
    small = tmp_path / "small"
    small_expected = write_sample_tree(small, seed=0, biwi_frames_per_sequence=1)
    hashes, full = _tree_hashes(small), _tree_hashes(sample_tree)
    del hashes["expected_labels.json"]
    assert len(hashes) > 200
    assert {k: full.get(k) for k in hashes} == hashes
    assert small_expected["300w_lp"] == expected["300w_lp"] and small_expected["aflw2000"] == expected["aflw2000"]
    assert small_expected["biwi"] == [e for e in expected["biwi"] if "frame_00003" in e["source"]]
    header = next((small / "AFLW2000").glob("*.mat")).read_bytes()[:116]
    assert header.startswith(b"MATLAB 5.0 MAT-file") and b"1970" in header

    other = tmp_path / "other"
    other_expected = write_sample_tree(other, seed=1, biwi_frames_per_sequence=1)
    assert other_expected["biwi"][0]["source"] == "01/frame_00003_rgb.png"
    other_hashes = _tree_hashes(other)
    changed = [k for k in hashes if k.endswith((".jpg", ".png", ".mat", ".bin")) and other_hashes.get(k) != hashes[k]]
    assert len(changed) > 100


def test_generated_mat_layout(sample_tree):
    import scipy.io

    m = scipy.io.loadmat(str(next((sample_tree / "AFLW2000").glob("*.mat"))))
    layout = {k: (v.shape, v.dtype.str) for k, v in m.items() if not k.startswith("__")}
    assert list(layout) == ["pt2d", "Illum_Para", "Color_Para", "Tex_Para", "Shape_Para", "Exp_Para",
                            "Pose_Para", "roi", "pt3d_68"]
    assert layout["pt2d"] == ((2, 21), "<f8") and layout["pt3d_68"] == ((3, 68), "<f4")
    assert layout["Pose_Para"] == ((1, 7), "<f4") and layout["roi"] == ((1, 4), "<i2")
    m = scipy.io.loadmat(str(next((sample_tree / "300W_LP" / "LFPW_Flip").glob("*.mat"))))
    layout = {k: (v.shape, v.dtype.str) for k, v in m.items() if not k.startswith("__")}
    assert list(layout) == ["pt2d", "roi", "Illum_Para", "Color_Para", "Tex_Para", "Shape_Para", "Exp_Para",
                            "Pose_Para"]
    assert layout["pt2d"] == ((2, 68), "<f8") and layout["Shape_Para"] == ((199, 1), "<f4")


@pytest.fixture(scope="module")
def mtcnn():
    torch = pytest.importorskip("torch")
    facenet = pytest.importorskip("facenet_pytorch")
    torch.set_num_threads(1)
    return facenet.MTCNN(keep_all=True, device="cpu")


def test_faces_are_detectable(sample_tree, expected, mtcnn):
    """The pasted astronaut face is found by MTCNN where face_box says (one image per dataset)."""
    for name in sorted(ROOTS):
        e = expected[name][1]
        reader = get_reader(name)
        s = reader.read_sample(sample_tree / ROOTS[name], next(r for r in reader.list_samples(
            sample_tree / ROOTS[name]) if r.source == e["source"]))
        boxes, probs = mtcnn.detect(s.image)
        assert boxes is not None, e["source"]
        assert _iou(boxes[int(np.argmax(probs))].tolist(), e["face_box"]) > 0.6
        assert _iou(e["gt_box"], e["face_box"]) > 0.4


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# --------------------------------------------------------------------------------------------
# depth.bin codec
# --------------------------------------------------------------------------------------------
def _depth_cases():
    rng = np.random.default_rng(3)
    noisy = rng.integers(0, 1200, size=(48, 64)).astype(np.uint16)
    noisy[rng.random(noisy.shape) < 0.3] = 0
    trailing_values = noisy.copy()
    trailing_values[-1, -5:] = 700
    trailing_zeros = noisy.copy()
    trailing_zeros[-1, -7:] = 0
    leading_value = noisy.copy()
    leading_value[0, 0] = 900
    return {
        "all_zeros": np.zeros((480, 640), np.uint16),
        "no_zeros": rng.integers(1, 32767, size=(30, 40)).astype(np.uint16),
        "noisy": noisy,
        "trailing_values": trailing_values,
        "trailing_zeros": trailing_zeros,
        "leading_value": leading_value,
        "single_zero": np.zeros((1, 1), np.uint16),
        "single_value": np.full((1, 1), 5, np.uint16),
        "alternating": (np.arange(35 * 21).reshape(35, 21) % 2 * 1000).astype(np.uint16),
    }


@pytest.mark.parametrize("case", sorted(_depth_cases()))
def test_depth_round_trip(case):
    depth = _depth_cases()[case]
    data = biwi.encode_depth_bin(depth)
    decoded = biwi.decode_depth_bin(data)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, depth)
    assert data[:8] == np.array([depth.shape[1], depth.shape[0]], "<i4").tobytes()
    assert len(data) == 8 + 2 * np.count_nonzero(depth) + 8 * _records(depth)


def _records(depth) -> int:
    """Number of (numempty, numfull) records BIWI's writer emits."""
    z = depth.reshape(-1) == 0
    runs_of_values = int(np.count_nonzero(~z[1:] & z[:-1]) + (not z[0]))
    return runs_of_values + int(z[-1])


def test_depth_codec_format_details():
    d = np.array([[0, 0, 5, 6], [0, 7, 0, 0]], np.uint16)
    data = biwi.encode_depth_bin(d)
    ints = lambda *v: np.array(v, "<i4").tobytes()  # noqa: E731
    shorts = lambda *v: np.array(v, "<i2").tobytes()  # noqa: E731
    assert data == ints(4, 2) + ints(2, 2) + shorts(5, 6) + ints(1, 1) + shorts(7) + ints(2, 0)
    d = np.array([[3, 0]], np.uint16)
    assert biwi.encode_depth_bin(d) == ints(2, 1) + ints(0, 1) + shorts(3) + ints(1, 0)
    with pytest.raises(ValueError):
        biwi.encode_depth_bin(np.full((2, 2), 40000, np.uint32))


def test_depth_decode_speed(sample_tree):
    data = (sample_tree / "hpdb" / "05" / "frame_00004_depth.bin").read_bytes()
    biwi.decode_depth_bin(data)
    start = time.perf_counter()
    for _ in range(10):
        depth = biwi.decode_depth_bin(data)
    per_frame = (time.perf_counter() - start) / 10
    assert depth.shape == (480, 640)
    assert per_frame < 0.05, f"{per_frame * 1000:.1f} ms per 640x480 frame"


@pytest.mark.parametrize("cut", ["empty", "header_only", "mid_record_header", "mid_values", "missing_last_record"])
def test_truncated_depth(tmp_path, cut):
    depth = np.zeros((20, 30), np.uint16)
    depth[5:15, 10:20] = 900
    data = biwi.encode_depth_bin(depth)
    cut_at = {"empty": 0, "header_only": 8, "mid_record_header": 12, "mid_values": 8 + 8 + 8 + 6,
              "missing_last_record": len(data) - 8}[cut]
    path = tmp_path / "frame_00003_depth.bin"
    path.write_bytes(data[:cut_at])
    with pytest.raises(SampleError) as err:
        biwi.read_depth_bin(path)
    assert err.value.reason == "corrupt_depth"
    assert "frame_00003_depth.bin" in str(err.value)


def test_depth_bad_runs():
    ints = lambda *v: np.array(v, "<i4").tobytes()  # noqa: E731
    for data in (ints(4, 1) + ints(-1, 2), ints(4, 1) + ints(3, 2) + b"\0" * 4, ints(0, 5), ints(2, 2) + ints(1, 1) + b"\xff\xff" + ints(3, 0)):
        with pytest.raises(SampleError) as err:
            biwi.decode_depth_bin(data, "x/depth.bin")
        assert err.value.reason == "corrupt_depth" and "x/depth.bin" in err.value.message


# --------------------------------------------------------------------------------------------
# Error cases: every bad input is a SampleError naming the file
# --------------------------------------------------------------------------------------------
def _copy_sample(sample_tree: Path, tmp_path: Path, name: str, source: str) -> tuple[Path, SampleRef]:
    """Copy one sample's files into a fresh root under tmp_path (the shared tree stays intact)."""
    src_root = sample_tree / ROOTS[name]
    root = tmp_path / ROOTS[name]
    if name == "biwi":
        seq = source.split("/")[0]
        frame = source.split("/")[1][: -len("_rgb.png")]
        files = [f"{seq}/{f}" for f in ("rgb.cal", "depth.cal")] + [
            f"{seq}/{frame}_{s}" for s in ("rgb.png", "pose.txt", "depth.bin")]
    else:
        files = [source, str(Path(source).with_suffix(".mat").as_posix())]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / f, root / f)
    ref = next(r for r in get_reader(name).list_samples(root) if r.source == source)
    return root, ref


def _expect_error(name: str, root: Path, ref: SampleRef, reason: str, filename: str) -> SampleError:
    with pytest.raises(SampleError) as err:
        get_reader(name).read_sample(root, ref)
    assert err.value.reason == reason, err.value.message
    assert filename in err.value.message
    assert str(err.value) == err.value.message
    return err.value


W300_SOURCE = "AFW/AFW_1000207_1_0.jpg"
AFLW_NAME = "aflw2000"
BIWI_SOURCE = "03/frame_00004_rgb.png"


@pytest.fixture()
def aflw_source(expected) -> str:
    return expected["aflw2000"][0]["source"]


def test_corrupt_mat(sample_tree, tmp_path):
    root, ref = _copy_sample(sample_tree, tmp_path, "300w_lp", W300_SOURCE)
    mat = root / "AFW" / "AFW_1000207_1_0.mat"
    whole = mat.read_bytes()
    for content, says in ((b"", "not a MAT file (0 bytes; "), (b"not a mat file at all" * 20, "not a MAT file (420 bytes; "),
                          (whole[:400], "damaged or truncated MAT file (400 bytes; ")):  # was "not a MAT file"
        mat.write_bytes(content)
        err = _expect_error("300w_lp", root, ref, "corrupt_mat", "300W_LP/AFW/AFW_1000207_1_0.mat")
        assert says in err.message and "re-download" in err.message



def test_biwi_damaged_frame_is_named_without_libpngs_nameless_line(sample_tree, tmp_path, capfd):
    root, ref = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    frame = root / BIWI_SOURCE
    damaged = bytearray(frame.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10  # one flipped bit, inside the picture data
    frame.write_bytes(bytes(damaged))
    capfd.readouterr()
    err = _expect_error("biwi", root, ref, "corrupt_image", "hpdb/" + BIWI_SOURCE)
    assert "damaged PNG data (chunk IDAT at byte " in err.message and "CRC mismatch" in err.message
    assert "re-download" in err.message
    assert "libpng" not in capfd.readouterr().err

def test_missing_mat_is_listed_then_rejected(sample_tree, tmp_path, aflw_source):
    root, ref = _copy_sample(sample_tree, tmp_path, AFLW_NAME, aflw_source)
    (root / aflw_source).with_suffix(".mat").unlink()
    assert [r.source for r in aflw2000.list_samples(root)] == [aflw_source]
    _expect_error(AFLW_NAME, root, ref, "missing_mat", "AFLW2000/" + aflw_source.replace(".jpg", ".mat"))


def test_images_named_apart_only_by_case_are_each_read(sample_tree, tmp_path, aflw_source):
    root, ref = _copy_sample(sample_tree, tmp_path, AFLW_NAME, aflw_source)
    upper = Path(aflw_source).with_suffix(".JPG").as_posix()
    shutil.copyfile(root / aflw_source, root / upper)
    refs = aflw2000.list_samples(root)
    assert sorted(r.source for r in refs) == sorted([aflw_source, upper])  # neither is dropped
    assert len({r.key for r in refs}) == 2  # nor merged into one webdataset sample
    for r in refs:
        assert aflw2000.read_sample(root, r).ref == r  # each read, with the one .mat


def test_a_biwi_frame_named_in_upper_case_is_read_with_its_companions(sample_tree, tmp_path):
    """``frame_XXXXX_rgb.PNG`` was listed as a missing ``.png`` beside its pose file."""
    root, ref = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    want = biwi.read_sample(root, ref)
    upper = BIWI_SOURCE.replace(".png", ".PNG")
    (root / BIWI_SOURCE).rename(root / upper)
    refs = biwi.list_samples(root)
    assert [(r.source, r.key) for r in refs] == [(upper, ref.key)]
    got = biwi.read_sample(root, refs[0])
    assert np.array_equal(got.image, want.image) and np.array_equal(got.depth, want.depth)
    assert (got.yaw, got.pitch, got.roll) == (want.yaw, want.pitch, want.roll)
    assert biwi.input_files(root, refs[0])[0] == upper


@pytest.mark.parametrize("name,source,label", [
    ("300w_lp", W300_SOURCE, "AFW/AFW_1000207_1_0.mat"),
    ("biwi", BIWI_SOURCE, "03/frame_00004_pose.txt"),
])
def test_label_without_image_is_listed_then_rejected(sample_tree, tmp_path, name, source, label):
    # An incomplete download (labels without their images) must show in the counts, not vanish.
    root, ref = _copy_sample(sample_tree, tmp_path, name, source)
    (root / source).unlink()
    assert get_reader(name).list_samples(root) == [ref]  # same source and key as with the image
    _expect_error(name, root, ref, "missing_image", f"{ROOTS[name]}/{source}")


def test_aflw2000_label_without_image(sample_tree, tmp_path, aflw_source):
    root, ref = _copy_sample(sample_tree, tmp_path, AFLW_NAME, aflw_source)
    (root / aflw_source).unlink()
    assert aflw2000.list_samples(root) == [ref]
    _expect_error(AFLW_NAME, root, ref, "missing_image", f"AFLW2000/{aflw_source}")
    (root / aflw_source).with_suffix(".mat").unlink()
    with pytest.raises(FileNotFoundError, match="no .jpg images or .mat labels"):
        aflw2000.list_samples(root)


def test_keys_are_unique_when_names_differ_only_in_unsafe_characters(sample_tree, tmp_path, aflw_source):
    root, ref = _copy_sample(sample_tree, tmp_path, AFLW_NAME, aflw_source)
    assert ref.key == "aflw2000_" + Path(aflw_source).stem  # the real names keep their plain keys
    stem = Path(aflw_source).stem
    for other in (f"{stem[:5]}.{stem[5:]}", f"{stem[:5]} {stem[5:]}", f"{stem[:5]}_{stem[5:]}"):
        for suffix in (".jpg", ".mat"):
            shutil.copyfile((root / aflw_source).with_suffix(suffix), root / f"{other}{suffix}")
    refs = aflw2000.list_samples(root)
    assert len(refs) == 4 and len({r.key for r in refs}) == 4
    assert all("." not in r.key and " " not in r.key for r in refs)
    assert ref in refs  # unchanged by the others
    # keys do not depend on what else is in the folder
    again = {r.source: r.key for r in aflw2000.list_samples(root)}
    assert again == {r.source: r.key for r in refs}


def test_keys_that_still_coincide_are_made_unique(sample_tree, tmp_path):
    # "AFW_Flip/x" and "AFW/Flip_x" both sanitise to "300w_lp_AFW_Flip_x" (only in an odd tree):
    # both samples must survive, with distinct keys.
    root, ref = _copy_sample(sample_tree, tmp_path, "300w_lp", W300_SOURCE)
    (root / "AFW_Flip").mkdir()
    for suffix in (".jpg", ".mat"):
        shutil.copyfile((root / W300_SOURCE).with_suffix(suffix), root / "AFW_Flip" / f"AFW_1000207_1_0{suffix}")
        shutil.copyfile((root / W300_SOURCE).with_suffix(suffix), root / "AFW" / f"Flip_AFW_1000207_1_0{suffix}")
    refs = w300lp.list_samples(root)
    keys = [r.key for r in refs]
    assert len(refs) == 3 and len(set(keys)) == 3
    assert ref in refs  # the sample whose key collides with nothing keeps its key
    assert sum(k.startswith("300w_lp_AFW_Flip_AFW_1000207_1_0-") for k in keys) == 2


@pytest.mark.parametrize("problem,reason", [("no_pose", "missing_key"), ("bad_pt2d", "bad_shape"),
                                            ("nan_pose", "nan_label"), ("text_pose", "bad_shape"),
                                            ("inf_scale", "nan_label"), ("nan_translation", "nan_label"),
                                            ("huge_pitch", "bad_pose"), ("yaw_past_180", "bad_pose")])
def test_bad_mat_content(sample_tree, tmp_path, aflw_source, problem, reason):
    import scipy.io

    root, ref = _copy_sample(sample_tree, tmp_path, AFLW_NAME, aflw_source)
    mat_path = (root / aflw_source).with_suffix(".mat")
    arrays = {k: v for k, v in scipy.io.loadmat(str(mat_path)).items() if not k.startswith("__")}
    if problem == "no_pose":
        del arrays["Pose_Para"]
    elif problem == "bad_pt2d":
        arrays["pt2d"] = arrays["pt2d"][:, :20]
    elif problem == "nan_pose":
        arrays["Pose_Para"][0, 1] = np.nan
    elif problem == "inf_scale":  # not an angle, but written into the record (JSON has no inf)
        arrays["Pose_Para"][0, 6] = np.inf
    elif problem == "nan_translation":
        arrays["Pose_Para"][0, 4] = np.nan
    elif problem == "huge_pitch":  # was written as pitch 5.7e31 beside a rotation of a few degrees
        arrays["Pose_Para"][0, 0] = 1e30
    elif problem == "yaw_past_180":
        arrays["Pose_Para"][0, 1] = np.radians(181.0)
    else:
        arrays["Pose_Para"] = np.array(["abc"])
    matfile.write_mat(mat_path, arrays)
    err = _expect_error(AFLW_NAME, root, ref, reason, mat_path.name)
    assert "re-download or re-extract" in err.message or reason == "missing_key"
    if reason == "bad_pose":
        assert re.search(r"Pose_Para gives (pitch 5\.72958e\+31|yaw 181) degrees, past ±180", err.message), err.message


def test_unreadable_and_wrong_size_image(sample_tree, tmp_path, capfd):
    import cv2

    root, ref = _copy_sample(sample_tree, tmp_path, "300w_lp", W300_SOURCE)
    image = root / W300_SOURCE
    good = image.read_bytes()
    image.write_bytes(good[:200])
    _expect_error("300w_lp", root, ref, "unreadable_image", "300W_LP/" + W300_SOURCE)
    middle = (good.index(b"\xff\xda") + len(good)) // 2  # a stray marker in the picture data
    image.write_bytes(good[:middle] + b"\xff\xd9" + good[middle + 2:])
    assert cv2.imread(str(image)) is not None  # OpenCV would decode it, with gray or garbled blocks
    capfd.readouterr()
    _expect_error("300w_lp", root, ref, "corrupt_image", "300W_LP/" + W300_SOURCE)
    assert "Corrupt JPEG" not in capfd.readouterr().err  # no warning without the file's name
    image.write_bytes(b"")
    _expect_error("300w_lp", root, ref, "unreadable_image", "300W_LP/" + W300_SOURCE)
    for ext in (".bmp", ".tiff"):  # another format under the name, cut short: OpenCV logged lines naming no file
        data = cv2.imencode(ext, np.full((450, 450, 3), 128, np.uint8))[1].tobytes()
        image.write_bytes(data[:len(data) // 3])
        capfd.readouterr()
        _expect_error("300w_lp", root, ref, "unreadable_image", "300W_LP/" + W300_SOURCE)
        assert capfd.readouterr().err == "", ext
    cv2.imwrite(str(image), np.zeros((300, 300, 3), np.uint8))
    _expect_error("300w_lp", root, ref, "wrong_image_size", "300W_LP/" + W300_SOURCE)
    image.unlink()
    _expect_error("300w_lp", root, ref, "missing_image", "300W_LP/" + W300_SOURCE)


def test_biwi_missing_pose_is_listed_then_rejected(sample_tree, tmp_path):
    root, ref = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    (root / "03" / "frame_00004_pose.txt").unlink()
    assert [r.source for r in biwi.list_samples(root)] == [BIWI_SOURCE]
    _expect_error("biwi", root, ref, "missing_pose", "hpdb/03/frame_00004_pose.txt")


@pytest.mark.parametrize("text,reason", [
    ("1 0 0 \n0 1 0 \n0 0 1 \n\n10 20 \n\n", "bad_pose"),
    ("1 0 0 \n0 1 0 \n0 0 x \n\n10 20 900 \n\n", "bad_pose"),
    ("2 0 0 \n0 1 0 \n0 0 1 \n\n10 20 900 \n\n", "not_rotation"),
    ("-1 0 0 \n0 1 0 \n0 0 1 \n\n10 20 900 \n\n", "not_rotation"),
    ("1 0 0 \n0 1 0 \n0 0 nan \n\n10 20 900 \n\n", "bad_pose"),
    ("1 0 0 \n0 1 0 \n0 0 1 \n\n10 20 -900 \n\n", "bad_pose"),
    ("1 0 0 \n0 1 0 \n0 0 1 \n\n10 20 9_00 \n\n", "bad_pose"),  # Python's float() reads 900
    ("1 0 0 \n0 1 0 \n0 0 1 \n\n10 20 0x1p10 \n\n", "bad_pose"),
])
def test_biwi_bad_pose(sample_tree, tmp_path, text, reason):
    root, ref = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    (root / "03" / "frame_00004_pose.txt").write_text(text)
    _expect_error("biwi", root, ref, reason, "hpdb/03/frame_00004_pose.txt")


def test_biwi_truncated_depth_and_bad_calibration(sample_tree, tmp_path):
    root, ref = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    depth = root / "03" / "frame_00004_depth.bin"
    data = depth.read_bytes()
    depth.write_bytes(data[: len(data) // 2])
    _expect_error("biwi", root, ref, "corrupt_depth", "hpdb/03/frame_00004_depth.bin")
    depth.unlink()
    _expect_error("biwi", root, ref, "missing_depth", "hpdb/03/frame_00004_depth.bin")
    depth.write_bytes(data)
    assert biwi.read_sample(root, ref).depth.shape == (480, 640)
    cal = root / "03" / "rgb.cal"
    cal_text = cal.read_text()
    cal.write_text(cal_text.replace("640 480", "640"))
    _expect_error("biwi", root, ref, "bad_calibration", "hpdb/03/rgb.cal")
    cal.write_text(cal_text.replace("640 480", "1e300 1e300"))  # was a 301-digit width in the message
    err = _expect_error("biwi", root, ref, "bad_calibration", "hpdb/03/rgb.cal")
    assert "image size 1e+300 x 1e+300 is not valid (whole numbers from 1 to 16384" in err.message
    cal.write_text(cal_text.replace("640 480", "64_0 480"))
    assert "has a non-number ('64_0')" in _expect_error("biwi", root, ref, "bad_calibration", "hpdb/03/rgb.cal").message
    cal.write_text(cal_text)
    assert biwi.read_sample(root, ref).image.shape == (480, 640, 3)  # the usual numbers still read
    cal.unlink()
    _expect_error("biwi", root, ref, "bad_calibration", "hpdb/03/rgb.cal")


@pytest.mark.parametrize("edit, says", [
    (("575.816 0 320", "575.816 0 5000"), "lies mostly outside the 640 x 480 image"),  # an all-black depth crop
    (("575.816 0 320", "1e9 0 320"), "lies mostly outside"),  # a box of 43 PiB to allocate
    (("575.816 0 320 \n0 575.816", "1e-9 0 320 \n0 1e-9"), "is degenerate"),  # a one-pixel depth window
])
def test_biwi_depth_calibration_that_puts_the_head_off_the_depth_map(sample_tree, tmp_path, edit, says):
    root, ref = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    cal = root / "03" / "depth.cal"
    text = cal.read_text()
    assert edit[0] in text
    cal.write_text(text.replace(edit[0], edit[1], 1))
    err = _expect_error("biwi", root, ref, "bad_calibration", "hpdb/03/depth.cal")
    assert "the head's box in the depth map [" in err.message and says in err.message


@pytest.mark.parametrize("translation", ["0 0 -860.598", "0 0 -2000"])  # the head centre at z 0; behind
def test_a_biwi_depth_calibration_that_puts_the_head_behind_the_depth_camera(sample_tree, tmp_path, translation):
    """At exactly z 0 the box's size divided by zero: a read_error calling itself a dataprep bug."""
    root, ref = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    assert (root / "03" / "frame_00004_pose.txt").read_text().split("\n")[4].split()[2] == "860.598"
    cal = root / "03" / "depth.cal"
    lines = cal.read_text().split("\n")
    assert lines[10] == "0 0 0 "  # T
    lines[10] = translation
    cal.write_text("\n".join(lines))
    err = _expect_error("biwi", root, ref, "bad_calibration", "hpdb/03/depth.cal")
    assert "behind the depth camera" in err.message


@pytest.mark.parametrize("centre", ["3000 0 900", "0 0 40"])  # far to the side; 4 cm from the lens
def test_a_biwi_head_centre_off_both_cameras_pictures_blames_the_pose_file_not_depth_cal(sample_tree, tmp_path,
                                                                                       centre):
    """Was ``bad_calibration`` naming the sound ``depth.cal``: the user was told to restore the .cal files."""
    root, ref = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    pose = root / "03" / "frame_00004_pose.txt"
    lines = pose.read_text().split("\n")
    lines[4] = centre + " "
    pose.write_text("\n".join(lines))
    err = _expect_error("biwi", root, ref, "bad_pose", "hpdb/03/frame_00004_pose.txt")
    assert "puts the head off both cameras' pictures" in err.message and "depth.cal" not in err.message


def _rejected_within(seconds, read, *args):
    """``read(*args)``'s SampleError, failing (not hanging) if the read blocks."""
    import threading

    got = []

    def run():
        try:
            read(*args)
        except SampleError as err:
            got.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the read blocked"
    assert got, "the read was not rejected"
    return got[0]


def test_raw_files_that_are_not_regular_files_are_rejected_not_read(sample_tree, tmp_path, aflw_source):
    """A named pipe where an image, a .mat or a BIWI pose/depth file should be (its reader would
    block forever), a folder, a broken symbolic link: each a rejection naming the file and what it is."""
    import os

    root, ref = _copy_sample(sample_tree, tmp_path, AFLW_NAME, aflw_source)
    image, mat = root / aflw_source, (root / aflw_source).with_suffix(".mat")
    image.unlink()
    os.mkfifo(image)
    err = _rejected_within(20, aflw2000.read_sample, root, ref)
    assert err.reason == "unreadable_image" and "it is a named pipe, not a regular file" in err.message
    image.unlink()
    image.mkdir()  # a folder named like the image: said so, not "[Errno 21] Is a directory: 3"
    err = _rejected_within(20, aflw2000.read_sample, root, ref)
    assert err.reason == "unreadable_image" and "it is a folder, not a regular file" in err.message
    assert "Errno" not in err.message
    image.rmdir()
    image.symlink_to(tmp_path / "gone.jpg")
    err = _rejected_within(20, aflw2000.read_sample, root, ref)
    assert err.reason == "missing_image" and f"(a symbolic link to {tmp_path / 'gone.jpg'}, which does not exist)" in err.message
    image.unlink()
    shutil.copyfile(sample_tree / ROOTS[AFLW_NAME] / aflw_source, image)
    mat_bytes = mat.read_bytes()
    mat.unlink()
    os.mkfifo(mat)
    err = _rejected_within(20, aflw2000.read_sample, root, ref)
    assert err.reason == "unreadable_mat" and "named pipe" in err.message
    mat.unlink()
    upper = Path(aflw_source).with_suffix(".MAT")
    (root / upper).write_bytes(mat_bytes)  # as some unpackers name it
    assert aflw2000.read_sample(root, ref).ref == ref
    assert aflw2000.input_files(root, ref) == [aflw_source, upper.as_posix()]  # what a resumed build watches
    other = root / Path(aflw_source).with_name(Path(aflw_source).stem.upper() + ".jpg")
    (root / upper).rename(other.with_suffix(".mat"))  # IMAGE00111.mat: another sample's label, not this one's
    assert _expect_error(AFLW_NAME, root, ref, "missing_mat", aflw_source.replace(".jpg", ".mat"))
    # the same kinds of path with no .mat beside them are still samples: listed, then rejected
    (root / "pipe.jpg").unlink(missing_ok=True)
    os.mkfifo(root / "pipe.jpg")
    (root / "folder.jpg").mkdir()
    (root / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    listed = {r.source: r for r in aflw2000.list_samples(root)}
    assert {"pipe.jpg", "folder.jpg", "dangling.jpg", "loop.jpg"} <= set(listed)
    for name in ("pipe.jpg", "folder.jpg", "dangling.jpg", "loop.jpg"):
        err = _rejected_within(20, aflw2000.read_sample, root, listed[name])
        assert err.reason in ("missing_mat", "missing_image", "unreadable_image") and name.split(".")[0] in err.message

    root, ref = _copy_sample(sample_tree, tmp_path, "biwi", BIWI_SOURCE)
    for name, reason in (("frame_00004_pose.txt", "bad_pose"), ("frame_00004_depth.bin", "corrupt_depth")):
        path = root / "03" / name
        data = path.read_bytes()
        path.unlink()
        os.mkfifo(path)
        err = _rejected_within(20, biwi.read_sample, root, ref)
        assert err.reason == reason and "named pipe" in err.message and name in err.message, err.message
        path.unlink()
        path.write_bytes(data)
    assert biwi.read_sample(root, ref).ref == ref


def test_unexpected_errors_become_sample_errors(sample_tree, tmp_path):
    root, ref = _copy_sample(sample_tree, tmp_path, "300w_lp", W300_SOURCE)
    bogus = SampleRef("300w_lp", ref.key, "AFW", "AFW")  # a folder where the image should be
    with pytest.raises(SampleError):
        w300lp.read_sample(root, bogus)


# --------------------------------------------------------------------------------------------
# Real files (research-licensed, read only; skipped when absent)
# --------------------------------------------------------------------------------------------
def test_real_read_all(real_samples):
    counts = {}
    for name in sorted(ROOTS):
        reader = get_reader(name)
        root = real_samples / ROOTS[name]
        refs = reader.list_samples(root)
        counts[name] = len(refs)
        for ref in refs:
            s = reader.read_sample(root, ref)
            assert all(np.isfinite([s.yaw, s.pitch, s.roll]))
            x1, y1, x2, y2 = s.boxes["gt"]
            assert 0 <= x1 < x2 <= s.image.shape[1] and 0 <= y1 < y2 <= s.image.shape[0]
            if name == "aflw2000" and s.extra["pt2d_missing"]:
                assert s.boxes["pt2d"][0] == -1.0 and s.boxes["pt2d"][3] == 452.0
                assert s.boxes["gt"][0] > -1 and s.boxes["gt"][3] < 452
    assert counts == {"300w_lp": 4, "aflw2000": 8, "biwi": 1}


def test_real_biwi(real_samples):
    root = real_samples / "hpdb"
    (ref,) = biwi.list_samples(root)
    assert ref.key == "biwi_01_frame_00003_rgb" and ref.source == "01/frame_00003_rgb.png" and ref.group == "01"
    s = biwi.read_sample(root, ref)
    assert (s.pitch, s.yaw, s.roll) == pytest.approx((7.607223, 3.290995, -1.566632), abs=1e-5)
    M, _ = biwi.read_pose_txt(root / "01" / "frame_00003_pose.txt")
    np.testing.assert_allclose(s.rotation, M.T, atol=1e-5)
    assert s.image.shape == (480, 640, 3) and s.depth.shape == (480, 640)
    u, v = (int(round(c)) for c in s.extra["head_center_depth_px"])
    window = s.depth[v - 7:v + 8, u - 7:u + 8]
    assert 800 <= np.median(window[window > 0]) <= 1000
    # the projected head centre lands on the face (MTCNN box 301-385 x 213-319 on this frame)
    cx, cy = s.extra["head_center_rgb_px"]
    assert 301 < cx < 385 and 213 < cy < 319
    assert s.boxes["gt"][2] - s.boxes["gt"][0] == pytest.approx(95.5, abs=1.0)


def test_real_biwi_text_and_depth_reproduced_byte_for_byte(real_samples):
    seq = real_samples / "hpdb" / "01"
    pose = seq / "frame_00003_pose.txt"
    assert biwi.format_pose_txt(*biwi.read_pose_txt(pose)) == pose.read_text()
    for name in ("rgb.cal", "depth.cal"):
        assert biwi.format_cal(biwi.read_cal(seq / name)) == (seq / name).read_text()
    raw = (seq / "frame_00003_depth.bin").read_bytes()
    assert biwi.encode_depth_bin(biwi.read_depth_bin(seq / "frame_00003_depth.bin")) == raw


def test_real_300wlp_flip(real_samples):
    root = real_samples / "300W_LP"
    refs = {r.source: r for r in w300lp.list_samples(root)}
    for source, ref in refs.items():
        if ref.group != "AFW":
            continue
        orig = w300lp.read_sample(root, ref)
        flip = w300lp.read_sample(root, refs["AFW_Flip/" + source.split("/", 1)[1]])
        assert flip.yaw == pytest.approx(-orig.yaw, abs=2.0)
        assert flip.roll == pytest.approx(-orig.roll, abs=2.0)
        assert flip.pitch == pytest.approx(orig.pitch, abs=2.0)
        # the real _Flip points are the original's mirrored in MATLAB coordinates (x -> W + 1 - x),
        # exactly: our flip of the original's landmarks must give the reader's _Flip landmarks
        width = orig.image.shape[1]
        offset = labels.mirror_offset("300w_lp")
        np.testing.assert_allclose(flip.landmarks, labels.mirror_landmarks(orig.landmarks, width, offset), atol=1e-3)
        assert flip.boxes["gt"] == pytest.approx(labels.mirror_box(orig.boxes["gt"], width, offset), abs=1e-3)
        assert flip.landmarks[36, 0] < flip.landmarks[45, 0]


def test_real_300wlp_synthesized_view_carries_the_photos_points(real_samples):
    # documented (README, w300lp): view _1 holds view _0's pt2d unchanged, though its pose differs
    root = real_samples / "300W_LP"
    refs = {r.source: r for r in w300lp.list_samples(root)}
    photo = w300lp.read_sample(root, refs["AFW/AFW_134212_1_0.jpg"])
    view = w300lp.read_sample(root, refs["AFW/AFW_134212_1_1.jpg"])
    assert abs(view.yaw - photo.yaw) > 3.0
    np.testing.assert_array_equal(view.landmarks, photo.landmarks)
    assert view.boxes["gt"] == photo.boxes["gt"]


def test_real_faces_detected_in_gt(real_samples, mtcnn):
    root = real_samples / "hpdb"
    s = biwi.read_sample(root, biwi.list_samples(root)[0])
    boxes, probs = mtcnn.detect(s.image)
    assert _iou(boxes[int(np.argmax(probs))].tolist(), s.boxes["gt"]) > 0.6


@pytest.mark.parametrize("name, source, companion, reason", [
    (AFLW_NAME, None, ".mat", "missing_mat"),
    ("biwi", BIWI_SOURCE, "03/frame_00004_pose.txt", "missing_pose"),
    ("biwi", BIWI_SOURCE, "03/frame_00004_depth.bin", "missing_depth"),
    ("biwi", BIWI_SOURCE, "03/depth.cal", "bad_calibration"),
])
def test_a_broken_link_to_a_label_file_is_named_as_one(sample_tree, tmp_path, aflw_source, name, source, companion, reason):
    """Only images said so: a dangling .mat read "the image has no .mat next to it", a pose or
    calibration file only "not found"."""
    source = source or aflw_source
    root, ref = _copy_sample(sample_tree, tmp_path, name, source)
    path = (root / source).with_suffix(".mat") if companion == ".mat" else root / companion
    path.unlink()
    path.symlink_to(tmp_path / "moved_away")
    err = _expect_error(name, root, ref, reason, path.name)
    assert f"not found (a symbolic link to {tmp_path / 'moved_away'}, which does not exist)" in err.message
    assert "no .mat next to it" not in err.message


def test_a_mat_file_holding_a_variable_twice_is_rejected_quietly(sample_tree, tmp_path, aflw_source, capfd):
    """scipy kept the second ``Pose_Para`` and printed a warning naming no file; the sample was
    written with whichever came last."""
    import io

    import scipy.io

    root, ref = _copy_sample(sample_tree, tmp_path, AFLW_NAME, aflw_source)
    mat_path = (root / aflw_source).with_suffix(".mat")
    arrays = {k: v for k, v in scipy.io.loadmat(str(mat_path)).items() if not k.startswith("__")}
    first, again = io.BytesIO(), io.BytesIO()
    scipy.io.savemat(first, arrays, do_compression=False)
    scipy.io.savemat(again, {"Pose_Para": arrays["Pose_Para"] * 2}, do_compression=False)
    mat_path.write_bytes(first.getvalue() + again.getvalue()[128:])  # a second Pose_Para after the first
    capfd.readouterr()
    err = _expect_error(AFLW_NAME, root, ref, "corrupt_mat", mat_path.name)
    assert 'damaged MAT file (scipy: Duplicate variable name "Pose_Para"' in err.message
    assert capfd.readouterr().err == ""


def test_a_picture_of_the_wrong_size_is_refused_before_it_is_decoded(sample_tree, tmp_path, monkeypatch):
    """The size comes from the file's header: a 20000 x 20000 PNG of a few hundred KB took 2.4 GB to
    decode before it was refused."""
    import struct
    import zlib

    import cv2

    from dataprep import codec

    root, ref = _copy_sample(sample_tree, tmp_path, "300w_lp", W300_SOURCE)
    png = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    png[16:24] = struct.pack(">II", 20000, 20000)  # what IHDR says is what a decoder would allocate
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (root / W300_SOURCE).write_bytes(bytes(png))
    jpeg = cv2.imencode(".jpg", np.zeros((900, 700, 3), np.uint8))[1].tobytes()

    def no_decoding(data):
        raise AssertionError("decoded")

    monkeypatch.setattr(codec, "decode_rgb_checked", no_decoding)
    err = _expect_error("300w_lp", root, ref, "wrong_image_size", W300_SOURCE)
    assert "image is 20000x20000, expected 450x450" in err.message
    (root / W300_SOURCE).write_bytes(jpeg)
    assert "image is 700x900, expected 450x450" in _expect_error("300w_lp", root, ref, "wrong_image_size", W300_SOURCE).message


def test_biwi_depth_centre_and_box_go_through_the_same_depth_calibration(sample_tree, tmp_path):
    """``head_center_depth_px`` is the centre of ``depth_box``: both project the head centre through
    ``depth.cal``'s rotation and translation (the centre skipped them; with BIWI's identity
    ``depth.cal`` the two agree, with any other they drifted apart)."""
    seq = tmp_path / "hpdb" / "01"
    shutil.copytree(sample_tree / "hpdb" / "01", seq)
    lines = (seq / "depth.cal").read_text().splitlines()
    lines[-3] = "12 -8 0 "  # T, mm: a depth camera shifted from the reference frame
    (seq / "depth.cal").write_text("\n".join(lines) + "\n")
    root = tmp_path / "hpdb"
    ref = biwi.list_samples(root)[0]
    s = biwi.read_sample(root, ref)
    x1, y1, x2, y2 = s.extra["depth_box"]
    assert s.extra["head_center_depth_px"] == pytest.approx([(x1 + x2) / 2, (y1 + y2) / 2], abs=1e-9)
    t = np.asarray(s.extra["head_center_mm"])
    fx = float(lines[0].split()[0])
    shifted = (t[0] + 12) / t[2] * fx  # u - cx of the centre after T
    assert s.extra["head_center_depth_px"][0] - 320 == pytest.approx(shifted, abs=1e-6)
