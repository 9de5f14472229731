"""RetinaFace-ResNet50 (retinaface-pytorch 0.0.8 network and weights) with batched pre/post-processing.

Only ``retinaface.network``, ``retinaface.prior_box`` and ``retinaface.box_utils`` are imported:
the package's other modules import albumentations, which this project does not install.

Pre/post-processing follows ``retinaface/predict_single.py`` (``Model.predict_jsons``), the code
the released ``resnet50_2020-07-20`` weights are used with:

* RGB input; resize so the longest side is ``max_size`` (``albumentations.LongestMaxSize``:
  ``scale = max_size / max(h, w)``, new side ``round(side * scale)``, ``cv2.INTER_LINEAR``;
  it also enlarges small images); ``max_size=None`` skips the resize;
* ``albumentations.Normalize`` defaults: ``(x / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)``
  per RGB channel (not the Caffe-style BGR mean (104, 117, 123) of the original Pytorch_Retinaface);
* priors ``min_sizes=[[16, 32], [64, 128], [256, 512]]``, ``steps=[8, 16, 32]``, ``clip=False``,
  on the resized size; ``variance = [0.1, 0.2]``;
* score = softmax(conf)[:, 1]; keep ``score > confidence_threshold`` (0.7); NMS IoU 0.4.

Differences, all deliberate: boxes and landmarks are scaled back with separate x and y factors
(the package uses ``original_height / resized_height`` for both), scores and boxes are not rounded to
2 decimals, boxes are not clipped (the package computes a clipped box but returns the raw one; we
likewise return the raw one and drop only boxes lying wholly outside the image), and at most
``pre_nms_top_k`` candidates (5000) go into NMS, which matters only for near-zero thresholds.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import nms

from retinaface.box_utils import decode, decode_landm
from retinaface.network import RetinaFace
from retinaface.prior_box import priorbox

from ..devices import resolve_device
from ..weights import TorchFileError, load_torch_file, state_dict_misfit, unwrap_state_dict
from .base import Detection, Detector, DetectorWeightsError, make_fingerprint

#: From retinaface/pre_trained_models.py (that module imports albumentations, so it is not imported).
WEIGHTS_URL = (
    "https://github.com/ternaus/retinaface/releases/download/0.01/retinaface_resnet50_2020-07-20-f168fae3c.zip"
)
WEIGHTS_GLOB = "retinaface_resnet50_2020-07-20*"

RETURN_LAYERS = {"layer2": 1, "layer3": 2, "layer4": 3}
IN_CHANNELS = 256
OUT_CHANNELS = 256
MIN_SIZES = [[16, 32], [64, 128], [256, 512]]
STEPS = [8, 16, 32]
CLIP = False
VARIANCE = (0.1, 0.2)
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
CONFIDENCE_THRESHOLD = 0.7
NMS_THRESHOLD = 0.4
MAX_SIZE = 960


class RetinaFaceNet(RetinaFace):
    """``retinaface.network.RetinaFace("Resnet50", in_channels=256, out_channels=256,
    return_layers={"layer2": 1, "layer3": 2, "layer4": 3})`` with the backbone built by
    ``torchvision.models.resnet50(weights=None)``: same modules and state-dict keys, and it never
    downloads ImageNet weights nor uses torchvision's deprecated ``pretrained=`` argument."""

    def __init__(self) -> None:
        from retinaface.net import FPN, SSH  # noqa: PLC0415 - same modules RetinaFace.__init__ uses

        nn.Module.__init__(self)
        backbone = torchvision.models.resnet50(weights=None)
        self.body = IntermediateLayerGetter(backbone, RETURN_LAYERS)
        self.fpn = FPN([IN_CHANNELS * 2, IN_CHANNELS * 4, IN_CHANNELS * 8], OUT_CHANNELS)
        self.ssh1 = SSH(OUT_CHANNELS, OUT_CHANNELS)
        self.ssh2 = SSH(OUT_CHANNELS, OUT_CHANNELS)
        self.ssh3 = SSH(OUT_CHANNELS, OUT_CHANNELS)
        self.ClassHead = self._make_class_head(fpn_num=3, in_channels=OUT_CHANNELS)
        self.BboxHead = self._make_bbox_head(fpn_num=3, in_channels=OUT_CHANNELS)
        self.LandmarkHead = self._make_landmark_head(fpn_num=3, in_channels=OUT_CHANNELS)


