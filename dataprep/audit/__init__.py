"""``dataprep audit OUT --report DIR [--compare OTHER] [--raw-root PATH]``: what each box rule does,
per dataset and per sample.

Reads a build (its shards with plain ``tarfile`` and ``manifest.json``; every box variant is in the
label records) and writes into ``DIR``:

* ``boxes.csv``: one row per sample (rejected ones included): every box variant, aspect ratios, each
  crop rule's window (``boxes.crop_window``) and the distortion a resize to square causes
  (``boxes.square_distortion``), IoU and centre shift between variants, and flags.
* ``sheets/<flag>.png``: contact sheets of the worst cases per flag (source image, boxes, pose axes,
  each rule's crop, the stored crop); ``hist_*.png``: histograms.
* ``compare.csv`` and ``sheets/compare_changed.png`` with ``--compare``.
* ``report.html``: one self-contained page with all of the above.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .. import boxes as box_rules
from ..argtypes import int_at_least, number_at_least, share
from ..shards import MANIFEST
from .compare import COMPARE_COLUMNS, CompareTolerances, compare_builds, compare_summary, settings_differences
from .table import (FLAG_HELP, FLAGS, RULES, AuditError, Build, Row, Thresholds, audit_rows, columns, flag_counts, load_build,
                    rule_summary, variant_summary, write_csv)

__all__ = ["AuditError", "CompareTolerances", "Thresholds", "add_parser", "load_build", "run_audit"]


def _worst(rows: list[Row], flag: str, n: int) -> list[Row]:
    """Originals before augmented variants, then the largest severity, then by key."""
    flagged = [r for r in rows if flag in r.flags]
    return sorted(flagged, key=lambda r: (bool(r.values.get("augment")), -r.severity.get(flag, 0.0), r.key))[:n]


def _metric(row: Row, flag: str) -> str:
    v = row.values
    if flag == "placeholder_box":
        return f"IoU(gt,pt2d) {v.get('iou_gt_pt2d', 0):.2f}, {v.get('pt2d_missing', 0)} placeholder pt(s)"
    if flag == "squashed":
        return f"crop {v['crop_x2'] - v['crop_x1']}x{v['crop_y2'] - v['crop_y1']}, distortion {v['crop_distortion']:.2f}"
    if flag == "padded":
        return f"crop {v['crop_x2'] - v['crop_x1']}x{v['crop_y2'] - v['crop_y1']}, {v['crop_padding']:.0%} black (outside the image, or a cropscale variant's crop)"
    if flag == "detector_disagrees":
        ious = [f"IoU(gt,{d}) {v[f'iou_gt_{d}']:.2f}" for d in ("mtcnn", "retinaface") if v.get(f"iou_gt_{d}") is not None]
        return ", ".join(ious)
    if flag == "outside_image":
        return f"outside: {v.get('outside_boxes')} ({row.severity.get(flag, 0):.0%} of area)"
    if flag == "reused_box":
        return f"reused box, IoU(gt, box) {1 - row.severity.get(flag, 0):.2f}"
    return v.get("reason", "")


def _caption(row: Row, flag: str) -> str:
    v = row.values
    return (f"{v['key']} [{v['split']}]  yaw {v['yaw']:.0f} pitch {v['pitch']:.0f} roll {v['roll']:.0f}  |  "
            f"{_metric(row, flag)}")


def _max_rule_distortion(row: Row) -> float:
    return max(row.values[f"{rule}_distortion"] for rule in RULES)


def _rule_caption(row: Row) -> str:
    v = row.values
    dist = ", ".join(f"{rule} {v[f'{rule}_distortion']:.2f}" for rule in RULES)
    return (f"{v['key']} [{v['split']}]  yaw {v['yaw']:.0f} pitch {v['pitch']:.0f} roll {v['roll']:.0f}  |  "
            f"distortion: {dist}")


#: Changed samples (and added / dropped ones) the HTML lists; ``compare.csv`` has every one.
COMPARE_LISTED = 50


#: Sources ``--raw-root`` is checked against: enough to tell a wrong folder, few enough to be instant.
RAW_ROOT_PROBES = 50


def _resolve_raw_root(build: Build, raw_root) -> Path | None:
    """Where the raw images are: ``--raw-root``, else the build's ``--root`` (None: not found, the
    pictures fall back to the stored crops). A ``--raw-root`` given by hand must hold the build's
    raw files (any of the first :data:`RAW_ROOT_PROBES` sources): a wrong folder would otherwise
    only show in the pictures' captions."""
    given = build.manifest.get("input", {}).get("root", "")
    if raw_root:
        if not Path(raw_root).is_dir():
            raise AuditError(f"--raw-root {raw_root} is not a folder; give the dataset folder the build read")
        sources = [s for s in ([x.record.get("source", "") for x in build.samples]
                               + [e.get("source", "") for e in build.rejected]) if s][:RAW_ROOT_PROBES]
        if sources and not any((Path(raw_root) / s).is_file() for s in sources):
            raise AuditError(f"--raw-root {raw_root} holds none of the build's raw files (no {Path(raw_root) / sources[0]}); "
                             f"give the dataset folder the build read (its --root was {given or 'not recorded'})")
    root = Path(raw_root) if raw_root else Path(given or "/nonexistent")
    return root if root.is_dir() else None


