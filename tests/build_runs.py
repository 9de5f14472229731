"""Helpers for tests that interrupt and resume builds."""
from __future__ import annotations

from pathlib import Path

import pytest

from dataprep import build as build_mod


def build_killed_at_shard(monkeypatch, opts, shard: int = 3) -> set[str]:
    """Run ``build(opts)`` as if the process were killed when it starts its ``shard``-th shard (a
    ``KeyboardInterrupt`` there, as Ctrl-C raises); check that it left no manifest and no partial
    shard, and return the names of the shards it finished. The build is unpatched afterwards."""
    real_run_shard = build_mod.run_shard
    started = []

    def dying_run_shard(task, *args):
        started.append(task.name)
        if len(started) == shard:
            raise KeyboardInterrupt("simulated kill")
        return real_run_shard(task, *args)

    monkeypatch.setattr(build_mod, "run_shard", dying_run_shard)
    with pytest.raises(KeyboardInterrupt):
        build_mod.build(opts)
    monkeypatch.setattr(build_mod, "run_shard", real_run_shard)
    out = Path(opts.out)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))
    return {p.name for p in out.glob("*.tar")}


def assert_same_shards(a: Path, b: Path) -> None:
    """Two build folders hold the same shard names with byte-identical contents."""
    names = sorted(p.name for p in Path(a).glob("*.tar"))
    assert names == sorted(p.name for p in Path(b).glob("*.tar"))
    for name in names:
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name
