"""Streaming batches from WebDataset shards for ``train_minimal``.

One set of shards serves every model: each sample's label record carries the face boxes in
source pixels and the window its stored crop covers, so the model's own crop rule is applied at
load time (``dataprep.crop.recrop``) at the model's input size.

Pipeline (``make_loader``)::

    shard URLs (brace pattern / path / URL, as webdataset accepts)
      -> [train] shard shuffle (per epoch), or resampled shards (``epoch_length`` / DDP)
      -> [DDP] wds.split_by_node -> wds.split_by_worker
      -> tar members grouped into samples -> [train] buffer shuffle (seed, epoch, rank, worker)
      -> decode: ``jpg`` with cv2 (or kept as bytes for ``torchvision.io.decode_jpeg`` on the GPU),
         ``json`` record, ``pts.npy`` landmarks (never unpickled) -> recrop to the model's rule
      -> batches (collated in the workers) -> DataLoader(workers, pin_memory, persistent workers)

``prepare_batch`` then moves a batch to the device (``non_blocking``), decodes/crops on the GPU
when asked, and normalises: ``"imagenet"`` (RGB, /255, ImageNet mean/std) or ``"raw_bgr"``
(0-255 BGR floats). Images travel as uint8 until then (4x less to copy than floats).

Targets: ``angles`` (B, 3) yaw, pitch, roll degrees; ``landmarks`` (B, L, 2) in model-input
pixels with ``landmarks_mask`` (B,) when any sample of the batch has ``<key>.pts.npy``.

Epochs: without ``epoch_length`` (single process) an epoch is one pass over the shards. With
``epoch_length`` (samples per epoch, all ranks together), or under DDP where it is required (it
defaults to the number of samples in the shards), shards are resampled with replacement and every
rank yields exactly ``epoch_length // (world_size * batch_size)`` batches per epoch, so no rank
waits for another at the end of an epoch. Randomness (shuffles, Hopenet's random crop factor)
is seeded from ``(seed, epoch, rank, worker)`` / ``(seed, epoch, key)``; evaluation loaders are
deterministic (no shuffle, the crop rules' fixed values).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from itertools import islice
from typing import Any, Sequence
from urllib.parse import urlparse

import cv2
import numpy as np
import torch
import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.utils import PipelineStage, pytorch_worker_info

from dataprep import boxes as box_rules
from dataprep import crop as crop_ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHUFFLE_BUFFER = 1000


# --------------------------------------------------------------------------------------------
# URLs and sample counts
# --------------------------------------------------------------------------------------------
def expand(urls) -> list[str]:
    """Brace patterns / ``::`` lists / a list of them -> URLs (``~`` expanded for local paths)."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out = []
    for item in items:
        for url in expand_urls(os.fspath(item)):
            out.append(os.path.expanduser(url) if _is_local(url) else url)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme == "" or len(scheme) == 1


def _local_path(url: str) -> str | None:
    if _is_local(url):
        return url
    if url.startswith("file://"):
        return urlparse(url).path
    return None


def count_samples(urls) -> int | None:
    """Samples in the shards (``.json`` members), reading tar headers only; None when a shard is
    not a local file (then give ``--epoch-length``)."""
    total = 0
    for url in expand(urls):
        path = _local_path(url)
        if path is None:
            return None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {url} not found")
        with tarfile.open(path, "r:*") as tar:
            total += sum(1 for m in tar if m.isfile() and m.name.endswith(".json"))
    return total


# --------------------------------------------------------------------------------------------
# Pipeline stages (picklable, for DataLoader workers)
# --------------------------------------------------------------------------------------------
class _EpochShuffle(PipelineStage):
    """Buffer shuffle seeded from ``(seed, epoch, rank, worker)``; the epoch counts the passes
    this copy of the stage has made (each worker process keeps its own copy)."""

    def __init__(self, bufsize: int, seed: int):
        self.bufsize = bufsize
        self.seed = seed
        self.epoch = -1

    def run(self, src):
        self.epoch += 1
        rank, _, worker, _ = pytorch_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 7])
        buf: list = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], sample = sample, buf[i]
            yield sample
        for i in rng.permutation(len(buf)):
            yield buf[i]


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def rule_window(record: dict, rule: str, rng=None, margin: float = 0.0) -> list[float]:
    """The crop window (source pixels) ``crop.recrop`` takes for ``rule`` (same box choice)."""
    box_name = record.get("box_source", "gt")
    if box_name == "gt":
        box_name = box_rules.RULE_GT_BOX.get(rule, "gt")
    face = record["boxes"].get(box_name) or record["box"]
    return box_rules.crop_window(rule, face, dataset=record["dataset"], image_size=record["image_size"], rng=rng,
                                 margin=margin)