def run_audit(out, report, *, compare=None, raw_root=None, thresholds: Thresholds = Thresholds(),
              per_flag: int = 6, tolerances: CompareTolerances = CompareTolerances(), pictures: bool = True) -> dict:
    """Audit the build in ``out`` into the folder ``report``; returns a summary dict."""
    from .report import render

    report = Path(report)
    if report.exists() and not report.is_dir():
        raise AuditError(f"--report {report} is a file; give a folder")
    for name, folder in (("the build", out), ("--compare", compare)):
        if folder is not None and "://" not in str(folder) and report.resolve() == Path(folder).resolve():
            raise AuditError(f"--report {report} is {name}'s folder; give a folder of its own "
                             "(the report's files would mix with the shards)")
    if (report / MANIFEST).is_file():
        raise AuditError(f"--report {report} holds another build ({MANIFEST}); give a folder of its own "
                         "(the report's files would mix with its shards)")
    if "://" in str(out) or (compare and "://" in str(compare)):
        raise AuditError("the audit reads local build folders; copy the build here first")
    build = load_build(out)
    # a wrong --raw-root or --compare stops here, before anything is written
    root = _resolve_raw_root(build, raw_root)
    other = None if compare is None else _load_compared(build, out, compare)
    report.mkdir(parents=True, exist_ok=True)
    # a report of another build or --compare written here before must not show through this one
    for stale in [report / "compare.csv", *(report / "sheets").glob("*.png"), *report.glob("hist_*.png")]:
        stale.unlink(missing_ok=True)
    variants = build.variants()
    rows = audit_rows(build, thresholds)
    write_csv(report / "boxes.csv", columns(variants), [r.values for r in rows])
    splits, counts = flag_counts(rows)
    sheets = _flag_sheets(build, rows, counts, root, report, per_flag, pictures, variants)
    rules_sheet = _rules_sheet(build, rows, root, report, per_flag, variants) if pictures else None
    hists = {}
    if pictures:
        from . import pictures as pics
        hists = {k: p.relative_to(report).as_posix() for k, p in pics.histograms(rows, variants, report).items()}

    ctx = {
        "out": str(out), "manifest": build.manifest, "thresholds": thresholds, "splits": splits,
        "raw_root": str(root) if root else None, "csv": "boxes.csv",
        "flag_counts": {f: dict(c) for f, c in counts.items()}, "sheets": sheets, "hists": hists,
        "variants": variant_summary(rows, variants, thresholds), "rules": rule_summary(rows, thresholds),
        "rejected_by_reason": _rejected_by_reason(build), "rules_sheet": rules_sheet,
    }
    summary = {"report": str(report / "report.html"), "samples": len(build.samples), "rejected": len(build.rejected),
               "flags": {f: sum(c.values()) for f, c in counts.items()}}
    if other is not None:
        ctx["compare"], summary["compare"] = _compare_section(build, other, compare, root, report, per_flag,
                                                              tolerances, pictures)
    (report / "report.html").write_text(render(ctx), encoding="utf-8")
    return summary


def _load_compared(build: Build, out, compare) -> Build:
    """The ``--compare`` build, refused unless it read the same dataset as ``build``."""
    other = load_build(compare)
    datasets = (build.manifest.get("dataset"), other.manifest.get("dataset"))
    if datasets[0] != datasets[1]:
        raise AuditError(f"--compare diffs two builds of the same raw data; {out} is {datasets[0]}, "
                         f"{compare} is {datasets[1]}")
    return other


def _sheet_legend(variants: list[str]) -> list:
    """The legend of a contact sheet of samples: each box variant's colour and the stored crop's."""
    from . import pictures as pics

    return pics.legend_for(variants, [("stored crop", pics.CROP_COLOUR, "dashed")])


