"""Shared helpers for the benchmark scripts (``python benchmarks/NAME.py [--quick|--smoke]``).

* ``scaled_dataset``: a raw 300W-LP or AFLW2000 tree with the sample tree's files replicated N
  times under new names (450x450 JPEG + ``.mat``). Every copy's JPEG gets a JPEG comment segment
  naming it, so the copies decode to the same pixels but have different bytes (the detection cache
  is keyed by the file's sha256 and would otherwise answer every copy after the first).
* ``run_isolated``: run one measurement in a fresh Python subprocess and return its result plus
  its memory peaks, so every case starts cold and has its own peak (``VmHWM`` of the process, the
  largest child's ``ru_maxrss``, and the peak of the whole process tree's PSS, sampled).
* ``interleaved``: run the cases round-robin, ``rounds`` times, so background load on the machine
  hits every case alike; ``summarize`` takes the best time of all runs as the cost (other
  processes only ever add time) and shows the median beside it.
* ``--before DIR`` (every script): run our cases a second time with ``dataprep`` imported from an
  older checkout, interleaved with the rest, for before/after figures.
* ``table`` / ``final_json``: the printed table and the one final JSON line the scripts end with.

Nothing here asserts timings: the figures are for reading, the ratios for comparing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Raw 300W-LP / AFLW2000 files in the sample tree: 20 and 12 samples.
SAMPLE_COUNTS = {"300w_lp": 20, "aflw2000": 12}
ROOT_NAMES = {"300w_lp": "300W_LP", "aflw2000": "AFLW2000"}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def cpu_count() -> int:
    """The cores this process may use (``dataprep.build.cpu_count``, imported late so the measured
    child processes do not pay for it at start-up)."""
    from dataprep.build import cpu_count as usable_cores

    return usable_cores()


def work_dir(name: str, keep: str | None = None) -> Path:
    """A scratch folder for one script's run (``keep``: use this folder and leave it in place)."""
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix=f"dataprep-bench-{name}-"))


def sample_tree(base: Path) -> Path:
    """The generated sample tree (seed 0) under ``base/tree``, written once."""
    tree = Path(base) / "tree"
    if not (tree / "expected_labels.json").exists():
        from dataprep.sample_data import write_sample_tree

        write_sample_tree(tree, seed=0, biwi_frames_per_sequence=1)
    return tree


