"""Convert the official FSA-Net Keras weights (shamangary/FSA-Net, ``*.h5`` from ``save_weights``)
into our PyTorch models (``train_minimal/models/fsanet.py``).

    convert("fsanet_capsule_3_16_2_21_5.h5", "fsanet_1x1.pt")      # -> summary dict
    name, model = load_converted("fsanet_1x1.pt")                    # eval-mode nn.Module

The output is read with ``torch.load(path, weights_only=True)``: a dict of plain types,
``{"format", "model", "source", "config", "state_dict"}``, the state dict holding tensors only.

Variant: read from the weights (``ssr_S_model`` holds a 1x1 conv -> ``fsanet_1x1``; only dense
layers -> ``fsanet_var``; nothing, with 192 primary capsules -> ``fsanet_wo``), cross-checked with
the official file name (``fsanet_capsule_*``, ``fsanet_var_capsule_*``, ``fsanet_noS_capsule_*``).
A directory holding the three official files converts to ``fsanet_fusion``.

Layout mapping (Keras ``group/layer/weight:0`` -> our module), see ``keras_to_state_dict``:

* ``ssr_G_model``: ``separable_conv2d_N`` and ``batch_normalization_N`` sorted by N: the first 7
  are ``backbone.stream_x.block1..7`` (ReLU / AvgPool stream, built first in the official code),
  the next 7 ``backbone.stream_s.block1..7`` (Tanh / MaxPool). ``depthwise_kernel`` (3,3,C,1) ->
  ``depthwise.weight`` (C,1,3,3); ``pointwise_kernel`` (1,1,Ci,Co) -> ``pointwise.weight``
  (Co,Ci,1,1); ``bias`` -> ``pointwise.bias``; BN gamma/beta/moving_mean/moving_variance ->
  ``bn.weight/bias/running_mean/running_var``. ``conv2d_N`` sorted by N, in the official build
  order ``s1, x1, s2, x2, s3, x3`` -> ``backbone.conv_s[k]`` / ``backbone.conv_x[k]``.
* ``ssr_S_model``: ``conv2d_N`` (1x1 variant) -> ``mapping.conv``; the dense with 64 inputs ->
  ``mapping.sr`` (shared R map, 64 -> m x 192); the one with 192 inputs -> ``mapping.sl``.
  Dense kernels (in, out) are transposed.
* ``ssr_Cap_model/caps/W:0`` (3, n, 16, 64) -> ``caps.W`` (same layout).
* ``ssr_F_Cap_model``: ``delta_sK`` -> ``heads[K-1].delta``, ``local_delta_stageK`` ->
  ``heads[K-1].local``, the plain ``dense_N`` sorted by N -> ``heads[0..2].pred``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from dataprep.weights import load_torch_file

from .models.fsanet import FSANet, FSANetFusion
from .registry import count_parameters

FORMAT = "train_minimal.fsanet/1"
VARIANT_TO_NAME = {"1x1": "fsanet_1x1", "var": "fsanet_var", "wo": "fsanet_wo"}
NAME_TO_VARIANT = {v: k for k, v in VARIANT_TO_NAME.items()}

_SUFFIX = re.compile(r"^(?P<kind>separable_conv2d|batch_normalization|conv2d|dense)(?:_(?P<n>\d+))?$")


# ------------------------------------------------------------------------------------------------
# Reading the .h5
# ------------------------------------------------------------------------------------------------
def read_keras_h5(h5_path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{model group: {layer: {weight: array}}}`` from a Keras ``save_weights`` (or ``save``) file."""
    import h5py

    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    with h5py.File(h5_path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                parts = name.split("/")
                if len(parts) < 3:
                    raise ValueError(f"{h5_path}: unexpected dataset {name!r} (want group/layer/weight)")
                group, layer, weight = parts[0], "/".join(parts[1:-1]), parts[-1]
                weight = weight.split(":")[0]
                out.setdefault(group, {}).setdefault(layer, {})[weight] = np.asarray(obj[()])

        root.visititems(visit)
    return out


def _find_group(weights, predicate, what):
    hits = [g for g, layers in weights.items() if predicate(layers)]
    if len(hits) != 1:
        raise ValueError(f"expected one Keras sub-model holding {what}, found {hits or 'none'}")
    return weights[hits[0]]


def _sorted_kind(layers: dict, kind: str) -> list[str]:
    names = []
    for name in layers:
        m = _SUFFIX.match(name)
        if m and m.group("kind") == kind:
            names.append((int(m.group("n") or 0), name))
    return [n for _, n in sorted(names)]


def variant_from_name(path) -> str | None:
    stem = Path(str(path)).name.lower()
    if "fsanet" not in stem:
        return None
    if "nos" in stem:
        return "wo"
    if "var" in stem:
        return "var"
    if "capsule" in stem:
        return "1x1"
    return None


def config_from_name(path) -> dict:
    """``S_set`` from an official name (``..._3_16_2_21_5``): num_capsule, dim_capsule, routings,
    num_primcaps, m_dim. Only the routings cannot be read from the weights."""
    m = re.search(r"_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)(?:\.[^.]*)?$", Path(str(path)).name)
    if not m:
        return {}
    keys = ("num_capsule", "dim_capsule", "routings", "num_primcaps", "m_dim")
    return dict(zip(keys, (int(v) for v in m.groups())))


def infer_variant(weights, path=None) -> str:
    """``1x1`` / ``var`` / ``wo`` from the weights; raises if the file name says otherwise."""
    caps = _find_group(weights, lambda ls: "caps" in ls, "the capsule layer")
    n_prim = caps["caps"]["W"].shape[1]
    g = _find_group(weights, lambda ls: any(n.startswith("separable_conv2d") for n in ls), "the streams")
    others = [layers for layers in weights.values()
              if layers is not caps and layers is not g and not any(n.startswith("delta_s") for n in layers)]
    s_layers = {name: w for layers in others for name, w in layers.items()}
    has_conv = any(_SUFFIX.match(n) and _SUFFIX.match(n).group("kind") == "conv2d" for n in s_layers)
    has_dense = any(_SUFFIX.match(n) and _SUFFIX.match(n).group("kind") == "dense" for n in s_layers)
    if has_dense:
        variant = "1x1" if has_conv else "var"
    elif n_prim == 192 and not has_conv:
        variant = "wo"
    else:
        raise ValueError("cannot tell the FSA-Net variant from the weights")
    named = variant_from_name(path) if path is not None else None
    if named is not None and named != variant:
        raise ValueError(f"{path}: the file name says fsanet_{named} but the weights are fsanet_{variant}")
    return variant


# ------------------------------------------------------------------------------------------------
# Mapping
# ------------------------------------------------------------------------------------------------
def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def keras_to_state_dict(weights, variant: str, model: FSANet | None = None) -> dict[str, torch.Tensor]:
    """Map the Keras weights onto ``model``'s state dict (built fresh when not given).

    Every model entry but BN's ``num_batches_tracked`` must be filled and every Keras weight used,
    with matching shapes; anything else raises.
    """
    if model is None:
        model = FSANet(variant, **model_config(weights, variant))
    out = _Filling(model.state_dict())
    streams = _map_streams(weights, out)
    caps = _find_group(weights, lambda ls: "caps" in ls, "the capsule layer")
    out.put("caps.W", caps["caps"]["W"], "caps", "W")
    heads = _map_heads(weights, out)
    if variant != "wo":
        # ssr_S_model's layers: those in none of the other three groups
        scoring = {name: w for grp in weights.values() if grp is not streams and grp is not caps and grp is not heads
                   for name, w in grp.items()}
        _map_scoring(scoring, variant, model.mapping.hw, out)
    return out.finished(weights)


class _Filling:
    """A state dict being filled from Keras weights: each entry checked against the model's, each
    Keras weight used remembered."""

    def __init__(self, ref: dict[str, torch.Tensor]):
        self.ref = ref
        self.sd: dict[str, torch.Tensor] = {}
        self.used: set[tuple[str, str]] = set()

    def put(self, key: str, arr, layer: str, wname: str) -> None:
        t = _t(arr)
        if key not in self.ref:
            raise KeyError(f"no model entry {key!r} for Keras {layer}/{wname}")
        if tuple(self.ref[key].shape) != tuple(t.shape):
            raise ValueError(f"{layer}/{wname}: shape {tuple(t.shape)} != model {key} {tuple(self.ref[key].shape)}")
        self.sd[key] = t
        self.used.add((layer, wname))

    def finished(self, weights) -> dict[str, torch.Tensor]:
        """The state dict in the model's order, once every entry is filled and every weight used."""
        for key, val in self.ref.items():
            if key.endswith("num_batches_tracked"):
                self.sd[key] = torch.zeros_like(val)
        missing = [k for k in self.ref if k not in self.sd]
        if missing:
            raise ValueError(f"model entries not filled from the Keras file: {missing}")
        all_weights = {(layer, w) for grp in weights.values() for layer, ws in grp.items() for w in ws}
        unused = sorted(all_weights - self.used)
        if unused:
            raise ValueError(f"Keras weights not mapped: {unused}")
        return {k: self.sd[k] for k in self.ref}


def _map_streams(weights, out: _Filling) -> dict:
    """ssr_G_model: the two streams' separable conv blocks and the stages' 1x1 convs; returns its group."""
    g = _find_group(weights, lambda ls: any(n.startswith("separable_conv2d") for n in ls), "the streams")
    seps = _sorted_kind(g, "separable_conv2d")
    bns = _sorted_kind(g, "batch_normalization")
    convs = _sorted_kind(g, "conv2d")
    if len(seps) != 14 or len(bns) != 14 or len(convs) != 6:
        raise ValueError(f"ssr_G_model: want 14 separable convs, 14 BN, 6 convs; got {len(seps)}, {len(bns)}, {len(convs)}")
    for idx, (sep, bn) in enumerate(zip(seps, bns)):
        stream = "stream_x" if idx < 7 else "stream_s"
        p = f"backbone.{stream}.block{idx % 7 + 1}"
        w = g[sep]
        out.put(f"{p}.depthwise.weight", w["depthwise_kernel"].transpose(2, 3, 0, 1), sep, "depthwise_kernel")
        out.put(f"{p}.pointwise.weight", w["pointwise_kernel"].transpose(3, 2, 0, 1), sep, "pointwise_kernel")
        out.put(f"{p}.pointwise.bias", w["bias"], sep, "bias")
        b = g[bn]
        for kw, tw in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                       ("moving_variance", "running_var")):
            out.put(f"{p}.bn.{tw}", b[kw], bn, kw)
    for idx, conv in enumerate(convs):  # s1, x1, s2, x2, s3, x3
        p = f"backbone.{'conv_s' if idx % 2 == 0 else 'conv_x'}.{idx // 2}"
        out.put(f"{p}.weight", g[conv]["kernel"].transpose(3, 2, 0, 1), conv, "kernel")
        out.put(f"{p}.bias", g[conv]["bias"], conv, "bias")
    return g


