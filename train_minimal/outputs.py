"""What a run writes and ``eval`` reads back: checkpoints (plain dicts, tensors and numbers, read
with ``torch.load(weights_only=True)``), ``metrics.json`` (written atomically) and ``curves.png``."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from dataprep.weights import TorchFileError, load_torch_file

CHECKPOINT_FORMAT = "train_minimal/1"


def load_checkpoint(path: str, what: str = "checkpoint") -> dict:
    """A checkpoint (or a bare state dict) as a dict with ``state_dict``; one-line errors that call
    the file ``what`` (``"--teachers checkpoint"``: which option gave it)."""
    try:
        ckpt = load_torch_file(path)
    except FileNotFoundError:
        raise SystemExit(f"error: {what} {path} not found") from None
    except IsADirectoryError:
        raise SystemExit(f"error: {path} is a folder; give its checkpoint.pt") from None
    except (TorchFileError, OSError) as err:
        raise SystemExit(f"error: {path} is not a checkpoint torch can read ({err})") from None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        return ckpt
    if isinstance(ckpt, dict) and all(torch.is_tensor(v) for v in ckpt.values()):
        return {"state_dict": ckpt, "model": None, "args": {}}  # a bare state dict
    raise SystemExit(f"error: {path} is not a train_minimal checkpoint nor a state dict")


def check_run_folder(out: Path, model_name: str) -> None:
    """Refuse an ``--out`` a training run cannot use, before any data is read: a file (or a path
    under one), or a folder holding another model's run (its ``metrics.json``), which this run's
    files would replace, or a ``checkpoint.pt`` without a run's ``metrics.json`` (converted weights). A
    run of the same model there is replaced, as a rerun expects (said so)."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"is under {path}, which is a file"
                raise SystemExit(f"error: --out {out} {where}; give a folder for the run's checkpoint.pt, "
                                 "metrics.json and curves.png")
            break
    try:
        held = json.loads((out / "metrics.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        held = None
    if not held and (out / "checkpoint.pt").exists():  # converted weights, say, or a run's without its metrics
        raise SystemExit(f"error: --out {out} holds a checkpoint.pt that no run's metrics.json there describes; "
                         f"training {model_name} there would replace it: give another --out, or move it away first")
    if held and held != model_name:
        raise SystemExit(f"error: --out {out} holds a {held} run (checkpoint.pt, metrics.json); training {model_name} "
                         "there would replace it: give another --out, or move those files away first")
    if held:
        print(f"[train] --out {out} holds an earlier {held} run: this run replaces it", file=sys.stderr)


def json_safe(obj):
    """``obj`` with NaN and infinite floats as None: ``json.dumps`` would write them as ``NaN`` /
    ``Infinity``, which strict JSON readers (``jq``, JavaScript, most languages) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_json(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=1, allow_nan=False))
    os.replace(tmp, path)


def plot_curves(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [s["step"] for s in history["steps"]]
    a1.plot(steps, [s["loss"] for s in history["steps"]], lw=0.8, alpha=0.6, label="step")
    ep = history["epochs"]
    if ep:
        a1.plot([e["step"] for e in ep], [e["train_loss"] for e in ep], "o-", label="epoch mean")
    a1.set_xlabel("step")
    a1.set_ylabel("train loss")
    a1.set_title(history.get("model", ""))
    a1.legend()
    names = sorted({n for e in ep for n in e.get("val", {})})
    for name in names:
        xs = [e["epoch"] for e in ep if name in e.get("val", {})]
        for key, style in (("mean", "o-"), ("yaw", ":"), ("pitch", ":"), ("roll", ":")):
            a2.plot(xs, [e["val"][name][key] for e in ep if name in e.get("val", {})], style,
                    label=f"{name} {key}", lw=1.5 if key == "mean" else 0.8)
    a2.set_xlabel("epoch")
    a2.set_ylabel("MAE (deg)")
    if names:
        a2.legend(fontsize=7)
    else:
        a2.text(0.5, 0.5, "no validation set (--val)", ha="center", va="center", transform=a2.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_epoch(out_dir: Path, model, model_name: str, run_args: dict, history: dict, entry: dict) -> None:
    """After an epoch: ``checkpoint.pt`` (the model's weights on the CPU, the run's settings and this
    epoch's validation MAEs; replaced whole, never half written), ``metrics.json`` and ``curves.png``."""
    ckpt = {"format": CHECKPOINT_FORMAT, "model": model_name,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "args": run_args, "epoch": entry["epoch"], "step": entry["step"], "metrics": entry["val"]}
    tmp = out_dir / "checkpoint.pt.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, out_dir / "checkpoint.pt")
    atomic_json(history, out_dir / "metrics.json")
    plot_curves(history, out_dir / "curves.png")
