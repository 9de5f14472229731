"""Saved PyTorch weights, as training scripts leave them: one place that reads such a file
(:func:`load_torch_file`), finds the state dict in it (:func:`unwrap_state_dict`) and says what
keeps it from fitting a network (:func:`state_dict_misfit`), for
RetinaFace's detector weights and ``train_minimal``'s ``--pretrained`` files and checkpoints."""
from __future__ import annotations

import io
import os
from typing import Any

import torch

from .errors import first_line

class TorchFileError(ValueError):
    """A file ``torch.load`` cannot read; the message says why in words (callers name the file)."""


def load_torch_file(source: str | os.PathLike | bytes) -> Any:
    """``torch.load(..., map_location="cpu", weights_only=True)`` of a path or a file's bytes.
    :class:`TorchFileError` when torch cannot read it, saying why in one line: torch's own words
    for a damaged archive, and for what its safe unpickler refuses (not a torch file at all, or
    Python objects besides tensors and plain containers) a plain sentence, not its advice to load
    the file unsafely. ``OSError`` (no such file, a folder, no permission) is left to the caller."""
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else None
    try:
        return torch.load(io.BytesIO(data) if data is not None else source, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors alike: the file is not readable
        if data is None:
            with open(source, "rb") as f:
                data = f.read(4)
        if not data:
            reason = "the file is empty"
        elif not data.startswith((b"PK\x03\x04", b"\x80")):
            reason = "neither a zip archive torch.save writes nor a pickle"
        elif "Unsupported global" in str(exc):
            reason = ("it holds Python objects besides tensors and plain containers, which are not unpickled "
                      "for safety; save the model's state_dict() instead")
        else:  # a damaged archive or pickle: torch's first sentence (what follows is advice)
            text = str(exc)
            detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
            reason = "damaged: " + first_line(ValueError(detail.strip())).split(". ", 1)[0].rstrip(".")
        raise TorchFileError(reason) from exc


#: Keys that training scripts save a state dict under (``{"state_dict": ..., "epoch": 3}``).
WRAPPERS = ("state_dict", "model_state_dict", "model")


def unwrap_state_dict(obj: Any, prefixes: tuple[str, ...] = ("module.",)) -> dict[str, torch.Tensor]:
    """The tensors of the state dict in ``obj`` (what ``torch.load`` gave): unwraps
    :data:`WRAPPERS` (nested, up to three deep) and removes each of ``prefixes`` that every key
    starts with, repeatedly (``DataParallel``'s ``module.``, ``torch.compile``'s ``_orig_mod.``).
    Entries that are not tensors are dropped. ValueError when there is no tensor at all."""
    for _ in range(3):
        if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[w] for w in WRAPPERS if isinstance(obj.get(w), dict)), None)
        if inner is None:
            break
        obj = inner
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        raise ValueError("the file does not hold a state dict of tensors")
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def state_dict_misfit(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into a network whose state dict is ``own``, in one line
    with a few keys of each kind (torch's own message lists every key: thousands of characters
    for another model's file); "" when it fits. RetinaFace's weights and ``train_minimal``'s
    checkpoints and teachers are checked with it."""
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(v.shape)} instead of {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and v.shape != own[k].shape]
    parts = [what.format(len(keys)) + f" ({some(keys)})" for what, keys in (
        ("it lacks {} of the network's tensors", missing), ("it holds {} the network does not have", unexpected),
        ("{} of another shape", reshaped)) if keys]
    return "; ".join(parts)
