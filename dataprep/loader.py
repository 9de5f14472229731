"""Streaming loader for training code: shards -> (recrop) -> augment -> batches.

The one streaming implementation of the project: ``train_minimal.data`` is a thin user of it.
Minimal use in any PyTorch code::

    from dataprep.loader import make_loader
    from dataprep.augment import Compose, RandomApply, HorizontalFlip, GaussianBlur

    aug = Compose([RandomApply(HorizontalFlip(), 0.5), RandomApply(GaussianBlur(), 0.3)])
    loader = make_loader("out/train-{000000..000003}.tar", batch_size=64, workers=4,
                         crop_rule="hopenet", size=224, transforms=aug, normalize="imagenet")
    for epoch in range(epochs):
        for batch in loader:            # a new epoch's shuffle and augmentation each pass
            images, angles = batch["image"], batch["angles"]   # (B,3,H,W) float, (B,3) yaw,pitch,roll

Workers start from a ``forkserver`` (a plainly forked worker can deadlock inside cv2), which imports
the main module again: in a script, build and iterate loaders under ``if __name__ == "__main__":``.

Pipeline (a :class:`webdataset.DataPipeline`)::

    shard list (webdataset's SimpleShardList, order shuffled per epoch)
        -> [DDP] wds.split_by_node -> wds.split_by_worker
      or resampled shards (webdataset's ResampledShards, seeded per rank, worker and epoch)
    -> open each shard (local paths, ``file://``, brace patterns, any scheme webdataset's ``gopen``
       knows such as ``pipe:``/``http(s)``, otherwise ``fsspec`` e.g. ``s3://``, ``gs://``,
       ``memory://``) -> tar members grouped into samples (webdataset's tariterators)
    -> buffer shuffle (wds.shuffle) -> decode (``.jpg`` with cv2, or kept as bytes for a GPU
       decoder; ``.json``; ``.pts.npy`` with ``allow_pickle=False``) -> optional recrop to a crop
       rule (``crop.rule_window``) -> transforms -> tensors -> :func:`collate` batches.

Nothing is ever unpickled; other tar members (``.depth.png`` and unknown ones) are skipped unread.

Epochs: a pass over a :class:`HeadPoseDataset` uses its epoch (``set_epoch``). A
:class:`HeadPoseLoader` (``make_loader``) moves to the next epoch each time it is iterated, also with
persistent DataLoader workers: every copy of the dataset counts the passes it has begun (each worker
process iterates its own copy once per epoch), so no message from the parent is needed.

DDP: with ``torch.distributed`` initialised and a world size above 1 (or ``distributed=True``),
shards are split by rank (``wds.split_by_node``) then by worker; with ``resampled=True`` every rank
and worker draws shards with replacement instead and ``samples_per_epoch`` (all ranks together)
gives every rank exactly the same number of batches, so no rank waits for another.

Determinism: each sample's generator is seeded from ``(seed, epoch, key)`` (plus rank, worker and
position in the stream when ``resampled``), and the shuffles from ``(seed, epoch, rank, worker)``
(the shard order from ``(seed, epoch)``, the same on every rank and worker). The same seed, epoch and
worker count give the same samples in the same order with the same augmentation; a sample's
augmentation does not depend on the worker count.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
from collections import Counter
from itertools import islice
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from webdataset import tariterators
from webdataset.shardlists import ResampledShards, SimpleShardList, expand_urls
from webdataset.utils import PipelineStage, pytorch_worker_info

from . import boxes as box_rules
from . import crop as crop_ops
from .augment import Compose

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_FORMATS",
    "NORMALIZATIONS",
    "HeadPoseDataset",
    "HeadPoseLoader",
    "make_dataset",
    "make_loader",
    "collate",
    "decode_image",
    "expand_shard_urls",
    "local_path",
    "normalize_images",
    "open_url",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``None``: RGB in [0, 1]; ``"imagenet"``: RGB, /255, ImageNet mean/std; ``"raw_bgr"``: BGR 0-255
#: floats (FSA-Net's input).
NORMALIZATIONS = (None, "imagenet", "raw_bgr")
#: ``"float"``: ``image`` normalised float (3, H, W); ``"uint8"``: ``image`` RGB uint8 (3, H, W), to
#: normalise later (e.g. on the GPU with :func:`normalize_images`); ``"jpeg"``: no decoding, ``jpeg``
#: (the stored bytes, uint8) and ``window`` (the crop to cut from the decoded stored image).
IMAGE_FORMATS = ("float", "uint8", "jpeg")

_WANTED_SUFFIXES = (".jpg", ".json", ".pts.npy")


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------
def expand_shard_urls(urls) -> list[str]:
    """A string (brace patterns, ``::``-separated lists), a path, or a list of those -> URLs
    (``~`` expanded for local paths)."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        for url in expand_urls(os.fspath(item)):
            out.append(os.path.expanduser(url) if _is_local(url) else url)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme == "" or len(scheme) == 1  # "C:\\..." parses as scheme "c"


