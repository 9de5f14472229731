"""The training loop's pieces: one optimisation step (:class:`TrainStep`, which
``benchmarks/train_step.py`` times too), evaluation (MAE per angle), mixed precision, and the
learning rates a run records."""
from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext

import torch
from torch import nn

from dataprep.labels import wrapped_angle_difference

from .data import prepare_batch


def accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes a ``name`` keyword (named, or through ``**kwargs``): spec functions
    differ in what they accept (``input_size``, ``alpha``, ``weight``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def to_float(obj):
    """Model outputs (tensor / tuple / list / dict of tensors) -> float32 (losses in fp32)."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_float(v) for k, v in obj.items()}
    return obj


AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def amp_dtype_for(device: torch.device, choice: str = "auto"):
    """The autocast dtype for ``--amp`` on ``device`` (None: float32). ``auto``: bfloat16 on CUDA
    where supported, else float16; float32 on CPU (CPU autocast is for when you ask for it)."""
    if choice not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {choice!r}")
    if choice == "off":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if choice == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast_ctx(device: torch.device, dtype):
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


class TrainStep:
    """One optimisation step as the trainer takes it: the forward pass under autocast (teachers
    too, without gradients), the model's loss in float32 (``alpha`` from ``spec.defaults`` unless
    given, where the loss takes one) plus distillation, backward (scaled for float16, whose
    gradients underflow), the spec's gradient clipping, the optimiser and the scheduler. ``net``
    is what runs the forward pass (``model`` or its DDP wrapper). Called with a batch, returns the
    detached loss. ``benchmarks/train_step.py`` times this same step."""

    def __init__(self, spec, model: nn.Module, optimizer, scheduler, device: torch.device, amp_dtype, *,
                 net: nn.Module | None = None, alpha=None, teachers=(), kd_kwargs: dict | None = None):
        self.spec, self.model, self.net = spec, model, net if net is not None else model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.amp_dtype = device, amp_dtype
        self.teachers, self.kd_kwargs = list(teachers), dict(kd_kwargs or {})
        self.loss_kwargs = {}
        alpha = alpha if alpha is not None else spec.defaults.get("alpha")
        if alpha is not None and accepts(spec.loss, "alpha"):
            self.loss_kwargs["alpha"] = float(alpha)
        self.clip_value = spec.defaults.get("clip_grad_value")
        self.clip_norm = spec.defaults.get("clip_grad_norm")
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def __call__(self, x: torch.Tensor, targets) -> torch.Tensor:
        spec, opt, scaler = self.spec, self.optimizer, self.scaler
        with autocast_ctx(self.device, self.amp_dtype):
            out = self.net(x)
            t_out = None
            if self.teachers:
                with torch.no_grad():
                    t_out = [t(x) for t in self.teachers]
        out = to_float(out)
        loss = spec.loss(out, targets, **self.loss_kwargs)
        if self.teachers:
            loss = loss + spec.distill(out, to_float(t_out), **self.kd_kwargs)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if self.clip_value:
            nn.utils.clip_grad_value_(self.model.parameters(), float(self.clip_value))
        if self.clip_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip_norm))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if self.scheduler is not None:
            with warnings.catch_warnings():
                # float16's GradScaler skips the first steps while it finds its scale (inf gradients):
                # PyTorch then warns that the schedule stepped before the optimiser, which is expected
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.scheduler.step()
        return loss.detach()


class EmptyEvaluation(RuntimeError):
    """The evaluation data held no sample (the trainer names the shards in its error line)."""


@torch.no_grad()
def evaluate(model: nn.Module, loader, spec, device: torch.device, *, amp_dtype=None, channels_last=False,
             input_size: int | None = None) -> dict:
    """MAE in degrees per angle and their mean over every sample of ``loader``; ``nonfinite``: the
    samples whose predicted angles are NaN or infinite (they make the MAE NaN, as they should)."""
    was_training = model.training
    model.eval()
    wrap_yaw = bool(spec.defaults.get("wrap_yaw", False))
    total = torch.zeros(3, dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # summed on the device: no sync per batch
    n = 0
    for batch in loader:
        x, targets = prepare_batch(batch, spec.normalize, device, size=input_size or spec.input_size,
                                   channels_last=channels_last)
        with autocast_ctx(device, amp_dtype):
            out = model(x)
        pred = spec.decode(to_float(out)).double()
        err = (pred - targets["angles"].double()).abs()
        if wrap_yaw:
            err[:, 0] = wrapped_angle_difference(pred[:, 0], targets["angles"][:, 0].double())
        total += err.sum(0)
        nonfinite += (~torch.isfinite(pred).all(1)).sum()
        n += x.shape[0]
    model.train(was_training)
    if n == 0:
        raise EmptyEvaluation("evaluation data gave no samples")
    yaw, pitch, roll = (total / n).tolist()
    return {"samples": n, "yaw": yaw, "pitch": pitch, "roll": roll, "mean": (yaw + pitch + roll) / 3.0,
            "nonfinite": int(nonfinite)}


def learning_rates(opt, scheduled: bool = False) -> dict:
    """The optimiser's learning rates as ``metrics.json`` records them: ``lr`` the base rate (the
    spec's default unless ``--lr``) and ``param_group_lrs`` each parameter group's rate (Hopenet:
    frozen stem 0, trunk lr, heads 5 x lr). As built (before any schedule), or with ``scheduled``
    where the schedule has them now (the base rate scaled as the groups are)."""
    initial = [float(g.get("initial_lr", g["lr"])) for g in opt.param_groups]
    base = float(opt.defaults.get("lr", initial[0]))
    if not scheduled:
        return {"lr": base, "param_group_lrs": initial}
    now = [float(g["lr"]) for g in opt.param_groups]
    factor = next((n / i for n, i in zip(now, initial) if i), 1.0)  # the schedule's factor of the moment
    return {"lr": base * factor, "param_group_lrs": now}
