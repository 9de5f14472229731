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
    -> buffer shuffle (wds.shuffle) -> decode (``.jpg`` with cv2, or kept as bytes for a GPU
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
"""
from __future__ import annotations

import functools
import gc
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import tarfile
import threading
import weakref
import zlib
from collections import Counter
from itertools import islice
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import cv2
import numpy as np
import orjson
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info
from webdataset import tariterators
from webdataset.shardlists import ResampledShards, SimpleShardList, expand_urls
from webdataset.utils import PipelineStage, pytorch_worker_info

from . import boxes as box_rules
from . import codec
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
        return open(url, "rb", buffering=1 << 20)
    if urlparse(url).scheme == "file" or urlparse(url).scheme in wds.gopen_schemes:
        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> H x W x 3 uint8 RGB."""
    img = codec.decode_rgb(data)
    if img is None:
        raise ValueError("cannot decode image bytes")
    return img


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
        self.assemble = False  # HeadPoseLoader: _Decode yields _Items written into batch buffers
        self.buffers = 6  # batch buffers a worker keeps for reuse (HeadPoseLoader: prefetch + 4)
        self.loader_id = 0  # HeadPoseLoader: the main process's key for the buffers it received
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


# --------------------------------------------------------------------------------------------
# Tar members -> samples
# --------------------------------------------------------------------------------------------
_BLOCK = 512
_REGULAR_TYPES = (b"0", b"\0", b"7")
_PAX_TYPES = (b"x", b"g", b"X")
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_META_NAME = re.compile(r"__[^/]*__($|/)")


class _Prefixed(io.RawIOBase):
    """``head`` then the rest of ``stream`` (to hand a stream we began reading to ``tarfile``)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(b))
        b[:len(data)] = data
        return len(data)


def _checksum_ok(header: bytes) -> bool:
    """The header checksum (``tarfile``'s rule: the chksum field counts as spaces; unsigned, or the
    signed sum some old tars wrote)."""
    try:
        chksum = _tar_number(header[148:156])
    except tarfile.InvalidHeaderError:
        return False
    # the byte sum through zlib's Adler-32, whose low half is 1 + the sum mod 65521: exact for 256
    # bytes (at most 65280), and ~5x faster than sum() over the bytes (it runs per tar member)
    total = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    unsigned = total - sum(header[148:156]) + 256
    if chksum == unsigned:
        return True
    high = sum(b > 127 for b in header[:148]) + sum(b > 127 for b in header[156:])
    return chksum == unsigned - 256 * high  # each byte read as a signed char


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:  # pipes and sockets may return short reads
        parts, got = [data], len(data)
        while got < n:
            chunk = stream.read(n - got)
            if not chunk:
                raise tarfile.ReadError("unexpected end of data")
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
    return data


def _skip(stream, n: int, seekable: bool) -> None:
    if n <= 0:
        return
    if seekable:
        stream.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        n -= len(chunk)


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.InvalidHeaderError("invalid number field") from None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


def _tar_files(stream, select: Callable[[str], bool]):
    """``(name, data)`` of the selected regular files of an uncompressed tar stream, in order.

    What ``tarfile``'s stream mode (``r|``) reads, parsed directly: ustar/GNU/v7 headers (checksums
    checked), PAX ``path``/``size`` records, GNU long names; members not selected are skipped
    unread (seeked over on local files). A compressed stream is handed to ``tarfile`` (``r|*``)."""
    seekable = isinstance(stream, (io.BufferedReader, io.FileIO)) and stream.seekable()
    global_pax: dict[bytes, bytes] = {}
    pax: dict[bytes, bytes] = {}
    long_name: bytes | None = None
    first = True
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            header += _read_exact(stream, _BLOCK - len(header)) if header else b""
        if not header:
            if first:
                raise tarfile.ReadError("empty file")
            return
        if header.count(0) == _BLOCK:  # end-of-archive block
            return
        if not _checksum_ok(header):
            if first and header.startswith(_COMPRESSED_MAGIC):
                yield from _tar_files_tarfile(_Prefixed(header, stream), select)
                return
            raise tarfile.ReadError("bad checksum" if not first else "not a tar file (bad header checksum)")
        first = False
        typeflag = header[156:157]
        size = _tar_number(header[124:136])
        padded = size + (-size) % _BLOCK
        if typeflag in _PAX_TYPES or typeflag == b"L":
            data = _read_exact(stream, padded)[:size]
            if typeflag == b"L":
                long_name = data.split(b"\0", 1)[0]
            elif typeflag == b"g":
                global_pax.update(_pax_records(data))
            else:
                pax = _pax_records(data)
            continue
        if typeflag == b"S" or any(k.startswith(b"GNU.sparse") for k in pax):
            raise tarfile.ReadError("sparse tar members are not supported")
        if typeflag in _NO_DATA_TYPES:  # links, devices, folders: tarfile reads no data for them
            pax, long_name = {}, None
            continue
        if typeflag == b"K":  # GNU long link name: nothing to read for a regular file
            _skip(stream, padded, seekable)
            continue
        extra = {**global_pax, **pax} if global_pax else pax
        if b"size" in extra:
            size = int(extra[b"size"])
            padded = size + (-size) % _BLOCK
        if b"path" in extra:
            raw_name = extra[b"path"]
        elif long_name is not None:
            raw_name = long_name
        else:
            raw_name = header[:100].split(b"\0", 1)[0]
            if header[257:263] == b"ustar\x00":
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    raw_name = prefix + b"/" + raw_name
        pax, long_name = {}, None
        name = raw_name.decode("utf-8", "surrogateescape")
        regular = typeflag in _REGULAR_TYPES and not (typeflag == b"\0" and name.endswith("/"))
        if not regular or not _wanted_file(name, select):
            _skip(stream, padded, seekable)
            continue
        data = _read_exact(stream, size)
        _skip(stream, padded - size, False)
        yield name, data


def _tar_files_tarfile(stream, select):
    """``_tar_files`` through ``tarfile`` (compressed shards)."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if info.isreg() and _wanted_file(info.name, select):
                yield info.name, tar.extractfile(info).read()
            tar.members = []