class _Prepare(PipelineStage):
    """Raw tar sample -> ``{"image" | "jpeg"+"window", "angles", "landmarks", "key"}``."""

    def __init__(self, crop_rule: str, size: int, train: bool, seed: int, gpu_decode: bool):
        self.crop_rule = crop_rule
        self.size = int(size)
        self.train = train
        self.seed = seed
        self.gpu_decode = gpu_decode
        self.epoch = -1

    def run(self, src):
        self.epoch += 1
        for raw in src:
            try:
                yield self.prepare(raw)
            except Exception as exc:
                raise ValueError(f"sample {raw.get('__key__')!r} in {raw.get('__url__')!r}: {exc}") from exc

    def prepare(self, raw: dict) -> dict:
        if "json" not in raw or "jpg" not in raw:
            raise ValueError("needs both a .jpg and a .json member")
        record = json.loads(raw["json"])
        key = str(record.get("key") or raw["__key__"])
        seq = np.random.SeedSequence([self.seed, self.epoch, _key_hash(key)]) if self.train else None
        rng = (lambda: np.random.default_rng(seq)) if seq is not None else (lambda: None)
        out: dict[str, Any] = {"key": key,
                               "angles": np.array([record["yaw"], record["pitch"], record["roll"]], np.float32)}
        if self.gpu_decode:
            w, h = record["crop_size"]
            out["jpeg"] = np.frombuffer(raw["jpg"], dtype=np.uint8)
        else:
            image = cv2.imdecode(np.frombuffer(raw["jpg"], dtype=np.uint8), cv2.IMREAD_COLOR)  # BGR
            if image is None:
                raise ValueError("cannot decode the .jpg member")
            h, w = image.shape[:2]
            out["image"] = crop_ops.recrop(image, record, self.crop_rule, self.size, rng=rng())
        # The integer window (stored-crop pixels) recrop cut: same rule, same random draw.
        mapped = box_rules.box_to_crop_coords(rule_window(record, self.crop_rule, rng()), record["crop"], (w, h))
        taken = box_rules.integer_window(mapped)
        if self.gpu_decode:
            out["window"] = np.array(taken, np.int64)
        out["landmarks"] = None
        if "pts.npy" in raw:
            pts = np.load(io.BytesIO(raw["pts.npy"]), allow_pickle=False).astype(np.float64).reshape(-1, 2)
            stored = box_rules.to_crop_coords(pts, record["crop"], (w, h))
            out["landmarks"] = box_rules.to_crop_coords(stored, taken, (self.size, self.size)).astype(np.float32)
        return out


def collate(samples: Sequence[dict]) -> dict:
    batch: dict[str, Any] = {
        "key": [s["key"] for s in samples],
        "angles": torch.from_numpy(np.stack([s["angles"] for s in samples])),
    }
    if "jpeg" in samples[0]:
        batch["jpeg"] = [torch.from_numpy(s["jpeg"].copy()) for s in samples]
        batch["window"] = torch.from_numpy(np.stack([s["window"] for s in samples]))
    else:
        batch["image"] = torch.from_numpy(np.stack([s["image"] for s in samples]))  # (B, H, W, 3) uint8 BGR
    shapes = [s["landmarks"].shape for s in samples if s["landmarks"] is not None]
    if shapes:
        shape = max(set(shapes), key=shapes.count)
        lms = np.zeros((len(samples),) + shape, np.float32)
        mask = np.zeros(len(samples), bool)
        for i, s in enumerate(samples):
            if s["landmarks"] is not None and s["landmarks"].shape == shape:
                lms[i], mask[i] = s["landmarks"], True
        batch["landmarks"] = torch.from_numpy(lms)
        batch["landmarks_mask"] = torch.from_numpy(mask)
    return batch


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------
class ShardLoader:
    """Iterable over batches (one epoch per ``iter``); ``batches_per_epoch`` is exact for resampled
    loaders and an estimate (full batches in the shards) otherwise."""

    def __init__(self, loader, batches_per_epoch: int | None, samples: int | None, resampled: bool):
        self.loader = loader
        self.batches_per_epoch = batches_per_epoch
        self.samples = samples
        self.resampled = resampled

    def __iter__(self):
        it = iter(self.loader)
        return islice(it, self.batches_per_epoch) if self.resampled else it


