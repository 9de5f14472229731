"""What every dataset reader shares: the root check, listing samples and their keys, how files are
named in messages, reading raw files (never a pipe or a device), images, and the error guard that
turns bad input into a sample's rejection."""
from __future__ import annotations

import functools
import os
import stat
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import codec
from ..records import SampleError, SampleRef, distinct_key, make_key


def require_root(root, dataset: str, folder: str) -> Path:
    """``root`` as a Path, or ``FileNotFoundError`` saying which folder to pass."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} root {root} is not a folder (pass the {folder} folder)")
    return root


def where_to_point(root: Path, folder: str, is_inner_folder: Callable[[str], bool] = lambda name: False) -> str:
    """What to pass when ``root`` holds nothing of the dataset, for the listing's error: ``root``'s
    parent when ``root`` is one of the dataset's own folders (``is_inner_folder(name)``: a 300W-LP
    subset, a BIWI sequence), the folder below it named ``folder`` in any case (an archive unpacked
    into a folder of its own name, ``300W_LP/300W_LP``), else the dataset's folder by name."""
    if is_inner_folder(root.name):
        return f"{root.name} is one of the dataset's own folders: pass the {folder} folder above it, {root.parent}"
    try:
        below = sorted(p for p in root.iterdir() if p.name.lower() == folder.lower() and p.is_dir())
    except OSError:
        below = []
    if below:
        return f"it holds the dataset's folder: pass {below[0]}"
    return f"pass the {folder} folder"


def list_refs(dataset: str, root: Path, folders: Sequence[str], image_stem: Callable[[Path], str | None],
              label_stem: Callable[[Path], str | None], image_name: Callable[[str], str],
              group: str | None = None) -> list[SampleRef]:
    """A ``SampleRef`` for every sample in each of ``folders`` below ``root`` (``""``: the root itself),
    sorted by source path: key from ``folder/<image stem>``, group the folder (or ``group``).

    A sample is an image (``image_stem(path)`` names its sample, None for other files) or a label
    file whose image is missing (``label_stem``; its source is ``image_name(stem)``): an incomplete
    download is listed, so its read rejects it as ``missing_image`` and the counts show it. Images
    whose names differ only in case (``a.jpg``, ``a.JPG``) are each a sample: none goes unread.
    """
    refs = []
    for folder in folders:
        images: dict[str, list[str]] = {}  # stem -> image names (a.jpg and a.JPG: two samples, both read)
        labelled: set[str] = set()
        for path in (root / folder).iterdir():
            stem = image_stem(path)
            if stem is not None:
                images.setdefault(stem, []).append(path.name)
            elif (stem := label_stem(path)) is not None:
                labelled.add(stem)
        for stem in labelled - images.keys():
            images[stem] = [image_name(stem)]
        for name in (name for names in images.values() for name in names):
            stem = f"{folder}/{Path(name).stem}" if folder else Path(name).stem
            refs.append(SampleRef(dataset, make_key(dataset, stem), f"{folder}/{name}" if folder else name,
                                  group or folder))
    return _unique_keys(sorted(refs, key=lambda r: r.source))


def _unique_keys(refs: list[SampleRef]) -> list[SampleRef]:
    """Samples whose keys still coincide (``A/B_c`` and ``A_B/c`` both give ``A_B_c``) each get the
    key plus ``-`` and 8 hex digits of their source's sha1: webdataset would merge them into one."""
    seen = Counter(r.key for r in refs)
    return [r if seen[r.key] == 1 else replace(r, key=distinct_key(r.key, r.source)) for r in refs]


def display_path(root: Path, relative: str) -> str:
    """How a file is named in messages: the root folder's name plus the path below it."""
    name = Path(root).name or Path(root).resolve().name
    return f"{name}/{relative}" if name else relative


def _name_bytes(text: str) -> bytes:
    """A path's bytes on disk: what Python decoded, the bytes it kept as lone surrogates restored."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to (not from the file system)
        return text.encode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a file name that is not UTF-8 (Python keeps them as lone
    surrogates, ``\\udcff``) written as ``\\xff``, as in a Python bytes literal. For what the build
    writes (messages, the manifest): strict JSON readers (orjson, for one) refuse lone surrogates."""
    return _name_bytes(text).decode("utf-8", "backslashreplace")


def non_utf8_name_problem(root: Path, source: str) -> str | None:
    """Why the sample ``source`` cannot be written when its path is not valid UTF-8, else None: its
    key, record and manifest entry are UTF-8 text, and its name has no UTF-8 spelling to put there."""
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        return (f"{printable(display_path(root, source))}: the file name is not valid UTF-8 "
                f"({_name_bytes(Path(source).name)!r}); rename the file (and its label file) in UTF-8: sample "
                "keys, label records and the manifest are UTF-8 text")
    return None


class NotARegularFile(OSError):
    """A raw input path that is a named pipe, device, socket or folder: reading it could block the
    build forever (a pipe) or never end (a device)."""


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _dangling_link(path) -> str | None:
    """``a symbolic link to TARGET, which does not exist`` when ``path`` is one, else None."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return None


def broken_link_note(path) -> str:
    """`` (a symbolic link to TARGET, which does not exist)`` when ``path`` is one, else ``""``: the
    readers' "file not found" messages say why a file that is listed cannot be found."""
    link = _dangling_link(path)
    return f" ({link})" if link else ""


