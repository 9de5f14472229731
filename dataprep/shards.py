"""Write-shard stage: plain, deterministic tar shards any tar tool or webdataset reads.

* Members are ``<key>.<ext>`` in sorted extension order, mode 0444, fixed owner and mtime, so the
  same samples give byte-identical shards.
* A shard is written under ``<name>.tmp`` and renamed when complete: a final name never holds a
  half-written shard. The sha256 is computed while writing (no second read).
* Destinations are local folders or any fsspec URL (``file://``, ``s3://`` ...).
* ``ShardWriter`` streams: each sample goes out as soon as it is encoded, in ~1 MiB sequential
  writes, so a worker holds one sample, not a shard. It uses the standard library's ``tarfile``
  layout only (importing webdataset here would pull torch into every build worker: ~2-3 s and
  ~400 MB each), with the same bytes webdataset's ``TarWriter`` wrote.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import re
import tarfile
import threading

import fsspec

#: Fixed tar mtime (2020-01-01T00:00:00Z): determinism without pretending the epoch. An integer:
#: a float mtime makes tarfile put a PAX extended header before every member (+18% shard size,
#: twice the header parsing for every reader).
TAR_MTIME = 1577836800
TAR_USER = TAR_GROUP = "dataprep"
TAR_MODE = 0o444
#: What sample keys, split names and so shard file names are made of (a regex character class):
#: no dot (webdataset cuts keys at the first one), no ``/`` (a folder), nothing a shell quotes.
NAME_CHARS = "A-Za-z0-9_-"
SAFE_MEMBER = re.compile(f"^[{NAME_CHARS}]+$")
SAFE_EXTENSION = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)*$")
#: Bytes gathered before each write to the destination: few, large, sequential writes.
WRITE_BUFFER = 1 << 20


#: The suffix of a shard (or a JSON file beside the shards) while it is written; renamed when complete.
#: The full temporary name is ``<name>.<writer>.tmp`` (:func:`tmp_name`): two processes writing the
#: same file (a build's worker that outlived it, and the rerun) never write into one file.
TMP_SUFFIX = ".tmp"
#: The build's record of itself, beside the shards (``dataprep.build.make_manifest``).
MANIFEST = "manifest.json"
_TMP_PART = r"(\.[0-9a-f]{5,})?" + re.escape(TMP_SUFFIX)  # [.<writer>].tmp (older builds: no writer)
_SHARD_FILE = re.compile(r"[^/]+-[0-9]{6}\.tar(" + _TMP_PART + ")?")


class FolderURLError(ValueError):
    """A folder or URL that cannot be opened as one; the message says what to do."""


def folder_filesystem(url: str, option: str = "--out") -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs(url)``: the filesystem and path of a local folder or URL, or
    :class:`FolderURLError` naming ``option`` for a URL scheme fsspec does not know or whose package
    is not installed (``gs://`` needs ``gcsfs``, ``az://`` ``adlfs``)."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise FolderURLError(f"{option} {url}: {err} (the package of that URL scheme is not installed); install "
                             "it, or give a local folder") from None
    except ValueError as err:
        raise FolderURLError(f"{option} {url}: not a URL scheme fsspec knows ({err}); give a local folder or a URL "
                             "such as s3://bucket/path") from None


def unreachable(url: str, err: BaseException, option: str = "--out") -> FolderURLError:
    """The error for a folder URL whose store did not answer (remote stores raise their own types:
    botocore's NoCredentialsError, aiohttp's, ...)."""
    return FolderURLError(f"{option} {url}: cannot reach it ({type(err).__name__}: {err}); check the URL, the "
                          "endpoint and the credentials")


def tmp_name(path: str) -> str:
    """The temporary name this process writes ``path`` under (renamed to ``path`` when complete)."""
    return f"{path}.{os.getpid():x}{threading.get_ident() % 65536:04x}{TMP_SUFFIX}"


def final_name(name: str) -> str:
    """``name`` without :func:`tmp_name`'s ``.<writer>.tmp`` (a final name comes back as it is)."""
    return re.sub(_TMP_PART + "$", "", name)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_split(name: str) -> str:
    """The split a :func:`shard_name` (or that shard being written) names: ``train-000001.tar`` -> ``train``."""
    return final_name(name).rsplit("-", 1)[0]


