"""``dataprep verify OUT``: re-hash every shard against the manifest, decode every record, and check
the manifest, ``_info.json`` and the folder agree. Every problem is reported, not just the first."""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np

from . import codec, labels
from .pipeline import LOCK_FILE, PROGRESS_DIR, running_build_pid
from .shards import INFO_FILE as INFO
from .shards import (MANIFEST, TMP_SUFFIX, FolderURLError, folder_filesystem, info_splits, is_shard_file,
                     manifest_shape_problems, split_member, unreachable)


@dataclass
class VerifyReport:
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[str] = field(default_factory=list)
    #: What to do about shards that are missing or damaged (None when none is).
    repair: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _decode_member(ext: str, data: bytes, key: str) -> None:
    """Decode one member of sample ``key`` by its extension (as webdataset splits names); others
    are not checked."""
    if ext == "json":
        record = json.loads(data)
        for k in ("key", "yaw", "pitch", "roll", "rotation", "box", "crop", "source"):
            if k not in record:
                raise ValueError(f"label record lacks {k!r}")
        if record["key"] != key:
            raise ValueError("record key differs from the member name")
        for angle in ("yaw", "pitch", "roll"):  # what every reader takes from a record
            problem = labels.angle_problem(record, angle, limit=labels.MAX_ANGLE)
            if problem:
                raise ValueError(problem)
        problem = labels.rotation_problem(record)  # the matrix a 6D / matrix model trains on
        if problem:
            raise ValueError(problem)
    elif ext == "jpg":
        image, damage = codec.decode_rgb_checked(data)
        if damage is not None:
            raise ValueError(damage)
        if image is None:
            raise ValueError("JPEG does not decode")
    elif ext == "pts.npy":
        try:
            np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError):  # numpy's own words would advise unpickling the bytes
            kind = ("an array of pickled objects, not numbers" if data[:6] == b"\x93NUMPY" and b"'|O'" in data[:128]
                    else "damaged or not .npy data")
            raise ValueError(f"landmarks do not load ({kind})") from None
    elif ext == "depth.png":
        damage = codec.damaged_png(data)
        if damage is not None:
            raise ValueError(damage)
        depth = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if depth is None or depth.dtype != np.uint16:
            raise ValueError("depth PNG does not decode to 16 bits")