def _flag_sheets(build: Build, rows: list[Row], counts, root, report: Path, per_flag: int, pictures: bool,
                 variants: list[str]) -> dict:
    """Per flag that any sample has: its count, its worst ``per_flag`` samples as table rows, and
    (with ``pictures``) their contact sheet ``sheets/<flag>.png``."""
    from . import pictures as pics

    legend = _sheet_legend(variants) if pictures else None
    sheets: dict[str, dict] = {}
    for flag in FLAGS:
        count = sum(counts[flag].values())
        if not count:
            continue
        worst = _worst(rows, flag, per_flag)  # none with --per-flag 0: the count alone
        entry = {"count": count, "image": None}
        path = None
        if flag == "rejected":
            entry["header"] = ["key", "split", "source", "reason", "message"]
            entry["rows"] = [[r.key, r.values["split"], r.values["source"], r.values["reason"], r.values["message"]] for r in worst]
            sheet_rows = [sr for sr in (pics.rejected_sheet_row(r, root) for r in worst) if sr is not None] if pictures else []
            if sheet_rows:
                path = pics.rejected_sheet(sheet_rows, report / "sheets" / f"{flag}.png", f"{flag}: raw images of rejected samples")
        else:
            entry["header"] = ["key", "split", "source", "severity", "details", "flags"]
            entry["rows"] = [[r.key, r.values["split"], r.values["source"], float(r.severity.get(flag, 0.0)),
                              _metric(r, flag), r.values["flags"]] for r in worst]
            if pictures and worst:
                sheet_rows = [pics.flag_sheet_row(build, r, root, _caption(r, flag)) for r in worst]
                path = pics.contact_sheet(sheet_rows, report / "sheets" / f"{flag}.png",
                                          f"{flag}: {entry['count']} sample(s), worst {len(worst)} shown", legend)
        if path is not None:
            entry["image"] = path.relative_to(report).as_posix()
        sheets[flag] = entry
    return sheets


def _rules_sheet(build: Build, rows: list[Row], root, report: Path, per_flag: int, variants: list[str]) -> str | None:
    """What every rule would do, whatever this build used: a contact sheet of the written samples
    with the most distorted windows (``sheets/rules.png``, relative to ``report``; None without any)."""
    from . import pictures as pics

    written = [r for r in rows if r.sample is not None]
    rule_rows = sorted(written, key=lambda r: (bool(r.values.get("augment")), -_max_rule_distortion(r), r.key))[:per_flag]
    if not rule_rows:
        return None
    sheet_rows = [pics.flag_sheet_row(build, r, root, _rule_caption(r)) for r in rule_rows]
    path = pics.contact_sheet(sheet_rows, report / "sheets" / "rules.png",
                              f"most distorted crop windows over the rules {', '.join(RULES)}", _sheet_legend(variants))
    return path.relative_to(report).as_posix()


def _rejected_by_reason(build: Build) -> dict[str, tuple[int, str]]:
    """Rejection reason -> (count, the first sample's message as an example)."""
    by_reason: dict[str, tuple[int, str]] = {}
    for e in build.rejected:
        n, example = by_reason.get(e["reason"], (0, e.get("message", "")))
        by_reason[e["reason"]] = (n + 1, example)
    return by_reason


def _settings_line(differ: dict) -> str:
    """``{name: [a, b]}`` -> ``"crop_size 320 vs 224, jpeg_quality 95 vs 80"``."""
    return ", ".join(f"{name} {a} vs {b}" for name, (a, b) in differ.items())


