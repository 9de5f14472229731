"""The pipeline's own stages and their shared settings (module-level classes, so a DataLoader can
send them to worker processes): seeded shard lists, the seeded buffer shuffle, and the decode stage
(raw sample -> image cut to the crop rule, record, landmarks)."""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
from itertools import islice

import cv2
import numpy as np
import orjson
import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from webdataset.shardlists import ResampledShards, SimpleShardList
from webdataset.utils import PipelineStage, pytorch_worker_info

from .. import boxes as box_rules
from .. import codec, labels
from .. import crop as crop_ops
from ..errors import first_line
from .batches import _BufferPool, _Item
from .images import _decode_bgr, _reduction, _warp_reduced, _write_image
from .tar_reader import BadSample, NoSamples


#: What :attr:`HeadPoseDataset.skipped` counts: unusable samples a handler skipped, shards it passed
#: over (wholly or from a damage on), and the samples those shards lacked against their recorded counts.
SKIPPED_FIELDS = ("samples", "shards", "missing")


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
        self.assemble = False  # HeadPoseLoader: _Decode yields _Items written into batch buffers
        self.buffers = 6  # batch buffers a worker keeps for reuse (HeadPoseLoader: prefetch + 4)
        self.loader_id = 0  # HeadPoseLoader: the main process's key for the buffers it received
        self.epoch = 0
        self.passes = 0
        self.current = 0
        # per process iterating this pipeline (HeadPoseLoader: a row per worker, in shared memory),
        # what its handler passed over this pass: SKIPPED_FIELDS. Each row is written by its own
        # process only, so no lock; the main process adds them up (HeadPoseDataset.skipped)
        self.skipped = torch.zeros((1, len(SKIPPED_FIELDS)), dtype=torch.int64)

    def begin_pass(self) -> None:
        self.current = self.epoch + (self.passes if self.auto_epoch else 0)
        self.passes += 1
        self.skip_counts()[:] = 0

    def skip_counts(self) -> np.ndarray:
        """This process's row of ``skipped`` (a DataLoader worker's by its id), to add to; a row of
        its own, counted but never seen, for a worker of a DataLoader that made no row for it."""
        info = get_worker_info()
        row = 0 if info is None else info.id
        counts = self.skipped.numpy()
        return counts[row] if row < len(counts) else np.zeros(len(SKIPPED_FIELDS), np.int64)

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
    """A 64-bit seed from integers (stable across processes and runs; ~1 us, it runs per sample)."""
    text = ",".join(str(int(e)) for e in entropy).encode("ascii")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


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
        self.seed = self.epoch_seed(self.state, self.state.current)
        return super().__iter__()

    @staticmethod
    def epoch_seed(state: _State, epoch: int) -> int | None:
        """The seed of ``epoch``'s shard order (None: file order)."""
        return _seed(state.seed, epoch, 0) if state.shuffle > 1 else None

    @classmethod
    def epoch_order(cls, urls: list[str], state: _State, epoch: int) -> list[str]:
        """The shards in the order every rank and worker reads them in ``epoch`` (before splitting)."""
        return [s["url"] for s in SimpleShardList(urls, seed=cls.epoch_seed(state, epoch))]


class _ResampledShards(ResampledShards):
    """webdataset's ``ResampledShards`` (deterministic: seeded from rank, worker, epoch and seed),
    drawing with this pass's epoch rather than its own pass count (so ``set_epoch`` works)."""

    def __init__(self, urls: list[str], state: _State):
        super().__init__(urls, seed=state.seed, deterministic=True)
        self.state = state

    def __iter__(self):
        self.epoch = self.state.current - 1  # ResampledShards adds one as it starts
        return super().__iter__()


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
    new = dict(record)
    new["crop"] = box_rules.box_from_crop_coords(taken, record["crop"], stored_size)
    new["crop_rule"] = rule
    new["crop_size"] = [size, size]
    return new


#: Unusable samples in a row after which a stream stops with :class:`NoSamples` although its
#: handler skips them (a resampled stream over nothing usable would draw samples forever).
BAD_SAMPLES_IN_A_ROW = 1000


