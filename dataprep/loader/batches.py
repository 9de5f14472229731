"""Batches under a :class:`HeadPoseLoader`: images written into reused shared-memory buffers in the
workers, lent to the main process without a copy; and :func:`collate` for plain sample dicts."""
from __future__ import annotations

import itertools
import math
import os
import threading
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ..boxes import points_to_input_pixels
from ..labels import mirror_offset
from ..processes import pid_alive


class _Item:
    """One decoded sample on its way into a batch (cheaper than the sample dict). ``image`` is
    H x W x 3 uint8 (``bgr`` or RGB) until :meth:`_Decode._assemble` writes it into ``buffer`` at
    ``slot``; ``jpeg`` holds the stored bytes for ``image_format="jpeg"``. ``landmarks_source``
    (source pixels) are mapped into the ``out_size`` = (w, h) model input through ``record["crop"]``
    when the batch is made (:meth:`landmarks`, or all of a batch's at once in :func:`_collate_items`)."""

    __slots__ = ("image", "bgr", "jpeg", "window", "key", "record", "angles", "landmarks_source", "out_size",
                 "buffer", "slot")

    def __init__(self, *, image, bgr, jpeg, window, key, record, angles, landmarks_source, out_size):
        self.image, self.bgr, self.jpeg, self.window = image, bgr, jpeg, window
        self.key, self.record, self.angles = key, record, angles
        self.landmarks_source, self.out_size = landmarks_source, out_size
        self.buffer, self.slot = None, 0

    def landmarks(self) -> np.ndarray | None:
        """The landmarks in model-input pixels (float32; pixel j's centre at j), or None."""
        if self.landmarks_source is None:
            return None
        return _batch_landmarks([self.landmarks_source], [self.record], [self.out_size])["landmarks"][0]


def _common_shape(arrays: list) -> tuple[tuple[int, ...], np.ndarray] | None:
    """The most common shape among ``arrays`` (None entries skipped) and the (B,) bool mask of the
    arrays that have it; None when all are None. Both batch makers stack landmarks by it."""
    shapes = [a.shape for a in arrays if a is not None]
    if not shapes:
        return None
    shape = tuple(Counter(shapes).most_common(1)[0][0])
    return shape, np.array([a is not None and a.shape == shape for a in arrays], bool)


def _batch_landmarks(sources: list, records: list, sizes: list) -> dict:
    """``landmarks`` (B, L, 2) float32 model-input pixels (pixel j's centre at j; zeros where
    missing) and ``landmarks_mask`` (B,) of the samples whose source landmarks have the batch's most
    common shape; {} when none has any. All mapped at once through each record's ``crop``, from its
    dataset's coordinates (:func:`boxes.points_to_input_pixels`); points as rows of 2."""
    sources = [None if s is None else np.asarray(s).reshape(-1, 2) for s in sources]
    common = _common_shape(sources)
    if common is None:
        return {}
    shape, mask = common
    rows = np.flatnonzero(mask)
    landmarks = np.zeros((len(sources),) + shape, np.float32)
    landmarks[rows] = points_to_input_pixels(np.stack([sources[i] for i in rows]), [records[i]["crop"] for i in rows],
                                             [sizes[i] for i in rows],
                                             [mirror_offset(records[i].get("dataset", "")) for i in rows])
    return {"landmarks": landmarks, "landmarks_mask": mask}


def _fence() -> None:
    """A full memory barrier (a lock round trip): between the last use of a batch buffer and
    handing it back through its flag, and between taking a buffer back and writing into it."""
    with _FENCE:
        pass


_FENCE = threading.Lock()


class _BatchBuffer:
    """``images`` (B, 3, H, W) of ``dtype`` and one ``flag`` byte after them, in one uint8 tensor
    (in shared memory in a DataLoader worker). ``flag`` is 1 from :meth:`_BufferPool.acquire` until
    the batch is done with in the main process (see :class:`_Lent`). ``ident``: (worker pid,
    serial), how later batches name a buffer the main process already has (``sent``); only
    ``pooled`` buffers (kept for reuse) are named. ``forget``: idents of buffers the pool dropped,
    for the main process to drop too (sent with this buffer's next batch)."""

    __slots__ = ("tensor", "images", "flag", "nbytes", "ident", "sent", "pooled", "forget")
    _serials = itertools.count()

    def __init__(self, shape: tuple[int, ...], dtype, shared: bool):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        tensor = torch.empty(nbytes + 64, dtype=torch.uint8)
        if shared:
            tensor.share_memory_()
        array = tensor.numpy()
        self.tensor, self.nbytes = tensor, nbytes
        self.ident, self.sent, self.pooled, self.forget = (os.getpid(), next(self._serials)), False, False, []
        self.images = array[:nbytes].view(dtype).reshape(shape)
        self.flag = array[nbytes:nbytes + 1]


