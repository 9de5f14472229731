"""Training-time loading: our streaming loader vs a Hopenet-style per-file dataset vs bare decoding.

Rows (each group in its own fresh subprocess, groups interleaved round-robin; samples/s from the
best epoch, the median shown too; memory is the peak PSS of the process and its DataLoader
workers together):

* ``ours loader``: ``dataprep.loader.make_loader`` over the shards of a replicated 300W-LP build:
  read tar members, decode the stored crop, re-crop to Hopenet's rule, resize to 224 (bilinear;
  the window's padding past the stored crop is not resized: ``crop.cut_window``), ImageNet
  normalisation, float batches of 64, shuffle buffer 1000, ``W`` persistent DataLoader
  workers (as ``train_minimal`` runs it). ``ours loader, stored crops``: the same without the
  re-crop (the stored 224 crops as they are). ``ours loader, uint8``: uint8 batches, normalising
  left to the device (what ``train_minimal`` asks for). ``ours loader, 64 px``: Hopenet's crop at
  FSA-Net's input size (JPEGs decoded at 1/4 scale in the DCT domain). The default build stores
  tight square crops, so Hopenet's window is about half black padding there; ``ours loader,
  loose-room shards`` re-crops shards built with room for it (``--margin 0.8 --crop-size 320``:
  the window's pixels are real, as in Hopenet's own loader) and is compared with the bare decode of
  those shards.
* ``hopenet-style``: a map-style torch ``Dataset`` written the way Hopenet's ``Pose_300W_LP`` is,
  over the raw files: PIL open + convert, ``scipy.io.loadmat`` (twice, as Hopenet's two helpers do),
  its loose crop, torchvision ``Resize(240)``, ``RandomCrop(224)``, ``ToTensor``, ``Normalize``,
  binned labels; same batch size, same ``W`` workers (persistent too), shuffled.

Both loaders: one warm-up epoch that starts the workers (``1st epoch s``, and ``1st batch s``: the
time to its first batch, worker start-up included), then the timed epochs with the same workers:
an epoch here is only ~1200 samples, so a worker start-up per epoch would weigh ~100x more than in
a real epoch (300W-LP: 122k samples).
* ``bare decode``: ``dataprep.codec.decode_bgr`` (the loader's decoder: libjpeg-turbo's TurboJPEG
  API, OpenCV's pixels) of the stored crops' JPEG bytes, read from the shards into memory
  beforehand, on 1 process and on ``W`` forked processes; ``bare decode (cv2.imdecode)`` the same
  with OpenCV's decoder. The faster of the two is the CPU loader's limit. Both decode in a shuffled
  order, as the loader reads: the benchmark's data is ``copies`` identical copies of each sample
  image, adjacent in the shards, and decoding the same JPEG again right after itself runs 15-20%
  faster than decoding another (0.138 against 0.160 ms per stored crop on one core; a real dataset
  has no such runs). ``bare decode, tar order`` shows the rate in the shards' order beside them.
* ``bare decode + cut + float write``: the main row's work on each image and nothing else: the
  same decode, then Hopenet's window cut at 224 (``crop.cut_window``) and written as normalised
  float planes into a ring of batch-sized buffers, with the loader's own functions. No tar
  reading, labels, shuffle, batching or hand-over to the main process: what the float re-crop row
  would reach with no pipeline around its image work (a float image is 600 KB to write, four times
  its decoded bytes).

Final JSON line: ``ours_vs_hopenet`` (target >= 5) and ``ours_vs_bare_decode`` (ours with W workers
/ bare decode on W processes; target >= 0.5; ``ours_vs_bare_decode_tar_order`` against the tar-order
rate; ``ours_vs_bare_decode_cut_float`` against the image work alone), the same two for the
loose-room shards (``loose_room_vs_*``), the rates and memory peaks.

    python benchmarks/load.py            # ~5 min on 2 busy cores
    python benchmarks/load.py --quick    # ~1 min
"""
from __future__ import annotations

import multiprocessing
import random
import sys
import tarfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from benchmarks import common  # noqa: E402

