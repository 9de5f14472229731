"""``dataprep audit`` on builds of the generated sample AFLW2000: flags, CSV values (checked by hand
arithmetic, not by the helpers the audit uses), the HTML's references, and --compare."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from dataprep.audit import Thresholds, run_audit
from dataprep.audit.pictures import pose_axes
from dataprep.audit.table import Sample, sample_row
from dataprep.build import BuildOptions, build
from dataprep.cli import main as cli_main
from shard_reading import label_records


def read_csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["key"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def audited(sample_tree, tmp_path_factory):
    """Square and Hopenet-rule builds of the sample AFLW2000; the Hopenet one audited with --compare
    against the square one (through the CLI), the square one audited on its own."""
    base = tmp_path_factory.mktemp("audit")
    root = sample_tree / "AFLW2000"
    outs = {}
    for rule in ("square", "hopenet", "fsanet"):
        outs[rule] = base / rule
        build(BuildOptions(dataset="aflw2000", root=str(root), out=str(outs[rule]), crop_rule=rule, progress=False))
    report_hn = base / "report_hopenet"
    assert cli_main(["audit", str(outs["hopenet"]), "--report", str(report_hn), "--compare", str(outs["square"]),
                     "--per-flag", "3"]) == 0
    report_sq = base / "report_square"
    summary_sq = run_audit(outs["square"], report_sq, per_flag=2)
    expected = json.loads((sample_tree / "expected_labels.json").read_text())["aflw2000"]
    return {"outs": outs, "report_hn": report_hn, "report_sq": report_sq, "summary_sq": summary_sq,
            "expected": {e["key"]: e for e in expected}}


def flags(row: dict) -> set[str]:
    return set(filter(None, row["flags"].split(";")))


def test_placeholder_and_outside_flags(audited):
    rows = read_csv(audited["report_hn"] / "boxes.csv")
    written = {k: r for k, r in rows.items() if r["status"] == "written"}
    assert written
    placeholders = {k for k, e in audited["expected"].items() if e["pt2d_missing"] and k in written}
    assert placeholders, "the sample AFLW2000 has samples with placeholder landmarks"
    for key, row in written.items():
        assert ("placeholder_box" in flags(row)) == (key in placeholders), key
        assert int(row["pt2d_missing"]) == audited["expected"][key]["pt2d_missing"]
    # the face hanging over the left border: gt box starts left of x = 0
    off = [k for k, e in audited["expected"].items() if e["gt_box"][0] < 0 and k in written]
    assert off
    for key in off:
        assert "outside_image" in flags(written[key])
        assert "gt" in written[key]["outside_boxes"].split(";")
    # placeholder-polluted pt2d boxes alone do not make outside_image
    for key in placeholders - set(off):
        assert "outside_image" not in flags(written[key])


def test_rejected_rows(audited):
    rows = read_csv(audited["report_hn"] / "boxes.csv")
    out_of_range = {k for k, e in audited["expected"].items() if not e["in_range"]}
    rejected = {k: r for k, r in rows.items() if r["status"] == "rejected"}
    assert set(rejected) == out_of_range
    for row in rejected.values():
        assert flags(row) == {"rejected"}
        assert row["reason"] == "angle_out_of_range" and row["message"]



def test_padded_flag_counts_the_black_share_of_each_stored_crop(audited, sample_tree, tmp_path, capsys):
    """A --margin 0.8 build's crops reach past the image for faces near a border: the share of each
    stored crop outside the image (black in its JPEG) is in boxes.csv as crop_padding, by hand
    arithmetic here, and over --padding-threshold it is flagged."""
    out = tmp_path / "m08"
    build(BuildOptions(dataset="aflw2000", root=str(sample_tree / "AFLW2000"), out=str(out), margin=0.8, progress=False))
    shares = {}
    for key, rec in label_records(out).items():
        x1, y1, x2, y2 = rec["crop"]
        w, h = rec["image_size"]
        inside = max(0, min(x2, w) - max(x1, 0)) * max(0, min(y2, h) - max(y1, 0))
        shares[key] = 1.0 - inside / ((x2 - x1) * (y2 - y1))
    assert max(shares.values()) > 0.25 and min(shares.values()) < 0.25  # the sample data has both kinds
    report = tmp_path / "report"
    assert cli_main(["audit", str(out), "--report", str(report), "--padding-threshold", "0.25"]) == 0
    assert re.search(r"padded\s+" + str(sum(v > 0.25 for v in shares.values())) + "\n", capsys.readouterr().out)
    rows = read_csv(report / "boxes.csv")
    for key, share in shares.items():
        assert float(rows[key]["crop_padding"]) == pytest.approx(share, abs=1e-6), key
        assert ("padded" in flags(rows[key])) == (share > 0.25), key
    html = (report / "report.html").read_text()
    assert 'id="flag-padded"' in html and "outside the image" in html
    # the tight square build's crops are far less padded, and its table says what the rules would give
    square = read_csv(audited["report_sq"] / "boxes.csv")
    written = [r for r in square.values() if r["status"] == "written"]
    assert max(float(r["crop_padding"]) for r in written) < max(shares.values())
    for r in written:
        assert 0.0 <= float(r["hopenet_padding"]) <= 1.0 and 0.0 <= float(r["fsanet_padding"]) <= 1.0

def test_fsanet_build_is_squashed_square_and_hopenet_builds_are_not(audited, tmp_path):
    # FSA-Net resizes its margin window straight to 64 x 64; Hopenet's transforms cut a square
    th = Thresholds().squash
    report_fs = tmp_path / "report_fsanet"
    summary_fs = run_audit(audited["outs"]["fsanet"], report_fs, pictures=False)
    fs = read_csv(report_fs / "boxes.csv")
    squashed = set()
    for key, rec in label_records(audited["outs"]["fsanet"]).items():
        x1, y1, x2, y2 = rec["crop"]
        w, h = x2 - x1, y2 - y1
        distortion = max(w, h) / min(w, h) - 1.0
        assert float(fs[key]["crop_distortion"]) == pytest.approx(distortion, abs=1e-5)
        if distortion > th:
            squashed.add(key)
    assert squashed, "FSA-Net's margin window is not square"
    assert {k for k, r in fs.items() if "squashed" in flags(r)} == squashed
    assert summary_fs["flags"]["squashed"] == len(squashed)

    hn = read_csv(audited["report_hn"] / "boxes.csv")
    for key, rec in label_records(audited["outs"]["hopenet"]).items():
        x1, y1, x2, y2 = rec["crop"]
        assert x2 - x1 == y2 - y1, key  # the square Hopenet's network sees
        assert float(hn[key]["hopenet_distortion"]) < 0.01 and "squashed" not in flags(hn[key])
    sq = read_csv(audited["report_sq"] / "boxes.csv")
    assert not [k for k, r in sq.items() if "squashed" in flags(r)]
    assert audited["summary_sq"]["flags"]["squashed"] == 0
    assert audited["summary_sq"]["flags"]["placeholder_box"] > 0  # the records still carry the pt2d box
    # ... but the square build's table still says what the FSA-Net rule would have done
    assert max(float(r["fsanet_distortion"]) for r in sq.values() if r["status"] == "written") > th


def test_csv_values_by_hand(audited):
    """One placeholder sample: IoU, aspect, centre shift and each rule's distortion by explicit arithmetic."""
    recs = label_records(audited["outs"]["hopenet"])
    rows = read_csv(audited["report_hn"] / "boxes.csv")
    key = next(k for k in sorted(recs) if recs[k]["extra"]["pt2d_missing"] > 0)
    rec, row = recs[key], rows[key]
    gx1, gy1, gx2, gy2 = rec["boxes"]["gt"]
    px1, py1, px2, py2 = rec["boxes"]["pt2d"]
    for name, box in (("gt", rec["boxes"]["gt"]), ("pt2d", rec["boxes"]["pt2d"])):
        for i, c in enumerate(("x1", "y1", "x2", "y2")):
            assert float(row[f"{name}_{c}"]) == pytest.approx(box[i], abs=1e-5)

    inter_w = max(0.0, min(gx2, px2) - max(gx1, px1))
    inter_h = max(0.0, min(gy2, py2) - max(gy1, py1))
    inter = inter_w * inter_h
    union = (gx2 - gx1) * (gy2 - gy1) + (px2 - px1) * (py2 - py1) - inter
    assert float(row["iou_gt_pt2d"]) == pytest.approx(inter / union, abs=1e-5)
    assert float(row["iou_gt_pt2d"]) < 0.7  # the placeholder stretches the box
    assert float(row["gt_aspect"]) == pytest.approx((gx2 - gx1) / (gy2 - gy1), abs=1e-5)
    assert float(row["pt2d_aspect"]) == pytest.approx((px2 - px1) / (py2 - py1), abs=1e-5)
    shift = math.hypot((gx1 + gx2) / 2 - (px1 + px2) / 2, (gy1 + gy2) / 2 - (py1 + py2) / 2)
    assert float(row["shift_gt_pt2d"]) == pytest.approx(shift, abs=1e-4)

    # square rule reads gt: a square, no distortion
    assert row["square_box"] == "gt" and float(row["square_distortion"]) == pytest.approx(0.0, abs=1e-6)
    # Hopenet rule reads pt2d, k = 0.2 on AFLW2000, sides and top by 2k, corners updated one after
    # the other (Hopenet's AFLW2000 class); its test transforms then take the centred square of
    # the shorter side (Scale(224), CenterCrop(224))
    assert row["hopenet_box"] == "pt2d"
    k = 0.2
    x1 = px1 - 2 * k * abs(px2 - px1)
    y1 = py1 - 2 * k * abs(py2 - py1)
    x2 = px2 + 2 * k * abs(px2 - x1)
    y2 = py2 + 0.6 * k * abs(py2 - y1)
    side = min(x2 - x1, y2 - y1)
    x1, y1 = x1 + (x2 - x1 - side) / 2, y1 + (y2 - y1 - side) / 2
    for c, v in zip(("x1", "y1", "x2", "y2"), (x1, y1, x1 + side, y1 + side)):
        assert float(row[f"hopenet_{c}"]) == pytest.approx(v, abs=1e-4)
    assert float(row["hopenet_aspect"]) == pytest.approx(1.0, abs=1e-5)
    assert float(row["hopenet_distortion"]) == pytest.approx(0.0, abs=1e-5)
    # FSA-Net rule reads its own pt2d box (placeholders dropped); integer box, 0.6 margins, clipped
    assert row["fsanet_box"] == "pt2d_valid"
    W, H = rec["image_size"]
    vx1, vy1, vx2, vy2 = rec["boxes"]["pt2d_valid"]
    assert vx1 >= 0 and vy2 <= H  # no placeholder in FSA-Net's box
    ix1, iy1, ix2, iy2 = int(vx1), int(vy1), int(vx2), int(vy2)
    bw, bh = ix2 - ix1, iy2 - iy1
    fx1, fy1 = max(int(ix1 - 0.6 * bw), 0), max(int(iy1 - 0.6 * bh), 0)
    fx2, fy2 = min(int(ix2 + 0.6 * bw), W - 1), min(int(iy2 + 0.6 * bh), H - 1)
    fw, fh = fx2 - fx1, fy2 - fy1
    assert float(row["fsanet_distortion"]) == pytest.approx(max(fw, fh) / min(fw, fh) - 1, abs=1e-5)
    # and the yaw/pitch/roll are the record's
    for a in ("yaw", "pitch", "roll"):
        assert float(row[a]) == pytest.approx(rec[a], abs=1e-5)


