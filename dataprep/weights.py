"""Saved PyTorch weights, as training scripts leave them: one place that finds the state dict in a
loaded file (RetinaFace's detector weights, ``train_minimal``'s ``--pretrained`` files)."""
from __future__ import annotations

from typing import Any

import torch

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
