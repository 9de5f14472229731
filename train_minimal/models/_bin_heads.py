"""Bin-classification heads shared by Hopenet, EHPNet and WHENet: the combined cross-entropy +
``alpha`` x MSE head loss (Hopenet's) and the pose network with three linear bin heads. The bin
maths (angle -> bin, expected angle, wrapped difference) is ``dataprep.labels``', on tensors."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dataprep.labels import BinSpec, wrapped_angle_difference


def expected_angle(logits: torch.Tensor, bins: BinSpec) -> torch.Tensor:
    """Bin logits ``(B, count)`` -> degrees ``(B,)``: ``BinSpec.decode`` of their softmax."""
    return bins.decode(F.softmax(logits.float(), dim=1))


def bin_head_loss(logits: torch.Tensor, target: torch.Tensor, bins: BinSpec, alpha: float,
                  wrap: bool = False, sigmoid: bool = False) -> torch.Tensor:
    """Cross-entropy on the target's bin + ``alpha`` x mean squared error of the expected angle
    (softmax over the bins).

    With ``wrap`` the squared error is ``min(|d|, 360 - |d|)**2`` (WHENet's full-range yaw loss).
    With ``sigmoid`` the classification term is WHENet's: a sigmoid per bin and binary
    cross-entropy against the one-hot bin, averaged over bins and samples (Keras'
    ``binary_crossentropy``), in place of the softmax cross-entropy.
    """
    target = target.float()
    index = bins.to_bin(target)
    if sigmoid:
        cls = F.binary_cross_entropy_with_logits(logits.float(), F.one_hot(index, bins.count).float())
    else:
        cls = F.cross_entropy(logits.float(), index)
    pred = expected_angle(logits, bins)
    err = wrapped_angle_difference(pred, target) if wrap else pred - target
    return cls + alpha * (err ** 2).mean()


def decode_bins(outputs: Sequence[torch.Tensor], bins: Sequence[BinSpec]) -> torch.Tensor:
    """Three bin-logit tensors -> ``(B, 3)`` yaw, pitch, roll in degrees."""
    return torch.stack([expected_angle(o, b) for o, b in zip(outputs, bins)], dim=1)


def three_bin_loss(outputs, targets, bins: Sequence[BinSpec], alpha: float, wrap_yaw: bool = False,
                   sigmoid: bool = False):
    angles = targets["angles"]
    return sum(
        bin_head_loss(o, angles[:, i], b, alpha, wrap=(wrap_yaw and i == 0), sigmoid=sigmoid)
        for i, (o, b) in enumerate(zip(outputs, bins))
    )


class BinPoseNet(nn.Module):
    """A feature extractor (``backbone(x) -> (B, feat_dim)``), an optional hidden layer, and three
    linear bin heads named ``fc_yaw``, ``fc_pitch``, ``fc_roll`` (Hopenet's names)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, counts: Sequence[int], hidden: int | None = None,
                 hidden_relu: bool = True):
        super().__init__()
        self.backbone = backbone
        if hidden:
            relu = [nn.ReLU(inplace=True)] if hidden_relu else []
            self.fc_hidden = nn.Sequential(nn.Linear(feat_dim, hidden), *relu)
            feat_dim = hidden
        else:
            self.fc_hidden = nn.Identity()
        self.fc_yaw = nn.Linear(feat_dim, counts[0])
        self.fc_pitch = nn.Linear(feat_dim, counts[1])
        self.fc_roll = nn.Linear(feat_dim, counts[2])

    def forward(self, x):
        f = self.fc_hidden(torch.flatten(self.backbone(x), 1))
        return self.fc_yaw(f), self.fc_pitch(f), self.fc_roll(f)
