"""``dataprep build``: plan the shards of a dataset under a protocol, run the stages on joblib
workers, resume where an earlier run stopped, and write ``manifest.json`` and ``_info.json``."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import secrets
import socket
import sys
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from joblib import Parallel, delayed, parallel_config
from tqdm.auto import tqdm

from . import __version__, protocols, rejections
from . import boxes as box_rules
from .augment import augment_names
from .datasets import get_reader
from .devices import parse_device
from .errors import first_line
from .pipeline import (DECISIONS_SUFFIX, LOCK_FILE, PROGRESS_DIR, RESULT_SUFFIX, Settings, ShardTask, TRAINING_SPLITS, is_eval_split,
                       build_alive, lock_holder, lock_token_fields, progress_file, run_shard)
from .processes import children_without_ctrl_c, end_with_build, process_start
from .records import SampleRef, keys_apart_from_variants
from .shards import (INFO_FILE, MANIFEST, TMP_SUFFIX, dumps_json, final_name, folder_filesystem, is_shard_file,
                     shard_name, shard_split, unreachable, write_info, write_json)


def _is_build_output(name: str) -> bool:
    """Whether ``name`` in ``--out`` is a file a build writes: the only names ``--overwrite`` and
    the clean-up after a build remove (a user's own files in the folder are left alone)."""
    name = final_name(name)
    return is_shard_file(name) or name in (MANIFEST, INFO_FILE, PROGRESS_DIR)


class BuildError(RuntimeError):
    """A build that cannot start or finish; the message says what to do."""


@dataclass
class BuildOptions:
    dataset: str
    root: str
    out: str
    protocol: str = "1"
    detector: str | None = None  # None: the protocol's choice
    biwi_tracking: str | None = None  # None: the protocol's choice
    crop_rule: str = "square"
    margin: float = 0.0
    crop_size: int = 224
    jpeg_quality: int = 95
    shard_size: int = 1000
    seed: int = 0
    split_seed: int | None = None
    split_file: str | None = None
    augment: tuple[str, ...] = ()
    jobs: int = 1
    backend: str = "loky"
    scheduler: str | None = None  # dask scheduler / ray cluster address
    device: str = "auto"
    batch_size: int = 16
    retinaface_weights: str | None = None
    cache_dir: str | None = None
    overwrite: bool = False
    strict: bool = False
    progress: bool = True
    command: str = field(default_factory=lambda: " ".join(["dataprep"] + sys.argv[1:]))


def input_stats(reader, root: Path, refs: list[SampleRef]) -> dict[str, list[tuple]]:
    """Per ref key: ``(path, size, mtime_ns)`` of every file the ref is read from
    (``reader.input_files``, relative to ``root``; size and mtime None for a missing file). One stat
    per file, shared by the manifest's input fingerprint and each shard's resume check."""
    stats = {}
    for ref in refs:
        entries = []
        for rel in reader.input_files(root, ref):
            try:
                st = (root / rel).stat()
                entries.append((rel, st.st_size, st.st_mtime_ns))
            except OSError:
                entries.append((rel, None, None))
        stats[ref.key] = entries
    return stats


#: How :func:`input_fingerprint` is computed, its value's prefix: fingerprints are comparable only
#: when their schemes agree (builds before it hashed the images alone, with no prefix).
INPUT_FINGERPRINT_SCHEME = "files-v2"


def input_fingerprint(stats: dict[str, list[tuple]]) -> str:
    """``files-v2:`` + sha256 over the path and size of every input file, images and label files
    (no times: a copy of the same download gives the same fingerprint)."""
    digest = hashlib.sha256()
    for key in sorted(stats):
        for rel, size, _ in stats[key]:
            digest.update(f"{rel}\0{-1 if size is None else size}\n".encode("utf-8", "surrogateescape"))
    return f"{INPUT_FINGERPRINT_SCHEME}:{digest.hexdigest()}"


def shard_inputs(stats: dict[str, list[tuple]], refs: list[SampleRef]) -> str:
    """sha256 over the path, size and modification time of every file ``refs`` are read from: a
    file fixed, replaced or removed since a shard was written changes it."""
    digest = hashlib.sha256()
    for ref in refs:
        for rel, size, mtime in stats[ref.key]:
            digest.update((f"{rel}\0missing\n" if size is None else f"{rel}\0{size}\0{mtime}\n").encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _with_sequence_inputs(tasks: list[ShardTask], stats: dict[str, list[tuple]]) -> list[ShardTask]:
    """With BIWI tracking a frame's box depends on the frames before it in its sequence, which other
    shards may hold: each shard's input digest also covers every frame of its sequences, so a frame
    fixed anywhere in a sequence rewrites the shards of that sequence on a resumed build."""
    by_group: dict[str, list[SampleRef]] = {}
    for task in tasks:
        for ref in task.refs:
            by_group.setdefault(ref.group, []).append(ref)
    group_inputs = {group: shard_inputs(stats, refs) for group, refs in by_group.items()}
    out = []
    for task in tasks:
        groups = sorted({ref.group for ref in task.refs})
        combined = hashlib.sha256("\n".join([task.inputs] + [group_inputs[g] for g in groups]).encode()).hexdigest()
        out.append(replace(task, inputs=combined))
    return out


def plan_shards(assignment: dict[str, list[SampleRef]], shard_size: int) -> list[ShardTask]:
    """Contiguous chunks of each split's refs, in listing order: shard i holds refs [i*n, (i+1)*n)."""
    tasks = []
    for split in sorted(assignment):
        refs = assignment[split]
        for i in range(0, len(refs), shard_size):
            tasks.append(ShardTask(shard_name(split, i // shard_size), split, refs[i:i + shard_size]))
    return tasks


def _read_progress(fs, base: str) -> dict[str, dict]:
    """Shard name -> the progress entry (``settings``, ``inputs``, ``result``) an earlier run left in
    ``--out``'s progress folder; read once per build (unreadable entries are skipped: their shards
    are written again)."""
    entries = {}
    for path in fs.glob(progress_file(base, "*", RESULT_SUFFIX)):
        if path.endswith(DECISIONS_SUFFIX):
            continue
        try:
            entry = json.loads(fs.cat_file(path))
        except (ValueError, OSError):
            continue
        if _progress_entry_sound(entry):
            entries[posixpath.basename(path)[:-len(RESULT_SUFFIX)]] = entry
    return entries


def _progress_entry_sound(entry) -> bool:
    """Whether a progress entry has the shape a build writes and counts that add up (an edited or
    damaged one is skipped as an unreadable one is: its shard is written again)."""
    result = entry.get("result") if isinstance(entry, dict) else None
    if not isinstance(result, dict) or not isinstance(result.get("rejected"), list):
        return False
    counts = [result.get(k) for k in ("read", "written", "bytes")]
    if not all(isinstance(n, int) and n >= 0 for n in counts) or not isinstance(result.get("sha256"), str):
        return False
    return result["read"] == result["written"] + len(result["rejected"])


def _load_progress(fs, base: str, tasks: list[ShardTask], fingerprint: str, progress: dict[str, dict]) -> dict[str, dict]:
    """Results of shards a previous run of the same build completed (``progress``: same settings,
    same inputs, the shard file as written)."""
    done = {}
    for task in tasks:
        entry = progress.get(task.name)
        if entry is None:
            continue
        result = entry.get("result", {})
        if entry.get("settings") != fingerprint or entry.get("inputs") != task.inputs:
            continue  # other settings, or its input files changed since: written again
        if not _shard_intact(fs, posixpath.join(base, task.name), result):
            continue  # removed, truncated, damaged or replaced since: written again
        done[task.name] = result
    return done


#: Settings whose values are digests: named for what they stand for.
_DIGEST_SETTINGS = {"split_assignment": "the split lists (samples added to or removed from --root, or another split)", "detector_fingerprint": "the detector's weights or thresholds"}


def _settings_differences(old, settings: Settings | None, ignore: tuple[str, ...] = ()) -> str:
    """`` (crop_size 224 there, 112 now; ...)``: what differs between a manifest's settings and this
    build's (but the ``ignore`` keys), for the refusal message; "" when it cannot tell."""
    if not isinstance(old, dict) or settings is None:
        return ""
    new = {**asdict(settings), "augment": list(settings.augment)}
    parts = []
    for key in sorted(set(old) | set(new)):
        if key not in ignore and old.get(key) != new.get(key):
            parts.append(f"{_DIGEST_SETTINGS[key]} differ" if key in _DIGEST_SETTINGS
                         else f"{key} {old.get(key)!r} there, {new.get(key)!r} now")
    return f" ({'; '.join(parts)})" if parts else ""


def _shard_intact(fs, path: str, result: dict) -> bool:
    """Whether the shard at ``path`` is the one ``result`` records: its size, and on a local
    folder its sha256 too (a tar is padded to 10 KB records, so a damaged or replaced shard often
    keeps its size). On a remote store the size alone (reading every shard back would download
    the build); ``dataprep verify`` hashes them."""
    try:
        if fs.size(path) != result.get("bytes"):
            return False
        if not isinstance(fs, LocalFileSystem):
            return True
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == result.get("sha256")


def _refuse_other_build_early(out: str, settings: Settings, overwrite: bool) -> None:
    """:func:`_check_out_dir`'s refusal of a folder holding a build made with other options, when
    a setting known before the detector loads differs (loading MTCNN takes seconds; its weights'
    digest is the one setting left for the full check). Anything unclear is left to that check."""
    if overwrite:
        return
    try:
        fs, base = folder_filesystem(out)
        old = json.loads(fs.cat_file(posixpath.join(base, MANIFEST)))
    except Exception:  # noqa: BLE001 - no manifest, unreadable, unreachable: _check_out_dir says which
        return
    if isinstance(old, dict):
        differ = _settings_differences(old.get("settings"), settings, ignore=("detector_fingerprint",))
        if differ:
            raise _other_build(base, differ)


def _other_build(base: str, differ: str) -> BuildError:
    return BuildError(f"{base} already holds a build made with other options{differ}; pass --overwrite to replace "
                      "it, or choose another --out")


def _unrecorded_shards(names, recorded: set[str], splits: set[str]) -> list[str]:
    """The finished shard files among ``names`` (a folder's listing) of ``splits`` that are not in
    ``recorded`` (sorted): copied in, or left by another build."""
    return sorted(n for n in names if is_shard_file(n) and final_name(n) == n and n not in recorded
                  and shard_split(n) in splits)


def _some(names: list[str]) -> str:
    """The first three ``names`` and how many more, for a message."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

def _check_out_dir(fs, base: str, fingerprint: str, overwrite: bool, progress: dict[str, dict],
                   splits: set[str], settings: Settings | None = None) -> None:
    """Refuse a folder holding another build (finished: its manifest; interrupted before it wrote
    one: its ``progress``), or shard files of this build's ``splits`` no build recorded there (copied
    in: the build would mix with them or overwrite one), unless ``overwrite``, which removes the old
    build's files: its manifest, ``_info.json``, progress and the shard files of its splits and of
    ``splits`` (this build's). Other files, a user's ``mydata-000123.tar`` included, stay."""
    old = None
    manifest_path = posixpath.join(base, MANIFEST)
    if fs.exists(manifest_path):
        try:
            old = json.loads(fs.cat_file(manifest_path))
        except ValueError:
            old = None
        damaged = not isinstance(old, dict) or not isinstance(old.get("settings_fingerprint"), str)
        # every shard's own record says it is this build's: the manifest is written again at the end
        ours = bool(progress) and all(entry.get("settings") == fingerprint for entry in progress.values())
        if damaged and ours and not overwrite:
            print(f"note: {manifest_path} is damaged; the shards' records in {PROGRESS_DIR}/ are this build's, so "
                  "it resumes and writes the manifest again", file=sys.stderr)
            old = None
        elif damaged and not overwrite:
            raise BuildError(f"{manifest_path} is not a readable build manifest (damaged, or not dataprep's), and no "
                             "record of this build's shards is there to rebuild it from; pass --overwrite to replace "
                             "the build in that folder, or choose another --out")
        elif isinstance(old, dict) and old.get("settings_fingerprint") != fingerprint and not overwrite:
            raise _other_build(base, _settings_differences(old.get("settings"), settings))
    elif not overwrite and any(entry.get("settings") != fingerprint for entry in progress.values()):
        raise BuildError(f"{base} holds shards of an interrupted build made with other options, inputs or dataprep "
                         "version; run that command again to finish it (if this is that command, samples were added "
                         "to or removed from --root since: a build's shards follow its sample list), or pass "
                         "--overwrite to replace it, or choose another --out")
    old_shards = old.get("shards") if isinstance(old, dict) else None
    old_shards = old_shards if isinstance(old_shards, list) else []
    recorded = {s.get("name") for s in old_shards if isinstance(s, dict)} | set(progress)
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(base, detail=False)] if fs.exists(base) else []
    # a build was here (its progress folder is made before any shard): an unrecorded shard may be its
    # own, renamed into place just before it was killed, and is written again
    if not overwrite and not progress and not fs.exists(posixpath.join(base, PROGRESS_DIR)):
        foreign = _unrecorded_shards(names, recorded, splits)
        if foreign:
            raise BuildError(f"{base} holds shard files no dataprep build recorded there ({_some(foreign)}); a build "
                             "would mix with them or overwrite one: move them away, choose another --out, or pass "
                             "--overwrite to replace them")
    if overwrite:
        splits = set(splits) | {s.get("split") for s in old_shards if isinstance(s, dict)}
        splits |= {e["result"].get("split") for e in progress.values()}  # each checked as read (_read_progress)
        doomed = [n for n in names if (is_shard_file(n) and shard_split(n) in splits)
                  or (not is_shard_file(n) and _is_build_output(n))]
        # shards first and the manifest last: stopped part way, the folder still holds the record of
        # the old build's splits, so running --overwrite again finds its remaining shards (removed the
        # other way round, the ones left were known to no build, and stayed for good)
        for name in sorted(doomed, key=lambda n: (n == MANIFEST, not is_shard_file(n))):
            fs.rm(posixpath.join(base, name), recursive=True)


@contextmanager
def _parallel(opts: BuildOptions):
    """A joblib ``Parallel`` on the chosen backend. ``dask`` and ``ray`` run the same per-shard
    function on a cluster (``--scheduler ADDRESS``) or, without one, on a local cluster of
    ``--jobs`` single-threaded workers."""
    jobs = cpu_count() if opts.jobs in (0, -1) else opts.jobs
    if opts.backend == "dask":
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as err:
            raise BuildError("--backend dask needs the dask extra: uv sync --extra dask in the project's folder "
                             "(installed with pip: pip install 'headpose-dataprep[dask]')") from err
        if opts.scheduler:
            try:
                client = Client(opts.scheduler)
            except (OSError, TimeoutError) as err:
                raise BuildError(f"--scheduler {opts.scheduler}: cannot reach a dask scheduler there ({first_line(err)}); "
                                 "check the address and that `dask scheduler` runs and is reachable, or drop "
                                 "--scheduler for a local cluster of --jobs workers") from None
            cluster = None
        else:
            with children_without_ctrl_c():  # the build stops them on Ctrl-C
                cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
        try:
            with parallel_config(backend="dask"):
                yield Parallel(n_jobs=jobs, return_as="generator")
        finally:
            client.close()
            if cluster is not None:  # a client does not close a cluster it was given (left to exit, it logged errors)
                cluster.close()
        return
    if opts.backend == "ray":
        try:
            import ray
            from ray.util.joblib import register_ray
        except ImportError as err:
            raise BuildError("--backend ray needs the ray extra: uv sync --extra ray in the project's folder "
                             "(installed with pip: pip install 'headpose-dataprep[ray]')") from err
        ray.init(address=opts.scheduler, ignore_reinit_error=True)
        register_ray()
        with parallel_config(backend="ray"):
            yield Parallel(n_jobs=jobs, return_as="generator")
        return
    if opts.backend == "loky":  # each worker, from its start, ends with a build killed outright (kill -9)
        with parallel_config(backend="loky", initializer=end_with_build, initargs=(os.getpid(),)):
            yield Parallel(n_jobs=jobs, return_as="generator")
        return
    yield Parallel(n_jobs=jobs, backend=opts.backend, return_as="generator")


def resolve_settings(opts: BuildOptions, proto: protocols.DatasetProtocol, assignment: dict) -> Settings:
    detector = opts.detector or proto.detector
    tracking = None
    if opts.dataset == "biwi" and detector != "gt":
        tracking = opts.biwi_tracking or proto.biwi_tracking or "previous"
    split_lists = {s: [r.key for r in refs] for s, refs in sorted(assignment.items())}
    return Settings(
        dataset=opts.dataset,
        protocol=proto.protocol,
        angle_limit=proto.angle_limit,
        detector=detector,
        biwi_tracking=tracking,
        crop_rule=opts.crop_rule,
        margin=opts.margin,
        crop_size=opts.crop_size,
        jpeg_quality=opts.jpeg_quality,
        seed=opts.seed,
        augment=tuple(augment_names(opts.augment)),
        shard_size=opts.shard_size,
        split_assignment=hashlib.sha256(dumps_json(split_lists)).hexdigest(),
    )


#: Bounds of --crop-size and --margin: a crop past them (a window 21 times the face's side, or a
#: 4096 px JPEG per sample) is a typo, and every sample would fail to allocate it.
MAX_CROP_SIZE = 4096
MAX_MARGIN = 10.0


def check_options(opts: BuildOptions) -> None:
    """Refuse options no build can use, before anything is read (else every sample would be
    rejected, or the crops would be degenerate, deep inside the run)."""
    problems = []
    if not 8 <= opts.crop_size <= MAX_CROP_SIZE:  # above: every crop a memory error, sample by sample
        problems.append(f"--crop-size {opts.crop_size}: give the crop side in pixels, 8 to {MAX_CROP_SIZE}")
    if not (0 <= opts.margin <= MAX_MARGIN):  # NaN too
        problems.append(f"--margin {opts.margin}: give a fraction of the crop side per side, 0 to {MAX_MARGIN:g}")
    elif opts.margin and opts.crop_rule != "square":  # the other windows have their own margins
        problems.append(f"--margin {opts.margin} applies to --crop-rule square only, not {opts.crop_rule}: "
                        "build square crops with room (--margin 0.8) and re-crop at load time, or drop --margin")
    for option, seed in (("--seed", opts.seed), ("--split-seed", opts.split_seed)):
        if seed is not None and seed < 0:  # numpy's seeding takes none
            problems.append(f"{option} {seed}: give 0 or more")
    if opts.split_seed is not None and opts.split_file:
        problems.append("--split-seed and --split-file both choose the splits: give one")
    if opts.biwi_tracking and get_reader(opts.dataset).NAME != "biwi":
        problems.append(f"--biwi-tracking applies to BIWI only, not {opts.dataset}")
    if opts.scheduler and opts.backend not in ("dask", "ray"):
        problems.append(f"--scheduler {opts.scheduler} applies to --backend dask or ray, not {opts.backend}: "
                        "add --backend dask (or ray), or drop --scheduler")
    try:
        parse_device(opts.device)
    except ValueError as err:
        problems.append(str(err))
    if not 1 <= opts.jpeg_quality <= 100:
        problems.append(f"--jpeg-quality {opts.jpeg_quality}: give 1 to 100")
    if opts.shard_size < 1:
        problems.append(f"--shard-size {opts.shard_size}: give at least 1 raw sample per shard")
    if opts.batch_size < 1:
        problems.append(f"--batch-size {opts.batch_size}: give at least 1")
    if opts.jobs < -1:
        problems.append(f"--jobs {opts.jobs}: give 1 or more, or -1 (or 0) for all cores")
    if opts.augment:
        from .augment import parse_augment_spec

        try:
            parse_augment_spec(list(opts.augment))
        except ValueError as err:
            problems.append(f"--augment: {err}")
    if problems:
        raise BuildError("; ".join(problems))


def _keys_apart_from_variants(assignment: dict, refs: list[SampleRef], augment) -> tuple[dict, list[SampleRef]]:
    """``assignment`` and ``refs`` with no sample keyed as another's ``--augment`` variant
    (``KEY_flip``): :func:`records.keys_apart_from_variants` over every split at once."""
    from .augment import variant_suffixes

    flat = keys_apart_from_variants([r for split_refs in assignment.values() for r in split_refs],
                                    variant_suffixes(list(augment)))
    renamed = iter(flat)
    assignment = {split: [next(renamed) for _ in split_refs] for split, split_refs in assignment.items()}
    by_source = {r.source: r for r in flat}
    return assignment, [by_source.get(r.source, r) for r in refs]


def _open_out(out: str):
    """``--out`` as ``(filesystem, path)``, made if it is not there; BuildError saying what to do
    when it is a file, cannot be written or cannot be reached."""
    fs, base = folder_filesystem(out)
    try:  # fs.info, not fs.isfile: isfile answers False for a store it cannot reach
        out_is_file = fs.info(base).get("type") == "file"
    except FileNotFoundError:
        out_is_file = False
    except Exception as err:  # noqa: BLE001 - remote stores raise their own types (botocore, aiohttp, ...)
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            raise BuildError(f"--out {out}: cannot use it ({type(err).__name__}: {err}); give a folder you "
                             "can write to") from None
        raise BuildError(str(unreachable(out, err))) from None
    if out_is_file:
        raise BuildError(f"--out {out} is a file; give a folder (new, or one an earlier build of this dataset wrote)")
    fs.makedirs(base, exist_ok=True)
    return fs, base


def _run_shards(opts: BuildOptions, settings: Settings, root: Path, tasks: list[ShardTask],
                pending: list[ShardTask], done: dict) -> dict[str, dict]:
    """Every pending shard through the per-sample stages (:func:`pipeline.run_shard`), in this
    process or on ``--jobs`` workers, with a progress bar over all of ``tasks``. Shard name -> result."""
    results = {}
    bar = tqdm(total=sum(len(t.refs) for t in tasks), unit="sample", desc=f"build {opts.dataset}",
               disable=not opts.progress, initial=sum(len(t.refs) for t in tasks if t.name in done))
    try:
        with ExitStack() as stack:
            if opts.jobs == 1 and opts.backend == "loky":
                outputs = (run_shard(t, settings, str(root), opts.out) for t in pending)
            else:
                parallel = stack.enter_context(_parallel(opts))
                outputs = parallel(delayed(run_shard)(t, settings, str(root), opts.out) for t in pending)
            for result in outputs:
                results[result["name"]] = result
                bar.update(result["read"])
    finally:
        bar.close()
    return results


def _remove_leftovers(fs, base: str) -> None:
    """Temporary files of a run killed mid-write: the build's own beside the shards (not a user's
    ``*.tmp``), a lock token staged by a build killed as it took the lock, and any in the progress
    folder."""
    leftovers = [p for p in fs.glob(posixpath.join(base, "*" + TMP_SUFFIX)) if _is_build_output(posixpath.basename(p))]
    leftovers += fs.glob(posixpath.join(base, LOCK_FILE + ".*" + TMP_SUFFIX))  # a lock's staged token (_create_lock)
    for leftover in leftovers + fs.glob(posixpath.join(base, PROGRESS_DIR, "*" + TMP_SUFFIX)):
        fs.rm(leftover)


def build(opts: BuildOptions) -> dict:
    """Run a build; returns the manifest dict (also written to ``OUT/manifest.json``)."""
    reader = get_reader(opts.dataset)
    opts = replace(opts, dataset=reader.NAME)  # one name from here on ("hpdb", "BIWI" -> "biwi")
    check_options(opts)
    root = Path(opts.root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise BuildError(f"--root {root} {what}; point it at the unpacked dataset folder")
    if "://" not in opts.out and Path(opts.out).resolve() == root.resolve():
        raise BuildError(f"--out {opts.out} is the --root folder: the shards would go among the raw files; give "
                         "another folder")
    proto = protocols.load(opts.protocol, opts.dataset)
    refs = reader.list_samples(root)
    if not refs:
        raise BuildError(
            f"no {opts.dataset} samples found under {root}; --root should be the dataset's own folder "
            f"as unpacked ({reader.DEFAULT_ROOT_NAME}/)"
        )
    assignment = protocols.assign_splits(proto, refs, split_seed=opts.split_seed, split_file=opts.split_file)
    leaks = protocols.person_leaks(_split_groups(assignment), proto.same_person)
    if leaks:  # said now, not only in the summary at the end of a long build
        print(protocols.leak_line(leaks), file=sys.stderr)
    held_out = sorted(split for split in assignment if split != "test" and is_eval_split(split))
    if held_out:  # a --split-file's own names: say which side they are on
        print(f"note: split(s) {', '.join(held_out)} are evaluation data like test (no --augment variants, no random "
              f"crop draws); the training splits are {' and '.join(TRAINING_SPLITS)}", file=sys.stderr)
    settings = resolve_settings(opts, proto, assignment)
    if settings.augment:
        if all(is_eval_split(split) for split, split_refs in assignment.items() if split_refs):
            raise BuildError(f"--augment writes training variants, and this build has only evaluation data (splits: "
                             f"{', '.join(sorted(assignment))}); to train on it, build with --protocol none (one "
                             "split, all) or --split-file with a train list, or drop --augment")
        assignment, refs = _keys_apart_from_variants(assignment, refs, settings.augment)
    if opts.biwi_tracking and settings.detector == "gt":  # the protocol's detector counts too
        raise BuildError("--biwi-tracking applies to detector boxes (--detector mtcnn or retinaface); ground-truth "
                         "boxes are never missing or jumping: drop it")
    if opts.retinaface_weights and settings.detector != "retinaface":
        raise BuildError(f"--retinaface-weights applies to --detector retinaface; this build's boxes are "
                         f"{settings.detector}: add --detector retinaface, or drop --retinaface-weights")
    unused = [f"--{name.replace('_', '-')} {value}" for name, value in (("device", opts.device), ("batch_size", opts.batch_size))
              if settings.detector == "gt" and value != getattr(BuildOptions, name)]
    if unused:  # a note, not an error: scripts pass one --device to the builds of every dataset
        print(f"note: {' and '.join(unused)} apply to detectors; this build's boxes come from the labels (gt), so "
              f"{'they are' if len(unused) > 1 else 'it is'} not used", file=sys.stderr)
    stats = input_stats(reader, root, refs)
    tasks = [replace(t, inputs=shard_inputs(stats, t.refs)) for t in plan_shards(assignment, opts.shard_size)]
    if settings.biwi_tracking:
        tasks = _with_sequence_inputs(tasks, stats)

    box_stage = None
    if settings.detector != "gt":
        _refuse_other_build_early(opts.out, settings, opts.overwrite)
        from .box_stage import BoxStage

        box_stage = BoxStage(settings, opts)
        settings = replace(settings, detector_fingerprint=box_stage.fingerprint)

    fingerprint = settings.fingerprint()
    fs, base = _open_out(opts.out)
    with _out_lock(fs, base) as token:
        progress = _read_progress(fs, base)
        _check_out_dir(fs, base, fingerprint, opts.overwrite, progress, {t.split for t in tasks}, settings)
        if opts.overwrite:
            progress = {}  # removed with the rest of the old build
        fs.makedirs(posixpath.join(base, PROGRESS_DIR), exist_ok=True)
        tasks = [replace(t, owner=token) for t in tasks]

        done = _load_progress(fs, base, tasks, fingerprint, progress)
        pending = [t for t in tasks if t.name not in done]
        if done:
            checked = "size and sha256" if isinstance(fs, LocalFileSystem) else "size"
            print(f"resuming: {len(done)} of {len(tasks)} shard(s) were written by an earlier run of this build "
                  f"(checked against their recorded {checked}); {len(pending)} to write", file=sys.stderr)
        if box_stage is not None:  # box stage: every image's detections decided before the shards
            box_stage.spool(fs, base, tasks, pending, fingerprint)
        results = {**done, **_run_shards(opts, settings, root, tasks, pending, done)}  # read -> ... -> write
        _remove_leftovers(fs, base)
        ordered = [results[t.name] for t in tasks]
        manifest = make_manifest(opts, settings, proto, root, refs, ordered, fingerprint, input_fingerprint(stats),
                                 assignment)
        write_json(fs, posixpath.join(base, MANIFEST), manifest, indent=1)
        write_info(fs, base, f"{opts.dataset}-protocol{proto.protocol}", manifest["shards"])
        _warn_unlisted_shards(fs, base, manifest["shards"])
        return manifest


def _warn_unlisted_shards(fs, base: str, shards: list[dict]) -> None:
    """Say which shard files of this build's splits are in ``base`` though the build did not write
    them (copied in while it was interrupted, or numbered past its last shard): a reader globbing
    ``*.tar`` would take them in, and ``verify`` fails on them."""
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(base, detail=False)]
    stray = _unrecorded_shards(names, {s["name"] for s in shards}, {s["split"] for s in shards})
    if stray:
        print(f"warning: {base} holds shard files of this build's splits that it did not write ({_some(stray)}); a reader "
              "globbing *.tar would take them in, and dataprep verify fails on them: move them out of the folder",
              file=sys.stderr)


@contextmanager
def _out_lock(fs, base: str):
    """Hold ``base``'s lock while the build runs (yields its token), or say which build holds it:
    two builds writing one folder would write the same shards at once. The token is
    ``host:pid:start:random`` (``start``: the process's start time, so a reused pid is not taken for
    the build); a lock whose process is gone on this machine is taken over, one from another
    machine must be deleted by hand (the message says so). On a local folder the lock file is
    created exclusively: of two builds starting together one wins; on a remote store the last
    writer wins and reads its token back."""
    path = posixpath.join(base, LOCK_FILE)
    host = socket.gethostname()
    holder = lock_holder(fs, base)
    if holder is not None and not _LOCK_TOKEN.fullmatch(holder):  # empty (an older version's), or not ours
        raise BuildError(f"{path} holds no dataprep build's token ({holder[:40]!r}): a build stopped as it took the "
                         "lock, or the file is not dataprep's; if no build is writing to this folder, delete it and "
                         "run this command again")
    if holder:
        their_host, pid, start = lock_token_fields(holder)
        if their_host != host:
            raise BuildError(f"a dataprep build on {their_host} (pid {pid}) is writing to {base}; if it is no longer "
                             f"running, delete {path} and run this command again")
        if pid.isdigit() and build_alive(int(pid), start):
            raise BuildError(f"another dataprep build (pid {pid}) is writing to {base}; wait for it to finish (or stop "
                             f"it), then run this command again (no build running? delete {path})")
        fs.rm(path)  # its build is gone
    token = f"{host}:{os.getpid()}:{process_start(os.getpid())}:{secrets.token_hex(4)}"
    if not _create_lock(fs, base, token):
        raise BuildError(f"another dataprep build started writing to {base} just now; wait for it to finish, then "
                         "run this command again")
    try:
        yield token
    finally:
        if lock_holder(fs, base) == token:
            fs.rm(path)


#: A lock's token: ``host:pid:start:random`` (``start`` may be empty where the system does not say;
#: older versions wrote ``host:pid:random``).
_LOCK_TOKEN = re.compile(r"[^:\s]+:[0-9]+(:[^:]*)?:[0-9a-f]+")


def _create_lock(fs, base: str, token: str) -> bool:
    """Write ``token`` as ``base``'s lock unless another build's is there; whether it is ours."""
    path = posixpath.join(base, LOCK_FILE)
    if isinstance(fs, LocalFileSystem):
        # written in full under another name, then linked into place: a build killed (or a disk full)
        # between creating the lock and writing its token left an empty lock that no build could tell
        # from a live one's
        staged = f"{path}.{token.rsplit(':', 1)[-1]}.tmp"
        with open(staged, "wb") as f:
            f.write(token.encode())
        try:
            os.link(staged, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: created exclusively, then written
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(token.encode())
        finally:
            with contextlib.suppress(FileNotFoundError):  # a finishing build may have cleared it up
                os.unlink(staged)
        return True
    fs.pipe_file(path, token.encode())
    return lock_holder(fs, base) == token


def _split_groups(assignment: dict) -> dict[str, list[str]]:
    """Split -> the groups (BIWI sequences, 300W-LP subsets) its samples come from."""
    return {split: sorted({r.group for r in split_refs}) for split, split_refs in sorted(assignment.items())}


def make_manifest(opts, settings: Settings, proto, root: Path, refs, results: list[dict], fingerprint: str,
                  inputs: str, assignment: dict | None = None) -> dict:
    shards = [
        {"name": r["name"], "split": r["split"], "samples": r["samples"], "written": r["written"], "sha256": r["sha256"], "bytes": r["bytes"]}
        for r in results
    ]
    rejected = [entry for r in results for entry in r["rejected"]]
    # every split of the assignment, read or not: a split none of whose samples are under --root
    # shows as zeros, not missing
    zeros = dict.fromkeys(("read", "written", "rejected", "samples"), 0)
    per_split: dict[str, Counter] = {split: Counter(zeros) for split in assignment or {}}
    for r in results:
        c = per_split.setdefault(r["split"], Counter(zeros))
        c["read"] += r["read"]
        c["written"] += r["written"]
        c["rejected"] += len(r["rejected"])
        c["samples"] += r["samples"]
    # which groups (BIWI sequences, 300W-LP subsets) each split holds: a seeded or user split can be
    # reported as it was, not only as the digest in settings
    split_groups = _split_groups(assignment or {})
    leaks = protocols.person_leaks(split_groups, proto.same_person)
    expected = {} if opts.split_file else proto.expected
    if expected.get("groups"):  # the protocol counts sequences (BIWI): how many are here
        for split, groups in split_groups.items():
            per_split.setdefault(split, Counter())["groups"] = len(groups)
    counts = {
        "read": sum(c["read"] for c in per_split.values()),
        "written": sum(c["written"] for c in per_split.values()),
        "rejected": len(rejected),
        "samples_in_shards": sum(c["samples"] for c in per_split.values()),
        "in_no_split": len(refs) - sum(c["read"] for c in per_split.values()),
        "per_split": {s: dict(c) for s, c in sorted(per_split.items())},
        "rejected_by_reason": dict(sorted(Counter(e["reason"] for e in rejected).items())),
    }
    options = {k: v for k, v in asdict(opts).items() if k not in ("command", "progress")}
    options["augment"] = list(opts.augment)
    return {
        "format": "headpose-dataprep/manifest-1",
        "tool": "headpose-dataprep",
        "tool_version": __version__,
        "command": opts.command,
        "options": options,
        "settings": {**asdict(settings), "augment": list(settings.augment)},
        "settings_fingerprint": fingerprint,
        "seed": opts.seed,
        "dataset": opts.dataset,
        "protocol": proto.protocol,
        "input": {"root": str(root.resolve()), "files": len(refs), "fingerprint": inputs},
        "expected": expected,  # the protocol's counts (not a split file's)
        "shards": shards,
        "counts": counts,
        "split_groups": split_groups,
        "person_leaks": leaks,
        "rejected": rejected,
    }


def _short_of_expected(expected: dict, counts: dict, field: str) -> list[tuple[str, int, int]]:
    """``(split, expected, counted)`` for each split whose ``field`` count (``written``, ``groups``)
    differs from the protocol's expected one."""
    got = {split: c.get(field, 0) for split, c in counts["per_split"].items()}
    return [(split, want, got.get(split, 0)) for split, want in sorted(expected.get(field, {}).items())
            if got.get(split, 0) != want]


def summary_table(manifest: dict) -> str:
    """Plain-text summary: per split read / written / rejected, then rejections by reason."""
    counts = manifest["counts"]
    rows = [("split", "read", "written", "rejected", "in shards")]
    for split, c in counts["per_split"].items():
        rows.append((split, c.get("read", 0), c.get("written", 0), c.get("rejected", 0), c.get("samples", 0)))
    rows.append(("total", counts["read"], counts["written"], counts["rejected"], counts["samples_in_shards"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    line = lambda r: "  ".join(str(v).ljust(widths[0]) if i == 0 else str(v).rjust(widths[i]) for i, v in enumerate(r))  # noqa: E731
    out = [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
    if counts["rejected_by_reason"]:
        out.append("")
        out.append("rejected by reason (each sample in manifest.json's rejected list):")
        for reason, n in counts["rejected_by_reason"].items():
            example = next(e for e in manifest["rejected"] if e["reason"] == reason)
            out.append(f"  {reason:<22} {n:>7}   e.g. {example['message']}")
            action = rejections.advice(reason)
            if action:
                out.append(f"  {'':<22} {'':>7}   what to do: {action}")
    if counts["read"] and not counts["written"]:
        out.append("")
        out.append(f"warning: all {counts['read']} samples read were rejected (reasons above): the shards are empty. "
                   "Check --root and --dataset, and the first message of each reason.")
    if counts.get("in_no_split"):
        out.append("")
        source = "the --split-file" if manifest.get("options", {}).get("split_file") else f"protocol {manifest['protocol']}"
        out.append(f"note: {counts['in_no_split']} of the {manifest['input']['files']} samples under --root are in no split "
                   f"of {source}, so they were not read (in_no_split in manifest.json).")
    groups = manifest.get("split_groups") or {}
    if len(groups) > 1:  # which sequences went where (a seeded split is known only from here)
        out.append("")
        out.append("groups per split: " + "; ".join(f"{split} {len(g)} ({', '.join(g)})" for split, g in groups.items()))
    if manifest.get("person_leaks"):
        out.append("")
        out.append(protocols.leak_line(manifest["person_leaks"]))
    expected = manifest.get("expected", {})
    if expected.get("read") and expected["read"] != counts["read"]:
        out.append("")
        out.append(f"note: the full {manifest['dataset']} download has {expected['read']} samples; this root has {counts['read']}, "
                   "so the published numbers are not comparable to a model trained or tested on this build.")
    elif expected.get("read"):  # the full download: the papers' counts must come out
        for split, want, got in _short_of_expected(expected, counts, "written"):
            out.append("")
            out.append(f"warning: protocol {manifest['protocol']} keeps {want} {split} samples of the full "
                       f"{manifest['dataset']} download (the papers' count); this build wrote {got}. Check the "
                       "rejected list above: the published numbers are not comparable to a model tested on it.")
    for split, want, got in _short_of_expected(expected, counts, "groups"):
        out.append("")
        out.append(f"note: protocol {manifest['protocol']}'s {split} split is {want} sequences of the full "
                   f"{manifest['dataset']} download; this root has {got} of them, so the published numbers "
                   "are not comparable to a model trained or tested on this build.")
    room = _recrop_room_note(manifest.get("settings", {}))
    if room:
        out.append("")
        out.append(room)
    shards = manifest["shards"]
    out.append("")
    out.append(f"{len(shards)} shard(s), {sum(s['bytes'] for s in shards) / 1e6:.1f} MB -> manifest.json, _info.json")
    return "\n".join(out)


def _recrop_room_note(settings: dict) -> str | None:
    """Which crop rules a load-time re-crop of these square crops cannot fill (``boxes.ROOM_MARGIN``)."""
    rule = settings.get("crop_rule")
    if rule != "square":  # re-crops start from the stored window, whatever rule made it
        return (f"note: these are {rule} crops; re-cropped at load time to another rule they come out partly "
                f"black; build --crop-rule square --margin {max(box_rules.ROOM_MARGIN.values())} to train every "
                "model from one set of shards")
    margin = float(settings.get("margin") or 0.0)
    short = {rule: m for rule, m in box_rules.ROOM_MARGIN.items() if m > margin + 1e-9}
    if not short:
        return None
    needs = ", ".join(f"{rule} {m}" for rule, m in sorted(short.items()))
    return (f"note: re-cropped at load time to the {' or '.join(sorted(short))} rule, these crops come out "
            f"partly black; build with --margin {max(short.values())} to train every model from one set "
            f"of shards (needs: {needs})")


def cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
