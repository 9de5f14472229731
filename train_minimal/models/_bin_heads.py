"""Bin-classification heads shared by Hopenet, EHPNet and WHENet: torch versions of the
``dataprep.labels.BinSpec`` maths (angle -> bin, expected angle), the combined cross-entropy +
``alpha`` x MSE head loss (Hopenet's), and the pose network with three linear bin heads."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dataprep.labels import BinSpec


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
