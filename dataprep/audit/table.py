"""The audit's numbers: read a build (plain ``tarfile`` + ``manifest.json``), one row per sample with
every box variant, what each crop rule would do with it, the IoUs between variants, and the flags.

All box math comes from :mod:`dataprep.boxes`; nothing here re-derives a rule.
"""
from __future__ import annotations

import csv
import json
import math
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import boxes as box_rules
from .. import crop as crop_ops
from ..shards import MANIFEST, manifest_shape_problems, split_member


#: Box variants in the order tables and legends list them (others, if any, follow sorted).
VARIANT_ORDER = ("gt", "pt2d", "pt2d_valid", "mtcnn", "retinaface")
DETECTOR_BOXES = ("mtcnn", "retinaface")
#: The crop rules whose windows the audit recomputes (``box`` is the face box itself).
RULES = ("square", "hopenet", "fsanet")

FLAGS = ("placeholder_box", "squashed", "padded", "detector_disagrees", "outside_image", "reused_box", "rejected")
FLAG_HELP = {
    "placeholder_box": "pt2d box polluted by AFLW2000's missing-landmark placeholders (x=-1, y=452): "
                       "extra.pt2d_missing > 0 or IoU(gt, pt2d) below --placeholder-iou",
    "squashed": "the stored crop window is not square and resizing it to the square crop distorts it by "
                "more than --squash-threshold (max(w,h)/min(w,h) - 1)",
    "padded": "more of the stored crop than --padding-threshold lies outside the source image (or, for a cropscale "
              "variant, outside the crop it was cut from), so it is black in the JPEG (a --margin, a loose rule or a "
              "face near the border)",
    "detector_disagrees": "a detector box (mtcnn, retinaface) has IoU with the gt box below --detector-iou",
    "outside_image": "a face box extends past the image by more than --outside-tolerance px "
                     "(placeholder-polluted pt2d boxes are left to placeholder_box)",
    "reused_box": "BIWI tracking reused the previous frame's box (tracking.reused)",
    "rejected": "the build rejected the sample (manifest 'rejected'; reason and message in the row)",
}
#: What the severity of each flag is (contact sheets show the largest first).
SEVERITY_HELP = {
    "placeholder_box": "1 - IoU(gt, pt2d)",
    "squashed": "square distortion of the stored crop",
    "padded": "share of the stored crop outside the image",
    "detector_disagrees": "1 - lowest IoU(gt, detector)",
    "outside_image": "fraction of the box area outside the image (largest over boxes)",
    "reused_box": "1 - IoU(gt, reused box)",
    "rejected": "-",
}


@dataclass(frozen=True)
class Thresholds:
    squash: float = 0.15
    padding: float = 0.25
    detector_iou: float = 0.5
    placeholder_iou: float = 0.7
    outside_tolerance: float = 0.0


@dataclass
class Sample:
    """One sample of a build: its label record and where its members sit in which shard."""

    record: dict
    shard: Path
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.record["key"]


@dataclass
class Build:
    path: Path
    manifest: dict
    samples: list[Sample]

    @property
    def rejected(self) -> list[dict]:
        return list(self.manifest.get("rejected", []))

    def variants(self) -> list[str]:
        names = {n for s in self.samples for n in s.record.get("boxes", {})}
        return [n for n in VARIANT_ORDER if n in names] + sorted(names - set(VARIANT_ORDER))

    def read_member(self, sample: Sample, ext: str) -> bytes | None:
        info = sample.members.get(ext)
        if info is None:
            return None
        with tarfile.open(sample.shard) as tar:
            f = tar.extractfile(info)
            return None if f is None else f.read()


class AuditError(RuntimeError):
    """A build the audit cannot read; the message says what is wrong."""


