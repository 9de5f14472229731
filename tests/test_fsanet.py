"""FSA-Net (1x1 / var / w/o / fusion), SSR-Net-MD and the official-Keras-weights converter.

The last test needs the official 300W-LP weights and real AFLW2000 samples under ``<repo>/../shared``
and is skipped without them; it prints the measured MAE per model (run ``pytest -s`` to see it
also when captured).
"""
from __future__ import annotations

import glob
import math
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import scipy.io as sio
from scipy.special import expit
import torch

from train_minimal import registry
from train_minimal.convert_fsanet import convert, infer_variant, load_converted, read_keras_h5
from train_minimal.models.fsanet import OFFICIAL_PARAMS

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
PRETRAINED = SHARED / "fsanet_pretrained"
AFLW = SHARED / "real_samples" / "AFLW2000"
OFFICIAL_FILES = {
    "fsanet_1x1": "fsanet_capsule_3_16_2_21_5.h5",
    "fsanet_var": "fsanet_var_capsule_3_16_2_21_5.h5",
    "fsanet_wo": "fsanet_noS_capsule_3_16_2_192_5.h5",
}
SINGLE = ("fsanet_1x1", "fsanet_var", "fsanet_wo", "ssrnet_md")


# ------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------
def test_param_counts_match_official():
    for name, official in OFFICIAL_PARAMS.items():
        n = registry.count_parameters(registry.get(name).build())
        assert n == official, (name, n, official)
    fusion = registry.count_parameters(registry.get("fsanet_fusion").build())
    assert fusion == sum(OFFICIAL_PARAMS.values())
    # SSR-Net-MD: the official Keras SSR_net_MT, counted layer by layer (no official figure given).
    assert registry.count_parameters(registry.get("ssrnet_md").build()) == 231_763
    # BN moving statistics are buffers, not parameters.
    m = registry.get("fsanet_1x1").build()
    assert any(k.endswith("running_var") for k, _ in m.named_buffers())


def test_specs():
    for name in SINGLE + ("fsanet_fusion",):
        spec = registry.get(name)
        assert (spec.input_size, spec.crop_rule, spec.normalize) == (64, "fsanet", "raw_bgr")
        # run_fsanet_train.sh: Adam 1e-3, 90 epochs; batch 16 for FSA-Net, 8 for SSR-Net-MT on 300W-LP
        batch = 8 if name == "ssrnet_md" else 16
        assert spec.defaults == {"batch_size": batch, "epochs": 90, "lr": 1e-3}, name


def test_forward_shapes():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64) * 255
    for name in SINGLE + ("fsanet_fusion",):
        spec = registry.get(name)
        model = spec.build().eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (3, 3), name
        assert torch.isfinite(out).all(), name
        assert spec.decode(out).shape == (3, 3)
    fusion = registry.get("fsanet_fusion").build().train()
    out = fusion(x)
    assert out.shape == (3, 3, 3)  # members stacked for the joint loss
    assert registry.get("fsanet_fusion").decode(out).shape == (3, 3)


def test_fusion_loss_is_sum_of_member_losses_and_eval_is_mean():
    spec = registry.get("fsanet_fusion")
    torch.manual_seed(1)
    stacked = torch.randn(4, 3, 3) * 30
    y = torch.randn(4, 3) * 30
    expect = sum((stacked[:, k] - y).abs().mean() for k in range(3))
    assert torch.allclose(spec.loss(stacked, {"angles": y}), expect)
    model = spec.build()
    x = torch.rand(2, 3, 64, 64) * 255
    model.eval()
    with torch.no_grad():
        members = torch.stack([model.members[v](x) for v in ("1x1", "var", "wo")], 1)
        assert torch.allclose(model(x), members.mean(1), atol=1e-5)


