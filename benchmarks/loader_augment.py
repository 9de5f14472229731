"""Loader throughput with and without augmentation (``dataprep.loader.make_loader``).

Shards: the synthetic ones of ``tests/test_loader.py`` (``write_synthetic_shards``: smooth random
source images, a face box, 68 landmarks, a square 224x224 crop per sample, JPEG quality 95),
written to a scratch folder: 500 samples in 5 shards (``--quick`` 200, ``--smoke`` 20).

Cases (same process, interleaved round-robin so background load hits each alike; best of the
rounds is the estimate, median shown too):

* ``plain``: decode jpg/json/pts.npy, shuffle buffer, tensors, batches of 32.
* ``augment``: the same plus ``RandomApply(HorizontalFlip, 0.5)``, ``RandomApply(GaussianBlur,
  0.5)``, ``RandomApply(DownUpSample("hopenet"), 0.5)``, ``Brightness``, ``Contrast`` and
  ``RandomCropScale`` on every sample (every op the loader offers, so a worst case).
* ``recrop hopenet`` / ``recrop hopenet + augment``: the same two with ``crop_rule="hopenet",
  size=224`` (load-time re-crop of each stored crop to Hopenet's loose window).

The final JSON line has ``augment_vs_plain`` (augment rate / plain rate; 1.0 = free) and the same
for the re-crop pair. Nothing here asserts timings.

    python benchmarks/loader_augment.py            # ~1 min on 2 busy cores
    python benchmarks/loader_augment.py --quick
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from benchmarks import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "full": dict(shards=5, per_shard=100, rounds=3),
    "quick": dict(shards=2, per_shard=100, rounds=1),
    "smoke": dict(shards=2, per_shard=10, rounds=1),
}
CROP_SIZE = 224
BATCH_SIZE = 32


def _synthetic_writer():
    """``write_synthetic_shards`` from tests/test_loader.py (the same shards as the tests)."""
    path = REPO / "tests" / "test_loader.py"
    spec = importlib.util.spec_from_file_location("_dataprep_test_loader", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_synthetic_shards


def _augmentation():
    from dataprep import augment as A

    return A.Compose([
        A.RandomApply(A.HorizontalFlip(), 0.5),
        A.RandomApply(A.GaussianBlur(), 0.5),
        A.RandomApply(A.DownUpSample("hopenet"), 0.5),
        A.Brightness(),
        A.Contrast(),
        A.RandomCropScale(),
    ])


def _one_pass(pattern: str, workers: int, **kw) -> tuple[int, float]:
    from dataprep.loader import make_loader

    loader = make_loader(pattern, BATCH_SIZE, workers=workers, seed=0, **kw)
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
    return n, time.perf_counter() - start


def main(argv=None) -> int:
    p = common.base_parser("dataprep.loader throughput with and without augmentation", before=False)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: in-process)")
    args = p.parse_args(argv)
    mode = common.mode_of(args)
    cfg = MODES[mode]
    rounds = args.repeats or cfg["rounds"]
    work = common.work_dir("loader", args.work)
    try:
        t0 = time.perf_counter()
        pattern, samples = _synthetic_writer()(work / "shards", n_shards=cfg["shards"], per_shard=cfg["per_shard"],
                                               crop_size=CROP_SIZE, seed=0)
        print(f"# wrote {len(samples)} samples of {CROP_SIZE}x{CROP_SIZE} in {cfg['shards']} shards "
              f"({time.perf_counter() - t0:.1f} s); workers={args.workers}, batch {BATCH_SIZE}, {rounds} round(s)")
        aug = _augmentation()
        cases = {
            "plain": dict(),
            "augment": dict(transforms=aug),
            "recrop hopenet": dict(crop_rule="hopenet", size=CROP_SIZE),
            "recrop hopenet + augment": dict(crop_rule="hopenet", size=CROP_SIZE, transforms=aug),
        }
        _one_pass(pattern, args.workers, **cases["augment"])  # warm-up: imports, page cache
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        counts: dict[str, int] = {}
        names = list(cases)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                n, s = _one_pass(pattern, args.workers, **cases[name])
                counts[name] = n
                seconds[name].append(s)
                print(f"  [{r + 1}/{rounds}] {name:<26} {s:7.3f} s  {n / s:8.1f} samples/s", flush=True)
        rows = []
        for name in names:
            best = min(seconds[name])
            rows.append({"case": name, "samples": counts[name], "best_s": best, "median_s": statistics.median(seconds[name]),
                         "n": len(seconds[name]), "rate": counts[name] / best})
        print(common.table(rows, common.ROW_COLUMNS))
        rate = {row["case"]: row["rate"] for row in rows}
        common.final_json({
            "benchmark": "loader_augment", "mode": mode, "samples": len(samples), "crop_size": CROP_SIZE,
            "batch_size": BATCH_SIZE, "workers": args.workers, "rounds": rounds,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "plain_rate": rate["plain"], "augment_rate": rate["augment"],
            "augment_vs_plain": rate["augment"] / rate["plain"],
            "recrop_augment_vs_recrop": rate["recrop hopenet + augment"] / rate["recrop hopenet"],
        })
        return 0
    finally:
        common.cleanup(work, args)


if __name__ == "__main__":
    sys.exit(main())
