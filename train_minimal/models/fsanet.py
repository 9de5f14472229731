"""FSA-Net (Yang et al., CVPR 2019) in PyTorch: the three scoring variants and their fusion.

Registered models
-----------------
``fsanet_1x1``     scoring by a 1x1 convolution (official ``FSA_net_Capsule``, 236,615 params)
``fsanet_var``     scoring by the channel variance (``FSA_net_Var_Capsule``, 236,550 params)
``fsanet_wo``      no scoring / no fine-grained mapping (``FSA_net_noS_Capsule``, 692,707 params)
``fsanet_fusion``  the three above, predictions averaged (the paper's "FSA-Net (Fusion)")

Structure, following the official Keras code (shamangary/FSA-Net ``lib/FSANET_model.py``) where
the paper is silent; every layer below has its counterpart there, so official weights convert
one-to-one (``train_minimal/convert_fsanet.py``):

* Input: 64x64 **raw 0-255 BGR** pixels (``cv2.imread`` order), NCHW float. The official model has
  no normalisation layer (no Lambda): the training/test scripts feed the uint8 crops as they are.
* Two streams of 7 separable-conv blocks (depthwise 3x3 'same' + pointwise 1x1 with bias, BN with
  Keras' eps 1e-3, activation); stream ``x``: ReLU + 2x2 average pooling, stream ``s``: Tanh + 2x2
  max pooling. Channels 16 | pool | 32, 32 | pool | 64, 64 | pool | 128, 128.
* Stage fusion (K = 3 stages): 1x1 conv to c = 64 channels on each stream (tanh on ``s``, relu on
  ``x``), element-wise product. Stage 1 from the last blocks (8x8), stage 2 after the third pool
  (8x8), stage 3 after the second pool (16x16, then 2x2 average pooling to w = h = 8).
* Fine-grained structure mapping (1x1 / var): a score map per stage (1x1 conv + sigmoid, or the
  variance over channels), ``S_k = sigmoid(L(all scores)) @ sigmoid(R(score_k))`` of size
  n' x (3 * 64) = 7 x 192 with m = 5, rows normalised to sum 1, applied to the 192 pixel features
  -> 7 primary capsules per stage (21 in all). ``w/o``: the 192 pixel features themselves.
* Capsule layer (dynamic routing, 2 iterations) to 3 capsules of 16; capsule k feeds stage k.
* Per stage and per angle: ``delta`` (bin-width shift, tanh), ``local`` (index shift, tanh) and 3
  bin scores (**ReLU**, not softmax, as in the official code), from the capsule's dims 0:4, 4:8
  and 8:16; soft stagewise regression over +-99 degrees with lambda_d = 1.
* Output ``(B, 3)``: yaw, pitch, roll in degrees (the official ``pred_pose``; its training labels
  are ``[yaw, pitch, roll]``).

Training follows the paper / ``FSANET_train.py``: L1 (mean absolute error) on the three angles,
Adam lr 1e-3, x0.1 at epochs 30 and 60 of 90, batch 16, and its online augmentation
(``TYY_generators.augment_data``: :class:`dataprep.augment.FsanetAugment`, training only).

``fsanet_fusion`` in eval mode returns the mean of its members' predictions ``(B, 3)``. In train
mode it returns the members' predictions stacked ``(B, 3 members, 3)`` so that ``loss`` can train
them jointly as the **sum of their three L1 losses** (the members share no parameters, so this is
the same as training the three models side by side on the same batches); ``decode`` averages
either form.
"""
from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from dataprep.errors import first_line

from ..registry import ModelSpec, register
from ._pretrained import PretrainedFileError, normalize_pretrained

log = logging.getLogger(__name__)

#: Official trainable parameter counts (Keras ``model.count_params()`` minus BN moving stats).
OFFICIAL_PARAMS = {"fsanet_1x1": 236_615, "fsanet_var": 236_550, "fsanet_wo": 692_707}

VARIANTS = ("1x1", "var", "wo")
STAGE_NUM = (3, 3, 3)
LAMBDA_D = 1.0
ANGLE_RANGE = 99.0  # V in the official SSR module: bins cover [-99, 99] degrees
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # Keras momentum 0.99 in PyTorch's convention


