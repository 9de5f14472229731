"""``python -m train_minimal {train,eval,params,convert-fsanet}``: a minimal trainer proving the
shards train the papers' models.

train  --model NAME --train URL [--val NAME=URL ...] (--epochs N | --steps N) [--batch-size B]
       [--device auto|cpu|cuda|cuda:N|mps] --out DIR [--lr] [--alpha] [--teachers c1,c2] [--pretrained none|auto|PATH]
       [--workers N] [--seed S] [--gpu-decode] [--epoch-length N] [--input-size N] [--amp auto|off|bf16|fp16]
eval   --ckpt C --data URL [--model NAME] [--batch-size B] [--device D] [--amp ...]
params --model NAME
convert-fsanet FILE.h5 OUT.pt

Training
--------
* Data: ``train_minimal.data.make_loader`` (WebDataset shards, the model's crop rule applied at
  load time). ``--epoch-length`` (samples per epoch, all ranks together) switches to resampled
  shards; under DDP that is always the case (default: the number of samples in the shards).
* Optimiser, schedule, loss, decode: the model's ``ModelSpec`` (``registry.py``); ``--lr`` and
  ``--alpha`` override the spec's defaults. ``defaults["clip_grad_value"]`` /
  ``defaults["clip_grad_norm"]`` clip gradients.
* Mixed precision, ``--amp auto|off|bf16|fp16``: ``auto`` is autocast on CUDA (bfloat16 where
  supported, else float16 with a GradScaler) and float32 on CPU; ``bf16``/``fp16`` force that dtype
  on any device (CPU autocast too). channels_last on CUDA. Losses are computed in float32.
* DDP when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on CUDA (gloo on CPU),
  ``DistributedDataParallel``; rank 0 alone evaluates, writes checkpoints and metrics.
* ``--teachers c1,c2``: frozen teachers (our checkpoints) run on the same batch; the spec's
  ``distill`` term is added to the loss (EHPNet).
* Outputs in ``--out``: ``checkpoint.pt`` after every epoch (plain dicts/tensors/numbers, loadable
  with ``torch.load(weights_only=True)``), ``metrics.json`` (the run's settings, the learning rates
  used among them: ``lr`` the base rate, ``param_group_lrs`` each parameter group's; per epoch: train
  loss, the learning rates as scheduled, per validation set MAE yaw/pitch/roll/mean; per step: the
  loss), ``curves.png``. An epoch ending with NaN or infinite weights (diverged) stops the run with
  an error line before they are saved.
* ``--input-size`` overrides the model's input size (smoke tests on small CPUs; the papers' sizes
  are the defaults). It is stored in the checkpoint and ``eval`` uses it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dataprep import devices
from dataprep.argtypes import finite_number_at_least, int_at_least, positive_number
from dataprep.devices import DEVICE_FORMS, parse_device
from dataprep.errors import INTERRUPTED, NOT_DONE, first_line, report_crash
from dataprep.loader import BadSample, NoSamples, UnreadableShard, shard_error_line
from dataprep.weights import state_dict_misfit

from . import registry
from .data import EMPTY_SHARDS_HINT, crop_room_warning, epoch_steps, make_loader, prepare_batch, shard_set
from .engine import AMP_CHOICES, EmptyEvaluation, TrainStep, accepts, amp_dtype_for, evaluate, learning_rates
from .outputs import check_run_folder, json_safe, load_checkpoint, save_epoch

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
#: 0 steps, 0 epochs or batches of 0 are mistakes; 0 DataLoader workers read in the main process.
_positive_int = int_at_least(1, "give 1 or more")
_non_negative_int = int_at_least(0, "give 0 (read in the main process) or more")
#: Loss weights: 0 switches a term off; a negative, NaN or infinite one is a mistake.
_loss_weight = finite_number_at_least(0.0)


def _device(text: str) -> str:
    """argparse type for ``--device``: :func:`dataprep.devices.parse_device` (the forms ``dataprep
    build`` accepts), refused here rather than as torch's traceback after the data is read."""
    try:
        return parse_device(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; give {DEVICE_FORMS}") from None


def _warn_crop_room(urls, spec, command: str) -> None:
    """Print :func:`data.crop_room_warning` for these shards, if any, tagged with the command. The
    first to read the URLs: callers call it under :func:`_shards_found` (a path naming no shard is
    one error line)."""
    warning = crop_room_warning(urls, spec)
    if warning:
        print(f"[{command}] warning: {warning}", file=sys.stderr, flush=True)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """:func:`dataprep.devices.resolve_device`, made the current CUDA device; a device this machine
    lacks is a one-line error."""
    try:
        dev = devices.resolve_device(name, local_rank)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def build_model(spec, pretrained, input_size: int | None) -> nn.Module:
    from .models._pretrained import PretrainedFileError, PretrainedUnavailable

    kwargs = {}
    if input_size and input_size != spec.input_size and accepts(spec.build, "input_size"):
        kwargs["input_size"] = input_size
    try:
        return spec.build(pretrained, **kwargs)
    except (PretrainedUnavailable, PretrainedFileError) as exc:
        raise SystemExit(f"error: {exc}") from None


def parse_val(items: list[str] | None) -> dict[str, str]:
    """``NAME=URL`` (or a bare URL: ``val``, ``val2`` ...) -> {name: url}."""
    out: dict[str, str] = {}
    for i, item in enumerate(items or []):
        if re.fullmatch(r"[A-Za-z0-9_.\-]+=\s*", item):
            raise SystemExit(f"error: --val {item}: no shards after the '='; give NAME=URL (a path, brace pattern or URL)")
        m = re.match(r"^([A-Za-z0-9_.\-]+)=(.+)$", item)
        if m and "/" not in m.group(1):
            name, url = m.group(1), m.group(2)
        else:
            name, url = ("val" if i == 0 else f"val{i + 1}"), item
        if name in out:
            raise SystemExit(f"error: validation set name {name!r} given twice")
        out[name] = url
    return out


def model_from_checkpoint(ckpt: dict, name: str | None = None, device=torch.device("cpu"), *,
                          where: str = "the checkpoint"):
    """The spec, model and input size of a checkpoint (``name``: ``--model``, needed for a bare state
    dict); weights of another model are one error line calling the file ``where``."""
    ck_name = ckpt.get("model")
    if name and ck_name and name != ck_name:
        raise SystemExit(f"error: checkpoint holds model {ck_name!r}, not {name!r}: drop --model (the checkpoint "
                         f"names its model), or pass --model {ck_name}")
    name = name or ck_name
    if not name:
        raise SystemExit("error: the checkpoint does not name its model; pass --model")
    spec = registry.get(name)
    input_size = int((ckpt.get("args") or {}).get("input_size") or spec.input_size)
    model = build_model(spec, None, input_size)
    state = ckpt["state_dict"]
    misfit = state_dict_misfit(model.state_dict(), state)
    if misfit:  # torch's RuntimeError lists every key, as a crash
        raise SystemExit(f"error: {where} does not hold {name}'s weights ({misfit})"
                         + ("" if ck_name else "; pass the --model it was trained as"))
    model.load_state_dict(state)
    return spec, model.to(device), input_size


@contextmanager
def _samples_found(data: str):
    """Evaluation shards without a sample (empty shards: every sample rejected when they were
    built) end the command with an error line naming them, not a traceback."""
    try:
        yield
    except EmptyEvaluation:
        raise SystemExit(f"error: {data} gave no samples to evaluate ({EMPTY_SHARDS_HINT})") from None


@contextmanager
def _shards_found():
    """Missing local shards (the loader names them) end the command with an error line, not a traceback."""
    try:
        yield
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def _load_teachers(paths: list[str], spec, input_size: int, device: torch.device, channels_last: bool) -> list:
    """The frozen teachers of ``--teachers`` (our checkpoints), checked to take the student's input."""
    if paths and spec.distill is None:
        raise SystemExit(f"error: model {spec.name!r} has no distillation loss; --teachers is for ehpnet")
    teachers = []
    for path in paths:
        ckpt = load_checkpoint(path, "--teachers checkpoint")
        if not ckpt.get("model"):  # --model names the student: a teacher must name its own model
            raise SystemExit(f"error: teacher {path} is a bare state dict, which does not name its model; give the "
                             "checkpoint.pt of a train run of the teacher")
        # building a teacher draws initial weights; the student's own must not depend on them
        with torch.random.fork_rng(devices=[]):
            tspec, teacher, t_size = model_from_checkpoint(ckpt, device=device, where=f"teacher {path}")
        if tspec.normalize != spec.normalize or t_size != input_size:
            raise SystemExit(f"error: teacher {path} ({tspec.name}, {t_size}px, {tspec.normalize}) does not take "
                             f"the student's input ({input_size}px, {spec.normalize})")
        if tspec.crop_rule != spec.crop_rule:
            print(f"[train] note: teacher {tspec.name} was trained on {tspec.crop_rule!r} crops; it sees the "
                  f"student's {spec.crop_rule!r} crops", file=sys.stderr)
        teacher.eval().requires_grad_(False)
        if channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        teachers.append(teacher)
    return teachers


def _total_steps(args, train_loader, batch_size: int) -> int:
    """The run's optimiser steps: ``--steps``, or every epoch's full batches (epochs of local shards
    are counted from their headers; an epoch without a full batch is refused up front)."""
    if args.steps is not None:
        return int(args.steps)
    steps = epoch_steps(train_loader, int(args.epochs))
    if steps is None:
        raise SystemExit("error: cannot tell how many batches an epoch has (remote shards): give --epoch-length "
                         "or --steps")
    if min(steps) == 0:
        shared = f" per worker ({args.workers} workers share the shards)" if args.workers > 1 else ""
        raise SystemExit(f"error: {train_loader.samples} training samples give no full batch of {batch_size}"
                         f"{shared} in epoch {steps.index(0) + 1}; lower --batch-size" + (" or --workers" if shared else ""))
    return sum(steps)


@dataclass
class _Ranks:
    """This process's place in a ``torchrun`` launch (a single process: world 1, rank 0)."""
    world: int
    rank: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> _Ranks:
        env = os.environ
        return cls(int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")))

    def start(self, device: torch.device) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=60))

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the ranks (itself in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(value)
            value /= self.world
        return value

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def finish(self, steps: int) -> None:
        if self.distributed:
            import torch.distributed as dist

            print(f"[train] rank {self.rank}/{self.world}: {steps} steps", flush=True)  # equal on every rank, or DDP hangs
            dist.destroy_process_group()


@dataclass
class _Model:
    """A model with how it is fed: the batches ``prepare_batch`` makes for it, and its evaluation."""
    spec: object
    module: nn.Module
    device: torch.device
    input_size: int
    amp_dtype: object
    channels_last: bool
    #: The spec's ``train_mode`` when the weights are pretrained (the modules it keeps in evaluation
    #: mode keep ImageNet's statistics; from scratch there are none to keep, so all train), else None.
    train_mode: object = None

    def batch(self, batch: dict):
        return prepare_batch(batch, self.spec.normalize, self.device, size=self.input_size,
                             channels_last=self.channels_last)

    def evaluate(self, loader) -> dict:
        return evaluate(self.module, loader, self.spec, self.device, amp_dtype=self.amp_dtype,
                        channels_last=self.channels_last, input_size=self.input_size)


def _open_loaders(args, spec, batch_size: int, input_size: int, ranks: _Ranks, gpu_decode: bool):
    """The training loader and (on the main rank) the ``--val`` loaders by name. Data first: a wrong
    shard path fails here, before any weights are fetched."""
    val_sets = parse_val(args.val)
    with _shards_found():  # the first to read --train / --val: a path naming no shard is one error line
        if ranks.is_main:
            warned: set[frozenset[str]] = set()
            for url in [args.train, *val_sets.values()]:
                shards = shard_set(url)
                if shards not in warned:  # --val may name the training shards: one warning per set of shards
                    warned.add(shards)
                    _warn_crop_room(url, spec, "train")
        train_loader = make_loader(args.train, spec, batch_size, train=True, workers=args.workers, seed=args.seed,
                                   epoch_length=args.epoch_length, distributed=ranks.distributed, input_size=input_size,
                                   gpu_decode=gpu_decode)
        val_loaders = {}
        if ranks.is_main:
            for name, url in val_sets.items():
                val_loaders[name] = make_loader(url, spec, batch_size, train=False, workers=args.workers,
                                                seed=args.seed, input_size=input_size, gpu_decode=gpu_decode)
    return train_loader, val_sets, val_loaders


def _train_epoch(model: _Model, loader, train_step, step: int, max_steps: int | None) -> tuple[list, int, bool]:
    """One pass over ``loader`` (stopping at ``max_steps``): the step losses, the step reached, and
    whether ``max_steps`` ended the run."""
    model.module.train()
    if model.train_mode is not None:
        model.train_mode(model.module)
    losses = []
    for batch in loader:
        x, targets = model.batch(batch)
        losses.append(train_step(x, targets))
        step += 1
        if max_steps is not None and step >= max_steps:
            return losses, step, True
    return losses, step, False


def _validate(model: _Model, loaders: dict, urls: dict) -> dict:
    """MAE per ``--val`` set, by name."""
    results = {}
    for name, loader in loaders.items():
        with _samples_found(urls[name]):
            results[name] = model.evaluate(loader)
        _warn_nonfinite("train", urls[name], results[name])
    return results


def _warn_nonfinite(command: str, data, res: dict) -> None:
    """A line on stderr when some predictions were NaN or infinite (the MAE is then NaN, written as
    null in the JSON): an overflow in float16 is the usual cause."""
    if res["nonfinite"]:
        print(f"[{command}] warning: {res['nonfinite']} of {res['samples']} samples of {data} gave NaN or infinite "
              "angles, so the MAE is NaN (null in the JSON): an overflow in float16 (try --amp bf16 or --amp off), "
              "or weights that are not finite", file=sys.stderr, flush=True)


def _print_epoch(entry: dict, total_steps: int) -> None:
    vals = "  ".join(f"{n}: MAE {m['mean']:.3f} (y {m['yaw']:.2f} p {m['pitch']:.2f} r {m['roll']:.2f})"
                     for n, m in entry["val"].items())
    print(f"[train] epoch {entry['epoch']} step {entry['step']}/{total_steps} loss {entry['train_loss']:.4f} "
          f"({entry['time_s']:.1f}s) {vals}", flush=True)


def cmd_train(args) -> int:
    ranks = _Ranks.from_environment()
    device = resolve_device(args.device, ranks.local_rank)
    ranks.start(device)
    out_dir = Path(args.out)
    if (args.epochs is None) == (args.steps is None):
        raise SystemExit("error: give exactly one of --epochs N or --steps N")

    spec = registry.get(args.model)
    teacher_paths = [t.strip() for t in (args.teachers or "").split(",") if t.strip()]
    # options this run would ignore (and metrics.json record as unset): refused, not dropped
    if args.alpha is not None and not accepts(spec.loss, "alpha"):
        takers = ", ".join(n for n in registry.names() if accepts(registry.get(n).loss, "alpha"))
        raise SystemExit(f"error: --alpha: {spec.name}'s loss has no regression weight (it is for {takers})")
    if args.kd_weight is not None and not teacher_paths:
        raise SystemExit("error: --kd-weight weights the distillation from --teachers: give --teachers too")
    if ranks.is_main:
        check_run_folder(out_dir, spec.name)
    input_size = int(args.input_size or spec.input_size)
    if spec.fixed_input_size and input_size != spec.input_size:
        raise SystemExit(f"error: {spec.name} takes {spec.input_size} px inputs only (its dense layers are sized "
                         "for them); leave out --input-size")
    batch_size = int(args.batch_size or spec.defaults.get("batch_size", 16))
    torch.manual_seed(args.seed)
    cuda = device.type == "cuda"
    channels_last = cuda
    amp_dtype = amp_dtype_for(device, args.amp)
    gpu_decode = bool(args.gpu_decode and cuda)
    if args.gpu_decode and not cuda:
        print("[train] --gpu-decode needs a CUDA device; decoding on the CPU", file=sys.stderr)
    train_loader, val_sets, val_loaders = _open_loaders(args, spec, batch_size, input_size, ranks, gpu_decode)

    # Teachers (knowledge distillation), read before the student is built: a wrong teacher path fails
    # before any weights are fetched
    teachers = _load_teachers(teacher_paths, spec, input_size, device, channels_last)
    kd_kwargs = {}
    if teachers and "kd_weight" in spec.defaults and accepts(spec.distill, "weight"):
        kd_kwargs["weight"] = float(args.kd_weight if args.kd_weight is not None else spec.defaults["kd_weight"])

    module = build_model(spec, args.pretrained, input_size).to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    from .models._pretrained import normalize_pretrained

    model = _Model(spec, module, device, input_size, amp_dtype, channels_last,
                   train_mode=spec.train_mode if normalize_pretrained(args.pretrained) is not None else None)
    total_steps = _total_steps(args, train_loader, batch_size)

    made_out = ranks.is_main and not out_dir.exists()
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)  # once the data, teachers and step count are settled
    opt, sched = spec.make_optimizer(module, total_steps, args.lr if args.lr is not None else spec.defaults.get("lr"))
    net = module
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(module, device_ids=[device.index] if cuda else None,
                  find_unused_parameters=bool(spec.defaults.get("find_unused_parameters", False)))
    train_step = TrainStep(spec, module, opt, sched, device, amp_dtype, net=net, alpha=args.alpha,
                           teachers=teachers, kd_kwargs=kd_kwargs)

    run_args = {
        "model": spec.name, "input_size": input_size, "crop_rule": spec.crop_rule, "normalize": spec.normalize,
        "batch_size": batch_size, **learning_rates(opt), "alpha": train_step.loss_kwargs.get("alpha"),
        "pretrained": str(args.pretrained), "seed": args.seed,
        "epochs": args.epochs, "steps": args.steps, "epoch_length": args.epoch_length, "world_size": ranks.world,
        "teachers": teacher_paths, "kd_weight": kd_kwargs.get("weight"), "train": str(args.train),
        "val": val_sets, "device": str(device), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
        "total_steps": total_steps,
    }
    history = {"model": spec.name, "args": run_args, "epochs": [], "steps": [], "final": {}}
    if ranks.is_main:
        n_params = registry.count_parameters(module)
        print(f"[train] {spec.name}: {n_params:,} trainable parameters, input {input_size}px, batch {batch_size}"
              f"{f' x {ranks.world} ranks' if ranks.distributed else ''}, {total_steps} steps on {device}"
              + (f" ({run_args['amp']} autocast)" if amp_dtype else ""), flush=True)

    def stop(line: str) -> SystemExit:
        if made_out and not any(out_dir.iterdir()):
            out_dir.rmdir()  # made by this run, nothing written: leave no empty folder
        return SystemExit(line)

    step = epoch = 0
    done = False
    t_start = time.time()
    while not done:
        epoch += 1
        t_epoch = time.time()
        losses, step, done = _train_epoch(model, train_loader, train_step, step, args.steps)
        if not losses:
            raise stop(f"error: epoch {epoch} gave no training batch (fewer samples than --batch-size "
                       f"{batch_size} per loader worker?)")
        step_losses = torch.stack(losses).float()
        epoch_loss = ranks.mean(step_losses.mean())
        # diverged: stop before NaN weights replace the last checkpoint. The weights, the same on every
        # rank, decide (all ranks stop together): a float16 step with a non-finite loss that the
        # GradScaler skipped leaves them finite, and the run goes on.
        if not all(bool(t.isfinite().all()) for t in module.state_dict().values() if t.is_floating_point()):
            bad = (~torch.isfinite(step_losses)).nonzero()
            what = (f"the training loss became {float(step_losses[bad[0]])} at step {step - len(losses) + 1 + int(bad[0])}"
                    if len(bad) else "the weights became NaN or infinite")
            kept = f"; {out_dir / 'checkpoint.pt'} holds epoch {epoch - 1}'s weights" if epoch > 1 else ""
            raise stop(f"error: training diverged in epoch {epoch}: {what} (a lower --lr?){kept}")
        if args.epochs is not None and epoch >= args.epochs:
            done = True
        if ranks.is_main:
            first = step - len(losses) + 1
            history["steps"].extend({"step": first + i, "loss": v} for i, v in enumerate(step_losses.cpu().tolist()))
            entry = {"epoch": epoch, "step": step, "train_loss": float(epoch_loss),
                     **learning_rates(opt, scheduled=True), "time_s": round(time.time() - t_epoch, 3),
                     "val": _validate(model, val_loaders, val_sets)}
            history["epochs"].append(entry)
            history["final"] = entry["val"]
            save_epoch(out_dir, module, spec.name, run_args, history, entry)
            _print_epoch(entry, total_steps)
        ranks.barrier()
    if ranks.is_main:
        print(f"[train] done in {time.time() - t_start:.1f}s -> {out_dir / 'checkpoint.pt'}", flush=True)
    ranks.finish(step)
    return 0


