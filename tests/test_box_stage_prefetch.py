"""detect_all's read-ahead is bounded (the dataset's pixels are never all in memory at once) and a
rebuild answered by the cache decodes nothing; the answers are the same either way."""
from __future__ import annotations

from pathlib import Path

from dataprep import box_stage, codec
from dataprep.datasets import get_reader
from dataprep.detectors import Detection, DetectionCache


class FakeDetector:
    """Returns one box per image; records how many images had been decoded when it was called."""

    name = "fake"
    fingerprint = "f" * 64

    def __init__(self, decoded: list):
        self.decoded = decoded
        self.calls: list[tuple[int, int]] = []  # (images detected so far, images decoded so far)
        self.seen = 0

    def detect(self, images):
        self.calls.append((self.seen, len(self.decoded)))
        self.seen += len(images)
        return [[Detection(box=(1.0, 2.0, 30.0 + i % 7, 40.0), score=0.9)] for i, _ in enumerate(images)]


def _counting_decode(monkeypatch) -> list:
    decoded: list = []
    real = codec.decode_rgb_capped

    def decode(data):
        decoded.append(1)
        return real(data)

    monkeypatch.setattr(codec, "decode_rgb_capped", decode)
    return decoded


def test_read_ahead_is_bounded_and_cache_hits_are_not_decoded(sample_tree: Path, tmp_path, monkeypatch):
    root = sample_tree / "300W_LP"
    refs = get_reader("300w_lp").list_samples(root)
    chunk, threads = 2, 2
    cache = DetectionCache(tmp_path / "cache")

    decoded = _counting_decode(monkeypatch)
    detector = FakeDetector(decoded)
    first = box_stage.detect_all(refs, root, detector, cache, chunk=chunk, threads=threads, progress=False)
    assert set(first) == {r.key for r in refs}
    assert len(detector.calls) == -(-len(refs) // chunk)
    for done, decoded_then in detector.calls:
        # this chunk plus at most the next one prepared ahead
        assert decoded_then <= done + 2 * chunk

    decoded.clear()
    again = FakeDetector(decoded)
    second = box_stage.detect_all(refs, root, again, cache, chunk=chunk, threads=threads, progress=False)
    assert again.calls == [] and decoded == []
    assert second == first