MODES = {
    # copies: x20 300W-LP samples; epochs per subprocess for ours / hopenet-style
    "full": dict(copies=60, rounds=3, ours_epochs=2, hopenet_epochs=1, shard_size=100, repeats=3),
    "quick": dict(copies=20, rounds=1, ours_epochs=2, hopenet_epochs=1, shard_size=50, repeats=3),
    "smoke": dict(copies=2, rounds=1, ours_epochs=1, hopenet_epochs=1, shard_size=10, repeats=1),
}
BATCH_SIZE = 64
SIZE = 224
SHUFFLE = 1000


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------
def _ours_loader(urls: list[str], workers: int, recrop: bool, image_format: str = "float", size: int = SIZE):
    """``dataprep.loader.make_loader``; when a checkout has none, the same stages written with
    webdataset directly (decode, ``crop.recrop``, normalise, batch)."""
    try:
        from dataprep.loader import make_loader
    except ImportError:
        return _webdataset_loader(urls, workers, recrop)
    kw = dict(persistent_workers=True) if workers else {}
    return make_loader(urls, BATCH_SIZE, workers=workers, crop_rule="hopenet" if recrop else None,
                       size=size if recrop else None, normalize="imagenet" if image_format == "float" else None,
                       image_format=image_format, shuffle=SHUFFLE, seed=0, **kw)


