"""Device names, for every ``--device`` (``dataprep build``'s detectors, ``train_minimal``): one
parser, so both commands accept the same forms, and one resolver to a ``torch.device`` that says
what to do when the device is not there."""
from __future__ import annotations

import re

#: The forms ``--device`` accepts, as the messages list them.
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def parse_device(text) -> str:
    """The device name in canonical form (stripped, lower case): ``auto``, ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``. ValueError for anything else (``gpu``, ``cuda0``), before any data is read
    (torch would refuse it only when first used)."""
    name = "auto" if text is None else str(text).strip().lower()
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"--device {text}: give {DEVICE_FORMS}")
    return name


def resolve_device(text="auto", local_rank: int = 0):
    """:func:`parse_device`'s name -> ``torch.device``. ``auto``: ``cuda`` when torch sees a CUDA
    device, else ``cpu``; ``cuda`` without an index: ``cuda:local_rank`` (the process's GPU under
    ``torchrun``). ValueError when the device is not on this machine."""
    import torch

    name = parse_device(text)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: torch sees no CUDA device here; use --device cpu (or auto)")
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: torch sees no Apple MPS device here; use --device cpu (or auto)")
    return torch.device(name)