def load_build(out) -> Build:
    """Read ``OUT/manifest.json`` and the label record of every sample in the manifest's shards."""
    out = Path(out)
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        what = "holds no " + MANIFEST if out.is_dir() else "does not exist" if not out.exists() else "is not a folder"
        raise AuditError(f"{out} {what}: pass the --out folder of a finished dataprep build")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise AuditError(f"{manifest_path} is not valid JSON ({err}); rerun the build to write it again") from None
    shape = manifest_shape_problems(manifest)
    if shape:
        raise AuditError(f"{manifest_path} is not a dataprep build manifest ({shape[0]}); rerun the build to write "
                         "it again")
    shards = manifest["shards"]
    samples: list[Sample] = []
    for shard in shards:
        path = out / shard["name"]
        if not path.is_file():
            raise AuditError(f"{path} is listed in {manifest_path} but missing; run `dataprep verify {out}` and "
                             "rerun the build (it writes missing shards again)")
        by_key: dict[str, Sample] = {}
        try:
            with tarfile.open(path) as tar:
                for info in tar.getmembers():
                    key, ext = split_member(info.name)
                    if not info.isfile() or key is None:
                        continue
                    sample = by_key.setdefault(key, Sample(record={}, shard=path))
                    sample.members[ext] = info
                    if ext == "json":
                        sample.record = json.loads(tar.extractfile(info).read())
        except (tarfile.TarError, EOFError, ValueError) as err:
            raise AuditError(f"{path} is not a readable shard ({err}); run `dataprep verify {out}`") from None
        samples.extend(s for s in by_key.values() if s.record)
    return Build(out, manifest, samples)


# ------------------------------------------------------------------------------------- per rule
def rule_box_name(record: dict, rule: str) -> str:
    """The box ``rule`` reads for this record (``boxes.rule_box_name``)."""
    return box_rules.rule_box_name(record.get("boxes", {}), record.get("box_source", "gt"), rule)


def rule_window(record: dict, rule: str) -> list[float]:
    """``rule``'s crop window for this record (``rng=None``: Hopenet's test-time window, its mid k
    on 300W-LP and the centred square), from the
    box :func:`rule_box_name` picks, through ``crop.rule_window``."""
    return crop_ops.rule_window({"boxes": {}, **record}, rule, rng=None, box_name=rule_box_name(record, rule),
                                margin=float(record.get("crop_margin") or 0.0) if rule == "square" else 0.0)


def outside_fraction(box, image_size) -> float:
    """Fraction of ``box``'s area outside the image (0 when inside)."""
    return 1.0 - box_rules.inside_fraction(box, image_size)


def black_fraction(rec: dict) -> float:
    """The share of a record's stored crop that shows no source pixels (black in its JPEG): its
    window outside the image and, for a ``cropscale`` variant, outside the window it was cut from
    (its entry's ``from``)."""
    crop, total = rec["crop"], box_rules.area(rec["crop"])
    real = box_rules.clip_to_image(crop, rec["image_size"])
    for entry in rec.get("augment") or []:
        if isinstance(entry, dict) and entry.get("op") == "cropscale" and "from" in entry:
            real = box_rules.intersection(real, entry["from"])
    return 1.0 - box_rules.area(real) / total if total > 0 else 0.0


def augment_ops(record: dict) -> list[str]:
    return [str(a.get("op", a)) if isinstance(a, dict) else str(a) for a in record.get("augment") or []]


# -------------------------------------------------------------------------------------- the row
@dataclass
class Row:
    """One audited sample: the CSV values, its flags and per-flag severity."""

    values: dict
    flags: list[str]
    severity: dict[str, float]
    sample: Sample | None = None  # None for rejected samples

    @property
    def key(self) -> str:
        return self.values["key"]


def _pairs(variants: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(variants) for b in variants[i + 1:]]


def columns(variants: list[str]) -> list[str]:
    cols = ["key", "split", "status", "source", "dataset", "group", "augment", "yaw", "pitch", "roll",
            "image_w", "image_h", "box_source", "crop_rule"]
    for v in variants:
        cols += [f"{v}_x1", f"{v}_y1", f"{v}_x2", f"{v}_y2", f"{v}_aspect"]
        if v in DETECTOR_BOXES:
            cols.append(f"{v}_score")
    cols += ["crop_x1", "crop_y1", "crop_x2", "crop_y2", "crop_aspect", "crop_distortion", "crop_padding"]
    for r in RULES:
        cols += [f"{r}_box", f"{r}_x1", f"{r}_y1", f"{r}_x2", f"{r}_y2", f"{r}_aspect", f"{r}_distortion",
                 f"{r}_padding"]
    for a, b in _pairs(variants):
        cols += [f"iou_{a}_{b}", f"shift_{a}_{b}"]
    for a, b in _pairs(list(RULES)):
        cols.append(f"iou_{a}_{b}")
    cols += ["pt2d_missing", "tracking_reused", "outside_boxes", "flags", "reason", "message"]
    return cols


