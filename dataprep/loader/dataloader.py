"""The ``DataLoader`` side: :func:`make_loader`, :class:`HeadPoseLoader` (an epoch per pass, batches
lent from the workers' buffers) and how its worker processes start."""
from __future__ import annotations

import functools
import gc
import itertools
import multiprocessing
import os
import weakref

import torch
from torch.utils.data import DataLoader

from .batches import _collate_items, _FinishedBatches, _forget_buffers
from .dataset import HeadPoseDataset, make_dataset, whole_number
from .stages import _ShardList
from .tar_reader import EMPTY_SHARDS_HINT, NoSamples
from .urls import recorded_shard_lengths


class _WorkerEnv:
    """``worker_init_fn``: gives a worker process the rank and world size of the process that built
    the dataset as ``RANK`` / ``WORLD_SIZE``, where webdataset's stages (``split_by_node``,
    ``ResampledShards``' seed) and the shuffle seeds read them: a worker started by ``forkserver`` or
    ``spawn`` has no process group and the environment of whoever started its server. Also freezes
    the worker's objects so far out of the cyclic garbage collector's way (``gc.freeze``)."""

    def __init__(self, rank_info: tuple[int, int], inner=None):
        self.rank, self.world = (int(v) for v in rank_info)
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        # What the worker imported lives as long as it does: out of the cyclic collector's way, so
        # that its full collections (set off by the many small dicts of the label records) do not
        # walk torch's objects again and again (~0.1 s each).
        gc.freeze()
        # One OpenCV thread per worker, as torch has one (the DataLoader sets it): OpenCV's pool
        # threads spin between its calls and took a second core per worker (twice the CPU time on
        # 64 px warps). Read when OpenCV first runs parallel code, which in a worker started from
        # the forkserver is after this; no cv2.setNumThreads here (see _Decode.run).
        os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")
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
    ctx.set_forkserver_preload(["dataprep.loader"])  # the whole package; read when the server starts
    return ctx


_LOADER_IDS = itertools.count(1)