class _Hashing:
    """Hashes what is read through it: one pass over a shard gives both its sha256 and its members."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        return data

    def hexdigest(self) -> str:
        while self.read(1 << 22):  # the rest: tar end padding, or all of it after a parse error
            pass
        return self.sha256.hexdigest()


#: The members every sample has: its image and its label record.
REQUIRED_MEMBERS = frozenset({"jpg", "json"})


def check_shard(fileobj, decode: bool = True) -> tuple[list[str], list[str]]:
    """Walk a shard's members, decoding each when ``decode``: returns its sample keys (one per group
    of adjacent members, as webdataset groups them) and every problem found."""
    keys: list[str] = []
    seen: set[str] = set()
    exts: set[str] = set()  # the current sample's member extensions
    problems: list[str] = []

    def sample_done() -> None:
        if keys and not exts >= REQUIRED_MEMBERS:
            missing = " and ".join(f".{e}" for e in sorted(REQUIRED_MEMBERS - exts))
            problems.append(f"sample {keys[-1]!r} has no {missing} member (readers that expect the image and its "
                            "label record fail on it)")

    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or name.startswith("/") or ".." in name.split("/"):
                    problems.append(f"member {name!r} is not a plain relative file")
                    continue
                key, ext = split_member(name)
                ext = ext.lower() if ext else ext  # webdataset lower-cases suffixes
                if key is None:
                    problems.append(f"member {name!r} has no extension: webdataset readers skip it")
                    continue
                if not keys or keys[-1] != key:
                    sample_done()
                    if key in seen:  # readers group adjacent members only: this sample comes out twice
                        problems.append(f"sample {key!r} appears again after other samples ({name})")
                    seen.add(key)
                    keys.append(key)
                    exts = set()
                if ext in exts:  # two samples of one name side by side: webdataset refuses the shard
                    problems.append(f"member {name!r} appears twice in sample {key!r}")
                exts.add(ext)
                if not decode:
                    continue
                try:
                    data = tar.extractfile(member).read()
                    _decode_member(ext, data, key)
                except Exception as err:  # noqa: BLE001 - report any decode failure
                    problems.append(f"sample {key!r} ({name}): {err}")
            sample_done()
    except Exception as err:  # noqa: BLE001 - a damaged archive is a finding, not a crash
        problems.append(f"not a readable tar after {len(keys)} sample(s): {err}")
    return keys, problems


def _rerun_paths(manifest: dict, base: str) -> str:
    """The folders to rerun the recorded build command with: ``--out`` the folder verified, and
    ``--root`` the absolute input root when it was typed relative (from another working directory
    the command as recorded names another folder, or none)."""
    root = manifest.get("input", {}).get("root") if isinstance(manifest.get("input"), dict) else None
    typed = manifest.get("options", {}).get("root") if isinstance(manifest.get("options"), dict) else None
    if isinstance(root, str) and isinstance(typed, str) and not posixpath.isabs(typed) and "://" not in typed:
        return f"--root {root} --out {base}"
    return f"--out {base}"


def _folder_problems(fs, base: str, listed: set[str] | None, command: str | None, paths: str) -> list[str]:
    """``.tmp`` shards an interrupted build left, and (``listed``: the manifest's shard names) shard
    files the manifest does not list, which a reader globbing ``*.tar`` would take in. The user's
    own files are left alone."""
    try:
        names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(base, detail=False))
    except FileNotFoundError:
        return []
    # the recorded command names the folder it was run with; this one may have moved since
    rerun = f" (as recorded in {MANIFEST}: {command})" if command else ""
    problems = []
    for name in filter(is_shard_file, names):
        if name.endswith(TMP_SUFFIX):
            problems.append(f"{name}: left by an interrupted build; rerun the same build command{rerun} "
                            f"with {paths} to finish it")
        elif listed is not None and name not in listed:
            problems.append(f"{name}: a shard file the manifest does not list (from another build, or your own?); a "
                            "reader globbing *.tar would take it in: move it out of the folder")
    return problems


def _manifest_problems(manifest: dict) -> list[str]:
    """The manifest's own counts must agree with its shard list."""
    problems = []
    counts, shards = manifest.get("counts", {}), manifest.get("shards", [])
    if counts.get("read") != counts.get("written", 0) + counts.get("rejected", 0):
        problems.append(f"{MANIFEST}: counts do not add up: read {counts.get('read')} != written "
                        f"{counts.get('written')} + rejected {counts.get('rejected')}")
    in_shards = sum(s["samples"] for s in shards)
    if "samples_in_shards" in counts and counts["samples_in_shards"] != in_shards:
        problems.append(f"{MANIFEST}: counts.samples_in_shards is {counts['samples_in_shards']}, its shards hold {in_shards}")
    rejected = manifest.get("rejected", [])
    if "rejected" in counts and len(rejected) != counts["rejected"]:
        problems.append(f"{MANIFEST}: counts.rejected is {counts['rejected']}, its rejected list names {len(rejected)} "
                        "sample(s)")
    by_reason = Counter(e.get("reason") for e in rejected if isinstance(e, dict))
    if "rejected_by_reason" in counts and dict(by_reason) != counts["rejected_by_reason"]:
        problems.append(f"{MANIFEST}: counts.rejected_by_reason does not match its rejected list")
    per_split = counts.get("per_split", {})
    for split in sorted(set(per_split) | {s["split"] for s in shards}):
        said = per_split.get(split, {}).get("samples", 0)
        held = sum(s["samples"] for s in shards if s["split"] == split)
        if said != held:
            problems.append(f"{MANIFEST}: split {split!r} counts {said} samples, its shards hold {held}")
    return problems


def _info_problems(fs, base: str, shards: list[dict]) -> list[str]:
    """``_info.json`` (what timm's reader trusts for sizes) must describe the manifest's shards."""
    path = posixpath.join(base, INFO)
    if not fs.exists(path):
        return [f"{INFO}: missing; rerun the same build command to write it"]
    try:
        info = json.loads(fs.cat_file(path))
    except ValueError as err:
        return [f"{INFO}: unreadable ({err})"]
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict) or not all(isinstance(s, dict) for s in splits.values()):
        return [f"{INFO}: has no \"splits\" object of one object per split (edited, or not dataprep's)"]
    problems = []
    want = info_splits(shards)
    for split in sorted(set(want) | set(splits)):
        got, exp = splits.get(split), want.get(split)
        if got is None or exp is None:
            where = INFO if got is None else MANIFEST
            problems.append(f"{INFO}: split {split!r} is missing from {where}")
            continue
        for key in ("num_samples", "filenames", "shard_lengths"):
            if got.get(key) != exp[key]:
                problems.append(f"{INFO}: split {split!r} {key} {_difference(got.get(key), exp[key])}")
    return problems


def _difference(got, want) -> str:
    """How ``got`` differs from ``want``, for a one-line message: lists by their first differing
    entry (their heads alone can be the same)."""
    if isinstance(got, list) and isinstance(want, list):
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        at = (f"entry {i} is {got[i]!r} where the manifest's shards give {want[i]!r}" if i < min(len(got), len(want))
              else "the entries agree as far as both go")
        return f"differs from the manifest's shards: {at} ({len(got)} entries against {len(want)})"
    return f"is {got!r}, the manifest's shards give {want!r}"


class BuildRunning(FolderURLError):
    """A build on this machine is writing to the folder: nothing to check yet, not a finding."""