def sample_row(sample: Sample, variants: list[str], th: Thresholds) -> Row:
    """A written sample's row: its measurements (:func:`_measurements`) and the flags its
    thresholds raise (:func:`_flags`), with a severity per flag."""
    v = _measurements(sample.record, variants)
    flags, severity = _flags(sample.record, variants, v, th)
    v["flags"] = ";".join(flags)
    v["reason"] = v["message"] = ""
    return Row(v, flags, severity, sample)


def _measurements(rec: dict, variants: list[str]) -> dict:
    """The table's columns for one label record: its labels, each box variant and rule window
    (corners, aspect, distortion), IoUs and centre shifts between them, and its bookkeeping."""
    boxes = rec.get("boxes", {})
    size = rec["image_size"]
    v: dict = {
        "key": rec["key"], "split": rec.get("split", ""), "status": "written", "source": rec.get("source", ""),
        "dataset": rec.get("dataset", ""), "group": rec.get("group", ""), "augment": "+".join(augment_ops(rec)),
        "yaw": rec["yaw"], "pitch": rec["pitch"], "roll": rec["roll"], "image_w": size[0], "image_h": size[1],
        "box_source": rec.get("box_source", ""), "crop_rule": rec.get("crop_rule", ""),
    }
    for name in variants:
        b = boxes.get(name)
        if b is None:
            continue
        v.update({f"{name}_x1": b[0], f"{name}_y1": b[1], f"{name}_x2": b[2], f"{name}_y2": b[3],
                  f"{name}_aspect": box_rules.aspect_ratio(b)})
        if name in DETECTOR_BOXES and name in rec.get("box_scores", {}):
            v[f"{name}_score"] = rec["box_scores"][name]
    crop = rec["crop"]
    v.update({"crop_x1": crop[0], "crop_y1": crop[1], "crop_x2": crop[2], "crop_y2": crop[3],
              "crop_aspect": box_rules.aspect_ratio(crop), "crop_distortion": box_rules.square_distortion(crop),
              "crop_padding": black_fraction(rec)})
    windows = {}
    for r in RULES:
        w = windows[r] = rule_window(rec, r)
        v.update({f"{r}_box": rule_box_name(rec, r), f"{r}_x1": w[0], f"{r}_y1": w[1], f"{r}_x2": w[2], f"{r}_y2": w[3],
                  f"{r}_aspect": box_rules.aspect_ratio(w), f"{r}_distortion": box_rules.square_distortion(w),
                  f"{r}_padding": outside_fraction(w, size)})
    for a, b in _pairs(variants):
        if a in boxes and b in boxes:
            v[f"iou_{a}_{b}"] = box_rules.iou(boxes[a], boxes[b])
            v[f"shift_{a}_{b}"] = box_rules.center_distance(boxes[a], boxes[b])
    for a, b in _pairs(list(RULES)):
        v[f"iou_{a}_{b}"] = box_rules.iou(windows[a], windows[b])
    v["pt2d_missing"] = int((rec.get("extra") or {}).get("pt2d_missing") or 0)
    tracking = rec.get("tracking") or {}
    v["tracking_reused"] = int(bool(tracking.get("reused"))) if tracking else ""
    return v


def _flags(rec: dict, variants: list[str], v: dict, th: Thresholds) -> tuple[list[str], dict[str, float]]:
    """The flags a record's measurements ``v`` raise under ``th``, and each flag's severity (adds
    the ``outside_boxes`` column: which boxes leave the image depends on ``th``)."""
    flags, severity = [], {}
    boxes, size = rec.get("boxes", {}), rec["image_size"]
    gt = boxes.get("gt")
    placeholder = False
    if "pt2d" in boxes:
        iou_pt2d = box_rules.iou(gt, boxes["pt2d"]) if gt is not None else 1.0
        if v["pt2d_missing"] > 0 or iou_pt2d < th.placeholder_iou:
            placeholder = True
            flags.append("placeholder_box")
            severity["placeholder_box"] = 1.0 - iou_pt2d
    # squashed: the stored crop is what the network sees after the resize
    if v["crop_distortion"] > th.squash:
        flags.append("squashed")
        severity["squashed"] = v["crop_distortion"]
    if v["crop_padding"] > th.padding:
        flags.append("padded")
        severity["padded"] = v["crop_padding"]
    if gt is not None:
        ious = [box_rules.iou(gt, boxes[d]) for d in DETECTOR_BOXES if d in boxes]
        if ious and min(ious) < th.detector_iou:
            flags.append("detector_disagrees")
            severity["detector_disagrees"] = 1.0 - min(ious)
    outside = [n for n in variants if n in boxes
               and not box_rules.is_inside_image(boxes[n], size, tolerance=th.outside_tolerance)]
    v["outside_boxes"] = ";".join(outside)
    counted = [n for n in outside if not (placeholder and n == "pt2d")]
    if counted:
        flags.append("outside_image")
        severity["outside_image"] = max(outside_fraction(boxes[n], size) for n in counted)
    if v["tracking_reused"]:
        flags.append("reused_box")
        used = rec.get("box") or boxes.get(rec.get("box_source"))
        severity["reused_box"] = 1.0 - box_rules.iou(gt, used) if gt is not None and used else 0.0
    return flags, severity


