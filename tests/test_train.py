"""train_minimal end to end on CPU: shards built by ``dataprep build`` from the generated sample
tree -> train a few steps (loss must fall on 4 repeated samples) -> checkpoint, metrics.json,
curves.png -> ``eval`` of the checkpoint reproduces the run's final metrics.

Kept small for 2 CPU cores: batch 4, a handful of steps, ``--pretrained none``, reduced input
sizes for the heavy models (``--input-size``). The slowest runs (Hopenet, the EHPNet teachers +
distillation) are marked ``slow`` but run in the default suite.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dataprep.cli import main as dataprep_main
from train_minimal import registry
from train_minimal.data import make_loader, prepare_batch, shard_samples
from train_minimal import train as train_mod
from train_minimal.train import main

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(sample_tree, tmp_path_factory):
    """300W-LP (train, with 68 landmarks) and AFLW2000 (test) shards, plus a 4-sample shard."""
    root = tmp_path_factory.mktemp("train_shards")
    for dataset, sub, out in (("300w_lp", "300W_LP", "lp"), ("aflw2000", "AFLW2000", "aflw")):
        rc = dataprep_main(["build", "--dataset", dataset, "--root", str(sample_tree / sub), "--out", str(root / out),
                            "--protocol", "1", "--margin", "0.5", "--crop-size", "128", "--jobs", "1", "--no-progress"])
        assert rc == 0
    train = sorted((root / "lp").glob("train-*.tar"))
    val = sorted((root / "aflw").glob("test-*.tar"))
    assert train and val
    # Four samples, copied member by member with plain tarfile.
    four = root / "four.tar"
    with tarfile.open(train[0]) as src, tarfile.open(four, "w") as dst:
        keys: list[str] = []
        for m in src.getmembers():
            key = m.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == 4:
                    continue
                keys.append(key)
            dst.addfile(m, src.extractfile(m))
    return SimpleNamespace(train="::".join(map(str, train)), val="::".join(map(str, val)), four=str(four))


def train(out: Path, model: str, *extra: str) -> dict:
    argv = ["train", "--model", model, "--batch-size", "4", "--device", "cpu", "--out", str(out),
            "--pretrained", "none", "--workers", "0", *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def run_eval(capsys, ckpt: Path, data: str, *extra: str) -> tuple[dict, str]:
    """``eval``'s result (its last output line is one JSON object) and what it wrote to stderr."""
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(ckpt), "--data", data, "--device", "cpu", *extra]) == 0
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), err


def check_run(out: Path, metrics: dict, capsys, data: str, model: str, *, falls: bool = True,
              eval_extra: tuple[str, ...] = (), eval_warns: bool | None = None, eval_says: str = "") -> dict:
    losses = [s["loss"] for s in metrics["steps"]]
    assert losses and all(math.isfinite(v) for v in losses)
    if falls:  # thirds, not single steps: the papers' online augmentation makes steps noisy
        third = max(1, len(losses) // 3)
        assert sum(losses[-third:]) / third < 0.9 * sum(losses[:third]) / third, losses
    assert [s["step"] for s in metrics["steps"]] == list(range(1, len(losses) + 1))
    assert (out / "curves.png").stat().st_size > 5000
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["model"] == model and ckpt["step"] == len(losses)
    for entry in metrics["epochs"]:
        assert math.isfinite(entry["train_loss"])
    final = metrics["final"]["aflw"]
    assert final == metrics["epochs"][-1]["val"]["aflw"] == ckpt["metrics"]["aflw"]
    got, err = run_eval(capsys, out / "checkpoint.pt", data, "--model", model, *eval_extra)
    if eval_warns is not None:
        assert ("[eval] warning: the stored crops" in err) == eval_warns, err
    assert eval_says in err, err
    assert got["model"] == model and got["samples"] == final["samples"] == 10
    for k in ("yaw", "pitch", "roll", "mean"):
        assert got[k] == pytest.approx(final[k], rel=1e-9, abs=1e-9), k
    return ckpt


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def test_the_crop_room_warning_is_printed_once_per_set_of_shards(shards, tmp_path, capsys):
    """``--val`` naming the training shards (as the same text or another spelling of the same files)
    printed the same warning once for each."""
    four = Path(shards.four)
    capsys.readouterr()
    train(tmp_path / "run", "fsanet_1x1", "--train", shards.four, "--val", f"same={shards.four}",
          "--val", f"again={four.parent}/./{four.name}", "--val", f"aflw={shards.val}", "--steps", "1")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("[train] warning: the stored crops")]
    assert len(warnings) == 2, err  # the training shards' and aflw's
    assert f"the stored crops of {four} hold" in warnings[0] and "aflw/test-000000.tar hold" in warnings[1], err


def test_loader_recrops_and_maps_landmarks(shards):
    spec = registry.get("mnn")
    assert sum(shard_samples(shards.train)) == 20
    loader = make_loader(shards.train, spec, 4, train=True, workers=0, seed=0, input_size=64)
    batches = list(loader)
    assert len(batches) == 5 == loader.batches_per_epoch
    x, targets = prepare_batch(batches[0], spec.normalize, torch.device("cpu"), size=64)
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 3
    lms = targets["landmarks"]
    assert lms.shape == (4, 68, 2) and targets["landmarks_mask"].all()
    assert float(lms.min()) > -4 and float(lms.max()) < 68  # square crop around the landmark box
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 20
    # the next epoch is another order
    assert [k for b in loader for k in b["key"]] != keys
    # evaluation loaders: every sample once, partial last batch, deterministic
    ev = make_loader(shards.val, registry.get("hopenet"), 4, train=False)
    a, b = list(ev), list(ev)
    assert [len(x["key"]) for x in a] == [4, 4, 2]
    assert all(torch.equal(p["image"], q["image"]) for p, q in zip(a, b))


def test_crop_room_warning_says_how_to_build(shards):
    from train_minimal.data import crop_coverage, crop_room_warning

    fsanet, square = registry.get("fsanet_var"), registry.get("ehpnet")
    coverage, url = crop_coverage(shards.val, "fsanet")
    assert 0.5 < coverage < 0.95 and url == shards.val  # built with --margin 0.5; FSA-Net needs 0.6
    warning = crop_room_warning(shards.val, fsanet)
    assert f"{coverage:.0%}" in warning and "--margin 0.6" in warning and "fsanet_var" in warning
    assert crop_room_warning(shards.val, square) is None and crop_coverage(shards.val, "square")[0] == 1.0
    assert crop_room_warning("s3://bucket/shard.tar", fsanet) is None  # remote: not read here


