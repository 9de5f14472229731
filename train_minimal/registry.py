"""Model registry: one ``ModelSpec`` per ``--model NAME`` (timm-style ``register`` / ``get``).

A spec says everything the trainer needs to feed and train a model from our shards:
the crop rule and input size applied at load time, the pixel normalisation, the loss, how outputs
decode to ``(yaw, pitch, roll)`` degrees, and the optimiser/schedule of the paper.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    #: ``build(pretrained: str | None) -> nn.Module``; ``pretrained`` is None (scratch), "auto"
    #: (torchvision/timm weights when they can be had) or a local file path.
    build: Callable[..., nn.Module]
    input_size: int
    #: Crop rule applied at load time (a key of ``dataprep.boxes.CROP_RULES``).
    crop_rule: str
    #: ``"imagenet"`` (RGB, /255, ImageNet mean/std), ``"raw_bgr"`` (0-255 BGR floats, FSA-Net) or
    #: ``"bgr_128"`` (BGR, ``(x - 127.5) / 128``, EHPNet): ``dataprep.loader.NORMALIZATIONS``.
    normalize: str
    #: ``loss(outputs, targets: dict[str, Tensor]) -> Tensor``; targets hold ``angles`` (B, 3)
    #: degrees in yaw, pitch, roll order, and optionally ``landmarks`` (B, 68, 2) in input pixels.
    loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
    #: ``decode(outputs) -> Tensor (B, 3)`` yaw, pitch, roll in degrees.
    decode: Callable[[Any], torch.Tensor]
    #: ``make_optimizer(model, total_steps: int, lr: float | None) -> (optimizer, scheduler | None)``.
    make_optimizer: Callable[..., tuple]
    description: str = ""
    #: The paper's settings the trainer reads: ``batch_size`` (``--batch-size``'s default), ``lr``
    #: (``--lr``'s, passed to ``make_optimizer``), ``alpha``, ``clip_grad_value`` / ``clip_grad_norm``,
    #: ``kd_weight``, ``wrap_yaw``, ``find_unused_parameters``; ``epochs`` is the paper's schedule
    #: length, for reference (``--epochs`` or ``--steps`` is always given).
    defaults: dict[str, Any] = field(default_factory=dict)
    #: Optional ``distill(student_outputs, [teacher_outputs, ...]) -> Tensor``: the knowledge-
    #: distillation term the trainer adds to ``loss`` when run with ``--teachers``.
    distill: Callable[..., torch.Tensor] | None = None
    #: The architecture only works at ``input_size`` (dense layers sized from it: FSA-Net, SSR-Net-MD).
    fixed_input_size: bool = False
    #: Optional ``train_transforms() -> dataprep.augment.Transform``: the paper's online
    #: augmentation, applied per sample after the crop in training (not to evaluation data).
    train_transforms: Callable[[], Any] | None = None
    #: Optional ``train_mode(model)``, called after ``model.train()`` at each epoch's start when the
    #: weights are pretrained: the modules the paper's code keeps in evaluation mode while training
    #: (Hopenet's batch norms keep ImageNet's statistics; from scratch every module trains).
    train_mode: Callable[[nn.Module], None] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ModelSpec:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _load_all() -> None:
    # Importing the model modules registers them.
    from . import models  # noqa: F401
