"""Shard URLs: expanding patterns and lists, telling local files apart, opening a shard."""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlparse

import webdataset as wds
from webdataset.shardlists import expand_urls

from ..shards import INFO_FILE, MANIFEST, read_info_shard_lengths, read_info_splits

__all__ = ["brace_pattern", "expand_shard_urls", "local_path", "open_url", "recorded_shard_lengths",
           "require_local_shards"]

_NUMBERED = re.compile(r"^(.*?)([0-9]+)([^0-9]*)$")
_WHAT_TO_GIVE = ("give a shard path or URL, a brace pattern (e.g. out/train-{000000..000003}.tar), URLs joined by "
                 "'::', or a list of those")


def expand_shard_urls(urls) -> list[str]:
    """A string (brace patterns, ``::``-separated lists), a path, or a list of those -> URLs
    (``~`` expanded for local paths). An empty URL among them is a ``FileNotFoundError`` saying
    where it is and what to give."""
    if isinstance(urls, (str, os.PathLike)):
        items = [urls]
    elif isinstance(urls, Iterable) and not isinstance(urls, (bytes, Mapping)):
        items = list(urls)  # a list, a tuple, a generator (Path.glob)
    else:
        items = None
    bad = [item for item in items or [] if not isinstance(item, (str, os.PathLike))]
    if items is None or bad:  # None (an unset option), a number, a dict...: os.fspath's error named nothing
        raise TypeError(f"shard URLs {urls!r}: {'not' if items is None else f'{bad[0]!r} in the list is not'} a "
                        f"path or URL; {_WHAT_TO_GIVE}")
    out: list[str] = []
    for index, item in enumerate(items):
        expanded = expand_urls(os.fspath(item))
        if not all(url.strip() for url in expanded):
            # as require_local_shards answers a folder or a wildcard: what was given names no shard (an
            # empty path was "1 of 1 shard(s) not found: " naming nothing, and passed over by a handler)
            raise FileNotFoundError(_empty_url_problem(urls, os.fspath(item), None if item is urls else index))
        for url in expanded:
            out.append(os.path.expanduser(url) if _is_local(url) else url)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


def _empty_url_problem(urls, item: str, index: int | None) -> str:
    """What is wrong with ``urls`` whose ``item`` (``index`` in a list of them) is or gives an empty
    shard URL, and what to give instead."""
    name = "it" if index is None else f"item {index}"
    if not item.strip():
        problem = f"{name} is {'a blank' if item else 'an empty'} string"
    elif not all(part.strip() for part in item.split("::")):
        problem = f"{name} has an empty part between '::' separators (one at its start or end, or two in a row?)"
    else:
        problem = f"{name} expands to an empty URL"
    return f"shard URLs {urls!r}: {problem}; {_WHAT_TO_GIVE}"


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


def recorded_shard_lengths(urls: list[str]) -> dict[str, int]:
    """URL -> the samples its folder's ``_info.json`` records for it, for the local shards among
    ``urls`` a build folder lists (one read per folder; remote shards are not looked up)."""
    by_folder: dict[str, dict[str, int]] = {}
    out = {}
    for url in urls:
        path = local_path(url)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in by_folder:
            by_folder[folder] = read_info_shard_lengths(folder)
        recorded = by_folder[folder].get(os.path.basename(path))
        if recorded is not None:
            out[url] = recorded
    return out


def require_local_shards(urls: list[str]) -> None:
    """Raise ``FileNotFoundError`` naming the local shards among ``urls`` that do not exist (remote
    ones are not checked): almost always a wrong folder or brace pattern, which would otherwise
    surface as one worker's traceback mid-epoch. A shard folder given for its shards gets the brace
    patterns of its splits (from its ``_info.json``) to give instead."""
    # a build's own JSON files given for its shards: "not a readable tar shard ...; rebuild it" misled
    build_files = [u for u in urls if (path := local_path(u)) is not None and os.path.isfile(path)
                   and os.path.basename(path) in (INFO_FILE, MANIFEST)]
    missing = [u for u in urls if (path := local_path(u)) is not None and not os.path.isfile(path)]
    if not missing and not build_files:
        return
    folders = [u for u in missing if os.path.isdir(local_path(u))]
    globs = [u for u in missing if u not in folders and any(c in u for c in "*?[")]
    parts = [f"{u}: wildcards are not expanded (webdataset's URLs neither); give a brace pattern (e.g. "
             "train-{000000..000003}.tar) or a list such as sorted(glob.glob(...))" for u in globs[:3]]
    files = [u for u in missing if u not in folders and u not in globs]
    if files:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        parts.append(f"{len(files)} of {len(urls)} shard(s) not found: {shown}; check the folder and the brace "
                     "pattern (e.g. train-{000000..000003}.tar), or list the shards in the folder's _info.json")
    parts.extend(_folder_hint(u) for u in folders[:3])
    parts.extend(_build_file_hint(u) for u in build_files[:3])
    raise FileNotFoundError("; ".join(parts))


def _split_patterns(folder: str) -> list[str]:
    """A brace pattern per split of the build folder's ``_info.json``, with its name and samples
    ([] without a readable one)."""
    try:
        return [f"{brace_pattern(folder, s['filenames'])} ({name}, {s.get('num_samples', '?')} samples)"
                for name, s in read_info_splits(folder).items() if s.get("filenames")]
    except (KeyError, TypeError, AttributeError):
        return []


def _folder_hint(url: str) -> str:
    """What to give instead of the shard folder ``url``: a brace pattern per split of its ``_info.json``."""
    patterns = _split_patterns(local_path(url))
    if not patterns:  # no (readable) _info.json: the form to give
        return (f"{url} is a folder, not a shard: give its shards as a path or brace pattern, "
                f"e.g. {brace_pattern(url, [f'train-{i:06d}.tar' for i in range(4)])}")
    return (f"{url} is a shard folder, not a shard: give the shards of a split, as its _info.json lists them: "
            + " or ".join(patterns))


def _build_file_hint(url: str) -> str:
    """What to give instead of a build's ``_info.json`` or ``manifest.json``: its folder's splits."""
    path = local_path(url)
    folder = os.path.dirname(path) or "."
    patterns = _split_patterns(folder)
    if not patterns:
        return (f"{url} is a build's {os.path.basename(path)}, not a shard: give the shards of its folder as a "
                f"path or brace pattern, e.g. {brace_pattern(folder, [f'train-{i:06d}.tar' for i in range(4)])}")
    return (f"{url} is a build's {os.path.basename(path)}, not a shard: give the shards of a split, as the "
            f"folder's _info.json lists them: " + " or ".join(patterns))


def brace_pattern(folder: str, names: list[str]) -> str:
    """Shard file names in ``folder`` -> one URL for them all: a brace pattern
    (``folder/train-{000000..000003}.tar``) where they are numbered one after another with the same
    prefix, digits and suffix, else the paths joined by ``::``."""
    base = folder.rstrip("/") + "/"
    found = [_NUMBERED.match(n) for n in names]
    if len(names) > 1 and all(found):
        forms = {(m.group(1), len(m.group(2)), m.group(3)) for m in found}
        numbers = [int(m.group(2)) for m in found]
        if len(forms) == 1 and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            prefix, _, suffix = forms.pop()
            return f"{base}{prefix}{{{found[0].group(2)}..{found[-1].group(2)}}}{suffix}"
    return "::".join(base + n for n in names)
