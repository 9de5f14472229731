"""Build throughput: ``dataprep build`` vs the bare work it cannot avoid, on the same images.

Cases (each measured in a fresh subprocess, interleaved round-robin, median of the repeats):

* ``ours gt, 1 job`` / ``ours gt, N jobs``: ``dataprep.build.build`` (in-process, ``--detector gt``)
  on a replicated 300W-LP tree. ``N jobs cold`` is a fresh process (includes starting the joblib
  workers, as the CLI does); ``N jobs warm`` is a second build in the same process (workers reused).
* ``bare decode+crop+encode``: ``cv2.imdecode`` of the JPEG bytes (already in memory) + the square
  crop (windows computed beforehand) + ``cv2.resize`` + ``cv2.imencode`` at the same quality: the
  limit of a gt build, on 1 process and on N forked processes started before the clock.
* ``ours mtcnn``: a build with ``--detector mtcnn --device cpu`` and a fresh detection cache, vs
  ``bare mtcnn``: ``create_detector("mtcnn", device="cpu").detect`` on the same decoded images with
  the same batch size. ``ours mtcnn cached`` rebuilds with the now-filled cache.

Ratios in the final JSON line: ``gt_1job_vs_bare`` and ``gt_njobs_vs_bare`` (ours / bare, higher is
better, 1.0 = at the limit), ``mtcnn_overhead`` (ours / bare - 1, target <= 0.15).

    python benchmarks/build.py            # ~3 min on 2 cores
    python benchmarks/build.py --quick    # ~40 s
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from benchmarks import common  # noqa: E402

MODES = {
    #        gt copies (x20 samples), mtcnn copies (x20), repeats, shard size
    "full": dict(gt_copies=20, mtcnn_copies=2, repeats=3, shard_size=50),
    "quick": dict(gt_copies=5, mtcnn_copies=1, repeats=1, shard_size=25),
    "smoke": dict(gt_copies=1, mtcnn_copies=1, repeats=1, shard_size=5, mtcnn_images=4),
}
BATCH_SIZE = 16
QUALITY = 95
CROP_SIZE = 224


# --------------------------------------------------------------------------------------------
# Measurements (run in subprocesses by common.run_isolated)
# --------------------------------------------------------------------------------------------
def _options(root, out, jobs, shard_size, **kw):
    from dataprep.build import BuildOptions

    return BuildOptions(dataset="300w_lp", root=str(root), out=str(out), jobs=jobs, shard_size=shard_size,
                        progress=False, overwrite=True, command="benchmark", **kw)


def measure_ours(root: str, scratch: str, jobs: int, shard_size: int, warm: bool = False) -> dict:
    """One gt build (``warm``: after an untimed one in the same process, so workers are up)."""
    from dataprep.build import build

    out = Path(tempfile.mkdtemp(dir=scratch))
    if warm:
        build(_options(root, out / "warmup", jobs, shard_size))
    start = time.perf_counter()
    manifest = build(_options(root, out / "timed", jobs, shard_size))
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "samples": manifest["counts"]["read"], "written": manifest["counts"]["written"]}


def _windows(root: str, limit: int | None = None):
    """(jpeg bytes, integer crop window) per sample: the gt square window, computed untimed."""
    import numpy as np
    import scipy.io

    from dataprep import boxes

    items = []
    for jpg, mat in common.raw_pairs(Path(root))[:limit]:
        pts = np.asarray(scipy.io.loadmat(str(mat))["pt2d"], dtype=np.float64).T
        box = [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]
        items.append((jpg.read_bytes(), boxes.integer_window(boxes.square_pad(box))))
    return items


_ITEMS: list = []


def _bare_one(i: int) -> int:
    import cv2
    import numpy as np

    data, (x1, y1, x2, y2) = _ITEMS[i]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        canvas = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        canvas[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = image[sy1:sy2, sx1:sx2]
        region = canvas
    else:
        region = image[y1:y2, x1:x2]
    interp = cv2.INTER_AREA if region.shape[0] > CROP_SIZE else cv2.INTER_LINEAR
    crop = cv2.resize(region, (CROP_SIZE, CROP_SIZE), interpolation=interp)
    ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    return len(buf)


def _bare_chunk(indices) -> int:
    return sum(_bare_one(i) for i in indices)


def measure_bare_codec(root: str, jobs: int) -> dict:
    """Decode + crop + resize + encode of every image, nothing else, on ``jobs`` processes."""
    import cv2

    _ITEMS[:] = _windows(root)
    n = len(_ITEMS)
    if jobs == 1:
        start = time.perf_counter()
        for i in range(n):
            _bare_one(i)
        seconds = time.perf_counter() - start
    else:
        cv2.setNumThreads(1)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs) as pool:
            pool.map(_bare_chunk, [[0]] * jobs)  # workers up before the clock starts
            chunks = [list(range(i, min(i + 16, n))) for i in range(0, n, 16)]
            start = time.perf_counter()
            sum(pool.imap_unordered(_bare_chunk, chunks))
            seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": n}


def measure_ours_mtcnn(root: str, scratch: str, shard_size: int, device: str = "cpu") -> dict:
    """A build with MTCNN and a fresh detection cache; then a rebuild answered by that cache."""
    import facenet_pytorch  # noqa: F401  (imports are not what we measure)
    import torch

    from dataprep.build import build

    tmp = Path(tempfile.mkdtemp(dir=scratch))
    kw = dict(detector="mtcnn", device=device, batch_size=BATCH_SIZE, cache_dir=str(tmp / "cache"))
    start = time.perf_counter()
    manifest = build(_options(root, tmp / "out", 1, shard_size, **kw))
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    build(_options(root, tmp / "out2", 1, shard_size, **kw))
    cached = time.perf_counter() - start
    shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": seconds, "cached_seconds": cached, "samples": manifest["counts"]["read"],
            "written": manifest["counts"]["written"], "torch_threads": torch.get_num_threads()}


def measure_bare_mtcnn(root: str, device: str = "cpu") -> dict:
    """The detector alone on the same images, decoded beforehand, same batch size."""
    import cv2
    import numpy as np

    from dataprep.detectors import create_detector

    images = [cv2.cvtColor(cv2.imdecode(np.fromfile(j, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
              for j, _ in common.raw_pairs(Path(root))]
    detector = create_detector("mtcnn", device=device, batch_size=BATCH_SIZE)
    start = time.perf_counter()
    found = detector.detect(images)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": len(images), "faces": sum(len(f) for f in found)}


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = common.base_parser("dataprep build vs bare decode/encode and bare MTCNN")
    p.add_argument("--jobs", type=int, default=None, help="the 'all cores' job count (default: all cores)")
    p.add_argument("--no-mtcnn", action="store_true", help="skip the MTCNN cases")
    args = p.parse_args(argv)
    mode = common.mode_of(args)
    cfg = MODES[mode]
    repeats = args.repeats or cfg["repeats"]
    jobs = args.jobs or common.cpu_count()
    work = common.work_dir("build", args.work)
    try:
        gt_root, gt_n = common.scaled_dataset(work, "300w_lp", cfg["gt_copies"])
        mt_root, mt_n = common.scaled_dataset(work, "300w_lp", cfg["mtcnn_copies"])
        if "mtcnn_images" in cfg:  # smoke: a tree with only the first few images
            mt_root = _subset(work, mt_root, cfg["mtcnn_images"])
            mt_n = cfg["mtcnn_images"]
        scratch = str(work / "scratch")
        os.makedirs(scratch, exist_ok=True)
        ss = cfg["shard_size"]
        iso = common.run_isolated
        cases = {
            "ours gt, 1 job": lambda: iso("benchmarks.build:measure_ours", root=str(gt_root), scratch=scratch, jobs=1, shard_size=ss),
            f"ours gt, {jobs} jobs cold": lambda: iso("benchmarks.build:measure_ours", root=str(gt_root), scratch=scratch, jobs=jobs, shard_size=ss),
            f"ours gt, {jobs} jobs warm": lambda: iso("benchmarks.build:measure_ours", root=str(gt_root), scratch=scratch, jobs=jobs, shard_size=ss, warm=True),
            "bare codec, 1 proc": lambda: iso("benchmarks.build:measure_bare_codec", root=str(gt_root), jobs=1),
            f"bare codec, {jobs} procs": lambda: iso("benchmarks.build:measure_bare_codec", root=str(gt_root), jobs=jobs),
        }
        if not args.no_mtcnn:
            cases["ours mtcnn (fresh cache)"] = lambda: iso("benchmarks.build:measure_ours_mtcnn", root=str(mt_root), scratch=scratch, shard_size=ss)
            cases["bare mtcnn"] = lambda: iso("benchmarks.build:measure_bare_mtcnn", root=str(mt_root))
        print(f"build benchmark ({mode}): {gt_n} gt samples, {mt_n} mtcnn images, shard size {ss}, "
              f"{jobs} jobs, {repeats} round(s), {common.cpu_count()} cores", flush=True)
        results = common.interleaved(cases, repeats)
        summary = {name: common.summarize(r) for name, r in results.items()}
        rows = [{"case": name, **s} for name, s in summary.items()]
        if not args.no_mtcnn:
            cached = [r["cached_seconds"] for r in results["ours mtcnn (fresh cache)"]]
            med = sorted(cached)[len(cached) // 2]
            rows.append({"case": "ours mtcnn (cached rebuild)", "samples": mt_n, "seconds": med, "rate": mt_n / med})
        print()
        print(common.table(rows, [("case", "case", ""), ("samples", "samples", "{}"), ("seconds", "median s", "{:.3f}"),
                                  ("rate", "samples/s", "{:.1f}"), ("min_s", "min s", "{:.3f}"), ("max_s", "max s", "{:.3f}"),
                                  ("peak_tree_pss_mb", "peak MB (tree)", "{:.0f}")]))
        rate = {name: s["rate"] for name, s in summary.items()}
        payload = {
            "benchmark": "build", "mode": mode, "samples": gt_n, "jobs": jobs, "repeats": repeats, "shard_size": ss,
            "gt_1job_vs_bare": rate["ours gt, 1 job"] / rate["bare codec, 1 proc"],
            "gt_njobs_vs_bare": rate[f"ours gt, {jobs} jobs warm"] / rate[f"bare codec, {jobs} procs"],
            "gt_njobs_cold_vs_bare": rate[f"ours gt, {jobs} jobs cold"] / rate[f"bare codec, {jobs} procs"],
            "rates": {k: round(v, 2) for k, v in rate.items()},
        }
        if not args.no_mtcnn:
            payload["mtcnn_images"] = mt_n
            payload["mtcnn_overhead"] = summary["ours mtcnn (fresh cache)"]["seconds"] / summary["bare mtcnn"]["seconds"] - 1.0
            payload["mtcnn_overhead_target"] = 0.15
            payload["mtcnn_cached_rate"] = rows[-1]["rate"]
        print()
        common.final_json(payload)
        return 0
    finally:
        common.cleanup(work, args)


def _subset(work: Path, root: Path, n: int) -> Path:
    """A 300W-LP tree holding only the first ``n`` (jpg, mat) pairs of ``root``."""
    sub = work / f"300w_lp-first{n}" / "300W_LP"
    if not sub.exists():
        for jpg, mat in common.raw_pairs(root)[:n]:
            rel = jpg.relative_to(root)
            (sub / rel.parent).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(jpg, sub / rel)
            shutil.copyfile(mat, sub / rel.with_suffix(".mat"))
    return sub


if __name__ == "__main__":
    sys.exit(main())