def make_loader(urls, spec, batch_size: int, *, train: bool, workers: int = 0, seed: int = 0,
                epoch_length: int | None = None, distributed: bool = False, input_size: int | None = None,
                gpu_decode: bool = False, pin_memory: bool | None = None) -> ShardLoader:
    """Batches for ``spec`` (its ``crop_rule``, ``input_size`` unless ``input_size`` is given).

    ``train``: shuffles, random crop draws, full batches only; resampled with a fixed epoch
    length when ``epoch_length`` is given or ``distributed`` (DDP). Evaluation loaders read every
    sample once, in order, without splitting across ranks.
    """
    size = int(input_size or spec.input_size)
    url_list = expand(urls)
    world = 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    resampled = bool(train and (epoch_length or distributed))
    samples = None
    if resampled and not epoch_length:
        samples = count_samples(url_list)
        if samples is None:
            raise ValueError("distributed training needs --epoch-length (samples per epoch) for remote shards")
        epoch_length = samples
    batches = None
    if resampled:
        batches = max(1, int(epoch_length) // (world * batch_size))
    elif train:
        samples = count_samples(url_list)
        batches = None if samples is None else samples // batch_size

    ds = wds.WebDataset(
        url_list,
        resampled=resampled,
        shardshuffle=(100 if train and not resampled else False),
        detshuffle=True,
        seed=seed,
        nodesplitter=wds.split_by_node if (distributed and train) else None,
        workersplitter=wds.split_by_worker,
        empty_check=False,
        select_files=lambda name: name.endswith((".jpg", ".json", ".pts.npy")),
    )
    if train:
        ds = ds.compose(_EpochShuffle(SHUFFLE_BUFFER, seed))
    ds = ds.compose(_Prepare(spec.crop_rule, size, train, seed, gpu_decode))
    ds = ds.batched(batch_size, collation_fn=collate, partial=not train)
    nworkers = max(0, int(workers))
    if resampled:
        ds = ds.with_epoch(math.ceil(batches / max(1, nworkers)) + 1)
    kwargs = {}
    if nworkers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader = wds.WebLoader(ds, batch_size=None, num_workers=nworkers, pin_memory=bool(pin_memory), **kwargs)
    return ShardLoader(loader, batches, samples, resampled)


# --------------------------------------------------------------------------------------------
# On the device
# --------------------------------------------------------------------------------------------
def _gpu_crop_resize(img: torch.Tensor, window, size: int) -> torch.Tensor:
    """CHW uint8 (on the GPU) -> window (zero outside the image) resized to ``size`` (float)."""
    x1, y1, x2, y2 = (int(v) for v in window)
    c, h, w = img.shape
    canvas = torch.zeros((c, y2 - y1, x2 - x1), dtype=img.dtype, device=img.device)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        canvas[:, sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = img[:, sy1:sy2, sx1:sx2]
    shrink = canvas.shape[1] > size or canvas.shape[2] > size
    return torch.nn.functional.interpolate(canvas[None].float(), size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=shrink)[0]


def prepare_batch(batch: dict, normalize: str, device: torch.device, *, size: int | None = None,
                  channels_last: bool = False) -> tuple[torch.Tensor, dict]:
    """Batch from the loader -> ``(images (B, 3, H, W) float on device, targets on device)``."""
    if "jpeg" in batch:
        from torchvision.io import ImageReadMode, decode_jpeg

        # decode_jpeg takes the (CPU) byte tensors and decodes them on ``device`` (nvjpeg on CUDA).
        decoded = decode_jpeg(list(batch["jpeg"]), mode=ImageReadMode.RGB, device=device)
        windows = batch["window"].tolist()
        x = torch.stack([_gpu_crop_resize(img, win, size) for img, win in zip(decoded, windows)])  # RGB 0-255
        rgb = True
    else:
        x = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float()  # BGR 0-255
        rgb = False
    if normalize == "imagenet":
        if not rgb:
            x = x.flip(1)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
        x = (x - mean) / std
    elif normalize == "raw_bgr":
        if rgb:
            x = x.flip(1)
    else:
        raise ValueError(f"unknown normalisation {normalize!r} (imagenet or raw_bgr)")
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    targets = {"angles": batch["angles"].to(device, non_blocking=True)}
    if "landmarks" in batch:
        targets["landmarks"] = batch["landmarks"].to(device, non_blocking=True)
        targets["landmarks_mask"] = batch["landmarks_mask"].to(device, non_blocking=True)
    return x, targets
