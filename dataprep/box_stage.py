"""Box stage with a detector: run it over the images shard by shard (batched, cached), then decide
each sample's face box and spool the decisions beside the shards for the shard workers.

* 300W-LP / AFLW2000: every detection is handed to the shard worker, which picks the face
  overlapping the ground-truth box most (it has the labels; see ``pipeline.choose_box``). Only one
  shard's detections are in memory at a time, so memory does not grow with the dataset.
* BIWI: FSA-Net's per-sequence rules (``--biwi-tracking none|previous``), which need every frame of a
  sequence in order (a random split spreads a sequence over splits and shards), are applied to the
  whole dataset at once; BIWI has 15,678 frames, a few MB of decisions. Dropped frames become
  rejections, reused boxes are marked.

Reading, cache look-ups and decoding run in a thread pool one chunk ahead of the detector, so CPU
decoding overlaps detection without holding the dataset's pixels in memory.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from . import codec
from .datasets import get_reader
from .datasets.common import read_file_bytes
from .detectors import DetectionCache, create_detector, image_key_from_bytes, track_sequence
from .detectors.tracking import DEFAULT_MAX_JUMP
from .pipeline import DECISIONS_SUFFIX, ShardTask, progress_file
from .records import SampleRef


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headpose-dataprep" / "detections"


def _read(path: Path) -> tuple[str | None, bytes | None]:
    """(content key, file bytes) or (None, None) when the file cannot be read."""
    try:
        data = read_file_bytes(path)  # not a pipe: that would block the build forever
    except OSError:
        return None, None
    return image_key_from_bytes(data), data


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).
    Each shard's decoded images, detections and decisions are freed once it is spooled, but glibc
    keeps freed heap pages mapped, and without this the main process grew by ~2 KB per sample
    (+36 MB over 19,200 samples) although it held nothing more."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def detect_all(refs: list[SampleRef], root: Path, detector, cache: DetectionCache | None, *, chunk: int = 64,
               threads: int = 2, progress: bool = True, bar=None,
               pool: ThreadPoolExecutor | None = None,
               expected_size: Callable[[SampleRef], tuple[int, int] | None] | None = None) -> dict[str, list]:
    """key -> list of Detection for every readable image (cache hits skip the detector).

    ``expected_size``: ref -> the (width, height) its labels are in, or None; an image whose
    header says another size is left out as an unreadable one is (the shard worker rejects it as
    ``wrong_image_size``).

    A thread pool prepares the next chunk while the detector works on this one (never more: two
    chunks of decoded images are all that is held in memory): it reads each file, looks its key
    up in the cache and decodes only the images the cache cannot answer (a rebuild with a warm
    cache decodes nothing here). The answer for each image is decided in order, on this thread,
    as if the look-ups were made just before the chunk's detection: a look-up that missed ahead
    of time is repeated (an earlier chunk may have stored the same image since), a hit stays a
    hit (the cache only grows).

    ``bar`` and ``pool``: a progress bar and a thread pool shared by several calls, left open.
    """
    out: dict[str, list] = {}
    chunks = [refs[i:i + chunk] for i in range(0, len(refs), chunk)]
    fingerprint = detector.fingerprint

    def prepare(ref):
        key, data = _read(root / ref.source)
        if data is None:
            return None, None, None
        want = expected_size(ref) if expected_size else None
        if want is not None and codec.header_size(data) not in (None, tuple(want)):
            return None, None, None
        hit = cache.get(key, fingerprint) if cache else None
        return (key, hit, None) if hit is not None else (key, None, codec.decode_rgb_capped(data))

    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(refs), unit="img", desc=f"detect {detector.name}", disable=not progress)
    with ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=threads))
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
            todo_images, todo = [], {}  # image key -> the refs showing that image (detected once)
            for ref, (key, hit, image) in zip(chunk_refs, prepared):
                if hit is None:
                    if image is None:  # unreadable, undecodable or resized: the shard worker reports it
                        continue
                    hit = cache.get(key, fingerprint) if cache else None
                if hit is not None:
                    out[ref.key] = hit
                    continue
                if key not in todo:
                    todo[key] = []
                    todo_images.append(image)
                todo[key].append(ref)
            if todo_images:
                for (key, same), faces in zip(todo.items(), detector.detect(todo_images)):
                    for ref in same:
                        out[ref.key] = list(faces)
                    if cache and cache.write_error is None:
                        _store(cache, key, fingerprint, faces)
            bar.update(len(chunk_refs))
    if own_bar:
        bar.close()
    return out


def _store(cache: DetectionCache, key: str, fingerprint: str, faces: list) -> None:
    """Cache one image's detections. A cache that cannot be written (a read-only shared folder, a
    full disk, a file where a folder belongs) is used read-only from then on, said once: the
    detections are in the build's shards, only a rebuild detects again."""
    try:
        cache.put(key, fingerprint, faces)
    except OSError as exc:
        cache.write_error = exc
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"warning: the detection cache {cache.directory} cannot be written: {exc.strerror or exc}{where}; "
              "the build goes on without storing detections there (--cache-dir chooses another folder)",
              file=sys.stderr)


