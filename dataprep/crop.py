"""Crop stage: cut a window out of an image (padding past the edges) and resize it.

Cropping happens before resizing so the resize only touches the face's pixels.
"""
from __future__ import annotations

import cv2
import numpy as np

from . import boxes as box_rules


def crop_and_resize(image: np.ndarray, window, size: int | tuple[int, int], *, interpolation=None) -> tuple[np.ndarray, list[int]]:
    """Crop ``window`` (source pixels, may extend past the image) and resize to ``size``.

    Pixels outside the image are black (zeros). Returns the crop and the integer window used.
    Works for H x W x C and H x W (e.g. 16-bit depth) arrays. ``interpolation``: an OpenCV flag;
    None (the build) takes ``INTER_AREA`` when shrinking, ``INTER_LINEAR`` otherwise (16-bit depth
    always ``INTER_NEAREST``).
    """
    out_w, out_h = (size, size) if isinstance(size, int) else size
    x1, y1, x2, y2 = box_rules.integer_window(window)
    h, w = image.shape[:2]
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    region = image[sy1:max(sy2, sy1), sx1:max(sx2, sx1)]
    pad = (sy1 - y1, y2 - max(sy2, sy1), sx1 - x1, x2 - max(sx2, sx1))
    if any(pad) or region.size == 0:
        canvas = np.zeros((y2 - y1, x2 - x1) + image.shape[2:], dtype=image.dtype)
        if region.size:
            canvas[pad[0]:pad[0] + region.shape[0], pad[2]:pad[2] + region.shape[1]] = region
        region = canvas
    if interpolation is None:
        shrinking = region.shape[1] > out_w or region.shape[0] > out_h
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    if image.dtype == np.uint16:
        interpolation = cv2.INTER_NEAREST  # depth: never invent readings between surfaces
    resized = cv2.resize(region, (out_w, out_h), interpolation=interpolation)  # a view: no copy of the crop
    return resized, [x1, y1, x2, y2]


def rule_window(record: dict, rule: str, *, rng=None, margin: float = 0.0, box_name: str | None = None) -> list[float]:
    """Crop ``rule``'s window for this record, in source pixels (may extend past the image).

    The box the rule reads: ``box_name`` when given, else ``boxes.rule_box_name`` (the detector's
    box in a detector build, else the ground-truth box the rule's own code used); a name the record
    has no box for falls back to ``record["box"]``. ``rng`` draws the rule's random parameters (Hopenet's k);
    ``None`` takes the rule's fixed value. This is the one place that decides a rule's window:
    :func:`recrop`, ``dataprep.loader``, ``train_minimal`` and the audit all call it.
    """
    if box_name is None:
        box_name = box_rules.rule_box_name(record["boxes"], record.get("box_source", "gt"), rule)
    face = record["boxes"].get(box_name) or record["box"]
    return box_rules.crop_window(
        rule, face, dataset=record["dataset"], image_size=record["image_size"], rng=rng, margin=margin
    )


def recrop_window(record: dict, rule: str, image_size, *, rng=None, margin: float = 0.0,
                  box_name: str | None = None) -> list[int]:
    """:func:`rule_window` mapped into the stored crop (an ``image_size`` = ``(w, h)`` image whose
    source window is ``record["crop"]``) and rounded: the integer window :func:`recrop` cuts."""
    window = rule_window(record, rule, rng=rng, margin=margin, box_name=box_name)
    return box_rules.integer_window(box_rules.box_to_crop_coords(window, record["crop"], image_size))


def rule_coverage(record: dict, rule: str, *, margin: float = 0.0, box_name: str | None = None) -> float:
    """The share of ``rule``'s window (fixed parameters; its part inside the source image) that the
    stored crop (``record["crop"]``) holds: 1.0 when a load-time re-crop to ``rule`` sees only real
    pixels; below that, the rest of the window comes out black (build with ``--margin``
    ``boxes.ROOM_MARGIN[rule]`` or more)."""
    window = rule_window(record, rule, margin=margin, box_name=box_name)
    w, h = record["image_size"]
    inside = box_rules.intersection(window, [0.0, 0.0, float(w), float(h)])
    total = box_rules.area(inside)
    if total <= 0:
        return 1.0
    return box_rules.area(box_rules.intersection(inside, record["crop"])) / total


def recrop(image: np.ndarray, record: dict, rule: str, size: int, *, rng=None, margin: float = 0.0,
           box_name: str | None = None, interpolation=None) -> np.ndarray:
    """Apply crop ``rule`` at load time to a stored crop, from the boxes in its label record.

    This is how one set of shards serves every model: the record carries every face box in source
    pixels and the window the stored crop covers (``crop``), so any rule's window can be mapped into
    the stored crop. Pixels the stored crop does not cover come out black. ``interpolation``: as in
    :func:`crop_and_resize` (``dataprep.loader`` passes ``cv2.INTER_LINEAR``, as training pipelines
    resize; None keeps the build's choice).
    """
    h, w = image.shape[:2]
    taken = recrop_window(record, rule, (w, h), rng=rng, margin=margin, box_name=box_name)
    out, _ = crop_and_resize(image, taken, size, interpolation=interpolation)
    return out