def test_crop_coverage_reads_only_label_records(shards, tmp_path):
    """A user's ``KEY.meta.json`` beside our record is another member of the sample, not a record:
    it must not be read as one (it has no boxes: ``train``/``eval`` would stop with a KeyError)."""
    import io

    from train_minimal.data import crop_coverage

    path = tmp_path / "val-000000.tar"
    with tarfile.open(shards.val) as src, tarfile.open(path, "w") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member))
            if member.name.endswith(".json"):
                info = tarfile.TarInfo(member.name[:-len("json")] + "meta.json")
                info.size = 2
                dst.addfile(info, io.BytesIO(b"{}"))
    assert crop_coverage(str(path), "fsanet")[0] == crop_coverage(shards.val, "fsanet")[0]


def test_jpeg_batches_decode_like_the_cpu_path(shards):
    """``gpu_decode`` batches (JPEG bytes + window) through ``prepare_batch`` on the CPU device
    (``decode_jpeg(device=...)`` is the same call on CUDA): the cv2 path's images, same targets."""
    spec = registry.get("hopenet")
    cpu = torch.device("cpu")
    plain = make_loader(shards.val, spec, 4, train=False, input_size=96)
    raw = make_loader(shards.val, spec, 4, train=False, input_size=96, gpu_decode=True)
    for p, r in zip(plain, raw):
        assert "jpeg" in r and "image" not in r and p["key"] == r["key"]
        xp, tp = prepare_batch(p, spec.normalize, cpu, size=96)
        xr, tr = prepare_batch(r, spec.normalize, cpu, size=96, channels_last=True)
        assert xr.shape == xp.shape == (len(p["key"]), 3, 96, 96) and xr.is_contiguous(memory_format=torch.channels_last)
        # vs reduced decoding + warp, imagenet units: the cv2 path's snap moves a padded edge by up to
        # about an output pixel, so batches differ by 0.006-0.035 here (the exact cut below: < 0.3 grey levels)
        assert float((xr - xp).abs().mean()) < 0.04
        assert tp.keys() == tr.keys() and all(torch.equal(tp[k], tr[k]) for k in tp if k != "landmarks")
        # the cv2 path snaps a window past the stored crop by about an output pixel (crop.cut_window),
        # the device cuts the integer window: each path's landmarks follow its own picture
        assert float((tp["landmarks"] - tr["landmarks"]).abs().max()) < 1.5
    # The device path resizes as the CPU's exact cut does (plain bilinear): the same pixels up to
    # rounding, so --gpu-decode training sees what CPU evaluation sees (antialiasing gave ~1.7).
    from dataprep.loader import make_loader as dataprep_loader

    exact = dataprep_loader(shards.val, 4, crop_rule=spec.crop_rule, size=96, random_crop=False, shuffle=0,
                            image_format="uint8", exact_cut=True)
    for e, r in zip(exact, make_loader(shards.val, spec, 4, train=False, input_size=96, gpu_decode=True)):
        xr, _ = prepare_batch(r, None, cpu, size=96)
        assert e["key"] == r["key"] and float((xr * 255 - e["image"].float()).abs().mean()) < 0.3


def test_resampled_epochs_have_a_fixed_length(shards):
    spec = registry.get("ehpnet")
    loader = make_loader(shards.four, spec, 2, train=True, workers=2, seed=1, epoch_length=10)
    assert loader.batches_per_epoch == 5
    assert [sum(1 for _ in loader) for _ in range(2)] == [5, 5]


# --------------------------------------------------------------------------------------------
# training runs
# --------------------------------------------------------------------------------------------
def test_train_ehpnet(shards, tmp_path, capsys):
    out = tmp_path / "ehpnet"
    # its own augmentation (flips, colour, trims, blur, grey) makes steps noisy: 20 samples, 5 steps an epoch
    metrics = train(out, "ehpnet", "--train", shards.train, "--val", f"aflw={shards.val}", "--epochs", "4")
    assert len(metrics["epochs"]) == 4 and len(metrics["steps"]) == 20 and metrics["args"]["lr"] == 1e-3
    check_run(out, metrics, capsys, shards.val, "ehpnet")


def test_train_whenet(shards, tmp_path, capsys):
    out = tmp_path / "whenet"
    metrics = train(out, "whenet", "--train", shards.four, "--val", f"aflw={shards.val}", "--epochs", "4",
                    "--input-size", "128", "--lr", "3e-4")
    check_run(out, metrics, capsys, shards.val, "whenet")


def test_train_mnn_with_landmarks(shards, tmp_path, capsys):
    out = tmp_path / "mnn"
    metrics = train(out, "mnn", "--train", shards.four, "--val", f"aflw={shards.val}", "--epochs", "3",
                    "--input-size", "64")
    ckpt = check_run(out, metrics, capsys, shards.val, "mnn")
    assert ckpt["args"]["input_size"] == 64
    assert any(k.startswith("decoder.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("model, extra", [
    ("fsanet_1x1", ()), ("fsanet_var", ()), ("fsanet_wo", ()), ("fsanet_fusion", ()), ("ssrnet_md", ()),
    ("mnn_pose", ("--input-size", "64")),
])
def test_train_the_64px_models_from_the_cli(shards, tmp_path, capsys, model, extra):
    """Every registry model trains from shards through the CLI, ``--pretrained none`` included
    (the FSA-Net and SSR-Net builders once took "none" for a file name)."""
    out = tmp_path / model
    capsys.readouterr()
    metrics = train(out, model, "--train", shards.four, "--val", f"aflw={shards.val}", "--epochs", "12",
                    "--lr", "3e-3", *extra)
    assert metrics["args"]["lr"] == 3e-3 and metrics["args"]["pretrained"] == "none"
    # these shards were built with --margin 0.5: FSA-Net's window (0.6 per side) does not fit
    needs_room = registry.get(model).crop_rule == "fsanet"
    assert ("[train] warning: the stored crops" in capsys.readouterr().err) == needs_room
    # --gpu-decode without a GPU: said, and the CPU's decode gives the recorded metrics
    gpu = ("--gpu-decode",) if model == "ssrnet_md" else ()
    check_run(out, metrics, capsys, shards.val, model, eval_warns=needs_room, eval_extra=gpu,
              eval_says="[eval] --gpu-decode needs a CUDA device; decoding on the CPU" if gpu else "")


