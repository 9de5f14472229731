"""The streaming dataset: :func:`make_dataset` puts the stages together (a ``webdataset.DataPipeline``)."""
from __future__ import annotations

import numbers
from typing import Callable

import cv2
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from .. import boxes as box_rules
from ..augment import Compose
from .images import IMAGE_FORMATS, NORMALIZATIONS
from .stages import SKIPPED_FIELDS, _Decode, _ResampledShards, _ShardList, _Shuffle, _State
from .tar_reader import _TarSamples
from .urls import expand_shard_urls, recorded_shard_lengths, require_local_shards


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

    @property
    def skipped(self) -> dict[str, int]:
        """What the handler (e.g. ``webdataset.warn_and_continue``) passed over in the pass under way
        or the last one: ``samples`` (unusable samples skipped), ``shards`` (shards skipped wholly or
        from a damage on: unopenable, unreadable, short of their recorded samples) and ``missing``
        (the samples those shards lacked against the counts their folder's ``_info.json`` records,
        where it records them). All zero with the default handler, which raises instead. Counted in
        this process, and under a :class:`HeadPoseLoader` in all its workers too."""
        return dict(zip(SKIPPED_FIELDS, (int(n) for n in self.state.skipped.sum(0))))


def _distributed_world() -> int:
    """World size of an initialised ``torch.distributed`` process group (1 without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


#: The default shuffle buffer (samples), also what ``shuffle=True`` means.
DEFAULT_SHUFFLE = 1000


def whole_number(name: str, value) -> int:
    """``value`` as a whole number >= 1; 2.7, "64" or None is a mistake, not a size."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def _optional_count(name: str, value) -> int | None:
    """:func:`whole_number`, None staying None."""
    return None if value is None else whole_number(name, value)


def _shuffle_buffer(shuffle) -> int:
    """``shuffle`` as a buffer size: ``True`` (as in ``DataLoader(shuffle=True)``) is the default
    1000, ``False`` / None file order."""
    if shuffle is None or shuffle is False:
        return 0
    if shuffle is True:
        return DEFAULT_SHUFFLE
    if not isinstance(shuffle, numbers.Integral) or shuffle < 0:
        raise ValueError(f"shuffle is a buffer size (0 or 1: file order; True: {DEFAULT_SHUFFLE}), got {shuffle!r}")
    return int(shuffle)


def _check_transforms(transforms) -> None:
    """Each transform an object called per sample (``dataprep.augment.HorizontalFlip()``): a class
    or a name would otherwise fail at the first sample, inside a worker."""
    for t in transforms:
        if isinstance(t, type):
            raise TypeError(f"transforms takes transform objects, got the class {t.__name__}; pass {t.__name__}()")
        if not callable(t):
            raise TypeError(f"transforms takes transform objects (e.g. dataprep.augment.HorizontalFlip()), got {t!r}")


def make_dataset(
    urls,
    *,
    transforms=None,
    crop_rule: str | None = None,
    size: int | None = None,
    shuffle: int | bool = DEFAULT_SHUFFLE,
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
    rule's random parameters (Hopenet's k and view) per sample; False takes the rule's fixed values
    (evaluation). ``shuffle``: buffer size (also
    shuffles shard order); 0 or 1 keeps file order; ``True``: the default 1000. ``crop_margin``: the
    ``"square"`` rule's margin (``boxes.square_pad``). ``resampled``: draw shards with replacement
    forever (bound an epoch with ``samples_per_epoch``). ``samples_per_epoch``: samples per epoch,
    all ranks together (each rank yields ``samples_per_epoch // world_size``; through
    :class:`HeadPoseLoader`, ``max(1, samples_per_epoch // (world_size * batch_size))`` whole batches);
    without ``resampled`` it is a cap, each worker stopping at its share or at the end of its shards,
    so an epoch can come out shorter (resample for an exact count). ``normalize``: one of
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
    float32 in model-input pixels, pixel ``j``'s centre at ``j`` (converted from the dataset's own
    coordinates: :func:`boxes.points_to_input_pixels`), or None, ``landmarks_source`` (68, 2) in
    source pixels as the record has them, or None.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_format != "float" and normalize is not None:
        raise ValueError(f"image_format={image_format!r} leaves normalisation to the caller; pass normalize=None")
    if crop_rule is not None and crop_rule not in box_rules.CROP_RULES:
        raise ValueError(f"unknown crop rule {crop_rule!r}; choose one of {sorted(box_rules.CROP_RULES)}")
    size = _optional_count("size", size)
    shuffle = _shuffle_buffer(shuffle)
    if crop_margin < 0 or (crop_margin and crop_rule != "square"):
        raise ValueError(f"crop_margin={crop_margin!r}: a margin >= 0, for crop_rule='square' only (the other "
                         "rules' windows have their own margins)")
    if image_format == "jpeg" and (transforms or size is None):
        raise ValueError("image_format='jpeg' keeps the images undecoded: it needs size= and takes no transforms")
    samples_per_epoch = _optional_count("samples_per_epoch", samples_per_epoch)
    if isinstance(transforms, (list, tuple)):
        _check_transforms(transforms)
        transforms = Compose(transforms)
    elif transforms is not None:
        _check_transforms([transforms])
    url_list = expand_shard_urls(urls)
    if handler is None:
        require_local_shards(url_list)
    handler = handler or wds.reraise_exception
    if distributed is None:
        distributed = _distributed_world() > 1
    if distributed and not resampled:
        world = pytorch_worker_info()[1]
        if len(url_list) < world:
            idle = f"rank {world - 1}" if len(url_list) == world - 1 else f"ranks {len(url_list)}-{world - 1}"
            raise ValueError(
                f"{len(url_list)} shard(s) for {world} ranks: without resampling each rank reads whole shards "
                f"(rank r: shards r, r + {world}, ...), so {idle} would get none and "
                "DDP would wait on them for ever; pass resampled=True with samples_per_epoch (every rank the same "
                "number of samples), or build more, smaller shards (--shard-size)")
    state = _State(seed, shuffle, resampled, samples_per_epoch, bool(distributed), auto_epoch)
    if resampled:
        # every rank and worker draws its own shards (seeded apart): nothing to split
        source = [_ResampledShards(url_list, state)]
    else:
        source = [_ShardList(url_list, state), wds.split_by_node if distributed else None, wds.split_by_worker]
    stages = source + [
        _TarSamples(handler, recorded_shard_lengths(url_list), state),
        _Shuffle(state),
        _Decode(state, transforms, crop_rule, size, float(crop_margin), normalize,
                image_format, bool(random_crop), handler, interpolation, bool(exact_cut)),
    ]
    return HeadPoseDataset([s for s in stages if s is not None], state, url_list)
