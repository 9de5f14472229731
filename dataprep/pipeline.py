"""The per-sample stages, in order: read raw -> box -> crop -> augment -> encode, and the per-shard
worker that runs them and writes one shard. Everything here runs inside joblib workers, so it takes
plain picklable arguments (``Settings``, ``ShardTask``) and returns plain dicts.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import socket
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import numpy as np

from . import __version__, codec
from . import boxes as box_rules
from . import labels
from .augment import key_rng
from .crop import crop_and_resize
from .datasets import get_reader
from .datasets.common import display_path, non_utf8_name_problem, printable
from .detectors.tracking import MATCH_IOU
from .processes import pid_alive, process_start
from .records import RawSample, SampleError, SampleRef
from .shards import ShardWriter, dumps_json, write_json

PROGRESS_DIR = ".dataprep-progress"
RESULT_SUFFIX = ".json"  # a written shard's result (counts, rejections, checksums)
DECISIONS_SUFFIX = ".boxes.json"  # a shard's detector decisions, spooled by the box stage


def progress_file(base: str, shard: str, suffix: str) -> str:
    """A shard's file in the build's progress folder (``suffix``: ``RESULT_SUFFIX`` or
    ``DECISIONS_SUFFIX``)."""
    return posixpath.join(base, PROGRESS_DIR, shard + suffix)


@dataclass(frozen=True)
class Settings:
    """Every option that changes the bytes of a build (paths excluded: inputs are fingerprinted)."""

    dataset: str
    protocol: str
    angle_limit: float | None = None
    detector: str = "gt"
    detector_fingerprint: str | None = None
    biwi_tracking: str | None = None
    crop_rule: str = "square"
    margin: float = 0.0
    crop_size: int = 224
    jpeg_quality: int = 95
    seed: int = 0
    augment: tuple[str, ...] = ()
    shard_size: int = 1000
    split_assignment: str = ""  # sha256 of the split lists, so a new split never resumes an old build
    tool_version: str = __version__

    def fingerprint(self) -> str:
        return hashlib.sha256(dumps_json(asdict(self))).hexdigest()


@dataclass
class ShardTask:
    name: str
    split: str
    refs: list[SampleRef]
    #: the box stage's spooled decisions for these refs (key -> ``{"detections"}``, or ``{"box",
    #: "score", "tracking"}``, or ``{"rejected", "message"}``); None for gt. A path on the output filesystem, so the task stays small.
    decisions_file: str | None = None
    #: digest of the refs' input files as found when planned (``build.shard_inputs``); a resumed
    #: build redoes a finished shard whose inputs changed since
    inputs: str = ""
    #: the token of the build that planned the task (its ``--out`` lock, :data:`LOCK_FILE`); a worker
    #: that outlived its build finds another token there and writes nothing
    owner: str | None = None


#: One build at a time per ``--out``: ``host:pid:start:random`` of the build writing there
#: (``dataprep.build._out_lock``).
LOCK_FILE = ".dataprep.lock"


class LockLost(RuntimeError):
    """A shard worker whose build no longer holds ``--out`` (stopped, and another build took the
    folder over): it writes nothing more."""


def lock_token_fields(token: str) -> tuple[str, str, str]:
    """``(host, pid, start)`` of a build lock's token ``host:pid:start:random`` ("" for a field
    the token lacks: older versions wrote ``host:pid:random``, tests write a plain word)."""
    return tuple((token.split(":") + ["", "", ""])[:3])


def lock_holder(fs, base: str) -> str | None:
    """The token in ``base``'s lock file, or None."""
    try:
        return fs.cat_file(posixpath.join(base, LOCK_FILE)).decode("utf-8", "replace").strip()
    except OSError:
        return None


def build_alive(pid: int, start: str) -> bool:
    """Whether the build process ``pid`` (started at ``start``, if recorded) still runs here. This
    process is not it (a restarted container can get the pid of the build it replaces)."""
    if pid == os.getpid() or not pid_alive(pid):
        return False
    return not start or process_start(pid) in ("", start)


