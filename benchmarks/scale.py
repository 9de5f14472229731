"""Scaling: build and load time and peak memory at 1x, 4x and 16x the data.

Each build runs in a fresh subprocess (a real CLI run: worker start-up included), interleaved
round-robin over the scales; memory is the peak PSS of the whole process tree (main process +
joblib or DataLoader workers, sampled every 50 ms) and the main process's peak RSS.

Two series on replicated 300W-LP trees:

* ``gt``: ``dataprep build --detector gt`` (decode, crop, encode, write);
* ``stub detector``: the detector path of the build (read + cache look-up + decode ahead of the
  detector, detection cache writes, then the shards) with a stand-in detector that answers at once,
  so what scales is our code, not MTCNN's.

* ``loader``: ``load.py``'s ``ours loader`` (``dataprep.loader.make_loader``: Hopenet re-crop,
  224 px, float, all cores as workers, batch 64, a shuffle buffer of 1000 samples per worker) over the first 1/16, 1/4 and all of the shards of one build at the largest size, in a
  fresh process each: a first epoch starts the persistent workers, the second is timed (worker
  start-up is not a per-sample cost). Its memory may rise while the shuffle buffers fill (up to 1000
  raw samples, ~20 MB, per worker), then stays flat.

Cost should grow linearly (a least-squares fit ``seconds = fixed + per_sample * samples`` is
printed with its R^2) and memory should stay flat.

Final JSON line: per series ``rate_ratio_16x_vs_1x`` (samples/s at 16x / at 1x; ~1 or above when
cost is linear), ``marginal_rate`` (1 / per_sample), ``fixed_s``, ``r2``, ``peak_ratio_16x_vs_1x``
(process-tree peak at 16x / at 1x; ~1 when memory is flat), ``peak_ratio_16x_vs_4x`` (the same
between the two largest sizes: the loader's bounded buffers are full by then) and the rows.

    python benchmarks/scale.py            # ~4 min on 2 busy cores (300 / 1200 / 4800 samples)
    python benchmarks/scale.py --quick    # ~50 s (20 / 80 / 320 samples)
    python benchmarks/scale.py --factors 1,16,64 --repeats 1   # ~2 min more (19200 samples at 64x)
"""
from __future__ import annotations

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
    # base copies (x20 300W-LP samples) and the scale factors
    "full": dict(base_copies=15, factors=(1, 4, 16), rounds=2, shard_size=100),
    "quick": dict(base_copies=1, factors=(1, 4, 16), rounds=1, shard_size=20),
    "smoke": dict(base_copies=1, factors=(1, 2), rounds=1, shard_size=10),
}


class StubDetector:
    """Answers every image at once with one confident face in the middle of a 450x450 image."""

    name = "mtcnn"
    fingerprint = "0" * 64
    batch_size = 16

    def detect(self, images):
        from dataprep.detectors import Detection

        return [[Detection(box=(120.0, 120.0, 330.0, 350.0), score=0.99)] for _ in images]


def measure_build(root: str, scratch: str, jobs: int, shard_size: int, stub_detector: bool = False) -> dict:
    """One build in this fresh process; with ``stub_detector`` the box stage runs with StubDetector
    and an empty detection cache."""
    from dataprep import box_stage
    from dataprep.build import BuildOptions, build

    tmp = Path(tempfile.mkdtemp(dir=scratch))
    kw = {}
    if stub_detector:
        box_stage.create_detector = lambda *a, **k: StubDetector()
        kw = dict(detector="mtcnn", device="cpu", cache_dir=str(tmp / "cache"))
    opts = BuildOptions(dataset="300w_lp", root=root, out=str(tmp / "out"), jobs=jobs, shard_size=shard_size,
                        progress=False, command="benchmark", **kw)
    start = time.perf_counter()
    manifest = build(opts)
    seconds = time.perf_counter() - start
    shutil.rmtree(tmp, ignore_errors=True)
    counts = manifest["counts"]
    return {"rows": {"": {"samples": counts["read"], "seconds": [seconds], "written": counts["written"]}}}


def measure_load(urls: list[str], workers: int) -> dict:
    """``load.py``'s ``ours loader`` row in this fresh process: a warm-up epoch that starts the
    persistent workers, then one timed epoch. Memory covers both."""
    from benchmarks import load

    return load.measure_ours(urls, workers, epochs=1)