def _missing_weights_message(detail: str) -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"{detail}\nRetinaFace needs the released ResNet50 weights (retinaface_resnet50_2020-07-20). "
        f"Download {WEIGHTS_URL} and pass --retinaface-weights PATH (the .zip as downloaded or the .pth "
        f"inside it; in Python: retinaface_weights=PATH), or put the file in {hub}/."
    )


def find_weights(path: str | Path | None = None) -> Path:
    """The weights file to use: ``path`` if given, else ``retinaface_resnet50_2020-07-20*`` in the
    torch hub checkpoint cache (an unpacked .pth preferred over a .zip); else DetectorWeightsError."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            detail = (f"{p} is a folder, not a RetinaFace weights file" if p.is_dir()
                      else f"RetinaFace weights file not found: {p}")
            raise DetectorWeightsError(_missing_weights_message(detail))
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(p for p in hub.glob(WEIGHTS_GLOB) if p.is_file()) if hub.is_dir() else []
    found.sort(key=lambda p: (p.suffix.lower() != ".pth", p.name))
    if not found:
        raise DetectorWeightsError(_missing_weights_message(f"No RetinaFace weights given and none in {hub}."))
    return found[0]


def _read_weights_payload(path: Path) -> tuple[bytes, str]:
    """The serialized state dict's bytes: the file itself, or the single .pth/.pt inside a released zip.

    A torch.save file is a zip too (``<name>/data.pkl`` inside), so that is recognised first.
    """
    data = path.read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return data, str(path)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return data, str(path)  # a torch.save file, not a wrapper zip
        members = [n for n in names if n.lower().endswith((".pth", ".pt", ".ckpt", ".bin"))]
        if len(members) != 1:
            raise DetectorWeightsError(
                _missing_weights_message(
                    f"{path} is a zip but holds {len(members)} weight files ({', '.join(names[:5]) or 'none'}); "
                    "expected exactly one .pth."
                )
            )
        return zf.read(members[0]), f"{path}:{members[0]}"


def normalize_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The network's state dict in a loaded weights file (``weights.unwrap_state_dict``: wrappers
    unwrapped, "module."/"model." key prefixes stripped)."""
    try:
        return unwrap_state_dict(obj, ("module.", "model."))
    except ValueError as exc:
        raise DetectorWeightsError(str(exc)) from None


def load_weights(net: nn.Module, path: Path) -> str:
    """Load the released weights (zip or pth) into ``net`` (strict). Returns the payload's sha256."""
    import hashlib

    payload, label = _read_weights_payload(path)
    try:
        obj = load_torch_file(payload)
    except TorchFileError as exc:
        raise DetectorWeightsError(_missing_weights_message(f"Cannot read RetinaFace weights {label}: {exc}")) from exc
    try:
        state = normalize_state_dict(obj)
    except DetectorWeightsError as exc:
        raise DetectorWeightsError(_missing_weights_message(f"{label}: {exc}")) from None
    # Files from before BatchNorm counted its batches lack "*.num_batches_tracked", which eval ignores.
    own = net.state_dict()
    for key in own:
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = own[key]
    misfit = state_dict_misfit(own, state)
    if misfit:
        raise DetectorWeightsError(
            _missing_weights_message(f"{label} does not fit the RetinaFace-ResNet50 network: {misfit}")
        )
    net.load_state_dict(state, strict=True)
    return hashlib.sha256(payload).hexdigest()