def _wanted_file(name: str, select) -> bool:
    """webdataset's ``tar_file_iterator`` rules: metadata names (``__x__``) skipped, then ``select``."""
    if name.startswith("__") and ("/" not in name and name.endswith("__") or _META_NAME.match(name)):
        return False
    return select(name)


def _split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's ``base_plus_ext``: the key is the name up to the first dot of its last part."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot > slash + 1:
        return name[:dot], name[dot + 1:]
    return tariterators.base_plus_ext(name)


def _tar_samples(stream, url: str, handler: Callable[[Exception], bool]):
    """Samples ``{"__key__", "__url__", suffix: bytes}`` of one shard: consecutive members with the
    same key, suffixes lower-cased (webdataset's ``group_by_keys``)."""
    current: dict | None = None
    for name, data in _tar_files(stream, _wanted_member):
        try:
            key, suffix = _split_key(name)
            if key is None:
                continue
            suffix = suffix.lower()
            if current is None or key != current["__key__"]:
                if current is not None and len(current) > 2:
                    yield current
                current = {"__key__": key, "__url__": url}
            if suffix in current:
                raise ValueError(f"{name}: duplicate file name in tar file {suffix} {current.keys()}")
            current[suffix] = data
        except Exception as exn:  # noqa: BLE001 - the handler decides
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            raise
    if current is not None and len(current) > 2:
        yield current


def _wanted_member(fname: str) -> bool:
    return fname.endswith(_WANTED_SUFFIXES)


class _TarSamples(PipelineStage):
    """``{"url"}`` -> raw samples ``{"__key__", "__url__", "jpg", "json", "pts.npy"}``
    (:func:`open_url`, then the tar members grouped by key as webdataset's ``tariterators`` do)."""

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
                yield from _tar_samples(stream, url, self.handler)
            except Exception as exn:  # noqa: BLE001 - a broken shard: the handler decides
                exn.args = exn.args + (url,)
                if not self.handler(exn):
                    raise
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


#: Interpolations ``cv2.warpAffine`` does exactly as ``cv2.resize`` defines them (reduced decoding).
_WARP_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)