def _check_record(record) -> None:
    """ValueError naming the field when a label record lacks what the loader reads, or has it in
    another form: finite yaw, pitch and roll, the ``crop`` window (four numbers), ``crop_size`` (two
    positive whole numbers). Checked here, per sample, so that a bad record is a :class:`BadSample`
    naming it (a handler can skip it) instead of NaN labels or an error while the batch is made."""
    if not isinstance(record, dict):
        raise ValueError(f"the label record is a JSON {type(record).__name__}, not an object")
    for angle in ("yaw", "pitch", "roll"):
        problem = labels.angle_problem(record, angle)
        if problem:
            raise ValueError(problem)
    crop = record.get("crop")
    if not (isinstance(crop, list) and len(crop) == 4 and all(map(labels.finite_number, crop))):
        raise ValueError(f"record crop is {crop!r}, not a window [x1, y1, x2, y2]")
    size = record.get("crop_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"record crop_size is {size!r}, not [width, height] in pixels")


def _load_json(data: bytes):
    """A label record: ``orjson`` (7x faster than ``json``, the same values), and ``json`` for what
    only it accepts (``NaN``: our writer never emits it, other tools' might)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


_NPY_HEADERS: dict[bytes, tuple] = {}


def _load_npy(data: bytes) -> np.ndarray:
    """``np.load(io.BytesIO(data), allow_pickle=False)`` of ``.npy`` bytes, with each header parsed
    once (every sample's landmarks have the same header). Returns a new, writable array."""
    if data[:6] == b"\x93NUMPY" and data[6:8] in (b"\x01\x00", b"\x02\x00"):
        end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
        known = _NPY_HEADERS.get(data[:end])
        if known is None and len(_NPY_HEADERS) < 64:
            stream = io.BytesIO(data)
            version = np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(stream)
            if not dtype.hasobject and stream.tell() == end:
                known = _NPY_HEADERS[data[:end]] = (dtype, shape, fortran)
        if known is not None:
            dtype, shape, fortran = known
            count = math.prod(shape)
            if len(data) - end == count * dtype.itemsize:
                flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
                return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")
    return np.load(io.BytesIO(data), allow_pickle=False)


class _Decode(PipelineStage):
    """Raw sample -> ``{"image" | "jpeg"+"window", "angles", "key", "record", "landmarks",
    "landmarks_source"}``; each worker's share of ``samples_per_epoch`` when that is set.

    Under a :class:`HeadPoseLoader` (``state.assemble``) it yields :class:`_Item` instead: the image
    is written straight into its batch's buffer (float model input or uint8 RGB planes) and
    :func:`_collate_items` makes the batch (see :class:`_Batch`)."""

    def __init__(self, state: _State, transforms, crop_rule, size, crop_margin, normalize, image_format,
                 random_crop, handler, interpolation, exact_cut):
        self.state = state
        self.transforms = transforms
        self.crop_rule = crop_rule
        self.size = size
        self.crop_margin = crop_margin
        self.normalize = normalize
        self.image_format = image_format
        self.random_crop = random_crop
        self.handler = handler
        self.interpolation = interpolation
        self.exact_cut = exact_cut
        self._scratch: dict = {}

    def run(self, src):
        # No cv2.setNumThreads() here: in a forked worker it can block forever on the parent's
        # thread-pool state (OpenCV 5 / pthreads). Any cv2 call in a forked worker can block the same
        # way, hence make_loader's forkserver workers (see _worker_context).
        rank, _, worker, nworkers = pytorch_worker_info()
        limit = self.state.worker_limit(worker, nworkers)
        items = self._decode_all(src, rank, worker)
        out = self._assemble(items) if self.state.assemble else map(self.sample_dict, items)
        return out if limit is None else islice(out, limit)

    def _decode_all(self, src, rank, worker):
        bad_in_a_row = 0
        skipped = self.state.skip_counts()
        for index, raw in enumerate(src):
            try:
                item = self.prepare(raw, rank, worker, index)
            except MemoryError:
                raise
            except Exception as exn:  # noqa: BLE001 - the handler decides
                where = f"sample {raw.get('__key__')!r} in {raw.get('__url__')}"
                if getattr(exn, "in_transforms", False):  # the caller's code failed, not the shard
                    err = BadSample(f"{where}: the transforms failed: {type(exn).__name__}: {first_line(exn)}; "
                                    "the error is in the transforms given to the loader, not in the shard")
                else:
                    err = BadSample(f"{where}: {type(exn).__name__}: {first_line(exn)}; check the shards with "
                                    "`dataprep verify` on their folder, or pass handler=webdataset.warn_and_continue "
                                    "to skip such samples")
                err.__cause__ = exn
                if not self.handler(err):
                    raise err from exn
                skipped[0] += 1
                bad_in_a_row += 1
                if bad_in_a_row >= BAD_SAMPLES_IN_A_ROW:  # a resampled stream of nothing usable: no end
                    raise NoSamples(f"{bad_in_a_row} samples in a row were skipped as unusable (the last: "
                                    f"{raw.get('__key__')!r} in {raw.get('__url__')}: {first_line(exn)}); check "
                                    "the shards with `dataprep verify` on their folder") from exn
                continue
            bad_in_a_row = 0
            yield item

    def prepare(self, raw: dict, rank: int, worker: int, index: int) -> _Item:
        """One raw sample -> an :class:`_Item` (image H x W x 3 uint8, BGR or RGB as ``bgr`` says):
        parse the record, decode and cut the image to the crop rule, then the user's transforms."""
        st = self.state
        if "json" not in raw or "jpg" not in raw:
            missing = [s for s in ("jpg", "json") if s not in raw]
            raise ValueError(f"sample {raw.get('__key__')!r} has no {' or '.join(missing)} member")
        record = _load_json(raw["json"])
        _check_record(record)
        key = raw["__key__"]
        if record.get("key", key) != key:  # two samples could then share a key in a batch
            raise ValueError(f"the record's key {record['key']!r} is not its member name's {key!r} (an edited or "
                             "merged shard?)")
        record.setdefault("augment", [])
        landmarks = None
        if "pts.npy" in raw:
            landmarks = _load_npy(raw["pts.npy"])
            if landmarks.dtype.kind not in "iuf" or landmarks.ndim != 2 or landmarks.shape[1] != 2:
                raise ValueError(f"landmarks (pts.npy) are {landmarks.dtype} of shape {landmarks.shape}, not "
                                 "points as rows of (x, y)")
            landmarks = landmarks.astype(np.float32, copy=False)
        entropy = [st.seed, st.current, _key_hash(key)]
        if st.resampled:
            entropy += [rank, worker, index]
        if self.image_format == "jpeg":  # left to the device: only the window is decided here
            stored = codec.header_size(raw["jpg"]) if codec.is_jpeg(raw["jpg"]) else None
            if stored is None:  # the device's decoder would fail on it later, naming no sample
                raise ValueError("the stored image is not a JPEG whose header reads (damaged?)")
            image, (w, h) = None, stored  # the picture's own size: a record may say another
            taken, size = self._window(record, w, h, entropy)
        else:
            image, taken, size, (w, h) = self._decode_and_cut(raw["jpg"], record, entropy)
        record = self._record_of(record, taken, w, h, size)
        bgr = True
        if self.transforms is not None:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            bgr = False
            aug_rng = np.random.default_rng(_seed(*entropy, 1))
            try:
                image, record, landmarks = self.transforms(image, record, landmarks, aug_rng)
                if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
                        and image.dtype == np.uint8):
                    got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
                    raise ValueError(f"they returned an image of {got}, not H x W x 3 uint8")
            except Exception as exn:
                exn.in_transforms = True  # named as the transforms' error (_decode_all), as tar_reader tags its own
                raise
        out_w, out_h = (size, size) if image is None else (image.shape[1], image.shape[0])
        return _Item(
            image=image, bgr=bgr, jpeg=raw["jpg"] if image is None else None, window=taken, key=key,
            record=record, angles=(record["yaw"], record["pitch"], record["roll"]), landmarks_source=landmarks,
            out_size=(out_w, out_h),
        )

    def _window(self, record: dict, w: int, h: int, entropy: list) -> tuple[list[int], int]:
        """The integer window to cut from a w x h stored image, and the output size. Random crop
        draws come from their own stream of the sample's ``entropy`` (a stdlib Random: a numpy
        Generator costs ~10 us to seed, per sample)."""
        if self.crop_rule is None:
            return [0, 0, w, h], self.size or w
        rng = random.Random(_seed(*entropy, 0)) if self.random_crop else None
        taken = crop_ops.recrop_window(record, self.crop_rule, (w, h), rng=rng, margin=self.crop_margin)
        return taken, self.size or w

    def _decode_and_cut(self, data: bytes, record: dict, entropy: list):
        """The stored image decoded and cut to its window: ``(image, window taken, output size,
        stored (w, h))``. A JPEG whose window is at least twice the output size each way is decoded
        at reduced scale and warped; otherwise decoded whole and cut (:func:`crop.cut_window`)."""
        stored, planned = record.get("crop_size"), None
        if self.size is not None and not self.exact_cut and stored is not None and codec.is_jpeg(data):
            w, h = stored = (int(stored[0]), int(stored[1]))
            planned = self._window(record, w, h, entropy)
            f = _reduction(planned[0], planned[1], self.interpolation)
            if f > 1:
                image = _decode_bgr(data, f)
                if image.shape[:2] == (-(-h // f), -(-w // f)):
                    taken, size = planned
                    return _warp_reduced(image, taken, size, f, self.interpolation), taken, size, (w, h)
                # else the record's crop_size is not the image's: decode it whole
        image = _decode_bgr(data)
        h, w = image.shape[:2]
        taken, size = planned if planned is not None and stored == (w, h) else self._window(record, w, h, entropy)
        if taken != [0, 0, w, h] or (w, h) != (size, size):
            if self.exact_cut or self.interpolation is None:
                image, _ = crop_ops.crop_and_resize(image, taken, size, interpolation=self.interpolation)
            else:
                image, taken = crop_ops.cut_window(image, taken, size, interpolation=self.interpolation)
        return image, taken, size, (w, h)

    def _record_of(self, record: dict, taken, w: int, h: int, size: int) -> dict:
        """The record of the ``taken`` window of a w x h stored image, cut at ``size``."""
        if self.crop_rule is not None:
            return _cropped_record(record, taken, (w, h), self.crop_rule, size)
        return record if (w, h) == (size, size) else dict(record, crop_size=[size, size])

    def sample_dict(self, item: _Item) -> dict:
        sample = {
            "angles": torch.tensor(item.angles, dtype=torch.float32),
            "key": item.key,
            "record": item.record,
            "landmarks": item.landmarks(),
            "landmarks_source": item.landmarks_source,
        }
        if item.image is None:
            sample["jpeg"] = torch.frombuffer(bytearray(item.jpeg), dtype=torch.uint8)
            sample["window"] = torch.tensor(item.window, dtype=torch.int64)
        else:
            image = item.image
            dst = np.empty((3,) + image.shape[:2], np.uint8 if self.image_format == "uint8" else np.float32)
            _write_image(dst, image, item.bgr, self.normalize, self._scratch)
            sample["image"] = torch.from_numpy(dst)
        return sample

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_pool", None)  # buffers stay in the process that made them
        state["_scratch"] = {}
        return state

    def _assemble(self, items):
        """Items for :func:`_collate_items`: every ``granule`` consecutive items (one DataLoader
        batch) write their images, finished (uint8 planes, or float normalised), into one batch
        buffer from this process's :class:`_BufferPool`."""
        granule = self.state.granule
        pool = self.__dict__.get("_pool")
        if pool is None:
            pool = self._pool = _BufferPool(self.state.buffers)
        dtype = np.float32 if self.image_format == "float" else np.uint8
        buffer, pos = None, 0
        for item in items:
            image = item.image
            if pos == 0:
                buffer = None if image is None else pool.acquire((granule, 3) + image.shape[:2], dtype)
            if image is not None and buffer is not None and buffer.images.shape[2:] == image.shape[:2]:
                _write_image(buffer.images[pos], image, item.bgr, self.normalize, self._scratch)
                item.image, item.buffer, item.slot = None, buffer, pos
            yield item
            pos = (pos + 1) % granule
