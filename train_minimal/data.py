"""Batches for ``train_minimal``: ``dataprep.loader`` set up for a model, and the move to the device.

One set of shards serves every model: each sample's label record carries the face boxes in
source pixels and the window its stored crop covers, so the model's own crop rule is applied at
load time at the model's input size. The streaming itself (shard lists, DDP splitting, resampled
epochs, shuffles, decode, recrop, collate) is :mod:`dataprep.loader`; this module only chooses its
settings for a :class:`~train_minimal.registry.ModelSpec` and a training or evaluation run:

* training: shuffled (shards and a 1000-sample buffer, seeded from ``(seed, epoch, rank, worker)``),
  Hopenet's random crop factor and view drawn per sample, full batches only. With ``epoch_length`` (samples
  per epoch, all ranks together), or under DDP where it is required (it defaults to the number of
  samples in the shards), shards are resampled with replacement and every rank yields exactly
  ``epoch_length // (world_size * batch_size)`` batches per epoch, so no rank waits for another.
* evaluation: every sample once, in order, the crop rules' fixed values, not split across ranks.

Images travel as uint8 RGB (a quarter of the bytes of floats: written once by a worker into a
batch buffer it reuses, lent to this process without a copy, see :mod:`dataprep.loader`) or, with
``gpu_decode``, as the stored JPEG bytes plus the crop window; :func:`prepare_batch` moves a batch
to the device (``non_blocking``), decodes and crops on the GPU when asked, and normalises there
(the spec's ``normalize``, :func:`dataprep.loader.normalize_images`).

Targets: ``angles`` (B, 3) yaw, pitch, roll degrees; ``landmarks`` (B, L, 2) in model-input
pixels with ``landmarks_mask`` (B,) when any sample of the batch has ``<key>.pts.npy``.
"""
from __future__ import annotations

import json
import os
import sys
import tarfile
from contextlib import contextmanager

import torch

from dataprep import boxes as box_rules
from dataprep import crop as crop_ops
from dataprep import loader as loaders
from dataprep.errors import first_line
from dataprep.loader import (BadSample, HeadPoseLoader, NoSamples, expand_shard_urls, local_path, normalize_images,
                             require_local_shards)
from dataprep.loader.tar_reader import EMPTY_SHARDS_HINT, SHARD_READ_ERRORS, miscounted_shard, unreadable_shard
from dataprep.loader.urls import recorded_shard_lengths
from dataprep.shards import split_member

SHUFFLE_BUFFER = 1000


@contextmanager
def _open_shard(path: str, url: str):
    """``tarfile`` over a local shard; a broken one (truncated, not a tar) raises the loader's
    one-line :class:`dataprep.loader.UnreadableShard` naming it, not ``tarfile``'s bare error."""
    try:
        with tarfile.open(path, "r:*") as tar:
            yield tar
    except SHARD_READ_ERRORS as err:
        raise unreadable_shard(url, err) from err


def _records(tar):
    """The members of an open shard that are sample label records: extension ``json`` (any case, as
    the loader reads it) as webdataset splits names (``a.meta.json`` is another member of sample
    ``a``, not a record)."""
    return (m for m in tar if m.isfile() and (split_member(m.name)[1] or "").lower() == "json")


def shard_samples(urls) -> list[int] | None:
    """Samples in each shard (members with the extension ``json``: one record per sample, as the
    loader reads them), reading tar headers only; None when a shard is
    not a local file (then give ``--epoch-length``)."""
    counts = []
    url_list = expand_shard_urls(urls)
    require_local_shards(url_list)
    recorded = recorded_shard_lengths(url_list)
    for url in url_list:
        path = local_path(url)
        if path is None:
            return None
        with _open_shard(path, url) as tar:
            n = sum(1 for _ in _records(tar))
        if recorded.get(url, n) != n:  # a tar cut between two members still reads: only the count tells
            raise miscounted_shard(url, n, recorded[url])
        counts.append(n)
    return counts


