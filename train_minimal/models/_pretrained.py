"""``--pretrained`` for every model: ``none`` (scratch), ``auto`` (torchvision or timm ImageNet
weights, from the torch hub / Hugging Face cache or downloaded) or a local weights file loaded
non-strictly with a report of what did not match."""
from __future__ import annotations

import os
import sys
from typing import Callable

from torch import nn

from dataprep.weights import TorchFileError, load_torch_file, unwrap_state_dict


class PretrainedUnavailable(RuntimeError):
    """ImageNet weights were asked for but cannot be had (no network and nothing cached)."""


class PretrainedFileError(ValueError):
    """A ``--pretrained`` file that is missing, unreadable or does not fit the model (one line
    naming the file: the trainer prints it as its error)."""


def read_weights(path: str, what: str = "weights") -> dict:
    """The state dict in a local weights file (:func:`dataprep.weights.unwrap_state_dict`: wrappers
    and ``module.`` / ``_orig_mod.`` prefixes removed); :class:`PretrainedFileError` otherwise."""
    if not os.path.isfile(path):
        raise PretrainedFileError(f"--pretrained {path}: no such file (use 'auto' for ImageNet weights or 'none' "
                                  f"for scratch)")
    try:
        blob = load_torch_file(path)
    except (TorchFileError, OSError) as exc:
        raise PretrainedFileError(f"--pretrained {path}: not a {what} file torch can read ({exc})") from None
    try:
        return unwrap_state_dict(blob, ("module.", "_orig_mod."))
    except ValueError as exc:
        raise PretrainedFileError(f"--pretrained {path}: {exc}") from None


def no_weights_message(what: str) -> str:
    return (f"ImageNet weights for {what} could not be downloaded (no network?) — pass --pretrained PATH "
            f"to a local file, or --pretrained none")


def normalize_pretrained(pretrained) -> str | None:
    """``None``/``"none"``/``""`` -> None (scratch); ``"auto"``; anything else is a file path."""
    if pretrained is None:
        return None
    p = str(pretrained).strip()
    if p.lower() in ("", "none", "scratch", "false"):
        return None
    if p.lower() in ("auto", "imagenet", "true"):
        return "auto"
    return p


def torchvision_model(arch: str, weights: str, pretrained, **kwargs) -> nn.Module:
    """``torchvision.models.<arch>``; with ``pretrained == "auto"`` the ``<weights>`` enum member
    (e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``), downloaded into the torch hub cache if needed."""
    import torchvision

    fn = getattr(torchvision.models, arch)
    if normalize_pretrained(pretrained) != "auto":
        return fn(weights=None, **kwargs)
    enum_name, member = weights.split(".")
    w = getattr(getattr(torchvision.models, enum_name), member)
    try:
        return fn(weights=w, **kwargs)
    except Exception as exc:  # URLError, socket errors, partial downloads...
        raise PretrainedUnavailable(no_weights_message(f"{arch} ({weights})") + f" [{type(exc).__name__}: {exc}]") from exc


def _timm_weights_cached(name: str) -> bool:
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
        return bool(hub_id) and any(
            isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Quick check before a download that would otherwise retry for a minute with no network."""
    import socket

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # can't tell through a proxy; let the download try
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def timm_model(name: str, pretrained, **kwargs) -> nn.Module:
    import timm

    if normalize_pretrained(pretrained) != "auto":
        return timm.create_model(name, pretrained=False, **kwargs)
    if not _timm_weights_cached(name) and not _reachable("huggingface.co"):
        raise PretrainedUnavailable(no_weights_message(f"timm {name}") + " [huggingface.co unreachable, not in the cache]")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise PretrainedUnavailable(no_weights_message(f"timm {name}") + f" [{type(exc).__name__}: {exc}]") from exc


def load_weights_file(model: nn.Module, path: str, backbone_prefix: str = "backbone.", log=None) -> dict:
    """Load a local weights file into ``model`` non-strictly and report what did not match.

    Accepts a bare state dict, ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers (our own
    checkpoints included), ``module.`` / ``_orig_mod.`` prefixes on every key
    (``dataprep.weights.unwrap_state_dict``), and backbone-only files (e.g. torchvision's
    ``resnet50-*.pth``, whose ``conv1.weight`` goes to ``backbone.conv1.weight``). Tensors whose
    shape does not match are skipped and reported. Returns ``{"loaded", "missing", "unexpected",
    "mismatched"}`` key lists; raises :class:`PretrainedFileError` for a file it cannot read, or
    if nothing at all matched.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    blob = read_weights(path)
    own = model.state_dict()
    loaded, unexpected, mismatched = {}, [], []
    for key, value in blob.items():
        target = key if key in own else (backbone_prefix + key if backbone_prefix + key in own else None)
        if target is None:
            unexpected.append(key)
        elif own[target].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} != {tuple(own[target].shape)}")
        else:
            loaded[target] = value
    if not loaded:
        raise PretrainedFileError(f"--pretrained {path}: none of its {len(blob)} tensors match the model's parameters")
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in own if k not in loaded]
    missing_backbone = [k for k in missing if k.startswith(backbone_prefix)]
    msg = f"[pretrained] loaded {len(loaded)}/{len(own)} tensors from {path}"
    if missing_backbone:
        msg += f"; backbone keys missing ({len(missing_backbone)}): {', '.join(missing_backbone[:8])}" + (" ..." if len(missing_backbone) > 8 else "")
    other_missing = len(missing) - len(missing_backbone)
    if other_missing:
        msg += f"; {other_missing} non-backbone keys left at their initialisation (heads)"
    if unexpected:
        msg += f"; unused keys ({len(unexpected)}): {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "")
    if mismatched:
        msg += f"; shape mismatches skipped ({len(mismatched)}): {', '.join(mismatched[:4])}"
    log(msg)
    return {"loaded": list(loaded), "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def build_with_pretrained(make: Callable[[object], nn.Module], pretrained) -> nn.Module:
    """``make(pretrained_for_backbone)`` then, for a file path, load it into the whole model."""
    p = normalize_pretrained(pretrained)
    if p in (None, "auto"):
        return make(p)
    model = make(None)
    load_weights_file(model, p)
    return model