def local_path(url: str) -> str | None:
    """The file path of a local shard URL (a path or ``file://``); None for anything remote."""
    if _is_local(url):
        return url
    if urlparse(url).scheme == "file":
        return urlparse(url).path
    return None


def open_url(url: str):
    """Open a shard for reading: webdataset's ``gopen`` for local paths, ``file:`` and the schemes
    it has a handler for (``pipe:``, ``http(s)``, ``gs``, ...), ``fsspec`` for everything else."""
    if _is_local(url):
        return open(url, "rb")
    if urlparse(url).scheme == "file" or urlparse(url).scheme in wds.gopen_schemes:
        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> H x W x 3 uint8 RGB."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("cannot decode image bytes")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def normalize_images(x: torch.Tensor, normalize: str | None) -> torch.Tensor:
    """RGB images ``(..., 3, H, W)`` with 0-255 values (uint8 or float, on any device) -> float32
    model input, contiguous, per ``normalize`` (one of :data:`NORMALIZATIONS`). ``x`` is not changed."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "raw_bgr":
        return x.flip(-3).to(torch.float32, memory_format=torch.contiguous_format)
    out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True).div_(255.0)
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=out.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=out.device).view(3, 1, 1)
        out = out.sub_(mean).div_(std)
    return out


# --------------------------------------------------------------------------------------------
# Pipeline stages (module-level classes so a DataLoader can send them to worker processes)
# --------------------------------------------------------------------------------------------
class _State:
    """Settings shared by the stages of one copy of the pipeline (each worker process has its own
    copy). ``epoch`` is the epoch of the next pass (``set_epoch``); with ``auto_epoch`` each pass
    this copy begins after that moves one epoch on; ``current`` is the epoch of the pass under way."""

    def __init__(self, seed: int, shuffle: int, resampled: bool, samples_per_epoch: int | None, distributed: bool,
                 auto_epoch: bool):
        self.seed = int(seed)
        self.shuffle = int(shuffle or 0)
        self.resampled = bool(resampled)
        self.samples_per_epoch = samples_per_epoch
        self.rank_info = pytorch_worker_info()[:2]  # (rank, world size) of the process that built it
        self.world = self.rank_info[1] if distributed else 1  # ranks sharing samples_per_epoch
        self.auto_epoch = bool(auto_epoch)
        self.granule = 1  # samples per batch: HeadPoseLoader gives each worker whole batches
        self.epoch = 0
        self.passes = 0
        self.current = 0

    def begin_pass(self) -> None:
        self.current = self.epoch + (self.passes if self.auto_epoch else 0)
        self.passes += 1

    def units_per_rank(self) -> int | None:
        """Batches (of ``granule`` samples) each rank yields per epoch; None: no fixed length."""
        if self.samples_per_epoch is None:
            return None
        return max(1, int(self.samples_per_epoch) // (self.world * self.granule))

    def worker_limit(self, worker: int, nworkers: int) -> int | None:
        units = self.units_per_rank()
        if units is None:
            return None
        return (units // nworkers + (1 if worker < units % nworkers else 0)) * self.granule


def _seed(*entropy: int) -> int:
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0])


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


class _ShardList(SimpleShardList):
    """webdataset's shard list, its order shuffled per epoch from ``(seed, epoch)`` only. Hand-seeded
    for determinism: every rank and worker must see the same order for ``split_by_node`` /
    ``split_by_worker`` to share it out disjointly, and webdataset's own shard shuffles
    (``detshuffle``) count their own passes, so they cannot follow ``set_epoch``."""

    def __init__(self, urls: list[str], state: _State):
        super().__init__(urls)
        self.state = state

    def __iter__(self):
        st = self.state
        self.seed = _seed(st.seed, st.current, 0) if st.shuffle > 1 else None
        return super().__iter__()


class _ResampledShards(ResampledShards):
    """webdataset's ``ResampledShards`` (deterministic: seeded from rank, worker, epoch and seed),
    drawing with this pass's epoch rather than its own pass count (so ``set_epoch`` works)."""

    def __init__(self, urls: list[str], state: _State):
        super().__init__(urls, seed=state.seed, deterministic=True)
        self.state = state

    def __iter__(self):
        self.epoch = self.state.current - 1  # ResampledShards adds one as it starts
        return super().__iter__()


