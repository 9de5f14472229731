"""WHENet (Zhou & Gregson, "WHENet: Real-time Fine-Grained Estimation for Wide Range Head Pose",
BMVC 2020), full-range variant.

Registered model
----------------
``whenet``: EfficientNet-B0 trunk (torchvision ``efficientnet_b0`` features + global average
pooling, 1280 features; 4,007,548 parameters) and three linear heads: yaw over the full circle,
120 bins of 3 degrees over [-180, 180] (``WHENET_YAW_BINS``, decode ``3 * E - 180``), pitch and
roll 66 bins over [-99, 99] (``HOPENET_BINS``, decode ``3 * E - 99``). 4,330,360 parameters.

Loss per angle = the paper's classification term, a sigmoid per bin with binary cross-entropy
against the one-hot bin (as its section 3 states, quoted in the authors' repository issue #5; not
Hopenet's softmax cross-entropy), + alpha x squared error of the softmax-expected angle (alpha 1);
for yaw the error is wrapped, ``min(|d|, 360 - |d|)**2`` (``labels.wrapped_angle_difference``), so
a prediction of 179 for a label of -179 costs 2 degrees, not 358. The yaw MAE the trainer reports
for this model is wrapped the same way (``defaults["wrap_yaw"]``).

Input 224 x 224, ImageNet normalisation, square-padded face crops. Adam lr 1e-4, no schedule,
batch 16; these training hyper-parameters are not the paper's verified values (they could not be
checked offline), only reasonable ones for Adam on an ImageNet EfficientNet-B0.
"""
from __future__ import annotations

import torch
from torch import nn

from dataprep.labels import HOPENET_BINS, WHENET_YAW_BINS

from ..registry import ModelSpec, register
from ._bin_heads import BinPoseNet, decode_bins, three_bin_loss
from ._pretrained import build_with_pretrained, torchvision_model

WHENET_ALL_BINS = (WHENET_YAW_BINS, HOPENET_BINS, HOPENET_BINS)


def build_whenet(pretrained=None, **_):
    def make(p):
        trunk = torchvision_model("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", p)
        trunk.classifier = nn.Identity()  # dropout + Linear(1280, 1000) removed
        return BinPoseNet(trunk, 1280, [b.count for b in WHENET_ALL_BINS])

    return build_with_pretrained(make, pretrained)


def whenet_loss(outputs, targets, alpha: float = 1.0):
    return three_bin_loss(outputs, targets, WHENET_ALL_BINS, alpha, wrap_yaw=True, sigmoid=True)


def whenet_decode(outputs):
    return decode_bins(outputs, WHENET_ALL_BINS)


def whenet_optimizer(model, total_steps: int, lr: float | None = None):
    return torch.optim.Adam(model.parameters(), lr=1e-4 if lr is None else lr), None


register(ModelSpec(
    name="whenet",
    build=build_whenet,
    input_size=224,
    crop_rule="square",
    normalize="imagenet",
    loss=whenet_loss,
    decode=whenet_decode,
    make_optimizer=whenet_optimizer,
    description="WHENet (full range): EfficientNet-B0, yaw 120 bins over 360 deg (wrapped loss), pitch/roll 66 bins",
    defaults={"batch_size": 16, "epochs": 25, "lr": 1e-4, "alpha": 1.0, "wrap_yaw": True},
))
