"""End-to-end builds on the generated sample tree: shard contents, counts, determinism, resume,
protocols, verify."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pytest

from dataprep import build as build_mod
from dataprep import boxes as box_rules
from dataprep import labels
from dataprep.build import BuildError, BuildOptions, build, summary_table
from dataprep.cli import main as cli_main
from dataprep.processes import pid_alive, process_start
from dataprep.verify import verify
from build_runs import assert_same_shards, build_killed_at_shard
from shard_reading import label_records, read_tar


def opts(root: Path, out: Path, dataset: str, **kw) -> BuildOptions:
    kw.setdefault("progress", False)
    kw.setdefault("shard_size", 4)
    return BuildOptions(dataset=dataset, root=str(root), out=str(out), **kw)


@pytest.fixture(scope="module")
def aflw_build(sample_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("aflw")
    manifest = build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    return out, manifest


def test_aflw2000_protocol1_counts_and_filter(aflw_build, sample_tree):
    out, manifest = aflw_build
    expected = json.loads((sample_tree / "expected_labels.json").read_text())["aflw2000"]
    counts = manifest["counts"]
    assert counts["read"] == len(expected)
    assert counts["read"] == counts["written"] + counts["rejected"]
    out_of_range = [e["key"] for e in expected if not labels.angles_in_range(e["yaw"], e["pitch"], e["roll"], 99)]
    assert out_of_range, "the sample tree must hold AFLW2000 samples outside [-99, 99]"
    rejected = {r["key"]: r for r in manifest["rejected"]}
    assert set(rejected) == set(out_of_range)
    assert all(r["reason"] == "angle_out_of_range" and r["source"].endswith(".jpg") for r in rejected.values())
    assert all(r["message"].startswith(f"AFLW2000/{r['source']}: yaw ") for r in rejected.values())
    assert counts["per_split"]["test"]["written"] == len(expected) - len(out_of_range)


def test_shard_records_hold_labels_boxes_and_crop(aflw_build, sample_tree):
    out, _ = aflw_build
    expected = {e["key"]: e for e in json.loads((sample_tree / "expected_labels.json").read_text())["aflw2000"]}
    records = label_records(out)
    assert records
    for key, rec in records.items():
        assert "." not in key
        exp = expected[key]
        for angle in ("yaw", "pitch", "roll"):
            assert rec[angle] == pytest.approx(exp[angle], abs=1e-4)
        assert np.allclose(labels.rotation_to_euler(rec["rotation"]), (rec["yaw"], rec["pitch"], rec["roll"]), atol=1e-6)
        assert rec["dataset"] == "aflw2000" and rec["split"] == "test"
        assert (sample_tree / "AFLW2000" / rec["source"]).exists()
        assert {"gt", "pt2d"} <= set(rec["boxes"])
        assert rec["box_source"] == "gt" and rec["box"] == rec["boxes"]["gt"]
        # square padding: the crop window is square and contains the face box
        x1, y1, x2, y2 = rec["crop"]
        assert abs((x2 - x1) - (y2 - y1)) <= 1
        b = rec["box"]
        assert x1 <= b[0] + 1 and y1 <= b[1] + 1 and x2 >= b[2] - 1 and y2 >= b[3] - 1

    polluted = [r for r in records.values() if r["extra"].get("pt2d_missing", 0) > 0]
    assert polluted, "the sample tree must hold AFLW2000 samples with placeholder points"
    for rec in polluted:
        # Hopenet's pt2d box takes in the placeholders (x = -1 or y = 452); the gt box never does.
        assert rec["boxes"]["pt2d"][0] == -1 or rec["boxes"]["pt2d"][3] == 452
        assert rec["boxes"]["gt"][0] != -1 and rec["boxes"]["gt"][3] != 452


def test_records_hold_no_empty_object_so_columnar_tools_can_type_them(aflw_build, sample_tree, tmp_path):
    """Hugging Face datasets' to_parquet (Arrow) refuses a struct with no field: a record never holds
    `{}`. A ground-truth box has no score, so a gt build's records have no `box_scores`."""
    def empty_objects(value, path="record"):
        if isinstance(value, dict):
            return [path] if not value else [p for k, v in value.items() for p in empty_objects(v, f"{path}.{k}")]
        return [p for i, v in enumerate(value) for p in empty_objects(v, f"{path}[{i}]")] if isinstance(value, list) else []

    augmented = tmp_path / "aug"
    build(opts(sample_tree / "AFLW2000", augmented, "aflw2000", protocol="none", augment=("flip", "blur", "downsample")))
    for out in (aflw_build[0], augmented):
        records = label_records(out)
        assert records
        for rec in records.values():
            assert empty_objects(rec) == []
            assert "box_scores" not in rec and rec["box_source"] == "gt"


def test_gt_box_is_the_landmark_box(aflw_build):
    out, manifest = aflw_build
    for shard in manifest["shards"]:
        for key, members in read_tar(out / shard["name"]).items():
            rec = json.loads(members["json"])
            pts = np.load(io.BytesIO(members["pts.npy"]), allow_pickle=False)
            expected = [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]
            assert np.allclose(rec["boxes"]["gt"], expected, atol=1e-3)