def rejected_row(entry: dict) -> Row:
    v = {"key": entry.get("key", ""), "split": entry.get("split", ""), "status": "rejected",
         "source": entry.get("source", ""), "flags": "rejected", "reason": entry.get("reason", ""),
         "message": entry.get("message", "")}
    return Row(v, ["rejected"], {"rejected": 0.0}, None)


def audit_rows(build: Build, th: Thresholds) -> list[Row]:
    variants = build.variants()
    rows = [sample_row(s, variants, th) for s in build.samples]
    rows.sort(key=lambda r: (r.values["split"], r.values["key"]))
    rows += [rejected_row(e) for e in build.rejected]
    return rows


# ------------------------------------------------------------------------------------ CSV output
def fmt(value) -> str:
    """CSV cell: floats rounded to 6 decimals, ``inf`` spelled out, missing values empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return str(value)


def write_csv(path: Path, cols: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for row in rows:
            writer.writerow([fmt(row.get(c)) for c in cols])


# ------------------------------------------------------------------------------------- summaries
def flag_counts(rows: list[Row]) -> tuple[list[str], dict[str, Counter]]:
    """(splits, flag -> Counter(split -> n))."""
    splits = sorted({r.values["split"] for r in rows})
    counts = {f: Counter() for f in FLAGS}
    for r in rows:
        for f in r.flags:
            counts.setdefault(f, Counter())[r.values["split"]] += 1
    return splits, counts


def _median(values: list[float]) -> float | None:
    vals = sorted(x for x in values if x is not None and math.isfinite(x))
    if not vals:
        return None
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2.0


def rule_summary(rows: list[Row], th: Thresholds) -> list[dict]:
    """Per crop rule: which box it reads, median aspect/distortion, windows over the squash
    threshold, median and largest share outside the image, windows over the padding threshold."""
    written = [r for r in rows if r.sample is not None]
    out = []
    for rule in RULES:
        dist = [r.values[f"{rule}_distortion"] for r in written]
        out.append({
            "rule": rule,
            "box": ", ".join(f"{n} ({c})" for n, c in Counter(r.values[f"{rule}_box"] for r in written).most_common()),
            "median_aspect": _median([r.values[f"{rule}_aspect"] for r in written]),
            "median_distortion": _median(dist),
            "max_distortion": max((d for d in dist if math.isfinite(d)), default=None),
            "squashed": sum(1 for d in dist if d > th.squash),
            "median_padding": _median(padding := [r.values[f"{rule}_padding"] for r in written]),
            "max_padding": max(padding, default=None),
            "padded": sum(1 for p in padding if p > th.padding),
            "samples": len(written),
        })
    return out


def variant_summary(rows: list[Row], variants: list[str], th: Thresholds) -> list[dict]:
    written = [r for r in rows if r.sample is not None]
    out = []
    for name in variants:
        present = [r for r in written if r.values.get(f"{name}_x1") is not None]
        ious = [r.values.get(f"iou_gt_{name}") for r in present] if name != "gt" else []
        ious = [x for x in ious if x is not None]
        limit = th.detector_iou if name in DETECTOR_BOXES else th.placeholder_iou
        out.append({
            "variant": name,
            "samples": len(present),
            "median_aspect": _median([r.values[f"{name}_aspect"] for r in present]),
            "median_iou_gt": _median(ious) if ious else None,
            "low_iou": sum(1 for x in ious if x < limit) if ious else None,
            "low_iou_limit": limit if ious else None,
            "outside": sum(1 for r in present if name in r.values.get("outside_boxes", "").split(";")),
        })
    return out
