"""``report.html``: one self-contained page (inline CSS, pictures as relative files next to it, no
external URLs, no scripts)."""
from __future__ import annotations

import html
import math

from .table import FLAG_HELP, FLAGS, SEVERITY_HELP

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
main{max-width:1320px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:30px 0 8px;border-bottom:2px solid #d5d8de;padding-bottom:4px}
h3{font-size:15px;margin:22px 0 6px}
p,li{font-size:13.5px;line-height:1.45}
.meta{font-size:12.5px;color:#444}.meta code{font-size:12px}
code{background:#e9ebef;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:12.5px;background:#fff}
th,td{border:1px solid #d5d8de;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#e9ebef;font-weight:600}
td.l,th.l{text-align:left}
td.zero{color:#9aa0a8}
td.hot{background:#ffe3e0;font-weight:600}
.flag{display:inline-block;padding:0 6px;border-radius:8px;background:#334;color:#fff;font-size:12px;font-family:monospace}
img.sheet{max-width:100%;border:1px solid #c9ccd2;background:#fff;display:block;margin:6px 0}
img.hist{max-width:100%;display:block;margin:6px 0;border:1px solid #d5d8de;background:#fff}
nav{font-size:13px;margin:6px 0 12px}nav a{margin-right:12px}
.note{font-size:12.5px;color:#555}
.box{background:#fff;border:1px solid #d5d8de;border-radius:4px;padding:8px 14px;margin:10px 0}
"""


class Markup(str):
    """HTML built by this module (never data): written into table cells unescaped."""


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def num(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return esc(value)


def table(header: list[str], rows: list[list], left: int = 1, hot=None) -> str:
    """HTML table; text columns (and the first ``left``) are left-aligned, numbers right-aligned;
    ``hot(i, j, value)`` marks cells."""
    def numeric(cell) -> bool:
        return isinstance(cell, (int, float)) or cell in ("-", "")

    text_cols = {j for j in range(len(header)) if j < left or any(not numeric(r[j]) for r in rows if j < len(r))}
    out = ["<table><tr>"]
    out += [f'<th class="{"l" if j in text_cols else ""}">{esc(h)}</th>' for j, h in enumerate(header)]
    out.append("</tr>")
    for i, row in enumerate(rows):
        out.append("<tr>")
        for j, cell in enumerate(row):
            cls = ["l"] if j in text_cols else []
            if cell == 0 or cell == "0":
                cls.append("zero")
            if hot and hot(i, j, cell):
                cls.append("hot")
            if cell is None:
                text = "-"
            elif isinstance(cell, Markup):
                text = str(cell)
            else:
                text = num(cell) if isinstance(cell, float) else esc(cell)
            out.append(f'<td class="{" ".join(cls)}">{text}</td>')
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def render(ctx: dict) -> str:
    """The page from the context ``dataprep.audit.run_audit`` assembles: the sections in order."""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Box audit: {esc(ctx['out'])}</title>"
             f"<style>{CSS}</style></head><body><main>"]
    for section in (_header, _summary, _flags, _variants_and_rules, _histograms, _compare, _files):
        parts += section(ctx)
    parts.append("</main></body></html>\n")
    return "".join(parts)


def _header(ctx: dict) -> list[str]:
    """Title, the build's settings, and the page's navigation."""
    m = ctx["manifest"]
    settings = m.get("settings", {})
    parts = []
    parts.append(f"<h1>Box audit: {esc(m.get('dataset'))}, protocol {esc(m.get('protocol'))}</h1>")
    parts.append(
        f"<div class=\"meta\">build <code>{esc(ctx['out'])}</code> &middot; crop rule <code>{esc(settings.get('crop_rule'))}</code>"
        f" &middot; boxes <code>{esc(settings.get('detector'))}</code>"
        + (f" (tracking <code>{esc(settings.get('biwi_tracking'))}</code>)" if settings.get("biwi_tracking") else "")
        + f" &middot; {esc(m.get('tool'))} {esc(m.get('tool_version'))}<br>command <code>{esc(m.get('command'))}</code><br>"
        f"raw images: {('<code>' + esc(ctx['raw_root']) + '</code>') if ctx['raw_root'] else 'not found (pictures drawn on the stored crops)'}"
        "</div>")
    nav = ['<a href="#summary">summary</a>', '<a href="#flags">flags</a>', '<a href="#variants">box variants</a>',
           '<a href="#rules">crop rules</a>', '<a href="#hist">histograms</a>']
    if ctx.get("compare"):
        nav.append('<a href="#compare">compare</a>')
    nav.append(f'<a href="{esc(ctx["csv"])}">boxes.csv</a>')
    if ctx.get("compare"):
        nav.append(f'<a href="{esc(ctx["compare"]["csv"])}">compare.csv</a>')
    parts.append("<nav>" + "".join(nav) + "</nav>")
    return parts


def _summary(ctx: dict) -> list[str]:
    """Counts per split, samples per flag and split, rejections by reason."""
    m = ctx["manifest"]
    th = ctx["thresholds"]
    splits = ctx["splits"]
    parts = []
    counts = m.get("counts", {})
    parts.append('<h2 id="summary">Summary</h2>')
    per_split = counts.get("per_split", {})
    rows = [[s, c.get("read", 0), c.get("written", 0), c.get("rejected", 0), c.get("samples", 0)] for s, c in per_split.items()]
    rows.append(["total", counts.get("read", 0), counts.get("written", 0), counts.get("rejected", 0), counts.get("samples_in_shards", 0)])
    parts.append(table(["split", "read", "written", "rejected", "records in shards"], rows))
    parts.append("<p>Samples per flag and split (a sample can carry several flags; thresholds: "
                 f"squash &gt; {th.squash:g}, padding &gt; {th.padding:g}, detector IoU &lt; {th.detector_iou:g}, placeholder IoU &lt; {th.placeholder_iou:g}, "
                 f"outside tolerance {th.outside_tolerance:g} px):</p>")
    flag_counts = ctx["flag_counts"]
    rows = []
    for f in FLAGS:
        c = flag_counts.get(f, {})
        tag = f'<span class="flag">{esc(f)}</span>'
        link = Markup(f'<a href="#flag-{esc(f)}">{tag}</a>' if sum(c.values()) else tag)
        rows.append([link, FLAG_HELP[f]] + [c.get(s, 0) for s in splits] + [sum(c.values())])
    parts.append(table(["flag", "meaning"] + splits + ["total"], rows, left=2,
                       hot=lambda i, j, v: j == len(splits) + 2 and isinstance(v, int) and v > 0))
    if ctx["rejected_by_reason"]:
        parts.append("<h3>Rejected samples by reason</h3>")
        parts.append(table(["reason", "samples", "example"],
                           [[r, n, ex] for r, (n, ex) in ctx["rejected_by_reason"].items()], left=1))
    return parts


def _flags(ctx: dict) -> list[str]:
    """Each flag's worst cases: contact sheet and table."""
    parts = []
    parts.append('<h2 id="flags">Worst cases per flag</h2>')
    parts.append("<p class=\"note\">Each row: the source image with every box variant in its own colour, the "
                 "stored crop's window dashed, and the pose axes from the label (red: head x, green: head y, "
                 "blue: nose; orthographic projection of the rows of <code>rotation_from_euler(yaw, pitch, roll)</code>, "
                 "the same lines Hopenet's <code>draw_axis</code> draws), then the crop each rule produces from the "
                 "source (resized to a square, as a network sees it; <code>d</code> = square distortion of the window) "
                 "and the crop stored in the shard.</p>")
    if not ctx["sheets"]:
        parts.append("<p>No sample carries a flag.</p>")
    for f, entry in ctx["sheets"].items():
        parts.append(f'<h3 id="flag-{esc(f)}"><span class="flag">{esc(f)}</span> &mdash; {entry["count"]} sample(s)</h3>')
        order = f"Worst first by {esc(SEVERITY_HELP[f])}." if f != "rejected" else "Raw images where the raw files are there."
        parts.append(f"<p class=\"note\">{esc(FLAG_HELP[f])}. {order}</p>")
        if entry.get("image"):
            parts.append(f'<img class="sheet" src="{esc(entry["image"])}" alt="worst {esc(f)} samples">')
        if entry["rows"]:
            parts.append(table(entry["header"], entry["rows"], left=3))
        else:
            parts.append(f'<p class="note">Not listed (--per-flag 0); <a href="{esc(ctx["csv"])}">{esc(ctx["csv"])}</a> '
                         "has every sample and its flags.</p>")
    return parts


def _variants_and_rules(ctx: dict) -> list[str]:
    """Box variants against gt; every crop rule's windows and their distortion."""
    settings = ctx["manifest"].get("settings", {})
    parts = []
    parts.append('<h2 id="variants">Box variants</h2>')
    rows = [[v["variant"], v["samples"], v["median_aspect"], v["median_iou_gt"],
             "-" if v["low_iou"] is None else f"{v['low_iou']} (< {v['low_iou_limit']:g})", v["outside"]]
            for v in ctx["variants"]]
    parts.append(table(["variant", "samples", "median aspect (w/h)", "median IoU vs gt", "low IoU vs gt", "outside image"], rows))
    parts.append('<h2 id="rules">Crop rules</h2>')
    parts.append("<p class=\"note\">Each rule's window recomputed from the boxes in the records with "
                 "<code>boxes.crop_window</code> (Hopenet's test-time window: k at its mid value on 300W-LP, the centred "
                 "square); the box a rule reads is "
                 "<code>boxes.RULE_GT_BOX</code> when the record has it (else gt), or the detector's box in a "
                 "detector build. <em>squashed</em> counts windows whose square distortion exceeds the threshold; "
                 "<em>padding</em> is the share of a window outside the source image (black in its crop), "
                 "<em>padded</em> counts windows over the padding threshold.</p>")
    used = settings.get("crop_rule")
    rows = [[(r["rule"] + (" (this build)" if r["rule"] == used else "")), r["box"], r["median_aspect"],
             r["median_distortion"], r["max_distortion"], r["squashed"], r["median_padding"], r["max_padding"],
             r["padded"]] for r in ctx["rules"]]
    parts.append(table(["rule", "box read (samples)", "median aspect", "median distortion", "max distortion", "squashed",
                        "median padding", "max padding", "padded"],
                       rows, left=2, hot=lambda i, j, v: j in (5, 8) and isinstance(v, int) and v > 0))

    if ctx.get("rules_sheet"):
        parts.append("<h3>Most distorted windows over all rules</h3><p class=\"note\">Whatever rule this build used: "
                     "the samples whose window under some rule is furthest from square, with each rule's crop.</p>")
        parts.append(f'<img class="sheet" src="{esc(ctx["rules_sheet"])}" alt="most distorted rule windows">')
    return parts


def _histograms(ctx: dict) -> list[str]:
    parts = []
    parts.append('<h2 id="hist">Histograms</h2>')
    for name, alt in (("angles", "yaw, pitch, roll per split"), ("aspect", "aspect ratios"), ("iou", "IoU between boxes and rules")):
        if name in ctx["hists"]:
            parts.append(f'<img class="hist" src="{esc(ctx["hists"][name])}" alt="{esc(alt)}">')
    return parts


def _compare(ctx: dict) -> list[str]:
    """``--compare``: A and B's settings, status and change counts, the changed samples."""
    cmp = ctx.get("compare")
    if not cmp:
        return []
    settings = ctx["manifest"].get("settings", {})
    parts = []
    s = cmp["summary"]
    parts.append('<h2 id="compare">Compare with another build</h2>')
    parts.append(f"<div class=\"meta\">A = this build <code>{esc(ctx['out'])}</code> (crop <code>{esc(settings.get('crop_rule'))}</code>, "
                 f"boxes <code>{esc(settings.get('detector'))}</code>)<br>B = <code>{esc(cmp['other'])}</code> "
                 f"(crop <code>{esc(cmp['other_settings'].get('crop_rule'))}</code>, boxes "
                 f"<code>{esc(cmp['other_settings'].get('detector'))}</code>)<br>samples matched by <code>source</code>; "
                 "added = written in A only, dropped = written in B only; rejected_in_a / _b: rejected by one "
                 "build and not in the other at all</div>")
    if s.get("settings_differ"):
        parts.append(table(["setting (differs)", "A", "B"], [[k, str(a), str(b)] for k, (a, b) in s["settings_differ"].items()],
                           left=3))
    if cmp.get("inputs_note"):
        parts.append(f'<div class="note"><b>Note:</b> {esc(cmp["inputs_note"])}</div>')
    parts.append(table(["status", "samples"], [[k, v] for k, v in s["status"].items()]))
    parts.append(table(["change (among matched)", "samples"],
                       [[k, v] for k, v in s["changes"].items()] + [["max abs angle difference (deg)", float(s["max_angle_diff"])]],
                       hot=lambda i, j, v: i == 0 and j == 1 and v not in (0, "0")))
    if cmp.get("image"):
        parts.append(f'<h3>Changed samples, most different crops first</h3><img class="sheet" src="{esc(cmp["image"])}" alt="changed samples">')
    if cmp["rows"]:
        if cmp.get("listed_note"):
            parts.append(f'<div class="note">{esc(cmp["listed_note"])}</div>')
        parts.append(table(cmp["header"], cmp["rows"], left=4))
    return parts


def _files(ctx: dict) -> list[str]:
    cmp = ctx.get("compare")
    parts = []
    parts.append(f"<h2>Files</h2><ul><li><a href=\"{esc(ctx['csv'])}\">{esc(ctx['csv'])}</a>: one row per sample "
                 "(rejected ones included) with every box, aspect ratios, each rule's window and distortion, IoUs, "
                 "centre shifts and flags</li>")
    if cmp:
        parts.append(f"<li><a href=\"{esc(cmp['csv'])}\">{esc(cmp['csv'])}</a>: one row per matched source</li>")
    parts.append("</ul>")
    return parts
