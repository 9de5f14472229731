"""train_minimal models (Hopenet, MNN, EHPNet and teachers, WHENet): parameter counts, outputs,
the bin / rotation maths against dataprep.labels, losses, distillation and --pretrained."""
from __future__ import annotations

import math

import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataprep import labels
from train_minimal import registry
from train_minimal.models import _bin_heads, _pretrained, ehpnet, hopenet, mnn, whenet

torch.set_num_threads(1)


def n_params(model) -> int:
    return registry.count_parameters(model, trainable_only=False)


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = registry.get(name).build(None).eval()
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------
def test_hopenet_has_the_official_parameter_count(built):
    assert n_params(built("hopenet")) == hopenet.HOPENET_PARAMS == 23_913_734


def test_mnn_parameter_counts_within_2_percent_of_the_supplementary(built):
    full = built("mnn")
    report = full.parameter_report()
    pose_only = report["pose-only (encoder + fc_pose + fc_pose_proj)"]
    assert report["full (L=68)"] == n_params(full)
    assert n_params(built("mnn_pose")) == pose_only
    for measured, target in ((pose_only, 2_048_710), (n_params(full), 4_900_948)):
        assert abs(measured - target) / target < 0.02, (measured, target)
    # the numbers documented in mnn.py's docstring
    assert (pose_only, n_params(full)) == (2_036_486, 4_842_382)


@pytest.mark.parametrize("name, count", [
    ("ehpnet", 11_266_170),            # ResNet-18 trunk 11,176,512 + 512->128 + 3 x (128->62)
    ("whenet", 4_330_360),             # EfficientNet-B0 trunk 4,007,548 + 1280->120 + 2 x (1280->66)
    ("ehpnet_resnet101", 43_644_666),
    ("ehpnet_res2net101", 44_302_194),  # Res2Net-101 26w4s trunk 43,157,688 + 2048->512 + 3 x (512->62)
    ("ehpnet_res2net101d", 44_321_426),  # Res2Net-101-v1b trunk 43,176,920 + the same head
    ("ehpnet_botnet", 38_936_058),
])
def test_other_parameter_counts(built, name, count):
    assert n_params(built(name)) == count


# --------------------------------------------------------------------------------------------
# outputs decode to angles
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, size, limits", [
    ("hopenet", 64, [(-99, 99)] * 3),
    ("ehpnet", 112, [(-93, 93)] * 3),
    ("ehpnet_botnet", 112, [(-93, 93)] * 3),
    ("ehpnet_botnet", 64, [(-93, 93)] * 3),   # relative-position tables resampled to a 4x4 map
    ("whenet", 64, [(-180, 180), (-99, 99), (-99, 99)]),
    ("mnn", 64, [(-180, 180)] * 3),  # and no larger than the other triple (below)
])
def test_outputs_decode_to_angles(built, name, size, limits):
    spec = registry.get(name)
    with torch.no_grad():
        out = built(name)(torch.randn(2, 3, size, size))
    angles = spec.decode(out)
    assert angles.shape == (2, 3) and torch.isfinite(angles).all()
    for i, (lo, hi) in enumerate(limits):
        assert (angles[:, i] >= lo).all() and (angles[:, i] <= hi).all()
    if name == "mnn":  # labels.rotation_to_euler's triple: the one whose largest angle is smaller
        yaw, pitch, roll = angles.unbind(1)
        half = torch.full_like(yaw, 180.0)
        alt = torch.stack([torch.copysign(half, yaw) - yaw, pitch - torch.copysign(half, pitch),
                           roll - torch.copysign(half, roll)], 1)
        assert (angles.abs().amax(1) <= alt.abs().amax(1) + 1e-3).all()


def test_specs_follow_the_papers():
    expect = {
        "hopenet": (224, "hopenet", "imagenet"), "ehpnet": (112, "square", "bgr_128"),
        "ehpnet_resnet101": (112, "square", "bgr_128"), "ehpnet_res2net101": (112, "square", "bgr_128"),
        "ehpnet_res2net101d": (112, "square", "bgr_128"), "ehpnet_botnet": (112, "square", "bgr_128"), "whenet": (224, "square", "imagenet"),
        "mnn": (256, "square", "imagenet"),
    }
    for name, (size, rule, norm) in expect.items():
        spec = registry.get(name)
        assert (spec.input_size, spec.crop_rule, spec.normalize) == (size, rule, norm), name
    assert registry.get("hopenet").defaults["lr"] == 1e-5 and registry.get("hopenet").defaults["alpha"] == 1.0
    assert registry.get("ehpnet").defaults["clip_grad_value"] == 0.5 and registry.get("ehpnet").distill is not None
    assert registry.get("whenet").defaults["wrap_yaw"] is True