def non_folder_kind(path: Path) -> str | None:
    """What is at ``path`` where a dataset has a folder (a 300W-LP subset, a BIWI sequence) when it
    is not one: ``a file``, a dangling link (named as :func:`broken_link_note` names it), ``a named
    pipe`` ...; None for a folder, or when nothing is there. The listing would pass it over."""
    if path.is_dir() or not (path.exists() or path.is_symlink()):
        return None
    link = _dangling_link(path)
    if link:
        return link
    try:
        mode = path.stat().st_mode
    except OSError as err:  # a link loop, no permission
        return f"unreadable ({err.strerror})"
    return "a file" if stat.S_ISREG(mode) else next((name for test, name in _FILE_KINDS if test(mode)), "a special file")


def require_folders(root: Path, paths, what: str, contents: str, folder: str) -> None:
    """``NotADirectoryError`` naming each of ``paths`` under ``root`` (where a dataset has a folder:
    ``what``, e.g. ``"sequence"``) that is something else (:func:`non_folder_kind`), in their order:
    a listing would pass it over without a word, its ``contents`` unread, not even counted.
    ``folder``: whose folder to put there."""
    not_folders = [f"{p.name} ({kind})" for p in paths if (kind := non_folder_kind(p))]
    if not_folders:
        raise NotADirectoryError(f"{what}(s) under {root} that are not folders: {', '.join(not_folders)}; their "
                                 f"{contents} cannot be read: put {folder} there, or move it away to build without "
                                 f"that {what.split()[-1]}")


def read_file_bytes(path) -> bytes:
    """``path``'s bytes, for every raw input file the readers and the box stage read.
    :class:`NotARegularFile` (an ``OSError``) for anything but a regular file, saying what it is;
    ``FileNotFoundError`` for a missing file or a broken symbolic link (its message says which)."""
    try:  # non-blocking: opening a named pipe would wait for a writer; what was opened is checked
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist") from None
        raise
    try:  # checked before wrapping: a file object refuses a folder's descriptor with a bare EISDIR
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
            raise NotARegularFile(f"it is {kind}, not a regular file; put the dataset's file there")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def reader_errors(read_sample: Callable) -> Callable:
    """Decorator for ``read_sample(root, ref)``: anything but ``SampleError`` becomes
    ``SampleError("read_error", ...)`` naming the sample, so bad input never crashes a run."""

    @functools.wraps(read_sample)
    def wrapper(root, ref):
        try:
            return read_sample(Path(root), ref)
        except SampleError:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point of the guard
            raise SampleError(
                "read_error",
                f"{display_path(Path(root), ref.source)}: unexpected {type(exc).__name__} while "
                f"reading the sample: {exc} (if the file is fine, this is a dataprep bug: please report it)",
            ) from exc

    return wrapper


def read_image(path: Path, display: str, expected_size: tuple[int, int] | None = None,
               size_from: str | None = None) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 RGB.

    Raises ``SampleError`` ``missing_image`` / ``unreadable_image`` / ``corrupt_image`` (a JPEG
    whose picture data libjpeg finds damaged: it would decode with gray or garbled blocks; a PNG
    with a broken chunk) /
    ``wrong_image_size``
    (``expected_size`` is ``(width, height)``; the labels are in those pixels; ``size_from`` names
    the file that says so, when it is not the dataset's fixed size).
    """
    try:
        data = read_file_bytes(path)
    except FileNotFoundError:
        raise SampleError("missing_image", f"{display}: image file not found{broken_link_note(path)}") from None
    except OSError as exc:
        raise SampleError("unreadable_image", f"{display}: cannot read the file ({exc})") from exc
    if expected_size is not None:  # before decoding: a huge picture in a small file would take GBs
        _check_image_size(codec.header_size(data), expected_size, display, size_from)
    image, damage = codec.decode_rgb_checked(data)
    if damage is not None:  # it would decode with gray or garbled blocks: not a sample to train on
        raise SampleError(
            "corrupt_image",
            f"{display}: {damage}; re-download or re-extract the file",
        )
    if image is None:
        raise SampleError(
            "unreadable_image",
            f"{display}: not a decodable image ({len(data)} bytes); re-download or re-extract the file",
        )
    if expected_size is not None:
        _check_image_size(image.shape[1::-1], expected_size, display, size_from)
    return image


def _check_image_size(size, expected_size, display: str, size_from: str | None) -> None:
    """``wrong_image_size`` unless ``size`` (w, h; None: not known yet) is ``expected_size``."""
    if size is None or tuple(size) == tuple(expected_size):
        return
    said = f" as {size_from} says" if size_from else ""
    raise SampleError(
        "wrong_image_size",
        f"{display}: image is {size[0]}x{size[1]}, expected {expected_size[0]}x{expected_size[1]}{said} "
        "(the labels are in the original pixels; do not resize the raw files)",
    )