class _BufferPool:
    """A worker's batch buffers, used again once the main process is done with them: a buffer in
    shared memory costs its page faults once, not on every batch (fresh shared memory for each
    float batch took longer than decoding its JPEGs). Never waits: with no free buffer it makes
    another (keeping at most ``limit``)."""

    def __init__(self, limit: int = 6):
        self.limit = limit
        self.buffers: list[_BatchBuffer] = []
        self.shared = get_worker_info() is not None

    def acquire(self, shape: tuple[int, ...], dtype) -> _BatchBuffer:
        for buffer in self.buffers:
            if buffer.flag[0] == 0 and buffer.images.shape == shape and buffer.images.dtype == dtype:
                _fence()
                buffer.flag[0] = 1
                return buffer
        buffer = _BatchBuffer(shape, dtype, self.shared)
        buffer.flag[0] = 1
        if len(self.buffers) >= self.limit:  # replace one of another shape, else keep this one out
            stale = next((b for b in self.buffers if b.images.shape != shape or b.images.dtype != dtype), None)
            if stale is None:
                return buffer  # used once: not pooled, so never named (the main process keeps no copy)
            self.buffers.remove(stale)
            if stale.sent:
                buffer.forget.append(stale.ident)
        buffer.pooled = True
        self.buffers.append(buffer)
        return buffer


class _Lent(np.ndarray):
    """The images of a batch, lent from a pooled buffer: ``torch.from_numpy`` keeps this array for
    as long as the tensor's memory is in use (views, ``.numpy()``, DLPack included), and when it
    goes, :meth:`__del__` hands the buffer back to its worker (``_flag`` to 0)."""

    def __del__(self):
        flag = self.__dict__.get("_flag")
        if flag is not None:
            try:
                _fence()
                flag[0] = 0
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


def _collate_items(items: Sequence, loader_id: int = 0) -> dict:
    """:class:`HeadPoseLoader`'s ``collate_fn`` (in the worker): items -> a :class:`_Batch` (the
    batch buffer and plain arrays: what crosses to the main process); sample dicts -> :func:`collate`."""
    if not isinstance(items[0], _Item):
        return collate(items)
    n = len(items)
    batch = _Batch(
        angles=np.array([it.angles for it in items], np.float32).reshape(n, 3),
        key=[it.key for it in items],
        record=[it.record for it in items],
        landmarks_source=[it.landmarks_source for it in items],
    )
    buffer = items[0].buffer
    if buffer is not None and all(it.buffer is buffer and it.slot == i for i, it in enumerate(items)):
        batch["_count"], batch["_flag_at"] = n, buffer.nbytes
        # a pooled shared buffer crosses to the main process once; later batches only name it
        # (sending a shared tensor costs a socket connection to this worker per batch, for its file
        # descriptor)
        if buffer.sent:
            batch["_buffer_ident"] = (loader_id,) + buffer.ident
        else:
            batch["_buffer"] = buffer.tensor
            if buffer.pooled and get_worker_info() is not None:
                batch["_buffer_ident"], buffer.sent = (loader_id,) + buffer.ident, True
        if buffer.forget:
            batch["_forget"], buffer.forget = [(loader_id,) + ident for ident in buffer.forget], []
        batch["_shape"], batch["_dtype"] = buffer.images.shape[1:], buffer.images.dtype.str
    elif any(it.buffer is not None or it.image is not None for it in items):
        sizes: dict[tuple, str] = {}  # size -> the first sample of that size
        for it in items:
            sizes.setdefault(tuple(it.buffer.images.shape[2:] if it.buffer is not None else it.image.shape[:2]), it.key)
        if len(sizes) > 1:
            shown = ", ".join(f"{(3,) + s} (e.g. {k})" for s, k in sorted(sizes.items()))
            raise ValueError(f"images of different sizes in one batch: {shown}: shards of builds with different "
                             "--crop-size (pass size=, or crop_rule= and size=), or transforms that change an "
                             "image's size (make them keep it)")
        raise RuntimeError("batch buffers out of step with the DataLoader's batches")  # pragma: no cover
    if items[0].jpeg is not None:
        data = [it.jpeg for it in items]
        batch["_jpeg"] = np.frombuffer(bytearray(b"".join(data)), np.uint8)
        batch["_jpeg_ends"] = np.cumsum([len(d) for d in data]).tolist()
        batch["window"] = np.array([it.window for it in items], np.int64).reshape(n, 4)
    batch.update(_batch_landmarks([it.landmarks_source for it in items], [it.record for it in items],
                                  [it.out_size for it in items]))
    return batch


#: Batch buffers the main process has received from workers: loader id -> {(pid, serial): tensor}.
#: Dropped with their loader, and a dead worker's at each new pass (:func:`_forget_buffers`).
_RECEIVED: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
_RECEIVED_LOCK = threading.Lock()  # the pin-memory thread receives too


