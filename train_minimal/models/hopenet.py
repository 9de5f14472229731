"""Hopenet (Ruiz, Chong & Rehg, "Fine-Grained Head Pose Estimation Without Keypoints", CVPRW 2018).

Registered model
----------------
``hopenet``: torchvision ResNet-50 trunk (``fc`` removed, 2048 features after global average
pooling) and three fully connected heads ``fc_yaw``, ``fc_pitch``, ``fc_roll`` of 66 bins each
(``dataprep.labels.HOPENET_BINS``: 3 degrees over [-99, 99]). 23,508,032 + 3 x 135,234 =
**23,913,734** parameters, the official ``hopenet.Hopenet(Bottleneck, [3, 4, 6, 3], 66)`` without
its unused ``fc_finetune``.

As in the official ``code/train_hopenet.py``:

* loss per angle = cross-entropy on the bin + ``alpha`` x MSE between the expected angle
  ``3 * sum(softmax * idx) - 99`` and the continuous label; the three losses are summed
  (``torch.autograd.backward(loss_seq, grad_seq)`` with unit gradients). ``alpha`` defaults to 1
  here (the paper reports alpha = 1 and 2; the code's argparse default is 0.001); pass
  ``--alpha 2`` to the trainer for the other published setting.
* Adam (betas 0.9/0.999, eps 1e-8), lr 1e-5 with three parameter groups: ``conv1``/``bn1`` at
  lr 0 (frozen stem), the rest of the trunk at lr, the three heads at 5 x lr; no schedule.
* input 224 x 224, ImageNet RGB normalisation, Hopenet's loose crop (``crop_rule="hopenet"``).

This module also holds the pieces the other bin-classification models (EHPNet, WHENet) share:
torch versions of the ``BinSpec`` maths, the combined CE + alpha x MSE head loss, the pose network
with three bin heads, and the ``--pretrained`` handling (torchvision/timm ImageNet weights or a
local file).
"""
from __future__ import annotations

import inspect
import os
import sys
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dataprep.labels import HOPENET_BINS, BinSpec

from ..registry import ModelSpec, register

HOPENET_PARAMS = 23_913_734


# --------------------------------------------------------------------------------------------
# Bin maths in torch (same formulas as dataprep.labels.BinSpec)
# --------------------------------------------------------------------------------------------
def angle_to_bin(angles: torch.Tensor, bins: BinSpec) -> torch.Tensor:
    """Degrees -> bin index, clipped to ``[0, count - 1]`` (``BinSpec.to_bin``)."""
    idx = torch.floor((angles.float() - bins.low) / bins.width).long()
    return idx.clamp_(0, bins.count - 1)


def expected_angle(logits: torch.Tensor, bins: BinSpec) -> torch.Tensor:
    """Bin logits ``(B, count)`` -> degrees ``(B,)``: ``width * sum(softmax * idx) + low``."""
    idx = torch.arange(bins.count, device=logits.device, dtype=torch.float32)
    prob = F.softmax(logits.float(), dim=1)
    return bins.width * (prob * idx).sum(dim=1) + bins.low