# ------------------------------------------------------------------------------------------------
# Building blocks (shared with ssrnet.py)
# ------------------------------------------------------------------------------------------------
def keras_glorot_uniform_(tensor: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return tensor.uniform_(-limit, limit)


def init_keras_(module: nn.Module) -> None:
    """Keras defaults: glorot-uniform kernels, zero biases, BN gamma 1 / beta 0.

    For conv and dense kernels ``nn.init.xavier_uniform_`` gives the same limit as Keras (glorot is
    symmetric in fan-in/fan-out and both count the receptive field the same way).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SepConvBN(nn.Module):
    """Keras ``SeparableConv2D(c, 3x3, padding='same')`` + ``BatchNormalization`` + activation."""

    def __init__(self, cin: int, cout: int, act: str):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=True)
        self.bn = nn.BatchNorm2d(cout, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)
        self.act = torch.relu if act == "relu" else torch.tanh

    def forward(self, x):
        return self.act(self.bn(self.pointwise(self.depthwise(x))))


#: Output channels of the 7 blocks; a 2x2 pooling follows blocks 1, 3 and 5.
STREAM_CHANNELS = (16, 32, 32, 64, 64, 128, 128)
POOL_AFTER = (1, 3, 5)


class Stream(nn.Module):
    """One of the two streams: ``relu`` + average pooling or ``tanh`` + max pooling.

    Returns the feature maps after each pooling and after the last block:
    ``(layer1 16x32x32, layer2 32x16x16, layer3 64x8x8, layer4 128x8x8)`` for a 64x64 input.
    """

    def __init__(self, act: str, pool: str):
        super().__init__()
        cin = 3
        for i, cout in enumerate(STREAM_CHANNELS, start=1):
            setattr(self, f"block{i}", SepConvBN(cin, cout, act))
            cin = cout
        self.pool = F.avg_pool2d if pool == "avg" else F.max_pool2d

    def forward(self, x):
        outs = []
        for i in range(1, len(STREAM_CHANNELS) + 1):
            x = getattr(self, f"block{i}")(x)
            if i in POOL_AFTER:
                x = self.pool(x, 2)
                outs.append(x)
        outs.append(x)
        return tuple(outs)


class TwoStreamBackbone(nn.Module):
    """FSA-Net's / SSR-Net-MD's two streams (``stream_x``: ReLU + AvgPool, ``stream_s``: Tanh +
    MaxPool) and the per-stage 1x1 convolutions (``conv_s[k]`` tanh, ``conv_x[k]`` relu).

    Stage k = 0, 1, 2 reads (layer4, layer3, layer2) of each stream. ``forward`` returns, per stage,
    the pair of activated 1x1-conv maps ``(s_k, x_k)``; the models pool / multiply them.
    """

    STAGE_INPUTS = (3, 2, 1)  # index into Stream outputs: layer4, layer3, layer2

    def __init__(self, c: int = 64):
        super().__init__()
        self.stream_x = Stream("relu", "avg")
        self.stream_s = Stream("tanh", "max")
        cins = [STREAM_CHANNELS[6], STREAM_CHANNELS[4], STREAM_CHANNELS[2]]  # 128, 64, 32
        self.conv_s = nn.ModuleList(nn.Conv2d(ci, c, 1) for ci in cins)
        self.conv_x = nn.ModuleList(nn.Conv2d(ci, c, 1) for ci in cins)

    def forward(self, img):
        xs = self.stream_x(img)
        ss = self.stream_s(img)
        pairs = []
        for k, li in enumerate(self.STAGE_INPUTS):
            pairs.append((torch.tanh(self.conv_s[k](ss[li])), torch.relu(self.conv_x[k](xs[li]))))
        return pairs


class StageHead(nn.Module):
    """Per-stage outputs for every angle: ``delta`` (tanh), ``local`` (tanh), bin scores (ReLU)."""

    def __init__(self, in_delta: int, in_local: int, in_pred: int, num_classes: int = 3, stage_num: int = 3):
        super().__init__()
        self.num_classes, self.stage_num = num_classes, stage_num
        self.delta = nn.Linear(in_delta, num_classes)
        self.local = nn.Linear(in_local, num_classes)
        self.pred = nn.Linear(in_pred, num_classes * stage_num)

    def forward(self, f_delta, f_local, f_pred):
        delta = torch.tanh(self.delta(f_delta))
        local = torch.tanh(self.local(f_local))
        pred = torch.relu(self.pred(f_pred)).view(-1, self.num_classes, self.stage_num)
        return pred, delta, local


def soft_stagewise_regression(preds, deltas, locals_, lambda_d: float = LAMBDA_D, v: float = ANGLE_RANGE):
    """The official ``SSR_module``: stage k adds ``sum_i (i - s_k//2 + local_k) p_k[i]`` divided by
    ``prod_{j<=k} s_j (1 + lambda_d delta_j)``; the sum is scaled by ``v`` (99 degrees).

    ``preds[k]``: ``(B, A, s_k)`` bin scores; ``deltas[k]``, ``locals_[k]``: ``(B, A)``.
    Returns ``(B, A)``.
    """
    out = 0.0
    denom = 1.0
    for p, d, l in zip(preds, deltas, locals_):
        s = p.shape[-1]
        idx = torch.arange(s, dtype=p.dtype, device=p.device) - (s // 2)
        denom = denom * (s * (1.0 + lambda_d * d))
        out = out + ((idx + l.unsqueeze(-1)) * p).sum(-1) / denom
    return out * v


# ------------------------------------------------------------------------------------------------
# FSA-Net
# ------------------------------------------------------------------------------------------------
def squash(s: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Capsule squashing as in the official ``capsulelayers.py`` (eps = Keras' ``K.epsilon()``)."""
    sq = (s * s).sum(-1, keepdim=True)
    return s * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


class CapsuleLayer(nn.Module):
    """Dynamic routing (Sabour et al.) as in the official layer.

    ``W``: ``(num_capsule, in_num, dim_capsule, in_dim)`` (the Keras weight's own layout);
    ``u_hat[b, j, i] = W[j, i] @ u[b, i]``; logits start at 0, coupling ``softmax`` over the output
    capsules ``j``; ``routings`` iterations, the logits updated between them by ``<v_j, u_hat_ji>``.
    """

    def __init__(self, in_num: int, in_dim: int, num_capsule: int = 3, dim_capsule: int = 16, routings: int = 2):
        super().__init__()
        self.routings = routings
        self.W = nn.Parameter(torch.empty(num_capsule, in_num, dim_capsule, in_dim))
        self.reset_parameters()

    def reset_parameters(self):
        # Keras glorot_uniform on a 4-D shape: receptive field = prod(shape[:-2]).
        j, i, d, k = self.W.shape
        rf = j * i
        keras_glorot_uniform_(self.W, fan_in=d * rf, fan_out=k * rf)

    def forward(self, u):  # u: (B, in_num, in_dim)
        u_hat = torch.einsum("jidk,bik->bjid", self.W, u)
        b = u_hat.new_zeros(u_hat.shape[:3])
        v = None
        for r in range(self.routings):
            c = torch.softmax(b, dim=1)
            v = squash(torch.einsum("bji,bjid->bjd", c, u_hat))
            if r < self.routings - 1:
                b = b + torch.einsum("bjd,bjid->bji", v, u_hat)
        return v  # (B, num_capsule, dim_capsule)


class FineGrainedMapping(nn.Module):
    """Scoring + fine-grained structure mapping (``ssr_S_model``) for the 1x1 and var variants.

    ``conv`` (1x1 only) is the official ``feat_S_model`` conv; ``sr`` (shared by the three stages)
    is its Dense to ``m x 192``; ``sl`` the Dense from the three concatenated score maps to
    ``n' x m``.
    """

    def __init__(self, scoring: str, c: int = 64, hw: int = 64, n_prime: int = 7, m: int = 5):
        super().__init__()
        self.scoring, self.hw, self.n_prime, self.m = scoring, hw, n_prime, m
        if scoring == "1x1":
            self.conv = nn.Conv2d(c, 1, 1)
        self.sr = nn.Linear(hw, m * 3 * hw)
        self.sl = nn.Linear(3 * hw, n_prime * m)

    def score(self, f):  # (B, c, 8, 8) -> (B, 64)
        if self.scoring == "1x1":
            return torch.sigmoid(self.conv(f)).flatten(1)
        return f.var(dim=1, correction=0).flatten(1)  # tf.nn.moments over channels

    def forward(self, feats, pixels):
        """``feats``: three (B, c, 8, 8) maps; ``pixels``: (B, 192, c). Returns (B, 3 n', c)."""
        scores = [self.score(f) for f in feats]
        sl = torch.sigmoid(self.sl(torch.cat(scores, 1))).view(-1, self.n_prime, self.m)
        caps = []
        for sc in scores:
            sr = torch.sigmoid(self.sr(sc)).view(-1, self.m, 3 * self.hw)
            s = sl @ sr  # (B, n', 192)
            caps.append((s @ pixels) / s.sum(-1, keepdim=True))
        return torch.cat(caps, 1)


class FSANet(nn.Module):
    """One FSA-Net (``variant`` in ``1x1``, ``var``, ``wo``). Input (B, 3, 64, 64) raw BGR 0-255.

    Output (B, 3): yaw, pitch, roll in degrees.
    """

    def __init__(self, variant: str = "1x1", num_capsule: int = 3, dim_capsule: int = 16, routings: int = 2,
                 num_primcaps: int | None = None, m_dim: int = 5, c: int = 64):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown FSA-Net variant {variant!r}; choose one of {VARIANTS}")
        if dim_capsule < 16:
            raise ValueError("the official heads read capsule dims 0:4, 4:8 and 8:16: dim_capsule >= 16")
        self.variant = variant
        self.c = c
        hw = 8 * 8
        if num_primcaps is None:
            num_primcaps = 3 * hw if variant == "wo" else 7 * 3
        self.backbone = TwoStreamBackbone(c)
        if variant == "wo":
            if num_primcaps != 3 * hw:
                raise ValueError("fsanet_wo uses the 3 x 8 x 8 pixel features as primary capsules (192)")
            self.mapping = None
        else:
            self.mapping = FineGrainedMapping(variant, c=c, hw=hw, n_prime=num_primcaps // 3, m=m_dim)
        self.caps = CapsuleLayer(num_primcaps, c, num_capsule, dim_capsule, routings)
        per_stage = (num_capsule // 3) * dim_capsule
        if per_stage < 16:
            raise ValueError("each stage needs >= 16 capsule features")
        self.num_capsule = num_capsule
        self.heads = nn.ModuleList(StageHead(4, 4, 8, 3, s) for s in STAGE_NUM)
        init_keras_(self)
        self.caps.reset_parameters()

    def forward(self, img):
        pairs = self.backbone(img)
        feats = [s * x for s, x in pairs]
        feats[2] = F.avg_pool2d(feats[2], 2)  # 16x16 -> 8x8
        # Pixel features in Keras' NHWC reshape order: (B, 64 positions, c) per stage.
        pixels = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        primcaps = pixels if self.mapping is None else self.mapping(feats, pixels)
        caps = self.caps(primcaps)  # (B, num_capsule, dim)
        n = self.num_capsule // 3
        preds, deltas, locals_ = [], [], []
        for k, head in enumerate(self.heads):
            f = caps[:, k * n:(k + 1) * n, :].flatten(1)
            p, d, l = head(f[:, 0:4], f[:, 4:8], f[:, 8:16])
            preds.append(p), deltas.append(d), locals_.append(l)
        return soft_stagewise_regression(preds, deltas, locals_)


class FSANetFusion(nn.Module):
    """The three variants side by side. Eval: mean prediction (B, 3). Train: stacked (B, 3, 3)."""

    MEMBERS = ("1x1", "var", "wo")

    def __init__(self):
        super().__init__()
        self.members = nn.ModuleDict({v: FSANet(v) for v in self.MEMBERS})

    def forward(self, img):
        outs = torch.stack([self.members[v](img) for v in self.MEMBERS], 1)
        return outs if self.training else outs.mean(1)


# ------------------------------------------------------------------------------------------------
# Spec plumbing (shared with ssrnet.py)
# ------------------------------------------------------------------------------------------------
def l1_loss(outputs, targets):
    """Mean absolute error over the 3 angles (Keras ``"mae"``). Stacked member outputs
    ``(B, K, 3)`` (fusion in train mode) give the sum of the K members' L1 losses."""
    angles = targets["angles"].to(outputs.dtype)
    if outputs.dim() == 3:
        return (outputs - angles.unsqueeze(1)).abs().mean(dim=(0, 2)).sum()
    return (outputs - angles).abs().mean()


def decode(outputs):
    """Identity (degrees, yaw/pitch/roll); stacked fusion outputs are averaged."""
    return outputs.mean(1) if outputs.dim() == 3 else outputs


def make_optimizer(model, total_steps: int, lr: float | None = None):
    """Adam (Keras defaults: betas 0.9/0.999, eps 1e-7), lr 1e-3, x0.1 at 1/3 and 2/3 of the steps
    (epochs 30 and 60 of 90); call ``scheduler.step()`` once per optimisation step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr if lr is not None else 1e-3, eps=1e-7)
    total = max(int(total_steps), 1)
    milestones = sorted({max(1, round(total / 3)), max(1, round(2 * total / 3))})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return opt, sched


DEFAULTS = {"batch_size": 16, "epochs": 90, "lr": 1e-3}


def _load_into(model: nn.Module, name: str, pretrained) -> nn.Module:
    pretrained = normalize_pretrained(pretrained)  # "none" -> None, "auto", or a path
    if pretrained is None:
        return model
    if pretrained == "auto":
        log.warning("%s: no downloadable pretrained weights; pass a converted .pt or an official .h5. "
                    "Building from scratch.", name)
        return model
    from .. import convert_fsanet  # late import: the converter imports this module

    if not os.path.exists(pretrained):
        raise PretrainedFileError(f"--pretrained {pretrained}: no such file (a converted .pt, an official .h5, or "
                                  f"for fsanet_fusion a folder of the three official .h5)")
    try:
        state = convert_fsanet.load_state_for(name, pretrained)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - torch, h5py and our converter's errors alike: one line naming the file
        raise PretrainedFileError(f"--pretrained {pretrained}: cannot load {name}'s weights from it "
                                  f"({first_line(exc)})") from None
    return model


def build_fsanet(variant: str):
    name = f"fsanet_{variant}"

    def build(pretrained=None, **_):
        return _load_into(FSANet(variant), name, pretrained)

    return build


def build_fusion(pretrained=None, **_):
    return _load_into(FSANetFusion(), "fsanet_fusion", pretrained)


def train_transforms():
    """``TYY_generators.augment_data``, which ``FSANET_train.py``'s ``data_generator_pose`` applies
    to every training batch (SSR-Net-MD is trained by the same script)."""
    from dataprep.augment import FsanetAugment

    return FsanetAugment()


_COMMON = dict(input_size=64, fixed_input_size=True, crop_rule="fsanet", normalize="raw_bgr", loss=l1_loss, decode=decode,
               make_optimizer=make_optimizer, train_transforms=train_transforms)

register(ModelSpec(name="fsanet_1x1", build=build_fsanet("1x1"), defaults=dict(DEFAULTS),
                   description="FSA-Net, 1x1-conv scoring (official fsanet_capsule_3_16_2_21_5)", **_COMMON))
register(ModelSpec(name="fsanet_var", build=build_fsanet("var"), defaults=dict(DEFAULTS),
                   description="FSA-Net, variance scoring (official fsanet_var_capsule_3_16_2_21_5)", **_COMMON))
register(ModelSpec(name="fsanet_wo", build=build_fsanet("wo"), defaults=dict(DEFAULTS),
                   description="FSA-Net without scoring (official fsanet_noS_capsule_3_16_2_192_5)", **_COMMON))
register(ModelSpec(name="fsanet_fusion", build=build_fusion, defaults=dict(DEFAULTS),
                   description="FSA-Net fusion: mean of 1x1, var and w/o; trained jointly (sum of L1s)",
                   **_COMMON))