class HeadPoseLoader(DataLoader):
    """A ``DataLoader`` over a :class:`HeadPoseDataset` that moves to the next epoch each time it is
    iterated (epochs 0, 1, 2, ...; ``set_epoch`` picks the next one). Persistent workers count the
    epochs themselves; ``set_epoch`` then only works before the first pass (or to the epoch that
    comes next anyway). Each worker yields whole batches of its share of ``samples_per_epoch``.

    ``batches_per_epoch``: batches per epoch on this rank when the length is fixed (resampled with
    ``samples_per_epoch``), else None; ``samples``: free for the caller (None); ``skipped``: what the
    handler passed over this epoch (or the last), all workers together (:attr:`HeadPoseDataset.skipped`).
    An epoch that ends without a sample raises :class:`NoSamples` (see :meth:`_no_batch`)."""

    def __init__(self, dataset: HeadPoseDataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.worker_init_fn = _WorkerEnv(dataset.state.rank_info, self.worker_init_fn)
        dataset.state.granule = int(self.batch_size or 1)
        # make_loader's collate: workers write finished images (float normalised, or uint8) into
        # reused batch buffers, lent to the main process without a copy (see _Batch)
        dataset.state.assemble = bool(self.batch_size) and self.collate_fn is _collate_items
        # batches a worker can have out at once: prefetched, being made, held by the main process
        dataset.state.buffers = int(self.prefetch_factor or 2) + 4 if self.num_workers else 3
        dataset.state.loader_id = self._loader_id = next(_LOADER_IDS)
        # a row of skip counts per worker, shared with them (see skipped)
        skipped = torch.zeros((max(1, self.num_workers), dataset.state.skipped.shape[1]), dtype=torch.int64)
        dataset.state.skipped = skipped.share_memory_() if self.num_workers else skipped
        if self.collate_fn is _collate_items:
            self.collate_fn = functools.partial(_collate_items, loader_id=self._loader_id)
        weakref.finalize(self, _forget_buffers, self._loader_id, True)
        dataset.state.auto_epoch = True  # what reaches persistent workers: their copies count passes
        self._next_epoch = 0
        self.samples: int | None = None
        st = dataset.state
        self.batches_per_epoch: int | None = st.units_per_rank() if st.resampled else None

    def batches_in_epoch(self, epoch: int, shard_samples) -> int:
        """Batches this rank yields in ``epoch`` when each shard is read once (not ``resampled``),
        from the samples in each shard (in the order of the dataset's URLs). The workers share out
        that epoch's shard order and each ends on its own partial batch (dropped with
        ``drop_last``), so with several workers an epoch can hold fewer full batches than
        ``samples // batch_size``, and how many depends on the epoch's shard order."""
        st = self.dataset.state
        if st.resampled:
            raise ValueError("a resampled loader has batches_per_epoch batches every epoch")
        urls = self.dataset.urls
        if len(shard_samples) != len(urls):
            raise ValueError(f"{len(shard_samples)} shard counts for {len(urls)} shards")
        count = dict(zip(urls, shard_samples))
        order = _ShardList.epoch_order(urls, st, int(epoch))
        rank, world = st.rank_info
        if st.world > 1:  # split_by_node
            order = order[rank::world]
        batch, workers = int(self.batch_size), max(1, self.num_workers)
        total = 0
        for worker in range(workers):  # split_by_worker
            n = sum(count[u] for u in order[worker::workers])
            total += n // batch + (0 if self.drop_last or n % batch == 0 else 1)
        return total

    def __len__(self) -> int:
        """Batches per epoch where that is fixed (resampled with ``samples_per_epoch``: what
        schedulers and progress bars ask ``len()`` for); a loader reading each shard once has no
        fixed length (:meth:`batches_in_epoch` counts an epoch's)."""
        if self.batches_per_epoch is None:
            raise TypeError("this loader reads each shard once, so its epochs have no fixed length: "
                            "count one with batches_in_epoch(epoch, shard_samples), or make it with "
                            "resampled=True and samples_per_epoch")
        return self.batches_per_epoch

    def _workers_follow_themselves(self) -> bool:
        return bool(self.persistent_workers and self.num_workers > 0 and self._iterator is not None)

    def set_epoch(self, epoch: int) -> None:
        if self._workers_follow_themselves() and int(epoch) != self._next_epoch:
            raise RuntimeError(f"the persistent workers are started and go on to epoch {self._next_epoch}; "
                               f"set_epoch({epoch}) cannot reach them (call it before the first pass)")
        self._next_epoch = int(epoch)

    @property
    def skipped(self) -> dict[str, int]:
        """:attr:`HeadPoseDataset.skipped` of this epoch (or the last finished), all workers together."""
        return self.dataset.skipped

    def __iter__(self):
        if not self._workers_follow_themselves():
            self.dataset.set_epoch(self._next_epoch)  # the copies made for this pass start there
            _forget_buffers(self._loader_id)  # the buffers of workers of earlier passes
        self._next_epoch += 1
        # the last epoch's counts go before any worker starts this one (each zeroes its row as it does)
        self.dataset.state.skipped.zero_()
        return _FinishedBatches(super().__iter__(), functools.partial(self._no_batch, self._next_epoch - 1))

    def _no_batch(self, epoch: int) -> NoSamples | None:
        """What a pass that ended without a batch says, where its shards held no sample: a training
        or evaluation loop over it would do nothing, without a word. With ``drop_last`` only where
        their ``_info.json`` says so (else the samples may have been too few for a batch, as asked)."""
        urls = self.dataset.urls
        if self.drop_last:
            recorded = recorded_shard_lengths(urls)
            if len(recorded) < len(urls) or sum(recorded.values()):
                return None
        where = f"{urls[0]}" if len(urls) == 1 else f"{len(urls)} shards ({urls[0]}, ...)"
        rank, world = self.dataset.state.rank_info
        if self.dataset.state.world > 1:
            where += f" on rank {rank} of {world}"
        skipped = self.skipped
        passed = f"; the handler skipped {skipped} (loader.skipped)" if any(skipped.values()) else ""
        return NoSamples(f"epoch {epoch} gave no sample from {where} ({EMPTY_SHARDS_HINT}){passed}")


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
    """A torch ``DataLoader`` over :func:`make_dataset` (same keyword arguments) yielding batches as
    :func:`collate` makes them (``image`` float normalised by default, made in the workers and lent
    to the main process without a copy: see :mod:`dataprep.loader`). Workers split the shards (unless
    ``resampled``), so use at most as many as there are shards; ``persistent_workers`` keeps them
    (and their batch buffers) between epochs: recommended for training, a worker start-up costs
    seconds. Workers start from a ``forkserver`` by default (see ``_worker_context``: a forked
    worker can hang in cv2); pass ``multiprocessing_context="fork"`` (or ``None``, the platform's
    default) to fork them."""
    whole_number("batch_size", batch_size)
    dataset = make_dataset(urls, **dataset_kwargs)
    extra = {}
    if workers > 0:
        extra["persistent_workers"] = bool(persistent_workers)
        extra["multiprocessing_context"] = _worker_context(multiprocessing_context)
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return HeadPoseLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate_items,
        drop_last=drop_last, pin_memory=pin_memory, **extra,
    )
