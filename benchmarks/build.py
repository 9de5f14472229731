"""Build throughput: ``dataprep build`` vs the bare work it cannot avoid, on the same images.

Rows (each group measured in its own fresh subprocess; groups interleaved round-robin; the best
time of all runs is the cost estimate, the median is shown too):

* ``ours gt, 1 job``: ``dataprep.build.build`` in-process, ``--detector gt``, on a replicated
  300W-LP tree (the first build of the process is left out: imports).
* ``ours gt, N jobs cold``: the first build of a fresh process with N loky workers, worker start-up
  included, as every ``dataprep build`` CLI run pays it; ``... warm``: the next builds of that
  process (joblib reuses its workers).
* ``bare codec, 1 proc`` / ``N procs``: ``dataprep.codec.decode_bgr`` of the JPEG bytes (already in
  memory; the build's decoder: libjpeg-turbo's TurboJPEG API, OpenCV's pixels) + the square crop
  (windows computed beforehand) + ``cv2.resize`` + ``cv2.imencode`` at the same quality, and
  nothing else; N forked processes started before the clock. ``bare codec (cv2.imdecode)``: the
  same decoding with OpenCV. The faster of the two is the limit of a gt build.
* ``ours mtcnn, fresh cache``: a build with ``--detector mtcnn --device cpu`` and an empty detection
  cache (every image detected; torch/facenet imports done before the clock); ``... cached rebuild``:
  the same build again, the cache now answering; ``bare mtcnn``: ``create_detector("mtcnn",
  device="cpu").detect`` on the same images decoded beforehand, same batch size. The detector uses
  all cores (torch's threads); ``... 1 thread`` rows are the same on one torch thread.

Final JSON line: ``gt_1job_vs_bare`` and ``gt_njobs_vs_bare`` (ours / bare samples/s; 1.0 = at the
limit), ``gt_njobs_cold_vs_bare``, ``mtcnn_overhead`` (ours / bare seconds - 1; target <= 0.15),
``mtcnn_overhead_in_build`` (the same from inside one build: its time outside
``Detector.detect`` / its time inside; immune to load that slows one subprocess and not another),
both again on one torch thread (``mtcnn_overhead_1thread``, ``mtcnn_overhead_in_build_1thread``),
``mtcnn_cached_rate``, all rates, and with ``--before DIR`` ``ours_vs_before`` (speed-ups).

    python benchmarks/build.py            # ~4 min on 2 busy cores
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
    # gt_copies / mtcnn_copies: x20 300W-LP samples; repeats: timed builds per subprocess
    "full": dict(gt_copies=15, mtcnn_images=24, rounds=3, repeats=3, shard_size=50),
    "quick": dict(gt_copies=5, mtcnn_images=6, rounds=1, repeats=3, shard_size=25),
    "smoke": dict(gt_copies=1, mtcnn_images=2, rounds=1, repeats=1, shard_size=5),
}
BATCH_SIZE = 16
QUALITY = 95
CROP_SIZE = 224


# --------------------------------------------------------------------------------------------
# Measurements (each runs in a fresh subprocess, see common.run_isolated)
# --------------------------------------------------------------------------------------------
def _options(root, out, jobs, shard_size, **kw):
    from dataprep.build import BuildOptions

    return BuildOptions(dataset="300w_lp", root=str(root), out=str(out), jobs=jobs, shard_size=shard_size,
                        progress=False, overwrite=True, command="benchmark", **kw)


def measure_ours(root: str, scratch: str, jobs: int, shard_size: int, repeats: int) -> dict:
    """``1 + repeats`` gt builds in one process: the first is ``cold``, the others ``warm``."""
    from dataprep.build import build

    tmp = Path(tempfile.mkdtemp(dir=scratch))
    times, samples = [], 0
    for i in range(1 + repeats):
        start = time.perf_counter()
        manifest = build(_options(root, tmp / f"out{i}", jobs, shard_size))
        times.append(time.perf_counter() - start)
        samples = manifest["counts"]["read"]
        shutil.rmtree(tmp / f"out{i}", ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if jobs == 1:
        return {"rows": {"": {"samples": samples, "seconds": times[1:]}}}
    return {"rows": {"cold": {"samples": samples, "seconds": times[:1]},
                     "warm": {"samples": samples, "seconds": times[1:]}}}


def _windows(root: str):
    """(jpeg bytes, integer crop window) per sample: the gt square window, computed untimed."""
    import numpy as np
    import scipy.io

    from dataprep import boxes

    items = []
    for jpg, mat in common.raw_pairs(Path(root)):
        pts = np.asarray(scipy.io.loadmat(str(mat))["pt2d"], dtype=np.float64).T
        box = [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]
        items.append((jpg.read_bytes(), boxes.integer_window(boxes.square_pad(box))))
    return items


_ITEMS: list = []
_DECODE: list = []  # the bare decoder of this process (common.bare_decoder)


def _bare_one(i: int) -> int:
    import cv2
    import numpy as np

    data, (x1, y1, x2, y2) = _ITEMS[i]
    image = _DECODE[0](data)
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


def measure_bare_codec(root: str, jobs: int, repeats: int, decoder: str = "codec") -> dict:
    """Decode (``decoder``: ``"codec"`` or ``"cv2"``) + crop + resize + encode of every image,
    nothing else: on 1 process, then ``jobs``."""
    import cv2

    _DECODE[:] = [common.bare_decoder(decoder)]
    _ITEMS[:] = _windows(root)
    n = len(_ITEMS)
    rows = {"1 proc": {"samples": n, "seconds": common.timed_repeats(lambda: _bare_chunk(range(n)), repeats)}}
    if jobs > 1:
        cv2.setNumThreads(1)
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            pool.map(_bare_chunk, [[0]] * jobs)  # workers up before the clock starts
            chunks = [range(i, min(i + 16, n)) for i in range(0, n, 16)]
            rows[f"{jobs} procs"] = {"samples": n, "seconds": common.timed_repeats(
                lambda: sum(pool.imap_unordered(_bare_chunk, chunks)), repeats)}
    return {"rows": rows}


def measure_ours_mtcnn(root: str, scratch: str, shard_size: int, device: str = "cpu",
                       threads: int | None = None) -> dict:
    """A build with MTCNN and a fresh detection cache; then a rebuild answered by that cache.
    ``threads``: torch's intra-op threads (the detector's cores; default: all)."""
    import facenet_pytorch  # noqa: F401  (imports are not what we measure)
    import torch

    if threads:
        torch.set_num_threads(threads)

    from dataprep.build import build
    from dataprep.detectors.base import Detector

    in_detector = []  # seconds inside Detector.detect during the build: the rest is our overhead
    real_detect = Detector.detect

    def timed_detect(self, images):
        t0 = time.perf_counter()
        try:
            return real_detect(self, images)
        finally:
            in_detector.append(time.perf_counter() - t0)

    Detector.detect = timed_detect
    tmp = Path(tempfile.mkdtemp(dir=scratch))
    kw = dict(detector="mtcnn", device=device, batch_size=BATCH_SIZE, cache_dir=str(tmp / "cache"))
    start = time.perf_counter()
    manifest = build(_options(root, tmp / "out", 1, shard_size, **kw))
    fresh = time.perf_counter() - start
    detector_s = sum(in_detector)
    start = time.perf_counter()
    build(_options(root, tmp / "out2", 1, shard_size, **kw))
    cached = time.perf_counter() - start
    shutil.rmtree(tmp, ignore_errors=True)
    n = manifest["counts"]["read"]
    return {"rows": {"fresh cache": {"samples": n, "seconds": [fresh], "torch_threads": torch.get_num_threads(),
                                     "overhead_in_build": (fresh - detector_s) / detector_s},
                     "cached rebuild": {"samples": n, "seconds": [cached]}}}


def measure_bare_mtcnn(root: str, device: str = "cpu", threads: int | None = None) -> dict:
    """The detector alone on the same images, decoded beforehand, same batch size (one pass, as
    the build makes one pass), on ``threads`` torch threads (default: all)."""
    import torch

    from dataprep.codec import decode_rgb
    from dataprep.detectors import create_detector

    if threads:
        torch.set_num_threads(threads)

    images = [decode_rgb(j.read_bytes()) for j, _ in common.raw_pairs(Path(root))]
    detector = create_detector("mtcnn", device=device, batch_size=BATCH_SIZE)
    start = time.perf_counter()
    detector.detect(images)
    return {"rows": {"": {"samples": len(images), "seconds": [time.perf_counter() - start]}}}


# --------------------------------------------------------------------------------------------
def _first_images(work: Path, root: Path, n: int) -> Path:
    """A 300W-LP tree holding only the first ``n`` (jpg, mat) pairs of ``root``."""
    sub = work / f"300w_lp-first{n}" / "300W_LP"
    if not sub.exists():
        for jpg, mat in common.raw_pairs(root)[:n]:
            rel = jpg.relative_to(root)
            (sub / rel.parent).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(jpg, sub / rel)
            shutil.copyfile(mat, sub / rel.with_suffix(".mat"))
    return sub


def main(argv=None) -> int:
    p = common.base_parser("dataprep build vs bare decode/encode and bare MTCNN")
    p.add_argument("--jobs", type=int, default=None, help="the 'all cores' job count (default: all cores)")
    p.add_argument("--no-mtcnn", action="store_true", help="skip the MTCNN rows")
    args = p.parse_args(argv)
    mode = common.mode_of(args)
    cfg = MODES[mode]
    rounds = args.repeats or cfg["rounds"]
    jobs = args.jobs or common.cpu_count()
    work = common.work_dir("build", args.work)
    try:
        gt_root, gt_n = common.scaled_dataset(work, "300w_lp", cfg["gt_copies"])
        copies = -(-cfg["mtcnn_images"] // common.SAMPLE_COUNTS["300w_lp"])
        mt_root = _first_images(work, common.scaled_dataset(work, "300w_lp", copies)[0], cfg["mtcnn_images"])
        mt_n = cfg["mtcnn_images"]
        scratch = str(work / "scratch")
        os.makedirs(scratch, exist_ok=True)
        ss, rep = cfg["shard_size"], cfg["repeats"]
        ours = {
            "ours gt, 1 job": dict(target="measure_ours", root=str(gt_root), scratch=scratch, jobs=1, shard_size=ss, repeats=rep),
            f"ours gt, {jobs} jobs": dict(target="measure_ours", root=str(gt_root), scratch=scratch, jobs=jobs, shard_size=ss, repeats=rep),
        }
        if not args.no_mtcnn:
            ours["ours mtcnn,"] = dict(target="measure_ours_mtcnn", root=str(mt_root), scratch=scratch, shard_size=ss)
            ours["ours mtcnn, 1 thread,"] = dict(ours["ours mtcnn,"], threads=1)
        bare = {"bare codec,": dict(target="measure_bare_codec", root=str(gt_root), jobs=jobs, repeats=rep),
                "bare codec (cv2.imdecode),": dict(target="measure_bare_codec", root=str(gt_root), jobs=jobs,
                                                   repeats=rep, decoder="cv2")}
        if not args.no_mtcnn:
            bare["bare mtcnn"] = dict(target="measure_bare_mtcnn", root=str(mt_root))
            bare["bare mtcnn, 1 thread"] = dict(bare["bare mtcnn"], threads=1)
        specs = common.with_before(ours, args.before)
        specs.update(bare)
        cases = common.isolated_cases("build", specs)
        print(f"build benchmark ({mode}): {gt_n} gt samples, {mt_n} mtcnn images, shard size {ss}, {jobs} jobs, "
              f"{rounds} round(s) x {rep} build(s), {common.cpu_count()} cores", flush=True)
        results = common.interleaved(cases, rounds)
        summary = {name: common.summarize(entry) for name, entry in results.items()}
        print()
        print(common.table([{"case": n, **s} for n, s in summary.items()],
                           common.ROW_COLUMNS + [("peak_tree_pss_mb", "peak MB (process tree)", "{:.0f}")]))
        rate = {name: s["rate"] for name, s in summary.items()}
        # the limit: the faster decoder's bare codec
        limit = {p: max(rate[f"bare codec, {p}"], rate[f"bare codec (cv2.imdecode), {p}"])
                 for p in ["1 proc"] + ([f"{jobs} procs"] if jobs > 1 else [])}
        payload = {
            "benchmark": "build", "mode": mode, "samples": gt_n, "jobs": jobs, "rounds": rounds, "shard_size": ss,
            "gt_1job_vs_bare": rate["ours gt, 1 job"] / limit["1 proc"],
            "gt_njobs_vs_bare": rate[f"ours gt, {jobs} jobs warm"] / limit[f"{jobs} procs"] if jobs > 1 else None,
            "gt_njobs_cold_vs_bare": rate[f"ours gt, {jobs} jobs cold"] / limit[f"{jobs} procs"] if jobs > 1 else None,
            "rates": {k: round(v, 2) for k, v in rate.items()},
        }
        if not args.no_mtcnn:
            payload["mtcnn_images"] = mt_n
            payload["mtcnn_overhead"] = summary["ours mtcnn, fresh cache"]["best_s"] / summary["bare mtcnn"]["best_s"] - 1.0
            payload["mtcnn_overhead_target"] = 0.15
            # the same overhead measured inside one build: (build - time in Detector.detect) / that time
            payload["mtcnn_overhead_in_build"] = min(results["ours mtcnn, fresh cache"]["extra_all"]["overhead_in_build"])
            payload["mtcnn_cached_rate"] = rate["ours mtcnn, cached rebuild"]
            payload["torch_threads"] = results["ours mtcnn, fresh cache"]["extra"].get("torch_threads")
            # the same on one core's worth of torch threads
            payload["mtcnn_overhead_1thread"] = (summary["ours mtcnn, 1 thread, fresh cache"]["best_s"]
                                                 / summary["bare mtcnn, 1 thread"]["best_s"] - 1.0)
            payload["mtcnn_overhead_in_build_1thread"] = min(
                results["ours mtcnn, 1 thread, fresh cache"]["extra_all"]["overhead_in_build"])
        if args.before:
            payload["ours_vs_before"] = common.speedups_vs_before(rate)
        print()
        common.final_json(payload)
        return 0
    finally:
        common.cleanup(work, args)


if __name__ == "__main__":
    sys.exit(main())
