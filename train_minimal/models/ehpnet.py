"""EHPNet student and its teachers (Thai et al., head pose via knowledge distillation; the public
code is chientv99/maskpose, whose ``models.py``, ``datasets.py`` and ``train_pose.py`` this follows).

Registered models
-----------------
``ehpnet``              student: torchvision ResNet-18 trunk (512 features), ``Linear(512, 128)``
                        + ReLU, three heads of 62 bins (``EHPNET_BINS``: 3 deg over [-93, 93]).
                        11,176,512 + 65,664 + 3 x 7,998 = 11,266,170 parameters.
``ehpnet_resnet101``    teacher: torchvision ResNet-101 trunk (2048 features), ``Linear(2048, 512)``
                        + ReLU (the code's ``ResNet_60bin`` with Bottleneck), three 62-bin heads.
``ehpnet_res2net101``   teacher: timm ``res2net101_26w_4s`` trunk (Res2Net-101 as the paper names it:
                        the original Res2Net, one 7x7 stem convolution, strided 1x1 projection
                        shortcuts) + the same head.
``ehpnet_res2net101d``  teacher as the authors' code builds it: ``models.py``'s Res2Net is
                        Res2Net-v1b (deep stem of three 3x3 convolutions 32-32-64, average-pooled
                        projection shortcuts), which is timm's ``res2net101d``. Either serves as a
                        ``--teachers`` checkpoint; the d variant reproduces the code.
``ehpnet_botnet``       teacher: ResNet-101 stem and layers 1-3 (torchvision) followed by a
                        bottleneck-transformer stack (3 blocks, 1024 -> 512 -> 2048 channels, the
                        3x3 convolution replaced by 4-head self-attention with 2D relative position
                        logits, Srinivas et al. 2021; projection shortcut conv + BN + ReLU, as
                        bottleneck-transformer-pytorch's) + ``Linear(2048, 512)`` *without* ReLU (the
                        code's ``BoTNet50_2``). timm has no BoTNet-101, so it is written out below.

All four: input 112 x 112 on square-padded face crops (``crop_rule="square"``), BGR with
``(x - 127.5) / 128`` (``datasets.py``: ``cv2.imread``, ``* 0.0078125``; ``normalize="bgr_128"``),
decode ``3 * E[idx] - 93``, loss per angle = CE + MSE (alpha 1), summed. Adam lr 1e-3, linear
warm-up over the first epoch (4% of the steps: 1 of the code's 25 epochs) then cosine annealing
towards lr / 1000 (:func:`warmup_cosine`), gradient clipping by value at 0.5
(``defaults["clip_grad_value"]``; the code calls ``clip_grad_value_(..., 0.5)``; the trainer
applies it), batch 16. Training images get ``datasets.py``'s online augmentation
(:func:`ehpnet_train_transforms`): a flip half the time (yaw and roll negated), then its
``transform`` (``dataprep.augment.EhpnetAugment``: brightness and contrast, trims, down-sampling,
blur or sharpening, borders, grey).

Knowledge distillation (``train_minimal train --teachers c1,c2,...``): the trainer runs the frozen
teachers on the same batch; per angle, ``KLDivLoss()(log_softmax(student), mean_t softmax(teacher_t))``
with PyTorch's default element-wise ``'mean'`` reduction exactly as the code has it, summed over
the three angles and weighted by ``kd_weight`` = 10 (``train_maskpose.py``). Here that term is
added to the student's own CE + MSE on the labelled shards, in one run. The code instead
fine-tunes an already trained student (its ``Pose_R18`` checkpoint) with the distillation terms
alone (plus its face-mask term, which has no data here): to follow it, train ``ehpnet`` first,
then train again from that checkpoint (``--pretrained PATH``) with ``--teachers``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dataprep.labels import EHPNET_BINS

from ..registry import ModelSpec, register
from ._bin_heads import BinPoseNet, decode_bins, three_bin_loss
from ._pretrained import build_with_pretrained, timm_model, torchvision_model

EHPNET_ALL_BINS = (EHPNET_BINS, EHPNET_BINS, EHPNET_BINS)
HIDDEN = 128
#: The teachers' hidden layer: the code's ``Linear(512 * expansion, 128 * expansion)`` with ResNet-101's
#: Bottleneck (expansion 4), and ``Linear(2048, 512)`` in its Res2Net and BoTNet classes.
TEACHER_HIDDEN = 512
INPUT_SIZE = 112
KD_WEIGHT = 10.0


def _head(trunk: nn.Module, feat_dim: int, hidden: int = HIDDEN, relu: bool = True) -> BinPoseNet:
    return BinPoseNet(trunk, feat_dim, [b.count for b in EHPNET_ALL_BINS], hidden=hidden, hidden_relu=relu)


# --------------------------------------------------------------------------------------------
# BoTNet stack (bottleneck transformer), written out
# --------------------------------------------------------------------------------------------
class RelPosLogits(nn.Module):
    """2D relative position logits ``q . r_h[i'-i] + q . r_w[j'-j]`` (BoTNet's relative encoding).

    Learned tables of ``2 * size - 1`` offsets per axis for a ``size x size`` map; for another map
    size at run time the tables are linearly resampled.
    """

    def __init__(self, size: int, dim_head: int):
        super().__init__()
        self.size = size
        scale = dim_head ** -0.5
        self.rel_h = nn.Parameter(torch.randn(2 * size - 1, dim_head) * scale)
        self.rel_w = nn.Parameter(torch.randn(2 * size - 1, dim_head) * scale)

    @staticmethod
    def _table(table: torch.Tensor, n: int) -> torch.Tensor:
        if table.shape[0] == 2 * n - 1:
            return table
        t = F.interpolate(table.t()[None], size=2 * n - 1, mode="linear", align_corners=True)
        return t[0].t()

    def forward(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # q: (B, heads, h*w, d) -> logits (B, heads, h*w, h*w)
        b, n, _, d = q.shape
        ih = torch.arange(h, device=q.device)
        iw = torch.arange(w, device=q.device)
        emb_h = self._table(self.rel_h, h)[ih[None, :] - ih[:, None] + h - 1]  # (h_q, h_k, d)
        emb_w = self._table(self.rel_w, w)[iw[None, :] - iw[:, None] + w - 1]  # (w_q, w_k, d)
        q = q.reshape(b, n, h, w, d)
        lh = torch.einsum("bnhwd,hkd->bnhwk", q, emb_h.to(q.dtype))
        lw = torch.einsum("bnhwd,wld->bnhwl", q, emb_w.to(q.dtype))
        return (lh[..., :, None] + lw[..., None, :]).reshape(b, n, h * w, h * w)


class MHSA2d(nn.Module):
    """Multi-head self-attention over a feature map with relative position logits."""

    def __init__(self, dim: int, size: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.dim_head = dim // heads
        self.scale = self.dim_head ** -0.5
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.pos = RelPosLogits(size, self.dim_head)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, self.dim_head, h * w).unbind(1)
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))  # (B, heads, hw, d)
        q = q * self.scale
        logits = q @ k.transpose(-1, -2) + self.pos(q, h, w)
        out = logits.softmax(dim=-1) @ v  # (B, heads, hw, d)
        return out.transpose(-1, -2).reshape(b, c, h, w)


class BoTBlock(nn.Module):
    """ResNet bottleneck with the 3x3 convolution replaced by MHSA (stride 1)."""

    def __init__(self, in_ch: int, mid: int, out_ch: int, size: int, heads: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.mhsa = MHSA2d(mid, size, heads)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        nn.init.zeros_(self.bn3.weight)  # zero-init the last BN of each residual branch
        # a projection shortcut ends in the activation too (bottleneck-transformer-pytorch's
        # BottleBlock, which the code's BottleStack is)
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.mhsa(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class BoTNetTrunk(nn.Module):
    """ResNet-101 stem + layers 1-3 (stride 16) and a 3-block BoT stack in place of layer 4.

    The stack keeps stride 1 (the attention runs on the 7 x 7 map of a 112 x 112 input), like
    BoTNet's S1 variants; at 224 x 224 the map would be 14 x 14.
    """

    def __init__(self, pretrained=None, input_size: int = INPUT_SIZE, blocks: int = 3, heads: int = 4):
        super().__init__()
        r = torchvision_model("resnet101", "ResNet101_Weights.IMAGENET1K_V1", pretrained)
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3 = r.layer1, r.layer2, r.layer3
        size = max(1, math.ceil(input_size / 16))
        self.layer4 = nn.Sequential(*[
            BoTBlock(1024 if i == 0 else 2048, 512, 2048, size, heads) for i in range(blocks)
        ])
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def build_ehpnet(pretrained=None, **_):
    def make(p):
        trunk = torchvision_model("resnet18", "ResNet18_Weights.IMAGENET1K_V1", p)
        trunk.fc = nn.Identity()
        return _head(trunk, 512)

    return build_with_pretrained(make, pretrained)


def build_resnet101(pretrained=None, **_):
    def make(p):
        trunk = torchvision_model("resnet101", "ResNet101_Weights.IMAGENET1K_V1", p)
        trunk.fc = nn.Identity()
        return _head(trunk, 2048, TEACHER_HIDDEN)

    return build_with_pretrained(make, pretrained)


def _res2net_builder(timm_name: str):
    """The builder of a Res2Net-101 teacher: timm's ``timm_name`` trunk and the teachers' head."""
    def build(pretrained=None, **_):
        def make(p):
            trunk = timm_model(timm_name, p, num_classes=0)
            return _head(trunk, trunk.num_features, TEACHER_HIDDEN)

        return build_with_pretrained(make, pretrained)

    return build


build_res2net101 = _res2net_builder("res2net101_26w_4s")
build_res2net101d = _res2net_builder("res2net101d")


def build_botnet(pretrained=None, input_size: int = INPUT_SIZE, **_):
    # the code's BoTNet50_2 has no ReLU after its Linear(2048, 512)
    return build_with_pretrained(lambda p: _head(BoTNetTrunk(p, input_size=input_size), 2048, TEACHER_HIDDEN, relu=False),
                                 pretrained)


# --------------------------------------------------------------------------------------------
# Loss, decode, optimiser, distillation
# --------------------------------------------------------------------------------------------
def ehpnet_loss(outputs, targets, alpha: float = 1.0):
    return three_bin_loss(outputs, targets, EHPNET_ALL_BINS, alpha)


def ehpnet_decode(outputs):
    return decode_bins(outputs, EHPNET_ALL_BINS)


def warmup_cosine(optimizer, total_steps: int, warmup_fraction: float = 0.04, floor: float = 0.001):
    """LambdaLR, ``train_pose.py``'s schedule: linear warm-up over ``warmup_fraction`` of the steps
    (its first epoch of 25), then ``CosineAnnealingLR(T_max=all the steps, eta_min=lr / 1000)``
    stepped from the end of the warm-up (so it ends short of the floor, as the code's does)."""
    total = max(1, int(total_steps))
    warm = max(1, int(round(warmup_fraction * total)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / total)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ehpnet_optimizer(model, total_steps: int, lr: float | None = None):
    lr = 1e-3 if lr is None else lr
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return opt, warmup_cosine(opt, total_steps)


def ehpnet_distill(student_outputs, teacher_outputs: list, weight: float = KD_WEIGHT):
    """``weight`` x sum over angles of ``KLDivLoss()(log_softmax(s), mean_t softmax(t))``."""
    loss = 0.0
    for i, s in enumerate(student_outputs):
        teacher = torch.stack([F.softmax(t[i].float(), dim=1) for t in teacher_outputs]).mean(0)
        # == F.kl_div(log_softmax(s), teacher, reduction="mean") (nn.KLDivLoss() in the code),
        # written out to avoid PyTorch's warning about 'mean' (it averages over bins too).
        log_p = F.log_softmax(s.float(), dim=1)
        loss = loss + (torch.xlogy(teacher, teacher) - teacher * log_p).mean()
    return weight * loss


def ehpnet_train_transforms():
    """``Pose_300W_LPA_60bin.__getitem__``: ``cv2.flip`` half the time (yaw and roll negated), then
    ``datasets.transform`` (:class:`dataprep.augment.EhpnetAugment`)."""
    from dataprep.augment import Compose, EhpnetAugment, HorizontalFlip, RandomApply

    return Compose([RandomApply(HorizontalFlip(), 0.5), EhpnetAugment()])


DEFAULTS = {"batch_size": 16, "epochs": 25, "lr": 1e-3, "alpha": 1.0, "clip_grad_value": 0.5, "kd_weight": KD_WEIGHT}

_COMMON = dict(input_size=INPUT_SIZE, crop_rule="square", normalize="bgr_128", loss=ehpnet_loss,
               decode=ehpnet_decode, make_optimizer=ehpnet_optimizer, distill=ehpnet_distill,
               train_transforms=ehpnet_train_transforms)

register(ModelSpec(name="ehpnet", build=build_ehpnet, defaults=dict(DEFAULTS),
                   description="EHPNet student: ResNet-18 @112, 512->128 + three 62-bin heads; KD from --teachers",
                   **_COMMON))
register(ModelSpec(name="ehpnet_resnet101", build=build_resnet101, defaults=dict(DEFAULTS),
                   description="EHPNet teacher: ResNet-101, 2048->512 + three 62-bin heads", **_COMMON))
register(ModelSpec(name="ehpnet_res2net101", build=build_res2net101, defaults=dict(DEFAULTS),
                   description="EHPNet teacher: Res2Net-101 (timm res2net101_26w_4s), 2048->512 + three 62-bin heads",
                   **_COMMON))
register(ModelSpec(name="ehpnet_res2net101d", build=build_res2net101d, defaults=dict(DEFAULTS),
                   description="EHPNet teacher as its code builds it: Res2Net-101-v1b (timm res2net101d), 2048->512 + "
                               "three 62-bin heads", **_COMMON))
register(ModelSpec(name="ehpnet_botnet", build=build_botnet, defaults=dict(DEFAULTS),
                   description="EHPNet teacher: ResNet-101 layers 1-3 + BoT stack (MHSA, rel. pos.), 2048->512 (no ReLU) + 62-bin heads",
                   **_COMMON))
