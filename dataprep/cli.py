"""The ``dataprep`` command: ``build``, ``verify``, ``sample``, ``audit``, ``protocols``.

Exit status, as ``python -m train_minimal``'s (README, "Exit status"): 0 done; 1 done, and problems
found (``verify``, ``build --strict``); 2 not done: a usage error (argparse's) or one error line."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from . import __version__
from .augment import SPEC_NAMES
from .boxes import CROP_RULES
from .errors import INTERRUPTED, first_line, report_crash
from .records import DATASETS


def _dataset_name(text: str) -> str:
    """argparse type of ``--dataset``: the names as papers and download pages write them are taken
    too (``300W-LP``, ``AFLW2000-3D``, ``BIWI``), any case, ``-`` for ``_``; argparse's choices then
    refuse anything else."""
    name = text.strip().lower().replace("-", "_")
    return {"300wlp": "300w_lp", "aflw2000_3d": "aflw2000"}.get(name, name)


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="raw dataset -> WebDataset shards", description=(
        "Read a raw dataset, box, crop and augment every sample, and write tar shards plus "
        "manifest.json and _info.json. Example: dataprep build --dataset biwi --protocol 2 --root hpdb --out shards/biwi-p2"))
    p.add_argument("--dataset", required=True, type=_dataset_name, choices=DATASETS,
                   help="300w_lp, aflw2000 or biwi (any case; 300W-LP and AFLW2000-3D are taken too)")
    p.add_argument("--root", required=True, help="the dataset's folder as unpacked: 300W_LP/, AFLW2000/ or hpdb/")
    p.add_argument("--out", required=True, help="output folder or fsspec URL")
    p.add_argument("--protocol", default="1", type=str.lower,
                   help="benchmark protocol (dataprep/manifests/; `dataprep protocols` lists them): 1, 2 or none (default 1)")
    p.add_argument("--detector", choices=("gt", "mtcnn", "retinaface"), default=None,
                   help="face boxes: gt (from the labels) or a detector; default: the protocol's (mtcnn for BIWI in "
                        "protocols 1 and 2, gt otherwise)")
    p.add_argument("--biwi-tracking", choices=("none", "previous"), default=None,
                   help="BIWI detector box rules of FSA-Net; default: none under protocol 1, previous under protocols 2 and none")
    p.add_argument("--crop-rule", choices=sorted(CROP_RULES), default="square", help="crop window rule (default square)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="extra context around a square crop, fraction of its side per side (default 0)")
    p.add_argument("--crop-size", type=int, default=224, help="side of the stored square crops, in pixels (default 224)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the stored crops, 1-100 (default 95)")
    p.add_argument("--shard-size", type=int, default=1000, help="raw samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (crop jitter, augmentation; default 0)")
    p.add_argument("--split-seed", type=int, default=None, help="seeded random split by person instead of the fixed one")
    p.add_argument("--split-file", default=None, help='JSON {"by": "group"|"source"|"key", "train": [...], "test": [...]}')
    p.add_argument("--augment", default="",
                   help=("offline variants to add next to each sample of the training splits (train, all; not test, "
                         f"val or other held-out splits), comma-separated from: {', '.join(SPEC_NAMES)}"))
    p.add_argument("--jobs", "-j", type=int, default=1, help="parallel workers (default 1; -1 or 0: all cores)")
    p.add_argument("--backend", default="loky", choices=("loky", "threading", "dask", "ray"),
                   help="joblib backend (default loky: local processes); dask and ray spread a build over a cluster")
    p.add_argument("--scheduler", default=None, help="dask scheduler or ray cluster address (default: a local cluster of --jobs workers)")
    p.add_argument("--device", default="auto", help="detector device: auto (a GPU when torch sees one, else cpu), cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--batch-size", type=int, default=16, help="detector batch size (default 16)")
    p.add_argument("--retinaface-weights", default=None,
                   help="retinaface_resnet50_2020-07-20 file (.zip or .pth); default: the one in the torch hub checkpoint "
                        "cache (TORCH_HOME/hub/checkpoints)")
    p.add_argument("--cache-dir", default=None, help="detection cache folder (default ~/.cache/headpose-dataprep/detections)")
    p.add_argument("--overwrite", action="store_true", help="replace a build made with other options in --out")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any sample is rejected")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI); the summary table still prints")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_build(args) -> int:
    from .build import BuildError, BuildOptions, build, summary_table
    from .pipeline import LockLost
    from .detectors import DetectorWeightsError

    opts = BuildOptions(
        dataset=args.dataset, root=args.root, out=args.out, protocol=str(args.protocol), detector=args.detector,
        biwi_tracking=args.biwi_tracking, crop_rule=args.crop_rule, margin=args.margin, crop_size=args.crop_size,
        jpeg_quality=args.jpeg_quality, shard_size=args.shard_size, seed=args.seed, split_seed=args.split_seed,
        split_file=args.split_file, augment=tuple(a for a in args.augment.split(",") if a), jobs=args.jobs,
        backend=args.backend, scheduler=args.scheduler, device=args.device, batch_size=args.batch_size,
        retinaface_weights=args.retinaface_weights, cache_dir=args.cache_dir, overwrite=args.overwrite,
        strict=args.strict, progress=not args.no_progress,
    )
    start = time.perf_counter()
    # SIGTERM (timeout, docker stop, a batch scheduler) ends the build as Ctrl-C does: workers
    # stopped, the lock on --out released, finished shards kept for the rerun
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread (an embedding program): its own handlers stay
        previous = None
    try:
        manifest = build(opts)
    except (BuildError, DetectorWeightsError, LockLost, ValueError) as err:
        print(f"dataprep build: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"dataprep build: error: {_os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "the same command again without --overwrite" if args.overwrite else "the same command again"
        print(f"\ndataprep build: interrupted. The shards finished so far are kept: run {again} to resume",
              file=sys.stderr)
        if opts.backend == "threading":
            # the pool's threads cannot be stopped: still in OpenCV as the interpreter exits, they
            # made it abort (C++ "terminate called ...", status 134) most times. End now, as a killed
            # build does: the lock is released, and the rerun removes their temporary shards
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPTED)
        return INTERRUPTED
    except BrokenProcessPool as err:  # a worker process died (out of memory, killed): joblib's TerminatedWorkerError
        print(f"dataprep build: error: a worker process died ({first_line(err)}); the shards finished so "
              "far are kept: run the same command again to resume (with fewer --jobs if memory ran out)", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    elapsed = time.perf_counter() - start
    settings = manifest["settings"]
    tracking = f", tracking {settings['biwi_tracking']}" if settings.get("biwi_tracking") else ""  # as `protocols` says
    print(f"\n{args.dataset}, protocol {manifest['protocol']}, boxes: {settings['detector']}{tracking}, "
          f"crop: {args.crop_rule} {args.crop_size}px -> {args.out}  ({elapsed:.1f} s)")
    print(summary_table(manifest))
    if args.strict and manifest["counts"]["rejected"]:  # the build ran and found problems, as a failed verify
        print(f"--strict: {manifest['counts']['rejected']} sample(s) rejected", file=sys.stderr)
        return 1
    return 0


#: Problems ``verify`` prints (a badly damaged folder can have thousands; all are counted).
VERIFY_SHOWN = 50


def cmd_verify(args) -> int:
    from .shards import FolderURLError
    from .verify import verify

    try:
        report = verify(args.out, decode=not args.hash_only)
    except FolderURLError as err:  # no folder there, or a URL that cannot be opened or reached
        print(f"dataprep verify: error: {err}", file=sys.stderr)
        return 2
    if report.ok:
        done = "listed" if args.hash_only else "decoded"
        print(f"OK: {report.shards_checked} shard(s), {report.samples_checked} sample(s) {done}, hashes match {args.out}/manifest.json")
        return 0
    for problem in report.problems[:VERIFY_SHOWN]:
        print(f"FAIL: {problem}", file=sys.stderr)
    hidden = len(report.problems) - VERIFY_SHOWN
    more = f" (first {VERIFY_SHOWN} shown, {hidden} more not)" if hidden > 0 else ""
    print(f"{len(report.problems)} problem(s) in {args.out}{more}; {report.shards_checked} shard(s) checked", file=sys.stderr)
    if report.repair:
        print(report.repair, file=sys.stderr)
    return 1


def cmd_sample(args) -> int:
    from .sample_data import write_sample_tree

    try:
        expected = write_sample_tree(Path(args.out), seed=args.seed)
    except OSError as err:
        what = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
        print(f"dataprep sample: error: cannot write the sample tree ({what}); give --out a new or empty folder",
              file=sys.stderr)
        return 2
    counts = {k: len(v) for k, v in expected.items() if isinstance(v, list)}
    print(f"sample raw data written to {args.out}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return 0


def cmd_protocols(args) -> int:
    from .protocols import manifests

    try:
        found = manifests()
    except ValueError as err:
        print(f"dataprep protocols: error: {err}", file=sys.stderr)
        return 2
    for data in found:
        limit = data.get("angle_limit")
        print(f"{data['name']:>5}  {data.get('title', '')}"
              + (f" (samples with an angle outside [-{limit:g}, {limit:g}] dropped)" if limit else ""))
        for dataset, entry in data["datasets"].items():
            splits = {k: (v if isinstance(v, str) else len(v)) for k, v in entry["splits"].items() if k != "by"}
            print(f"         {dataset:<9} splits {splits}  boxes: {entry.get('detector', 'gt')}"
                  + (f", tracking {entry['biwi_tracking']}" if entry.get("biwi_tracking") else ""))
    return 0


#: What to do about the operating system errors a build meets most (errno -> advice).
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or choose another --out); the shards finished so far are kept, "
                  "run the same command again to resume",
    errno.EDQUOT: "the disk quota is used up: free space (or choose another --out); the shards finished so far are "
                  "kept, run the same command again to resume",
    errno.EACCES: "no permission: choose an --out you can write to, and a --root you can read (or fix the "
                  "permissions)",
    errno.EPERM: "not permitted: choose an --out you can write to, and a --root you can read",
    errno.EROFS: "a read-only file system: choose another --out",
    errno.ENOTDIR: "a part of that path is a file, not a folder: check --out, --root and --cache-dir",
    errno.EISDIR: "move it out of --out and run the same command again",
}


def _os_error_line(err: OSError) -> str:
    """One line for an operating system error of a build: what failed on which file, and what to do."""
    if err.strerror is None:  # raised with its own message (e.g. a --root that is not a folder)
        return str(err)
    where = f" ({err.filename})" if err.filename else ""
    advice = _OS_ADVICE.get(err.errno)
    return f"{err.strerror}{where}" + (f"; {advice}" if advice else "")


def _printable_streams() -> None:
    """File names that are not valid UTF-8 (Python keeps their bytes as lone surrogates) print as
    ``\\udcff`` escapes instead of ending the command with a UnicodeEncodeError after its work."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # not a text stream we may reconfigure (tests' capture)
            pass


