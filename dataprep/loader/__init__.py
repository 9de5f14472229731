"""Streaming loader for training code: shards -> (recrop) -> augment -> batches.

The one streaming implementation of the project: ``train_minimal.data`` is a thin user of it.
Minimal use in any PyTorch code::

    from dataprep.loader import make_loader
    from dataprep.augment import Compose, RandomApply, HorizontalFlip, GaussianBlur

    aug = Compose([RandomApply(HorizontalFlip(), 0.5), RandomApply(GaussianBlur(), 0.3)])
    loader = make_loader("out/train-{000000..000003}.tar", batch_size=64, workers=4,
                         persistent_workers=True, crop_rule="hopenet", size=224, transforms=aug,
                         normalize="imagenet")
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
       ``memory://``) -> tar members grouped into samples (webdataset's rules, tar headers parsed
       here: ``_tar_files``; compressed shards go through ``tarfile``)
    -> buffer shuffle (wds.shuffle) -> decode (``.jpg`` through ``dataprep.codec``: libjpeg-turbo, OpenCV's pixels; or kept as bytes for a GPU
       decoder; ``.json``; ``.pts.npy`` with ``allow_pickle=False``) -> optional recrop to a crop
       rule (``crop.rule_window``; bilinear resize, JPEGs decoded at 1/2-1/8 scale where the window
       is at least twice the output, a window past the stored crop snapped so only the stored
       crop's part is resized: ``crop.cut_window``) -> transforms -> tensors -> :func:`collate` batches.

Nothing is ever unpickled; other tar members (``.depth.png`` and unknown ones) are skipped unread.

Batches of a :func:`make_loader` (:class:`HeadPoseLoader`): each worker writes every image, finished
(float normalised, or uint8), straight into its batch's buffer, one of a few it keeps in shared
memory and uses again (:class:`_BufferPool`: fresh shared memory for every batch cost more page
faults than the JPEG decoding); the main process gets the batch as one tensor over that buffer
with no copy and no work (a buffer's memory crosses once, with its first batch; later batches name
it), and the buffer goes back to its worker when the last reference to that tensor goes
(:class:`_Lent`). With ``pin_memory`` the pin-memory thread copies it to page-locked
memory and hands it back at once. Keeping batches (``list(loader)``) is fine: a worker then makes
new buffers. ``image_format="uint8"`` sends a quarter of the bytes and leaves normalising to the
caller (e.g. on the GPU with :func:`normalize_images`).

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

Modules, one per stage of that pipeline: ``urls`` (expanding and opening shard URLs),
``tar_reader`` (tar members -> raw samples), ``stages`` (seeded shard lists and shuffle, the decode
stage), ``images`` (decoding, reduced-scale cuts, normalising into a batch), ``batches`` (shared
batch buffers lent to the main process, :func:`collate`), ``dataset`` (:func:`make_dataset`) and
``dataloader`` (:func:`make_loader`, worker start-up).
"""
from __future__ import annotations

from .batches import collate
from .dataloader import HeadPoseLoader, make_loader
from .dataset import HeadPoseDataset, make_dataset
from .images import IMAGE_FORMATS, IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS, decode_image, normalize_images
from .tar_reader import BadSample, NoSamples, UnreadableShard, shard_error_line
from .urls import brace_pattern, expand_shard_urls, local_path, open_url, require_local_shards

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_FORMATS",
    "NORMALIZATIONS",
    "HeadPoseDataset",
    "HeadPoseLoader",
    "BadSample",
    "NoSamples",
    "UnreadableShard",
    "make_dataset",
    "make_loader",
    "brace_pattern",
    "collate",
    "decode_image",
    "expand_shard_urls",
    "local_path",
    "normalize_images",
    "open_url",
    "require_local_shards",
    "shard_error_line",
]