def test_hopenet_optimizer_groups(built):
    model = built("hopenet")
    opt, sched = hopenet.hopenet_optimizer(model, 100, None)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == [0.0, 1e-5, 5e-5] and sched is None
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_params(model)


def test_ehpnet_schedule_warms_up_then_decays(built):
    opt, sched = ehpnet.ehpnet_optimizer(built("ehpnet"), 100, None)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[3] == pytest.approx(1e-3) and lrs[-1] < 1e-4


# --------------------------------------------------------------------------------------------
# maths against dataprep.labels
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bins", [labels.HOPENET_BINS, labels.EHPNET_BINS, labels.WHENET_YAW_BINS])
def test_bin_maths_match_binspec(bins):
    rng = np.random.default_rng(0)
    angles = rng.uniform(bins.low - 10, bins.high + 10, 200)
    # labels.py is the one place of the bin maths: tensors in (the trainer), the same answers as numpy
    got = bins.to_bin(torch.from_numpy(angles))
    assert got.dtype == torch.int64 and got.tolist() == bins.to_bin(angles).tolist()
    logits = rng.normal(size=(5, bins.count))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(_bin_heads.expected_angle(torch.from_numpy(logits), bins).numpy(), bins.decode(probs),
                               atol=1e-3)
    assert bins.width * 0 + bins.low == {66: -99, 62: -93, 120: -180}[bins.count]


def test_wrapped_yaw_loss():
    bins = labels.WHENET_YAW_BINS
    logits = torch.full((1, bins.count), -20.0)
    logits[0, bins.to_bin(178.0)] = 20.0  # predicts ~178 (3*E - 180 decode)
    near = _bin_heads.bin_head_loss(logits, torch.tensor([-179.0]), bins, 1.0, wrap=True)
    plain = _bin_heads.bin_head_loss(logits, torch.tensor([-179.0]), bins, 1.0, wrap=False)
    assert near < 100 < plain
    a = torch.tensor([170.0, -170.0, 10.0], requires_grad=True)
    d = labels.wrapped_angle_difference(a, torch.tensor([-170.0, 170.0, 350.0]))
    np.testing.assert_allclose(d.detach().numpy(), labels.wrapped_angle_difference([170, -170, 10], [-170, 170, 350]))
    np.testing.assert_allclose(d.detach().numpy(), [20.0, 20.0, 20.0])
    d.sum().backward()  # a loss term: gradients flow
    assert a.grad is not None


def test_whenet_classification_term_is_sigmoid_binary_cross_entropy():
    # all-zero logits: every bin's sigmoid is 0.5, so BCE is log 2 per bin (softmax CE: log 120);
    # the softmax expectation is the middle, 3 * 59.5 - 180 = 3 * 32.5 - 99 = -1.5: no squared error
    zeros = [torch.zeros(2, 120), torch.zeros(2, 66), torch.zeros(2, 66)]
    targets = {"angles": torch.full((2, 3), -1.5)}
    assert float(whenet.whenet_loss(zeros, targets)) == pytest.approx(3 * math.log(2.0), rel=1e-6)
    ce = _bin_heads.bin_head_loss(zeros[0], targets["angles"][:, 0], labels.WHENET_YAW_BINS, 1.0)
    assert float(ce) == pytest.approx(math.log(120.0), rel=1e-6)  # Hopenet's and EHPNet's term


def test_whenet_loss_uses_the_wrapped_yaw_error():
    yaw = torch.full((1, 120), -20.0)
    yaw[0, 119] = 20.0  # expected yaw 3 * 119 - 180 = 177
    pr = torch.zeros(1, 66)
    targets = {"angles": torch.tensor([[-179.0, 0.0, 0.0]])}
    assert whenet.whenet_loss((yaw, pr, pr), targets) < 1000  # 4 deg wrapped, not 356