def running_build_pid(fs, base: str) -> int | None:
    """The pid of the build on this machine that holds ``base``'s lock and still runs, or None (no
    lock, a lock its build left behind, or another machine's, which cannot be checked from here)."""
    holder = lock_holder(fs, base)
    if not holder:
        return None
    host, pid, start = lock_token_fields(holder)
    return int(pid) if host == socket.gethostname() and pid.isdigit() and build_alive(int(pid), start) else None


def load_decisions(fs, task: ShardTask, settings_fingerprint: str) -> dict[str, dict]:
    """The task's detector decisions (empty for gt)."""
    if task.decisions_file is None:
        return {}
    spooled = json.loads(fs.cat_file(task.decisions_file))
    if spooled.get("settings") != settings_fingerprint:
        raise RuntimeError(f"{task.decisions_file} was written by another build; run the build again")
    return spooled["decisions"]


# ------------------------------------------------------------------------------------------ box
def choose_box(sample: RawSample, settings: Settings, decision: dict | None) -> tuple[dict, dict, str]:
    """Box stage: all box variants, their scores, and the name of the one the crop uses."""
    variants = {name: [float(v) for v in b] for name, b in sample.boxes.items()}
    scores: dict[str, float] = {}
    if settings.detector == "gt":
        source = box_rules.rule_box_name(variants, "gt", settings.crop_rule)
    else:
        if decision is not None and "detections" in decision:
            decision = _select_detection(decision["detections"], variants.get("gt"))
        if decision is None or decision.get("box") is None:
            raise SampleError("no_face", f"{sample.ref.source}: {settings.detector} found no face"
                              + (f" overlapping the ground-truth box by IoU >= {MATCH_IOU}" if "gt" in variants else ""))
        variants[settings.detector] = [float(v) for v in decision["box"]]
        scores[settings.detector] = float(decision["score"])
        source = settings.detector
    if source not in variants:
        raise SampleError("no_box", f"{sample.ref.source}: no '{source}' box for this sample")
    h, w = sample.image.shape[:2]
    problem = box_rules.box_problem(variants[source], (w, h))
    if problem:
        box = ", ".join(f"{v:.6g}" for v in variants[source])
        raise SampleError("bad_box", f"{sample.ref.source}: the '{source}' box [{box}] {problem}; "
                                     "check the sample's label file")
    return variants, scores, source


def _select_detection(detections: list[dict], reference_box) -> dict | None:
    """The detected face overlapping the ground-truth box most (``detectors.select_face``; the most
    confident face without one)."""
    from .detectors import Detection, select_face

    face = select_face([Detection.from_json(d) for d in detections], reference_box=reference_box)
    return None if face is None else {"box": list(face.box), "score": face.score}


# ----------------------------------------------------------------------------------------- crop
def label_record(sample: RawSample, split: str, variants: dict, scores: dict, source: str, crop: list[int], settings: Settings) -> dict:
    h, w = sample.image.shape[:2]
    record = {
        "key": sample.ref.key,
        "dataset": sample.ref.dataset,
        "split": split,
        "source": sample.ref.source,
        "group": sample.ref.group,
        "yaw": float(sample.yaw),
        "pitch": float(sample.pitch),
        "roll": float(sample.roll),
        "rotation": np.asarray(sample.rotation, dtype=np.float64).tolist(),
        "image_size": [int(w), int(h)],
        "boxes": variants,
        "box_source": source,
        "box": variants[source],
        "crop_rule": settings.crop_rule,
        "crop_margin": settings.margin,
        "crop": [int(v) for v in crop],
        "crop_size": [settings.crop_size, settings.crop_size],
        "augment": [],
        "extra": sample.extra,
    }
    if scores:  # detector builds only: an empty object has no column type (Parquet, Arrow refuse it)
        record["box_scores"] = scores
    return record