# --------------------------------------------------------------------------------------------
# eval / params / convert-fsanet
# --------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    spec, model, input_size = model_from_checkpoint(ckpt, args.model, device, where=f"checkpoint {args.ckpt}")
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = amp_dtype_for(device, args.amp)
    batch_size = int(args.batch_size or (ckpt.get("args") or {}).get("batch_size") or 64)
    if args.gpu_decode and not cuda:
        print("[eval] --gpu-decode needs a CUDA device; decoding on the CPU", file=sys.stderr)
    with _shards_found():
        _warn_crop_room(args.data, spec, "eval")
        loader = make_loader(args.data, spec, batch_size, train=False, workers=args.workers, seed=0,
                             input_size=input_size, gpu_decode=bool(args.gpu_decode and cuda))
    with _samples_found(args.data):
        res = _Model(spec, model, device, input_size, amp_dtype, channels_last=cuda).evaluate(loader)
    print(f"{spec.name} on {args.data}: {res['samples']} samples")
    for k in ("yaw", "pitch", "roll", "mean"):
        print(f"  MAE {k:<5} {res[k]:.4f}")
    _warn_nonfinite("eval", args.data, res)
    shown = {"model": spec.name, **{k: res[k] for k in ("samples", "yaw", "pitch", "roll", "mean", "nonfinite")}}
    print(json.dumps(json_safe(shown), allow_nan=False), flush=True)
    return 0


