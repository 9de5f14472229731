"""Which one bounds training, the loader or the model? Per model, in the same run on the same shards:

* ``loader``: samples/s of ``train_minimal``'s own training loader (the model's crop rule and input
  size applied at load time, shuffle, ``W`` workers) until the batch is ready on the device;
* ``step``: samples/s of the model's training step alone (forward, the model's loss, backward,
  optimiser step) on a batch already on the device.

The smaller of the two bounds training; ``loader / step`` > 1 means the model is the bottleneck.
Prints a table and a final JSON line. On a GPU pass ``--device cuda`` (the loader then decodes on
the CPU workers, as the trainer does by default).

    python benchmarks/train_step.py              # a few models, ~3 min on 2 CPU cores
    python benchmarks/train_step.py --quick      # fsanet_var and ehpnet, ~1 min
    python benchmarks/train_step.py --models hopenet,whenet --device cuda
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
    from dataprep.build import BuildOptions, build

    root, n = common.scaled_dataset(base, "300w_lp", copies)
    out = base / "shards"
    # margin 0.5: room for every model's crop rule at load time
    build(BuildOptions(dataset="300w_lp", root=str(root), out=str(out), margin=0.5, shard_size=50,
                       progress=False, overwrite=True))
    tars = sorted(p.name for p in out.glob("*.tar"))
    return str(out / ("train-{%s..%s}.tar" % (tars[0][6:12], tars[-1][6:12]))), n


def measure(model_name: str, urls: str, batch_size: int, batches: int, workers: int, device_name: str) -> dict:
    import torch

    from train_minimal import registry
    from train_minimal.data import make_loader, prepare_batch

    spec = registry.get(model_name)
    device = torch.device(device_name)
    loader = make_loader(urls, spec, batch_size, train=True, workers=workers, seed=0,
                         epoch_length=batch_size * (batches + 1))
    it = iter(loader)
    images, targets = prepare_batch(next(it), spec.normalize, device)  # includes worker start-up
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        batch = next(it)
        prepare_batch(batch, spec.normalize, device)
        seen += len(batch["key"])
    loader_rate = seen / (time.perf_counter() - start)

    model = spec.build(None).to(device).train()
    optimizer, _ = spec.make_optimizer(model, total_steps=batches + 1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = spec.loss(model(images), targets)
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocations, cudnn autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_rate = batches * images.shape[0] / (time.perf_counter() - start)
    return {"model": model_name, "input": spec.input_size, "crop_rule": spec.crop_rule,
            "loader": loader_rate, "step": step_rate, "loader_vs_step": loader_rate / step_rate,
            "bound": "model" if step_rate < loader_rate else "loader"}


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated registry names")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=common.cpu_count())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    copies, batches, models = MODES[common.mode_of(args)]
    models = (args.models or models).split(",")
    base = common.work_dir("train_step", args.work)
    urls, n = build_shards(base, copies)
    print(f"{n} samples of 300W-LP (sample data x{copies}), batch {args.batch_size}, {args.workers} loader workers, "
          f"{batches} batches timed, device {args.device}")
    rows = []
    for name in models:
        rows.append(measure(name, urls, args.batch_size, batches, args.workers, args.device))
        r = rows[-1]
        print(f"  {name}: loader {r['loader']:.0f}/s, step {r['step']:.1f}/s -> {r['bound']} bound", flush=True)
    print(common.table(rows, [("model", "model", ""), ("input", "input", ""), ("crop_rule", "crop rule", ""),
                              ("loader", "loader samples/s", "{:.1f}"), ("step", "step samples/s", "{:.1f}"),
                              ("loader_vs_step", "loader/step", "{:.2f}"), ("bound", "bound by", "")]))
    common.cleanup(base, args)
    common.final_json({"benchmark": "train_step", "mode": common.mode_of(args), "device": args.device, "batch_size": args.batch_size,
                       "loader_vs_step": {r["model"]: round(r["loader_vs_step"], 3) for r in rows},
                       "rates": {r["model"]: {"loader": round(r["loader"], 1), "step": round(r["step"], 2)} for r in rows}})


if __name__ == "__main__":
    main()