def _rebuild_batch(content: dict) -> _Batch:
    ident = content.pop("_buffer_ident", None)
    forget = content.pop("_forget", ())
    with _RECEIVED_LOCK:
        for gone in forget:
            _RECEIVED.get(gone[0], {}).pop(tuple(gone[1:]), None)
        if ident is not None:
            loader_id, key = ident[0], tuple(ident[1:])
            known = _RECEIVED.setdefault(loader_id, {})
            if "_buffer" in content:
                known[key] = content["_buffer"]
            elif key in known:
                content["_buffer"] = known[key]
            else:
                raise RuntimeError(f"a batch names buffer {key} of DataLoader worker pid {key[0]}, which this "
                                   "process never received (batches of one loader read in another process?)")
    batch = _Batch(content)
    batch._received = True
    return batch


def _forget_buffers(loader_id: int, all_of_them: bool = False) -> None:
    """Drop the received buffers of ``loader_id``'s workers that are gone (all: the loader is)."""
    with _RECEIVED_LOCK:
        known = _RECEIVED.get(loader_id)
        if known is None:
            return
        if all_of_them:
            del _RECEIVED[loader_id]
            return
        for key in [k for k in known if not pid_alive(k[0])]:
            del known[key]


class _Batch(dict):
    """A batch as it leaves a worker: the images in a pooled buffer (``_buffer``: ``_count`` images
    of ``_shape`` and ``_dtype``, flag byte at ``_flag_at``), other fields as numpy arrays.
    :meth:`finish` (in the main process: :class:`HeadPoseLoader`'s iterator, or the DataLoader's
    pin-memory thread) makes the user's batch. A received batch dropped unfinished (an epoch left
    early) hands its buffer back."""

    _received = False
    _finished = False

    def __reduce__(self):
        return _rebuild_batch, (dict(self),)

    def pin_memory(self, device=None) -> dict:  # called by the DataLoader's pin-memory thread
        return self.finish(pin=True)

    def __del__(self):
        if self._received and not self._finished and "_buffer" in self:
            try:
                _fence()
                self["_buffer"][self["_flag_at"]] = 0
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def finish(self, pin: bool = False) -> dict:
        """The user's batch: ``image`` a tensor over the buffer, lent until the last reference to it
        goes (:class:`_Lent`; with ``pin``, a page-locked copy and the buffer back at once), tensors
        for the arrays, ``jpeg`` a list of byte tensors."""
        out = {k: v for k, v in self.items() if not k.startswith("_")}
        self._finished = True
        if "_buffer" in self:
            array = self["_buffer"].numpy()
            n, shape, dtype, flag_at = self["_count"], tuple(self["_shape"]), np.dtype(self["_dtype"]), self["_flag_at"]
            images = array[:n * math.prod(shape) * dtype.itemsize].view(dtype).reshape((n,) + shape)
            flag = array[flag_at:flag_at + 1]
            if pin:
                out["image"] = _pinned(torch.from_numpy(images))
                _fence()
                flag[0] = 0
            else:
                lent = images.view(_Lent)
                lent._flag = flag
                out["image"] = torch.from_numpy(lent)
        if "_jpeg" in self:
            data, ends = torch.from_numpy(self["_jpeg"]), self["_jpeg_ends"]
            data = _pinned(data) if pin else data
            out["jpeg"] = [data[a:b] for a, b in zip([0] + ends[:-1], ends)]
        for name in ("angles", "window", "landmarks", "landmarks_mask"):
            if name in out:
                out[name] = torch.from_numpy(out[name])
                if pin:
                    out[name] = _pinned(out[name])
        return out


def _pinned(x: torch.Tensor) -> torch.Tensor:
    """A page-locked copy (the DataLoader's ``pin_memory``)."""
    return x.pin_memory()


class _FinishedBatches:
    """The iterator of a :class:`HeadPoseLoader`: the DataLoader's batches, finished. ``no_batch``:
    called when the pass ends without a single batch, the exception to raise then (or None)."""

    def __init__(self, inner, no_batch=None):
        self.inner = inner
        self.no_batch = no_batch
        self.batches = 0

    def __iter__(self):
        return self

    def __len__(self):
        return len(self.inner)

    def __next__(self):
        try:
            batch = next(self.inner)
        except StopIteration:
            error = self.no_batch() if self.batches == 0 and self.no_batch is not None else None
            if error is not None:
                raise error from None
            raise
        self.batches += 1
        return batch.finish() if isinstance(batch, _Batch) else batch

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


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
    mapped = [s["landmarks"] for s in samples]
    common = _common_shape(mapped)
    if common is not None:
        shape, mask = common
        landmarks = np.zeros((len(samples),) + shape, np.float32)
        for i in np.flatnonzero(mask):
            landmarks[i] = mapped[i]
        batch["landmarks"] = torch.from_numpy(landmarks)
        batch["landmarks_mask"] = torch.from_numpy(mask)
    return batch