def biwi_decisions(refs: list[SampleRef], detections: dict[str, list], mode: str, image_size=(640, 480)) -> dict[str, dict]:
    """Apply FSA-Net's BIWI rules sequence by sequence (refs are in frame order). A frame without
    detections (its image could not be read or decoded, or is not the size of its sequence's
    frames) gets no decision and is no frame to the tracking: the shard worker reads it and rejects
    it for what it is (``unreadable_image``, ``corrupt_image``, ``wrong_image_size``), not as a
    frame without a face, and its box (in another pixel grid) is never reused for the next frames."""
    decisions = {}
    for group, frames in groupby(refs, key=lambda r: r.group):
        frames = [r for r in frames if r.key in detections]
        results = track_sequence([detections[r.key] for r in frames], image_size, mode)
        for ref, result in zip(frames, results):
            if result.rejected:
                why = {"no_face": "no face above the score threshold",
                       "box_jump": f"face box jumped {DEFAULT_MAX_JUMP:g} px or more from the previous accepted frame"}
                decisions[ref.key] = {"rejected": result.rejected, "message": f"{why.get(result.rejected, result.rejected)} (--biwi-tracking {mode})"}
            else:
                decisions[ref.key] = {"box": list(result.box), "score": float(result.score), "tracking": {"mode": mode, "reused": bool(result.reused)}}
    return decisions


class BoxStage:
    """The detector's part of a build: create the detector (its fingerprint joins the build settings
    before anything runs), then decide the boxes of the shards still to write and spool them to
    ``<shard>.boxes.json`` in the build's progress folder, where the shard worker reads them (any
    worker that can write the shards can read them, local or on a cluster)."""

    def __init__(self, settings, opts) -> None:
        self.settings = settings
        self.opts = opts
        self.detector = create_detector(settings.detector, device=opts.device, batch_size=opts.batch_size,
                                        retinaface_weights=opts.retinaface_weights)
        self.cache = DetectionCache(opts.cache_dir or default_cache_dir())
        self.fingerprint: str = self.detector.fingerprint

    def _detect(self, refs: list[SampleRef], bar, pool) -> dict[str, list]:
        # a picture of another size than the reader requires (which it rejects) is not detected:
        # 16 upscaled ones in a batch took GBs, and a resized BIWI frame's box, in its own pixel
        # grid, was reused for the next frames of its sequence
        root, image_size = Path(self.opts.root), get_reader(self.settings.dataset).image_size
        return detect_all(refs, root, self.detector, self.cache, chunk=max(self.opts.batch_size * 4, 16), bar=bar,
                          pool=pool, expected_size=lambda ref: image_size(root, ref))

    @contextmanager
    def _detecting(self, total: int):
        """A progress bar over ``total`` images and one reading pool, shared by every
        :meth:`_detect` call of the stage."""
        with tqdm(total=total, unit="img", desc=f"detect {self.detector.name}", disable=not self.opts.progress) as bar, \
                ThreadPoolExecutor(max_workers=2) as pool:
            yield bar, pool

    def decide(self, tasks: list[ShardTask], pending: list[ShardTask]) -> Iterator[tuple[ShardTask, dict[str, dict]]]:
        """(task, key -> decision) for each pending task, one task at a time."""
        if self.settings.dataset == "biwi":
            # the sequence rules see every frame, also those of shards an earlier run wrote
            refs = sorted((r for t in tasks for r in t.refs), key=lambda r: (r.group, r.source))
            with self._detecting(len(refs)) as (bar, pool):
                detections = self._detect(refs, bar, pool)
            decisions = biwi_decisions(refs, detections, self.settings.biwi_tracking or "previous")
            del detections
            for task in pending:
                yield task, {r.key: decisions.pop(r.key) for r in task.refs if r.key in decisions}
            return
        # one shard's detections at a time
        with self._detecting(sum(len(t.refs) for t in pending)) as (bar, pool):
            for task in pending:
                detections = self._detect(task.refs, bar, pool)
                yield task, {key: {"detections": [d.to_json() for d in faces]} for key, faces in detections.items()}

    def spool(self, fs, base: str, tasks: list[ShardTask], pending: list[ShardTask], settings_fingerprint: str) -> None:
        """Decide the pending tasks' boxes and write each task's decisions file (``task.decisions_file``)."""
        for task, decisions in self.decide(tasks, pending):
            path = progress_file(base, task.name, DECISIONS_SUFFIX)
            with fs.open(path, "wb") as f:
                f.write(json.dumps({"settings": settings_fingerprint, "decisions": decisions},
                                   separators=(",", ":")).encode())
            task.decisions_file = path
            _return_freed_memory()