def test_rotation_maths_on_tensors_match_labels():
    # labels.py is the one place of the Euler convention: batches of tensors (MNN's loss and decode)
    # give what the numpy path gives angle by angle
    rng = np.random.default_rng(1)
    # yaw past 90 too (AFLW2000's up to 99); head poses' pitch and roll within 90
    angles = np.stack([rng.uniform(-130, 130, 20), rng.uniform(-89, 89, 20), rng.uniform(-89, 89, 20)], 1)
    t = torch.from_numpy(angles)
    r = labels.rotation_from_euler(t[:, 0], t[:, 1], t[:, 2])
    assert r.shape == (20, 3, 3) and r.dtype == torch.float32
    for a, m in zip(angles, r.numpy()):
        np.testing.assert_allclose(m, labels.rotation_from_euler(*a), atol=1e-5)
    back = labels.rotation_to_euler(r).numpy()
    np.testing.assert_allclose(back, np.array([labels.rotation_to_euler(m) for m in r.numpy()]), atol=1e-3)
    np.testing.assert_allclose(back, angles, atol=1e-3)
    d6 = torch.cat([r[:, :, 0], r[:, :, 1]], dim=1) * 3.0  # scale does not matter
    torch.testing.assert_close(mnn.rotation_from_6d(d6), r.float(), atol=1e-5, rtol=0)
    # MNN's decode of a perfect prediction is the label, |yaw| > 90 included (not 180 deg off)
    np.testing.assert_allclose(mnn.mnn_decode({"pose": d6}).numpy(), angles, atol=1e-3)


def test_mnn_trains_pose_only_and_with_landmarks():
    torch.manual_seed(0)
    model = mnn.MNN().train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out["heatmaps"].shape == (2, 68, 32, 32) and out["visibility"].shape == (2, 68)
    angles = torch.tensor([[10.0, -5.0, 3.0], [-40.0, 20.0, 0.0]])
    pose_only = mnn.mnn_loss(out, {"angles": angles})
    lms = torch.rand(2, 68, 2) * 31
    full = mnn.mnn_loss(out, {"angles": angles, "landmarks": lms, "landmarks_mask": torch.tensor([True, False])})
    assert full > pose_only > 0
    pose_only.backward()  # decoder in the graph (weight 0): every parameter gets a gradient (DDP)
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert set(model(x)) == {"pose"}  # no decoder in eval mode unless asked
    assert set(model(x, landmarks=True)) == {"pose", "heatmaps", "visibility"}


def test_ehpnet_distillation_is_kl_to_the_mean_teacher():
    torch.manual_seed(0)
    student = [torch.randn(4, 62) for _ in range(3)]
    teachers = [[torch.randn(4, 62) for _ in range(3)] for _ in range(2)]
    got = ehpnet.ehpnet_distill(student, teachers, weight=1.0)
    want = 0.0
    for i in range(3):
        mean_t = (F.softmax(teachers[0][i], 1) + F.softmax(teachers[1][i], 1)) / 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PyTorch's note on reduction='mean'
            want += torch.nn.KLDivLoss()(F.log_softmax(student[i], 1), mean_t)
    torch.testing.assert_close(got, want)
    same = ehpnet.ehpnet_distill(teachers[0], [teachers[0]], weight=10.0)
    assert abs(float(same)) < 1e-6
    assert ehpnet.ehpnet_distill(student, teachers) == pytest.approx(10 * float(got))


