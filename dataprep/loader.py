"""Streaming loader for training code: shards -> (recrop) -> augment -> batches.

Minimal use in any PyTorch code::

    from dataprep.loader import make_loader
    from dataprep.augment import Compose, RandomApply, HorizontalFlip, GaussianBlur

    aug = Compose([RandomApply(HorizontalFlip(), 0.5), RandomApply(GaussianBlur(), 0.3)])
    loader = make_loader("out/train-{000000..000003}.tar", batch_size=64, workers=4,
                         crop_rule="hopenet", size=224, transforms=aug, normalize="imagenet")
    for epoch in range(epochs):
        for batch in loader:            # a new epoch's shuffle and augmentation each pass
            images, angles = batch["image"], batch["angles"]   # (B,3,H,W) float, (B,3) yaw,pitch,roll

Pipeline (a :class:`webdataset.DataPipeline`): shard list (shuffled per epoch, split by rank and
worker) -> open each shard (local paths, ``file://``, brace patterns, any scheme webdataset's
``gopen`` knows such as ``pipe:``/``http(s)``, otherwise ``fsspec`` e.g. ``s3://``, ``gs://``,
``memory://``) -> group tar members into samples -> buffer shuffle -> decode (``.jpg`` with cv2,
``.json``, ``.pts.npy`` with ``allow_pickle=False``) -> optional ``crop.recrop`` to a crop rule ->
transforms -> tensors. Nothing is ever unpickled; other tar members (``.depth.png`` and unknown
ones) are skipped without being read.

Determinism: each sample's generator is seeded from ``(seed, epoch, key)`` (plus rank, worker and
position in the stream when ``resampled``), and the shuffles from ``(seed, epoch, rank, worker)``.
The same seed, epoch and worker count give the same samples in the same order with the same
augmentation; a sample's augmentation does not depend on the worker count. ``make_loader`` moves to
the next epoch every time it is iterated; with ``make_dataset`` call ``dataset.set_epoch(e)``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from itertools import islice
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset import tariterators
from webdataset.shardlists import expand_urls
from webdataset.utils import PipelineStage, pytorch_worker_info

from . import boxes as box_rules
from . import crop as crop_ops
from .augment import Compose

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "HeadPoseDataset",
    "HeadPoseLoader",
    "make_dataset",
    "make_loader",
    "collate",
    "expand_shard_urls",
    "open_url",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``None``: RGB in [0, 1]; ``"imagenet"``: RGB, /255, ImageNet mean/std; ``"raw_bgr"``: BGR 0-255
#: floats (FSA-Net's input).
NORMALIZATIONS = (None, "imagenet", "raw_bgr")

_WANTED_SUFFIXES = (".jpg", ".json", ".pts.npy")


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------
def expand_shard_urls(urls) -> list[str]:
    """A string (brace patterns, ``::``-separated lists), a path, or a list of those -> URLs."""
    if isinstance(urls, (str, os.PathLike)):
        items = [os.fspath(urls)]
    else:
        items = [os.fspath(u) for u in urls]
    out: list[str] = []
    for item in items:
        for url in expand_urls(item):
            out.append(os.path.expanduser(url) if _is_local(url) else url)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme == "" or len(scheme) == 1  # "C:\\..." parses as scheme "c"


def open_url(url: str):
    """Open a shard for reading: webdataset's ``gopen`` for local paths, ``file:`` and the schemes
    it has a handler for (``pipe:``, ``http(s)``, ``gs``, ...), ``fsspec`` for everything else."""
    scheme = urlparse(url).scheme
    if _is_local(url):
        return open(url, "rb")
    if scheme == "file" or scheme in wds.gopen_schemes:
        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


# --------------------------------------------------------------------------------------------
# Pipeline stages (module-level classes so a DataLoader can send them to worker processes)
# --------------------------------------------------------------------------------------------
class _State:
    """Settings shared by the stages of one pipeline; ``epoch`` moves with ``set_epoch``."""

    def __init__(self, seed: int, shuffle: int, resampled: bool, samples_per_epoch: int | None):
        self.seed = int(seed)
        self.epoch = 0
        self.shuffle = int(shuffle or 0)
        self.resampled = bool(resampled)
        self.samples_per_epoch = samples_per_epoch


def _worker() -> tuple[int, int, int, int]:
    return pytorch_worker_info()  # rank, world_size, worker, num_workers


class _ShardSource(IterableDataset):
    """Yields ``{"url": ...}``: this rank's and worker's share of the shards for the epoch."""

    def __init__(self, urls: list[str], state: _State):
        super().__init__()
        self.urls = list(urls)
        self.state = state

    def __iter__(self):
        st = self.state
        rank, world, worker, nworkers = _worker()
        if st.resampled:
            rng = np.random.default_rng([st.seed, st.epoch, rank, worker, 1])
            while True:
                yield {"url": self.urls[int(rng.integers(len(self.urls)))]}
        urls = list(self.urls)
        if st.shuffle > 1:
            order = np.random.default_rng([st.seed, st.epoch, 0]).permutation(len(urls))
            urls = [urls[i] for i in order]
        for url in urls[rank::world][worker::nworkers]:
            yield {"url": url}


def _wanted_member(fname: str) -> bool:
    return fname.endswith(_WANTED_SUFFIXES)


class _TarSamples(PipelineStage):
    """``{"url"}`` -> raw samples ``{"__key__", "__url__", "jpg", "json", "pts.npy"}``."""

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
    """Buffer shuffle seeded from ``(seed, epoch, rank, worker)``: the buffer grows to ``shuffle``
    samples; yielding starts once it holds ``min(100, shuffle)`` (quick start, as webdataset)."""

    def __init__(self, state: _State):
        self.state = state

    def run(self, src):
        st = self.state
        if st.shuffle <= 1:
            yield from src
            return
        rank, _, worker, _ = _worker()
        rng = np.random.default_rng([st.seed, st.epoch, rank, worker, 2])
        initial = min(100, st.shuffle)
        buf: list = []
        for sample in src:
            buf.append(sample)
            if len(buf) > st.shuffle or (len(buf) > initial and rng.random() < 0.5):
                i = int(rng.integers(len(buf)))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        for i in rng.permutation(len(buf)):
            yield buf[i]


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _to_tensor(image: np.ndarray, normalize: str | None) -> torch.Tensor:
    if normalize == "raw_bgr":
        image = image[:, :, ::-1]
    # one pass: uint8 HWC -> float32 CHW, contiguous
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    if normalize == "raw_bgr":
        return t
    t = t.div_(255.0)
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        t = t.sub_(mean).div_(std)
    return t


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> H x W x 3 uint8 RGB."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("cannot decode image bytes")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _recrop(image: np.ndarray, record: dict, rule: str, size: int, seq: np.random.SeedSequence, margin: float):
    """``crop.recrop`` to ``rule``, plus the record updated to the window it actually covers."""
    out = crop_ops.recrop(image, record, rule, size, rng=np.random.default_rng(seq), margin=margin)
    # the same window recrop took (same box choice, same generator state for Hopenet's random k)
    box_name = record.get("box_source", "gt")
    if box_name == "gt":
        box_name = box_rules.RULE_GT_BOX.get(rule, "gt")
    face = record["boxes"].get(box_name) or record["box"]
    window = box_rules.crop_window(
        rule, face, dataset=record["dataset"], image_size=record["image_size"],
        rng=np.random.default_rng(seq), margin=margin,
    )
    h, w = image.shape[:2]
    crop = [float(v) for v in record["crop"]]
    taken = box_rules.integer_window(box_rules.box_to_crop_coords(window, crop, (w, h)))
    sx, sy = (crop[2] - crop[0]) / w, (crop[3] - crop[1]) / h
    new = dict(record)
    new["crop"] = [crop[0] + taken[0] * sx, crop[1] + taken[1] * sy, crop[0] + taken[2] * sx, crop[1] + taken[3] * sy]
    new["crop_rule"] = rule
    new["crop_size"] = [int(out.shape[1]), int(out.shape[0])]
    return out, new


def _resize(image: np.ndarray, record: dict, size: int):
    h, w = image.shape[:2]
    if (w, h) == (size, size):
        return image, record
    interp = cv2.INTER_AREA if (w > size or h > size) else cv2.INTER_LINEAR
    out = cv2.resize(image, (size, size), interpolation=interp)
    new = dict(record)
    new["crop_size"] = [size, size]
    return out, new


class _Decode(PipelineStage):
    """Raw sample -> ``{"image", "angles", "key", "record", "landmarks", "landmarks_source"}``."""

    def __init__(self, state: _State, transforms, crop_rule, size, crop_margin, normalize, handler):
        self.state = state
        self.transforms = transforms
        self.crop_rule = crop_rule
        self.size = size
        self.crop_margin = crop_margin
        self.normalize = normalize
        self.handler = handler

    def run(self, src):
        st = self.state
        rank, _, worker, nworkers = _worker()
        # No cv2.setNumThreads() here: in a forked worker it can block forever on the parent's
        # thread-pool state (seen with OpenCV 5 / pthreads); cv2's own pool is fork-safe to use.
        limit = st.samples_per_epoch
        if limit is not None:
            limit = limit // nworkers + (1 if worker < limit % nworkers else 0)
        out = self._decode_all(src, st, rank, worker)
        return out if limit is None else islice(out, limit)

    def _decode_all(self, src, st, rank, worker):
        for index, raw in enumerate(src):
            try:
                yield self.decode(raw, st, rank, worker, index)
            except Exception as exn:  # noqa: BLE001 - the handler decides
                exn.args = exn.args + (f"sample {raw.get('__key__')!r} in {raw.get('__url__')!r}",)
                if self.handler(exn):
                    continue
                raise

    def decode(self, raw: dict, st: _State, rank: int, worker: int, index: int) -> dict:
        if "json" not in raw or "jpg" not in raw:
            missing = [s for s in ("jpg", "json") if s not in raw]
            raise ValueError(f"sample {raw.get('__key__')!r} has no {' or '.join(missing)} member")
        record = json.loads(raw["json"])
        key = str(record.get("key") or raw["__key__"])
        record.setdefault("augment", [])
        image = decode_image(raw["jpg"])
        landmarks = None
        if "pts.npy" in raw:
            landmarks = np.load(io.BytesIO(raw["pts.npy"]), allow_pickle=False).astype(np.float32)
        entropy = [st.seed, st.epoch, _key_hash(key)]
        if st.resampled:
            entropy += [rank, worker, index]
        crop_seq, aug_seq = np.random.SeedSequence(entropy).spawn(2)
        if self.crop_rule is not None:
            image, record = _recrop(image, record, self.crop_rule, self.size or image.shape[1], crop_seq, self.crop_margin)
        elif self.size is not None:
            image, record = _resize(image, record, self.size)
        if self.transforms is not None:
            image, record, landmarks = self.transforms(image, record, landmarks, np.random.default_rng(aug_seq))
        h, w = image.shape[:2]
        return {
            "image": _to_tensor(image, self.normalize),
            "angles": torch.tensor([record["yaw"], record["pitch"], record["roll"]], dtype=torch.float32),
            "key": key,
            "record": record,
            "landmarks": None if landmarks is None
            else box_rules.to_crop_coords(landmarks, record["crop"], (w, h)).astype(np.float32),
            "landmarks_source": landmarks,
        }


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
class HeadPoseDataset(wds.DataPipeline):
    """The pipeline :func:`make_dataset` returns (a ``webdataset.DataPipeline``, an
    ``IterableDataset``). ``set_epoch(e)`` picks the epoch's shuffle and augmentation."""

    def __init__(self, stages, state: _State, urls: list[str]):
        super().__init__(*stages)
        self.state = state
        self.urls = urls

    def set_epoch(self, epoch: int) -> None:
        self.state.epoch = int(epoch)

    @property
    def epoch(self) -> int:
        return self.state.epoch


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
) -> HeadPoseDataset:
    """A streaming dataset of decoded samples (dicts) from WebDataset shards.

    ``urls``: a path/URL, brace pattern (``out/train-{000000..000003}.tar``), ``::``-separated
    list, or a list of those. ``transforms``: one transform or a list (composed), called as
    ``t(image, record, landmarks, rng)`` (see :mod:`dataprep.augment`). ``crop_rule``: re-crop
    each stored crop to that rule (``boxes.CROP_RULES``) at ``size`` (default: the stored width);
    ``size`` alone resizes. ``shuffle``: buffer size (also shuffles shard order); 0 or 1 keeps file
    order. ``resampled``: draw shards with replacement forever (bound an epoch with
    ``samples_per_epoch``, counted per process). ``normalize``: one of :data:`NORMALIZATIONS`.
    ``handler``: what to do with a bad shard/sample, e.g. ``webdataset.warn_and_continue``
    (default: raise).

    Each sample: ``image`` float tensor (3, H, W), ``angles`` float tensor (yaw, pitch, roll)
    degrees, ``key``, ``record`` (after recrop/transforms; ``crop`` is the source window the image
    covers, floats after a recrop), ``landmarks`` (68, 2) float32 in image pixels or None,
    ``landmarks_source`` (68, 2) in source pixels or None.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if crop_rule is not None and crop_rule not in box_rules.CROP_RULES:
        raise ValueError(f"unknown crop rule {crop_rule!r}; choose one of {sorted(box_rules.CROP_RULES)}")
    if size is not None and int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if isinstance(transforms, (list, tuple)):
        transforms = Compose(transforms)
    handler = handler or wds.reraise_exception
    url_list = expand_shard_urls(urls)
    state = _State(seed, shuffle, resampled, samples_per_epoch)
    stages = [
        _ShardSource(url_list, state),
        _TarSamples(handler),
        _Shuffle(state),
        _Decode(state, transforms, crop_rule, None if size is None else int(size), crop_margin, normalize, handler),
    ]
    return HeadPoseDataset(stages, state, url_list)


def collate(samples: Sequence[dict]) -> dict:
    """Samples -> batch: ``image`` (B, 3, H, W), ``angles`` (B, 3), ``key`` / ``record`` /
    ``landmarks_source`` lists, and ``landmarks`` (B, 68, 2) image pixels when every sample has them."""
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes {sorted(sizes)} in one batch; pass size= (or crop_rule= and size=)")
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "angles": torch.stack([s["angles"] for s in samples]),
        "key": [s["key"] for s in samples],
        "record": [s["record"] for s in samples],
        "landmarks_source": [s["landmarks_source"] for s in samples],
    }
    if samples and all(s["landmarks"] is not None for s in samples):
        batch["landmarks"] = torch.from_numpy(np.stack([s["landmarks"] for s in samples]))
    return batch


class HeadPoseLoader(DataLoader):
    """A ``DataLoader`` that moves its dataset to the next epoch each time it is iterated
    (epochs 0, 1, 2, ...; ``set_epoch`` picks the next one)."""

    def __init__(self, dataset: HeadPoseDataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __iter__(self):
        self.dataset.set_epoch(self._next_epoch)
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
    **dataset_kwargs,
) -> HeadPoseLoader:
    """A torch ``DataLoader`` over :func:`make_dataset` (same keyword arguments) yielding
    :func:`collate` batches. Workers split the shards, so use at most as many as there are shards."""
    dataset = make_dataset(urls, **dataset_kwargs)
    extra = {}
    if workers > 0 and prefetch_factor is not None:
        extra["prefetch_factor"] = prefetch_factor
    return HeadPoseLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        drop_last=drop_last, pin_memory=pin_memory, **extra,
    )