def _map_heads(weights, out: _Filling) -> dict:
    """ssr_F_Cap_model: each stage's delta, local delta and bin-score dense layers; returns its group."""
    fh = _find_group(weights, lambda ls: "delta_s1" in ls, "the stage heads")
    for k in range(3):
        for kname, mod in ((f"delta_s{k + 1}", "delta"), (f"local_delta_stage{k + 1}", "local")):
            out.put(f"heads.{k}.{mod}.weight", fh[kname]["kernel"].T, kname, "kernel")
            out.put(f"heads.{k}.{mod}.bias", fh[kname]["bias"], kname, "bias")
    preds = _sorted_kind(fh, "dense")
    if len(preds) != 3:
        raise ValueError(f"ssr_F_Cap_model: want 3 bin-score dense layers, got {preds}")
    for k, dn in enumerate(preds):
        out.put(f"heads.{k}.pred.weight", fh[dn]["kernel"].T, dn, "kernel")
        out.put(f"heads.{k}.pred.bias", fh[dn]["bias"], dn, "bias")
    return fh


def _map_scoring(layers: dict, variant: str, hw: int, out: _Filling) -> None:
    """ssr_S_model (variants with a scoring function): the R and L dense layers of the fine-grained
    mapping, told apart by their input width, and the 1x1 variant's scoring conv."""
    dens = _sorted_kind(layers, "dense")
    sr = [d for d in dens if layers[d]["kernel"].shape[0] == hw]
    sl = [d for d in dens if layers[d]["kernel"].shape[0] == 3 * hw]
    if len(sr) != 1 or len(sl) != 1 or len(dens) != 2:
        raise ValueError(f"ssr_S_model: cannot tell the R and L dense layers apart in {dens}")
    for dn, mod in ((sr[0], "sr"), (sl[0], "sl")):
        out.put(f"mapping.{mod}.weight", layers[dn]["kernel"].T, dn, "kernel")
        out.put(f"mapping.{mod}.bias", layers[dn]["bias"], dn, "bias")
    if variant == "1x1":
        cv = _sorted_kind(layers, "conv2d")
        if len(cv) != 1:
            raise ValueError(f"ssr_S_model: want one scoring conv, got {cv}")
        out.put("mapping.conv.weight", layers[cv[0]]["kernel"].transpose(3, 2, 0, 1), cv[0], "kernel")
        out.put("mapping.conv.bias", layers[cv[0]]["bias"], cv[0], "bias")