def crop_sample(sample: RawSample, split: str, settings: Settings, decision: dict | None, rng) -> tuple[np.ndarray, dict, np.ndarray | None, np.ndarray | None]:
    variants, scores, source = choose_box(sample, settings, decision)
    h, w = sample.image.shape[:2]
    # random crop parameters (Hopenet's k and view) where the split is training data, as the
    # paper's training draws them; the rule's fixed test-time window in a test split
    window = box_rules.crop_window(settings.crop_rule, variants[source], dataset=sample.ref.dataset, image_size=(w, h),
                                   rng=None if is_eval_split(split) else rng, margin=settings.margin)
    image, crop = crop_and_resize(sample.image, window, settings.crop_size)
    record = label_record(sample, split, variants, scores, source, crop, settings)
    if decision and decision.get("tracking"):
        record["tracking"] = decision["tracking"]
    depth = None
    if sample.depth is not None and "depth_box" in sample.extra:
        # The depth camera sees the head elsewhere than the RGB camera: its own box, square-padded
        # with --margin whatever --crop-rule (no paper has a depth crop rule to follow).
        depth_window = box_rules.square_pad(sample.extra["depth_box"], settings.margin)
        depth, depth_crop = crop_and_resize(sample.depth, depth_window, settings.crop_size)
        record["depth_crop"] = depth_crop
    landmarks = None if sample.landmarks is None else np.asarray(sample.landmarks, dtype=np.float32)
    return image, record, landmarks, depth


# -------------------------------------------------------------------------------------- augment
#: The splits that hold training data: the protocols' ``train`` and protocol none's ``all``. Every
#: other split (``test``, a ``--split-file``'s ``val`` ...) is evaluation data.
TRAINING_SPLITS = ("train", "all")


def is_eval_split(split: str) -> bool:
    """Whether a split holds evaluation data (any split but :data:`TRAINING_SPLITS`): no offline
    variants and no random crop draws there, since an evaluation must not score flipped copies or
    jittered crops. A ``--split-file``'s ``val`` is held out like ``test``."""
    return split not in TRAINING_SPLITS


def augment_variants(image, record, landmarks, settings: Settings, rng) -> list[tuple[np.ndarray, dict, np.ndarray | None]]:
    """The original plus, in training splits, one offline variant per ``--augment`` op (own key,
    same source): variants are training data, and a test split with flipped or blurred copies
    would score them too.

    Variants carry no depth map: the ops transform the RGB crop only, and a flipped image next to
    an unflipped depth crop would be wrong."""
    out = [(image, record, landmarks)]
    if settings.augment and not is_eval_split(record["split"]):
        from .augment import offline_variants

        for _suffix, img, rec, pts in offline_variants(image, record, landmarks, list(settings.augment), rng):
            out.append((img, {k: v for k, v in rec.items() if k != "depth_crop"}, pts))
    return out


# --------------------------------------------------------------------------------------- encode
def encode_sample(image: np.ndarray, record: dict, landmarks, depth, settings: Settings) -> dict[str, bytes]:
    try:
        members = {"__key__": record["key"], "jpg": codec.encode_jpeg_rgb(image, settings.jpeg_quality),
                   "json": dumps_json(record)}
        if depth is not None:
            members["depth.png"] = codec.encode_png(np.asarray(depth, dtype=np.uint16))
    except ValueError as err:
        raise SampleError("encode_failed", f"{record['source']}: {err}") from None
    if landmarks is not None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(landmarks, dtype=np.float32), allow_pickle=False)
        members["pts.npy"] = buf.getvalue()
    return members


# ---------------------------------------------------------------------------------- shard worker
def _named_as_readers_do(message: str, root: Path, source: str) -> str:
    """A rejection message from the stages after the read (``SOURCE: ...``) with the file named as
    the readers name it (the root folder's name and the path below it), so every message of a build
    names its file the same way."""
    return display_path(root, source) + message[len(source):] if message.startswith(source + ":") else message


