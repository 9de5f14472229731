"""Tar members -> samples: the shard's tar headers parsed directly (what ``tarfile``'s stream mode
reads), members grouped into samples by webdataset's rules; the pipeline stage that does it per shard."""
from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import tarfile
import zlib
from typing import Callable

from webdataset import tariterators
from webdataset.utils import PipelineStage

from ..errors import first_line
from ..shards import split_member
from .urls import local_path, open_url

_WANTED_SUFFIXES = (".jpg", ".json", ".pts.npy")

_BLOCK = 512
_REGULAR_TYPES = (b"0", b"\0", b"7")
_PAX_TYPES = (b"x", b"g", b"X")
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_META_NAME = re.compile(r"__[^/]*__($|/)")

#: What reading a broken shard raises: bad or truncated tar headers or data, bad compression.
SHARD_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


class UnreadableShard(tarfile.ReadError):
    """A shard that is not a readable tar (truncated, not a tar, bad compression). Its message is one
    line naming the shard and what to do (:func:`unreadable_shard`); a ``ReadError``, so handlers and
    callers that catch those still do. Raised in a DataLoader worker, it reaches the main process as
    the worker's traceback text, whose last line is that message: :func:`shard_error_line`."""


class BadSample(ValueError):
    """A sample the loader cannot use (no image or record, an image that does not decode, a record
    without a field it needs): one line naming the sample and its shard and saying what to do; the
    original error is its ``__cause__``."""


class NoSamples(ValueError):
    """Shards that hold no sample at all (a build writes an empty shard where every sample was
    rejected). One line naming them, as :class:`UnreadableShard`'s."""


#: Why shards can hold no sample, and where to look (a build writes an empty shard where every
#: sample was rejected).
EMPTY_SHARDS_HINT = "empty shards: every sample rejected when they were built? see the build's manifest.json"

#: Shards in a row without a sample after which a stream stops with :class:`NoSamples` (a resampled
#: stream over nothing but empty shards would draw them forever).
EMPTY_SHARDS_IN_A_ROW = 1000


def unreadable_shard(url: str, err: BaseException) -> UnreadableShard:
    """The :class:`UnreadableShard` for ``url``, saying what ``err`` found."""
    detail = first_line(err).rstrip(":")
    path = local_path(url)
    folder = os.path.dirname(path) if path else "DIR"
    return UnreadableShard(f"{url} is not a readable tar shard (truncated or not a tar file? {detail}); rebuild "
                           f"it or run `dataprep verify {folder or '.'}`")


def miscounted_shard(url: str, got: int, recorded: int) -> UnreadableShard:
    """The :class:`UnreadableShard` for ``url`` holding ``got`` samples where its folder's
    ``_info.json`` records ``recorded`` (a tar cut where a member ends still reads as a tar: only the
    count tells)."""
    return unreadable_shard(url, ValueError(f"it holds {got} samples, the folder's _info.json says {recorded}"))


def shard_error_line(exc: UnreadableShard | NoSamples | BadSample) -> str:
    """The one-line message of ``exc``, also when a DataLoader worker raised it (torch then raises a
    new one holding the worker's whole traceback, which ends with the original message)."""
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else ""
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


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
        try:
            data = _read_exact(stream, size)
            _skip(stream, padded - size, False)
        except Exception as exn:
            exn.tar_member = name  # whose data was cut short: _tar_samples tells whole samples by it
            raise
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
    """webdataset's ``base_plus_ext`` (:func:`shards.split_member`; webdataset's own for names it
    does not cover)."""
    key, ext = split_member(name)
    return (key, ext) if key is not None else tariterators.base_plus_ext(name)


def _tar_samples(stream, url: str, handler: Callable[[Exception], bool]):
    """Samples ``{"__key__", "__url__", suffix: bytes}`` of one shard: consecutive members with the
    same key, suffixes lower-cased (webdataset's ``group_by_keys``)."""
    current: dict | None = None
    try:
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
    except Exception as exn:
        # A shard damaged further on: the error goes on to the caller's handler. The sample read
        # before it still counts when the damage is in another sample's member (as in webdataset);
        # when it is in one of its own, or in a header (which member, nobody knows), it is dropped:
        # its members may be cut short or missing (it was read as a sample with no record).
        cut = getattr(exn, "tar_member", None)
        if current is not None and len(current) > 2 and cut is not None and _split_key(cut)[0] != current["__key__"]:
            yield current
        raise
    if current is not None and len(current) > 2:
        yield current


def _wanted_member(fname: str) -> bool:
    return fname.lower().endswith(_WANTED_SUFFIXES)  # KEY.JPG too: suffixes are lower-cased after


class _TarSamples(PipelineStage):
    """``{"url"}`` -> raw samples ``{"__key__", "__url__", "jpg", "json", "pts.npy"}``
    (:func:`open_url`, then the tar members grouped by key as webdataset's ``tariterators`` do).
    ``recorded``: URL -> the samples its build recorded (:func:`urls.recorded_shard_lengths`); a
    shard read to its end with fewer is an :class:`UnreadableShard` for the handler. Shards the
    handler passes over are counted in ``state``'s ``skipped`` (with the samples they lacked)."""

    def __init__(self, handler: Callable[[Exception], bool], recorded: dict[str, int], state):
        self.handler = handler
        self.recorded = recorded
        self.state = state

    def run(self, src):
        # shards in a row that gave no sample (empty, or unreadable and passed over by the handler):
        # a resampled stream over such shards would never end
        empty = 0
        skipped = self.state.skip_counts()
        for item in src:
            url = item["url"]
            got = yield from self._shard_samples(url, skipped)
            empty = 0 if got else empty + 1
            if empty >= EMPTY_SHARDS_IN_A_ROW:
                raise NoSamples(f"{empty} shards in a row gave no sample (the last: {url}): are the shards empty "
                                "(every sample rejected when they were built: see the build's manifest.json), or "
                                "unreadable (the handler's warnings say why; dataprep verify checks them)?")

    def _shard_samples(self, url: str, skipped):
        """One shard's samples; returns how many. An error opening or reading it goes to the handler;
        a shard it passes over is counted in ``skipped`` (shards, samples missing)."""
        got = 0
        try:
            stream = open_url(url)
        except Exception as exn:  # noqa: BLE001 - the handler decides
            exn.args = exn.args + (url,)
            if self.handler(exn):
                self._passed_over(url, got, skipped)
                return got
            raise
        try:
            for sample in _tar_samples(stream, url, self.handler):
                got += 1
                yield sample
            # reached only when the whole shard was read (not when the stream stops early): a tar cut
            # at a member boundary reads as a shorter valid tar, only its build's count tells
            recorded = self.recorded.get(url)
            if recorded is not None and got < recorded:
                raise miscounted_shard(url, got, recorded)
        except Exception as exn:  # noqa: BLE001 - a broken shard: the handler decides
            if isinstance(exn, SHARD_READ_ERRORS) and not isinstance(exn, UnreadableShard):
                err = unreadable_shard(url, exn)  # one line naming the shard, whatever reports it
                err.__cause__ = exn
                exn = err
            elif not isinstance(exn, UnreadableShard):  # which names its shard already
                exn.args = exn.args + (url,)
            if not self.handler(exn):
                raise exn
            self._passed_over(url, got, skipped)
        finally:
            stream.close()
        return got

    def _passed_over(self, url: str, got: int, skipped) -> None:
        """Count a shard the handler passed over after ``got`` samples, and what it lacked where its
        build recorded how many it holds."""
        skipped[1] += 1
        skipped[2] += max(0, self.recorded.get(url, 0) - got)