def model_config(weights, variant: str, path=None) -> dict:
    caps = _find_group(weights, lambda ls: "caps" in ls, "the capsule layer")["caps"]["W"]
    cfg = {"num_capsule": int(caps.shape[0]), "num_primcaps": int(caps.shape[1]),
           "dim_capsule": int(caps.shape[2]), "routings": 2, "m_dim": 5}
    named = config_from_name(path) if path is not None else {}
    if "routings" in named:
        cfg["routings"] = named["routings"]
    if variant != "wo":
        for grp in weights.values():
            for name, w in grp.items():
                m = _SUFFIX.match(name)
                if m and m.group("kind") == "dense" and "kernel" in w and w["kernel"].shape[0] == 64 \
                        and w["kernel"].shape[1] % (3 * 64) == 0 and "caps" not in grp:
                    cfg["m_dim"] = int(w["kernel"].shape[1] // (3 * 64))
    return cfg


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _official_files(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(directory.glob("*.h5")):
        v = variant_from_name(p)
        if v is not None and p.name.startswith("fsanet"):
            if v in found:
                raise ValueError(f"{directory}: two files for fsanet_{v}: {found[v].name}, {p.name}")
            found[v] = p
    missing = [v for v in FSANetFusion.MEMBERS if v not in found]
    if missing:
        raise FileNotFoundError(f"{directory}: no official .h5 for {', '.join('fsanet_' + v for v in missing)}")
    return found


def convert_h5(h5_path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """``(model name, config, state dict)`` from one official .h5 (nothing written)."""
    weights = read_keras_h5(h5_path)
    variant = infer_variant(weights, h5_path)
    cfg = model_config(weights, variant, h5_path)
    model = FSANet(variant, **cfg)
    return VARIANT_TO_NAME[variant], cfg, keras_to_state_dict(weights, variant, model)


def convert(h5_path, out_path) -> dict:
    """Convert an official FSA-Net .h5 (or a directory with the three, giving ``fsanet_fusion``)
    into ``out_path`` (``torch.save`` of plain dicts/tensors). Returns a summary dict."""
    src = Path(h5_path)
    if src.is_dir():
        files = _official_files(src)
        state: dict[str, torch.Tensor] = {}
        cfg: dict = {}
        for v in FSANetFusion.MEMBERS:
            _, c, sd = convert_h5(files[v])
            if c != {"num_capsule": 3, "dim_capsule": 16, "routings": 2, "m_dim": 5,
                     "num_primcaps": 192 if v == "wo" else 21}:
                raise ValueError(f"{files[v].name}: fusion members must have the official config, got {c}")
            cfg[v] = c
            state.update({f"members.{v}.{k}": t for k, t in sd.items()})
        name, source = "fsanet_fusion", [files[v].name for v in FSANetFusion.MEMBERS]
        model = FSANetFusion()
    else:
        name, cfg, state = convert_h5(src)
        source = src.name
        model = FSANet(NAME_TO_VARIANT[name], **cfg)
    model.load_state_dict(state)  # strict: proves the file loads
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "model": name, "source": source, "config": cfg, "state_dict": state}, out)
    return {"model": name, "out_path": str(out), "source": source, "config": cfg,
            "tensors": len(state), "trainable_params": count_parameters(model)}


def _name_from_state(state: dict) -> str:
    if any(k.startswith("members.") for k in state):
        return "fsanet_fusion"
    if "mapping.conv.weight" in state:
        return "fsanet_1x1"
    if "mapping.sr.weight" in state:
        return "fsanet_var"
    if "caps.W" in state:
        return "fsanet_wo"
    raise ValueError("not an FSA-Net state dict")


def _read_pt(path) -> tuple[str, dict, dict]:
    blob = load_torch_file(path)
    if isinstance(blob, dict) and "state_dict" in blob:
        state = blob["state_dict"]
        name = blob.get("model") or _name_from_state(state)
        if name not in NAME_TO_VARIANT and name != "fsanet_fusion":  # another model's train_minimal checkpoint
            raise ValueError(f"{path} holds {name}, not an FSA-Net")
        return name, blob.get("config") or {}, state
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return _name_from_state(blob), {}, blob
    raise ValueError(f"{path}: not a converted FSA-Net file")


def _build(name: str, cfg: dict):
    if name == "fsanet_fusion":
        return FSANetFusion()
    return FSANet(NAME_TO_VARIANT[name], **cfg)


def load_converted(path) -> tuple[str, torch.nn.Module]:
    """``(model name, model in eval mode)`` from a converted ``.pt``, an official ``.h5`` or a
    directory with the three official ``.h5`` (fusion)."""
    p = Path(path)
    if p.is_dir():
        files = _official_files(p)
        model = FSANetFusion()
        state = {}
        for v in FSANetFusion.MEMBERS:
            _, _, sd = convert_h5(files[v])
            state.update({f"members.{v}.{k}": t for k, t in sd.items()})
        name = "fsanet_fusion"
    elif p.suffix.lower() in (".h5", ".hdf5", ".hd5"):
        name, cfg, state = convert_h5(p)
        model = _build(name, cfg)
    else:
        name, cfg, state = _read_pt(p)
        model = _build(name, cfg if name != "fsanet_fusion" else {})
    model.load_state_dict(state)
    return name, model.eval()


def load_state_for(name: str, path) -> dict[str, torch.Tensor]:
    """State dict for registry model ``name`` from ``path`` (used by the specs' ``build``)."""
    got, model = load_converted(path)
    if got != name:
        raise ValueError(f"{path} holds {got}, not {name}")
    return model.state_dict()