def process_ref(reader, root: Path, ref: SampleRef, split: str, settings: Settings, decision: dict | None) -> list[dict[str, bytes]]:
    """All stages for one raw sample. Raises SampleError when it cannot be written."""
    name_problem = non_utf8_name_problem(root, ref.source)
    if name_problem:  # never read: its record's source would be a lone surrogate escape, not UTF-8
        raise SampleError("non_utf8_name", name_problem)
    sample = reader.read_sample(root, ref)  # first: a damaged or missing file is named, whatever BIWI's tracking decided
    if decision and decision.get("rejected"):
        raise SampleError(decision["rejected"], f"{ref.source}: {decision.get('message') or decision['rejected']}")
    limit = settings.angle_limit
    if limit is not None and not labels.angles_in_range(sample.yaw, sample.pitch, sample.roll, limit):
        raise SampleError(
            "angle_out_of_range",
            f"{ref.source}: yaw {sample.yaw:.2f}, pitch {sample.pitch:.2f}, roll {sample.roll:.2f} outside "
            f"[-{limit:g}, {limit:g}] (protocol {settings.protocol} filter)",
        )
    rng = key_rng(ref.key, settings.seed)
    image, record, landmarks, depth = crop_sample(sample, split, settings, decision, rng)
    variants = augment_variants(image, record, landmarks, settings, rng)
    return [encode_sample(img, rec, pts, depth if i == 0 else None, settings) for i, (img, rec, pts) in enumerate(variants)]


def run_shard(task: ShardTask, settings: Settings, root: str, out: str) -> dict:
    """Read, crop and encode every sample of one shard, stream it into the shard, and record the
    result. Samples go to the shard's temporary file as soon as they are encoded, so a worker
    holds one sample at a time whatever the shard size.

    Bad input never raises out of here: each failure becomes a ``rejected`` entry.
    """
    reader = get_reader(settings.dataset)
    root_path = Path(root)
    rejected: list[dict] = []
    written = 0
    fs, base = fsspec.core.url_to_fs(out)

    def check_owner() -> None:  # before starting, and before each thing that publishes
        if task.owner is None:
            return
        holder = lock_holder(fs, base)
        if holder is None:
            raise LockLost(f"{task.name}: {posixpath.join(base, LOCK_FILE)} is not there for this worker: is --out a "
                           "folder the workers share (on a cluster, a shared file system or a URL such as s3://...)?")
        if holder != task.owner:
            raise LockLost(f"{task.name}: the build that planned it no longer holds {posixpath.join(base, LOCK_FILE)} "
                           "(it was stopped, and another build took --out over): not written")

    check_owner()
    fingerprint = settings.fingerprint()
    decisions = load_decisions(fs, task, fingerprint)
    path = posixpath.join(base, task.name)
    with ShardWriter(fs, path) as writer:
        for ref in task.refs:
            try:
                members = process_ref(reader, root_path, ref, task.split, settings, decisions.get(ref.key))
            except SampleError as err:
                rejected.append({"key": ref.key, "source": printable(ref.source), "split": task.split,
                                 "reason": err.reason,
                                 "message": printable(_named_as_readers_do(err.message, root_path, ref.source))})
                continue
            except Exception as err:  # a bug or an input we did not foresee: keep going, say what happened
                last = traceback.extract_tb(err.__traceback__)[-1]
                rejected.append({
                    "key": ref.key, "source": printable(ref.source), "split": task.split, "reason": "unexpected_error",
                    "message": printable(f"{display_path(root_path, ref.source)}: {type(err).__name__}: {err} "
                                         f"(at {Path(last.filename).name}:{last.lineno}; please report)"),
                })
                continue
            for sample in members:
                writer.write(sample)
            written += 1
        check_owner()  # leaving the block by the exception drops the temporary file
        # every sample rejected: an empty shard all the same, so shard numbers have no gaps and a
        # brace pattern (train-{000000..000122}.tar) names files that exist
        shard = writer.close()
    result = {"name": task.name, "split": task.split, "read": len(task.refs), "written": written, "rejected": rejected}
    result.update(shard)
    progress = progress_file(base, task.name, RESULT_SUFFIX)
    check_owner()
    write_json(fs, progress, {"settings": fingerprint, "inputs": task.inputs, "result": result})
    if task.decisions_file is not None:  # written into the shard now; a resumed build decides again
        fs.rm(task.decisions_file)
    return result