def _compare_section(build: Build, other: Build, compare, root, report: Path, per_flag: int,
                     tolerances: CompareTolerances, pictures: bool) -> tuple[dict, dict]:
    """``--compare``: writes ``compare.csv`` (and ``sheets/compare_changed.png``); returns the
    report's compare context and the summary's compare entry."""
    crows = compare_builds(build, other, tolerances)
    write_csv(report / "compare.csv", COMPARE_COLUMNS, [r.values for r in crows])
    csum = compare_summary(crows)
    csum["same_inputs"] = _same_inputs(build.manifest, other.manifest)
    csum["settings_differ"] = settings_differences(build.manifest, other.manifest)
    changed = sorted((r for r in crows if r.status == "changed"), key=lambda r: (-r.severity, r.values["match"]))
    moved = [r for r in crows if r.status in ("added", "dropped")]
    listed = changed[:COMPARE_LISTED] + moved[:COMPARE_LISTED]
    ctx = {"other": str(compare), "other_settings": other.manifest.get("settings", {}), "summary": csum,
           "csv": "compare.csv", "image": None, "inputs_note": INPUTS_NOTE if csum["same_inputs"] is False else "",
           "header": ["source", "status", "changes", "key", "max angle diff", "box source A", "box source B", "crop A", "crop B", "crop IoU"],
           "rows": [_compare_table_row(r) for r in listed],
           "listed_note": (f"{len(listed)} of the {len(changed) + len(moved)} changed, added and dropped "
                           f"samples listed; compare.csv has them all") if len(listed) < len(changed) + len(moved) else ""}
    shown = changed[:per_flag]
    if pictures and shown:
        from . import pictures as pics
        sheet_rows = [_compare_sheet_row(pics, build, other, r, root) for r in shown]
        legend = [("A box", pics.A_COLOUR, "box"), ("A stored crop", pics.A_COLOUR, "dashed"),
                  ("B box", pics.B_COLOUR, "box"), ("B stored crop", pics.B_COLOUR, "dashed"),
                  ("pose x", pics.AXIS_COLOURS[0], "axis"), ("pose y", pics.AXIS_COLOURS[1], "axis"),
                  ("nose", pics.AXIS_COLOURS[2], "axis")]
        path = pics.contact_sheet(sheet_rows, report / "sheets" / "compare_changed.png",
                                  f"changed samples: {len(changed)}, {len(shown)} most different crops shown", legend)
        ctx["image"] = path.relative_to(report).as_posix()
    return ctx, csum


def _compare_table_row(r) -> list:
    v = r.values
    return [v["source"], r.status, v["changes"].replace(";", ", "), v.get("key_a") or v.get("key_b"),
            float(v["max_angle_diff"]) if v.get("max_angle_diff") is not None else "-",
            f"{v.get('box_source_a', '-')}", f"{v.get('box_source_b', '-')}",
            _fmt_box(v, "crop_a"), _fmt_box(v, "crop_b"),
            float(v["crop_iou"]) if v.get("crop_iou") is not None else "-"]


#: Said when the two compared builds read different raw files.
INPUTS_NOTE = ("the two builds read different raw files (their manifests' input fingerprints differ: a file added, "
               "removed or changed since): differences may come from the data, not from the settings")


def _same_inputs(a: dict, b: dict) -> bool | None:
    """Whether two manifests read the same raw files (paths and sizes: ``input.fingerprint``); None
    when one does not say."""
    fa, fb = (m.get("input", {}).get("fingerprint") for m in (a, b))
    if not (fa and fb):
        return None
    scheme = [f.partition(":")[0] if ":" in f else "v1" for f in (fa, fb)]
    return None if scheme[0] != scheme[1] else fa == fb  # other schemes hash other files


def _fmt_box(v: dict, prefix: str) -> str:
    if v.get(f"{prefix}_x1") is None:
        return "-"
    return "[" + ", ".join(f"{v[f'{prefix}_{c}']:.0f}" for c in ("x1", "y1", "x2", "y2")) + "]"


def _compare_sheet_row(pics, a: Build, b: Build, row, raw_root):
    """Source image with A's and B's boxes and stored crop windows, then both stored crops."""
    ra, rb = row.a.record, row.b.record
    sample_row = Row(values={}, flags=[], severity={}, sample=row.a)
    view = pics.sample_view(a, sample_row, raw_root)
    overlays = [pics.Overlay("A box", ra["box"], pics.A_COLOUR),
                pics.Overlay("A crop", [float(x) for x in ra["crop"]], pics.A_COLOUR, dashed=True),
                pics.Overlay("B box", rb["box"], pics.B_COLOUR),
                pics.Overlay("B crop", [float(x) for x in rb["crop"]], pics.B_COLOUR, dashed=True)]
    thumbs = []
    for side, build, sample in (("A", a, row.a), ("B", b, row.b)):
        img = pics.decode_rgb(build.read_member(sample, "jpg"))
        if img is not None:
            img = pics.thumbnail(img)
        rec = sample.record
        d = box_rules.square_distortion(rec["crop"])
        thumbs.append((f"{side}: {rec.get('crop_rule')} ({rec.get('box_source')}) d={d:.2f}", img))
    v = row.values
    caption = (f"{ra['key']}  yaw {ra['yaw']:.0f} pitch {ra['pitch']:.0f} roll {ra['roll']:.0f}  |  "
               f"{v['changes'].replace(';', ', ')}; crop IoU {v['crop_iou']:.2f}")
    if view is not None and view.kind != "source":
        caption += "  [stored crop of A]"
    gt = ra.get("boxes", {}).get("gt") or ra["box"]
    return pics.SheetRow(view, caption, overlays, (ra["yaw"], ra["pitch"], ra["roll"]), gt, thumbs)