def cmd_params(args) -> int:
    names = registry.names() if args.model == "all" else [args.model]
    for name in names:
        spec = registry.get(name)
        model = build_model(spec, None, None)
        trainable = registry.count_parameters(model, trainable_only=True)
        total = registry.count_parameters(model, trainable_only=False)
        print(f"{name}: trainable {trainable:,}  total {total:,}")
        report = getattr(model, "parameter_report", None)
        if callable(report):
            for label, n in report().items():
                print(f"  {label}: {n:,}")
    return 0


def cmd_convert_fsanet(args) -> int:
    from .convert_fsanet import convert  # written alongside the FSA-Net port; imported lazily (h5py)

    src = Path(args.h5)
    what = ("give an official FSA-Net Keras .h5 (save_weights), or a folder holding the three official .h5 "
            "files (1x1, var, w/o: converts to fsanet_fusion)")
    if not src.exists():
        raise SystemExit(f"error: {src} not found; {what}")
    if Path(args.out).is_dir():  # torch.save's error would blame the .h5 ("cannot convert")
        raise SystemExit(f"error: {args.out} is a folder; give the checkpoint file to write, e.g. "
                         f"{Path(args.out) / 'fsanet.pt'}")
    try:
        summary = convert(src, args.out)
    except ImportError as err:
        raise SystemExit(f"error: reading {src} needs {err.name or 'h5py'}: pip install h5py") from None
    except FileNotFoundError as err:  # a folder without the three official files
        raise SystemExit(f"error: {first_line(err)}; {what}") from None
    except OSError as err:
        if err.filename is not None:  # from open(): writing the output (h5py's errors name no file)
            raise SystemExit(f"error: cannot write {args.out} ({err.strerror or err})") from None
        raise SystemExit(f"error: {src} is not an HDF5 file h5py can read ({first_line(err)}); {what}") from None
    except (ValueError, KeyError, RuntimeError) as err:  # an HDF5 file, not the weights we map
        raise SystemExit(f"error: cannot convert {src} ({first_line(err)}); {what}") from None
    print(json.dumps(summary, default=str) if isinstance(summary, dict) else f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train_minimal", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a registered model on WebDataset shards")
    t.add_argument("--model", required=True, choices=registry.names(), metavar="MODEL",
                   help="registered model: " + ", ".join(registry.names()))
    t.add_argument("--train", required=True, help="training shards: path, brace pattern or URL")
    t.add_argument("--val", action="append", metavar="NAME=URL", help="validation shards (repeatable)")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--epochs", type=_positive_int)
    g.add_argument("--steps", type=_positive_int, help="optimiser steps in all (evaluates at each epoch end and at the end)")
    t.add_argument("--batch-size", type=_positive_int, help="per process (default: the model's)")
    t.add_argument("--device", type=_device, default="auto", help="auto (a GPU when torch sees one, else cpu) | cpu | cuda | cuda:N | mps (default auto)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--lr", type=positive_number, help="learning rate (default: the paper's)")
    t.add_argument("--alpha", type=_loss_weight, help="regression weight of bin-classification losses (Hopenet: 1 or 2)")
    t.add_argument("--teachers", help="comma-separated teacher checkpoints (knowledge distillation)")
    t.add_argument("--kd-weight", type=_loss_weight, help="distillation weight (default: the model's)")
    t.add_argument("--pretrained", default="auto", help="none | auto (ImageNet backbone weights via torchvision/timm, for the models with such a backbone) | PATH (default auto)")
    t.add_argument("--workers", type=_non_negative_int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers (default: min(4, cores); 0: read in the main process)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights, shuffling and augmentation (default 0)")
    t.add_argument("--gpu-decode", action="store_true", help="decode JPEGs on the GPU (torchvision.io.decode_jpeg)")
    t.add_argument("--epoch-length", type=_positive_int, help="samples per epoch (all ranks): resampled shards")
    t.add_argument("--input-size", type=_positive_int, help="override the model's input size (smoke tests)")
    t.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="mixed precision: auto (CUDA: bf16, else fp16; CPU: off) | off | bf16 | fp16")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="MAE of a checkpoint on shards; the last line is JSON")
    e.add_argument("--model", choices=registry.names(), metavar="MODEL", help="model name (default: the checkpoint's)")
    e.add_argument("--ckpt", required=True, help="a train_minimal checkpoint (OUT/checkpoint.pt) or a state dict")
    e.add_argument("--data", required=True, help="shards: path, brace pattern or URL")
    e.add_argument("--batch-size", type=_positive_int, help="default: the training batch size")
    e.add_argument("--device", type=_device, default="auto", help="auto (a GPU when torch sees one, else cpu) | cpu | cuda | cuda:N | mps (default auto)")
    e.add_argument("--workers", type=_non_negative_int, default=0, help="DataLoader workers (default 0: the main process)")
    e.add_argument("--gpu-decode", action="store_true", help="decode JPEGs on the GPU (torchvision.io.decode_jpeg; CUDA only)")
    e.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="as for train")
    e.set_defaults(func=cmd_eval)

    pa = sub.add_parser("params", help="parameter counts of a model (or 'all')")
    pa.add_argument("--model", required=True, choices=registry.names() + ["all"], metavar="MODEL",
                    help="a registered model, or all")
    pa.set_defaults(func=cmd_params)

    c = sub.add_parser("convert-fsanet", help="official FSA-Net Keras .h5 weights -> our checkpoint")
    c.add_argument("h5", help="FSA-Net's Keras weights file (.h5)")
    c.add_argument("out", help="the checkpoint to write (.pt)")
    c.set_defaults(func=cmd_convert_fsanet)
    return p