# --------------------------------------------------------------------------------------------
# --pretrained
# --------------------------------------------------------------------------------------------
def test_auto_weights_without_network_say_what_to_do(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    for name in ("hopenet", "ehpnet", "whenet"):
        with pytest.raises(_pretrained.PretrainedUnavailable, match=r"could not be downloaded \(no network\?\) — pass "
                                                                      r"--pretrained PATH .* or --pretrained none"):
            registry.get(name).build("auto")


def test_state_dicts_are_found_as_training_scripts_save_them():
    from dataprep.weights import unwrap_state_dict

    w, b = torch.ones(2), torch.zeros(2)
    plain = {"conv.weight": w, "conv.bias": b}
    # DataParallel inside torch.compile, saved with the epoch beside it, nested in a checkpoint
    saved = {"epoch": 3, "model_state_dict": {"state_dict": {f"_orig_mod.module.{k}": v for k, v in plain.items()}}}
    got = unwrap_state_dict(saved, ("module.", "_orig_mod."))
    assert list(got) == list(plain) and got["conv.weight"] is w
    # a prefix only some keys have is a name, not a wrapper; non-tensors inside are dropped
    mixed = {"module.conv.weight": w, "head.bias": b, "meta": "v1"}
    assert list(unwrap_state_dict(mixed)) == ["module.conv.weight", "head.bias"]
    for bad in ({"epoch": 3}, [w], {}, {"state_dict": {"note": "no tensors"}}):
        with pytest.raises(ValueError, match="state dict of tensors"):
            unwrap_state_dict(bad)


def test_pretrained_path_loads_the_backbone_and_reports(tmp_path, capsys):
    import torchvision

    torch.manual_seed(3)
    src = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    model = registry.get("ehpnet").build(str(path))
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    err = capsys.readouterr().err
    assert "loaded 120/128 tensors" in err and "unused keys (2): fc.weight, fc.bias" in err
    with pytest.raises(_pretrained.PretrainedFileError, match="no such file"):
        registry.get("ehpnet").build(str(tmp_path / "missing.pth"))
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(_pretrained.PretrainedFileError, match="none of its 1 tensors match"):
        registry.get("whenet").build(str(tmp_path / "bad.pth"))


def test_torch_files_that_cannot_be_read_say_why(tmp_path):
    """``dataprep.weights.load_torch_file``: what torch's safe loader refuses, in words (not its
    advice to load the file unsafely), for every weights file the project reads."""
    import io
    import pickle

    from dataprep.weights import TorchFileError, load_torch_file

    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    good = buf.getvalue()
    assert torch.equal(load_torch_file(good)["w"], torch.ones(2))
    (tmp_path / "good.pt").write_bytes(good)
    assert torch.equal(load_torch_file(tmp_path / "good.pt")["w"], torch.ones(2))
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "opt": pickle.loads(pickle.dumps(_Unsafe()))}, buf)
    cases = {
        b"": "the file is empty",
        b"# a text file\n": "neither a zip archive torch.save writes nor a pickle",
        good[:200]: "damaged: PytorchStreamReader failed reading zip archive",
        buf.getvalue(): "it holds Python objects besides tensors and plain containers",
    }
    for data, says in cases.items():
        with pytest.raises(TorchFileError) as err:
            load_torch_file(data)
        assert str(err.value).startswith(says) and "weights_only" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "missing.pt")


class _Unsafe:
    """A Python object torch's safe unpickler refuses (as an optimiser or a config class would be)."""


# --------------------------------------------------------------------------------------------
# mixed precision and channels_last (what the trainer turns on on CUDA)
# --------------------------------------------------------------------------------------------
MODEL_INPUTS = {"hopenet": 64, "whenet": 64, "ehpnet": 64, "ehpnet_resnet101": 64, "ehpnet_res2net101": 64,
                "ehpnet_res2net101d": 64, "ehpnet_botnet": 64, "mnn": 64, "mnn_pose": 64}