# ------------------------------------------------------------------------------------------- CLI
#: ``--per-flag``: 0 gives the counts alone.
_PER_FLAG = int_at_least(0, "give 0 (counts only) or more")


def add_parser(subparsers) -> None:
    d = Thresholds()
    p = subparsers.add_parser(
        "audit", help="per-sample and per-dataset report of what each box rule does (HTML, CSV, pictures)",
        description=("Audit the face boxes of a build: writes report.html, boxes.csv, contact sheets of the worst "
                     "cases per flag and histograms into --report. Flags: " + "; ".join(f"{f}: {h}" for f, h in FLAG_HELP.items())
                     + ". Example: dataprep audit shards/aflw2000-p1 --report audit/aflw2000"))
    p.add_argument("out", help="the --out folder of a dataprep build")
    p.add_argument("--report", required=True, help="folder to write report.html, boxes.csv and the pictures into")
    p.add_argument("--compare", default=None, metavar="OTHER_OUT",
                   help="another build of the same raw data: diff samples, labels and boxes (compare.csv)")
    p.add_argument("--raw-root", default=None,
                   help="the raw dataset folder for the pictures (default: the build's input root; without it the "
                        "pictures are drawn on the stored crops)")
    t = CompareTolerances()
    p.add_argument("--squash-threshold", type=number_at_least(0.0), default=d.squash,
                   help=f"flag 'squashed' when the stored crop's square distortion exceeds this ({d.squash})")
    p.add_argument("--padding-threshold", type=share, default=d.padding,
                   help=f"flag 'padded' when more of the stored crop than this share lies outside the image, 0-1 ({d.padding:g})")
    p.add_argument("--detector-iou", type=share, default=d.detector_iou,
                   help=f"flag 'detector_disagrees' when IoU(gt, detector box) is below this, 0-1 ({d.detector_iou})")
    p.add_argument("--placeholder-iou", type=share, default=d.placeholder_iou,
                   help=f"flag 'placeholder_box' when IoU(gt, pt2d) is below this, 0-1 ({d.placeholder_iou})")
    p.add_argument("--outside-tolerance", type=number_at_least(0.0), default=d.outside_tolerance,
                   help=f"pixels a box may extend past the image before 'outside_image' ({d.outside_tolerance:g})")
    p.add_argument("--per-flag", type=_PER_FLAG, default=6,
                   help="worst cases listed and drawn per flag (6; 0: counts only, no tables or contact sheets)")
    p.add_argument("--label-tolerance", type=number_at_least(0.0), default=t.label,
                   help=f"--compare: angle difference in degrees that counts as a label change ({t.label:g})")
    p.add_argument("--box-tolerance", type=number_at_least(0.0), default=t.box,
                   help=f"--compare: box corner difference in pixels that counts as a box change ({t.box:g})")
    p.set_defaults(handler=cmd_audit)


def cmd_audit(args) -> int:
    th = Thresholds(squash=args.squash_threshold, padding=args.padding_threshold, detector_iou=args.detector_iou,
                    placeholder_iou=args.placeholder_iou, outside_tolerance=args.outside_tolerance)
    try:
        summary = run_audit(args.out, args.report, compare=args.compare, raw_root=args.raw_root, thresholds=th,
                            per_flag=args.per_flag,
                            tolerances=CompareTolerances(label=args.label_tolerance, box=args.box_tolerance))
    except (AuditError, OSError) as err:
        print(f"dataprep audit: error: {err}", file=sys.stderr)
        return 2
    print(f"{summary['samples']} sample(s), {summary['rejected']} rejected -> {summary['report']}")
    width = max(len(f) for f in FLAGS)
    for f in FLAGS:
        print(f"  {f:<{width}}  {summary['flags'].get(f, 0):>7}")
    if "compare" in summary:
        c = summary["compare"]
        print("compare: " + ", ".join(f"{k} {v}" for k, v in c["status"].items())
              + "; changes: " + (", ".join(f"{k} {v}" for k, v in c["changes"].items() if v) or "none")
              + f"; max angle difference {c['max_angle_diff']:.3g} deg")
        if c.get("settings_differ"):
            print("compare: settings differ (A vs B): " + _settings_line(c["settings_differ"]))
        if c.get("same_inputs") is False:
            print(f"compare: note: {INPUTS_NOTE}")
    return 0