def _reduction(window, size: int, interpolation) -> int:
    """The JPEG decoding scale (1, 2, 4 or 8) for cutting ``window`` at ``size``: the largest whose
    reduced window still has at least ``size`` pixels each way (decoding never loses pixels the
    resize would keep). 1 for interpolations a warp cannot reproduce (``INTER_AREA`` / None)."""
    if interpolation not in _WARP_INTERPOLATIONS:
        return 1
    ww, wh = window[2] - window[0], window[3] - window[1]
    for f in (8, 4, 2):
        if ww >= f * size and wh >= f * size:
            return f
    return 1


def _decode_bgr(data: bytes, reduction: int = 1) -> np.ndarray:
    """JPEG/PNG bytes -> H x W x 3 uint8 BGR (a JPEG at 1/``reduction`` scale, in the DCT domain)."""
    img = codec.decode_bgr(data, reduction)
    if img is None:
        raise ValueError("cannot decode image bytes")
    return img


def _warp_reduced(img: np.ndarray, window, size: int, reduction: int, interpolation) -> np.ndarray:
    """The crop ``window`` (stored-image pixels, black outside the image) at ``size`` x ``size``
    from ``img``, the stored image decoded at 1/``reduction`` scale, cut exactly: one sub-pixel
    ``cv2.warpAffine`` with ``cv2.resize``'s pixel-centre mapping."""
    x1, y1, x2, y2 = window
    sx, sy = (x2 - x1) / size, (y2 - y1) / size
    # reduced pixel i covers stored pixels [i f, (i + 1) f): stored x = f * reduced x
    m = np.array([[sx / reduction, 0.0, (x1 + 0.5 * sx) / reduction - 0.5],
                  [0.0, sy / reduction, (y1 + 0.5 * sy) / reduction - 0.5]])
    return cv2.warpAffine(img, m, (size, size), flags=interpolation | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _write_planes(dst: np.ndarray, image: np.ndarray, bgr: bool) -> None:
    """H x W x 3 uint8 ``image`` (BGR or RGB) -> ``dst`` (3, H, W) uint8 RGB planes (``cv2.split``
    into the given planes: one SIMD pass)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    planes = [dst[2], dst[1], dst[0]] if bgr else [dst[0], dst[1], dst[2]]
    got = cv2.split(np.ascontiguousarray(image), planes)
    for plane, want in zip(got, planes):
        if plane is not want:
            want[...] = plane  # OpenCV chose its own output arrays


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
        for index, raw in enumerate(src):
            try:
                yield self.prepare(raw, rank, worker, index)
            except Exception as exn:  # noqa: BLE001 - the handler decides
                exn.args = exn.args + (f"sample {raw.get('__key__')!r} in {raw.get('__url__')!r}",)
                if self.handler(exn):
                    continue
                raise

    def prepare(self, raw: dict, rank: int, worker: int, index: int) -> _Item:
        """One raw sample -> an :class:`_Item` (image H x W x 3 uint8, BGR or RGB as ``bgr`` says)."""
        st = self.state
        if "json" not in raw or "jpg" not in raw:
            missing = [s for s in ("jpg", "json") if s not in raw]
            raise ValueError(f"sample {raw.get('__key__')!r} has no {' or '.join(missing)} member")
        record = _load_json(raw["json"])
        key = str(record.get("key") or raw["__key__"])
        record.setdefault("augment", [])
        landmarks = None
        if "pts.npy" in raw:
            landmarks = _load_npy(raw["pts.npy"]).astype(np.float32, copy=False)
        entropy = [st.seed, st.current, _key_hash(key)]
        if st.resampled:
            entropy += [rank, worker, index]
        # two streams per sample (crop draws, augmentation), made only when used; the crop's is a
        # stdlib Random (a numpy Generator costs ~10 us to seed, per sample)
        source = record

        def window(w: int, h: int) -> tuple[list[int], int]:
            """The integer window to cut from a w x h stored image, and the output size."""
            if self.crop_rule is None:
                return [0, 0, w, h], self.size or w
            rng = random.Random(_seed(*entropy, 0)) if self.random_crop else None
            taken = crop_ops.recrop_window(source, self.crop_rule, (w, h), rng=rng, margin=self.crop_margin)
            return taken, self.size or w

        def record_of(taken, w: int, h: int, size: int) -> dict:
            """The record of the ``taken`` window of a w x h stored image, cut at ``size``."""
            if self.crop_rule is not None:
                return _cropped_record(source, taken, (w, h), self.crop_rule, size)
            return source if (w, h) == (size, size) else dict(source, crop_size=[size, size])

        image = None
        if self.image_format == "jpeg":
            w, h = (int(v) for v in record["crop_size"])
            taken, size = window(w, h)
        else:
            stored, planned = record.get("crop_size"), None
            if self.size is not None and not self.exact_cut and stored is not None and codec.is_jpeg(raw["jpg"]):
                # a window at least twice the output size each way: decode at reduced scale
                w, h = stored = (int(stored[0]), int(stored[1]))
                planned = window(w, h)
                f = _reduction(planned[0], planned[1], self.interpolation)
                if f > 1:
                    image = _decode_bgr(raw["jpg"], f)
                    if image.shape[:2] == (-(-h // f), -(-w // f)):
                        taken, size = planned
                        image = _warp_reduced(image, taken, size, f, self.interpolation)
                    else:
                        image = None  # the record's crop_size is not the image's: decode it whole
            if image is None:
                image = _decode_bgr(raw["jpg"])
                h, w = image.shape[:2]
                taken, size = planned if planned is not None and stored == (w, h) else window(w, h)
                if taken != [0, 0, w, h] or (w, h) != (size, size):
                    if self.exact_cut or self.interpolation is None:
                        image, _ = crop_ops.crop_and_resize(image, taken, size, interpolation=self.interpolation)
                    else:
                        image, taken = crop_ops.cut_window(image, taken, size, interpolation=self.interpolation)
        record = record_of(taken, w, h, size)
        bgr = True
        if self.transforms is not None:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            bgr = False
            aug_rng = np.random.default_rng(_seed(*entropy, 1))
            image, record, landmarks = self.transforms(image, record, landmarks, aug_rng)
        out_w, out_h = (size, size) if image is None else (image.shape[1], image.shape[0])
        return _Item(
            image=image, bgr=bgr, jpeg=raw["jpg"] if image is None else None, window=taken, key=key,
            record=record, angles=(record["yaw"], record["pitch"], record["roll"]),
            landmarks=None if landmarks is None else box_rules.to_crop_coords(landmarks, record["crop"], (out_w, out_h)).astype(np.float32),
            landmarks_source=landmarks,
        )

    def decode(self, raw: dict, rank: int, worker: int, index: int) -> dict:
        """One raw sample -> the sample dict :func:`make_dataset` yields."""
        return self.sample_dict(self.prepare(raw, rank, worker, index))

    def sample_dict(self, item: _Item) -> dict:
        sample = {
            "angles": torch.tensor(item.angles, dtype=torch.float32),
            "key": item.key,
            "record": item.record,
            "landmarks": item.landmarks,
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


# --------------------------------------------------------------------------------------------
# Batches under a HeadPoseLoader: images written into reused buffers, lent to the user
# --------------------------------------------------------------------------------------------
class _Item:
    """One decoded sample on its way into a batch (cheaper than the sample dict). ``image`` is
    H x W x 3 uint8 (``bgr`` or RGB) until :meth:`_Decode._assemble` writes it into ``buffer`` at
    ``slot``; ``jpeg`` holds the stored bytes for ``image_format="jpeg"``."""

    __slots__ = ("image", "bgr", "jpeg", "window", "key", "record", "angles", "landmarks", "landmarks_source",
                 "buffer", "slot")

    def __init__(self, *, image, bgr, jpeg, window, key, record, angles, landmarks, landmarks_source):
        self.image, self.bgr, self.jpeg, self.window = image, bgr, jpeg, window
        self.key, self.record, self.angles = key, record, angles
        self.landmarks, self.landmarks_source = landmarks, landmarks_source
        self.buffer, self.slot = None, 0


#: ``normalize`` -> per output channel (RGB source plane, scale, offset): ``out = x * scale + offset``.
_NORMALIZE_COEFFS = {
    None: [(c, 1.0 / 255.0, 0.0) for c in range(3)],
    "imagenet": [(c, 1.0 / (255.0 * IMAGENET_STD[c]), -IMAGENET_MEAN[c] / IMAGENET_STD[c]) for c in range(3)],
    "raw_bgr": [(2 - c, 1.0, 0.0) for c in range(3)],
}


def _write_image(dst: np.ndarray, image: np.ndarray, bgr: bool, normalize: str | None, scratch: dict) -> None:
    """H x W x 3 uint8 ``image`` (BGR or RGB) -> ``dst`` (3, H, W): uint8 RGB planes, or float32
    model input per ``normalize`` (:func:`normalize_images`' values up to float rounding: one
    ``x * scale + offset`` per plane). ``scratch``: reusable arrays (per process)."""
    if dst.dtype == np.uint8:
        _write_planes(dst, image, bgr)
        return
    planes = scratch.get(dst.shape)
    if planes is None:
        planes = scratch[dst.shape] = np.empty(dst.shape, np.uint8)
    _write_planes(planes, image, bgr)
    for c, (source, scale, offset) in enumerate(_NORMALIZE_COEFFS[normalize]):
        out = dst[c]
        got = cv2.addWeighted(planes[source], scale, planes[source], 0.0, offset, dst=out, dtype=cv2.CV_32F)
        if got is not out:
            out[...] = got  # OpenCV chose its own output array


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
        sizes = {(it.buffer.images.shape[2:] if it.buffer is not None else it.image.shape[:2]) for it in items}
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes {sorted((3,) + s for s in sizes)} in one batch; "
                             "pass size= (or crop_rule= and size=)")
        raise RuntimeError("batch buffers out of step with the DataLoader's batches")  # pragma: no cover
    if items[0].jpeg is not None:
        data = [it.jpeg for it in items]
        batch["_jpeg"] = np.frombuffer(bytearray(b"".join(data)), np.uint8)
        batch["_jpeg_ends"] = np.cumsum([len(d) for d in data]).tolist()
        batch["window"] = np.array([it.window for it in items], np.int64).reshape(n, 4)
    shapes = [it.landmarks.shape for it in items if it.landmarks is not None]
    if shapes:
        shape = Counter(shapes).most_common(1)[0][0]
        landmarks = np.zeros((n,) + shape, np.float32)
        mask = np.zeros(n, bool)
        for i, it in enumerate(items):
            if it.landmarks is not None and it.landmarks.shape == shape:
                landmarks[i], mask[i] = it.landmarks, True
        batch["landmarks"], batch["landmarks_mask"] = landmarks, mask
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
        for key in [k for k in known if not _process_alive(k[0])]:
            del known[key]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    """The iterator of a :class:`HeadPoseLoader`: the DataLoader's batches, finished."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __len__(self):
        return len(self.inner)

    def __next__(self):
        batch = next(self.inner)
        return batch.finish() if isinstance(batch, _Batch) else batch

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


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
                image_format, bool(random_crop), handler, interpolation, bool(exact_cut)),
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