@pytest.mark.parametrize("name", registry.names())
def test_every_model_trains_under_bfloat16_autocast_and_channels_last(name):
    """Forward under ``torch.autocast`` (bfloat16: what ``--amp auto`` picks on GPUs that have it;
    here CPU autocast, the same casting of our layers' ops) on a channels_last model and input,
    loss in float32 via the trainer's ``to_float``, backward: every trainable parameter gets a finite
    gradient and the outputs decode to finite angles."""
    from train_minimal.engine import autocast_ctx, to_float
    from train_minimal.train import build_model

    spec = registry.get(name)
    size = MODEL_INPUTS.get(name, spec.input_size)
    torch.manual_seed(0)
    model = build_model(spec, None, size).train().to(memory_format=torch.channels_last)
    scale = 255.0 if spec.normalize == "raw_bgr" else 1.0
    x = (torch.rand(2, 3, size, size) * scale).contiguous(memory_format=torch.channels_last)
    targets = {"angles": (torch.rand(2, 3) - 0.5) * 120}
    if name == "mnn":
        targets.update(landmarks=torch.rand(2, 68, 2) * size, landmarks_mask=torch.ones(2, dtype=torch.bool))
    with autocast_ctx(torch.device("cpu"), torch.bfloat16):
        out = model(x)
    flat = out if isinstance(out, (tuple, list)) else list(out.values()) if isinstance(out, dict) else [out]
    assert any(torch.is_tensor(o) and o.dtype == torch.bfloat16 for o in flat)  # autocast did run
    loss = spec.loss(to_float(out), targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    with torch.no_grad():
        angles = spec.decode(to_float(out))
    assert angles.shape == (2, 3) and torch.isfinite(angles).all()


def test_ehpnet_heads_and_schedule_follow_the_code(built):
    # maskpose models.py: the student's Linear(512, 128) + ReLU; ResNet_60bin(Bottleneck) and Res2Net
    # Linear(2048, 512) + ReLU; BoTNet50_2 Linear(2048, 512) with no ReLU
    def hidden(name):
        return list(built(name).fc_hidden)

    student, resnet, botnet = hidden("ehpnet"), hidden("ehpnet_resnet101"), hidden("ehpnet_botnet")
    assert [type(m) for m in student] == [torch.nn.Linear, torch.nn.ReLU] and student[0].out_features == 128
    assert [type(m) for m in resnet] == [torch.nn.Linear, torch.nn.ReLU] and resnet[0].out_features == 512
    assert [type(m) for m in botnet] == [torch.nn.Linear] and botnet[0].out_features == 512
    # bottleneck-transformer-pytorch's projection shortcut: conv, BN, activation
    block = next(m for m in built("ehpnet_botnet").modules() if isinstance(m, ehpnet.BoTBlock))
    assert [type(m) for m in block.shortcut] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    # models.py's Res2Net is v1b (ehpnet_res2net101d): a stem of three 3x3 convolutions (32, 32, 64
    # channels, the first with stride 2), and projection shortcuts that average-pool (ceil mode,
    # padding not counted) before a stride-1 1x1 convolution; the paper's name (ehpnet_res2net101)
    # is the original Res2Net: one 7x7 stem convolution, strided 1x1 shortcuts
    original = built("ehpnet_res2net101").backbone
    assert isinstance(original.conv1, torch.nn.Conv2d) and original.conv1.kernel_size == (7, 7)
    assert isinstance(original.layer2[0].downsample[0], torch.nn.Conv2d) and original.layer2[0].downsample[0].stride == (2, 2)
    res2net = built("ehpnet_res2net101d")
    stem = [m for m in res2net.backbone.conv1 if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in stem] == [(32, (3, 3), (2, 2)), (32, (3, 3), (1, 1)),
                                                                         (64, (3, 3), (1, 1))]
    pool, conv = res2net.backbone.layer2[0].downsample[:2]
    assert isinstance(pool, torch.nn.AvgPool2d) and (pool.kernel_size, pool.stride) == (2, 2)
    assert pool.ceil_mode and not pool.count_include_pad and conv.stride == (1, 1)
    # train_pose.py: linear warm-up over the first epoch (1 of 25), then CosineAnnealingLR(T_max =
    # all steps, eta_min = lr / 1000) stepped from the end of the warm-up
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = ehpnet.warmup_cosine(opt, 2500)
    factor = sched.lr_lambdas[0]
    assert factor(0) == pytest.approx(1 / 100) and factor(99) == pytest.approx(1.0)
    assert factor(100) == pytest.approx(1.0)
    t = (2499 - 100) / 2500
    assert factor(2499) == pytest.approx(0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * t)))
    assert factor(2499) > 0.001  # ends short of the floor, as the code's does


def test_hopenet_trains_with_the_batch_norms_its_code_leaves_in_eval_mode(built):
    # train_hopenet.py: `.eval()` on modules named *bn* in layer1-4; the stem's bn1 and the
    # downsample BNs train; running statistics of the frozen ones do not move in a training pass
    model = registry.get("hopenet").build(None)
    model.train()
    registry.get("hopenet").train_mode(model)
    trunk = model.backbone
    assert trunk.bn1.training and trunk.layer1[0].downsample[1].training
    frozen = [m for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
              for n, m in layer.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and "bn" in n]
    assert len(frozen) == 3 * (3 + 4 + 6 + 3) and not any(m.training for m in frozen)
    before = trunk.layer2[1].bn2.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(trunk.layer2[1].bn2.running_mean, before)
    assert model.fc_yaw.training
