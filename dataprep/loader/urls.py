"""Shard URLs: expanding patterns and lists, telling local files apart, opening a shard."""
from __future__ import annotations

import os
from urllib.parse import urlparse

import webdataset as wds
from webdataset.shardlists import expand_urls

__all__ = ["expand_shard_urls", "local_path", "open_url", "require_local_shards"]


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


def require_local_shards(urls: list[str]) -> None:
    """Raise ``FileNotFoundError`` naming the local shards among ``urls`` that do not exist (remote
    ones are not checked): almost always a wrong folder or brace pattern, which would otherwise
    surface as one worker's traceback mid-epoch."""
    missing = [u for u in urls if (path := local_path(u)) is not None and not os.path.isfile(path)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shard(s) not found: {shown}; check the folder and "
                                "the brace pattern (e.g. train-{000000..000003}.tar), or list the shards in the "
                                "folder's _info.json")