def is_shard_file(name: str) -> bool:
    """Whether a file name is one :func:`shard_name` makes, or such a shard still being written."""
    return bool(_SHARD_FILE.fullmatch(name))


def split_member(name: str) -> tuple[str | None, str | None]:
    """A tar member name -> ``(key, extension)`` as webdataset splits it (``base_plus_ext``): the
    key is the name up to the first dot of its last path part (``a/b.pts.npy`` -> ``a/b``,
    ``pts.npy``); ``(None, None)`` for a name without one. Every reader of shards here uses it."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot > slash + 1:
        return name[:dot], name[dot + 1:]
    return None, None


def check_member(key: str, extension: str) -> None:
    """Refuse member names that could escape a folder or confuse webdataset (dots, slashes)."""
    if not SAFE_MEMBER.match(key):
        raise ValueError(f"unsafe sample key {key!r}: only letters, digits, '_' and '-' are allowed")
    if not SAFE_EXTENSION.match(extension):
        raise ValueError(f"unsafe member extension {extension!r}")


# ----------------------------------------------------------------------------------- tar headers
def _tarfile_header(name: str, size: int) -> bytes:
    """The header of one member exactly as ``tarfile`` (hence ``webdataset.TarWriter``, which these
    shards were first written with) writes it in a ``w|`` stream (PAX format; with an integer mtime
    and short ASCII names that is a plain ustar block, no extended header)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uname = TAR_USER
    info.gname = TAR_GROUP
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


class _HeaderTemplate:
    """The same header bytes as ``tarfile`` without its per-member Python overhead: the extended
    header is identical for every member, and the last 512-byte block differs only in the name,
    size and checksum fields, which are patched into a block ``tarfile`` made. ``usable`` is False
    when this Python's ``tarfile`` writes something the patching does not reproduce (checked on
    probe members); the writer then calls ``tarfile`` for every member."""

    def __init__(self) -> None:
        header = _tarfile_header("a", 0)
        self.prefix, block = header[:-tarfile.BLOCKSIZE], bytearray(header[-tarfile.BLOCKSIZE:])
        block[0:100] = bytes(100)
        self.block = block
        probes = [("a", 0), ("k" * 100, 1), ("300w_lp_AFW_Flip_AFW_1000207_1_0.pts.npy", 672), ("x.jpg", 8 ** 11 - 1),
                  ("y-_Z09.json", 513), ("z.depth.png", 512)]
        self.usable = all(self.header(n, size) == _tarfile_header(n, size) for n, size in probes)

    def fits(self, name: str, size: int) -> bool:
        return len(name) <= 100 and name.isascii() and 0 <= size < 8 ** 11

    def header(self, name: str, size: int) -> bytes:
        block = self.block.copy()
        block[0:len(name)] = name.encode("ascii")
        block[124:136] = b"%011o\0" % size
        block[148:156] = b"        "
        block[148:155] = b"%06o\0" % sum(block)
        return self.prefix + bytes(block)


_TEMPLATE: _HeaderTemplate | None = None


def _template() -> _HeaderTemplate:
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = _HeaderTemplate()
    return _TEMPLATE