def jpeg_with_comment(data: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: new bytes (and sha256), same pixels."""
    from dataprep.codec import is_jpeg

    if not is_jpeg(data):
        raise ValueError("not a JPEG")
    payload = text.encode("ascii")
    return data[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def scaled_dataset(base: Path, dataset: str, copies: int) -> tuple[Path, int]:
    """``copies`` x the sample tree's ``dataset`` files under ``base/<dataset>-x<copies>/<ROOT>``.

    Returns ``(root, samples)``. Copy ``i`` of ``NAME.jpg`` is ``NAME_cIIII.jpg`` (unique bytes,
    see ``jpeg_with_comment``) with ``NAME_cIIII.mat`` (a hard link to the original ``.mat``).
    """
    tree = sample_tree(base)
    src_root = tree / ROOT_NAMES[dataset]
    root = Path(base) / f"{dataset}-x{copies}" / ROOT_NAMES[dataset]
    done = root.parent / ".complete"
    pairs = sorted(p for p in src_root.rglob("*.jpg") if p.with_suffix(".mat").exists())
    samples = len(pairs) * copies
    if done.exists():
        return root, samples
    if root.exists():
        shutil.rmtree(root)
    for jpg in pairs:
        rel = jpg.parent.relative_to(src_root)
        (root / rel).mkdir(parents=True, exist_ok=True)
        data = jpg.read_bytes()
        for i in range(copies):
            name = f"{jpg.stem}_c{i:04d}"
            (root / rel / f"{name}.jpg").write_bytes(jpeg_with_comment(data, f"bench copy {i} of {rel / jpg.name}"))
            _link_or_copy(jpg.with_suffix(".mat"), root / rel / f"{name}.mat")
    done.write_text(str(samples))
    return root, samples


def built_shards(work: Path, root: Path, shard_size: int, jobs: int = 1, **options) -> list[str]:
    """The shard paths of a ``dataprep build`` of the 300W-LP tree ``root`` into ``work`` with
    ``options`` (``BuildOptions`` fields), built on first use and reused by later runs with ``--work``
    (the same inputs give the same shards, whatever ``jobs``)."""
    from dataprep.build import BuildOptions, build

    tag = "".join(f"-{k}{v}" for k, v in sorted(options.items()))
    out = Path(work) / f"shards-{Path(root).parent.name}-{shard_size}{tag}"
    if not (out / "manifest.json").exists():
        build(BuildOptions(dataset="300w_lp", root=str(root), out=str(out), shard_size=shard_size, jobs=jobs,
                           progress=False, overwrite=True, command="benchmark", **options))
    return [str(p) for p in sorted(out.glob("*.tar"))]


def raw_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(jpg, mat) pairs under a raw 300W-LP / AFLW2000 root, sorted."""
    return [(j, j.with_suffix(".mat")) for j in sorted(Path(root).rglob("*.jpg")) if j.with_suffix(".mat").exists()]


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def _status_kb(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """Proportional set size (shared pages split among their users): sums sensibly over processes."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return _status_kb(pid, "VmRSS")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


class TreeMemorySampler:
    """Samples the PSS of this process and all its descendants every ``interval`` s; ``peak_mb``.

    Reading PSS walks every page a process maps (in the kernel, holding its memory-map lock): with
    a few hundred MB of shared memory in a tree it took ~75 ms per sample, which at a 50 ms period
    kept a core busy and slowed the measured loader by ~15%. So the sampler waits at least
    ``busy`` times as long as its last sample took (it takes at most ~1/(1+busy) of one core)."""

    def __init__(self, interval: float = 0.05, busy: float = 9.0):
        self.interval = interval
        self.busy = busy
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            start = time.perf_counter()
            total = sum(_pss_kb(p) for p in [me] + _descendants(me))
            self.peak_kb = max(self.peak_kb, total)
            self._stop.wait(max(self.interval, self.busy * (time.perf_counter() - start)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def memory_peaks() -> dict[str, float]:
    """This process's peak RSS (VmHWM) and the largest waited-for child's, in MB."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux
    return {"peak_rss_mb": _status_kb("self", "VmHWM") / 1024, "peak_child_rss_mb": children / 1024}


# --------------------------------------------------------------------------------------------
# Isolated measurements
# --------------------------------------------------------------------------------------------
def run_isolated(target: str, timeout: float = 900, code_root: str | Path | None = None, **kwargs) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` in a fresh interpreter; the function returns a JSON-able
    dict (``{"rows": {suffix: {"samples", "seconds": [...], ...}}}``, see ``interleaved``). Adds
    ``peak_rss_mb`` (the subprocess), ``peak_child_rss_mb`` (its largest worker) and
    ``peak_tree_pss_mb`` (the subprocess and all its descendants together, sampled).

    ``code_root``: import ``dataprep`` from this checkout instead (e.g. an older version, to
    compare before/after a change with the same benchmark code)."""
    bootstrap = (
        "import importlib.util, sys; "
        f"sys.path[:0] = {[str(code_root)] if code_root else []!r} + [{str(REPO)!r}]; "
        # the benchmarks package always from this checkout, dataprep from code_root when given
        f"spec = importlib.util.spec_from_file_location('benchmarks', {str(REPO / 'benchmarks' / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO / 'benchmarks')!r}]); "
        "pkg = importlib.util.module_from_spec(spec); sys.modules['benchmarks'] = pkg; spec.loader.exec_module(pkg); "
        "from benchmarks.common import _child_main; _child_main(sys.argv[1], sys.argv[2])"
    )
    env = None
    if code_root:
        # processes the subprocess starts afresh (a forkserver: Python 3.11 ignores the parent's
        # sys.path there) must import dataprep from code_root too: its folder first on their path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(code_root), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, "-c", bootstrap, target, json.dumps(kwargs)],
        cwd=str(code_root or REPO), env=env, capture_output=True, text=True, timeout=timeout,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("@@RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{target}({kwargs}) failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("@@RESULT "):])


def isolated_cases(module: str, specs: dict[str, dict]) -> dict[str, Callable[[], dict]]:
    """Case name -> a call of :func:`run_isolated` on ``benchmarks.<module>:<spec["target"]>`` with
    the rest of the spec as keywords (what :func:`interleaved` runs)."""
    return {name: (lambda kw=kw: run_isolated(f"benchmarks.{module}:{kw['target']}",
                                              **{k: v for k, v in kw.items() if k != "target"}))
            for name, kw in specs.items()}


def with_before(ours: dict[str, dict], before: str | None) -> dict[str, dict]:
    """``ours`` (case name -> spec) and, with ``--before DIR``, each case again as "before ...",
    importing dataprep from DIR."""
    specs = dict(ours)
    if before:
        specs.update({name.replace("ours", "before", 1): dict(kw, code_root=before) for name, kw in ours.items()})
    return specs


def speedups_vs_before(rate: dict[str, float]) -> dict[str, float]:
    """Rate of each "ours ..." row over its "before ..." row (``--before``)."""
    return {name: rate[name] / rate[name.replace("ours", "before", 1)] for name in rate if name.startswith("ours")}


def bare_decoder(name: str) -> Callable[[bytes], Any]:
    """The bare baselines' JPEG decoder: ``"codec"``, ``dataprep.codec.decode_bgr`` (what the build
    and the loader decode with); ``"cv2"``, ``cv2.imdecode`` as it is (``codec.decode_cv2``)."""
    from dataprep import codec

    return {"codec": codec.decode_bgr, "cv2": codec.decode_cv2}[name]


def _child_main(target: str, kwargs_json: str) -> None:
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    with TreeMemorySampler() as sampler:
        result = fn(**json.loads(kwargs_json))
    result.update(memory_peaks())
    result["peak_tree_pss_mb"] = sampler.peak_mb
    print("@@RESULT " + json.dumps(result), flush=True)


def interleaved(cases: dict[str, Callable[[], dict]], rounds: int, log=print) -> dict[str, dict]:
    """Run every case once per round, ``rounds`` rounds, rotating the order each round, so load
    from other processes on the machine falls on every case alike.

    A case returns ``{"rows": {suffix: {"samples": n, "seconds": [t, ...], ...}}, <memory peaks>}``
    (one subprocess can time several things, e.g. a cold and then warm builds); row names are
    ``case + " " + suffix`` (just ``case`` for suffix ``""``). Returns row name -> ``{"samples",
    "seconds": every time measured, "extra": other fields of the last run, "extra_all": field ->
    values of every run, memory peaks (max)}``.
    """
    names = list(cases)
    rows: dict[str, dict] = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            res = cases[name]()
            for suffix, row in res["rows"].items():
                full = f"{name} {suffix}".strip()
                entry = rows.setdefault(full, {"samples": row["samples"], "seconds": [], "extra": {}, "extra_all": {}})
                entry["seconds"].extend(row["seconds"])
                entry["extra"] = {k: v for k, v in row.items() if k not in ("samples", "seconds")}
                for k, v in entry["extra"].items():
                    entry["extra_all"].setdefault(k, []).append(v)
                for key in ("peak_rss_mb", "peak_child_rss_mb", "peak_tree_pss_mb"):
                    if key in res:
                        entry[key] = max(entry.get(key, 0.0), res[key])
                if log:
                    best = min(row["seconds"])
                    log(f"  [{r + 1}/{rounds}] {full:<36} best {best:8.3f} s of {len(row['seconds'])}  "
                        f"{row['samples'] / best:9.1f} samples/s")
    return rows


def summarize(entry: dict) -> dict[str, float]:
    """One row: best (min) and median seconds over every measurement, samples/s from the best.

    The best time is the cost estimate: on a shared machine other processes only ever add time.
    """
    seconds = entry["seconds"]
    best = min(seconds)
    out = {
        "samples": entry["samples"],
        "best_s": best,
        "median_s": statistics.median(seconds),
        "n": len(seconds),
        "rate": entry["samples"] / best if best > 0 else float("nan"),
    }
    for key in ("peak_rss_mb", "peak_child_rss_mb", "peak_tree_pss_mb"):
        if key in entry:
            out[key] = entry[key]
    return out


def timed_repeats(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


ROW_COLUMNS = [("case", "case", ""), ("samples", "samples", "{}"), ("best_s", "best s", "{:.3f}"),
               ("median_s", "median s", "{:.3f}"), ("n", "runs", "{}"), ("rate", "samples/s", "{:.1f}")]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format) e.g. ("rate", "samples/s", "{:.1f}")."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("" if row.get(k) is None else (fmt.format(row[k]) if fmt else str(row[k]))) for k, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def final_json(payload: dict) -> None:
    """The last line every script prints: one JSON object (ratios, targets, settings)."""
    print(json.dumps(payload, sort_keys=True, allow_nan=False), flush=True)


def _rounds(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def base_parser(description: str, *, repeats: bool = True, before: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark shares; ``repeats`` / ``before``: only where the script uses them
    (a flag in ``--help`` that does nothing would mislead)."""
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller data and fewer repeats (under ~40 s)")
    mode.add_argument("--smoke", action="store_true", help="tiny run that only checks the script works")
    if repeats:
        p.add_argument("--repeats", type=_rounds, default=None, help="rounds of interleaved measurements")
    p.add_argument("--work", default=None, help="scratch folder to use and keep (default: a temporary one, removed)")
    if before:
        p.add_argument("--before", default=None, metavar="DIR",
                       help="also run our cases with dataprep imported from DIR (an older checkout, e.g. "
                            "`git archive COMMIT | tar -x -C DIR`), interleaved with the others")
    return p


def mode_of(args) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def cleanup(path: Path, args) -> None:
    if not args.work:
        shutil.rmtree(path, ignore_errors=True)