def test_html_references_exist_and_are_local(audited):
    for report in (audited["report_hn"], audited["report_sq"]):
        page = (report / "report.html").read_text()
        assert not re.search(r"https?://|//[a-z]", page), "the page must open offline"
        refs = re.findall(r'(?:src|href)="([^"]+)"', page)
        files = [r for r in refs if not r.startswith("#")]
        assert any(r.endswith(".png") for r in files) and "boxes.csv" in files
        for ref in files:
            assert not ref.startswith(("/", "data:")) or ref.startswith("data:image/"), ref
            if not ref.startswith("data:"):
                assert (report / ref).is_file(), f"{ref} referenced by report.html is missing"
        for anchor in (r[1:] for r in refs if r.startswith("#")):
            assert f'id="{anchor}"' in page, anchor
    hn_page = (audited["report_hn"] / "report.html").read_text()
    for flag in ("placeholder_box", "outside_image", "rejected"):
        assert f"sheets/{flag}.png" in hn_page
    assert "hist_angles.png" in hn_page and "hist_aspect.png" in hn_page and "hist_iou.png" in hn_page


def test_compare_reports_box_changes_and_no_label_changes(audited):
    with open(audited["report_hn"] / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    matched = [r for r in rows if r["key_a"] and r["key_b"]]
    assert len(matched) == len(label_records(audited["outs"]["square"]))
    for r in matched:
        assert r["status"] == "changed"
        changes = set(r["changes"].split(";"))
        assert {"box_source", "box", "crop", "crop_rule"} <= changes
        assert "label" not in changes
        assert float(r["max_angle_diff"]) == 0.0
        assert (r["box_source_a"], r["box_source_b"]) == ("pt2d", "gt")
    assert not [r for r in rows if r["status"] in ("added", "dropped")]
    assert {r["status"] for r in rows if not r["key_a"]} == {"rejected_in_both"}
    page = (audited["report_hn"] / "report.html").read_text()
    assert 'id="compare"' in page and "sheets/compare_changed.png" in page and "compare.csv" in page


def test_compare_names_the_settings_no_record_shows(audited, sample_tree, tmp_path, capsys):
    """Crops of another size and JPEG quality over the same windows: every sample changes its
    crop_size, and the settings that differ are said (the JPEG quality is in no record)."""
    other = tmp_path / "big"
    build(BuildOptions(dataset="aflw2000", root=str(sample_tree / "AFLW2000"), out=str(other), crop_size=320,
                       jpeg_quality=80, progress=False))
    report = tmp_path / "report"
    capsys.readouterr()
    assert cli_main(["audit", str(other), "--report", str(report), "--compare", str(audited["outs"]["square"])]) == 0
    out = capsys.readouterr().out
    assert "compare: settings differ (A vs B): crop_size 320 vs 224, jpeg_quality 80 vs 95" in out
    with open(report / "compare.csv", newline="") as f:
        matched = [r for r in csv.DictReader(f) if r["key_a"] and r["key_b"]]
    assert matched and all(r["changes"] == "crop_size" and (r["crop_size_a"], r["crop_size_b"]) == ("320x320", "224x224")
                           for r in matched)
    page = (report / "report.html").read_text()
    assert "setting (differs)" in page and "jpeg_quality" in page


def test_cropscale_variants_count_their_window_outside_the_crop_they_were_cut_from(sample_tree, tmp_path):
    """A cropscale variant is cut from the stored crop: where its window leaves that crop the JPEG
    is black, though the source image goes on there. crop_padding counts it (it said 0 for variants
    up to 27% black, so `padded` missed them)."""
    out = tmp_path / "cs"
    build(BuildOptions(dataset="aflw2000", root=str(sample_tree / "AFLW2000"), out=str(out), protocol="none",
                       augment=("cropscale",), progress=False))
    records = label_records(out)
    report = tmp_path / "report"
    assert cli_main(["audit", str(out), "--report", str(report), "--per-flag", "0"]) == 0
    rows = read_csv(report / "boxes.csv")
    variants = [k for k in records if k.endswith("_cropscale")]
    assert variants
    shares = {}
    for key in variants:
        x1, y1, x2, y2 = records[key]["crop"]
        bx1, by1, bx2, by2 = records[key[:-len("_cropscale")]]["crop"]  # the sample it was cut from
        w, h = records[key]["image_size"]
        real = max(0, min(x2, bx2, w) - max(x1, bx1, 0)) * max(0, min(y2, by2, h) - max(y1, by1, 0))
        shares[key] = 1.0 - real / ((x2 - x1) * (y2 - y1))
        assert float(rows[key]["crop_padding"]) == pytest.approx(shares[key], abs=1e-6), key
    assert max(shares.values()) > 0.05  # windows that reach past their crop: the case this is about


def test_compare_finds_offline_variants_drawn_with_another_seed(sample_tree, tmp_path, capsys):
    """Two --augment builds that differ only in --seed: the same samples and ops, but each blur
    variant drew another sigma (other pixels); compare names them and the seed (it said "same")."""
    outs = {}
    for seed in (0, 1):
        outs[seed] = tmp_path / f"seed{seed}"
        build(BuildOptions(dataset="aflw2000", root=str(sample_tree / "AFLW2000"), out=str(outs[seed]), protocol="none",
                           augment=("blur",), seed=seed, progress=False))
    report = tmp_path / "report"
    capsys.readouterr()
    assert cli_main(["audit", str(outs[0]), "--report", str(report), "--compare", str(outs[1]), "--per-flag", "0"]) == 0
    assert "compare: settings differ (A vs B): seed 0 vs 1" in capsys.readouterr().out
    assert cli_main(["audit", str(outs[0]), "--report", str(tmp_path / "self"), "--compare", str(outs[0]),
                     "--per-flag", "0"]) == 0
    assert "; changes: none; max angle difference 0 deg" in capsys.readouterr().out  # it said "changes: ;"
    with open(report / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    originals = [r for r in rows if not r["augment"]]
    variants = [r for r in rows if r["augment"] == "blur"]
    assert originals and len(variants) == len(originals)
    assert all(r["status"] == "same" for r in originals)
    sigmas = {seed: {k: r["augment"][-1]["sigma"] for k, r in label_records(out).items() if r["augment"]}
              for seed, out in outs.items()}
    for r in variants:
        differs = sigmas[0][r["key_a"]] != sigmas[1][r["key_b"]]
        assert differs, r["key_a"]  # the seeds draw other sigmas for every sample here
        assert (r["status"], r["changes"]) == ("changed", "augment"), r


def test_pictures_fall_back_to_stored_crops(audited, tmp_path):
    # the raw tree the build read has moved away (a --raw-root given by hand must exist: tested above)
    import shutil

    moved = tmp_path / "build"
    shutil.copytree(audited["outs"]["hopenet"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["input"]["root"] = str(tmp_path / "missing")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    summary = run_audit(moved, tmp_path / "r", per_flag=1)
    page = (tmp_path / "r" / "report.html").read_text()
    assert "not found (pictures drawn on the stored crops)" in page
    assert (tmp_path / "r" / "sheets" / "placeholder_box.png").is_file()
    assert summary["flags"]["placeholder_box"] > 0


def test_raw_pictures_past_the_size_limit_are_not_decoded(sample_tree, tmp_path, monkeypatch):
    """Raw files the build rejected by their header's size unread (wrong_image_size): a picture of
    10000 x 10000 px in a few KB is not decoded for the rejected sheet (a 2 MB one of 12000 x 12000
    took 8 GB and a minute); a merely large one is drawn, shrunk to the sheet's panel."""
    import shutil

    import cv2

    from dataprep import codec
    from dataprep.audit import pictures as pics
    from dataprep.codec import MAX_DECODE_PIXELS

    root = tmp_path / "AFLW2000"
    shutil.copytree(sample_tree / "AFLW2000", root)
    jpgs = sorted(root.glob("*.jpg"))
    ok, small = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))
    huge = bytearray(small.tobytes())
    sof = huge.index(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height, width
    huge[sof + 5:sof + 9] = (10000).to_bytes(2, "big") * 2
    jpgs[0].write_bytes(bytes(huge))
    cv2.imwrite(str(jpgs[1]), np.full((800, 1000, 3), 90, np.uint8))
    out = tmp_path / "build"
    build(BuildOptions(dataset="aflw2000", root=str(root), out=str(out), protocol="none", progress=False))
    assert {e["reason"] for e in json.loads((out / "manifest.json").read_text())["rejected"]} == {"wrong_image_size"}

    decoded = []
    decode = codec.decode_rgb_checked
    monkeypatch.setattr(codec, "decode_rgb_checked", lambda data: decoded.append(codec.header_size(data)) or decode(data))
    run_audit(out, tmp_path / "report", per_flag=6)
    assert (10000, 10000) not in decoded and decoded
    assert all(w * h <= MAX_DECODE_PIXELS for w, h in decoded)
    assert (tmp_path / "report" / "sheets" / "rejected.png").is_file()
    shown = pics.rejected_sheet_row(pics.Row({"key": "k", "source": jpgs[1].name}, [], {}), root)
    assert max(shown.view.image.shape[:2]) == 3 * pics.THUMB
    assert pics.rejected_sheet_row(pics.Row({"key": "k", "source": jpgs[0].name}, [], {}), root) is None


def test_pose_axes_are_hopenets_draw_axis():
    """The documented projection draws exactly Hopenet's utils.draw_axis lines."""
    rng = np.random.default_rng(0)
    for yaw, pitch, roll in rng.uniform(-80, 80, (20, 3)):
        p, y, r = np.radians(pitch), -np.radians(yaw), np.radians(roll)
        hopenet = np.array([
            [np.cos(y) * np.cos(r), np.cos(p) * np.sin(r) + np.cos(r) * np.sin(p) * np.sin(y)],
            [-np.cos(y) * np.sin(r), np.cos(p) * np.cos(r) - np.sin(p) * np.sin(y) * np.sin(r)],
            [np.sin(y), -np.cos(y) * np.sin(p)],
        ])
        np.testing.assert_allclose(pose_axes(yaw, pitch, roll), hopenet, atol=1e-12)
    # positive yaw turns the nose line to the image's left, positive pitch lifts it (image y down)
    assert pose_axes(30, 0, 0)[2, 0] < 0 and pose_axes(0, 30, 0)[2, 1] < 0


def test_biwi_style_record_flags():
    """A detector build's record: rules read the detector box; a reused box off the face is flagged."""
    rec = {
        "key": "biwi_01_frame_00004_rgb", "dataset": "biwi", "split": "train", "source": "01/frame_00004_rgb.png",
        "yaw": 1.0, "pitch": 2.0, "roll": 3.0, "image_size": [640, 480],
        "boxes": {"gt": [300.0, 200.0, 400.0, 300.0], "mtcnn": [100.0, 150.0, 180.0, 250.0]},
        "box_scores": {"mtcnn": 0.99}, "box_source": "mtcnn", "box": [100.0, 150.0, 180.0, 250.0],
        "crop_rule": "square", "crop_margin": 0.0, "crop": [90, 150, 190, 250], "tracking": {"mode": "previous", "reused": True},
        "extra": {},
    }
    row = sample_row(Sample(rec, Path("x.tar")), ["gt", "mtcnn"], Thresholds())
    assert set(row.flags) == {"reused_box", "detector_disagrees"}
    assert row.values["square_box"] == row.values["hopenet_box"] == row.values["fsanet_box"] == "mtcnn"
    assert row.values["iou_gt_mtcnn"] == 0.0 and row.values["tracking_reused"] == 1
    # hopenet on BIWI: k = 0.35, top grows by k (not 2k), sides by 0.6k; then the centred square
    x1, y1, x2, y2 = rec["box"]
    lx1, ly1 = x1 - 0.21 * (x2 - x1), y1 - 0.35 * (y2 - y1)
    lx2, ly2 = x2 + 0.21 * (x2 - lx1), y2 + 0.21 * (y2 - ly1)
    side = min(lx2 - lx1, ly2 - ly1)
    assert row.values["hopenet_y1"] == pytest.approx(ly1 + (ly2 - ly1 - side) / 2)
    assert row.values["hopenet_x1"] == pytest.approx(lx1 + (lx2 - lx1 - side) / 2)
    rec["boxes"]["mtcnn"] = rec["box"] = [305.0, 205.0, 398.0, 302.0]
    rec["tracking"]["reused"] = False
    row = sample_row(Sample(rec, Path("x.tar")), ["gt", "mtcnn"], Thresholds())
    assert row.flags == []


def test_audit_mistakes_are_one_line_and_reports_do_not_mix(audited, tmp_path, capsys):
    import shutil

    square, hopenet = audited["outs"]["square"], audited["outs"]["hopenet"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["audit", str(square), "--report", str(a_file)], "is a file; give a folder"),
        (["audit", str(square), "--report", str(tmp_path / "r1"), "--raw-root", str(tmp_path / "nope")],
         "--raw-root .*nope is not a folder"),
    ]
    broken = tmp_path / "broken"
    shutil.copytree(square, broken)
    shard = next(broken.glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:3000])
    cases.append((["audit", str(broken), "--report", str(tmp_path / "r2")], r"is not a readable shard .*dataprep verify"))
    bad_manifest = tmp_path / "bad_manifest"
    shutil.copytree(square, bad_manifest)
    (bad_manifest / "manifest.json").write_text("{not json")
    cases.append((["audit", str(bad_manifest), "--report", str(tmp_path / "r3")], "is not valid JSON"))
    for n, text in enumerate(("[]", '{"counts": {}}', '{"shards": [3]}')):  # JSON, but no build's manifest
        odd = tmp_path / f"odd_manifest{n}"
        shutil.copytree(square, odd)
        (odd / "manifest.json").write_text(text)
        cases.append((["audit", str(odd), "--report", str(tmp_path / f"r4{n}")], "is not a dataprep build manifest"))
    missing = tmp_path / "missing_shard"
    shutil.copytree(square, missing)
    next(missing.glob("*.tar")).unlink()
    cases.append((["audit", str(missing), "--report", str(tmp_path / "r5")],
                  r"is listed in .* but missing; run `dataprep verify .*` and rerun the build"))
    cases.append((["audit", str(tmp_path / "nowhere"), "--report", str(tmp_path / "r6")], "nowhere does not exist"))
    # the report written into the shards' folder, or a --raw-root that exists but is another folder
    cases.append((["audit", str(square), "--report", str(square)], r"is the build's folder; give a folder of its own"))
    cases.append((["audit", str(hopenet), "--report", str(square), "--compare", str(square)], r"is --compare's folder"))
    cases.append((["audit", str(hopenet), "--report", str(audited["outs"]["fsanet"])],
                  r"holds another build \(manifest.json\); give a folder of its own"))
    cases.append((["audit", str(square), "--report", str(tmp_path / "r7"), "--raw-root", str(tmp_path)],
                  r"holds none of the build's raw files \(no .*\.jpg\); give the dataset folder the build read \(its --root was .*AFLW2000\)"))
    for argv, message in cases:
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r7").exists()  # nothing written for a wrong --raw-root
    for folder in (square, audited["outs"]["fsanet"]):
        assert not (folder / "report.html").exists() and not (folder / "boxes.csv").exists()

    # A report folder reused for a build without --compare keeps nothing of the earlier compare.
    report = tmp_path / "reused"
    assert cli_main(["audit", str(hopenet), "--report", str(report), "--compare", str(square)]) == 0
    assert (report / "compare.csv").exists() and (report / "sheets" / "compare_changed.png").exists()
    assert cli_main(["audit", str(square), "--report", str(report)]) == 0
    assert not (report / "compare.csv").exists() and not (report / "sheets" / "compare_changed.png").exists()


def test_compare_statuses_of_samples_one_build_never_saw(audited, tmp_path):
    from dataprep.audit.compare import compare_builds
    from dataprep.audit.table import load_build

    a = load_build(audited["outs"]["hopenet"])
    b = load_build(audited["outs"]["square"])
    assert a.rejected and b.rejected
    b.manifest["rejected"] = []  # as if B's raw tree lacked those files
    statuses = {r.values["match"]: r.status for r in compare_builds(a, b)}
    assert {statuses[e["source"]] for e in a.rejected} == {"rejected_in_a"}
    statuses = {r.values["match"]: r.status for r in compare_builds(b, a)}
    assert {statuses[e["source"]] for e in a.rejected} == {"rejected_in_b"}


def test_compare_says_when_the_builds_read_different_raw_files(audited, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(audited["outs"]["square"], other)
    report = tmp_path / "report"
    assert cli_main(["audit", str(audited["outs"]["hopenet"]), "--report", str(report), "--compare", str(other),
                     "--per-flag", "1"]) == 0
    assert "different raw files" not in capsys.readouterr().out  # the same download
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["input"]["fingerprint"] = "0" * 64  # made before label files were hashed: cannot tell
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert cli_main(["audit", str(audited["outs"]["hopenet"]), "--report", str(report), "--compare", str(other),
                     "--per-flag", "1"]) == 0
    assert "different raw files" not in capsys.readouterr().out
    manifest["input"]["fingerprint"] = "files-v2:" + "0" * 64  # as if built from another copy, one .mat changed
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert cli_main(["audit", str(audited["outs"]["hopenet"]), "--report", str(report), "--compare", str(other),
                     "--per-flag", "1"]) == 0
    assert "compare: note: the two builds read different raw files" in capsys.readouterr().out
    assert "read different raw files" in (report / "report.html").read_text()


def test_compare_of_another_dataset_is_refused_before_anything_is_written(audited, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(audited["outs"]["square"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["dataset"] = "300w_lp"
    (other / "manifest.json").write_text(json.dumps(manifest))
    report = tmp_path / "report"
    assert cli_main(["audit", str(audited["outs"]["hopenet"]), "--report", str(report), "--compare", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--compare diffs two builds of the same raw data" in err and "aflw2000" in err and "300w_lp" in err
    assert not report.exists()  # no half-written report of the build alone


@pytest.mark.parametrize("option, value, message", [
    ("--padding-threshold", "1.5", "give a value from 0 to 1"),
    ("--detector-iou", "-0.1", "give 0 or more"),
    ("--placeholder-iou", "2", "give a value from 0 to 1"),
    ("--squash-threshold", "nan", "give 0 or more"),
    ("--outside-tolerance", "-3", "give 0 or more"),
    ("--label-tolerance", "x", "is not a number"),
    ("--box-tolerance", "-1", "give 0 or more"),
    ("--per-flag", "-1", r"give 0 \(counts only\) or more"),
    ("--per-flag", "2.5", "is not a whole number"),
])
def test_audit_thresholds_out_of_range_are_refused(audited, tmp_path, capsys, option, value, message):
    report = tmp_path / "r"
    with pytest.raises(SystemExit) as exc:
        cli_main(["audit", str(audited["outs"]["square"]), "--report", str(report), option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(f"argument {option}: .*{message}", err), err
    assert not report.exists()


def test_per_flag_zero_gives_the_counts_without_tables_or_sheets(audited, tmp_path):
    report = tmp_path / "r"
    summary = run_audit(audited["outs"]["square"], report, per_flag=0)
    assert summary["flags"] == audited["summary_sq"]["flags"] and summary["flags"]["placeholder_box"] > 0
    page = (report / "report.html").read_text()
    assert re.search(r"placeholder_box</span> &mdash; \d+ sample\(s\)", page)
    assert "Not listed (--per-flag 0)" in page
    assert not list(report.glob("sheets/*.png"))
    assert read_csv(report / "boxes.csv") == read_csv(audited["report_sq"] / "boxes.csv")


def test_compare_box_tolerance(audited, tmp_path):
    from dataprep.audit.compare import CompareTolerances, compare_builds
    from dataprep.audit.table import load_build

    a = load_build(audited["outs"]["square"])
    b = load_build(audited["outs"]["square"])
    for sample in b.samples:  # every box 0.01 px to the right
        sample.record["box"] = [v + 0.01 for v in sample.record["box"]]
    changed = [r for r in compare_builds(a, b) if "box" in r.changes]
    assert len(changed) == len(a.samples) > 0
    assert not [r for r in compare_builds(a, b, CompareTolerances(box=0.05)) if r.changes]
    assert cli_main(["audit", str(audited["outs"]["hopenet"]), "--report", str(tmp_path / "r"), "--compare",
                     str(audited["outs"]["square"]), "--box-tolerance", "0.05", "--per-flag", "0"]) == 0


def test_histograms_show_series_with_equal_values_side_by_side():
    import matplotlib.pyplot as plt

    from dataprep.audit import pictures as pics

    fig, ax = plt.subplots()
    pics._hist(ax, {"square window": np.ones(4), "stored crop": np.ones(4), "fsanet": np.linspace(0.8, 1.2, 4)}, "t", "w / h")
    bars = [[(p.get_x(), p.get_x() + p.get_width()) for p in c.patches if p.get_height() > 0] for c in ax.containers]
    plt.close(fig)
    assert len(bars) == 3 and all(bars)
    # no bar of one series covers a bar of another: each is visible
    spans = [span for series in bars for span in series]
    spans.sort()
    assert all(b[0] >= a[1] - 1e-9 for a, b in zip(spans, spans[1:]))
