"""MTCNN (facenet-pytorch): weights ship inside the wheel, so it always works offline."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from ..devices import resolve_device
from .base import Detection, Detector, make_fingerprint, sha256_file

_NETS = ("pnet", "rnet", "onet")


def _weights_dir() -> Path:
    import facenet_pytorch

    return Path(facenet_pytorch.__file__).parent / "data"


class MTCNNDetector(Detector):
    """facenet-pytorch ``MTCNN(keep_all=True)``: every face, with its probability and 5 landmarks.

    A batch of equal-size images goes to ``MTCNN.detect`` as one ``N x H x W x 3`` array, so each
    pyramid level is one P-Net pass for the whole batch (and R-/O-Net see all candidates at once).
    ``min_score`` (optional) drops faces below that final O-Net probability.
    """

    name = "mtcnn"

    def __init__(
        self,
        *,
        device="auto",
        batch_size: int = 16,
        min_score: float | None = None,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
    ) -> None:
        from facenet_pytorch import MTCNN

        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.min_score = None if min_score is None else float(min_score)
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self._mtcnn = MTCNN(
            keep_all=True,
            select_largest=False,
            min_face_size=self.min_face_size,
            thresholds=list(self.thresholds),
            factor=self.factor,
            post_process=False,
            device=self.device,
        ).eval()
        weights = {net: sha256_file(_weights_dir() / f"{net}.pt") for net in _NETS}
        self.fingerprint = make_fingerprint(
            {
                "detector": self.name,
                "impl": "dataprep.mtcnn/1",
                "facenet_pytorch": metadata.version("facenet-pytorch"),
                "weights_sha256": weights,
                "min_face_size": self.min_face_size,
                "thresholds": list(self.thresholds),
                "factor": self.factor,
                "min_score": self.min_score,
            }
        )

    def _detect_batch(self, batch: np.ndarray) -> list[list[Detection]]:
        # facenet-pytorch's pyramid has no level for an image whose shorter side is under
        # min_face_size (its own test, below), and it then fails on an empty torch.cat
        if min(batch.shape[1:3]) * (12.0 / self.min_face_size) < 12:
            return [[] for _ in batch]
        with torch.inference_mode():
            boxes, probs, points = self._mtcnn.detect(np.ascontiguousarray(batch), landmarks=True)
        out: list[list[Detection]] = []
        for img_boxes, img_probs, img_points in zip(boxes, probs, points):
            faces: list[Detection] = []
            if img_boxes is not None:
                for box, prob, pts in zip(img_boxes, img_probs, img_points):
                    if prob is None:
                        continue
                    if self.min_score is not None and prob < self.min_score:
                        continue
                    faces.append(Detection(box=box, score=float(prob), landmarks=pts))
            out.append(faces)
        return out