def _wanted_member(fname: str) -> bool:
    return fname.endswith(_WANTED_SUFFIXES)


class _TarSamples(PipelineStage):
    """``{"url"}`` -> raw samples ``{"__key__", "__url__", "jpg", "json", "pts.npy"}``
    (:func:`open_url`, then webdataset's tar expander and key grouping)."""

    def __init__(self, handler: Callable[[Exception], bool]):
        self.handler = handler

    def run(self, src):
        for item in src:
            url = item["url"]
            try:
                stream = open_url(url)
            except Exception as exn:  # noqa: BLE001 - the handler decides
                exn.args = exn.args + (url,)
                if self.handler(exn):
                    continue
                raise
            try:
                files = tariterators.tar_file_expander(
                    [{"url": url, "stream": stream}], handler=self.handler, select_files=_wanted_member
                )
                yield from tariterators.group_by_keys(files, handler=self.handler)
            finally:
                stream.close()


class _Shuffle(PipelineStage):
    """webdataset's buffer shuffle (``wds.shuffle``) drawing from a generator seeded from
    ``(seed, epoch, rank, worker)``. Hand-seeded for determinism: ``wds.detshuffle`` seeds from
    seed + its own pass count only (the same draws on every rank and worker, deaf to ``set_epoch``)."""

    def __init__(self, state: _State):
        self.state = state

    def run(self, src):
        st = self.state
        if st.shuffle <= 1:
            return src
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(_seed(st.seed, st.current, rank, worker, 2))
        return wds.shuffle(st.shuffle, initial=min(100, st.shuffle), rng=rng)(iter(src))


def _cropped_record(record: dict, taken: list[int], stored_size, rule: str, size: int) -> dict:
    """The record of a crop of ``taken`` (stored-crop pixels) out of a ``stored_size`` stored crop."""
    w, h = stored_size
    crop = [float(v) for v in record["crop"]]
    sx, sy = (crop[2] - crop[0]) / w, (crop[3] - crop[1]) / h
    new = dict(record)
    new["crop"] = [crop[0] + taken[0] * sx, crop[1] + taken[1] * sy, crop[0] + taken[2] * sx, crop[1] + taken[3] * sy]
    new["crop_rule"] = rule
    new["crop_size"] = [size, size]
    return new