def _load_shards(work: Path, root: Path, shard_size: int, jobs: int, factors) -> dict[int, list[str]]:
    """Shards of one build of ``root`` (the largest size); per factor, the first share of them."""
    urls = common.built_shards(work, root, shard_size, jobs=jobs)
    hi = max(factors)
    return {f: urls[:max(1, len(urls) * f // hi)] for f in factors}


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: (a, b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, (1.0 - ss_res / ss_tot) if ss_tot else 1.0


def main(argv=None) -> int:
    p = common.base_parser("build and load cost and memory at 1x, 4x, 16x the data")
    p.add_argument("--jobs", type=int, default=None, help="build --jobs (default: all cores)")
    p.add_argument("--shard-size", type=int, default=None, help="build --shard-size (default: per mode)")
    p.add_argument("--no-stub", action="store_true", help="no stub-detector series")
    p.add_argument("--no-loader", action="store_true", help="no loader series")
    p.add_argument("--factors", default=None, help="data sizes as multiples of the 1x size, e.g. 1,16,64 "
                                                   "(default: 1,4,16)")
    args = p.parse_args(argv)
    mode = common.mode_of(args)
    cfg = MODES[mode]
    if args.factors:
        cfg = dict(cfg, factors=tuple(int(f) for f in args.factors.split(",")))
    rounds = args.repeats or cfg["rounds"]
    jobs = args.jobs or common.cpu_count()
    shard_size = args.shard_size or cfg["shard_size"]
    work = common.work_dir("scale", args.work)
    try:
        scratch = str(work / "scratch")
        Path(scratch).mkdir(parents=True, exist_ok=True)
        series = ["gt"] + ([] if args.no_stub else ["stub detector"]) + ([] if args.no_loader else ["loader"])
        whos = [("ours", None)] + ([("before", args.before)] if args.before else [])
        roots, sizes = {}, {}
        for factor in cfg["factors"]:
            roots[factor], sizes[factor] = common.scaled_dataset(work, "300w_lp", cfg["base_copies"] * factor)
        load_urls = {} if args.no_loader else _load_shards(work, roots[max(roots)], shard_size, jobs, cfg["factors"])
        specs = {}
        for factor, root in roots.items():
            for label in series:
                for who, code in whos:
                    if label == "loader":
                        spec = dict(target="measure_load", urls=load_urls[factor], workers=jobs)
                    else:
                        spec = dict(target="measure_build", root=str(root), scratch=scratch, jobs=jobs,
                                    shard_size=shard_size, stub_detector=label == "stub detector")
                    specs[f"{who} {label} {factor}x"] = dict(spec, code_root=code)
        cases = common.isolated_cases("scale", specs)
        print(f"scale benchmark ({mode}): {', '.join(f'{f}x = {n}' for f, n in sizes.items())} samples, "
              f"{jobs} jobs, shard size {shard_size}, {rounds} round(s), {common.cpu_count()} cores", flush=True)
        results = common.interleaved(cases, rounds)
        summary = {name: common.summarize(entry) for name, entry in results.items()}
        print()
        print(common.table([{"case": k, **s} for k, s in summary.items()],
                           common.ROW_COLUMNS + [("peak_tree_pss_mb", "peak MB (process tree)", "{:.0f}"),
                                                 ("peak_rss_mb", "peak MB (main RSS)", "{:.0f}")]))
        lo, mid, hi = cfg["factors"][0], cfg["factors"][-2], cfg["factors"][-1]
        payload = {"benchmark": "scale", "mode": mode, "jobs": jobs, "shard_size": shard_size, "rounds": rounds,
                   "samples": {f"{f}x": n for f, n in sizes.items()}, "series": {}}
        print()
        for who, _ in whos:
            for label in series:
                rows = [summary[f"{who} {label} {f}x"] for f in cfg["factors"]]
                a, b, r2 = linear_fit([r["samples"] for r in rows], [r["best_s"] for r in rows])
                entry = {
                    f"rate_ratio_{hi}x_vs_{lo}x": rows[-1]["rate"] / rows[0]["rate"],
                    f"peak_ratio_{hi}x_vs_{lo}x": rows[-1]["peak_tree_pss_mb"] / rows[0]["peak_tree_pss_mb"],
                    # past the bounded buffers' fill-up (the loader's): the last two sizes
                    f"peak_ratio_{hi}x_vs_{mid}x": rows[-1]["peak_tree_pss_mb"] / rows[-2]["peak_tree_pss_mb"],
                    "fixed_s": a, "per_sample_ms": b * 1e3, "marginal_rate": (1.0 / b) if b > 0 else None, "r2": r2,
                    "rates": {f"{f}x": round(r["rate"], 1) for f, r in zip(cfg["factors"], rows)},
                    "peak_tree_pss_mb": {f"{f}x": round(r["peak_tree_pss_mb"], 1) for f, r in zip(cfg["factors"], rows)},
                }
                payload["series"][f"{who} {label}"] = entry
                print(f"{who} {label}: seconds = {a:.2f} + {b * 1e3:.3f} ms x samples (R^2 {r2:.4f}); "
                      f"samples/s {hi}x / {lo}x = {entry[f'rate_ratio_{hi}x_vs_{lo}x']:.2f}; "
                      f"peak memory {hi}x / {lo}x = {entry[f'peak_ratio_{hi}x_vs_{lo}x']:.2f}, "
                      f"{hi}x / {mid}x = {entry[f'peak_ratio_{hi}x_vs_{mid}x']:.2f}")
        print()
        common.final_json(payload)
        return 0
    finally:
        common.cleanup(work, args)


if __name__ == "__main__":
    sys.exit(main())