def verify(out: str, decode: bool = True) -> VerifyReport:
    """Check a build folder; ``decode=False`` (``--hash-only``) compares hashes and metadata and
    lists each shard's sample keys, but decodes no record. ``FolderURLError`` when ``out`` is no
    folder at all (missing, a file, a store that does not answer), :class:`BuildRunning` when a build
    is writing to it: nothing to check, not a finding."""
    fs, base = folder_filesystem(out, "verify")
    report = VerifyReport()
    problems = report.problems
    manifest_path = posixpath.join(base, MANIFEST)
    try:
        there = fs.exists(base)
    except Exception as err:  # noqa: BLE001 - remote stores raise their own types (botocore, aiohttp, ...)
        raise unreachable(out, err, "verify") from None
    if not there:
        raise FolderURLError(f"{base}: no such folder; give the --out folder of a dataprep build")
    if fs.isfile(base):  # a shard, or the manifest, given instead of its folder
        parent = posixpath.dirname(base.rstrip("/")) or "."
        hint = (f" (the build's folder is {parent})" if fs.exists(posixpath.join(parent, MANIFEST)) else "")
        raise FolderURLError(f"{base}: a file, not a folder; give the --out folder of a dataprep build{hint}")
    pid = running_build_pid(fs, base)
    if pid is not None:  # its .tmp shards and the manifest it has not written yet are no findings
        raise BuildRunning(f"{base}: a dataprep build (pid {pid}) is writing to it now; verify it after that build "
                           f"finishes (no build running? delete {posixpath.join(base, LOCK_FILE)})")
    if not fs.exists(manifest_path):
        if fs.exists(posixpath.join(base, PROGRESS_DIR)):  # a build made it before its first shard
            problems.append(f"{manifest_path}: no manifest yet: a build is running here or was interrupted; let it "
                            "finish, or run its command again to finish it (it resumes), then verify")
        else:
            problems.append(f"{manifest_path}: no manifest; is this a dataprep build folder?")
        problems += _folder_problems(fs, base, None, None, f"--out {base}")
        return report
    try:
        manifest = json.loads(fs.cat_file(manifest_path))
    except ValueError as err:
        problems.append(f"{manifest_path}: unreadable ({err}); rerun the build to write it again")
        return report
    shape = manifest_shape_problems(manifest)
    if shape:  # an edited or foreign file: none of its fields can be trusted to check the shards by
        problems += [f"{MANIFEST}: {p}" for p in shape]
        report.repair = f"rerun the build (--out {base}) to write the manifest again"
        return report
    shards = manifest["shards"]
    problems += _manifest_problems(manifest)
    problems += _info_problems(fs, base, shards)
    metadata_problems = bool(problems)
    paths = _rerun_paths(manifest, base)
    problems += _folder_problems(fs, base, {s["name"] for s in shards}, manifest.get("command"), paths)

    first_shard: dict[str, str] = {}  # sample key -> the shard it was first seen in
    before = len(problems)
    for shard in shards:
        name = shard["name"]
        path = posixpath.join(base, name)
        report.shards_checked += 1
        if not fs.exists(path):
            problems.append(f"{name}: missing")
            continue
        if not fs.isfile(path):  # a folder, a pipe (reading one would wait for ever) ...
            problems.append(f"{name}: not a regular file ({fs.info(path).get('type', 'other')}); move it out of the way")
            continue
        with fs.open(path, "rb") as f:
            reader = _Hashing(f)
            keys, shard_problems = check_shard(reader, decode)
            digest = reader.hexdigest()
        report.samples_checked += len(keys)
        if digest != shard["sha256"]:
            problems.append(f"{name}: sha256 {digest[:16]}... differs from the manifest's {shard['sha256'][:16]}...")
        problems += [f"{name}: {p}" for p in shard_problems]
        if len(keys) != shard["samples"]:
            problems.append(f"{name}: holds {len(keys)} samples, the manifest says {shard['samples']}")
        # A key in two shards: readers see two samples under one key (merged into one if they meet
        # at a shard boundary), and anything keyed by sample goes wrong.
        for key in dict.fromkeys(keys):
            if first_shard.setdefault(key, name) != name:
                problems.append(f"{name}: sample key {key!r} is also in {first_shard[key]}")
    command = manifest.get("command")
    # the recorded command names the folder it was run with, which may have moved since
    again = f" (`{command}`, with {paths})" if isinstance(command, str) and command else f" with {paths}"
    # the shards' records are what a rerun keeps shards by; without them it writes every shard again
    kept = fs.exists(posixpath.join(base, PROGRESS_DIR))
    if len(problems) > before:
        report.repair = f"to rewrite missing or damaged shards, run the build again{again}: " + (
            "it keeps the intact ones (checked by size and sha256 on a local folder, by size alone on a remote store)"
            if kept else f"it writes every shard again ({PROGRESS_DIR}/, its record of the shards, was deleted)")
    elif metadata_problems:  # the shards are sound: a rerun keeps them all and writes both files again
        report.repair = (f"to write {MANIFEST} and {INFO} again, run the build again{again}"
                         + ("" if kept else f": it writes every shard again ({PROGRESS_DIR}/ was deleted)"))
    return report