def crop_coverage(urls, rule: str, samples: int = 64) -> tuple[float, str] | None:
    """Mean :func:`dataprep.crop.rule_coverage` of ``rule`` over the first ``samples`` label
    records of the first shard, and that shard; None when it is not a local file."""
    url = expand_shard_urls(urls)[0]
    path = local_path(url)
    if path is None or not os.path.isfile(path):
        return None
    values = []
    with _open_shard(path, url) as tar:
        for member in _records(tar):
            values.append(crop_ops.rule_coverage(json.loads(tar.extractfile(member).read()), rule))
            if len(values) >= samples:
                break
    return (sum(values) / len(values), url) if values else None


def shard_set(urls) -> frozenset[str]:
    """The shards ``urls`` name, local ones by their real path: two spellings of the same shards (a
    brace pattern and a ``::`` list, ``./a.tar`` and ``a.tar``) give the same set."""
    return frozenset(os.path.realpath(path) if (path := local_path(url)) is not None else url
                     for url in expand_shard_urls(urls))


def crop_room_warning(urls, spec, min_coverage: float = 0.95) -> str | None:
    """A warning when the shards' stored crops hold too little of ``spec``'s crop window (the
    model would train on black borders its paper never had), saying how to build them; else None."""
    got = crop_coverage(urls, spec.crop_rule)
    if got is None or got[0] >= min_coverage:
        return None
    coverage, url = got
    margin = box_rules.ROOM_MARGIN.get(spec.crop_rule)
    fix = f"--margin {margin}" if margin else "a larger --margin"
    return (f"the stored crops of {url} hold {coverage:.0%} of {spec.name}'s {spec.crop_rule!r} crop window "
            f"on average; the rest of each input comes out black. Build the shards with room for it: "
            f"dataprep build ... {fix} (and a larger --crop-size, e.g. 320, to keep the face's pixels)")


def make_loader(urls, spec, batch_size: int, *, train: bool, workers: int = 0, seed: int = 0,
                epoch_length: int | None = None, distributed: bool = False, input_size: int | None = None,
                gpu_decode: bool = False, pin_memory: bool | None = None) -> HeadPoseLoader:
    """Batches for ``spec`` (its ``crop_rule``, ``input_size`` unless ``input_size`` is given): a
    :class:`dataprep.loader.HeadPoseLoader` with persistent workers, one epoch per ``iter``.

    ``train``: shuffles, random crop draws, full batches only; resampled with a fixed epoch
    length when ``epoch_length`` is given or ``distributed`` (DDP). Evaluation loaders read every
    sample once, in order, without splitting across ranks. ``batches_per_epoch`` is exact for
    resampled loaders, and for others that of the first epoch (see :func:`epoch_steps`);
    ``shard_samples`` the samples in each shard where they were counted;
    ``samples`` is the count from the tar headers (None for remote shards, or resampled ones with
    ``epoch_length``: not read up front).
    """
    url_list = expand_shard_urls(urls)
    resampled = bool(train and (epoch_length or distributed))
    counts = samples = None
    if not (resampled and epoch_length):
        # every tar header read once up front: a broken shard fails here, named, not mid-epoch in a worker
        counts = shard_samples(url_list)
        samples = None if counts is None else sum(counts)
        if samples == 0:  # empty shards: a build writes one where every sample was rejected
            raise NoSamples(f"{urls} hold no samples ({EMPTY_SHARDS_HINT})")
    if resampled and not epoch_length:
        if samples is None:
            raise ValueError("distributed training needs --epoch-length (samples per epoch) for remote shards")
        epoch_length = samples
    nworkers = max(0, int(workers))
    transforms = spec.train_transforms() if train and spec.train_transforms is not None else None
    if transforms is not None and gpu_decode:
        print(f"[train] note: --gpu-decode decodes on the GPU, so {spec.name}'s online augmentation "
              "(applied to decoded images on the CPU) is left out", file=sys.stderr)
        transforms = None
    loader = loaders.make_loader(
        url_list, batch_size, workers=nworkers, drop_last=train,
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        prefetch_factor=4 if nworkers else None, persistent_workers=True,
        crop_rule=spec.crop_rule, size=int(input_size or spec.input_size), random_crop=train,
        shuffle=SHUFFLE_BUFFER if train else 0, seed=seed, resampled=resampled,
        samples_per_epoch=int(epoch_length) if resampled else None, distributed=bool(distributed and train),
        image_format="jpeg" if gpu_decode else "uint8", transforms=transforms,
    )
    loader.shard_samples = counts
    if train and not resampled:
        loader.batches_per_epoch = None if counts is None else loader.batches_in_epoch(0, counts)
    loader.samples = samples
    return loader


