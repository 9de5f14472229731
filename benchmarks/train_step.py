"""Which one bounds training, the loader or the model? Per model, in the same run on the same shards:

* ``loader``: samples/s of ``train_minimal``'s own training loader (the model's crop rule and input
  size applied at load time, shuffle, ``W`` workers) until the batch is ready on the device
  (``--gpu-decode``: the stored JPEGs decoded, cropped and resized on the GPU, as
  ``train --gpu-decode`` does);
* ``step``: samples/s of the model's training step alone (forward, the model's loss, backward,
  optimiser step) on a batch already on the device, with the trainer's settings: ``--amp``
  (``auto``: bfloat16 autocast on GPUs that have it, else float16 with a GradScaler; float32 on
  CPU) and channels_last on CUDA;
* ``train``: samples/s of the two together, the trainer's loop (next batch, to the device, step):
  the trainer's images/s.

The smaller of ``loader`` and ``step`` bounds training; ``loader / step`` > 1 means the model is the
bottleneck. Prints a table and a final JSON line. The shards are built with room for every model's
crop rule (``--margin 0.8 --crop-size 320``, ``boxes.ROOM_MARGIN``).

    python benchmarks/train_step.py              # six models, ~5 min on 2 CPU cores
    python benchmarks/train_step.py --quick      # fsanet_var and ehpnet, ~1 min
    python benchmarks/train_step.py --models hopenet,whenet --device cuda [--gpu-decode]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from benchmarks import common  # noqa: E402

MODES = {
    # copies of the sample 300W-LP (20 samples each), batches timed, models
    "full": (20, 12, "fsanet_var,ssrnet_md,ehpnet,whenet,mnn_pose,hopenet"),
    "quick": (8, 6, "fsanet_var,ehpnet"),
    "smoke": (2, 2, "fsanet_var"),
}


def build_shards(base: Path, copies: int) -> tuple[str, int]:
    from dataprep.boxes import ROOM_MARGIN

    root, n = common.scaled_dataset(base, "300w_lp", copies)
    # room for every model's crop rule at load time (no black borders), at 320 px
    tars = [Path(t) for t in common.built_shards(base, root, 50, margin=max(ROOM_MARGIN.values()), crop_size=320)]
    return str(tars[0].parent / ("train-{%s..%s}.tar" % (tars[0].name[6:12], tars[-1].name[6:12]))), n


def measure(model_name: str, urls: str, batch_size: int, batches: int, workers: int, device_name: str,
            amp: str = "auto", gpu_decode: bool = False, phase_seconds: float = 30.0) -> dict:
    """The three rates of one model. Each phase times ``batches`` batches, or fewer (at least 2)
    once ``phase_seconds`` have passed (the large models step at a few samples/s on a CPU); the
    loader alone runs for 2 s at least (12 batches of 16 take it ~0.1 s: too short to time)."""
    import torch

    from train_minimal import registry
    from train_minimal.data import make_loader, prepare_batch
    from train_minimal.engine import TrainStep, amp_dtype_for

    spec = registry.get(model_name)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    amp_dtype = amp_dtype_for(device, amp)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    loader = make_loader(urls, spec, batch_size, train=True, workers=workers, seed=0,
                         epoch_length=batch_size * 1_000_000, gpu_decode=gpu_decode and cuda)  # endless here
    it = iter(loader)

    def next_batch():
        batch = next(it)
        return prepare_batch(batch, spec.normalize, device, size=spec.input_size, channels_last=cuda)

    timed = []  # batches timed per phase

    def rate(work, min_seconds: float = 0.0) -> float:
        start, done = time.perf_counter(), 0
        while True:
            elapsed = time.perf_counter() - start
            if (done >= batches and elapsed >= min_seconds) or (done >= 2 and elapsed >= phase_seconds):
                break
            work()
            done += 1
        sync()
        timed.append(done)
        return done * batch_size / (time.perf_counter() - start)

    images, targets = next_batch()  # includes worker start-up
    sync()
    loader_rate = rate(next_batch, min_seconds=2.0)

    model = spec.build(None).to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = spec.make_optimizer(model, total_steps=2 * batches + 2)
    step = TrainStep(spec, model, optimizer, scheduler, device, amp_dtype)  # the trainer's step

    step(images, targets)  # warm-up (allocations, cudnn autotune)
    sync()
    step_rate = rate(lambda: step(images, targets))
    train_rate = rate(lambda: step(*next_batch()))  # the trainer's loop: the next batch, then the step
    return {"model": model_name, "input": spec.input_size, "crop_rule": spec.crop_rule,
            "loader": loader_rate, "step": step_rate, "train": train_rate, "loader_vs_step": loader_rate / step_rate,
            "bound": "model" if step_rate < loader_rate else "loader", "batches": "/".join(map(str, timed)),
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off"}


def main() -> None:
    from train_minimal.engine import AMP_CHOICES

    parser = common.base_parser("Which one bounds training, the loader or the model? Per model: the trainer's "
                                "loader alone, the training step alone, and the two together (samples/s).",
                                repeats=False, before=False)
    parser.add_argument("--models", default=None, help="comma-separated registry names")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=common.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="as train_minimal's --amp")
    parser.add_argument("--gpu-decode", action="store_true", help="decode JPEGs on the GPU (CUDA only)")
    parser.add_argument("--phase-seconds", type=float, default=30.0,
                        help="stop timing a phase (loader, step, train) after this long, at 2 batches at least")
    args = parser.parse_args()
    copies, batches, models = MODES[common.mode_of(args)]
    models = (args.models or models).split(",")
    base = common.work_dir("train_step", args.work)
    urls, n = build_shards(base, copies)
    print(f"{n} samples of 300W-LP (sample data x{copies}), batch {args.batch_size}, {args.workers} loader workers, "
          f"up to {batches} batches (or {args.phase_seconds:g} s) timed per phase, device {args.device}"
          + (", GPU JPEG decoding" if args.gpu_decode else ""))
    rows = []
    for name in models:
        rows.append(measure(name, urls, args.batch_size, batches, args.workers, args.device, args.amp, args.gpu_decode,
                            args.phase_seconds))
        r = rows[-1]
        print(f"  {name}: loader {r['loader']:.0f}/s, step {r['step']:.1f}/s, train {r['train']:.1f}/s "
              f"-> {r['bound']} bound", flush=True)
    print(common.table(rows, [("model", "model", ""), ("input", "input", ""), ("crop_rule", "crop rule", ""),
                              ("amp", "amp", ""), ("loader", "loader samples/s", "{:.1f}"),
                              ("step", "step samples/s", "{:.1f}"), ("train", "train samples/s", "{:.1f}"),
                              ("loader_vs_step", "loader/step", "{:.2f}"), ("bound", "bound by", ""),
                              ("batches", "batches timed", "")]))
    common.cleanup(base, args)
    common.final_json({"benchmark": "train_step", "mode": common.mode_of(args), "device": args.device,
                       "batch_size": args.batch_size, "gpu_decode": bool(args.gpu_decode),
                       "loader_vs_step": {r["model"]: round(r["loader_vs_step"], 3) for r in rows},
                       "rates": {r["model"]: {"loader": round(r["loader"], 1), "step": round(r["step"], 2),
                                              "train": round(r["train"], 2), "batches_timed": r["batches"]}
                                  for r in rows}})


if __name__ == "__main__":
    main()
