"""Box stage with a detector: run it once over every image (batched, cached), then decide each
sample's face box.

* 300W-LP / AFLW2000: every detection is handed to the shard worker, which picks the most confident
  face overlapping the ground-truth box (it has the labels; see ``pipeline.choose_box``).
* BIWI: FSA-Net's per-sequence rules (``--biwi-tracking none|previous``), which need the frames in
  order, are applied here; dropped frames become rejections, reused boxes are marked.

Reading, cache look-ups and decoding run in a thread pool one chunk ahead of the detector, so CPU
decoding overlaps detection without holding the dataset's pixels in memory.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import codec
from .detectors import DetectionCache, create_detector, image_key_from_bytes, track_sequence
from .records import SampleRef


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headpose-dataprep" / "detections"


def _read(path: Path) -> tuple[str | None, bytes | None]:
    """(content key, file bytes) or (None, None) when the file cannot be read."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, None
    return image_key_from_bytes(data), data


def _decode(data: bytes) -> np.ndarray | None:
    """RGB image, or None when the bytes do not decode (the shard worker reports such files when
    it reads them)."""
    return codec.decode_rgb(data)


def _load(path: Path) -> tuple[str | None, np.ndarray | None]:
    """(content key, RGB image) or (None, None) when the file cannot be read; (key, None) when it
    does not decode."""
    key, data = _read(path)
    return (None, None) if data is None else (key, _decode(data))


def detect_all(refs: list[SampleRef], root: Path, detector, cache: DetectionCache | None, *, chunk: int = 64,
               threads: int = 2, progress: bool = True) -> dict[str, list]:
    """key -> list of Detection for every readable image (cache hits skip the detector).

    A thread pool prepares the next chunk while the detector works on this one (never more: two
    chunks of decoded images are all that is held in memory): it reads each file, looks its key
    up in the cache and decodes only the images the cache cannot answer (a rebuild with a warm
    cache decodes nothing here). The answer for each image is decided in order, on this thread,
    as if the look-ups were made just before the chunk's detection: a look-up that missed ahead
    of time is repeated (an earlier chunk may have stored the same image since), a hit stays a
    hit (the cache only grows).
    """
    out: dict[str, list] = {}
    chunks = [refs[i:i + chunk] for i in range(0, len(refs), chunk)]
    fingerprint = detector.fingerprint

    def prepare(ref):
        key, data = _read(root / ref.source)
        if data is None:
            return None, None, None
        hit = cache.get(key, fingerprint) if cache else None
        return (key, hit, None) if hit is not None else (key, None, _decode(data))

    bar = tqdm(total=len(refs), unit="img", desc=f"detect {detector.name}", disable=not progress)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        upcoming = iter(chunks)
        in_flight: deque = deque()

        def submit_next() -> None:
            chunk_refs = next(upcoming, None)
            if chunk_refs is not None:
                in_flight.append((chunk_refs, [pool.submit(prepare, ref) for ref in chunk_refs]))

        submit_next()
        while in_flight:
            chunk_refs, futures = in_flight.popleft()
            submit_next()
            prepared = [f.result() for f in futures]
            todo_images, todo = [], []
            for ref, (key, hit, image) in zip(chunk_refs, prepared):
                if hit is None:
                    if image is None:  # unreadable or undecodable: the shard worker reports it
                        continue
                    hit = cache.get(key, fingerprint) if cache else None
                if hit is not None:
                    out[ref.key] = hit
                    continue
                todo.append((ref, key))
                todo_images.append(image)
            if todo_images:
                for (ref, key), faces in zip(todo, detector.detect(todo_images)):
                    out[ref.key] = faces
                    if cache:
                        cache.put(key, fingerprint, faces)
            bar.update(len(chunk_refs))
    bar.close()
    return out


def biwi_decisions(refs: list[SampleRef], detections: dict[str, list], mode: str, image_size=(640, 480)) -> dict[str, dict]:
    """Apply FSA-Net's BIWI rules sequence by sequence (refs are in frame order)."""
    decisions = {}
    for group, frames in groupby(refs, key=lambda r: r.group):
        frames = list(frames)
        results = track_sequence([detections.get(r.key, []) for r in frames], image_size, mode)
        for ref, result in zip(frames, results):
            if result.rejected:
                why = {"no_face": "no face above the score threshold", "box_jump": "face box jumped 80 px or more from the previous accepted frame"}
                decisions[ref.key] = {"rejected": result.rejected, "message": f"{why.get(result.rejected, result.rejected)} (--biwi-tracking {mode})"}
            else:
                decisions[ref.key] = {"box": list(result.box), "score": float(result.score), "tracking": {"mode": mode, "reused": bool(result.reused)}}
    return decisions


def detect_boxes(refs: list[SampleRef], root: Path, settings, opts) -> tuple[dict[str, dict], str]:
    detector = create_detector(settings.detector, device=opts.device, batch_size=opts.batch_size,
                               retinaface_weights=opts.retinaface_weights)
    cache = DetectionCache(opts.cache_dir or default_cache_dir())
    detections = detect_all(refs, root, detector, cache, chunk=max(opts.batch_size * 4, 16), progress=opts.progress)
    if settings.dataset == "biwi":
        ordered = sorted(refs, key=lambda r: (r.group, r.source))
        return biwi_decisions(ordered, detections, settings.biwi_tracking or "previous"), detector.fingerprint
    return {key: {"detections": [d.to_json() for d in faces]} for key, faces in detections.items()}, detector.fingerprint
