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
  lr 0 (frozen stem), the rest of the trunk at lr, the three heads at 5 x lr; no schedule. The
  batch norms inside layers 1-4 stay in evaluation mode while training, as the code leaves them
  (:func:`hopenet_train_mode`), when training starts from ImageNet (or file) weights; from
  scratch (``--pretrained none``) there are no statistics to keep and they train.
* online augmentation as its ``Pose_300W_LP`` class does it: a flip half the time (yaw and roll
  negated), PIL's ``ImageFilter.BLUR`` one time in 20 (:func:`hopenet_train_transforms`; applied
  to the 224 px crop, where the code blurs the loose crop before its resize).
* input 224 x 224, ImageNet RGB normalisation, the square of Hopenet's loose crop its
  transforms cut (``crop_rule="hopenet"``: in training ``Scale(240)``, ``RandomCrop(224)``, in
  evaluation the centre square; ``boxes.hopenet_view``).

The bin maths and heads it shares with EHPNet and WHENet are in ``_bin_heads``; ``--pretrained``
handling for every model in ``_pretrained``.
"""
from __future__ import annotations

import torch
from torch import nn

from dataprep.labels import HOPENET_BINS

from ..registry import ModelSpec, register
from ._bin_heads import BinPoseNet, decode_bins, three_bin_loss
from ._pretrained import build_with_pretrained, torchvision_model

HOPENET_PARAMS = 23_913_734


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


def hopenet_train_transforms():
    """``Pose_300W_LP.__getitem__``: a horizontal flip half the time (yaw and roll negated), then
    PIL's ``ImageFilter.BLUR`` one time in 20."""
    from dataprep.augment import Compose, HorizontalFlip, RandomApply, RingBlur

    return Compose([RandomApply(HorizontalFlip(), 0.5), RandomApply(RingBlur(), 0.05)])


def hopenet_train_mode(model: nn.Module) -> None:
    """``train_hopenet.py``'s parameter generators call ``.eval()`` on every module named ``*bn*``
    inside ``layer1``-``layer4`` (the Bottlenecks' ``bn1``-``bn3``; not the ``downsample`` batch
    norms, nor the stem's ``bn1``) and the script never calls ``model.train()``: those keep
    ImageNet's running statistics through training (their weights still learn)."""
    trunk = model.backbone
    for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        for name, module in layer.named_modules():
            if "bn" in name:
                module.eval()


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
    train_mode=hopenet_train_mode,
    train_transforms=hopenet_train_transforms,
    description="Hopenet: ResNet-50 + three 66-bin heads (3 deg over +-99), CE + alpha*MSE, Adam 1e-5",
    defaults={"batch_size": 128, "epochs": 25, "lr": 1e-5, "alpha": 1.0},
))