class RetinaFaceDetector(Detector):
    """RetinaFace-ResNet50. ``weights``: the released .zip or .pth (see ``find_weights``)."""

    name = "retinaface"

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        device="auto",
        batch_size: int = 16,
        min_score: float | None = None,
        nms_threshold: float = NMS_THRESHOLD,
        max_size: int | None = MAX_SIZE,
        pre_nms_top_k: int | None = 5000,
    ) -> None:
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.confidence_threshold = CONFIDENCE_THRESHOLD if min_score is None else float(min_score)
        self.nms_threshold = float(nms_threshold)
        self.max_size = None if max_size is None else int(max_size)
        self.pre_nms_top_k = None if pre_nms_top_k is None else int(pre_nms_top_k)
        self.weights_path = find_weights(weights)
        net = RetinaFaceNet()
        self.weights_sha256 = load_weights(net, self.weights_path)
        self.net = net.to(self.device).eval()
        self._mean = torch.tensor(MEAN_RGB, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(STD_RGB, device=self.device).view(1, 3, 1, 1) * 255.0
        self._priors: dict[tuple[int, int], torch.Tensor] = {}
        self.fingerprint = make_fingerprint(
            {
                "detector": self.name,
                "impl": "dataprep.retinaface/1",
                "weights_sha256": self.weights_sha256,
                "confidence_threshold": self.confidence_threshold,
                "nms_threshold": self.nms_threshold,
                "max_size": self.max_size,
                "pre_nms_top_k": self.pre_nms_top_k,
            }
        )

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.max_size is None:
            return height, width
        scale = self.max_size / float(max(height, width))
        if scale == 1.0:
            return height, width
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _prior_boxes(self, size: tuple[int, int]) -> torch.Tensor:
        if size not in self._priors:
            self._priors[size] = priorbox(min_sizes=MIN_SIZES, steps=STEPS, clip=CLIP, image_size=size).to(self.device)
        return self._priors[size]

    def _detect_batch(self, batch: np.ndarray) -> list[list[Detection]]:
        n, height, width = batch.shape[:3]
        rh, rw = self._resized_size(height, width)
        if (rh, rw) != (height, width):
            batch = np.stack([cv2.resize(img, (rw, rh), interpolation=cv2.INTER_LINEAR) for img in batch])
        priors = self._prior_boxes((rh, rw))
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            x = (x.permute(0, 3, 1, 2).float() - self._mean) / self._std
            loc, conf, land = self.net(x)  # one forward pass for the whole batch
            scores_all = F.softmax(conf, dim=-1)[..., 1]
            box_scale = torch.tensor([width, height, width, height], device=self.device, dtype=loc.dtype)
            lm_scale = torch.tensor([width, height] * 5, device=self.device, dtype=loc.dtype)
            out: list[list[Detection]] = []
            for b in range(n):
                scores = scores_all[b]
                idx = torch.where(scores > self.confidence_threshold)[0]
                if self.pre_nms_top_k is not None and idx.numel() > self.pre_nms_top_k:
                    idx = idx[scores[idx].topk(self.pre_nms_top_k).indices]
                if idx.numel() == 0:
                    out.append([])
                    continue
                # Priors are normalised to the resized image, which spans the whole original image,
                # so normalised coordinates times the original size are source pixels.
                boxes = decode(loc[b, idx], priors[idx], VARIANCE) * box_scale
                landmarks = decode_landm(land[b, idx], priors[idx], VARIANCE) * lm_scale
                scores = scores[idx]
                keep = nms(boxes, scores, self.nms_threshold)
                boxes_np = boxes[keep].float().cpu().numpy()
                lms_np = landmarks[keep].float().cpu().numpy().reshape(-1, 5, 2)
                scores_np = scores[keep].float().cpu().numpy()
                out.append([Detection(box=box, score=float(score), landmarks=lms)
                            for box, score, lms in zip(boxes_np, scores_np, lms_np)])
        return out
