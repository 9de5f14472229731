"""The streaming dataset: :func:`make_dataset` puts the stages together (a ``webdataset.DataPipeline``)."""
from __future__ import annotations

from typing import Callable

import cv2
import torch
import webdataset as wds

from .. import boxes as box_rules
from ..augment import Compose
from .images import IMAGE_FORMATS, NORMALIZATIONS
from .stages import _Decode, _ResampledShards, _ShardList, _Shuffle, _State
from .tar_reader import _TarSamples
from .urls import expand_shard_urls, require_local_shards


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
    interpolation: int | None = cv2.INTER_LINEAR,
    exact_cut: bool = False,
) -> HeadPoseDataset:
    """A streaming dataset of decoded samples (dicts) from WebDataset shards.

    ``urls``: a path/URL, brace pattern (``out/train-{000000..000003}.tar``), ``::``-separated
    list, or a list of those. ``transforms``: one transform or a list (composed), called as
    ``t(image, record, landmarks, rng)`` (see :mod:`dataprep.augment`). ``crop_rule``: re-crop
    each stored crop to that rule (``boxes.CROP_RULES``) at ``size`` (default: the stored width);
    what the stored crop does not hold comes out black (``crop.rule_coverage``; build with
    ``--margin boxes.ROOM_MARGIN[rule]``). ``size`` alone resizes. ``random_crop``: draw the
    rule's random parameters (Hopenet's k) per sample; False takes the rule's fixed values
    (evaluation). ``shuffle``: buffer size (also
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
    (default: raise). ``interpolation``: the OpenCV interpolation of the load-time crop/resize
    (default bilinear, ``cv2.INTER_LINEAR``, as training pipelines resize; ``None``: the build's
    choice, ``INTER_AREA`` when shrinking, about 4x slower). ``exact_cut``: False (default):
    where the window is at least twice ``size`` each way (FSA-Net's 64 px from 224 px crops) the
    JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain and the window cut from that exactly
    (a sub-pixel warp), and a window reaching past the stored crop is snapped by under one output
    pixel per padded edge so that only the image's part is resized (:func:`crop.cut_window`; the
    record's ``crop`` is the snapped window); True: :func:`crop.crop_and_resize` of the integer
    window on the whole decoded image, its pixels exactly (about 15% slower for Hopenet's window).

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
    url_list = expand_shard_urls(urls)
    if handler is None:
        require_local_shards(url_list)
    handler = handler or wds.reraise_exception
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
                image_format, bool(random_crop), handler, interpolation, bool(exact_cut)),
    ]
    return HeadPoseDataset([s for s in stages if s is not None], state, url_list)
