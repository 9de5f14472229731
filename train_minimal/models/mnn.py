"""MNN: the multi-task network of Valle, Buenaposada & Baumela, "Multi-task head pose estimation
in-the-wild" (TPAMI 2021), as described in its supplementary material.

Registered models
-----------------
``mnn``       the full network: encoder, pose heads at the bottleneck, decoder, landmark heatmap
              and visibility heads at the decoder end (L = 68 landmarks).
``mnn_pose``  the encoder and pose heads alone (pose-only training; no decoder is built).

Architecture (written from the paper's description; no code or weights of it are public, the
authors only ship a frozen TensorFlow graph):

* Stem: 7x7 convolution 3 -> 256 channels + BN + ReLU at the input resolution (256 x 256).
* Encoder: 9 stages, 256x256 -> 128 -> 64 -> 32 -> 16 -> 8 -> 4 -> 2 -> 1x1: one pre-activation
  bottleneck residual block per stage (BN-ReLU-1x1 256->128, BN-ReLU-3x3 128->128, BN-ReLU-1x1
  128->256, identity shortcut; 214,528 parameters), 2x2 max pooling between stages.
* Pose heads at the 1x1 bottleneck: ``fc_pose`` (256 -> 256, ReLU) and ``fc_pose_proj``
  (256 -> 6). The 6 outputs are the first two columns of the head rotation matrix (the continuous
  6D rotation representation, Zhou et al. 2019), orthonormalised by Gram-Schmidt; the rotation is
  in ``dataprep.labels``' convention, so ``decode`` gives (yaw, pitch, roll) with the same formulas
  as ``labels.rotation_to_euler``. Pose loss: squared Frobenius distance to the label's rotation
  ``labels.rotation_from_euler(yaw, pitch, roll)``.
* Decoder: 8 stages back up to 256 x 256; each upsamples (nearest) the stage below, concatenates
  the encoder's output at that resolution (the lateral skip connection), fuses with a 1x1
  convolution 512 -> 256 + BN + ReLU and applies a bottleneck block (346,368 parameters a stage).
* Heads at the decoder end: ``heatmaps`` 1x1 conv 256 -> L (one heatmap per landmark at the input
  resolution) and ``visibility`` 1x1 conv 256 -> L per-pixel visibility logits, read out under the
  spatial softmax of each landmark's heatmap (one logit per landmark).

Parameters (``python -m train_minimal params --model mnn``)::

                      this code   supplementary   difference
    pose-only          2,036,486     2,048,710     -12,224 (-0.60%)
    full (L = 68)      4,842,382     4,900,948     -58,566 (-1.20%)

The supplementary gives the totals and the stage layout but not every layer's exact shape; the
remaining difference sits in the stem (ours is a single 7x7 convolution; 12k more parameters there
would be e.g. a second, wider stem convolution) and in the decoder's lateral fusion (ours is one
1x1 convolution per stage; the remaining ~46k, 5.8k per stage, would be e.g. biases/BN on a
projection of the skip branch). Both are well inside 2% and do not change what the network can do.

Training targets: ``angles`` always; ``landmarks`` (B, 68, 2) in input pixels with a per-sample
``landmarks_mask`` when the shards carry ``<key>.pts.npy`` (300W-LP). Without landmarks the full
model trains pose-only (its decoder outputs are kept in the graph with weight 0, so DDP sees every
parameter used). Landmark loss: MSE to Gaussian heatmaps (sigma = size / 64, 4 px at 256),
normalised so an all-zero prediction costs 1 per landmark; visibility: BCE, a landmark being
visible when it falls inside the crop (300W-LP has no occlusion labels). Loss = pose + heatmaps +
visibility, each weight 1.

Optimiser: Adam lr 1e-3 with cosine decay to lr / 100, batch 32, 100 epochs; like the loss
weights, these are reasonable defaults, not values checked against the paper (offline).
In eval mode the decoder is skipped unless ``forward(x, landmarks=True)`` asks for it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dataprep import labels

from ..registry import ModelSpec, count_parameters, register
from ._pretrained import load_weights_file, normalize_pretrained

CHANNELS = 256
STAGES = 9
NUM_LANDMARKS = 68
INPUT_SIZE = 256
SUPPLEMENTARY_PARAMS = {"pose_only": 2_048_710, "full": 4_900_948}


class PreActBottleneck(nn.Module):
    def __init__(self, ch: int = CHANNELS):
        super().__init__()
        mid = ch // 2
        self.branch = nn.Sequential(
            nn.BatchNorm2d(ch), nn.ReLU(inplace=True), nn.Conv2d(ch, mid, 1),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, mid, 3, padding=1),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, ch, 1),
        )

    def forward(self, x):
        return x + self.branch(x)


class MNNEncoder(nn.Module):
    def __init__(self, ch: int = CHANNELS, stages: int = STAGES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, ch, 7, padding=3), nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList(PreActBottleneck(ch) for _ in range(stages))
        # ceil_mode: any input size works; a 1x1 map stays 1x1 (e.g. 64x64 inputs in the tests).
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        skips = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        return skips  # resolutions 256, 128, ..., 1


class MNNDecoder(nn.Module):
    def __init__(self, ch: int = CHANNELS, stages: int = STAGES):
        super().__init__()
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * ch, ch, 1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)) for _ in range(stages - 1))
        self.blocks = nn.ModuleList(PreActBottleneck(ch) for _ in range(stages - 1))

    def forward(self, skips):
        y = skips[-1]
        for j, (fuse, block) in enumerate(zip(self.fuse, self.blocks)):
            skip = skips[-2 - j]
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = block(fuse(torch.cat([y, skip], dim=1)))
        return y


class MNN(nn.Module):
    def __init__(self, num_landmarks: int | None = NUM_LANDMARKS, ch: int = CHANNELS):
        super().__init__()
        self.encoder = MNNEncoder(ch)
        self.fc_pose = nn.Sequential(nn.Linear(ch, ch), nn.ReLU(inplace=True))
        self.fc_pose_proj = nn.Linear(ch, 6)
        self.num_landmarks = num_landmarks or 0
        if self.num_landmarks:
            self.decoder = MNNDecoder(ch)
            self.heatmaps = nn.Conv2d(ch, self.num_landmarks, 1)
            self.visibility = nn.Conv2d(ch, self.num_landmarks, 1)

    def pose_only_modules(self):
        return [self.encoder, self.fc_pose, self.fc_pose_proj]

    def parameter_report(self) -> dict[str, int]:
        pose = sum(count_parameters(m, trainable_only=False) for m in self.pose_only_modules())
        report = {"pose-only (encoder + fc_pose + fc_pose_proj)": pose}
        if self.num_landmarks:
            report[f"full (L={self.num_landmarks})"] = count_parameters(self, trainable_only=False)
        return report

    def forward(self, x, landmarks: bool | None = None):
        skips = self.encoder(x)
        z = torch.flatten(F.adaptive_avg_pool2d(skips[-1], 1), 1)
        out = {"pose": self.fc_pose_proj(self.fc_pose(z))}
        if landmarks is None:
            landmarks = self.training
        if landmarks and self.num_landmarks:
            y = self.decoder(skips)
            hm = self.heatmaps(y)
            attn = F.softmax(hm.flatten(2).float(), dim=-1)
            vis = (attn * self.visibility(y).flatten(2).float()).sum(-1)
            out["heatmaps"] = hm
            out["visibility"] = vis
        return out


# --------------------------------------------------------------------------------------------
# Rotation maths (torch versions of dataprep.labels)
# --------------------------------------------------------------------------------------------
def rotation_from_6d(d6: torch.Tensor) -> torch.Tensor:
    """``(B, 6)`` -> ``(B, 3, 3)``: Gram-Schmidt on two 3-vectors, used as the first two columns."""
    a1, a2 = d6[:, :3].float(), d6[:, 3:].float()
    b1 = F.normalize(a1, dim=1, eps=1e-6)
    b2 = F.normalize(a2 - (b1 * a2).sum(1, keepdim=True) * b1, dim=1, eps=1e-6)
    b3 = torch.cross(b1, b2, dim=1)
    return torch.stack([b1, b2, b3], dim=2)


# --------------------------------------------------------------------------------------------
# Loss / decode / optimiser
# --------------------------------------------------------------------------------------------
def gaussian_heatmaps(points: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """``(B, L, 2)`` pixel (x, y) -> ``(B, L, H, W)`` Gaussians of peak 1 (pixel centres at i)."""
    ys = torch.arange(height, device=points.device, dtype=torch.float32)
    xs = torch.arange(width, device=points.device, dtype=torch.float32)
    gx = torch.exp(-((xs[None, None, :] - points[..., 0:1]) ** 2) / (2 * sigma ** 2))  # (B, L, W)
    gy = torch.exp(-((ys[None, None, :] - points[..., 1:2]) ** 2) / (2 * sigma ** 2))  # (B, L, H)
    return gy[..., :, None] * gx[..., None, :]


def mnn_loss(outputs, targets):
    pose = rotation_from_6d(outputs["pose"])
    angles = targets["angles"]
    loss = ((pose - labels.rotation_from_euler(angles[:, 0], angles[:, 1], angles[:, 2])) ** 2).sum((1, 2)).mean()
    hm = outputs.get("heatmaps")
    if hm is None:
        return loss
    vis = outputs["visibility"]
    lms = targets.get("landmarks")
    mask = targets.get("landmarks_mask")
    if lms is not None and mask is None:
        mask = torch.ones(lms.shape[0], dtype=torch.bool, device=lms.device)
    if lms is None or lms.shape[1] != hm.shape[1] or not bool(mask.any()):
        # No landmark targets in this batch: pose-only, decoder kept in the graph at weight 0.
        return loss + 0.0 * (hm.float().sum() + vis.sum())
    h, w = hm.shape[-2:]
    size = float(max(h, w))
    sigma = size / 64.0
    # Landmarks come in input pixels; heatmaps are at the input resolution (scale if not).
    pts = lms.float() * torch.tensor([w / size, h / size], device=lms.device) if (h, w) != (size, size) else lms.float()
    target = gaussian_heatmaps(pts, h, w, sigma)
    per_lm = ((hm.float() - target) ** 2).sum((-2, -1)) / (math.pi * sigma ** 2)  # (B, L)
    inside = ((pts[..., 0] >= 0) & (pts[..., 0] <= w - 1) & (pts[..., 1] >= 0) & (pts[..., 1] <= h - 1)).float()
    bce = F.binary_cross_entropy_with_logits(vis, inside, reduction="none")  # (B, L)
    m = mask.float()[:, None]
    denom = (m.sum() * hm.shape[1]).clamp_min(1.0)
    # Heatmap loss only where the landmark is inside the crop; visibility loss everywhere.
    hm_loss = (per_lm * inside * m).sum() / (inside * m).sum().clamp_min(1.0)
    vis_loss = (bce * m).sum() / denom
    return loss + hm_loss + vis_loss


def mnn_decode(outputs):
    return labels.rotation_to_euler(rotation_from_6d(outputs["pose"]))


def mnn_optimizer(model, total_steps: int, lr: float | None = None):
    lr = 1e-3 if lr is None else lr
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total_steps)), eta_min=lr / 100)
    return opt, sched


def _build(num_landmarks):
    def build(pretrained=None, **_):
        p = normalize_pretrained(pretrained)
        model = MNN(num_landmarks)
        if p == "auto":
            # The paper trains MNN from scratch; there are no ImageNet weights for this network.
            import sys
            print("[pretrained] MNN has no ImageNet weights (trained from scratch in the paper): "
                  "starting from random initialisation", file=sys.stderr)
        elif p is not None:
            load_weights_file(model, p, backbone_prefix="encoder.")
        return model

    return build


_COMMON = dict(input_size=INPUT_SIZE, crop_rule="square", normalize="imagenet", loss=mnn_loss,
               decode=mnn_decode, make_optimizer=mnn_optimizer)
DEFAULTS = {"batch_size": 32, "epochs": 100, "lr": 1e-3}

register(ModelSpec(name="mnn", build=_build(NUM_LANDMARKS), defaults=dict(DEFAULTS),
                   description="MNN (Valle et al.): encoder-decoder, pose at the bottleneck, 68 heatmaps + visibility",
                   **_COMMON))
register(ModelSpec(name="mnn_pose", build=_build(None), defaults=dict(DEFAULTS),
                   description="MNN encoder + pose heads only (pose-only training)", **_COMMON))