_LOADER_IDS = itertools.count(1)


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
        # make_loader's collate: workers write finished images (float normalised, or uint8) into
        # reused batch buffers, lent to the main process without a copy (see _Batch)
        dataset.state.assemble = bool(self.batch_size) and self.collate_fn is _collate_items
        # batches a worker can have out at once: prefetched, being made, held by the main process
        dataset.state.buffers = int(self.prefetch_factor or 2) + 4 if self.num_workers else 3
        dataset.state.loader_id = self._loader_id = next(_LOADER_IDS)
        if self.collate_fn is _collate_items:
            self.collate_fn = functools.partial(_collate_items, loader_id=self._loader_id)
        weakref.finalize(self, _forget_buffers, self._loader_id, True)
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
            _forget_buffers(self._loader_id)  # the buffers of workers of earlier passes
        self._next_epoch += 1
        return _FinishedBatches(super().__iter__())


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
    to the main process without a copy: see the module's notes). Workers split the shards (unless
    ``resampled``), so use at most as many as there are shards; ``persistent_workers`` keeps them
    (and their batch buffers) between epochs: recommended for training, a worker start-up costs
    seconds. Workers start from a ``forkserver`` by default (see ``_worker_context``: a forked
    worker can hang in cv2); pass ``multiprocessing_context="fork"`` (or ``None``, the platform's
    default) to fork them."""
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