def test_optimizer_schedule():
    model = torch.nn.Linear(2, 2)  # the schedule does not depend on the model
    opt, sched = registry.get("fsanet_var").make_optimizer(model, 90)
    assert isinstance(opt, torch.optim.Adam)
    lrs = []
    for _ in range(90):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[29] == pytest.approx(1e-3)
    assert lrs[30] == pytest.approx(1e-4) and lrs[59] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(1e-5) and lrs[89] == pytest.approx(1e-5)
    opt, _ = registry.get("fsanet_var").make_optimizer(model, 10, lr=5e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


@pytest.mark.parametrize("name", SINGLE + ("fsanet_fusion",))
def test_few_training_steps_reduce_l1(name):
    torch.manual_seed(0)
    spec = registry.get(name)
    model = spec.build().train()
    x = torch.rand(8, 3, 64, 64) * 255
    y = {"angles": (torch.rand(8, 3) - 0.5) * 120}
    opt, sched = spec.make_optimizer(model, 1000, lr=3e-3)
    losses = []
    for _ in range(12):
        loss = spec.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < losses[0] - 1.0, losses


# ------------------------------------------------------------------------------------------------
# Converter on a synthetic file in the official Keras layout
# ------------------------------------------------------------------------------------------------
SEP_CH = (16, 32, 32, 64, 64, 128, 128)


def official_layout(variant: str) -> dict:
    """``{group: {layer: {weight: shape}}}`` of the official save_weights files (Keras 2.2)."""
    g = {}
    for i in range(14):
        c = SEP_CH[i % 7]
        ci = 3 if i % 7 == 0 else SEP_CH[i % 7 - 1]
        g[f"separable_conv2d_{i + 1}"] = {"depthwise_kernel": (3, 3, ci, 1), "pointwise_kernel": (1, 1, ci, c), "bias": (c,)}
        g[f"batch_normalization_{i + 1}"] = {k: (c,) for k in ("gamma", "beta", "moving_mean", "moving_variance")}
    for n, ci in zip(range(1, 7), (128, 128, 64, 64, 32, 32)):
        g[f"conv2d_{n}"] = {"kernel": (1, 1, ci, 64), "bias": (64,)}
    s = {}
    first_f_dense = 1
    if variant in ("1x1", "var"):
        if variant == "1x1":
            s["conv2d_7"] = {"kernel": (1, 1, 64, 1), "bias": (1,)}
        s["dense_1"] = {"kernel": (64, 960), "bias": (960,)}
        s["dense_2"] = {"kernel": (192, 35), "bias": (35,)}
        first_f_dense = 3
    n_prim = 192 if variant == "wo" else 21
    f = {}
    for k in range(3):
        f[f"dense_{first_f_dense + k}"] = {"kernel": (8, 9), "bias": (9,)}
        f[f"delta_s{k + 1}"] = {"kernel": (4, 3), "bias": (3,)}
        f[f"local_delta_stage{k + 1}"] = {"kernel": (4, 3), "bias": (3,)}
    return {"input_1": {}, "ssr_G_model": g, "ssr_S_model": s, "ssr_Cap_model": {"caps": {"W": (3, n_prim, 16, 64)}},
            "ssr_F_Cap_model": f, "pred_pose": {}}


def write_synthetic_h5(path, variant: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    with h5py.File(path, "w") as fh:
        layout = official_layout(variant)
        fh.attrs["layer_names"] = np.array([n.encode() for n in layout])
        fh.attrs["backend"] = b"tensorflow"
        fh.attrs["keras_version"] = b"2.2.2"
        for group, layers in layout.items():
            grp = fh.create_group(group)
            names = []
            for layer, weights in layers.items():
                for w, shape in weights.items():
                    if w == "moving_variance":
                        a = rng.uniform(0.5, 1.5, shape)
                    elif w == "gamma":
                        a = rng.uniform(0.5, 1.5, shape)
                    else:
                        a = rng.normal(0.0, 0.3, shape)
                    a = a.astype(np.float32)
                    grp.create_dataset(f"{layer}/{w}:0", data=a)
                    names.append(f"{layer}/{w}:0".encode())
                    arrays[(layer, w)] = a
            grp.attrs["weight_names"] = np.array(names) if names else np.array([], dtype=np.float64)
    return arrays


def keras_reference_forward(arrays, variant: str, img_nhwc: np.ndarray) -> np.ndarray:
    """The official Keras graph written out in numpy (NHWC, float64), from the raw Keras arrays."""
    a = {k: v.astype(np.float64) for k, v in arrays.items()}

    def sep(x, n):
        dw, pw, b = a[(f"separable_conv2d_{n}", "depthwise_kernel")], a[(f"separable_conv2d_{n}", "pointwise_kernel")], a[(f"separable_conv2d_{n}", "bias")]
        h, w = x.shape[1:3]
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = sum(xp[:, i:i + h, j:j + w, :] * dw[i, j, :, 0] for i in range(3) for j in range(3))
        return y @ pw[0, 0] + b

    def bn(x, n):
        p = f"batch_normalization_{n}"
        return (x - a[(p, "moving_mean")]) / np.sqrt(a[(p, "moving_variance")] + 1e-3) * a[(p, "gamma")] + a[(p, "beta")]

    def pool(x, kind):
        b, h, w, c = x.shape
        r = x.reshape(b, h // 2, 2, w // 2, 2, c)
        return r.mean((2, 4)) if kind == "avg" else r.max((2, 4))

    def conv1(x, name):
        return x @ a[(name, "kernel")][0, 0] + a[(name, "bias")]

    def dense(x, name):
        return x @ a[(name, "kernel")] + a[(name, "bias")]

    sig = expit

    def stream(first, act, kind):
        x = img_nhwc.astype(np.float64)
        outs = []
        for i in range(7):
            x = act(bn(sep(x, first + i), first + i))
            if i in (0, 2, 4):
                x = pool(x, kind)
                outs.append(x)
        outs.append(x)
        return outs

    xs = stream(1, lambda z: np.maximum(z, 0), "avg")
    ss = stream(8, np.tanh, "max")
    f1 = np.tanh(conv1(ss[3], "conv2d_1")) * np.maximum(conv1(xs[3], "conv2d_2"), 0)
    f2 = np.tanh(conv1(ss[2], "conv2d_3")) * np.maximum(conv1(xs[2], "conv2d_4"), 0)
    f3 = pool(np.tanh(conv1(ss[1], "conv2d_5")) * np.maximum(conv1(xs[1], "conv2d_6"), 0), "avg")
    feats = [f1, f2, f3]
    B = img_nhwc.shape[0]
    pix = np.concatenate([f.reshape(B, -1, 64) for f in feats], 1)  # (B, 192, 64)
    if variant == "wo":
        prim = pix
    else:
        if variant == "1x1":
            scores = [sig(conv1(f, "conv2d_7")).reshape(B, -1) for f in feats]
        else:
            scores = [f.var(axis=-1).reshape(B, -1) for f in feats]
        sl = sig(dense(np.concatenate(scores, 1), "dense_2")).reshape(B, 7, 5)
        prims = []
        for sc in scores:
            sr = sig(dense(sc, "dense_1")).reshape(B, 5, 192)
            S = sl @ sr
            prims.append(S @ pix / S.sum(-1, keepdims=True))
        prim = np.concatenate(prims, 1)
    W = a[("caps", "W")]
    u_hat = np.einsum("jidk,bik->bjid", W, prim)
    blog = np.zeros(u_hat.shape[:3])
    for r in range(2):
        c = np.exp(blog - blog.max(1, keepdims=True))
        c = c / c.sum(1, keepdims=True)
        s = np.einsum("bji,bjid->bjd", c, u_hat)
        sq = (s ** 2).sum(-1, keepdims=True)
        v = sq / (1 + sq) / np.sqrt(sq + 1e-7) * s
        if r == 0:
            blog = blog + np.einsum("bjd,bjid->bji", v, u_hat)
    first = 1 if variant == "wo" else 3
    P, D, L = [], [], []
    for k in range(3):
        f = v[:, k, :]
        D.append(np.tanh(dense(f[:, 0:4], f"delta_s{k + 1}")))
        L.append(np.tanh(dense(f[:, 4:8], f"local_delta_stage{k + 1}")))
        P.append(np.maximum(dense(f[:, 8:16], f"dense_{first + k}"), 0).reshape(B, 3, 3))
    # The official SSR_module, loop for loop.
    out_a = sum((i - 1 + L[0]) * P[0][:, :, i] for i in range(3)) / (3 * (1 + D[0]))
    out_b = sum((j - 1 + L[1]) * P[1][:, :, j] for j in range(3)) / (3 * (1 + D[0])) / (3 * (1 + D[1]))
    out_c = sum((k - 1 + L[2]) * P[2][:, :, k] for k in range(3)) / (3 * (1 + D[0])) / (3 * (1 + D[1])) / (3 * (1 + D[2]))
    return (out_a + out_b + out_c) * 99


@pytest.mark.parametrize("variant", ["1x1", "var", "wo"])
def test_converter_round_trip_on_keras_layout(tmp_path, variant):
    name = f"fsanet_{variant}"
    official_name = OFFICIAL_FILES[name]
    h5 = tmp_path / official_name
    arrays = write_synthetic_h5(h5, variant, seed={"1x1": 1, "var": 2, "wo": 3}[variant])

    summary = convert(h5, tmp_path / "out.pt")
    assert summary["model"] == name
    assert summary["trainable_params"] == OFFICIAL_PARAMS[name]

    blob = torch.load(tmp_path / "out.pt", weights_only=True)
    sd = blob["state_dict"]
    assert blob["model"] == name and all(isinstance(t, torch.Tensor) for t in sd.values())

    # A few entries checked element by element against the Keras arrays (layout transposes).
    dw = arrays[("separable_conv2d_9", "depthwise_kernel")]  # stream s, block 2
    assert np.array_equal(sd["backbone.stream_s.block2.depthwise.weight"].numpy(), dw.transpose(2, 3, 0, 1))
    pw = arrays[("separable_conv2d_7", "pointwise_kernel")]  # stream x, block 7
    assert np.array_equal(sd["backbone.stream_x.block7.pointwise.weight"].numpy()[:, :, 0, 0], pw[0, 0].T)
    assert np.array_equal(sd["backbone.stream_s.block7.bn.running_var"].numpy(),
                          arrays[("batch_normalization_14", "moving_variance")])
    assert np.array_equal(sd["backbone.conv_s.0.weight"].numpy()[:, :, 0, 0], arrays[("conv2d_1", "kernel")][0, 0].T)
    assert np.array_equal(sd["backbone.conv_x.2.bias"].numpy(), arrays[("conv2d_6", "bias")])
    assert np.array_equal(sd["caps.W"].numpy(), arrays[("caps", "W")])
    first = 1 if variant == "wo" else 3
    assert np.array_equal(sd["heads.2.pred.weight"].numpy(), arrays[(f"dense_{first + 2}", "kernel")].T)
    assert np.array_equal(sd["heads.1.local.bias"].numpy(), arrays[("local_delta_stage2", "bias")])
    if variant != "wo":
        assert np.array_equal(sd["mapping.sr.weight"].numpy(), arrays[("dense_1", "kernel")].T)
        assert np.array_equal(sd["mapping.sl.bias"].numpy(), arrays[("dense_2", "bias")])

    # The converted model computes what the Keras graph computes (numpy reference, float64).
    got_name, model = load_converted(tmp_path / "out.pt")
    assert got_name == name and not model.training
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 255, (2, 64, 64, 3))
    ref = keras_reference_forward(arrays, variant, img)
    with torch.no_grad():
        out = model.double()(torch.from_numpy(img).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)

    # build(pretrained=...) takes the .pt and the .h5 alike.
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float()
    spec = registry.get(name)
    with torch.no_grad():
        a = spec.build(pretrained=str(tmp_path / "out.pt")).eval()(x)
        b = spec.build(pretrained=str(h5)).eval()(x)
    assert torch.allclose(a, b)

    # The variant comes from the weights; a file name that contradicts them is refused.
    assert infer_variant(read_keras_h5(h5), tmp_path / "weights.h5") == variant
    wrong = {"1x1": "fsanet_noS_capsule_3_16_2_192_5.h5", "var": "fsanet_capsule_3_16_2_21_5.h5",
             "wo": "fsanet_var_capsule_3_16_2_21_5.h5"}[variant]
    with pytest.raises(ValueError):
        infer_variant(read_keras_h5(h5), tmp_path / wrong)


def test_converter_fusion_directory(tmp_path):
    for i, (name, fname) in enumerate(OFFICIAL_FILES.items()):
        write_synthetic_h5(tmp_path / fname, name.split("_")[1], seed=10 + i)
    summary = convert(tmp_path, tmp_path / "fusion.pt")
    assert summary["model"] == "fsanet_fusion"
    name, fusion = load_converted(tmp_path / "fusion.pt")
    assert name == "fsanet_fusion"
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        singles = [load_converted(tmp_path / f)[1](x) for f in OFFICIAL_FILES.values()]
        assert torch.allclose(fusion(x), torch.stack(singles).mean(0), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Fidelity: the official weights on real AFLW2000 samples
# ------------------------------------------------------------------------------------------------
def aflw2000_fsanet_batch():
    """FSA-Net's own AFLW2000 preprocessing (``data/type1/TYY_create_db_type1.py``)."""
    from dataprep.boxes import fsanet_margin
    from dataprep.crop import crop_and_resize

    images, labels = [], []
    for jpg in sorted(glob.glob(str(AFLW / "*.jpg"))):
        mat = sio.loadmat(jpg[:-4] + ".mat")
        pt2d, pose = mat["pt2d"], mat["Pose_Para"][0]
        keep_x, keep_y = pt2d[0] > 0, pt2d[1] > 0
        keep = keep_y if keep_x.sum() > keep_y.sum() else keep_x  # whichever keeps fewer
        xs, ys = pt2d[0][keep], pt2d[1][keep]
        img = cv2.imread(jpg)  # BGR
        box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
        window = fsanet_margin(box, (img.shape[1], img.shape[0]))
        crop, _ = crop_and_resize(img, window, 64, interpolation=cv2.INTER_LINEAR)  # cv2.resize default
        images.append(crop)
        labels.append(np.array([pose[1], pose[0], pose[2]]) * 180.0 / np.pi)  # yaw, pitch, roll
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # raw 0-255 BGR
    return x, np.stack(labels)


@pytest.mark.skipif(not (PRETRAINED.is_dir() and AFLW.is_dir()), reason="official weights / AFLW2000 samples absent")
def test_official_weights_on_real_aflw2000(tmp_path, capsys):
    x, y = aflw2000_fsanet_batch()
    assert len(x) == 8
    preds, lines = {}, []
    for name, fname in OFFICIAL_FILES.items():
        summary = convert(PRETRAINED / fname, tmp_path / f"{name}.pt")
        assert summary["model"] == name and summary["trainable_params"] == OFFICIAL_PARAMS[name]
        got, model = load_converted(tmp_path / f"{name}.pt")
        assert got == name
        with torch.no_grad():
            preds[name] = model(x).numpy()
    name, fusion = load_converted(PRETRAINED)  # the directory -> fsanet_fusion
    assert name == "fsanet_fusion"
    with torch.no_grad():
        preds["fsanet_fusion"] = fusion(x).numpy()
    np.testing.assert_allclose(preds["fsanet_fusion"], np.mean([preds[n] for n in OFFICIAL_FILES], 0), atol=1e-3)

    maes = {}
    for name, p in preds.items():
        err = np.abs(p - y).mean(0)
        maes[name] = err
        lines.append(f"{name:14s} MAE yaw {err[0]:5.2f}  pitch {err[1]:5.2f}  roll {err[2]:5.2f}  mean {err.mean():5.2f}")
    with capsys.disabled():
        print("\nFSA-Net official 300W-LP weights on 8 real AFLW2000 samples:\n" + "\n".join(lines))
    for name, err in maes.items():
        assert err.mean() < 8.0, (name, err)
