"""SSR-Net-MD: the two-stream soft stagewise regression baseline of FSA-Net's paper (Table 1).

The official code calls it ``SSR_net_MT`` (``lib/FSANET_model.py`` in shamangary/FSA-Net, saved
as ``ssrnet_mt``, ``--model_type 1`` of ``FSANET_train.py``); the paper's "MD" is this model:
SSR-Net (Yang et al., IJCAI 2018) extended to Multi-Dimensional output (yaw, pitch, roll), with
FSA-Net's separable-conv streams and no feature aggregation.

Structure (as the Keras code):

* the same two streams and per-stage 1x1 convolutions as FSA-Net
  (``fsanet.TwoStreamBackbone``: ReLU + AvgPool / Tanh + MaxPool, 64 channels per stage);
* stage k: 2x2 max pooling of the tanh map, 2x2 average pooling of the relu map, product,
  flattened in Keras' NHWC order (stage 1 and 2: 4x4x64 = 1024, stage 3: 8x8x64 = 4096);
* per stage: ``delta = tanh(Dense3(tanh(Dense6(f))))``, ``local = tanh(Dense3(tanh(Dense6(f))))``,
  bin scores ``relu(Dense9(f))`` as 3 angles x 3 bins;
* soft stagewise regression over +-99 degrees, lambda_d = 1 (``fsanet.soft_stagewise_regression``).

Input 64x64 raw 0-255 BGR (no normalisation layer in the official model); output (B, 3) yaw, pitch,
roll degrees. Trained with the FSA-Net script: L1, Adam 1e-3, x0.1 at epochs 30/60 of 90, batch 8
(``run_fsanet_train.sh`` trains SSR-Net-MT with batch 8 on 300W-LP, protocol 1; on BIWI,
protocol 2, with 16: pass ``--batch-size 16`` there).
Trainable parameters: 231,763.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dataprep.weights import state_dict_misfit

from ..registry import ModelSpec, register
from ._pretrained import PretrainedFileError, normalize_pretrained, read_weights
from .fsanet import (
    DEFAULTS, STAGE_NUM, TwoStreamBackbone, decode, init_keras_, l1_loss, make_optimizer, train_transforms,
    soft_stagewise_regression,
)

#: Trainable parameter count of our port (the official Keras structure, counted layer by layer).
PARAMS = 231_763

log = logging.getLogger(__name__)


class SSRStageHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 3, stage_num: int = 3):
        super().__init__()
        self.num_classes, self.stage_num = num_classes, stage_num
        self.delta_fc = nn.Linear(in_features, 2 * num_classes)
        self.delta = nn.Linear(2 * num_classes, num_classes)
        self.local_fc = nn.Linear(in_features, 2 * num_classes)
        self.local = nn.Linear(2 * num_classes, num_classes)
        self.pred = nn.Linear(in_features, num_classes * stage_num)

    def forward(self, f):
        delta = torch.tanh(self.delta(torch.tanh(self.delta_fc(f))))
        local = torch.tanh(self.local(torch.tanh(self.local_fc(f))))
        pred = torch.relu(self.pred(f)).view(-1, self.num_classes, self.stage_num)
        return pred, delta, local


class SSRNetMD(nn.Module):
    """SSR-Net-MD (official ``SSR_net_MT``). Input (B, 3, 64, 64) raw BGR; output (B, 3) degrees."""

    def __init__(self, c: int = 64, image_size: int = 64):
        super().__init__()
        self.backbone = TwoStreamBackbone(c)
        # Stage maps before pooling: 8x8 (layer4), 8x8 (layer3), 16x16 (layer2) for a 64 input.
        sides = (image_size // 8, image_size // 8, image_size // 4)
        self.heads = nn.ModuleList(SSRStageHead(c * (s // 2) ** 2, 3, n) for s, n in zip(sides, STAGE_NUM))
        init_keras_(self)

    def forward(self, img):
        preds, deltas, locals_ = [], [], []
        for (s, x), head in zip(self.backbone(img), self.heads):
            f = F.max_pool2d(s, 2) * F.avg_pool2d(x, 2)
            f = f.permute(0, 2, 3, 1).flatten(1)  # Keras Flatten on NHWC
            p, d, l = head(f)
            preds.append(p), deltas.append(d), locals_.append(l)
        return soft_stagewise_regression(preds, deltas, locals_)


def build(pretrained=None, **_):
    model = SSRNetMD()
    pretrained = normalize_pretrained(pretrained)  # "none" -> None, "auto", or a path
    if pretrained is None:
        return model
    if pretrained == "auto":
        log.warning("ssrnet_md: no downloadable pretrained weights; pass a .pt state dict. Building from scratch.")
        return model
    state = read_weights(pretrained, "ssrnet_md state dict")
    misfit = state_dict_misfit(model.state_dict(), state)  # torch's own first line names no key
    if misfit:  # keys or shapes of another model
        raise PretrainedFileError(f"--pretrained {pretrained}: not ssrnet_md's weights ({misfit})")
    model.load_state_dict(state)
    return model


register(ModelSpec(
    name="ssrnet_md", build=build, input_size=64, fixed_input_size=True, crop_rule="fsanet", normalize="raw_bgr",
    loss=l1_loss, decode=decode, make_optimizer=make_optimizer, defaults=dict(DEFAULTS, batch_size=8),
    train_transforms=train_transforms,
    description="SSR-Net-MD (FSA-Net's baseline; official SSR_net_MT), soft stagewise regression",
))