def epoch_steps(loader: HeadPoseLoader, epochs: int) -> list[int] | None:
    """The steps of each of ``epochs`` passes of a training ``loader`` made by :func:`make_loader`:
    exact, also where the workers' partial batches make epochs differ (each worker drops its own);
    None when the shards cannot be counted (remote)."""
    if loader.dataset.state.resampled:
        return [loader.batches_per_epoch] * epochs
    if loader.shard_samples is None:
        return None
    return [loader.batches_in_epoch(epoch, loader.shard_samples) for epoch in range(epochs)]


# --------------------------------------------------------------------------------------------
# On the device
# --------------------------------------------------------------------------------------------
def _gpu_crop_resize(img: torch.Tensor, window, size: int) -> torch.Tensor:
    """CHW uint8 (on the GPU) -> window (zero outside the image) resized to ``size`` (float).
    Plain bilinear, no antialiasing, as the CPU path resizes (``cv2.INTER_LINEAR``): a model
    trained with ``--gpu-decode`` sees the pixels it is evaluated on without it (``exact_cut``'s
    up to rounding, mean 0.1 grey level; antialiasing made it 0.5-2)."""
    x1, y1, x2, y2 = (int(v) for v in window)
    c, h, w = img.shape
    canvas = torch.zeros((c, y2 - y1, x2 - x1), dtype=img.dtype, device=img.device)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        canvas[:, sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = img[:, sy1:sy2, sx1:sx2]
    return torch.nn.functional.interpolate(canvas[None].float(), size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=False)[0]


def prepare_batch(batch: dict, normalize: str, device: torch.device, *, size: int | None = None,
                  channels_last: bool = False) -> tuple[torch.Tensor, dict]:
    """Batch from the loader -> ``(images (B, 3, H, W) float on device, targets on device)``."""
    if "jpeg" in batch:
        from torchvision.io import ImageReadMode, decode_jpeg

        if size is None:
            raise ValueError("GPU-decoded batches need size= (the model's input size)")
        # decode_jpeg takes the (CPU) byte tensors and decodes them on ``device`` (nvjpeg on CUDA).
        try:
            decoded = decode_jpeg(list(batch["jpeg"]), mode=ImageReadMode.RGB, device=device)
        except RuntimeError as err:  # torchvision's words name no sample: say which batch it was
            keys = ", ".join(batch["key"][:4]) + (" ..." if len(batch["key"]) > 4 else "")
            raise BadSample(f"a stored JPEG of the batch of samples {keys} does not decode "
                            f"({first_line(err)}); check the shards with `dataprep verify` on their folder") from None
        windows = batch["window"].tolist()
        x = torch.stack([_gpu_crop_resize(img, win, size) for img, win in zip(decoded, windows)])  # RGB 0-255
    else:
        x = batch["image"].to(device, non_blocking=True)  # RGB uint8
    x = normalize_images(x, normalize)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    targets = {"angles": batch["angles"].to(device, non_blocking=True)}
    if "landmarks" in batch:
        targets["landmarks"] = batch["landmarks"].to(device, non_blocking=True)
        targets["landmarks_mask"] = batch["landmarks_mask"].to(device, non_blocking=True)
    return x, targets