def _webdataset_loader(urls: list[str], workers: int, recrop: bool):
    import json

    import cv2
    import numpy as np
    import torch
    import webdataset as wds

    from dataprep.crop import recrop

    use_recrop = recrop
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def decode(sample):
        image = cv2.cvtColor(cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        record = json.loads(sample["json"])
        if use_recrop:
            image = recrop(image, record, "hopenet", SIZE, rng=np.random.default_rng())
        t = torch.from_numpy(image.transpose(2, 0, 1).copy()).float().div_(255).sub_(mean).div_(std)
        return t, torch.tensor([record["yaw"], record["pitch"], record["roll"]], dtype=torch.float32)

    ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
          .shuffle(SHUFFLE).map(decode).batched(BATCH_SIZE, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def _epochs(loader, epochs: int, images_of) -> dict:
    """One warm-up epoch (worker start-up: ``first_epoch_s``, and its first batch:
    ``first_batch_s``), then ``epochs`` timed full passes with the same persistent workers, as a
    training run goes through its epochs."""
    times, first, n = [], [], 0
    for _ in range(1 + epochs):
        n = 0
        start = time.perf_counter()
        for batch in loader:
            images = images_of(batch)
            if n == 0:
                first.append(time.perf_counter() - start)
            n += len(images)
        times.append(time.perf_counter() - start)
    return {"samples": n, "seconds": times[1:], "first_epoch_s": times[0], "first_batch_s": first[0],
            "shape": list(images.shape)}


def measure_ours(urls: list[str], workers: int, epochs: int, recrop: bool = True, image_format: str = "float",
                 size: int = SIZE) -> dict:
    loader = _ours_loader(urls, workers, recrop, image_format, size)
    return {"rows": {"": _epochs(loader, epochs, lambda b: b["image"] if isinstance(b, dict) else b[0])}}


# --------------------------------------------------------------------------------------------
# Hopenet-style per-file dataset (from Hopenet's datasets.Pose_300W_LP and utils)
# --------------------------------------------------------------------------------------------
class HopenetStyle:
    """``torch.utils.data.Dataset`` the way Hopenet's ``Pose_300W_LP`` reads one sample per call."""

    def __init__(self, root: str):
        from torchvision import transforms

        self.files = common.raw_pairs(Path(root))
        self.transform = transforms.Compose([
            transforms.Resize(240), transforms.RandomCrop(224), transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        import numpy as np
        import scipy.io as sio
        import torch
        from PIL import Image

        jpg, mat_path = self.files[index]
        img = Image.open(jpg)
        img = img.convert("RGB")
        pt2d = sio.loadmat(str(mat_path))["pt2d"]  # utils.get_pt2d_from_mat
        x_min, y_min = min(pt2d[0, :]), min(pt2d[1, :])
        x_max, y_max = max(pt2d[0, :]), max(pt2d[1, :])
        k = np.random.random_sample() * 0.2 + 0.2
        x_min -= 0.6 * k * abs(x_max - x_min)
        y_min -= 2 * k * abs(y_max - y_min)
        x_max += 0.6 * k * abs(x_max - x_min)
        y_max += 0.6 * k * abs(y_max - y_min)
        img = img.crop((int(x_min), int(y_min), int(x_max), int(y_max)))
        pose = sio.loadmat(str(mat_path))["Pose_Para"][0][:3]  # utils.get_ypr_from_mat
        pitch, yaw, roll = (float(v) * 180 / np.pi for v in pose)
        bins = np.array(range(-99, 102, 3))
        binned_pose = np.digitize([yaw, pitch, roll], bins) - 1
        labels = torch.LongTensor(binned_pose)
        cont_labels = torch.FloatTensor([yaw, pitch, roll])
        img = self.transform(img)
        return img, labels, cont_labels, jpg.stem


def measure_hopenet(root: str, workers: int, epochs: int) -> dict:
    from torch.utils.data import DataLoader, Dataset

    class _Dataset(HopenetStyle, Dataset):
        pass

    loader = DataLoader(_Dataset(root), batch_size=BATCH_SIZE, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    row = _epochs(loader, epochs, lambda b: b[0])
    assert row["shape"][1:] == [3, 224, 224]
    return {"rows": {"": row}}


# --------------------------------------------------------------------------------------------
# Bare decode of the stored crops
# --------------------------------------------------------------------------------------------
_JPEGS: list[bytes] = []
_WINDOWS: list[list[int]] = []  # per JPEG: Hopenet's window in the stored crop (``then="cut+float"``)
_DECODE: list = []  # the bare decoder of this process (common.bare_decoder), then the rest of the work


def _decode_chunk(indices) -> int:
    decode = _DECODE[0]
    return sum(decode(i).shape[0] for i in indices)


def _decoder_of(decoder: str, then: str):
    """Index -> decoded image of ``_JPEGS[index]``; with ``then="cut+float"``, then cut to its
    Hopenet window at 224 px (``crop.cut_window``) and written as ImageNet-normalised float planes
    into a batch-sized ring of buffers (the loader's own image writer): the main loader row's
    per-image work with no loader around it (no tar, labels, batching or hand-over)."""
    decode = common.bare_decoder(decoder)
    if then == "none":
        return lambda i: decode(_JPEGS[i])
    import numpy as np

    from dataprep import crop
    from dataprep.loader.images import _write_image

    ring = np.empty((BATCH_SIZE, 3, SIZE, SIZE), np.float32)
    scratch: dict = {}

    def decode_cut_write(i: int):
        image, _ = crop.cut_window(decode(_JPEGS[i]), _WINDOWS[i], SIZE)
        out = ring[i % BATCH_SIZE]
        _write_image(out, image, True, "imagenet", scratch)
        return out
    return decode_cut_write


def measure_bare_decode(urls: list[str], workers: int, repeats: int, decoder: str = "codec",
                        shuffled: bool = True, then: str = "none") -> dict:
    """The stored crops' JPEGs decoded from memory by ``decoder``: ``"codec"`` is
    ``dataprep.codec.decode_bgr`` (the loader's decoder: libjpeg-turbo's TurboJPEG API, OpenCV's
    pixels), ``"cv2"`` is ``cv2.imdecode``. The limit is the faster of the two. ``shuffled``: in a
    fixed shuffled order (consecutive JPEGs differ, as in the loader), else in the shards' order.
    ``then``: ``"cut+float"`` adds the main row's cut and float write to each decode
    (:func:`_decoder_of`)."""
    import orjson

    from dataprep import crop

    _JPEGS.clear()
    _WINDOWS.clear()
    for url in urls:
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith((".jpg", ".json"))}
        for name, data in members.items():
            if name.endswith(".jpg"):
                _JPEGS.append(data)
                record = orjson.loads(members[name[:-4] + ".json"])
                _WINDOWS.append(crop.recrop_window(record, "hopenet", record["crop_size"],
                                                   rng=random.Random(len(_WINDOWS))))
    order = list(range(len(_JPEGS)))
    if shuffled:
        random.Random(0).shuffle(order)
    _JPEGS[:] = [_JPEGS[i] for i in order]
    _WINDOWS[:] = [_WINDOWS[i] for i in order]
    _DECODE[:] = [_decoder_of(decoder, then)]
    n = len(_JPEGS)
    rows = {"1 proc": {"samples": n, "seconds": common.timed_repeats(lambda: _decode_chunk(range(n)), repeats)}}
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_decode_chunk, [[0]] * workers)  # up before the clock
            chunks = [range(i, min(i + 64, n)) for i in range(0, n, 64)]
            rows[f"{workers} procs"] = {"samples": n, "seconds": common.timed_repeats(
                lambda: sum(pool.imap_unordered(_decode_chunk, chunks)), repeats)}
    return {"rows": rows}


# --------------------------------------------------------------------------------------------
def _loose_room() -> dict:
    """Build options of shards with room for Hopenet's window (``boxes.ROOM_MARGIN``), at 320 px
    to keep the face's pixels."""
    from dataprep.boxes import ROOM_MARGIN

    return dict(margin=ROOM_MARGIN["hopenet"], crop_size=320)


def main(argv=None) -> int:
    p = common.base_parser("dataprep streaming loader vs Hopenet-style per-file loading vs bare JPEG decode")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: all cores)")
    args = p.parse_args(argv)
    mode = common.mode_of(args)
    cfg = MODES[mode]
    rounds = args.repeats or cfg["rounds"]
    workers = args.workers if args.workers is not None else common.cpu_count()
    work = common.work_dir("load", args.work)
    try:
        root, n = common.scaled_dataset(work, "300w_lp", cfg["copies"])
        urls = common.built_shards(work, root, cfg["shard_size"])
        loose_urls = common.built_shards(work, root, cfg["shard_size"], **_loose_room())
        base = dict(target="measure_ours", urls=urls, workers=workers, epochs=cfg["ours_epochs"])
        ours = {
            "ours loader": base,
            "ours loader, stored crops": dict(base, recrop=False),
            "ours loader, uint8": dict(base, image_format="uint8"),
            "ours loader, 64 px": dict(base, size=64),
            "ours loader, loose-room shards": dict(base, urls=loose_urls),
        }
        specs = common.with_before(ours, args.before)
        specs["hopenet-style"] = dict(target="measure_hopenet", root=str(root), workers=workers, epochs=cfg["hopenet_epochs"])
        specs["bare decode,"] = dict(target="measure_bare_decode", urls=urls, workers=workers, repeats=cfg["repeats"])
        specs["bare decode (cv2.imdecode),"] = dict(target="measure_bare_decode", urls=urls, workers=workers,
                                                    repeats=cfg["repeats"], decoder="cv2")
        specs["bare decode, tar order,"] = dict(target="measure_bare_decode", urls=urls, workers=workers,
                                                repeats=cfg["repeats"], shuffled=False)
        specs["bare decode, loose-room shards,"] = dict(target="measure_bare_decode", urls=loose_urls, workers=workers,
                                                        repeats=cfg["repeats"])
        specs["bare decode + cut + float write,"] = dict(target="measure_bare_decode", urls=urls, workers=workers,
                                                         repeats=cfg["repeats"], then="cut+float")
        cases = common.isolated_cases("load", specs)
        print(f"load benchmark ({mode}): {n} samples in {len(urls)} shards, batch {BATCH_SIZE}, {workers} workers, "
              f"{rounds} round(s), {common.cpu_count()} cores", flush=True)
        results = common.interleaved(cases, rounds)
        summary = {name: common.summarize(entry) for name, entry in results.items()}
        print()
        for k, s in summary.items():
            for key in ("first_epoch_s", "first_batch_s"):
                values = results[k]["extra_all"].get(key)
                s[key] = min(values) if values else None
        print(common.table([{"case": k, **s} for k, s in summary.items()],
                           common.ROW_COLUMNS + [("first_epoch_s", "1st epoch s", "{:.3f}"),
                                                 ("first_batch_s", "1st batch s", "{:.3f}"),
                                                 ("peak_tree_pss_mb", "peak MB (process tree)", "{:.0f}")]))
        rate = {k: s["rate"] for k, s in summary.items()}
        procs = f"{workers} procs" if workers > 1 else "1 proc"
        bare = max(rate[f"bare decode, {procs}"], rate[f"bare decode (cv2.imdecode), {procs}"])  # the limit
        loose_bare = rate[f"bare decode, loose-room shards, {procs}"]
        payload = {
            "benchmark": "load", "mode": mode, "samples": n, "shards": len(urls), "workers": workers,
            "batch_size": BATCH_SIZE, "rounds": rounds,
            "ours_vs_hopenet": rate["ours loader"] / rate["hopenet-style"],
            "ours_vs_hopenet_target": 5.0,
            "ours_vs_bare_decode": rate["ours loader"] / bare,
            "ours_vs_bare_decode_target": 0.5,
            "ours_vs_bare_decode_tar_order": rate["ours loader"] / rate[f"bare decode, tar order, {procs}"],
            "ours_vs_bare_decode_cut_float": rate["ours loader"] / rate[f"bare decode + cut + float write, {procs}"],
            "stored_crops_vs_hopenet": rate["ours loader, stored crops"] / rate["hopenet-style"],
            "stored_crops_vs_bare_decode": rate["ours loader, stored crops"] / bare,
            "loose_room_vs_hopenet": rate["ours loader, loose-room shards"] / rate["hopenet-style"],
            "loose_room_vs_bare_decode": rate["ours loader, loose-room shards"] / loose_bare,
            "rates": {k: round(v, 1) for k, v in rate.items()},
            "first_epoch_s": {k: round(s["first_epoch_s"], 3) for k, s in summary.items() if s.get("first_epoch_s")},
            "peak_mb": {k: round(s.get("peak_tree_pss_mb", 0.0), 1) for k, s in summary.items()},
        }
        if args.before:
            payload["ours_vs_before"] = common.speedups_vs_before(rate)
        print()
        common.final_json(payload)
        return 0
    finally:
        common.cleanup(work, args)


if __name__ == "__main__":
    sys.exit(main())