class _Decode(PipelineStage):
    """Raw sample -> ``{"image" | "jpeg"+"window", "angles", "key", "record", "landmarks",
    "landmarks_source"}``; each worker's share of ``samples_per_epoch`` when that is set."""

    def __init__(self, state: _State, transforms, crop_rule, size, crop_margin, normalize, image_format,
                 random_crop, handler):
        self.state = state
        self.transforms = transforms
        self.crop_rule = crop_rule
        self.size = size
        self.crop_margin = crop_margin
        self.normalize = normalize
        self.image_format = image_format
        self.random_crop = random_crop
        self.handler = handler

    def run(self, src):
        # No cv2.setNumThreads() here: in a forked worker it can block forever on the parent's
        # thread-pool state (OpenCV 5 / pthreads). Any cv2 call in a forked worker can block the same
        # way, hence make_loader's forkserver workers (see _worker_context).
        rank, _, worker, nworkers = pytorch_worker_info()
        limit = self.state.worker_limit(worker, nworkers)
        out = self._decode_all(src, rank, worker)
        return out if limit is None else islice(out, limit)

    def _decode_all(self, src, rank, worker):
        for index, raw in enumerate(src):
            try:
                yield self.decode(raw, rank, worker, index)
            except Exception as exn:  # noqa: BLE001 - the handler decides
                exn.args = exn.args + (f"sample {raw.get('__key__')!r} in {raw.get('__url__')!r}",)
                if self.handler(exn):
                    continue
                raise

    def decode(self, raw: dict, rank: int, worker: int, index: int) -> dict:
        st = self.state
        if "json" not in raw or "jpg" not in raw:
            missing = [s for s in ("jpg", "json") if s not in raw]
            raise ValueError(f"sample {raw.get('__key__')!r} has no {' or '.join(missing)} member")
        record = json.loads(raw["json"])
        key = str(record.get("key") or raw["__key__"])
        record.setdefault("augment", [])
        landmarks = None
        if "pts.npy" in raw:
            landmarks = np.load(io.BytesIO(raw["pts.npy"]), allow_pickle=False).astype(np.float32)
        entropy = [st.seed, st.current, _key_hash(key)]
        if st.resampled:
            entropy += [rank, worker, index]
        crop_seq, aug_seq = np.random.SeedSequence(entropy).spawn(2)
        if self.image_format == "jpeg":
            image, (w, h) = None, record["crop_size"]
        else:
            image = decode_image(raw["jpg"])
            h, w = image.shape[:2]
        size = self.size or w
        taken = [0, 0, w, h]
        if self.crop_rule is not None:
            rng = np.random.default_rng(crop_seq) if self.random_crop else None
            taken = crop_ops.recrop_window(record, self.crop_rule, (w, h), rng=rng, margin=self.crop_margin)
            record = _cropped_record(record, taken, (w, h), self.crop_rule, size)
        elif (w, h) != (size, size):
            record = dict(record, crop_size=[size, size])
        if image is not None and (taken != [0, 0, w, h] or (w, h) != (size, size)):
            image, _ = crop_ops.crop_and_resize(image, taken, size)  # what crop.recrop cuts
        if self.transforms is not None:
            image, record, landmarks = self.transforms(image, record, landmarks, np.random.default_rng(aug_seq))
        out_w, out_h = (size, size) if image is None else (image.shape[1], image.shape[0])
        sample = {
            "angles": torch.tensor([record["yaw"], record["pitch"], record["roll"]], dtype=torch.float32),
            "key": key,
            "record": record,
            "landmarks": None if landmarks is None
            else box_rules.to_crop_coords(landmarks, record["crop"], (out_w, out_h)).astype(np.float32),
            "landmarks_source": landmarks,
        }
        if image is None:
            sample["jpeg"] = torch.frombuffer(bytearray(raw["jpg"]), dtype=torch.uint8)
            sample["window"] = torch.tensor(taken, dtype=torch.int64)
        else:
            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            sample["image"] = chw.contiguous() if self.image_format == "uint8" else normalize_images(chw, self.normalize)
        return sample


class _WorkerEnv:
    """``worker_init_fn``: gives a worker process the rank and world size of the process that built
    the dataset as ``RANK`` / ``WORLD_SIZE``, where webdataset's stages (``split_by_node``,
    ``ResampledShards``' seed) and the shuffle seeds read them: a worker started by ``forkserver`` or
    ``spawn`` has no process group and the environment of whoever started its server."""

    def __init__(self, rank_info: tuple[int, int], inner=None):
        self.rank, self.world = (int(v) for v in rank_info)
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        if self.world > 1:
            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(self.rank), str(self.world)
        else:
            os.environ.pop("RANK", None)
            os.environ.pop("WORLD_SIZE", None)
        if self.inner is not None:
            self.inner(worker_id)


def _worker_context(name: str | None):
    """The ``multiprocessing`` context for DataLoader workers. ``"forkserver"`` (the default of
    :func:`make_loader`): workers are forked from a clean server process with this module (torch,
    cv2, webdataset) already imported. A plain ``fork`` copies the parent's cv2 thread pool in
    whatever state it is in, and a worker can then block forever on a mutex a pool thread held at
    that moment (seen in ``cv2.resize`` right after the parent ran cv2 itself)."""
    if name != "forkserver":
        return name
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # only read when the server starts
    return ctx


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
class HeadPoseDataset(wds.DataPipeline):
    """The pipeline :func:`make_dataset` returns (a ``webdataset.DataPipeline``, an
    ``IterableDataset``). ``set_epoch(e)`` picks the next pass's shuffle and augmentation; with
    ``auto_epoch`` later passes of the same copy move on by one epoch each."""

    def __init__(self, stages, state: _State, urls: list[str]):
        super().__init__(*stages)
        self.state = state
        self.urls = urls

    def __iter__(self):
        self.state.begin_pass()
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        self.state.epoch = int(epoch)
        self.state.passes = 0

    @property
    def epoch(self) -> int:
        """The epoch the next pass of this copy will use."""
        st = self.state
        return st.epoch + (st.passes if st.auto_epoch else 0)


