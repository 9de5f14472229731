"""``dataprep audit OUT --compare OTHER``: diff two builds of the same raw data.

Samples are matched by ``source`` (the raw image path; augmented variants also by their ops).
Build A is the audited ``OUT``, build B is ``OTHER``: *added* = written in A but not in B,
*dropped* = written in B but not in A (rejected there, or absent).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import boxes as box_rules
from .table import Build, Sample, augment_ops

COMPARE_COLUMNS = [
    "match", "source", "augment", "status", "changes", "key_a", "key_b", "split_a", "split_b",
    "rejected_a", "rejected_b", "max_angle_diff", "yaw_a", "yaw_b", "pitch_a", "pitch_b", "roll_a", "roll_b",
    "box_source_a", "box_source_b",
    "box_a_x1", "box_a_y1", "box_a_x2", "box_a_y2", "box_b_x1", "box_b_y1", "box_b_x2", "box_b_y2", "box_max_diff",
    "box_iou", "crop_rule_a", "crop_rule_b",
    "crop_a_x1", "crop_a_y1", "crop_a_x2", "crop_a_y2", "crop_b_x1", "crop_b_y1", "crop_b_x2", "crop_b_y2",
    "crop_iou", "crop_distortion_a", "crop_distortion_b", "crop_size_a", "crop_size_b", "variants_changed",
]
#: ``added`` / ``dropped``: written only by the other / this build; ``rejected_in_a`` / ``_b``:
#: rejected by one build and not in the other at all (a different raw tree or split).
STATUSES = ("same", "changed", "added", "dropped", "rejected_in_both", "rejected_in_a", "rejected_in_b")
#: ``augment``: an offline variant's drawn parameters (blur's sigma, the down-sampling factor ...)
#: differ, so its pixels do, with the same ops.
CHANGE_KINDS = ("label", "split", "box_source", "box", "crop_rule", "crop", "crop_size", "box_variants", "augment")
#: Build settings that change stored images or boxes (manifest ``settings``): the audit names those
#: that differ between the two builds, since no per-sample field shows a JPEG quality, and the
#: seed shows only in what it drew (Hopenet's training crops, the offline variants).
IMAGE_SETTINGS = ("crop_rule", "margin", "crop_size", "jpeg_quality", "detector", "biwi_tracking", "augment", "seed")


@dataclass(frozen=True)
class CompareTolerances:
    label: float = 1e-6  # degrees
    box: float = 1e-3  # pixels


@dataclass
class CompareRow:
    values: dict
    status: str
    changes: list[str]
    a: Sample | None
    b: Sample | None

    @property
    def severity(self) -> float:
        """How different the two crops are: 1 - IoU of the stored crop windows (+ label change)."""
        return (1.0 - (self.values.get("crop_iou") or 0.0)) + (self.values.get("max_angle_diff") or 0.0)


def match_id(record_or_entry: dict) -> str:
    ops = augment_ops(record_or_entry)
    return record_or_entry.get("source", "") + ("#" + "+".join(ops) if ops else "")


def _index(build: Build) -> tuple[dict[str, Sample], dict[str, dict]]:
    written: dict[str, Sample] = {}
    for s in build.samples:
        mid = match_id(s.record)
        if mid in written:  # the same raw file twice: keep both, told apart by key
            mid = f"{mid}@{s.key}"
        written[mid] = s
    rejected = {match_id(e): e for e in build.rejected}
    return written, rejected


def _max_diff(a, b) -> float:
    return max(abs(float(x) - float(y)) for x, y in zip(a, b))


def compare_builds(a: Build, b: Build, tol: CompareTolerances = CompareTolerances()) -> list[CompareRow]:
    wa, ra = _index(a)
    wb, rb = _index(b)
    rows = []
    for mid in sorted(set(wa) | set(wb) | set(ra) | set(rb)):
        sa, sb = wa.get(mid), wb.get(mid)
        ref = (sa.record if sa else None) or (sb.record if sb else None) or ra.get(mid) or rb.get(mid)
        v: dict = {"match": mid, "source": ref.get("source", ""), "augment": "+".join(augment_ops(ref)),
                   "rejected_a": (ra.get(mid) or {}).get("reason", ""), "rejected_b": (rb.get(mid) or {}).get("reason", "")}
        changes: list[str] = []
        for side, s in (("a", sa), ("b", sb)):
            if s is None:
                continue
            rec = s.record
            v.update({f"key_{side}": rec["key"], f"split_{side}": rec.get("split", ""), f"yaw_{side}": rec["yaw"],
                      f"pitch_{side}": rec["pitch"], f"roll_{side}": rec["roll"],
                      f"box_source_{side}": rec.get("box_source", ""), f"crop_rule_{side}": rec.get("crop_rule", ""),
                      f"crop_distortion_{side}": box_rules.square_distortion(rec["crop"]),
                      f"crop_size_{side}": "x".join(str(n) for n in rec.get("crop_size") or [])})
            for i, c in enumerate(("x1", "y1", "x2", "y2")):
                v[f"box_{side}_{c}"] = rec["box"][i]
                v[f"crop_{side}_{c}"] = rec["crop"][i]
        if sa is not None and sb is not None:
            status = "same"
            A, B = sa.record, sb.record
            v["max_angle_diff"] = max(abs(float(A[k]) - float(B[k])) for k in ("yaw", "pitch", "roll"))
            v["box_max_diff"] = _max_diff(A["box"], B["box"])
            v["box_iou"] = box_rules.iou(A["box"], B["box"])
            v["crop_iou"] = box_rules.iou(A["crop"], B["crop"])
            ba, bb = A.get("boxes", {}), B.get("boxes", {})
            changed_variants = sorted(n for n in set(ba) | set(bb)
                                      if n not in ba or n not in bb or _max_diff(ba[n], bb[n]) > tol.box)
            v["variants_changed"] = ";".join(changed_variants)
            if v["max_angle_diff"] > tol.label:
                changes.append("label")
            if A.get("split") != B.get("split"):
                changes.append("split")
            if A.get("box_source") != B.get("box_source"):
                changes.append("box_source")
            if v["box_max_diff"] > tol.box:
                changes.append("box")
            if A.get("crop_rule") != B.get("crop_rule"):
                changes.append("crop_rule")
            if list(A["crop"]) != list(B["crop"]):
                changes.append("crop")
            if v.get("crop_size_a") != v.get("crop_size_b"):
                changes.append("crop_size")
            if changed_variants:
                changes.append("box_variants")
            if (A.get("augment") or []) != (B.get("augment") or []):
                changes.append("augment")
            if changes:
                status = "changed"
        elif sa is not None:
            status = "added"
        elif sb is not None:
            status = "dropped"
        elif mid in ra and mid in rb:
            status = "rejected_in_both"
        else:
            status = "rejected_in_a" if mid in ra else "rejected_in_b"
        v["status"] = status
        v["changes"] = ";".join(changes)
        rows.append(CompareRow(v, status, changes, sa, sb))
    return rows


def settings_differences(a: dict, b: dict) -> dict[str, list]:
    """The :data:`IMAGE_SETTINGS` whose values differ between two manifests: name -> [A's, B's]."""
    sa, sb = a.get("settings") or {}, b.get("settings") or {}
    return {name: [sa.get(name), sb.get(name)] for name in IMAGE_SETTINGS if sa.get(name) != sb.get(name)}


def compare_summary(rows: list[CompareRow]) -> dict:
    from collections import Counter

    status = Counter(r.status for r in rows)
    changes = Counter(c for r in rows for c in r.changes)
    both = [r for r in rows if r.a is not None and r.b is not None]
    return {
        "status": {s: status.get(s, 0) for s in STATUSES},
        "changes": {c: changes.get(c, 0) for c in CHANGE_KINDS},
        "matched": len(both),
        "max_angle_diff": max((r.values["max_angle_diff"] for r in both), default=0.0),
    }