def wrapped_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``min(|a - b|, 360 - |a - b|)`` in degrees (``labels.wrapped_angle_difference``)."""
    d = torch.remainder((a - b).abs(), 360.0)
    return torch.minimum(d, 360.0 - d)


def bin_head_loss(logits: torch.Tensor, target: torch.Tensor, bins: BinSpec, alpha: float,
                  wrap: bool = False) -> torch.Tensor:
    """Cross-entropy on the target's bin + ``alpha`` x mean squared error of the expected angle.

    With ``wrap`` the squared error is ``min(|d|, 360 - |d|)**2`` (WHENet's full-range yaw loss).
    """
    target = target.float()
    ce = F.cross_entropy(logits.float(), angle_to_bin(target, bins))
    pred = expected_angle(logits, bins)
    err = wrapped_difference(pred, target) if wrap else pred - target
    return ce + alpha * (err ** 2).mean()


def decode_bins(outputs: Sequence[torch.Tensor], bins: Sequence[BinSpec]) -> torch.Tensor:
    """Three bin-logit tensors -> ``(B, 3)`` yaw, pitch, roll in degrees."""
    return torch.stack([expected_angle(o, b) for o, b in zip(outputs, bins)], dim=1)


def three_bin_loss(outputs, targets, bins: Sequence[BinSpec], alpha: float, wrap_yaw: bool = False):
    angles = targets["angles"]
    return sum(
        bin_head_loss(o, angles[:, i], b, alpha, wrap=(wrap_yaw and i == 0))
        for i, (o, b) in enumerate(zip(outputs, bins))
    )


class BinPoseNet(nn.Module):
    """A feature extractor (``backbone(x) -> (B, feat_dim)``), an optional hidden layer, and three
    linear bin heads named ``fc_yaw``, ``fc_pitch``, ``fc_roll`` (Hopenet's names)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, counts: Sequence[int], hidden: int | None = None):
        super().__init__()
        self.backbone = backbone
        if hidden:
            self.fc_hidden = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ReLU(inplace=True))
            feat_dim = hidden
        else:
            self.fc_hidden = nn.Identity()
        self.fc_yaw = nn.Linear(feat_dim, counts[0])
        self.fc_pitch = nn.Linear(feat_dim, counts[1])
        self.fc_roll = nn.Linear(feat_dim, counts[2])

    def forward(self, x):
        f = self.fc_hidden(torch.flatten(self.backbone(x), 1))
        return self.fc_yaw(f), self.fc_pitch(f), self.fc_roll(f)


# --------------------------------------------------------------------------------------------
# --pretrained handling
# --------------------------------------------------------------------------------------------
class PretrainedUnavailable(RuntimeError):
    """ImageNet weights were asked for but cannot be had (no network and nothing cached)."""


def no_weights_message(what: str) -> str:
    return (f"ImageNet weights for {what} could not be downloaded (no network?) — pass --pretrained PATH "
            f"to a local file, or --pretrained none")


def normalize_pretrained(pretrained) -> str | None:
    """``None``/``"none"``/``""`` -> None (scratch); ``"auto"``; anything else is a file path."""
    if pretrained is None:
        return None
    p = str(pretrained).strip()
    if p.lower() in ("", "none", "scratch", "false"):
        return None
    if p.lower() in ("auto", "imagenet", "true"):
        return "auto"
    return p


def torchvision_model(arch: str, weights: str, pretrained, **kwargs) -> nn.Module:
    """``torchvision.models.<arch>``; with ``pretrained == "auto"`` the ``<weights>`` enum member
    (e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``), downloaded into the torch hub cache if needed."""
    import torchvision

    fn = getattr(torchvision.models, arch)
    if normalize_pretrained(pretrained) != "auto":
        return fn(weights=None, **kwargs)
    enum_name, member = weights.split(".")
    w = getattr(getattr(torchvision.models, enum_name), member)
    try:
        return fn(weights=w, **kwargs)
    except Exception as exc:  # URLError, socket errors, partial downloads...
        raise PretrainedUnavailable(no_weights_message(f"{arch} ({weights})") + f" [{type(exc).__name__}: {exc}]") from exc


def _timm_weights_cached(name: str) -> bool:
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
        return bool(hub_id) and any(
            isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Quick check before a download that would otherwise retry for a minute with no network."""
    import socket

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # can't tell through a proxy; let the download try
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def timm_model(name: str, pretrained, **kwargs) -> nn.Module:
    import timm

    if normalize_pretrained(pretrained) != "auto":
        return timm.create_model(name, pretrained=False, **kwargs)
    if not _timm_weights_cached(name) and not _reachable("huggingface.co"):
        raise PretrainedUnavailable(no_weights_message(f"timm {name}") + " [huggingface.co unreachable, not in the cache]")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise PretrainedUnavailable(no_weights_message(f"timm {name}") + f" [{type(exc).__name__}: {exc}]") from exc


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_weights_file(model: nn.Module, path: str, backbone_prefix: str = "backbone.", log=None) -> dict:
    """Load a local weights file into ``model`` non-strictly and report what did not match.

    Accepts a bare state dict, ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers (our own
    checkpoints included), ``module.`` prefixes, and backbone-only files (e.g. torchvision's
    ``resnet50-*.pth``, whose ``conv1.weight`` goes to ``backbone.conv1.weight``). Tensors whose
    shape does not match are skipped and reported. Returns ``{"loaded", "missing", "unexpected",
    "mismatched"}`` key lists; raises if nothing at all matched.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained {path}: no such file (use 'auto' for ImageNet weights or 'none' for scratch)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            if isinstance(blob.get(wrapper), dict):
                blob = blob[wrapper]
                break
    if not isinstance(blob, dict):
        raise ValueError(f"--pretrained {path}: expected a state dict, found {type(blob).__name__}")
    own = model.state_dict()
    loaded, unexpected, mismatched = {}, [], []
    for key, value in blob.items():
        if not torch.is_tensor(value):
            continue
        k = _strip(key)
        target = k if k in own else (backbone_prefix + k if backbone_prefix + k in own else None)
        if target is None:
            unexpected.append(key)
        elif own[target].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} != {tuple(own[target].shape)}")
        else:
            loaded[target] = value
    if not loaded:
        raise ValueError(f"--pretrained {path}: none of its {len(blob)} tensors match the model's parameters")
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in own if k not in loaded]
    missing_backbone = [k for k in missing if k.startswith(backbone_prefix)]
    msg = f"[pretrained] loaded {len(loaded)}/{len(own)} tensors from {path}"
    if missing_backbone:
        msg += f"; backbone keys missing ({len(missing_backbone)}): {', '.join(missing_backbone[:8])}" + (" ..." if len(missing_backbone) > 8 else "")
    other_missing = len(missing) - len(missing_backbone)
    if other_missing:
        msg += f"; {other_missing} non-backbone keys left at their initialisation (heads)"
    if unexpected:
        msg += f"; unused keys ({len(unexpected)}): {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "")
    if mismatched:
        msg += f"; shape mismatches skipped ({len(mismatched)}): {', '.join(mismatched[:4])}"
    log(msg)
    return {"loaded": list(loaded), "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def build_with_pretrained(make: Callable[[object], nn.Module], pretrained) -> nn.Module:
    """``make(pretrained_for_backbone)`` then, for a file path, load it into the whole model."""
    p = normalize_pretrained(pretrained)
    if p in (None, "auto"):
        return make(p)
    model = make(None)
    load_weights_file(model, p)
    return model


def accepts_kwarg(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


# --------------------------------------------------------------------------------------------
# Hopenet
# --------------------------------------------------------------------------------------------
HOPENET_ALL_BINS = (HOPENET_BINS, HOPENET_BINS, HOPENET_BINS)


def build_hopenet(pretrained=None, **_) -> nn.Module:
    def make(p):
        trunk = torchvision_model("resnet50", "ResNet50_Weights.IMAGENET1K_V1", p)
        trunk.fc = nn.Identity()
        return BinPoseNet(trunk, 2048, [b.count for b in HOPENET_ALL_BINS])

    return build_with_pretrained(make, pretrained)


def hopenet_loss(outputs, targets, alpha: float = 1.0):
    return three_bin_loss(outputs, targets, HOPENET_ALL_BINS, alpha)


def hopenet_decode(outputs):
    return decode_bins(outputs, HOPENET_ALL_BINS)


def hopenet_optimizer(model: nn.Module, total_steps: int, lr: float | None = None):
    lr = 1e-5 if lr is None else lr
    stem = [p for m in (model.backbone.conv1, model.backbone.bn1) for p in m.parameters()]
    heads = [p for m in (model.fc_yaw, model.fc_pitch, model.fc_roll) for p in m.parameters()]
    special = {id(p) for p in stem + heads}
    trunk = [p for p in model.parameters() if id(p) not in special]
    opt = torch.optim.Adam(
        [{"params": stem, "lr": 0.0}, {"params": trunk, "lr": lr}, {"params": heads, "lr": lr * 5}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8,
    )
    return opt, None


register(ModelSpec(
    name="hopenet",
    build=build_hopenet,
    input_size=224,
    crop_rule="hopenet",
    normalize="imagenet",
    loss=hopenet_loss,
    decode=hopenet_decode,
    make_optimizer=hopenet_optimizer,
    description="Hopenet: ResNet-50 + three 66-bin heads (3 deg over +-99), CE + alpha*MSE, Adam 1e-5",
    defaults={"batch_size": 128, "epochs": 25, "lr": 1e-5, "alpha": 1.0},
))