def _distributed_world() -> int:
    """World size of an initialised ``torch.distributed`` process group (1 without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def make_dataset(
    urls,
    *,
    transforms=None,
    crop_rule: str | None = None,
    size: int | None = None,
    shuffle: int = 1000,
    seed: int = 0,
    resampled: bool = False,
    normalize: str | None = None,
    crop_margin: float = 0.0,
    samples_per_epoch: int | None = None,
    handler: Callable[[Exception], bool] | None = None,
    image_format: str = "float",
    random_crop: bool = True,
    distributed: bool | None = None,
    auto_epoch: bool = False,
) -> HeadPoseDataset:
    """A streaming dataset of decoded samples (dicts) from WebDataset shards.

    ``urls``: a path/URL, brace pattern (``out/train-{000000..000003}.tar``), ``::``-separated
    list, or a list of those. ``transforms``: one transform or a list (composed), called as
    ``t(image, record, landmarks, rng)`` (see :mod:`dataprep.augment`). ``crop_rule``: re-crop
    each stored crop to that rule (``boxes.CROP_RULES``) at ``size`` (default: the stored width);
    ``size`` alone resizes. ``random_crop``: draw the rule's random parameters (Hopenet's k) per
    sample; False takes the rule's fixed values (evaluation). ``shuffle``: buffer size (also
    shuffles shard order); 0 or 1 keeps file order. ``resampled``: draw shards with replacement
    forever (bound an epoch with ``samples_per_epoch``). ``samples_per_epoch``: samples per epoch,
    all ranks together (each rank yields ``samples_per_epoch // world_size``). ``normalize``: one of
    :data:`NORMALIZATIONS`. ``image_format``: one of :data:`IMAGE_FORMATS` (``"uint8"`` and
    ``"jpeg"`` leave ``normalize`` to the caller; ``"jpeg"`` takes no transforms and needs
    ``size``). ``distributed``: split the shards by rank (``wds.split_by_node``); None: when
    ``torch.distributed`` is initialised with a world size above 1. ``auto_epoch``: each pass of a
    copy of the dataset moves one epoch on, which is what reaches persistent ``DataLoader`` workers
    (their copies live on); workers started afresh each epoch begin at ``set_epoch``'s epoch
    (:class:`HeadPoseLoader` does both).
    ``handler``: what to do with a bad shard/sample, e.g. ``webdataset.warn_and_continue``
    (default: raise).

    Each sample: ``image`` tensor (3, H, W) (``image_format`` "float": float, normalised; "uint8":
    RGB uint8) or ``jpeg`` (the stored JPEG bytes, uint8) and ``window`` (int64 x1, y1, x2, y2: the
    crop to cut from the decoded stored image, pixels outside it black, then resize to ``size``);
    ``angles`` float tensor (yaw, pitch, roll) degrees, ``key``, ``record`` (after recrop/transforms;
    ``crop`` is the source window the image covers, floats after a recrop), ``landmarks`` (68, 2)
    float32 in model-input pixels or None, ``landmarks_source`` (68, 2) in source pixels or None.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_format != "float" and normalize is not None:
        raise ValueError(f"image_format={image_format!r} leaves normalisation to the caller; pass normalize=None")
    if crop_rule is not None and crop_rule not in box_rules.CROP_RULES:
        raise ValueError(f"unknown crop rule {crop_rule!r}; choose one of {sorted(box_rules.CROP_RULES)}")
    if size is not None and int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if image_format == "jpeg" and (transforms or size is None):
        raise ValueError("image_format='jpeg' keeps the images undecoded: it needs size= and takes no transforms")
    if samples_per_epoch is not None and int(samples_per_epoch) < 1:
        raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
    if isinstance(transforms, (list, tuple)):
        transforms = Compose(transforms)
    handler = handler or wds.reraise_exception
    url_list = expand_shard_urls(urls)
    if distributed is None:
        distributed = _distributed_world() > 1
    state = _State(seed, shuffle, resampled, samples_per_epoch, bool(distributed), auto_epoch)
    if resampled:
        # every rank and worker draws its own shards (seeded apart): nothing to split
        source = [_ResampledShards(url_list, state)]
    else:
        source = [_ShardList(url_list, state), wds.split_by_node if distributed else None, wds.split_by_worker]
    stages = source + [
        _TarSamples(handler),
        _Shuffle(state),
        _Decode(state, transforms, crop_rule, None if size is None else int(size), crop_margin, normalize,
                image_format, bool(random_crop), handler),
    ]
    return HeadPoseDataset([s for s in stages if s is not None], state, url_list)


def collate(samples: Sequence[dict]) -> dict:
    """Samples -> batch: ``image`` (B, 3, H, W) or ``jpeg`` (list) + ``window`` (B, 4); ``angles``
    (B, 3); ``key`` / ``record`` / ``landmarks_source`` lists; when any sample has landmarks,
    ``landmarks`` (B, L, 2) model-input pixels (zeros where missing) and ``landmarks_mask`` (B,) bool
    (samples whose landmarks have the batch's most common shape)."""
    batch: dict[str, Any] = {
        "angles": torch.stack([s["angles"] for s in samples]),
        "key": [s["key"] for s in samples],
        "record": [s["record"] for s in samples],
        "landmarks_source": [s["landmarks_source"] for s in samples],
    }
    if "image" in samples[0]:
        sizes = {tuple(s["image"].shape) for s in samples}
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes {sorted(sizes)} in one batch; pass size= (or crop_rule= and size=)")
        batch["image"] = torch.stack([s["image"] for s in samples])
    if "jpeg" in samples[0]:
        batch["jpeg"] = [s["jpeg"] for s in samples]
        batch["window"] = torch.stack([s["window"] for s in samples])
    shapes = [s["landmarks"].shape for s in samples if s["landmarks"] is not None]
    if shapes:
        shape = Counter(shapes).most_common(1)[0][0]
        landmarks = np.zeros((len(samples),) + shape, np.float32)
        mask = np.zeros(len(samples), bool)
        for i, s in enumerate(samples):
            if s["landmarks"] is not None and s["landmarks"].shape == shape:
                landmarks[i], mask[i] = s["landmarks"], True
        batch["landmarks"] = torch.from_numpy(landmarks)
        batch["landmarks_mask"] = torch.from_numpy(mask)
    return batch


class HeadPoseLoader(DataLoader):
    """A ``DataLoader`` over a :class:`HeadPoseDataset` that moves to the next epoch each time it is
    iterated (epochs 0, 1, 2, ...; ``set_epoch`` picks the next one). Persistent workers count the
    epochs themselves; ``set_epoch`` then only works before the first pass (or to the epoch that
    comes next anyway). Each worker yields whole batches of its share of ``samples_per_epoch``.

    ``batches_per_epoch``: batches per epoch on this rank when the length is fixed (resampled with
    ``samples_per_epoch``), else None; ``samples``: free for the caller (None)."""

    def __init__(self, dataset: HeadPoseDataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.worker_init_fn = _WorkerEnv(dataset.state.rank_info, self.worker_init_fn)
        dataset.state.granule = int(self.batch_size or 1)
        dataset.state.auto_epoch = True  # what reaches persistent workers: their copies count passes
        self._next_epoch = 0
        self.samples: int | None = None
        st = dataset.state
        self.batches_per_epoch: int | None = st.units_per_rank() if st.resampled else None

    def _workers_follow_themselves(self) -> bool:
        return bool(self.persistent_workers and self.num_workers > 0 and self._iterator is not None)

    def set_epoch(self, epoch: int) -> None:
        if self._workers_follow_themselves() and int(epoch) != self._next_epoch:
            raise RuntimeError(f"the persistent workers are started and go on to epoch {self._next_epoch}; "
                               f"set_epoch({epoch}) cannot reach them (call it before the first pass)")
        self._next_epoch = int(epoch)

    def __iter__(self):
        if not self._workers_follow_themselves():
            self.dataset.set_epoch(self._next_epoch)  # the copies made for this pass start there
        self._next_epoch += 1
        return super().__iter__()


def make_loader(
    urls,
    batch_size: int,
    *,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
    multiprocessing_context: str | None = "forkserver",
    **dataset_kwargs,
) -> HeadPoseLoader:
    """A torch ``DataLoader`` over :func:`make_dataset` (same keyword arguments) yielding
    :func:`collate` batches. Workers split the shards (unless ``resampled``), so use at most as many
    as there are shards; ``persistent_workers`` keeps them between epochs. Workers start from a
    ``forkserver`` by default (see ``_worker_context``: a forked worker can hang in cv2); pass
    ``multiprocessing_context="fork"`` (or ``None``, the platform's default) to fork them."""
    dataset = make_dataset(urls, **dataset_kwargs)
    extra = {}
    if workers > 0:
        extra["persistent_workers"] = bool(persistent_workers)
        extra["multiprocessing_context"] = _worker_context(multiprocessing_context)
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return HeadPoseLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        drop_last=drop_last, pin_memory=pin_memory, **extra,
    )
