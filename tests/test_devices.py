"""``--device``: one parser and one resolver for ``dataprep build`` and ``train_minimal``."""
from __future__ import annotations

import argparse

import pytest
import torch

from dataprep import build as build_mod
from dataprep.devices import parse_device, resolve_device
from train_minimal import train as train_mod


@pytest.mark.parametrize("text, name", [("auto", "auto"), (" CPU ", "cpu"), ("cuda", "cuda"), ("CUDA:1", "cuda:1"),
                                        ("mps", "mps"), (None, "auto")])
def test_both_commands_accept_the_same_device_names(text, name, tmp_path):
    assert parse_device(text) == name
    if text is not None:
        assert train_mod._device(text) == name
    build_mod.check_options(build_mod.BuildOptions(dataset="aflw2000", root=str(tmp_path), out=str(tmp_path / "o"),
                                                   device=text or "auto"))


@pytest.mark.parametrize("text", ["gpu", "cuda0", "cuda:", "cuda:-1", "tpu", ""])
def test_both_commands_refuse_the_same_device_names(text, tmp_path):
    with pytest.raises(ValueError, match=r"give auto, cpu, cuda, cuda:N or mps"):
        parse_device(text)
    with pytest.raises(argparse.ArgumentTypeError, match="is not a device"):
        train_mod._device(text)
    with pytest.raises(build_mod.BuildError, match=r"--device"):
        build_mod.check_options(build_mod.BuildOptions(dataset="aflw2000", root=str(tmp_path), out=str(tmp_path / "o"),
                                                       device=text))


def test_resolve_device_says_what_is_missing(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda:1: torch sees no CUDA device here; use --device cpu"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device mps: torch sees no Apple MPS device"):
        resolve_device("mps")
    # with CUDA: "cuda" is the process's own GPU under torchrun, an index past the last is refused
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"there are 2 CUDA device\(s\), numbered from 0"):
        resolve_device("cuda:2")


def test_train_minimal_device_errors_are_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^error: --device cuda: torch sees no CUDA device here"):
        train_mod.resolve_device("cuda")