def main(argv=None) -> int:
    _printable_streams()
    parser = argparse.ArgumentParser(prog="dataprep", description="Head-pose datasets to verified WebDataset shards.")
    parser.add_argument("--version", action="version", version=f"headpose-dataprep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    p = sub.add_parser("verify", help="re-hash shards against the manifest and decode every record")
    p.add_argument("out", help="the --out folder (or URL) of a dataprep build")
    p.add_argument("--hash-only", action="store_true", help="skip decoding records: compare sha256, sample keys and metadata only")
    p = sub.add_parser("sample", help="write a small raw tree of all three datasets in their real formats")
    p.add_argument("--out", required=True, help="a new or empty folder; gets 300W_LP/, AFLW2000/ and hpdb/")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated faces and labels (default 0)")
    sub.add_parser("protocols", help="list the benchmark protocols (dataprep/manifests/)")
    from .audit import add_parser as add_audit

    add_audit(sub)
    args = parser.parse_args(argv)
    handlers = {"build": cmd_build, "verify": cmd_verify, "sample": cmd_sample, "protocols": cmd_protocols}
    handler = args.handler if args.command == "audit" else handlers[args.command]
    try:
        rc = handler(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
        return rc
    except KeyboardInterrupt:  # Ctrl-C in verify, audit, sample ... (build says more itself): one line, no traceback
        print(f"\ndataprep {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `dataprep ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except Exception as err:  # noqa: BLE001 - a crash: traceback, advice, and exit 2, never "problems found"
        return report_crash(f"dataprep {args.command}", err)


if __name__ == "__main__":
    sys.exit(main())