def test_members_decode_with_plain_tools(aflw_build):
    out, manifest = aflw_build
    for shard in manifest["shards"]:
        for key, members in read_tar(out / shard["name"]).items():
            assert set(members) >= {"jpg", "json", "pts.npy"}
            img = cv2.imdecode(np.frombuffer(members["jpg"], np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (224, 224, 3)
            pts = np.load(io.BytesIO(members["pts.npy"]), allow_pickle=False)
            assert pts.shape == (68, 2)
    info = json.loads((out / "_info.json").read_text())
    test = info["splits"]["test"]
    assert test["filenames"] == [s["name"] for s in manifest["shards"]]
    assert test["num_samples"] == sum(test["shard_lengths"]) == manifest["counts"]["written"]


def test_webdataset_reads_shards_without_dataprep(aflw_build):
    import webdataset as wds

    out, manifest = aflw_build
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb"):
        assert sample["jpg"].shape == (224, 224, 3)
        assert "yaw" in sample["json"]
        n += 1
    assert n == manifest["counts"]["samples_in_shards"]


def test_build_is_deterministic(sample_tree, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build(opts(sample_tree / "300W_LP", a, "300w_lp", jobs=2))
    build(opts(sample_tree / "300W_LP", b, "300w_lp", jobs=1, crop_size=224))
    names = sorted(p.name for p in a.glob("*.tar"))
    assert names and names == sorted(p.name for p in b.glob("*.tar"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]


def test_300w_lp_subsets_and_hopenet_rule(sample_tree, tmp_path):
    manifest = build(opts(sample_tree / "300W_LP", tmp_path, "300w_lp", crop_rule="hopenet"))
    records = label_records(tmp_path)
    groups = {r["group"] for r in records.values()}
    assert groups == {"AFW", "HELEN", "IBUG", "LFPW", "AFW_Flip", "HELEN_Flip", "IBUG_Flip", "LFPW_Flip"}
    assert not any("landmarks" in r["source"] or "Code" in r["source"] for r in records.values())
    assert manifest["counts"]["rejected"] == 0
    for rec in records.values():
        assert rec["box_source"] == "pt2d" and rec["crop_rule"] == "hopenet"
        x1, y1, x2, y2 = rec["crop"]
        b = rec["box"]
        # the training view of Hopenet's loose crop (a train split): a square, across the whole box
        # width, inside the loosest window (k = 0.4: 0.8 box heights above the box)
        assert x2 - x1 == y2 - y1
        assert x1 <= b[0] + 1 and x2 >= b[2] - 1 and y1 >= b[1] - 0.8 * (b[3] - b[1]) - 1


def test_resume_after_interrupt_is_byte_identical(sample_tree, tmp_path, monkeypatch):
    root = sample_tree / "300W_LP"
    reference = tmp_path / "reference"
    build(opts(root, reference, "300w_lp", shard_size=3))

    out = tmp_path / "interrupted"
    finished = build_killed_at_shard(monkeypatch, opts(root, out, "300w_lp", shard_size=3))
    assert len(finished) == 2

    calls = []
    real_run_shard = build_mod.run_shard
    monkeypatch.setattr(build_mod, "run_shard", lambda task, *a: calls.append(task.name) or real_run_shard(task, *a))
    build(opts(root, out, "300w_lp", shard_size=3))
    assert not set(calls) & finished, "finished shards must not be redone"
    assert_same_shards(reference, out)
    assert verify(str(out)).ok


def test_resume_refuses_other_options_and_rewrites_a_damaged_shard(sample_tree, tmp_path, monkeypatch, capsys):
    root = sample_tree / "300W_LP"
    out = tmp_path / "o"
    finished = build_killed_at_shard(monkeypatch, opts(root, out, "300w_lp", shard_size=3, crop_size=112))
    assert finished
    # no manifest yet: the interrupted build's progress says what it was
    with pytest.raises(BuildError, match=r"interrupted build made with other options, inputs or dataprep version; .* --overwrite"):
        build(opts(root, out, "300w_lp", shard_size=5))
    assert {p.name for p in out.glob("*.tar")} == finished
    build(opts(root, out, "300w_lp", shard_size=3, crop_size=112))  # the same command finishes it
    reference = tmp_path / "reference"
    build(opts(root, reference, "300w_lp", shard_size=3, crop_size=112))
    shard = out / sorted(finished)[0]
    shard.write_bytes(shard.read_bytes()[:5000])  # truncated since (a full disk, a bad copy)
    calls = []
    real_run_shard = build_mod.run_shard
    monkeypatch.setattr(build_mod, "run_shard", lambda task, *a: calls.append(task.name) or real_run_shard(task, *a))
    build(opts(root, out, "300w_lp", shard_size=3, crop_size=112))
    assert calls == [shard.name]
    assert_same_shards(reference, out)
    assert verify(str(out)).ok
    data = bytearray(shard.read_bytes())  # one byte changed in place: the same size, another shard
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    calls.clear()
    build(opts(root, out, "300w_lp", shard_size=3, crop_size=112))
    assert calls == [shard.name] and "resuming: " in capsys.readouterr().err
    assert_same_shards(reference, out)


def test_one_build_at_a_time_per_out_folder(sample_tree, tmp_path, monkeypatch, capsys):
    import socket
    import subprocess

    from dataprep.pipeline import LOCK_FILE, LockLost, lock_holder, run_shard

    root, out = sample_tree / "AFLW2000", tmp_path / "o"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live build on this machine holds the folder
        start = process_start(sleeper.pid)
        (out / LOCK_FILE).write_text(f"{socket.gethostname()}:{sleeper.pid}:{start}:abcd")
        with pytest.raises(BuildError, match=rf"another dataprep build \(pid {sleeper.pid}\) is writing to .* wait"):
            build(opts(root, out, "aflw2000"))
        # verify of the folder meanwhile: it called the running build's .tmp shards an interrupted build's
        (out / "test-000000.tar.tmp").write_bytes(b"")
        assert cli_main(["verify", str(out)]) == 2
        assert (f"dataprep verify: error: {out}: a dataprep build (pid {sleeper.pid}) is writing to it now; verify it "
                "after that build finishes") in capsys.readouterr().err
        (out / "test-000000.tar.tmp").unlink()
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / LOCK_FILE).write_text("elsewhere:123:abcd")  # another machine's build: cannot be checked from here
    with pytest.raises(BuildError, match=r"a dataprep build on elsewhere \(pid 123\) .* delete .*\.dataprep\.lock"):
        build(opts(root, out, "aflw2000"))
    # a killed build's lock (its process is gone) is taken over, and released when the build ends;
    # so is one naming this very process (a restarted container gets the same pid) or a pid that
    # now belongs to another process (its start time differs)
    import os

    for holder in (f"{sleeper.pid}:{start}", f"{os.getpid()}:{process_start(os.getpid())}", f"{os.getppid()}:1"):
        (out / LOCK_FILE).write_text(f"{socket.gethostname()}:{holder}:abcd")
        build(opts(root, out, "aflw2000"))
        assert not (out / LOCK_FILE).exists() and verify(str(out)).ok
    # a build killed outright whose parent has not reaped it yet (a notebook, a container without
    # an init): a zombie keeps its pid but never runs again
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start(killed.pid)
        killed.kill()
        deadline = time.monotonic() + 10
        while pid_alive(killed.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_start(killed.pid) == start  # not reaped: still in the process table
        (out / LOCK_FILE).write_text(f"{socket.gethostname()}:{killed.pid}:{start}:abcd")
        build(opts(root, out, "aflw2000"))
        assert not (out / LOCK_FILE).exists()
    finally:
        killed.wait()
    # a worker that outlived its build finds another build's token and writes nothing
    task = build_mod.plan_shards({"test": build_mod.get_reader("aflw2000").list_samples(root)}, 4)[0]
    settings = build_mod.resolve_settings(opts(root, out, "aflw2000"), build_mod.protocols.load("1", "aflw2000"),
                                          {"test": task.refs})
    (out / LOCK_FILE).write_text("new-build")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(LockLost, match=r"no longer holds .*\.dataprep\.lock .* not written"):
        run_shard(replace(task, owner="old-build"), settings, str(root), str(out))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert lock_holder(fsspec.filesystem("file"), str(out)) == "new-build"
    assert not build_mod._create_lock(fsspec.filesystem("file"), str(out), "mine")  # two at once: one wins
    # ... and one that loses the folder while writing a shard publishes neither the shard nor its progress
    (out / LOCK_FILE).write_text("old-build")
    real_process_ref = build_mod.run_shard.__globals__["process_ref"]

    def taken_over_meanwhile(reader, root_, ref, *a):
        (out / LOCK_FILE).write_text("new-build")
        return real_process_ref(reader, root_, ref, *a)

    monkeypatch.setitem(build_mod.run_shard.__globals__, "process_ref", taken_over_meanwhile)
    files = lambda: {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_FILE}  # noqa: E731
    before = files()
    progress = sorted((out / ".dataprep-progress").iterdir())
    with pytest.raises(LockLost):
        run_shard(replace(task, name="test-000099.tar", owner="old-build"), settings, str(root), str(out))
    assert files() == before
    assert sorted((out / ".dataprep-progress").iterdir()) == progress


def test_a_shard_whose_samples_all_fail_is_empty_and_numbers_have_no_gaps(sample_tree, tmp_path):
    """Every sample of a shard rejected (on a rerun too): the shard is an empty archive, not the old
    samples (a loader globbing *.tar would read them) and not a gap in the numbers (a brace pattern
    over the split would name a file that does not exist)."""
    import tarfile

    import webdataset as wds

    root = tmp_path / "AFLW2000"
    shutil.copytree(sample_tree / "AFLW2000", root)
    out = tmp_path / "o"
    first = build(opts(root, out, "aflw2000", shard_size=4))
    shard = next(s for s in first["shards"] if s["name"] != first["shards"][0]["name"])
    for rec in label_records(out).values():
        if rec["key"] in {k for k in read_tar(out / shard["name"])}:
            (root / rec["source"]).write_bytes(b"not a jpeg")
    again = build(opts(root, out, "aflw2000", shard_size=4))
    listed = {s["name"]: s for s in again["shards"]}
    assert listed[shard["name"]]["samples"] == 0 and tarfile.open(out / shard["name"]).getnames() == []
    names = sorted(listed)
    assert names == [f"test-{i:06d}.tar" for i in range(len(names))] == sorted(p.name for p in out.glob("*.tar"))
    pattern = str(out / f"test-{{000000..{len(names) - 1:06d}}}.tar")
    assert sum(1 for _ in wds.WebDataset(pattern, shardshuffle=False)) == again["counts"]["samples_in_shards"]
    assert verify(str(out)).ok


def test_rerun_after_fixing_inputs_rewrites_only_their_shards(sample_tree, tmp_path, monkeypatch):
    root = tmp_path / "AFLW2000"
    shutil.copytree(sample_tree / "AFLW2000", root)
    reference = tmp_path / "reference"
    build(opts(root, reference, "aflw2000", shard_size=3))
    mats = sorted(root.glob("*.mat"))
    broken, removed = mats[0], mats[-1]
    good_broken, good_removed = broken.read_bytes(), removed.read_bytes()
    broken.write_bytes(good_broken[:100])
    removed.unlink()
    out = tmp_path / "out"
    first = build(opts(root, out, "aflw2000", shard_size=3))
    assert {e["source"] for e in first["rejected"]} >= {broken.with_suffix(".jpg").name, removed.with_suffix(".jpg").name}

    broken.write_bytes(good_broken)  # the user fixes both and runs the same command again
    removed.write_bytes(good_removed)
    calls = []
    real_run_shard = build_mod.run_shard
    monkeypatch.setattr(build_mod, "run_shard", lambda task, *a: calls.append(task.name) or real_run_shard(task, *a))
    again = build(opts(root, out, "aflw2000", shard_size=3))
    assert 1 <= len(calls) <= 2 < len(again["shards"])  # the shards of the two changed files, no other
    assert again["counts"]["rejected"] == build(opts(root, tmp_path / "fresh", "aflw2000", shard_size=3))["counts"]["rejected"]
    assert_same_shards(reference, out)


def test_other_options_refuse_to_mix_into_a_build(aflw_build, tmp_path, sample_tree):
    out = tmp_path / "o"
    build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    with pytest.raises(BuildError, match=r"other options \(crop_size 224 there, 112 now\); pass --overwrite"):
        build(opts(sample_tree / "AFLW2000", out, "aflw2000", crop_size=112))
    # with a detector, refused before the detector loads (seconds for MTCNN)
    import dataprep.box_stage

    def no_detector(*_args, **_kwargs):
        raise AssertionError("the detector was loaded before the folder was refused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataprep.box_stage, "BoxStage", no_detector)
        with pytest.raises(BuildError, match=r"other options \(.*detector 'gt' there, 'mtcnn' now.*\); pass --overwrite"):
            build(opts(sample_tree / "AFLW2000", out, "aflw2000", detector="mtcnn"))
    old_shards = {p.name for p in out.glob("*.tar")}
    # the user's own files in --out survive --overwrite and the build's clean-up
    mine = {"my_backup.tar": b"backup", "notes.tmp": b"notes", "test-000000.tar.bak": b"bak"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    manifest = build(opts(sample_tree / "AFLW2000", out, "aflw2000", crop_size=112, shard_size=8, overwrite=True))
    assert manifest["settings"]["crop_size"] == 112
    assert all((out / name).read_bytes() == data for name, data in mine.items())
    new_shards = {s["name"] for s in manifest["shards"]}
    assert {p.name for p in out.glob("*.tar")} == new_shards | {"my_backup.tar"}  # none of the old build's left
    assert old_shards - new_shards, "the test needs an old shard that the new build does not write again"
    # a user's file named like a shard of another split survives --overwrite too
    (out / "mydata-000123.tar").write_bytes(b"mine")
    build(opts(sample_tree / "AFLW2000", out, "aflw2000", overwrite=True))
    assert (out / "mydata-000123.tar").read_bytes() == b"mine"


def test_shard_files_no_build_recorded_are_not_mixed_into_a_build(aflw_build, tmp_path, sample_tree):
    """A folder with no build in it but a shard-named file of the build's split (copied from
    elsewhere): refused, naming it, rather than listed beside the new shards or overwritten."""
    out = tmp_path / "o"
    out.mkdir()
    first = sorted(aflw_build[0].glob("test-*.tar"))[0]
    shutil.copy(first, out / "test-000007.tar")
    with pytest.raises(BuildError, match=r"holds shard files no dataprep build recorded there \(test-000007\.tar\); "
                                         r"a build would mix with them or overwrite one: move them away"):
        build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    # a build killed between renaming its first shard into place and recording it: not foreign
    killed = tmp_path / "killed"
    build(opts(sample_tree / "AFLW2000", killed, "aflw2000"))
    for path in (killed / ".dataprep-progress").iterdir():
        path.unlink()
    (killed / "manifest.json").unlink()
    build(opts(sample_tree / "AFLW2000", killed, "aflw2000"))
    assert verify(str(killed)).ok
    (out / "other-000001.tar").write_bytes(b"another split's: no concern of this build")
    manifest = build(opts(sample_tree / "AFLW2000", out, "aflw2000", overwrite=True))
    assert "test-000007.tar" not in {s["name"] for s in manifest["shards"]} and not (out / "test-000007.tar").exists()
    assert (out / "other-000001.tar").exists()


def test_summary_warns_when_a_full_download_misses_the_papers_count(aflw_build):
    import copy

    manifest = copy.deepcopy(aflw_build[1])
    written = manifest["counts"]["per_split"]["test"]["written"]
    manifest["expected"] = {"read": manifest["counts"]["read"], "written": {"test": written}}
    assert "warning" not in summary_table(manifest)
    manifest["expected"]["written"]["test"] = written + 2  # as if two samples the papers keep were lost
    assert (f"warning: protocol 1 keeps {written + 2} test samples of the full aflw2000 download (the papers' "
            f"count); this build wrote {written}.") in summary_table(manifest)
    nothing = copy.deepcopy(manifest)
    nothing["counts"].update(written=0, rejected=nothing["counts"]["read"])
    assert f"warning: all {nothing['counts']['read']} samples read were rejected" in summary_table(nothing)
    manifest["expected"]["read"] += 1  # not the full download: only the note about its size
    table = summary_table(manifest)
    assert "warning" not in table and "note: the full aflw2000 download has" in table
    # as the README says and the BIWI sequences' note does: a partial root's numbers are not the papers'
    assert (f"this root has {manifest['counts']['read']}, so the published numbers are not comparable to a model "
            "trained or tested on this build.") in table


def test_the_summary_says_what_to_do_once_per_reason(aflw_build):
    from dataprep.rejections import REASONS, advice

    manifest = aflw_build[1]
    table = summary_table(manifest)
    reasons = manifest["counts"]["rejected_by_reason"]
    assert reasons  # protocol 1's angle filter rejects some of the sample tree's faces
    for code in reasons:
        assert table.count(f"what to do: {REASONS[code].action}") == 1
    assert advice("a_code_from_a_newer_version") is None
    manifest = dict(manifest, counts=dict(manifest["counts"], rejected_by_reason={"a_code_from_a_newer_version": 1}),
                    rejected=[{"reason": "a_code_from_a_newer_version", "message": "m"}])
    assert "what to do" not in summary_table(manifest)


def test_a_damaged_manifest_is_written_again_or_refused_with_advice_and_never_left_half_written(
        aflw_build, tmp_path, sample_tree, capsys):
    """A damaged manifest beside the shards' own records of this build: the rerun keeps every shard
    and writes the manifest again (verify advises that rerun; it used to be refused, and --overwrite
    wrote every shard again). With no such records, it is refused, saying --overwrite."""
    out = tmp_path / "o"
    build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    text = (out / "manifest.json").read_text()
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    for damage in (text[:len(text) // 2], "[]", text.replace('"settings_fingerprint"', '"settings_print"')):
        (out / "manifest.json").write_text(damage)  # killed mid-write by an older version, or edited
        assert not verify(str(out)).ok
        manifest = build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
        assert "is damaged; the shards' records" in capsys.readouterr().err
        assert (out / "manifest.json").read_text() == text and verify(str(out)).ok
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == shards  # none written again
    (out / "manifest.json").write_text(text[:len(text) // 2])
    shutil.rmtree(out / ".dataprep-progress")
    with pytest.raises(BuildError, match=r"manifest.json is not a readable build manifest .* no record of this "
                                         r"build's shards .* --overwrite"):
        build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    (out / "manifest.json.tmp").write_text("{")  # a run killed between writing and renaming
    manifest = build(opts(sample_tree / "AFLW2000", out, "aflw2000", overwrite=True))
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(out.glob("*.tmp")) and verify(str(out)).ok


def test_dataset_aliases_build_the_same_dataset(sample_tree, tmp_path):
    # "hpdb" (BIWI's folder name) is accepted: the build must then be BIWI throughout (tracking,
    # the option checks, the manifest), not a dataset of another name
    build_mod.check_options(opts(sample_tree / "hpdb", tmp_path / "x", "hpdb", biwi_tracking="previous"))
    manifest = build(opts(sample_tree / "hpdb", tmp_path / "a", "hpdb", protocol="2", detector="gt"))
    assert manifest["settings"]["dataset"] == "biwi"
    again = build(opts(sample_tree / "hpdb", tmp_path / "a", "biwi", protocol="2", detector="gt"))  # same build
    assert again["settings_fingerprint"] == manifest["settings_fingerprint"]


def test_input_fingerprint_covers_label_files(sample_tree, tmp_path):
    root = tmp_path / "AFLW2000"
    shutil.copytree(sample_tree / "AFLW2000", root)
    first = build(opts(root, tmp_path / "a", "aflw2000"))["input"]["fingerprint"]
    copy = tmp_path / "copy" / "AFLW2000"
    shutil.copytree(root, copy)  # new modification times, same files
    assert build(opts(copy, tmp_path / "b", "aflw2000"))["input"]["fingerprint"] == first
    mat = sorted(copy.glob("*.mat"))[0]
    mat.write_bytes(mat.read_bytes() + b"\0")  # another .mat, the same images
    assert build(opts(copy, tmp_path / "c", "aflw2000"))["input"]["fingerprint"] != first


def test_impossible_ground_truth_boxes_are_rejected_not_cropped(sample_tree, tmp_path):
    """Landmarks that coincide, lie far off the image, or are scaled up 100x give a box no face can
    have: rejected as bad_box naming the file, not written as a black or one-pixel-wide crop."""
    import scipy.io

    from dataprep.datasets.matfile import mat_bytes

    root = tmp_path / "AFLW2000"
    root.mkdir()
    mat = scipy.io.loadmat(str(sample_tree / "AFLW2000" / "image00111.mat"))
    arrays = {k: v for k, v in mat.items() if not k.startswith("__")}
    pts = arrays["pt3d_68"]
    broken = {
        "image00001": np.repeat(pts[:, :1], 68, axis=1),  # all 68 points at one place
        "image00002": pts + np.array([[5000.0], [0.0], [0.0]], np.float32),  # far off the 450 px image
        "image00003": (pts * 100).astype(np.float32),  # a 100x box around a tiny part of the image
    }
    shutil.copy(sample_tree / "AFLW2000" / "image00111.jpg", root / "image00111.jpg")
    shutil.copy(sample_tree / "AFLW2000" / "image00111.mat", root / "image00111.mat")
    for name, points in broken.items():
        shutil.copy(sample_tree / "AFLW2000" / "image00111.jpg", root / f"{name}.jpg")
        (root / f"{name}.mat").write_bytes(mat_bytes({**arrays, "pt3d_68": points.astype(pts.dtype)}))
    manifest = build(opts(root, tmp_path / "out", "aflw2000", protocol="none"))
    assert manifest["counts"]["written"] == 1 and manifest["counts"]["rejected_by_reason"] == {"bad_box": 3}
    said = {e["source"]: e["message"] for e in manifest["rejected"]}
    assert "is degenerate (0 x 0 px)" in said["image00001.jpg"]
    assert "lies mostly outside the 450 x 450 image (0% of it inside)" in said["image00002.jpg"]
    assert "lies mostly outside the 450 x 450 image" in said["image00003.jpg"]
    assert all("check the sample's label file" in m for m in said.values())
    # named as the readers name files: the root folder's name and the path below it
    assert all(m.startswith(f"AFLW2000/{source}: the 'gt' box") for source, m in said.items())

    from dataprep.boxes import box_problem

    assert box_problem([10, 10, 100, 120], (450, 450)) is None
    assert box_problem([-60, 10, 100, 120], (450, 450)) is None  # a profile face past the edge
    assert "not finite" in box_problem([0, 0, float("nan"), 5], (450, 450))


def test_pt2d_that_fsanets_filter_empties_is_judged_by_its_gt_box_not_a_read_error(sample_tree, tmp_path):
    """FSA-Net's filter keeps pt2d points with x > 0 (or y > 0): 300W-LP landmarks moved off the
    image's left or top edge, like those moved off its right, are bad_box (its gt box), not a
    read_error calling itself a dataprep bug; an AFLW2000 file whose 21 pt2d points are all the
    placeholder still has its pt3d_68 gt box: written without pt2d_valid, FSA-Net's rule reading gt,
    and Hopenet's rule (the placeholders' one-point box) rejected as bad_box."""
    import scipy.io

    from dataprep.datasets.matfile import PT2D_MISSING_XY, mat_bytes

    lp = tmp_path / "300W_LP" / "AFW"
    lp.mkdir(parents=True)
    name = "AFW_1000207_1_0"
    arrays = {k: v for k, v in scipy.io.loadmat(str(sample_tree / "300W_LP" / "AFW" / f"{name}.mat")).items()
              if not k.startswith("__")}
    moved = {"AFW_1_left": np.array([[-1000.0], [0.0]]), "AFW_2_up": np.array([[0.0], [-1000.0]]),
             "AFW_3_right": np.array([[1000.0], [0.0]])}
    for stem, shift in moved.items():
        shutil.copy(sample_tree / "300W_LP" / "AFW" / f"{name}.jpg", lp / f"{stem}.jpg")
        (lp / f"{stem}.mat").write_bytes(mat_bytes({**arrays, "pt2d": (arrays["pt2d"] + shift).astype(arrays["pt2d"].dtype)}))
    manifest = build(opts(lp.parent, tmp_path / "lp", "300w_lp", protocol="none"))
    assert manifest["counts"]["rejected_by_reason"] == {"bad_box": 3}
    assert all("lies mostly outside the 450 x 450 image" in e["message"] for e in manifest["rejected"])

    root = tmp_path / "AFLW2000"
    root.mkdir()
    arrays = {k: v for k, v in scipy.io.loadmat(str(sample_tree / "AFLW2000" / "image00111.mat")).items()
              if not k.startswith("__")}
    placeholders = np.tile(np.array([PT2D_MISSING_XY]).T, (1, 21)).astype(arrays["pt2d"].dtype)
    shutil.copy(sample_tree / "AFLW2000" / "image00111.jpg", root / "image00111.jpg")
    (root / "image00111.mat").write_bytes(mat_bytes({**arrays, "pt2d": placeholders}))
    for rule in ("square", "fsanet"):
        out = tmp_path / rule
        manifest = build(opts(root, out, "aflw2000", protocol="none", crop_rule=rule))
        assert manifest["counts"]["written"] == 1, manifest["rejected"]
        [record] = label_records(out).values()
        assert "pt2d_valid" not in record["boxes"] and record["box_source"] == "gt"
        assert record["boxes"]["pt2d"] == [-1.0, 452.0, -1.0, 452.0] and record["extra"]["pt2d_missing"] == 21
    manifest = build(opts(root, tmp_path / "hopenet", "aflw2000", protocol="none", crop_rule="hopenet"))
    [rejected] = manifest["rejected"]
    assert rejected["reason"] == "bad_box" and "the 'pt2d' box" in rejected["message"]


def test_a_partial_biwi_download_is_named_in_the_summary(sample_tree, tmp_path):
    """Protocol 2 is 16 train and 8 test sequences: a root with fewer says so (its numbers are not
    the papers'), as a partial AFLW2000 download does."""
    root = tmp_path / "hpdb"
    root.mkdir()
    for seq in ("01", "02", "03"):
        shutil.copytree(sample_tree / "hpdb" / seq, root / seq)
        shutil.copy(sample_tree / "hpdb" / f"{seq}.obj", root / f"{seq}.obj")
    manifest = build(opts(root, tmp_path / "out", "biwi", protocol="2", detector="gt"))
    assert [manifest["counts"]["per_split"][s]["groups"] for s in ("test", "train")] == [1, 2]
    text = summary_table(manifest)
    assert "note: protocol 2's test split is 8 sequences of the full biwi download; this root has 1 of them" in text
    assert "note: protocol 2's train split is 16 sequences of the full biwi download; this root has 2 of them" in text
    # protocol 1 tests on all 24 sequences: a partial root said nothing there
    manifest = build(opts(root, tmp_path / "out1", "biwi", protocol="1", detector="gt"))
    assert manifest["counts"]["per_split"]["test"]["groups"] == 3
    assert ("note: protocol 1's test split is 24 sequences of the full biwi download; this root has 3 of them"
            in summary_table(manifest))
    full = build(opts(sample_tree / "hpdb", tmp_path / "full1", "biwi", protocol="1", detector="gt"))
    assert full["counts"]["per_split"]["test"]["groups"] == 24 and "sequences of the full" not in summary_table(full)


def test_file_names_that_are_not_utf8_print(sample_tree, tmp_path):
    """A file name that is not valid UTF-8 (kept by Python as lone surrogates) is printed with its
    bytes escaped in the summary; before, the build ended with a UnicodeEncodeError after writing
    its shards."""
    import os
    import subprocess

    root = tmp_path / "AFLW2000"
    root.mkdir()
    for ext in (".jpg", ".mat"):
        shutil.copy(sample_tree / "AFLW2000" / f"image00111{ext}", root / f"image00111{ext}")
    odd = os.fsdecode(b"image\xff00112")
    (root / f"{odd}.jpg").write_bytes((root / "image00111.jpg").read_bytes()[:2000])
    shutil.copy(root / "image00111.mat", root / f"{odd}.mat")
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    run = subprocess.run([sys.executable, "-m", "dataprep", "build", "--dataset", "aflw2000", "--root", str(root),
                          "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, env=env)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert b"non_utf8_name" in run.stdout and b"AFLW2000/image\\xff00112.jpg: the file name is not valid UTF-8" in run.stdout


@pytest.mark.parametrize("dataset, folder, subset", [("aflw2000", "AFLW2000", ""), ("300w_lp", "300W_LP", "AFW")])
def test_a_file_name_that_is_not_utf8_is_rejected_and_the_build_goes_on(sample_tree, tmp_path, dataset, folder, subset):
    """Such a name has no UTF-8 spelling for the record's ``source``: it was written as a lone
    surrogate escape (``\\udcff``), which strict JSON readers (orjson, for one) refuse: not UTF-8
    text. Now the sample is rejected naming the file, and the others are built."""
    import os

    import orjson

    root = tmp_path / folder
    shutil.copytree(sample_tree / folder / subset, root / subset)
    stem = sorted((root / subset).glob("*.jpg"))[0].stem
    try:
        for ext in (".jpg", ".mat"):
            shutil.copy(root / subset / f"{stem}{ext}", root / subset / os.fsdecode(b"img_\xff" + ext.encode()))
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses file names that are not UTF-8")
    out = tmp_path / "o"
    manifest = build(opts(root, out, dataset, protocol="none"))
    counts = manifest["counts"]
    assert counts["rejected_by_reason"] == {"non_utf8_name": 1}
    assert counts["read"] == len(list((root / subset).glob("*.jpg"))) == counts["written"] + counts["rejected"]
    [entry] = manifest["rejected"]
    shown = f"{subset}/img_\\xff.jpg" if subset else "img_\\xff.jpg"
    assert entry["source"] == shown and re.fullmatch(rf"{dataset}_{subset + '_' if subset else ''}img__-[0-9a-f]{{8}}",
                                                        entry["key"])
    assert entry["message"] == (f"{folder}/{shown}: the file name is not valid UTF-8 (b'img_\\xff.jpg'); rename "
                                "the file (and its label file) in UTF-8: sample keys, label records and the manifest "
                                "are UTF-8 text")
    # everything written is UTF-8 that a strict reader takes: records, manifest, _info.json, progress
    written = [out / "manifest.json", out / "_info.json", *(out / ".dataprep-progress").glob("*.json")]
    for path in written:
        orjson.loads(path.read_bytes())
    records = label_records(out)
    assert len(records) == counts["written"] and all("img_" not in key for key in records)
    for shard in out.glob("*.tar"):
        for members in read_tar(shard).values():
            orjson.loads(members["json"])
    assert verify(str(out)).ok


def test_biwi_protocol2_split_by_sequence_with_depth(sample_tree, tmp_path):
    manifest = build(opts(sample_tree / "hpdb", tmp_path, "biwi", protocol="2", detector="gt"))
    records = label_records(tmp_path)
    train = {r["group"] for r in records.values() if r["split"] == "train"}
    test = {r["group"] for r in records.values() if r["split"] == "test"}
    assert len(train) == 16 and len(test) == 8 and not train & test
    for a, b in (("02", "21"), ("03", "15"), ("05", "18"), ("07", "22")):
        assert ({a, b} <= train) or ({a, b} <= test)
    assert [manifest["counts"]["per_split"][s]["groups"] for s in ("test", "train")] == [8, 16]
    assert "sequences of the full" not in summary_table(manifest)
    shard = next(tmp_path.glob("train-*.tar"))
    members = next(iter(read_tar(shard).values()))
    depth = cv2.imdecode(np.frombuffer(members["depth.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert depth.dtype == np.uint16 and depth.shape == (224, 224) and depth.max() > 0
    assert manifest["counts"]["read"] == manifest["counts"]["written"] + manifest["counts"]["rejected"]
    # The README's webdataset recipe gives the millimetres back ("rgb" alone would not).
    import PIL.Image
    import webdataset as wds

    def depth_mm(key, data):
        if key.endswith("depth.png"):
            return np.asarray(PIL.Image.open(io.BytesIO(data)))

    image, read_depth, record = next(iter(wds.WebDataset(str(shard), shardshuffle=False)
                                          .decode(depth_mm, "rgb").to_tuple("jpg", "depth.png", "json")))
    assert record["key"] == next(iter(read_tar(shard)))
    assert read_depth.dtype == np.uint16 and np.array_equal(read_depth, depth) and depth.max() > 255


def test_split_file_names_must_be_usable_in_file_names(sample_tree, tmp_path):
    split = tmp_path / "split.json"
    for name in ("../evil", "train/x", "Train Set", "a.b"):
        split.write_text(json.dumps({"by": "group", name: ["01"], "test": ["02"]}))
        with pytest.raises(ValueError, match=re.escape(f"split names {name!r} are not usable in shard file names")):
            build(opts(sample_tree / "hpdb", tmp_path / "o", "biwi", protocol="2", detector="gt", split_file=str(split)))
    assert not (tmp_path / "evil-000000.tar").exists() and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=r"--split-file .*nope.json not found; give a JSON file"):
        build(opts(sample_tree / "hpdb", tmp_path / "o", "biwi", protocol="2", detector="gt",
                   split_file=str(tmp_path / "nope.json")))


def test_split_choices_that_cannot_work_say_what_to_do(sample_tree, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "train": ["01", "02"], "test": ["02"]}))
    with pytest.raises(ValueError, match=r"--split-file .*split.json: '02' is in both 'train' and 'test'; keep it in one"):
        build(opts(sample_tree / "hpdb", tmp_path / "o", "biwi", protocol="2", detector="gt", split_file=str(split)))
    with pytest.raises(ValueError, match=r"--split-seed needs a protocol split by group.*use it with --dataset biwi "
                                         r"--protocol 2, or give your own split with --split-file"):
        build(opts(sample_tree / "AFLW2000", tmp_path / "o", "aflw2000", split_seed=3))


def test_split_seed_keeps_people_together(sample_tree, tmp_path):
    manifest = build(opts(sample_tree / "hpdb", tmp_path, "biwi", protocol="2", detector="gt", split_seed=7))
    records = label_records(tmp_path)
    test = {r["group"] for r in records.values() if r["split"] == "test"}
    assert len(test) == 8
    # the drawn split can be reported: the manifest and the summary name each split's sequences
    assert manifest["split_groups"]["test"] == sorted(test) and len(manifest["split_groups"]["train"]) == 16
    assert f"test 8 ({', '.join(sorted(test))})" in summary_table(manifest)
    for a, b in (("02", "21"), ("03", "15"), ("05", "18"), ("07", "22")):
        assert (a in test) == (b in test)


def test_split_seed_on_a_partial_download_keeps_the_protocols_share_in_test(sample_tree, tmp_path):
    """Protocol 2 tests on 8 of the 24 sequences: on a root holding 6 of them a seeded split puts 2
    in test (it put all 6 there, leaving train empty), still keeping each person on one side."""
    root = tmp_path / "hpdb"
    root.mkdir()
    for seq in ("01", "02", "03", "04", "15", "21"):
        shutil.copytree(sample_tree / "hpdb" / seq, root / seq)
    for seed in range(4):
        manifest = build(opts(root, tmp_path / f"o{seed}", "biwi", protocol="2", detector="gt", split_seed=seed))
        groups = manifest["split_groups"]
        assert len(groups["test"]) == 2 and len(groups["train"]) == 4, groups
        for a, b in (("02", "21"), ("03", "15")):
            assert (a in groups["test"]) == (b in groups["test"])
        assert manifest["counts"]["per_split"]["train"]["written"] > 0


def test_split_file(sample_tree, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "train": ["01", "02"], "test": ["03"]}))
    manifest = build(opts(sample_tree / "hpdb", tmp_path / "o", "biwi", protocol="2", detector="gt",
                          split_file=str(split)))
    groups = {(r["split"], r["group"]) for r in label_records(tmp_path / "o").values()}
    assert groups == {("train", "01"), ("train", "02"), ("test", "03")}
    # the samples of the sequences it does not list are counted and named in the summary, not lost
    counts = manifest["counts"]
    assert counts["read"] + counts["in_no_split"] == manifest["input"]["files"] and counts["in_no_split"] > 0
    assert manifest["expected"] == {}  # protocol 2's counts are not this split's
    assert manifest["person_leaks"] == [] and "person(s) in more than one split" not in summary_table(manifest)
    assert f"note: {counts['in_no_split']} of the {manifest['input']['files']} samples" in summary_table(manifest)
    # a name that matches no sample (a typo) and a file that is not JSON stop the build, naming the file
    split.write_text(json.dumps({"by": "group", "train": ["01", "24x"], "test": ["03"]}))
    with pytest.raises(ValueError, match=r"split.json: no biwi sample under --root has group '24x'"):
        build(opts(sample_tree / "hpdb", tmp_path / "o2", "biwi", protocol="2", detector="gt", split_file=str(split)))
    split.write_text('{"by": "group", train: ["01"]}')
    with pytest.raises(ValueError, match=r"split.json is not valid JSON"):
        build(opts(sample_tree / "hpdb", tmp_path / "o2", "biwi", protocol="2", detector="gt", split_file=str(split)))
    split.write_text('{"by": "group", "train": [["01"]]}')  # was a TypeError traceback
    with pytest.raises(ValueError, match=r"split.json: expected .* each split a list of names"):
        build(opts(sample_tree / "hpdb", tmp_path / "o2", "biwi", protocol="2", detector="gt", split_file=str(split)))


def test_a_split_file_val_split_is_held_out_like_test(sample_tree, tmp_path, capsys):
    """Only ``train`` and ``all`` are training data: a ``val`` split gets no --augment variants (it
    got flipped copies when only ``test`` was held out), and the build says so. A split with
    nothing in it is counted as zeros in the manifest, not left out."""
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "train": ["01", "03"], "val": ["02"], "test": []}))
    manifest = build(opts(sample_tree / "hpdb", tmp_path / "o", "biwi", protocol="2", detector="gt",
                          split_file=str(split), augment=("flip",)))
    assert "note: split(s) val are evaluation data like test" in capsys.readouterr().err
    records = label_records(tmp_path / "o").values()
    by_split = {s: [r for r in records if r["split"] == s] for s in ("train", "val")}
    assert by_split["val"] and not [r for r in by_split["val"] if r.get("augment")]
    assert [r for r in by_split["train"] if r.get("augment")]
    assert manifest["counts"]["per_split"]["test"] == {"read": 0, "written": 0, "rejected": 0, "samples": 0}
    val = manifest["counts"]["per_split"]["val"]
    assert val["read"] == val["written"] == val["samples"] == len(by_split["val"])


def test_a_split_file_that_puts_one_person_on_both_sides_is_warned_about(sample_tree, tmp_path, capsys):
    from dataprep.datasets import get_reader

    # sequences 02 and 21 show the same person (protocol 2's manifest says so; the default protocol
    # 1 has no split of BIWI to say it, the fact is found there)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "train": ["02", "03"], "test": ["21"]}))
    manifest = build(opts(sample_tree / "hpdb", tmp_path / "o", "biwi", detector="gt", split_file=str(split)))
    line = ("warning: 1 person(s) in more than one split (sequences 02 and 21 in test and train): a model is tested "
            "on faces it trained on")
    assert line in capsys.readouterr().err  # said as the build starts
    assert manifest["person_leaks"] == [{"groups": ["02", "21"], "splits": ["test", "train"]}]
    assert line in summary_table(manifest)  # and again at its end
    # frames of one sequence split by key: that person is on both sides too
    keys = [r.key for r in get_reader("biwi").list_samples(sample_tree / "hpdb") if r.group == "01"]
    split.write_text(json.dumps({"by": "key", "train": keys[:1], "test": keys[1:]}))
    manifest = build(opts(sample_tree / "hpdb", tmp_path / "o2", "biwi", detector="gt", split_file=str(split)))
    assert manifest["person_leaks"] == [{"groups": ["01"], "splits": ["test", "train"]}]
    assert "(sequence 01 in test and train)" in capsys.readouterr().err
    # 300W-LP's groups are photo collections, not people: a subset on both sides is no leak
    keys = [r.key for r in get_reader("300w_lp").list_samples(sample_tree / "300W_LP") if r.group == "AFW"]
    assert len(keys) > 1
    split.write_text(json.dumps({"by": "key", "train": keys[:1], "test": keys[1:]}))
    manifest = build(opts(sample_tree / "300W_LP", tmp_path / "o3", "300w_lp", split_file=str(split)))
    assert manifest["person_leaks"] == [] and "warning: " not in capsys.readouterr().err

@pytest.mark.parametrize("bad, message", [
    (dict(crop_size=0), "--crop-size 0"), (dict(margin=-1.0), "--margin -1.0"), (dict(margin=float("inf")), "--margin inf"), (dict(jpeg_quality=500), "--jpeg-quality 500"),
    (dict(shard_size=0), "--shard-size 0"), (dict(batch_size=0), "--batch-size 0"), (dict(jobs=-2), "--jobs -2"),
    # past these every sample failed one by one (numpy refuses negative seeds; a memory error per crop)
    (dict(seed=-1), "--seed -1: give 0 or more"), (dict(split_seed=-1), "--split-seed -1: give 0 or more"),
    (dict(crop_size=100000), "--crop-size 100000: give the crop side in pixels, 8 to 4096"),
    (dict(margin=1e6), "--margin 1000000.0: give a fraction of the crop side per side, 0 to 10"),
    (dict(margin=float("nan")), "--margin nan"),
    (dict(augment=("foo",)), "--augment: unknown augmentation 'foo'"),
    (dict(crop_rule="hopenet", margin=0.8), "--margin 0.8 applies to --crop-rule square only, not hopenet"),
    (dict(split_seed=7, split_file="split.json"), "--split-seed and --split-file both choose the splits"),
    (dict(biwi_tracking="previous"), "--biwi-tracking applies to BIWI only, not aflw2000"),
    (dict(scheduler="tcp://10.0.0.1:8786"), "--scheduler tcp://10.0.0.1:8786 applies to --backend dask or ray, not loky"),
    (dict(retinaface_weights="weights.pth"), "--retinaface-weights applies to --detector retinaface; this build's boxes are gt"),
    (dict(device="bogus"), "--device bogus: give auto, cpu, cuda, cuda:N or mps"),
    (dict(device="cuda:abc"), "--device cuda:abc"),
])
def test_unusable_options_stop_the_build_before_it_reads(sample_tree, tmp_path, bad, message):
    with pytest.raises(BuildError, match=re.escape(message)):
        build(opts(sample_tree / "AFLW2000", tmp_path / "o", "aflw2000", **bad))
    assert not (tmp_path / "o").exists()


def test_detector_options_on_a_gt_build_are_named_as_unused(sample_tree, tmp_path, capsys):
    # `--device cuda` on a gt build said nothing: a user thinks the build ran on the GPU
    build(opts(sample_tree / "AFLW2000", tmp_path / "o", "aflw2000", device="cpu", batch_size=4))
    assert ("note: --device cpu and --batch-size 4 apply to detectors; this build's boxes come from the labels (gt), "
            "so they are not used") in capsys.readouterr().err
    build(opts(sample_tree / "AFLW2000", tmp_path / "o2", "aflw2000"))
    assert "apply to detectors" not in capsys.readouterr().err


@pytest.mark.parametrize("backend, module", [("dask", "dask.distributed"), ("ray", "ray")])
def test_a_backend_whose_extra_is_missing_says_how_to_install_it(sample_tree, tmp_path, monkeypatch, backend, module):
    """In a clone (the README's setup: uv, no pip in .venv) the extra comes with `uv sync --extra`;
    the message named only `pip install 'headpose-dataprep[...]'`."""
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(BuildError, match=re.escape(f"--backend {backend} needs the {backend} extra: "
                                                   f"uv sync --extra {backend} in the project's folder")):
        build(opts(sample_tree / "AFLW2000", tmp_path / "o", "aflw2000", backend=backend))


def test_bad_inputs_are_rejected_and_the_build_goes_on(sample_tree, tmp_path):
    root = tmp_path / "AFLW2000"
    shutil.copytree(sample_tree / "AFLW2000", root)
    mats = sorted(root.glob("*.mat"))
    mats[0].write_bytes(b"this is not a MAT file")
    mats[1].unlink()
    jpgs = sorted(root.glob("*.jpg"))
    jpgs[2].write_bytes(jpgs[2].read_bytes()[:100])
    data = jpgs[3].read_bytes()
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    jpgs[3].write_bytes(data[:middle] + b"\xff\xd9" + data[middle + 2:])  # decodes, damaged
    manifest = build(opts(root, tmp_path / "out", "aflw2000"))
    rejected = {r["source"]: r for r in manifest["rejected"]}
    assert rejected[mats[0].with_suffix(".jpg").name]["reason"] == "corrupt_mat"
    assert rejected[mats[1].with_suffix(".jpg").name]["reason"] == "missing_mat"
    assert rejected[jpgs[2].name]["reason"] == "unreadable_image"
    assert rejected[jpgs[3].name]["reason"] == "corrupt_image" and "libjpeg" in rejected[jpgs[3].name]["message"]
    for src in (mats[0].name, mats[1].name, jpgs[2].name, jpgs[3].name):
        assert any(src in r["message"] for r in manifest["rejected"]), src
    c = manifest["counts"]
    assert c["read"] == c["written"] + c["rejected"]


def _copy_build(aflw_build, tmp_path) -> tuple[Path, dict]:
    out, manifest = aflw_build
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy, manifest


def test_verify_detects_tampering(aflw_build, tmp_path, capsys):
    copy, manifest = _copy_build(aflw_build, tmp_path)
    assert cli_main(["verify", str(copy)]) == 0
    first, second = (s["name"] for s in manifest["shards"][:2])
    for name in (first, second):  # both damaged shards are reported, not only the first
        shard = copy / name
        data = bytearray(shard.read_bytes())
        data[700] ^= 0xFF
        shard.write_bytes(bytes(data))
    assert cli_main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"FAIL: {first}: sha256" in err and f"FAIL: {second}: sha256" in err
    # the manifest's command, run on the folder verified (the copy), not the one it names
    assert re.search(r"to rewrite missing or damaged shards, run the build again \(`.*`, with --out .*copy\)", err)
    report = verify(str(copy), decode=False)
    assert report.shards_checked == len(manifest["shards"])
    assert {p.split(":")[0] for p in report.problems} == {first, second}
    # a shard or the manifest given instead of the folder: said so, and where the folder is
    for given in (copy / first, copy / "manifest.json"):
        capsys.readouterr()
        assert cli_main(["verify", str(given)]) == 2  # nothing to check: an error, not a problem found
        err = capsys.readouterr().err
        assert f"dataprep verify: error: {given}: a file, not a folder; give the --out folder of a dataprep build (the build's folder is {copy})" in err
        assert "no manifest" not in err


def test_verify_names_the_absolute_root_of_a_build_typed_with_a_relative_one(sample_tree, tmp_path, monkeypatch,
                                                                              capsys):
    """The rerun verify suggests works from any folder: a --root typed relative (`--root AFLW2000`, as
    recorded in the manifest's command) names another folder, or none, from another working directory."""
    monkeypatch.chdir(sample_tree)
    out = tmp_path / "out"
    assert cli_main(["build", "--dataset", "aflw2000", "--root", "AFLW2000", "--out", str(out), "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    shard = out / json.loads((out / "manifest.json").read_text())["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"with --root {(sample_tree / 'AFLW2000').resolve()} --out {out}):" in err


def test_the_build_line_names_the_biwi_tracking_it_used(sample_tree, tmp_path, capsys):
    """BIWI detector builds track by protocol 1's rule (none) or protocol 2's and none's (previous): the
    line heading the summary says which, as `dataprep protocols` does (it said only "boxes: mtcnn")."""
    root = tmp_path / "hpdb"
    shutil.copytree(sample_tree / "hpdb" / "01", root / "01")
    for protocol, tracking in (("1", "none"), ("none", "previous")):
        assert cli_main(["build", "--dataset", "biwi", "--protocol", protocol, "--root", str(root), "--out",
                         str(tmp_path / protocol), "--detector", "mtcnn", "--device", "cpu",
                         "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
        assert f"biwi, protocol {protocol}, boxes: mtcnn, tracking {tracking}, crop: square" in capsys.readouterr().out
    assert cli_main(["build", "--dataset", "biwi", "--protocol", "none", "--root", str(root), "--out",
                     str(tmp_path / "gt"), "--no-progress"]) == 0
    assert "biwi, protocol none, boxes: gt, crop: square" in capsys.readouterr().out  # no tracking of gt boxes


def test_verify_clean_build_has_no_problems(aflw_build, capsys):
    out, manifest = aflw_build
    for decode in (True, False):
        report = verify(str(out), decode=decode)
        assert report.problems == [] and report.ok
        assert report.shards_checked == len(manifest["shards"])
        assert report.samples_checked == manifest["counts"]["samples_in_shards"]
    assert cli_main(["verify", str(out), "--hash-only"]) == 0
    assert "sample(s) listed" in capsys.readouterr().out


def test_verify_checks_info_json_against_the_manifest(aflw_build, tmp_path):
    copy, manifest = _copy_build(aflw_build, tmp_path)
    info_path = copy / "_info.json"
    info = json.loads(info_path.read_text())
    split = manifest["shards"][0]["split"]
    info["splits"][split]["num_samples"] += 1
    info["splits"][split]["filenames"].append("test-000099.tar")
    info_path.write_text(json.dumps(info))
    problems = verify(str(copy)).problems
    assert len(problems) == 2
    assert all(p.startswith("_info.json: split") for p in problems)
    assert "num_samples" in problems[0] and "filenames" in problems[1]
    info_path.unlink()
    assert verify(str(copy), decode=False).problems == ["_info.json: missing; rerun the same build command to write it"]


@pytest.mark.parametrize("info", ['{"splits": []}', '{"splits": {"test": 5}}', '{"splits": null}', "[]", "{}"])
def test_verify_names_an_info_json_of_the_wrong_shape(aflw_build, tmp_path, capsys, info):
    """An edited _info.json whose splits are not objects was a traceback (exit 2): now a FAIL line."""
    copy, _ = _copy_build(aflw_build, tmp_path)
    (copy / "_info.json").write_text(info)
    assert cli_main(["verify", str(copy), "--hash-only"]) == 1
    err = capsys.readouterr().err
    assert "FAIL: _info.json: has no \"splits\" object of one object per split" in err and "Traceback" not in err, err


def test_verify_flags_unlisted_shards_and_tmp_leftovers(aflw_build, tmp_path):
    copy, manifest = _copy_build(aflw_build, tmp_path)
    first = copy / manifest["shards"][0]["name"]
    shutil.copy(first, copy / "train-000099.tar")
    shutil.copy(first, copy / "test-000042.tar.tmp")
    (copy / "notes.txt").write_text("the user's own file: not ours to judge")
    problems = verify(str(copy), decode=False).problems
    assert len(problems) == 2
    assert problems[0].startswith("test-000042.tar.tmp: left by an interrupted build; rerun the same build command")
    assert problems[0].endswith(f"with --out {copy} to finish it")  # the folder checked, not the one recorded
    assert problems[1].startswith("train-000099.tar: a shard file the manifest does not list")
    (copy / "manifest.json").unlink()  # an interrupted first build: the leftover is still named
    problems = verify(str(copy)).problems
    assert len(problems) == 2 and "no manifest" in problems[0] and problems[1].startswith("test-000042.tar.tmp")


def test_verify_checks_manifest_counts_and_unique_keys(aflw_build, tmp_path):
    copy, manifest = _copy_build(aflw_build, tmp_path)
    shard = manifest["shards"][0]
    edited = json.loads((copy / "manifest.json").read_text())
    edited["counts"]["per_split"][shard["split"]]["samples"] += 5
    # the same shard listed again under another name: every key of it is in two shards
    shutil.copy(copy / shard["name"], copy / "test-000099.tar")
    edited["shards"].append({**shard, "name": "test-000099.tar"})
    (copy / "manifest.json").write_text(json.dumps(edited))
    problems = verify(str(copy), decode=False).problems
    assert f"manifest.json: split {shard['split']!r} counts" in "\n".join(problems)
    assert "manifest.json: counts.samples_in_shards" in "\n".join(problems)
    dupes = [p for p in problems if p.startswith("test-000099.tar: sample key")]
    assert len(dupes) == shard["samples"] and all(p.endswith(f"is also in {shard['name']}") for p in dupes)


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_an_interrupted_threading_build_ends_at_once(sample_tree, tmp_path, monkeypatch, capsys, backend):
    """SIGTERM of a --backend threading build made the interpreter abort most times (the pool's
    threads cannot be stopped, and were still in OpenCV at exit: C++ "terminate called without an
    active exception", exit status 134 instead of 130): it now ends at once with 130, as a killed
    build does; process backends return 130 as before (their workers are stopped)."""
    def interrupted(opts):
        raise KeyboardInterrupt

    def ended(status):
        raise SystemExit(f"os._exit({status})")

    monkeypatch.setattr(build_mod, "build", interrupted)
    monkeypatch.setattr(os, "_exit", ended)
    args = ["build", "--dataset", "aflw2000", "--root", str(sample_tree / "AFLW2000"), "--out", str(tmp_path / "o"),
            "--backend", backend, "--no-progress"]
    if backend == "threading":
        with pytest.raises(SystemExit, match=r"os\._exit\(130\)"):
            cli_main(args)
    else:
        assert cli_main(args) == 130
    assert "dataprep build: interrupted. The shards finished so far are kept" in capsys.readouterr().err


def test_verify_says_how_to_repair_an_edited_manifest_or_info_json(aflw_build, sample_tree, tmp_path, capsys):
    """Counts or _info.json edited while every shard is sound: verify used to print the FAIL lines
    with no advice; the advised rerun writes both files again and keeps every shard."""
    copy, manifest = _copy_build(aflw_build, tmp_path)
    edited = json.loads((copy / "manifest.json").read_text())
    edited["counts"]["read"] += 1
    (copy / "manifest.json").write_text(json.dumps(edited))
    info = json.loads((copy / "_info.json").read_text())
    info["splits"]["test"]["num_samples"] += 1
    (copy / "_info.json").write_text(json.dumps(info))
    assert cli_main(["verify", str(copy), "--hash-only"]) == 1
    err = capsys.readouterr().err
    assert "FAIL: manifest.json: counts do not add up" in err and "FAIL: _info.json: split 'test' num_samples" in err
    assert re.search(rf"to write manifest.json and _info.json again, run the build again \(`.*`, with --out "
                     rf"{re.escape(str(copy))}\)\n", err), err
    assert "damaged shards" not in err
    build(opts(sample_tree / "AFLW2000", copy, "aflw2000"))
    assert f"resuming: {len(manifest['shards'])} of {len(manifest['shards'])} shard(s)" in capsys.readouterr().err
    assert verify(str(copy)).ok
    # the shards' records deleted (as the README allows once a build is finished): the rerun the
    # advice names writes every shard again, and the advice says so instead of "keeps the intact ones"
    shutil.rmtree(copy / ".dataprep-progress")
    (copy / manifest["shards"][0]["name"]).unlink()
    assert cli_main(["verify", str(copy), "--hash-only"]) == 1
    assert "it writes every shard again (.dataprep-progress/, its record of the shards, was deleted)" in \
        capsys.readouterr().err
    build(opts(sample_tree / "AFLW2000", copy, "aflw2000"))
    assert "resuming" not in capsys.readouterr().err
    assert verify(str(copy)).ok


def test_verify_checks_the_rejected_list_against_the_counts(aflw_build, tmp_path):
    copy, manifest = _copy_build(aflw_build, tmp_path)
    assert manifest["counts"]["rejected"] >= 2
    edited = json.loads((copy / "manifest.json").read_text())
    edited["rejected"] = edited["rejected"][1:]  # one rejected sample no longer named
    (copy / "manifest.json").write_text(json.dumps(edited))
    problems = verify(str(copy), decode=False).problems
    assert f"manifest.json: counts.rejected is {manifest['counts']['rejected']}, its rejected list names " \
           f"{manifest['counts']['rejected'] - 1} sample(s)" in problems
    assert "manifest.json: counts.rejected_by_reason does not match its rejected list" in problems


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["shards"][0].pop("sha256"), "shards[0].sha256 is None, not a SHA-256 hex digest"),
    (lambda m: m["shards"][0].update(samples="12"), "shards[0].samples is '12', not a count"),
    (lambda m: m["shards"][0].update(name=None), "shards[0].name is None, not a shard file name"),
    (lambda m: m["shards"][0].update(name="../elsewhere-000000.tar"), "shards[0].name is '../elsewhere-000000.tar'"),
    (lambda m: m.update(shards={"a": 1}), 'has no "shards" list'),
    (lambda m: m.update(rejected=None), "rejected is not a list of objects"),
    (lambda m: m.update(counts=[]), "counts is not an object"),
    (lambda m: m["counts"].update(per_split={"test": 3}), "counts.per_split is not an object of objects"),
])
def test_verify_and_audit_name_an_edited_manifest_instead_of_failing(aflw_build, tmp_path, capsys, edit, says):
    """Fields of the wrong kind (a hand edit, another tool's file) were tracebacks in verify and
    audit: now a FAIL line naming the field, and the audit refuses the build in one line."""
    copy, _ = _copy_build(aflw_build, tmp_path)
    edited = json.loads((copy / "manifest.json").read_text())
    edit(edited)
    (copy / "manifest.json").write_text(json.dumps(edited))
    assert cli_main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"FAIL: manifest.json: {says}" in err and "Traceback" not in err, err
    assert f"rerun the build (--out {copy}) to write the manifest again" in err
    assert cli_main(["audit", str(copy), "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "is not a dataprep build manifest (" in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_with_a_shards_name_stops_the_resumed_build(sample_tree, tmp_path, capsys):
    """fsspec's mv put the shard inside such a folder and the build listed it as written."""
    args = ["build", "--dataset", "aflw2000", "--protocol", "none", "--root", str(sample_tree / "AFLW2000"),
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli_main(args) == 0
    shard = tmp_path / "o" / "all-000000.tar"
    shard.unlink()
    shard.mkdir()
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert (f"dataprep build: error: a folder has the name of a file the build writes ({shard}); move it out of --out "
            "and run the same command again") in err
    assert list(shard.iterdir()) == [] and not list((tmp_path / "o").glob("*.tmp"))
    shard.rmdir()
    assert cli_main(args) == 0 and shard.is_file()


def test_verify_names_a_shard_that_is_not_a_regular_file(aflw_build, tmp_path):
    import os

    copy, manifest = _copy_build(aflw_build, tmp_path)
    first, second = (s["name"] for s in manifest["shards"][:2])
    (copy / first).unlink()
    (copy / first).mkdir()  # was IsADirectoryError
    (copy / second).unlink()
    os.mkfifo(copy / second)  # reading a pipe with no writer waited for ever
    problems = verify(str(copy), decode=False).problems
    assert f"{first}: not a regular file (directory); move it out of the way" in problems
    assert any(p.startswith(f"{second}: not a regular file (") for p in problems)


def _record(key: str) -> bytes:
    """The least label record verify accepts: the fields every reader takes, angles finite and the
    rotation theirs."""
    return json.dumps({"key": key, "yaw": 0.0, "pitch": 0.0, "roll": 0.0, "rotation": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                       "box": [0, 0, 8, 8], "crop": [0, 0, 8, 8], "source": f"{key}.jpg"}).encode()


def test_check_shard_flags_a_key_seen_again_later(tmp_path):
    import fsspec

    from dataprep.shards import write_shard
    from dataprep.verify import check_shard

    path = str(tmp_path / "test-000000.tar")
    write_shard(fsspec.filesystem("file"), path, [{"__key__": k, "jpg": b"not a jpeg", "json": _record(k)}
                                                  for k in ("a", "b", "a")])
    with open(path, "rb") as f:
        keys, problems = check_shard(f, decode=False)  # no decoding: the bad JPEG goes unnoticed
    assert keys == ["a", "b", "a"]
    assert problems == ["sample 'a' appears again after other samples (a.jpg)"]
    with open(path, "rb") as f:
        _, problems = check_shard(f)
    assert len(problems) == 4 and sum("JPEG does not decode" in p for p in problems) == 3


def test_check_shard_reads_member_names_as_webdataset_does(tmp_path):
    """A user's extra member ``a.meta.json`` is not a label record (its extension is ``meta.json``,
    as webdataset splits names), and a member without an extension, which webdataset readers skip,
    is named as such rather than counted as a sample."""
    import io
    import tarfile

    import cv2

    from dataprep.verify import check_shard

    jpg = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()
    record = {"key": "a", "yaw": 0.0, "pitch": 0.0, "roll": 0.0, "rotation": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
              "box": [0, 0, 8, 8], "crop": [0, 0, 8, 8], "source": "a.jpg"}
    members = [("a.jpg", jpg), ("a.json", json.dumps(record).encode()), ("a.meta.json", b'{"note": "mine"}'),
               ("README", b"notes")]
    path = tmp_path / "test-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        keys, problems = check_shard(f)
    assert keys == ["a"]
    assert problems == ["member 'README' has no extension: webdataset readers skip it"]


def test_check_shard_flags_a_damaged_jpeg_that_still_decodes(tmp_path):
    import cv2
    import fsspec

    from dataprep.shards import write_shard
    from dataprep.verify import check_shard

    picture = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8), (5, 5), 2)
    good = cv2.imencode(".jpg", picture)[1].tobytes()
    middle = (good.index(b"\xff\xda") + len(good)) // 2
    damaged = good[:middle] + b"\xff\xd9" + good[middle + 2:]  # a stray marker in the picture data
    path = str(tmp_path / "test-000000.tar")
    write_shard(fsspec.filesystem("file"), path, [{"__key__": "a", "jpg": good, "json": _record("a")},
                                                  {"__key__": "b", "jpg": damaged, "json": _record("b")}])
    with open(path, "rb") as f:
        _, problems = check_shard(f)
    assert len(problems) == 1 and problems[0].startswith("sample 'b' (b.jpg): damaged JPEG data (libjpeg: ")



def test_check_shard_names_a_damaged_depth_png(tmp_path, capfd):
    import fsspec

    from dataprep import codec
    from dataprep.shards import write_shard
    from dataprep.verify import check_shard

    depth = codec.encode_png(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64))
    damaged = bytearray(depth)
    damaged[len(depth) // 2] ^= 0x10
    jpg = codec.encode_jpeg_rgb(np.zeros((32, 32, 3), np.uint8), 90)
    path = str(tmp_path / "test-000000.tar")
    write_shard(fsspec.filesystem("file"), path, [
        {"__key__": "a", "jpg": jpg, "json": _record("a"), "depth.png": depth},
        {"__key__": "b", "jpg": jpg, "json": _record("b"), "depth.png": bytes(damaged)}])
    capfd.readouterr()
    with open(path, "rb") as f:
        _, problems = check_shard(f)
    assert len(problems) == 1 and problems[0].startswith("sample 'b' (b.depth.png): damaged PNG data (chunk IDAT at byte ")
    assert "libpng" not in capfd.readouterr().err

def test_verify_prints_a_capped_list_and_counts_all(aflw_build, tmp_path, capsys, monkeypatch):
    from dataprep import cli

    copy, manifest = _copy_build(aflw_build, tmp_path)
    for shard in manifest["shards"]:
        (copy / shard["name"]).unlink()
    monkeypatch.setattr(cli, "VERIFY_SHOWN", 1)
    assert cli_main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    n = len(manifest["shards"])
    assert err.count("FAIL:") == 1
    assert f"{n} problem(s) in {copy} (first 1 shown, {n - 1} more not)" in err


def test_cli_build_prints_summary(sample_tree, tmp_path, capsys):
    # the dataset as its download page names it
    rc = cli_main(["build", "--dataset", "AFLW2000-3D", "--root", str(sample_tree / "AFLW2000"), "--out", str(tmp_path),
                   "--no-progress", "--strict"])
    text = capsys.readouterr().out
    assert rc == 1  # --strict: the protocol filter rejected samples (problems found, as verify's FAIL lines)
    assert "angle_out_of_range" in text and "read" in text and "written" in text
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dataset"] == "aflw2000" and text.lstrip().startswith("aflw2000, protocol 1")
    assert manifest["command"].startswith("dataprep")
    assert manifest["input"]["fingerprint"]
    # default square crops: the summary says which load-time re-crops they cannot fill, and the fix
    assert "fsanet or hopenet rule" in text and "--margin 0.8" in text
    roomy = cli_main(["build", "--dataset", "aflw2000", "--root", str(sample_tree / "AFLW2000"),
                      "--out", str(tmp_path / "roomy"), "--no-progress", "--margin", "0.8"])
    assert roomy == 0 and "partly black" not in capsys.readouterr().out
    # crops of another rule cannot be re-cropped to any other rule either (the note was square-only)
    tight = cli_main(["build", "--dataset", "aflw2000", "--root", str(sample_tree / "AFLW2000"),
                      "--out", str(tmp_path / "box"), "--no-progress", "--crop-rule", "box"])
    text = capsys.readouterr().out
    assert tight == 0 and "these are box crops" in text and "--crop-rule square --margin 0.8" in text


def test_cli_errors_say_what_to_do(tmp_path, capsys):
    for name in ("BIWI", "300W-LP", "300W_LP"):  # taken: the next complaint is about --root
        assert cli_main(["build", "--dataset", name, "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
        assert "--root" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["build", "--dataset", "bwi", "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'bwi' (choose from" in capsys.readouterr().err
    assert cli_main(["build", "--dataset", "aflw2000", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--root" in capsys.readouterr().err
    assert cli_main(["build", "--dataset", "aflw2000", "--protocol", "2", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "protocol 2 has no aflw2000" in capsys.readouterr().err


def test_offline_augment_writes_variants_next_to_each_sample(sample_tree, tmp_path):
    manifest = build(opts(sample_tree / "300W_LP", tmp_path, "300w_lp", augment=("flip", "blur", "downsample"), shard_size=100))
    records = label_records(tmp_path)
    c = manifest["counts"]
    assert c["samples_in_shards"] == 4 * c["written"] and c["read"] == c["written"] + c["rejected"]
    originals = {k: r for k, r in records.items() if not r["augment"]}
    for key, rec in originals.items():
        flip = records[key + "_flip"]
        assert flip["source"] == rec["source"] and flip["augment"] == [{"op": "flip"}]
        assert flip["yaw"] == pytest.approx(-rec["yaw"]) and flip["roll"] == pytest.approx(-rec["roll"])
        assert flip["pitch"] == pytest.approx(rec["pitch"])
        assert np.allclose(labels.rotation_to_euler(flip["rotation"]), (flip["yaw"], flip["pitch"], flip["roll"]), atol=1e-6)
        assert [op["op"] for op in records[key + "_blur"]["augment"]] == ["blur"]
        assert records[key + "_downsample"]["augment"][0]["factor"] in (1, 6, 11, 16, 21)
    again = tmp_path / "again"
    build(opts(sample_tree / "300W_LP", again, "300w_lp", augment=("flip", "blur", "downsample"), shard_size=100))
    for shard in tmp_path.glob("*.tar"):
        assert shard.read_bytes() == (again / shard.name).read_bytes()


def test_a_file_named_like_a_variant_keeps_its_own_key(sample_tree, tmp_path):
    """``image00111_flip.jpg`` beside ``image00111.jpg``, built with ``--augment flip``: the real
    file's key is told apart (``-<sha1>``), so no shard holds two samples of one name (webdataset
    refuses such a shard, and verify names it)."""
    from dataprep.records import SampleRef, keys_apart_from_variants

    root = tmp_path / "AFLW2000"
    root.mkdir()
    for name in ("image00111", "image00348"):
        for ext in (".jpg", ".mat"):
            shutil.copy(sample_tree / "AFLW2000" / (name + ext), root / (name + ext))
    for ext in (".jpg", ".mat"):
        shutil.copy(root / ("image00348" + ext), root / ("image00111_flip" + ext))
    manifest = build(opts(root, tmp_path / "out", "aflw2000", protocol="none", augment=("flip",)))
    import tarfile

    names = [name for shard in sorted((tmp_path / "out").glob("*.tar")) for name in tarfile.open(shard).getnames()]
    assert len(names) == len(set(names))
    keys = set(label_records(tmp_path / "out"))
    assert len(keys) == manifest["counts"]["samples_in_shards"] == 2 * manifest["counts"]["written"] == 6
    assert {"aflw2000_image00111_flip", "aflw2000_image00111_flip-df19706c"} <= keys
    assert verify(str(tmp_path / "out")).ok
    refs = [SampleRef("d", "a", "a.jpg", "g"), SampleRef("d", "a_flip", "a_flip.jpg", "g"), SampleRef("d", "b", "b.jpg", "g")]
    assert [r.key for r in keys_apart_from_variants(refs, ())] == ["a", "a_flip", "b"]
    apart = keys_apart_from_variants(refs, ["_flip", "_blur"])
    assert [r.key for r in apart][0::2] == ["a", "b"] and apart[1].key.startswith("a_flip-")


def test_check_shard_flags_two_samples_of_one_name_side_by_side(tmp_path):
    import tarfile

    from dataprep.verify import check_shard

    path = tmp_path / "test-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "a.json", "a.jpg"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    with open(path, "rb") as f:
        keys, problems = check_shard(f, decode=False)
    assert keys == ["a"] and problems == ["member 'a.jpg' appears twice in sample 'a'"]


def test_real_samples_build_end_to_end(real_samples, tmp_path):
    """The few real files in ../shared/real_samples, through the whole pipeline (read only)."""
    m = build(opts(real_samples / "hpdb", tmp_path / "biwi", "biwi", protocol="none", detector="gt"))
    assert m["counts"]["written"] == 1
    (rec,) = label_records(tmp_path / "biwi").values()
    assert (rec["pitch"], rec["yaw"], rec["roll"]) == pytest.approx((7.607223, 3.290995, -1.566632), abs=1e-5)
    assert rec["source"] == "01/frame_00003_rgb.png"

    m = build(opts(real_samples / "AFLW2000", tmp_path / "aflw", "aflw2000", crop_rule="fsanet"))
    c = m["counts"]
    assert c["read"] == 8 == c["written"] + c["rejected"]
    for rec in label_records(tmp_path / "aflw").values():
        assert rec["box_source"] == "pt2d_valid"
        if rec["extra"]["pt2d_missing"]:
            # real placeholders stretch Hopenet's box to x = -1 / y = 452; FSA-Net's filter drops them
            assert rec["boxes"]["pt2d"][0] == -1 and rec["boxes"]["pt2d_valid"][0] > 0

    m = build(opts(real_samples / "300W_LP", tmp_path / "300wlp", "300w_lp"))
    recs = label_records(tmp_path / "300wlp")
    assert m["counts"]["written"] == 4
    orig, flip = recs["300w_lp_AFW_AFW_134212_1_0"], recs["300w_lp_AFW_Flip_AFW_134212_1_0"]
    # _Flip files are independent re-fits: yaw and roll roughly (not exactly) negated
    assert flip["yaw"] == pytest.approx(-orig["yaw"], abs=2) and flip["yaw"] != -orig["yaw"]
    assert flip["roll"] == pytest.approx(-orig["roll"], abs=2)


def test_augment_variants_are_written_in_the_train_split_only(sample_tree, tmp_path):
    # protocol 2 trains and tests on BIWI: the test split must stay as the dataset has it
    manifest = build(opts(sample_tree / "hpdb", tmp_path / "o", "biwi", protocol="2", detector="gt",
                          augment=("flip", "blur")))
    records = label_records(tmp_path / "o")
    by_split = {s: [r for r in records.values() if r["split"] == s] for s in ("train", "test")}
    assert by_split["train"] and by_split["test"]
    assert not [r for r in by_split["test"] if r["augment"]]
    train_variants = [r for r in by_split["train"] if r["augment"]]
    assert len(train_variants) == 2 * (len(by_split["train"]) - len(train_variants))
    per_split = manifest["counts"]["per_split"]
    assert per_split["test"]["samples"] == per_split["test"]["written"]
    assert per_split["train"]["samples"] == 3 * per_split["train"]["written"]
    # a build with no train split has nothing to augment: refused, not silently a no-op
    with pytest.raises(BuildError, match=r"--augment writes training variants, and this build has only evaluation data "
                                         r"\(splits: test\); to train on it, build with --protocol none"):
        build(opts(sample_tree / "AFLW2000", tmp_path / "a", "aflw2000", augment=("flip",)))
    # protocol none's one split, all, is training data: variants, as the message says
    manifest = build(opts(sample_tree / "AFLW2000", tmp_path / "n", "aflw2000", protocol="none", augment=("flip",)))
    assert manifest["counts"]["per_split"]["all"]["samples"] == 2 * manifest["counts"]["per_split"]["all"]["written"]


def test_augment_names_are_recorded_as_the_ops_they_name(sample_tree, tmp_path, capsys):
    """``--augment "flip, Blur"`` writes the flip and blur variants, so it is the build of
    ``flip,blur``: recorded as such (its rerun with the plain spelling was refused as made with
    other options), and ``--augment " "`` names no op (it was refused on evaluation data)."""
    root = str(sample_tree / "AFLW2000")
    out = tmp_path / "o"
    argv = ["build", "--dataset", "aflw2000", "--protocol", "none", "--root", root, "--out", str(out), "--no-progress"]
    assert cli_main([*argv, "--augment", "flip, Blur"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["augment"] == ["flip", "blur"]
    capsys.readouterr()
    assert cli_main([*argv, "--augment", "flip,blur"]) == 0  # the same build: resumed, nothing redone
    assert "other options" not in capsys.readouterr().err
    eval_only = ["build", "--dataset", "aflw2000", "--root", root, "--out", str(tmp_path / "t"), "--no-progress"]
    assert cli_main([*eval_only, "--augment", " "]) == 0
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["settings"]["augment"] == []


def test_hopenet_crops_are_drawn_in_the_train_split_and_fixed_in_the_test_split(sample_tree, tmp_path):
    from dataprep.crop import rule_window

    build(opts(sample_tree / "hpdb", tmp_path / "o", "biwi", protocol="2", detector="gt", crop_rule="hopenet"))
    records = label_records(tmp_path / "o")
    drawn = 0
    for rec in records.values():
        fixed = box_rules.integer_window(rule_window(rec, "hopenet"))  # test_hopenet.py's centred square
        if rec["split"] == "test":
            assert rec["crop"] == fixed, rec["key"]
        else:
            drawn += rec["crop"] != fixed  # train_hopenet.py's random 224/240 square
    assert drawn == len([r for r in records.values() if r["split"] == "train"]) > 0


def test_biwi_augment_variants_carry_no_stale_depth(sample_tree, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"by": "group", "train": ["01"]}))
    build(opts(sample_tree / "hpdb", tmp_path / "o", "biwi", protocol="2", detector="gt", split_file=str(split),
               augment=("flip",)))
    samples = {}
    for shard in (tmp_path / "o").glob("*.tar"):
        samples.update(read_tar(shard))
    flips = [k for k in samples if k.endswith("_flip")]
    assert flips
    for key in flips:
        assert "depth.png" not in samples[key] and "depth_crop" not in json.loads(samples[key]["json"])
        assert "depth.png" in samples[key[: -len("_flip")]]


def test_cli_says_what_to_do_instead_of_a_traceback(sample_tree, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    root = str(sample_tree / "AFLW2000")
    assert cli_main(["build", "--dataset", "aflw2000", "--root", root, "--out", str(a_file), "--no-progress"]) == 2
    assert "--out " + str(a_file) + " is a file; give a folder" in capsys.readouterr().err
    assert cli_main(["build", "--dataset", "aflw2000", "--root", root, "--out", str(a_file / "sub"), "--no-progress"]) == 2
    assert "cannot use it (NotADirectoryError" in capsys.readouterr().err  # not "check the URL, the endpoint"
    assert cli_main(["verify", str(tmp_path / "nowhere")]) == 2  # as audit's and build's missing folders
    assert "dataprep verify: error: " + str(tmp_path / "nowhere") + ": no such folder; give the --out folder of a " \
           "dataprep build" in capsys.readouterr().err
    # URLs fsspec cannot open: a scheme whose package is not installed, one it does not know
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:  # not a dependency: gs:// needs it installed
        for argv in (["build", "--dataset", "aflw2000", "--root", root, "--out", "gs://bucket/x", "--no-progress"],
                     ["verify", "gs://bucket/x"]):
            assert cli_main(argv) == 2, argv
            assert "gs://bucket/x: " in (err := capsys.readouterr().err) and "not installed); install it" in err, err
    for argv in (["build", "--dataset", "aflw2000", "--root", root, "--out", "nosuch://x", "--no-progress"],
                 ["verify", "nosuch://x"]):
        assert cli_main(argv) == 2, argv
        assert "nosuch://x: not a URL scheme fsspec knows" in capsys.readouterr().err
    # a store that does not answer
    from fsspec.implementations.local import LocalFileSystem

    def down(self, path, **kwargs):
        raise ConnectionError("store down")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalFileSystem, "exists", down)
        assert cli_main(["verify", str(tmp_path / "x")]) == 2
    assert "cannot reach it (ConnectionError: store down); check the URL, the endpoint" in capsys.readouterr().err
    # a folder a build started in and has not finished: said so, not "is this a build folder?"
    (tmp_path / "started" / ".dataprep-progress").mkdir(parents=True)
    assert cli_main(["verify", str(tmp_path / "started")]) == 1
    assert "no manifest yet: a build is running here or was interrupted" in capsys.readouterr().err
    assert cli_main(["build", "--dataset", "aflw2000", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    assert "--root " + str(tmp_path / "nope") + " does not exist; point it at" in capsys.readouterr().err
    # the raw folder itself as --out
    assert cli_main(["build", "--dataset", "aflw2000", "--root", root, "--out", root + "/", "--no-progress"]) == 2
    assert "is the --root folder" in capsys.readouterr().err
    assert not any(p.suffix == ".tar" for p in (sample_tree / "AFLW2000").iterdir())
    assert cli_main(["build", "--dataset", "biwi", "--root", str(sample_tree / "hpdb"), "--out", str(tmp_path / "b"),
                     "--detector", "gt", "--biwi-tracking", "none", "--no-progress"]) == 2
    assert "--biwi-tracking applies to detector boxes" in capsys.readouterr().err  # was accepted and ignored
    assert cli_main(["build", "--dataset", "biwi", "--root", str(sample_tree / "hpdb"), "--out", str(tmp_path / "b"),
                     "--protocol", "none", "--biwi-tracking", "previous", "--no-progress"]) == 2  # gt: the protocol's
    assert "--biwi-tracking applies to detector boxes" in capsys.readouterr().err

    assert cli_main(["sample", "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert f"dataprep sample: error: cannot write the sample tree (File exists: {a_file}); give --out a new or empty" in err
    assert "Errno" not in err and a_file.read_text() == "not a folder"
    real = tmp_path / "data" / "hpdb" / "01"  # a real download: the sample tree would write over it
    real.mkdir(parents=True)
    (real / "frame_00003_pose.txt").write_text("real")
    assert cli_main(["sample", "--out", str(tmp_path / "data")]) == 2
    assert "already holds hpdb" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "data").rglob("*")] == ["hpdb", "01", "frame_00003_pose.txt"]
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["build", "--dataset", "biwi", "--protocol", "2", "--root", str(sample_tree / "hpdb"),
                     "--out", str(tmp_path / "o"), "--device", "cuda", "--no-progress"]) == 2
    assert "--device cuda: torch sees no CUDA device here; use --device cpu" in capsys.readouterr().err

    def interrupted(opts):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "build", interrupted)
    assert cli_main(["build", "--dataset", "aflw2000", "--root", root, "--out", str(tmp_path / "o"), "--no-progress"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err

    from concurrent.futures.process import BrokenProcessPool

    from joblib.externals.loky.process_executor import TerminatedWorkerError

    def worker_died(opts):  # what joblib raises when the kernel kills a worker for memory
        raise TerminatedWorkerError("A worker process managed by the executor was unexpectedly terminated.\nmore")

    monkeypatch.setattr(build_mod, "build", worker_died)
    assert cli_main(["build", "--dataset", "aflw2000", "--root", root, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a worker process died (A worker process managed" in err
    assert "run the same command again to resume (with fewer --jobs if memory ran out)" in err

    import errno
    import os

    for number, says in ((errno.ENOSPC, "No space left on device (/out/test-000001.tar); the disk is full: free space "
                                        "(or choose another --out); the shards finished so far are kept, run the same "
                                        "command again to resume"),
                         (errno.EACCES, "Permission denied (/out/test-000001.tar); no permission: choose an --out you "
                                        "can write to")):
        def os_error(opts, number=number):
            raise OSError(number, os.strerror(number), "/out/test-000001.tar")

        monkeypatch.setattr(build_mod, "build", os_error)
        assert cli_main(["build", "--dataset", "aflw2000", "--root", root, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert f"dataprep build: error: {says}" in capsys.readouterr().err

    def pool_broke(opts):  # concurrent.futures' own, which may carry no message
        raise BrokenProcessPool()

    monkeypatch.setattr(build_mod, "build", pool_broke)
    assert cli_main(["build", "--dataset", "aflw2000", "--root", root, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "a worker process died (BrokenProcessPool); the shards finished so far are kept" in capsys.readouterr().err

    def terminated(opts):  # timeout / docker stop / a batch scheduler: SIGTERM ends it as Ctrl-C does
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(build_mod, "build", terminated)
    assert cli_main(["build", "--dataset", "aflw2000", "--root", root, "--out", str(tmp_path / "o"), "--no-progress"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(sample_tree, tmp_path, monkeypatch, capsys):
    """Ctrl-C in verify (or audit, sample: main catches it for every command) ends with one line and
    130, as an interrupted build does, not a KeyboardInterrupt traceback."""
    import dataprep.verify as verify_mod

    out = tmp_path / "o"
    assert cli_main(["build", "--dataset", "aflw2000", "--root", str(sample_tree / "AFLW2000"), "--out", str(out),
                     "--no-progress"]) == 0
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify_mod, "verify", interrupted)
    assert cli_main(["verify", str(out)]) == 130
    assert capsys.readouterr().err == "\ndataprep verify: interrupted\n"


def test_python_m_dataprep_runs_the_command():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "dataprep", "protocols"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "protocol" in done.stdout.lower()


def test_a_closed_output_pipe_is_not_a_traceback():
    """``dataprep protocols | head -0``: the reader is gone before we write; exit 141 quietly."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "dataprep.cli", "protocols"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_damaged_protocol_manifest_is_named(sample_tree, tmp_path, monkeypatch, capsys):
    """A protocol manifest that is not valid JSON (an edit gone wrong): builds and ``dataprep
    protocols`` name the file and say what to do, instead of a bare JSON error."""
    from dataprep import protocols

    folder = tmp_path / "manifests"
    shutil.copytree(protocols.MANIFESTS_DIR, folder)
    (folder / "protocol1.json").write_text('{"name": ')
    monkeypatch.setattr(protocols, "MANIFESTS_DIR", folder)
    says = f"{folder / 'protocol1.json'}: not a readable protocol manifest"
    assert cli_main(["protocols"]) == 2 and says in capsys.readouterr().err
    assert cli_main(["build", "--dataset", "aflw2000", "--root", str(sample_tree / "AFLW2000"),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert says in capsys.readouterr().err
    (folder / "protocol1.json").write_text("[]")
    with pytest.raises(ValueError, match=r"protocol1\.json: not a protocol manifest"):
        protocols.load("1", "aflw2000")
    (folder / "protocol1.json").write_text('{"name": "1", "datasets": {"aflw2000": {"split": "all"}}}')
    assert cli_main(["build", "--dataset", "aflw2000", "--root", str(sample_tree / "AFLW2000"),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "protocol1.json: dataset 'aflw2000' needs an object with \"splits\"" in capsys.readouterr().err
    # splits a build cannot use: two "all" splits (was "error: too many values to unpack"), a string
    # where the names' list belongs (its characters were taken as names: an empty split), another "by"
    for splits, says in (({"train": "all", "test": "all"}, '"splits" is one split of every sample'),
                         ({"by": "group", "train": "01", "test": ["02"]}, "each split needs a list of names"),
                         ({"by": "person", "test": ["02"]}, "\"by\" must be group, source, key, not 'person'"),
                         ({"../x": "all"}, "split names '../x' are not usable in shard file names")):
        (folder / "protocol1.json").write_text(json.dumps({"name": "1", "datasets": {"aflw2000": {"splits": splits}}}))
        assert cli_main(["build", "--dataset", "aflw2000", "--root", str(sample_tree / "AFLW2000"),
                         "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert f"protocol1.json: dataset 'aflw2000': {says}" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    # an angle_limit that is not a number: every sample was rejected as unexpected_error ("please report")
    (folder / "protocol1.json").write_text(json.dumps({"name": "1", "angle_limit": "99",
                                                       "datasets": {"aflw2000": {"splits": {"test": "all"}}}}))
    assert cli_main(["build", "--dataset", "aflw2000", "--root", str(sample_tree / "AFLW2000"),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "protocol1.json: \"angle_limit\" is the filter's bound in degrees (99) or null, not '99'" in capsys.readouterr().err


def test_protocol_manifests_ship_inside_the_package(sample_tree, tmp_path, monkeypatch, capsys):
    """The manifests are package data (an installed wheel has them; it had none when they lived
    only at the project's root), and an install without them says so instead of offering no
    protocol to choose."""
    import tomllib
    from fnmatch import fnmatch

    from dataprep import protocols

    package = Path(protocols.__file__).resolve().parent
    files = sorted(p.relative_to(package).as_posix() for p in protocols.MANIFESTS_DIR.resolve().glob("*.json"))
    assert {"manifests/protocol1.json", "manifests/protocol2.json", "manifests/none.json"} <= set(files)
    config = tomllib.loads((package.parent / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["dataprep"]
    assert all(any(fnmatch(f, g) for g in globs) for f in files)
    assert (package.parent / "manifests").resolve() == package / "manifests"  # the root's link

    monkeypatch.setattr(protocols, "MANIFESTS_DIR", tmp_path / "nothing_here")
    assert cli_main(["protocols"]) == 2
    assert f"no protocol manifests in {tmp_path / 'nothing_here'}" in capsys.readouterr().err
    assert cli_main(["build", "--dataset", "aflw2000", "--protocol", "3", "--root", str(sample_tree / "AFLW2000"),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no protocol manifests in" in capsys.readouterr().err


def test_protocol_names_any_case_and_unknown_ones_listed(sample_tree, tmp_path, capsys):
    assert cli_main(["protocols"]) == 0
    listed = capsys.readouterr().out
    assert "(samples with an angle outside [-99, 99] dropped)" in listed and listed.count("dropped") == 1
    assert cli_main(["build", "--dataset", "aflw2000", "--protocol", "7", "--root", str(sample_tree / "AFLW2000"),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown protocol '7'; choose one of 1, 2, none (`dataprep protocols` lists them)" in err
    assert ".json" not in err
    assert cli_main(["build", "--dataset", "aflw2000", "--protocol", "NONE", "--root", str(sample_tree / "AFLW2000"),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["protocol"] == "none"


def test_a_label_file_named_in_upper_case_is_read_and_watched_on_resume(sample_tree, tmp_path, monkeypatch):
    """``NAME.MAT`` beside ``NAME.jpg`` is the sample's label, and a resumed build rewrites the
    shard when it changes (the resume check watches the file the reader reads)."""
    root = tmp_path / "AFLW2000"
    shutil.copytree(sample_tree / "AFLW2000", root)
    mat = sorted(root.glob("*.mat"))[0]
    upper = mat.with_suffix(".MAT")
    mat.rename(upper)
    out = tmp_path / "o"
    first = build(opts(root, out, "aflw2000", protocol="none", shard_size=4))
    assert first["counts"]["rejected"] == 0
    upper.write_bytes(upper.read_bytes() + b"\0")  # another file, the same labels
    calls = []
    real_run_shard = build_mod.run_shard
    monkeypatch.setattr(build_mod, "run_shard", lambda task, *a: calls.append(task.name) or real_run_shard(task, *a))
    build(opts(root, out, "aflw2000", protocol="none", shard_size=4))
    assert calls == ["all-000000.tar"]


def _rewrite_shard(copy: Path, name: str, change) -> None:
    """Rewrite shard ``name`` member by member through ``change(member_name, data) -> data | None``
    (None drops the member), and record its new hash and size in the manifest, as a build that
    wrote it that way would have: only verify's own checks can tell."""
    import hashlib
    import io
    import tarfile

    members = []
    with tarfile.open(copy / name) as tar:
        for m in tar.getmembers():
            data = change(m.name, tar.extractfile(m).read())
            if data is not None:
                members.append((m.name, data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member_name, data in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (copy / name).write_bytes(buf.getvalue())
    manifest = json.loads((copy / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["name"] == name:
            shard["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
            shard["bytes"] = len(buf.getvalue())
    (copy / "manifest.json").write_text(json.dumps(manifest))


def test_verify_checks_every_sample_has_its_image_and_a_sound_record(aflw_build, tmp_path):
    copy, manifest = _copy_build(aflw_build, tmp_path)
    name = manifest["shards"][0]["name"]
    import tarfile

    def landmark_keys(shard):
        with tarfile.open(copy / shard) as tar:
            return sorted({m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".pts.npy")})

    first, second, third = landmark_keys(name)[:3]
    other = manifest["shards"][1]["name"]
    fourth, fifth = landmark_keys(other)[:2]
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)

    def change(member, data):
        if member == f"{first}.json":
            return None  # the label record gone
        if member == f"{fourth}.pts.npy":
            return pickled.getvalue()  # numpy's message advised loading it with allow_pickle
        if member == f"{fifth}.pts.npy":
            return b"garbage"
        if member in (f"{second}.json", f"{third}.json"):
            record = json.loads(data)
            record["yaw" if member.startswith(second) else "roll"] = "abc" if member.startswith(second) else 1e6
            return json.dumps(record).encode()
        return data

    _rewrite_shard(copy, name, change)
    _rewrite_shard(copy, other, change)
    problems = verify(str(copy)).problems
    assert f"{name}: sample {first!r} has no .json member (readers that expect the image and its label record " \
           "fail on it)" in problems
    assert f"{name}: sample {second!r} ({second}.json): record yaw is 'abc', not a finite number of degrees" in problems
    assert f"{name}: sample {third!r} ({third}.json): record roll is 1000000.0, past ±180 degrees" in problems
    assert f"{other}: sample {fourth!r} ({fourth}.pts.npy): landmarks do not load (an array of pickled objects, not numbers)" in problems
    assert f"{other}: sample {fifth!r} ({fifth}.pts.npy): landmarks do not load (damaged or not .npy data)" in problems
    assert len(problems) == 5, problems



def test_verify_checks_each_record_rotation_against_its_angles(aflw_build, tmp_path):
    """The stored rotation (what a matrix or 6D model trains on) is the rotation of the record's
    angles: a record whose yaw and roll were negated by hand, as a flip that forgets the matrix
    would, or whose rotation is no 3x3 matrix, is named."""
    copy, manifest = _copy_build(aflw_build, tmp_path)
    name = manifest["shards"][0]["name"]
    first, second = sorted(read_tar(copy / name))[:2]

    def change(member, data):
        if member in (f"{first}.json", f"{second}.json"):
            record = json.loads(data)
            if member.startswith(first):
                record["yaw"], record["roll"] = -record["yaw"], -record["roll"]
            else:
                record["rotation"] = [[1, 0], [0, 1]]
            return json.dumps(record).encode()
        return data

    assert verify(str(copy)).ok
    _rewrite_shard(copy, name, change)
    problems = verify(str(copy)).problems
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{name}: sample {first!r} ({first}.json): record rotation is not the rotation of "
                                  "its yaw, pitch and roll (off by up to ")
    assert problems[1] == (f"{name}: sample {second!r} ({second}.json): record rotation is [[1, 0], [0, 1]], not a "
                           "3x3 matrix of finite numbers")

def test_verify_names_where_info_json_lists_differ(aflw_build, tmp_path):
    copy, manifest = _copy_build(aflw_build, tmp_path)
    info_path = copy / "_info.json"
    info = json.loads(info_path.read_text())
    split = manifest["shards"][0]["split"]
    lengths = info["splits"][split]["shard_lengths"]
    want = info_path.read_text()
    # the last entry off by one: the heads of both lists alike, the message names where they part
    info["splits"][split]["shard_lengths"] = lengths[:-1] + [lengths[-1] + 1]
    info_path.write_text(json.dumps(info))
    (problem,) = [p for p in verify(str(copy), decode=False).problems if "shard_lengths" in p]
    n = len(lengths)
    assert problem == (f"_info.json: split {split!r} shard_lengths differs from the manifest's shards: entry {n - 1} "
                       f"is {lengths[-1] + 1} where the manifest's shards give {lengths[-1]} ({n} entries against {n})")
    info["splits"][split]["shard_lengths"] = lengths + [3]
    info_path.write_text(json.dumps(info))
    (problem,) = [p for p in verify(str(copy), decode=False).problems if "shard_lengths" in p]
    assert problem.endswith(f"the entries agree as far as both go ({n + 1} entries against {n})")
    info_path.write_text(want)
    assert verify(str(copy), decode=False).problems == []


def test_a_crash_of_a_dataprep_command_exits_2_with_its_traceback(monkeypatch, capsys):
    """An error no command foresaw: its traceback, one line asking for a report, and exit 2 (not 1,
    which says "done, and problems found" as a failed verify or build --strict does)."""
    from dataprep import cli

    def crash(args):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "cmd_protocols", crash)
    assert cli.main(["protocols"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1] == ("dataprep protocols: error: unexpected KeyError: 'boom' (a bug of "
                                             "headpose-dataprep, or an input it does not foresee: please report it "
                                             "with the traceback above)")


def test_the_readme_reading_recipes_run_as_printed(sample_tree, tmp_path):
    """The Python blocks of the README's "Shard format" (reading shards without dataprep) run as they
    are printed, from a folder holding `make demo`'s builds, and give samples."""
    import subprocess
    import sys

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Shard format"):text.index("## Label conventions")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2 and all("dataprep" not in re.sub(r"#.*", "", b) for b in blocks)  # no import of ours
    shards = tmp_path / "demo" / "shards"
    build(opts(sample_tree / "AFLW2000", shards / "aflw2000-p1", "aflw2000", protocol="1", shard_size=1000))
    build(opts(sample_tree / "hpdb", shards / "biwi-p2", "biwi", protocol="2", detector="gt", shard_size=1000))
    checks = ["assert isinstance(yaw, float) and image.shape[2] == 3",
              "image, depth, record = next(iter(ds)); assert depth.dtype.name == 'uint16' and depth.max() > 255"]
    for block, check in zip(blocks, checks):
        run = subprocess.run([sys.executable, "-c", block + "\n" + check], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr


def test_an_overwrite_stopped_while_removing_the_old_build_leaves_none_of_it(sample_tree, tmp_path, monkeypatch):
    """--overwrite removes the old build's shards before its manifest: stopped part way, running it
    again still finds and removes the rest (they were removed manifest first, and the shards left
    were known to no build: they stayed, and verify failed on them)."""
    out = tmp_path / "o"
    build(opts(sample_tree / "AFLW2000", out, "aflw2000", protocol="none", shard_size=1))  # all-*.tar
    old = sorted(p.name for p in out.glob("all-*.tar"))
    real_rm, removed = fsspec.implementations.local.LocalFileSystem.rm, []

    def rm_then_stop(self, path, *a, **k):
        if len(removed) == 3:
            raise KeyboardInterrupt  # Ctrl-C, SIGTERM
        removed.append(Path(path).name)
        return real_rm(self, path, *a, **k)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "rm", rm_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build(opts(sample_tree / "AFLW2000", out, "aflw2000", overwrite=True))
    monkeypatch.undo()
    assert set(removed) < set(old) and (out / "manifest.json").exists()  # shards first; the record of them stays
    build(opts(sample_tree / "AFLW2000", out, "aflw2000", overwrite=True))
    assert not list(out.glob("all-*")) and verify(str(out)).ok
    # the order itself, whatever order the folder lists its files in: the manifest goes last
    build(opts(sample_tree / "AFLW2000", out, "aflw2000", protocol="none", shard_size=1, overwrite=True))
    order = []
    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "rm",
                        lambda self, path, *a, **k: order.append(Path(path).name) or real_rm(self, path, *a, **k))
    build(opts(sample_tree / "AFLW2000", out, "aflw2000", overwrite=True))
    gone = order[:order.index("manifest.json") + 1]
    assert gone[-1] == "manifest.json" and set(old) <= set(gone)
    assert max(gone.index(name) for name in old) < min(gone.index(n) for n in gone if not n.startswith("all-"))


def test_a_lock_that_holds_no_build_token_is_named_and_a_lock_is_never_seen_empty(sample_tree, tmp_path, monkeypatch):
    """A lock file is written whole under another name and linked into place, so no build sees it
    empty; one that holds no build's token (an older version's killed as it took the lock, a full
    disk) is named with what to do, not taken for a build "started just now" for good."""
    from dataprep.pipeline import LOCK_FILE

    out = tmp_path / "o"
    out.mkdir()
    seen = []
    real_link = build_mod.os.link

    def link(src, dst, *a, **k):
        seen.append(Path(src).read_text())  # what the lock holds the moment it appears
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(build_mod.os, "link", link)
    build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    assert len(seen) == 1 and build_mod._LOCK_TOKEN.fullmatch(seen[0])
    assert not (out / LOCK_FILE).exists() and not list(out.glob(".dataprep.lock*"))
    for garbage in ("", "garbage"):
        (out / LOCK_FILE).write_text(garbage)
        with pytest.raises(BuildError, match=rf"\.dataprep\.lock holds no dataprep build's token \({garbage!r}\): .* "
                                             "delete it and run this command again"):
            build(opts(sample_tree / "AFLW2000", out, "aflw2000"))


def test_a_progress_record_of_the_wrong_shape_is_written_again_not_trusted(sample_tree, tmp_path):
    """An edited or damaged progress record (no result, counts that do not add up) is skipped as an
    unreadable one is: its shard is written again (it crashed the rerun, or its counts went into the
    manifest)."""
    out = tmp_path / "o"
    first = build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    records = sorted((out / ".dataprep-progress").glob("*.tar.json"))
    assert len(records) >= 2
    for record, edit in zip(records, (lambda e: dict(e, result="x"),
                                      lambda e: dict(e, result=dict(e["result"], read=e["result"]["read"] + 180)))):
        record.write_text(json.dumps(edit(json.loads(record.read_text()))))
    again = build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    assert again["counts"] == first["counts"] and again["shards"] == first["shards"] and verify(str(out)).ok



def test_a_rerun_names_shard_files_of_its_splits_it_did_not_write(sample_tree, tmp_path, capsys):
    """A shard file numbered past the build's last one (copied in) is named when the build ends: it
    finished with exit 0 while verify failed on the file."""
    out = tmp_path / "o"
    manifest = build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    last = manifest["shards"][-1]["name"]
    stray = out / f"test-{int(last[5:11]) + 5:06d}.tar"
    shutil.copy(out / last, stray)
    capsys.readouterr()
    build(opts(sample_tree / "AFLW2000", out, "aflw2000"))
    err = capsys.readouterr().err
    assert f"holds shard files of this build's splits that it did not write ({stray.name})" in err
    assert any(p.startswith(stray.name) for p in verify(str(out)).problems)
