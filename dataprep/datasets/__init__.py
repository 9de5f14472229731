"""Raw-dataset readers. Each reader module exposes ``NAME``, ``DEFAULT_ROOT_NAME``,
``list_samples(root) -> list[SampleRef]`` (cheap, sorted, no file parsing) and
``read_sample(root, ref) -> RawSample`` (raises ``SampleError`` for any bad input) and
``input_files(root, ref) -> list[str]`` (the files ``read_sample`` reads, relative to the root:
what a resumed build checks for changes) and ``image_size(root, ref) -> (w, h) | None`` (the size
``read_sample`` requires of the image: the box stage detects no picture of another size)."""
from __future__ import annotations

from types import ModuleType

from . import aflw2000, biwi, w300lp

DATASET_READERS: dict[str, ModuleType] = {
    w300lp.NAME: w300lp,
    aflw2000.NAME: aflw2000,
    biwi.NAME: biwi,
}

_ALIASES = {m.DEFAULT_ROOT_NAME.lower(): name for name, m in DATASET_READERS.items()}
_ALIASES.update({"300w-lp": "300w_lp", "300wlp": "300w_lp", "aflw2000-3d": "aflw2000", "aflw2000_3d": "aflw2000"})


def get_reader(name: str) -> ModuleType:
    """Reader module for a dataset id (``300w_lp``, ``aflw2000``, ``biwi``; case-insensitive, the
    root folder names ``300W_LP`` / ``AFLW2000`` / ``hpdb`` work too)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return DATASET_READERS[key]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASET_READERS)}") from None


__all__ = ["DATASET_READERS", "get_reader"]