class CommandFailed(SystemExit):
    """A command stopped by an error, its one line already printed: exit status 2, as argparse's
    usage errors and ``dataprep``'s errors (README, "Exit status"; a ``SystemExit`` with a message
    would exit 1, ``dataprep verify``'s status for problems found). ``str()`` gives the line."""

    def __init__(self, line: str):
        super().__init__(NOT_DONE)
        self.line = line

    def __str__(self) -> str:
        return self.line


def _failed(line: str) -> CommandFailed:
    print(line, file=sys.stderr, flush=True)
    return CommandFailed(line)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UnreadableShard, NoSamples, BadSample) as exc:  # a broken or empty shard, or a bad sample, up front or while streaming: one line
        raise _failed(f"{parser.prog} {args.command}: error: {shard_error_line(exc)}") from None
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of every DataLoader worker
        saved = f" ({Path(args.out) / 'checkpoint.pt'} is written after each epoch that finishes)" if args.command == "train" else ""
        print(f"\n{parser.prog} {args.command}: interrupted{saved}", file=sys.stderr)
        return INTERRUPTED
    except SystemExit as exc:  # our one-line errors ("error: ..."), named as argparse names its own
        if isinstance(exc.code, str) and exc.code.startswith("error: "):
            raise _failed(f"{parser.prog} {args.command}: {exc.code}") from None
        raise
    except Exception as exc:  # noqa: BLE001 - a crash: traceback, advice, and exit 2, as every error here
        where = f"{parser.prog} {args.command}"
        report_crash(where, exc)
        raise CommandFailed(f"{where}: error: unexpected {type(exc).__name__}: {first_line(exc)}") from None


if __name__ == "__main__":
    raise SystemExit(main())