def test_mixed_precision_training_and_eval(shards, tmp_path, capsys):
    """``--amp bf16`` runs the trainer's autocast path (on CUDA ``--amp auto`` picks it): losses in
    float32, the loss falls, and ``eval --amp bf16`` reproduces the recorded metrics."""
    out = tmp_path / "amp"
    metrics = train(out, "fsanet_var", "--train", shards.four, "--val", f"aflw={shards.val}", "--epochs", "12",
                    "--lr", "3e-3", "--amp", "bf16")
    assert metrics["args"]["amp"] == "bfloat16"
    check_run(out, metrics, capsys, shards.val, "fsanet_var", eval_extra=("--amp", "bf16"))
    from train_minimal.engine import amp_dtype_for

    cpu = torch.device("cpu")
    assert amp_dtype_for(cpu) is None and amp_dtype_for(cpu, "off") is None  # auto: float32 on CPU
    assert amp_dtype_for(cpu, "bf16") == torch.bfloat16 and amp_dtype_for(cpu, "fp16") == torch.float16
    with pytest.raises(SystemExit):  # argparse: not a choice
        main(["train", "--model", "fsanet_var", "--train", shards.four, "--steps", "1", "--out", str(out),
              "--amp", "fp8"])


def test_ddp_two_ranks_on_cpu_with_torchrun(shards, tmp_path, capsys):
    """``torchrun`` with 2 ranks (gloo on CPU): resampled shards give both ranks the same number of
    batches (else DDP would hang: the subprocess timeout fails the test), rank 0 alone evaluates and
    writes, and the checkpoint evaluates to the metrics it recorded."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train_minimal", "train", "--model", "fsanet_1x1", "--train", shards.train,
           "--val", f"aflw={shards.val}", "--epochs", "2", "--batch-size", "4", "--device", "cpu",
           "--pretrained", "none", "--workers", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    samples = sum(shard_samples(shards.train))
    per_rank = samples // (2 * 4)  # the epoch length defaults to the samples in the shards, all ranks together
    assert metrics["args"]["world_size"] == 2 and per_rank >= 1
    assert [e["step"] for e in metrics["epochs"]] == [per_rank, 2 * per_rank]
    steps = sorted(re.findall(r"\[train\] rank (\d)/2: (\d+) steps", res.stdout))
    assert steps == [("0", str(2 * per_rank)), ("1", str(2 * per_rank))], res.stdout
    assert res.stdout.count("[train] epoch 1 ") == 1  # evaluated once, not per rank
    check_run(out, metrics, capsys, shards.val, "fsanet_1x1", falls=False)


@pytest.mark.slow
def test_train_hopenet(shards, tmp_path, capsys):
    out = tmp_path / "hopenet"
    # the paper's Adam lr, 1e-5, barely moves a network from scratch in a few steps on flipped
    # and blurred inputs (Hopenet's own augmentation, applied in training): 1e-4 here
    assert registry.get("hopenet").defaults["lr"] == 1e-5
    metrics = train(out, "hopenet", "--train", shards.four, "--val", f"aflw={shards.val}", "--epochs", "4",
                    "--input-size", "112", "--alpha", "2", "--lr", "1e-4")
    assert metrics["args"]["alpha"] == 2.0 and metrics["args"]["lr"] == 1e-4
    assert metrics["args"]["param_group_lrs"] == [0.0, 1e-4, pytest.approx(5e-4)]  # stem frozen, heads 5 x lr
    check_run(out, metrics, capsys, shards.val, "hopenet")
    # from scratch every batch norm trains (no ImageNet statistics to keep)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
    assert int(state["backbone.layer1.0.bn1.num_batches_tracked"]) > 0
    # from weights (this checkpoint's), the ones train_hopenet.py leaves in eval mode count no
    # batch and keep their statistics; the stem's and the downsample ones train
    again = tmp_path / "hopenet_pretrained"
    train(again, "hopenet", "--train", shards.four, "--steps", "2", "--input-size", "112",
          "--pretrained", str(out / "checkpoint.pt"))
    after = torch.load(again / "checkpoint.pt", weights_only=True)["state_dict"]
    for frozen in ("backbone.layer1.0.bn1", "backbone.layer4.2.bn3"):
        assert int(after[f"{frozen}.num_batches_tracked"]) == int(state[f"{frozen}.num_batches_tracked"])
        torch.testing.assert_close(after[f"{frozen}.running_mean"], state[f"{frozen}.running_mean"])
    for trained in ("backbone.bn1", "backbone.layer1.0.downsample.1"):
        assert int(after[f"{trained}.num_batches_tracked"]) == int(state[f"{trained}.num_batches_tracked"]) + 2


@pytest.mark.slow
def test_knowledge_distillation_from_teachers(shards, tmp_path, capsys):
    teachers = []
    for name in ("ehpnet_resnet101", "ehpnet_res2net101", "ehpnet_botnet"):
        out = tmp_path / name
        train(out, name, "--train", shards.four, "--epochs", "1")
        teachers.append(str(out / "checkpoint.pt"))
    out = tmp_path / "student"
    # the student starts from the weights --seed gives it, whatever building the teachers drew
    seeded = torch.random.manual_seed(0).get_state()
    student_rng = []
    real_build = train_mod.build_model

    def build_model(spec, pretrained, input_size):
        if pretrained is not None:  # the student (teachers are built with pretrained=None)
            student_rng.append(torch.random.get_rng_state())
        return real_build(spec, pretrained, input_size)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "build_model", build_model)
        metrics = train(out, "ehpnet", "--train", shards.four, "--val", f"aflw={shards.val}", "--steps", "4",
                        "--epoch-length", "16", "--teachers", ",".join(teachers))
    assert len(student_rng) == 1 and torch.equal(student_rng[0], seeded)
    assert metrics["args"]["teachers"] == teachers and metrics["args"]["kd_weight"] == 10.0
    assert len(metrics["epochs"]) == 1 and metrics["epochs"][0]["step"] == 4
    check_run(out, metrics, capsys, shards.val, "ehpnet")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_cli_errors_are_clear(shards, tmp_path, capsys):
    ckpt = tmp_path / "t"
    with pytest.raises(SystemExit, match="no distillation loss"):
        main(["train", "--model", "whenet", "--train", shards.four, "--steps", "1", "--out", str(ckpt),
              "--pretrained", "none", "--workers", "0", "--device", "cpu", "--teachers", "x.pt"])
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: --teachers checkpoint .*nope\.pt not found"):
        # a wrong teacher path fails before the student is built (and its pretrained weights fetched)
        mp.setattr(train_mod, "build_model", lambda *a, **k: pytest.fail("student built before the teachers were read"))
        main(["train", "--model", "ehpnet", "--train", shards.four, "--steps", "1", "--out", str(ckpt),
              "--pretrained", "auto", "--workers", "0", "--device", "cpu", "--teachers", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit):
        main(["train", "--model", "ehpnet", "--train", shards.four, "--steps", "1", "--epochs", "1", "--out", str(ckpt)])
    for zero in (["--steps", "0"], ["--epochs", "-1"], ["--steps", "1", "--batch-size", "0"],
                 ["--steps", "1", "--input-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--model", "ehpnet", "--train", shards.four, *zero, "--out", str(ckpt)])
        assert exc.value.code == 2 and "give 1 or more" in capsys.readouterr().err
    # a learning rate or loss weight torch would take as a traceback ("Invalid learning rate") or
    # silently (0, inf: weights that never move or turn NaN): refused by argparse, naming the option
    for option, value, says in (("--lr", "-1", "give 0 or more"), ("--lr", "nan", "give 0 or more"),
                                ("--lr", "0", "give a finite number above 0"), ("--lr", "inf", "give a finite number above 0"),
                                ("--alpha", "-2", "give 0 or more"), ("--kd-weight", "nan", "give 0 or more"),
                                ("--kd-weight", "inf", "give a finite number, 0 or more")):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--model", "ehpnet", "--train", shards.four, "--steps", "1", option, value, "--out", str(ckpt)])
        assert exc.value.code == 2 and f"argument {option}: {value}: {says}" in capsys.readouterr().err
    # settings the run would drop without a word (metrics.json then said alpha/kd_weight null)
    with pytest.raises(SystemExit, match=r"^python -m train_minimal train: error: --alpha: fsanet_var's loss has no "
                                         r"regression weight \(it is for ehpnet, .*hopenet, whenet\)$"):
        main(["train", "--model", "fsanet_var", "--train", shards.four, "--steps", "1", "--alpha", "2", "--out", str(ckpt)])
    with pytest.raises(SystemExit, match=r"^python -m train_minimal train: error: --kd-weight weights the distillation "
                                         r"from --teachers: give --teachers too$"):
        main(["train", "--model", "ehpnet", "--train", shards.four, "--steps", "1", "--kd-weight", "5", "--out", str(ckpt)])
    for command in (["train", "--model", "ehpnet", "--train", shards.four, "--steps", "1", "--out", str(ckpt)],
                    ["eval", "--ckpt", str(ckpt), "--data", shards.val]):
        with pytest.raises(SystemExit) as exc:
            main(command + ["--workers", "-1"])  # DataLoader would refuse it only after the model is built
        assert exc.value.code == 2 and "--workers: -1: give 0 (read in the main process) or more" in capsys.readouterr().err
    for fixed in ("fsanet_var", "ssrnet_md"):  # dense layers sized for 64 px: refused before anything runs
        with pytest.raises(SystemExit, match=f"^python -m train_minimal [a-z-]+: error: {fixed} takes 64 px inputs only"):
            main(["train", "--model", fixed, "--train", shards.four, "--steps", "1", "--input-size", "32",
                  "--out", str(ckpt), "--pretrained", "none", "--workers", "0", "--device", "cpu"])
    not_a_checkpoint = tmp_path / "not_a_checkpoint.pt"
    not_a_checkpoint.write_bytes(Path(shards.four).read_bytes()[:4096])
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: .*not_a_checkpoint\.pt is not a checkpoint torch can read"):
        main(["eval", "--ckpt", str(not_a_checkpoint), "--data", shards.val, "--device", "cpu"])
    # a bare state dict of another model than --model: one line, not torch's key list as a crash;
    # as a teacher (--model names the student) it is refused for naming no model
    bare = tmp_path / "bare_fsanet_var.pt"
    torch.save(registry.get("fsanet_var").build(None).state_dict(), bare)
    with pytest.raises(SystemExit, match=r"^python -m train_minimal eval: error: checkpoint .*bare_fsanet_var\.pt does "
                                         r"not hold ssrnet_md's weights \(.*; pass the --model it was trained as$"):
        main(["eval", "--ckpt", str(bare), "--model", "ssrnet_md", "--data", shards.val, "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"^python -m train_minimal train: error: teacher .*bare_fsanet_var\.pt is a bare "
                                         r"state dict, which does not name its model"):
        main(["train", "--model", "ehpnet", "--train", shards.four, "--steps", "1", "--out", str(ckpt),
              "--workers", "0", "--device", "cpu", "--teachers", str(bare)])
    with pytest.raises(SystemExit, match=r"is a folder; give its checkpoint\.pt"):
        main(["eval", "--ckpt", str(tmp_path), "--data", shards.val, "--device", "cpu"])
    # --pretrained files that cannot be used: one line naming the file, for every way models load them
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not weights")
    for model in ("hopenet", "mnn", "ssrnet_md", "fsanet_var"):
        for path, says in ((text_file, "neither a zip archive torch.save writes nor a pickle"),
                           (tmp_path / "nope.pth", "no such file")):
            with pytest.raises(SystemExit, match=rf"^python -m train_minimal [a-z-]+: error: --pretrained {re.escape(str(path))}: .*{says}"):
                main(["train", "--model", model, "--train", shards.four, "--steps", "1", "--out", str(ckpt),
                      "--pretrained", str(path), "--workers", "0", "--device", "cpu"])
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: --pretrained .*other\.pth: not ssrnet_md's "
                                         r"weights \(it lacks \d+ of the network's tensors \(backbone\..*\); it holds 1 the "
                                         r"network does not have \(fc\.weight\)\)$"):
        main(["train", "--model", "ssrnet_md", "--train", shards.four, "--steps", "1", "--out", str(ckpt),
              "--pretrained", str(other), "--workers", "0", "--device", "cpu"])
    # another model's checkpoint for an FSA-Net: named as such (it was a KeyError's bare "'ssrnet_md'")
    ssrnet_run = tmp_path / "ssrnet_checkpoint.pt"
    torch.save({"model": "ssrnet_md", "state_dict": registry.get("ssrnet_md").build(None).state_dict()}, ssrnet_run)
    with pytest.raises(SystemExit, match=r"^python -m train_minimal train: error: --pretrained .*ssrnet_checkpoint\.pt: "
                                         r"cannot load fsanet_var's weights from it \(.*ssrnet_checkpoint\.pt holds "
                                         r"ssrnet_md, not an FSA-Net\)$"):
        main(["train", "--model", "fsanet_var", "--train", shards.four, "--steps", "1", "--out", str(ckpt),
              "--pretrained", str(ssrnet_run), "--workers", "0", "--device", "cpu"])
    for length in (["--epochs", "1"], ["--steps", "1"]):
        with pytest.raises(SystemExit, match="no full batch|gave no training batch"):
            main(["train", "--model", "ehpnet", "--train", shards.four, "--batch-size", "8", *length,
                  "--out", str(ckpt), "--pretrained", "none", "--workers", "0", "--device", "cpu"])
    assert not ckpt.exists()  # none of these runs left an output folder behind
    with pytest.raises(SystemExit, match=r"error: checkpoint .*nope\.pt not found"):
        main(["eval", "--ckpt", str(tmp_path / "nope.pt"), "--data", shards.val, "--device", "cpu"])
    # a sample the loader cannot use (a null angle: it trained on NaN labels before): one line
    nulled = tmp_path / "nulled.tar"
    with tarfile.open(shards.four) as src, tarfile.open(nulled, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".json") and not any(d.name.endswith(".json") for d in dst.getmembers()):
                record = json.loads(data)
                record["yaw"], bad_key = None, record["key"]
                data = json.dumps(record).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    for workers in ("0", "2"):
        with pytest.raises(SystemExit, match=rf"^python -m train_minimal train: error: sample '{bad_key}' in .*nulled\.tar: "
                                             r"ValueError: record yaw is None, not a finite number of degrees; check"):
            main(["train", "--model", "ssrnet_md", "--train", str(nulled), "--epochs", "1", "--batch-size", "2",
                  "--out", str(tmp_path / "nulled_run"), "--workers", workers, "--device", "cpu", "--pretrained", "none"])
    # NAME= with nothing after it was read as a shard path "aflw2000="
    with pytest.raises(SystemExit, match=r"error: --val aflw2000=: no shards after the '='; give NAME=URL"):
        main(["train", "--model", "hopenet", "--train", shards.four, "--val", "aflw2000=", "--epochs", "1",
              "--out", str(tmp_path / "never"), "--workers", "0", "--device", "cpu"])
    # a wrong shard path or model name: one error line, before any model is built or weights fetched
    missing = str(tmp_path / "nowhere" / "train-{000000..000001}.tar")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "build_model", lambda *a, **k: pytest.fail("model built before the data was checked"))
        with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: 2 of 2 shard\(s\) not found: .*nowhere/train-000000.tar"):
            main(["train", "--model", "hopenet", "--train", missing, "--epochs", "1",
                  "--out", str(tmp_path / "never"), "--workers", "0", "--device", "cpu"])
    assert not (tmp_path / "never").exists()  # no empty output folder left behind
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "hopnet", "--train", shards.four, "--epochs", "1", "--out", str(ckpt)])
    assert exc.value.code == 2 and "invalid choice: 'hopnet'" in capsys.readouterr().err
    # --out that cannot take a run: a file, a path under one; refused before any data is read
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "_open_loaders", lambda *a, **k: pytest.fail("data read before --out was checked"))
        for out, says in ((a_file, "is a file; give a folder"), (a_file / "sub", "is under .*a_file, which is a file")):
            with pytest.raises(SystemExit, match=rf"^python -m train_minimal [a-z-]+: error: --out .*{says}"):
                main(["train", "--model", "ehpnet", "--train", shards.four, "--steps", "1", "--out", str(out)])
    assert a_file.read_text() == "mine"


def test_a_run_folder_of_another_model_is_not_overwritten(shards, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--train", shards.four, "--steps", "1", "--batch-size", "2", "--out", str(out), "--pretrained", "none",
            "--workers", "0", "--device", "cpu"]
    main(["train", "--model", "ssrnet_md", *args])
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: --out .*run holds a ssrnet_md run .*training fsanet_var there would "
                                         r"replace it: give another --out"):
        main(["train", "--model", "fsanet_var", *args])
    assert (out / "checkpoint.pt").read_bytes() == before
    capsys.readouterr()
    main(["train", "--model", "ssrnet_md", *args])  # the same model again: a rerun replaces its run, and says so
    assert "holds an earlier ssrnet_md run: this run replaces it" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"checkpoint holds model 'ssrnet_md', not 'hopenet': drop --model .*or "
                                         r"pass --model ssrnet_md"):
        main(["eval", "--model", "hopenet", "--ckpt", str(out / "checkpoint.pt"), "--data", shards.val, "--device", "cpu"])
    # a checkpoint.pt no run's metrics.json describes (convert-fsanet's, say) was replaced without a word
    converted = tmp_path / "converted"
    converted.mkdir()
    torch.save({"format": "fsanet-keras", "model": "fsanet_var", "state_dict": {}}, converted / "checkpoint.pt")
    before = (converted / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"^python -m train_minimal train: error: --out .*converted holds a checkpoint\.pt "
                                         r"that no run's metrics\.json there describes; training ssrnet_md there"):
        main(["train", "--model", "ssrnet_md", "--train", shards.four, "--steps", "1", "--batch-size", "2", "--out", str(converted),
              "--pretrained", "none", "--workers", "0", "--device", "cpu"])
    assert (converted / "checkpoint.pt").read_bytes() == before


def test_a_diverging_run_stops_before_saving_nan_weights(shards, tmp_path):
    # it saved NaN weights over the last checkpoint and exited 0 (only 'MAE nan' in the log, if a --val)
    args = ["--model", "ssrnet_md", "--train", shards.four, "--batch-size", "2", "--pretrained", "none",
            "--workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"^python -m train_minimal train: error: training diverged in epoch 1: the "
                                         r"training loss became nan at step \d \(a lower --lr\?\)$"):
        main(["train", *args, "--epochs", "2", "--lr", "1e30", "--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()
    out = tmp_path / "run"
    main(["train", *args, "--steps", "1", "--out", str(out)])
    before = (out / "checkpoint.pt").read_bytes(), (out / "metrics.json").read_bytes()
    with pytest.raises(SystemExit, match="training diverged in epoch 1"):
        main(["train", *args, "--epochs", "2", "--lr", "1e30", "--out", str(out)])
    assert ((out / "checkpoint.pt").read_bytes(), (out / "metrics.json").read_bytes()) == before

def test_eval_of_nan_predictions_warns_and_writes_strict_json(shards, tmp_path, capsys):
    # it printed 'NaN' in the JSON line (no JSON reader but Python's takes it) and said nothing of why
    out = tmp_path / "run"
    train(out, "ssrnet_md", "--train", shards.four, "--steps", "1")
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    for tensor in ckpt["state_dict"].values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    torch.save(ckpt, out / "nan.pt")
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out / "nan.pt"), "--data", shards.val, "--device", "cpu"]) == 0
    stdout, err = capsys.readouterr()

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    got = json.loads(stdout.strip().splitlines()[-1], parse_constant=refuse)
    assert got["samples"] == got["nonfinite"] == 10 and got["mean"] is None and got["yaw"] is None
    assert f"[eval] warning: 10 of 10 samples of {shards.val} gave NaN or infinite angles" in err, err
    # a sound checkpoint: no warning, nonfinite 0
    got, err = run_eval(capsys, out / "checkpoint.pt", shards.val)
    assert got["nonfinite"] == 0 and math.isfinite(got["mean"]) and "NaN or infinite" not in err


def test_python_m_train_minimal_params():
    res = subprocess.run([sys.executable, "-m", "train_minimal", "params", "--model", "mnn"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "mnn: trainable 4,842,382" in res.stdout and "pose-only" in res.stdout and "2,036,486" in res.stdout


def test_python_m_train_minimal_exit_status(tmp_path):
    """As dataprep's (README, "Exit status"): an error that stops the command exits 2 with its one
    line, as a usage error does (it exited 1, dataprep's status for problems found)."""
    python_m = [sys.executable, "-m", "train_minimal"]
    res = subprocess.run([*python_m, "eval", "--ckpt", str(tmp_path / "nope.pt"), "--data", str(tmp_path / "x.tar"),
                          "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"python -m train_minimal eval: error: checkpoint {tmp_path / 'nope.pt'} not found"), lines
    res = subprocess.run([*python_m, "params", "--model", "nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice: 'nope'" in res.stderr, res.stderr



def test_a_crash_exits_2_with_its_traceback_and_what_to_do(monkeypatch, capsys):
    """An error nothing foresaw (a bug, an out-of-memory) is not "done, problems found" (1, Python's
    status for an uncaught exception): its traceback, one line asking for a report, exit 2."""
    def crash(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(train_mod, "cmd_params", crash)
    with pytest.raises(SystemExit) as exc:
        main(["params", "--model", "ssrnet_md"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise RuntimeError("boom' in err
    assert err.rstrip().splitlines()[-1].startswith("python -m train_minimal params: error: unexpected RuntimeError: "
                                                    "boom (a bug of headpose-dataprep")

def test_ctrl_c_while_training_is_one_line_and_exit_130(shards, tmp_path):
    """Ctrl-C in the middle of training (a real SIGINT, to the trainer and its DataLoader workers as a
    terminal sends it) ends with one line saying what is kept, not the traceback of every process."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "train_minimal", "train", "--model", "ssrnet_md", "--train", shards.train,
                             "--epochs", "100000", "--out", str(tmp_path / "run"), "--device", "cpu", "--workers", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as from a terminal: a test run started in the background by a shell without
                            # job control passes Ctrl-C on ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # interrupt once the first epoch has run
            if line.startswith("[train] epoch 1 "):
                break
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().splitlines()[-1] == (f"python -m train_minimal train: interrupted ({tmp_path / 'run' / 'checkpoint.pt'} "
                                             "is written after each epoch that finishes)")
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_broken_shards_are_one_error_line(shards, tmp_path, capsys):
    """A truncated shard or a file that is not a tar, as --train, --val or eval's --data: one error
    line naming it (found up front, before any step), also when a DataLoader worker meets it."""
    data = Path(shards.four).read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(data[:len(data) // 2])  # inside a member's data
    not_tar = tmp_path / "notes-000000.tar"
    not_tar.write_text("not a tar\n" * 100)
    out = tmp_path / "never"
    run = ["--model", "fsanet_1x1", "--steps", "1", "--batch-size", "4", "--out", str(out), "--pretrained", "none",
           "--workers", "0", "--device", "cpu"]

    def one_line(bad: Path) -> str:
        return (rf"^python -m train_minimal [a-z-]+: error: {re.escape(str(bad))} is not a readable tar shard \(truncated or not a tar file\? [^\n]*\); "
                rf"rebuild it or run `dataprep verify {re.escape(str(tmp_path))}`$")

    for bad in (cut, not_tar):
        with pytest.raises(SystemExit, match=one_line(bad)):
            main(["train", "--train", str(bad), *run])
        with pytest.raises(SystemExit, match=one_line(bad)):
            main(["train", "--train", shards.four, "--val", f"v={bad}", *run])
    assert not out.exists()  # refused before the output folder was made
    model = train_mod.build_model(registry.get("fsanet_1x1"), None, None)
    ckpt = tmp_path / "fsanet.pt"
    torch.save({"model": "fsanet_1x1", "state_dict": model.state_dict(), "args": {}}, ckpt)
    with pytest.raises(SystemExit, match=one_line(cut)):
        main(["eval", "--ckpt", str(ckpt), "--data", str(cut), "--device", "cpu"])
    # an empty shard (a build writes one where every sample was rejected): one line naming the data
    import fsspec

    from dataprep.shards import write_shard

    empty = tmp_path / "test-000000.tar"
    write_shard(fsspec.filesystem("file"), str(empty), [])
    with pytest.raises(SystemExit, match=rf"^python -m train_minimal [a-z-]+: error: {re.escape(str(empty))} hold no samples \(empty shards"):
        main(["eval", "--ckpt", str(ckpt), "--data", str(empty), "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: .*test-000000\.tar hold no samples"):  # before any step
        main(["train", "--train", shards.four, "--val", f"v={empty}", *run])
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: .*test-000000\.tar hold no samples"):
        main(["train", "--train", str(empty), *run])
    # shards that cannot be counted up front (remote ones): the empty evaluation ends in one line too
    import train_minimal.data as data_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_mod, "shard_samples", lambda urls: None)
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--ckpt", str(ckpt), "--data", str(empty), "--device", "cpu"])
    message = str(exc.value)
    assert exc.value.code == 2
    assert message.startswith("python -m train_minimal eval: error: ") and str(empty) in message, message
    assert "empty shards: every sample rejected when they were built?" in message and "\n" not in message
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: 1000 shards in a row gave no sample \(the last: .*test-000000\.tar\)"):
        main(["train", "--train", str(empty), *run[:-4], "--workers", "0", "--device", "cpu", "--epoch-length", "8"])
    # resampled shards are not read up front: a worker meets the break while streaming
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "_warn_crop_room", lambda *a: None)  # (it reads the first shard too)
        with pytest.raises(SystemExit, match=one_line(cut)):
            main(["train", "--train", str(cut), *run[:-4], "--workers", "1", "--device", "cpu", "--epoch-length", "8"])


def test_a_shard_cut_between_members_is_caught_by_its_info_json(shards, tmp_path):
    """A tar cut exactly between members reads as a shorter valid tar; the build folder's
    _info.json says how many samples each shard holds, so the trainer catches it up front."""
    import shutil

    folder = tmp_path / "build"
    shutil.copytree(Path(shards.train.split("::")[0]).parent, folder)
    shard = sorted(folder.glob("train-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    end = members[len(members) // 2].offset  # the header of a member in the middle: a clean cut
    shard.write_bytes(shard.read_bytes()[:end] + b"\0" * 1024)
    with tarfile.open(shard) as tar:
        assert len(tar.getmembers()) == len(members) // 2  # tarfile reads it without complaint
    with pytest.raises(SystemExit, match=rf"^python -m train_minimal [a-z-]+: error: {re.escape(str(shard))} is not a readable tar shard .* it holds "
                                         r"\d+ samples, the folder's _info.json says 20\)"):
        main(["train", "--model", "ehpnet", "--train", str(shard), "--steps", "1", "--out", str(tmp_path / "o"),
              "--pretrained", "none", "--workers", "0", "--device", "cpu"])


def test_unknown_device_is_refused(shards, tmp_path, capsys):
    for bad in ("gpu", "cuda0", "tpu"):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--model", "ehpnet", "--train", shards.four, "--steps", "1", "--out", str(tmp_path / "o"),
                  "--device", bad])
        assert exc.value.code == 2 and f"'{bad}' is not a device; give auto, cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--ckpt", "x.pt", "--data", shards.val, "--device", "GPU"])
    assert exc.value.code == 2 and "'GPU' is not a device" in capsys.readouterr().err
    assert train_mod._device("CUDA:1") == "cuda:1" and train_mod._device("Auto") == "auto"
    assert not (tmp_path / "o").exists()


def test_convert_fsanet_errors_are_one_line(tmp_path):
    out = tmp_path / "out.pt"
    what = (r"; give an official FSA-Net Keras \.h5 \(save_weights\), or a folder holding the three official \.h5 "
            r"files \(1x1, var, w\/o: converts to fsanet_fusion\)$")
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: .*nope\.h5 not found" + what):
        main(["convert-fsanet", str(tmp_path / "nope.h5"), str(out)])
    h5py = pytest.importorskip("h5py")
    fake = tmp_path / "fake.h5"
    fake.write_text("not an HDF5 file\n")
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: .*fake\.h5 is not an HDF5 file h5py can read \([^\n]*\)" + what):
        main(["convert-fsanet", str(fake), str(out)])
    # an output that is a folder: torch.save's 'Is a directory' was reported as 'cannot convert fake.h5'
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: .* is a folder; give the checkpoint "
                                         r"file to write, e.g. .*fsanet\.pt$"):
        main(["convert-fsanet", str(fake), str(tmp_path)])
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("group/layer/weight:0", data=[1.0, 2.0])
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: cannot convert .*other\.h5 \([^\n]*\)" + what):
        main(["convert-fsanet", str(other), str(out)])
    with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z-]+: error: .*: no official \.h5 for fsanet_1x1, fsanet_var, fsanet_wo" + what):
        main(["convert-fsanet", str(tmp_path), str(out)])
    assert not out.exists()


def test_an_empty_shard_url_is_one_error_line(tmp_path):
    """``--train ''`` (an unset shell variable, say): one error line saying what was given."""
    for command in (["train", "--model", "ssrnet_md", "--train", "", "--steps", "1", "--out", str(tmp_path / "o")],
                    ["eval", "--model", "ssrnet_md", "--ckpt", str(tmp_path / "nope.pt"), "--data", ""]):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_mod, "load_checkpoint", lambda *a, **k: {"model": "ssrnet_md", "state_dict": {}})
            mp.setattr(train_mod, "model_from_checkpoint", lambda *a, **k: (registry.get("ssrnet_md"), None, 64))
            with pytest.raises(SystemExit, match=r"^python -m train_minimal [a-z]+: error: shard URLs '': it is an "
                                                 r"empty string; give a shard path or URL"):
                main(command + ["--workers", "0", "--device", "cpu"])


def test_a_shard_folder_gets_its_brace_patterns(shards, tmp_path):
    """A dataprep build folder given as --train: the error gives the brace pattern of each split its
    _info.json lists, instead of a bare "not found"."""
    import fsspec

    from dataprep.shards import write_info

    folder = tmp_path / "out"
    folder.mkdir()
    made = [("train", "train-000000.tar"), ("train", "train-000001.tar"), ("test", "test-000000.tar")]
    for _, name in made:
        (folder / name).write_bytes(Path(shards.four).read_bytes())
    write_info(fsspec.filesystem("file"), str(folder), "four",
               [{"split": split, "name": name, "samples": 4} for split, name in made])
    train_pattern = f"{folder}/train-{{000000..000001}}.tar (train, 8 samples)"
    test_pattern = f"{folder}/test-000000.tar (test, 4 samples)"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "ehpnet", "--train", str(folder), "--steps", "1", "--out", str(tmp_path / "o"),
              "--pretrained", "none", "--workers", "0", "--device", "cpu"])
    msg = str(exc.value)
    assert exc.value.code == 2
    assert msg.startswith(f"python -m train_minimal train: error: {folder} is a shard folder, not a shard: ") and "\n" not in msg, msg
    assert test_pattern in msg and train_pattern in msg, msg
    assert sum(shard_samples(train_pattern.split(" ")[0])) == 8  # the pattern it gives reads the split


def test_metrics_record_the_learning_rates_used(shards, tmp_path, monkeypatch):
    """metrics.json's ``lr`` is the base rate the optimiser used (the spec's default when --lr is
    not given) and ``param_group_lrs`` each group's (Hopenet's three); per epoch, as scheduled."""
    metrics = train(tmp_path / "fsanet", "fsanet_1x1", "--train", shards.four, "--steps", "1")
    assert metrics["args"]["lr"] == 1e-3 and metrics["args"]["param_group_lrs"] == [1e-3]
    epoch = metrics["epochs"][0]  # MultiStepLR: x0.1 after the first of 1 step
    assert epoch["lr"] == pytest.approx(1e-4) and epoch["param_group_lrs"] == [pytest.approx(1e-4)]
    # the spec's defaults["lr"] is the one place the default lives (make_optimizer's own is a fallback)
    from train_minimal import registry

    monkeypatch.setitem(registry.get("fsanet_1x1").defaults, "lr", 4e-3)
    metrics = train(tmp_path / "fsanet2", "fsanet_1x1", "--train", shards.four, "--steps", "1")
    assert metrics["args"]["lr"] == 4e-3 and metrics["args"]["param_group_lrs"] == [4e-3]
    metrics = train(tmp_path / "hopenet", "hopenet", "--train", shards.four, "--steps", "1", "--input-size", "64",
                    "--lr", "2e-5")
    lrs = [0.0, 2e-5, pytest.approx(1e-4)]  # frozen stem, trunk, heads at 5 x lr
    assert metrics["args"]["lr"] == 2e-5 and metrics["args"]["param_group_lrs"] == lrs
    assert metrics["epochs"][0]["lr"] == 2e-5 and metrics["epochs"][0]["param_group_lrs"] == lrs


def test_epoch_steps_count_each_workers_partial_batch(shards, tmp_path):
    """Two shards (20 and 4 samples) on two workers, batches of 8: the worker with the 4 drops them,
    so an epoch has 2 steps, not 24 // 8 = 3. The schedule is built for the steps that run."""
    out = tmp_path / "run"
    argv = ["train", "--model", "mnn", "--train", f"{shards.train}::{shards.four}", "--epochs", "2",
            "--batch-size", "8", "--input-size", "32", "--device", "cpu", "--pretrained", "none",
            "--workers", "2", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["total_steps"] == len(metrics["steps"]) == 4
    assert [e["step"] for e in metrics["epochs"]] == [2, 4]


def test_samples_are_counted_by_their_record_not_by_any_json_member(tmp_path):
    """Webdataset reads ``a.meta.json`` as sample ``a``'s ``meta.json``: another member of the same
    sample (a user's own annotation beside ours), not one more sample."""
    import io

    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "a.json", "a.meta.json", "b.jpg", "b.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    assert shard_samples([str(path)]) == [2]


def test_float16_steps_the_scaler_skips_raise_no_scheduler_warning():
    """float16's GradScaler skips a step whose scaled gradients overflow (its first steps, while it
    finds its scale); the schedule still steps, and PyTorch's warning about that is not shown."""
    import warnings

    from train_minimal.engine import TrainStep

    spec = registry.get("fsanet_var")
    model = spec.build(pretrained=None)
    opt, sched = spec.make_optimizer(model, 10, 1e-3)
    step = TrainStep(spec, model, opt, sched, torch.device("cpu"), torch.float16)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # overflows: the step is skipped
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.rand(2, 3, 64, 64) * 255
    targets = {"angles": torch.tensor([[10.0, -5.0, 3.0], [-20.0, 4.0, 0.0]])}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(x, targets)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped indeed
    assert step.scaler.get_scale() < 2.0 ** 120
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]


def test_hopenet_trains_on_its_online_augmentation_and_evaluates_without(shards, capsys):
    """Hopenet's ``Pose_300W_LP``: flip half the time (yaw and roll negated), blur one in 20; in
    training only. FSA-Net's spec brings its augment_data, EHPNet's its flip and datasets.transform;
    without a spec's transforms (WHENet: no public training code) the records carry none."""
    spec = registry.get("hopenet")
    train_loader = make_loader(shards.train, spec, 4, train=True, input_size=64, seed=3)
    ops = [tuple(a["op"] for a in rec["augment"]) for b in train_loader for rec in b["record"]]
    flips = sum("flip" in o for o in ops)
    assert ops and 0 < flips < len(ops) and set(o for t in ops for o in t) <= {"flip", "ringblur"}
    for b in make_loader(shards.train, spec, 4, train=True, input_size=64, seed=3):
        for rec, angles in zip(b["record"], b["angles"]):
            if any(a["op"] == "flip" for a in rec["augment"]):  # the angles the model learns are flipped
                assert float(angles[0]) == pytest.approx(rec["yaw"]) and float(angles[2]) == pytest.approx(rec["roll"])
    evaluation = make_loader(shards.val, spec, 4, train=False, input_size=64)
    assert all(not rec["augment"] for b in evaluation for rec in b["record"])
    fsa = make_loader(shards.train, registry.get("fsanet_var"), 4, train=True)  # augment_data, FSA-Net's own
    assert all([a["op"] for a in rec["augment"]] == ["fsanet_augment"] for b in fsa for rec in b["record"])
    ehpnet = [[a["op"] for a in rec["augment"]] for b in make_loader(shards.train, registry.get("ehpnet"), 4, train=True,
                                                                      input_size=64) for rec in b["record"]]
    assert all(ops in (["ehpnet_augment"], ["flip", "ehpnet_augment"]) for ops in ehpnet)
    assert 0 < sum(ops[0] == "flip" for ops in ehpnet) < len(ehpnet)
    plain = make_loader(shards.train, registry.get("whenet"), 4, train=True, input_size=64)
    assert all(not rec["augment"] for b in plain for rec in b["record"])
    # the GPU path decodes on the device, after the CPU transforms would have run: said, and left out
    make_loader(shards.train, spec, 4, train=True, input_size=64, gpu_decode=True)
    assert "online augmentation" in capsys.readouterr().err