# ------------------------------------------------------------------------------------ the writer
class ShardWriter:
    """Streams samples into ``path`` (any fsspec filesystem), atomically.

    Samples are written as they come (nothing but the current write buffer is held in memory) to
    ``<path>.<writer>.tmp`` (:func:`tmp_name`), which ``close`` renames to ``path``; ``abort`` (or leaving a ``with`` block by an
    exception) removes it, so a final name never holds a half-written shard. The sha256 and size
    are computed on the way out (no second read). Nothing is created until the first sample.

    The bytes are exactly those of ``webdataset.TarWriter(user="dataprep", group="dataprep",
    mode=0o444, mtime=TAR_MTIME, encoder=False)``: members ``<key>.<ext>`` in sorted extension order.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, buffer_size: int = WRITE_BUFFER):
        self.fs = fs
        self.path = path
        self.tmp = tmp_name(path)
        self.buffer_size = buffer_size
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.samples = 0
        self._file = None
        self._buf: list[bytes] = []
        self._buffered = 0
        self._template = _template()

    # -- writing
    def write(self, sample: dict) -> None:
        """One sample: ``{"__key__": key, ext: bytes, ...}``."""
        key = sample["__key__"]
        for ext in sample:
            if ext != "__key__":
                check_member(key, ext)
        for ext in sorted(sample):
            if ext == "__key__" or ext[0] == "_":
                continue
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            elif not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{key}.{ext} is {type(data).__name__}, expected bytes")
            data = bytes(data)
            name = f"{key}.{ext}"
            if self._template.usable and self._template.fits(name, len(data)):
                self._put(self._template.header(name, len(data)))
            else:
                self._put(_tarfile_header(name, len(data)))
            self._put(data)
            pad = -len(data) % tarfile.BLOCKSIZE
            if pad:
                self._put(tarfile.NUL * pad)
        self.samples += 1

    def _put(self, data: bytes) -> None:
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered >= self.buffer_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        chunk = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        if self._file is None:
            self._file = self.fs.open(self.tmp, "wb")
        self.sha256.update(chunk)
        self.size += len(chunk)
        self._file.write(chunk)

    # -- finishing
    def close(self) -> dict:
        """Finish the archive (two zero blocks, padded to tar's 10240-byte record), rename it into
        place and return ``{"sha256", "bytes", "samples"}``. Without samples it is an empty archive
        (every tar reader and webdataset read it as no samples): a build's shard numbers have no gaps."""
        end = self.size + self._buffered + 2 * tarfile.BLOCKSIZE
        self._put(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._flush()
        self._file.close()
        self._file = None
        move_into_place(self.fs, self.tmp, self.path)
        return {"sha256": self.sha256.hexdigest(), "bytes": self.size, "samples": self.samples}

    def abort(self) -> None:
        """Drop what was written (the temporary file); the final name is never touched."""
        self._buf.clear()
        self._buffered = 0
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
                try:
                    self.fs.rm(self.tmp)
                except (FileNotFoundError, OSError):
                    pass

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_shard(fs: fsspec.AbstractFileSystem, path: str, samples) -> dict:
    """Write ``samples`` (dicts with ``__key__`` and extension -> bytes) to ``path`` atomically.

    Returns ``{"sha256", "bytes", "samples"}``.
    """
    with ShardWriter(fs, path) as writer:
        for sample in samples:
            writer.write(sample)
        return writer.close()


def dumps_json(obj) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces) so records and manifests are deterministic."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


#: The file beside the shards listing them per split (timm's webdataset reader reads it).
INFO_FILE = "_info.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_shape_problems(manifest) -> list[str]:
    """What keeps a ``manifest.json`` from being read as a build's (one phrase each; [] for a
    well-formed one): an object with a ``shards`` list of ``{"name": "<split>-NNNNNN.tar", "split",
    "samples", "sha256"}``, ``counts`` an object and ``rejected`` a list of objects when present,
    ``settings_fingerprint`` a string.
    ``verify`` and ``audit`` check this before trusting any field (an edited or foreign file)."""
    if not isinstance(manifest, dict):
        return [f"is a JSON {type(manifest).__name__}, not an object"]
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return ["has no \"shards\" list"]
    problems = []
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            problems.append(f"shards[{i}] is not an object")
            continue
        name = shard.get("name")
        if not isinstance(name, str) or not is_shard_file(name) or name.endswith(TMP_SUFFIX):
            problems.append(f"shards[{i}].name is {name!r}, not a shard file name such as train-000000.tar")
        if not isinstance(shard.get("split"), str):
            problems.append(f"shards[{i}].split is {shard.get('split')!r}, not a split name")
        for field in ("samples", "written"):  # written: not in manifests of older builds
            if (field == "samples" or field in shard) and not _count(shard.get(field)):
                problems.append(f"shards[{i}].{field} is {shard.get(field)!r}, not a count")
        if not isinstance(shard.get("sha256"), str) or not _SHA256.fullmatch(shard["sha256"]):
            problems.append(f"shards[{i}].sha256 is {shard.get('sha256')!r}, not a SHA-256 hex digest")
    counts = manifest.get("counts", {})
    if not isinstance(counts, dict):
        problems.append("counts is not an object")
    elif not (isinstance(counts.get("per_split", {}), dict)
              and all(isinstance(c, dict) for c in counts.get("per_split", {}).values())):
        problems.append("counts.per_split is not an object of objects")
    rejected = manifest.get("rejected", [])
    if not isinstance(rejected, list) or not all(isinstance(e, dict) for e in rejected):
        problems.append("rejected is not a list of objects")
    if not isinstance(manifest.get("settings_fingerprint"), str):  # what a rerun resumes by
        problems.append(f"settings_fingerprint is {manifest.get('settings_fingerprint')!r}, not the digest a rerun "
                        "of the build resumes by")
    return problems


def info_splits(shards: list[dict]) -> dict[str, dict]:
    """The ``splits`` of ``_info.json`` for these manifest shards (``verify`` compares against it)."""
    splits: dict[str, dict] = {}
    for shard in shards:
        entry = splits.setdefault(shard["split"], {"name": shard["split"], "num_samples": 0, "filenames": [], "shard_lengths": []})
        entry["num_samples"] += shard["samples"]
        entry["filenames"].append(shard["name"])
        entry["shard_lengths"].append(shard["samples"])
    return splits


def write_info(fs: fsspec.AbstractFileSystem, out: str, name: str, shards: list[dict]) -> dict:
    """``_info.json`` as timm's webdataset reader reads it: per split, sample count and shard names."""
    info = {"name": name, "splits": info_splits(shards)}
    write_json(fs, posixpath.join(out, INFO_FILE), info, indent=2)
    return info


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj, *, indent: int | None = None) -> None:
    """``obj`` as JSON (sorted keys) at ``path``, written under :func:`tmp_name` and renamed when
    complete: a run killed meanwhile leaves the previous file whole, never a truncated one."""
    data = json.dumps(obj, indent=indent, sort_keys=True).encode("utf-8") + b"\n"
    tmp = tmp_name(path)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    move_into_place(fs, tmp, path)


def move_into_place(fs: fsspec.AbstractFileSystem, tmp: str, path: str) -> None:
    """Rename the finished ``tmp`` to ``path``. A folder at ``path`` is an error (IsADirectoryError):
    fsspec's ``mv`` would put the file inside it, and the build would list a shard that is not there."""
    if fs.isdir(path):
        fs.rm(tmp)
        raise IsADirectoryError(errno.EISDIR, "a folder has the name of a file the build writes", path)
    fs.mv(tmp, path)


def read_info_splits(folder: str) -> dict:
    """The ``splits`` of a local build folder's ``_info.json`` as :func:`write_info` writes them
    (split -> ``filenames``, ``shard_lengths``, ...); {} without a readable one. The entries are
    not checked: a hand-made file may lack fields."""
    try:
        with open(posixpath.join(folder, INFO_FILE), encoding="utf-8") as f:
            splits = json.load(f)["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return splits if isinstance(splits, dict) else {}


def read_info_shard_lengths(folder: str) -> dict[str, int]:
    """Shard name -> samples, from a local build folder's ``_info.json`` ({} without a readable one)."""
    try:
        return {name: int(n) for s in read_info_splits(folder).values()
                for name, n in zip(s["filenames"], s["shard_lengths"])}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}
