"""The audit's pictures: contact sheets of the worst cases per flag and histograms (matplotlib Agg).

Pose axes
---------
``R = labels.rotation_from_euler(yaw, pitch, roll)`` (our convention, ``Rz(-roll) Ry(-yaw) Rx(pitch)``)
maps camera coordinates to head coordinates, so its *rows* are the head's axes seen from the camera
(image x right, image y down). The three lines start at the centre of the ``gt`` box and are drawn
with an orthographic projection (depth dropped)::

    red   (head x, towards the subject's left) : (R[0,0],  R[0,1])
    green (head y, down the face)              : (R[1,0],  R[1,1])
    blue  (nose, out of the face)              : (-R[2,0], -R[2,1])

times 0.6 of the box's longer side. This is exactly what Hopenet's ``utils.draw_axis`` draws from the
same three angles (its matrix ``Rx(pitch) Ry(-yaw) Rz(roll)`` is ``D R^T D`` with
``D = diag(1, 1, -1)``), so the pictures read like the papers' figures: positive yaw turns the nose
line to the image's left, positive pitch lifts it, positive roll tilts the red line clockwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from .. import boxes as box_rules  # noqa: E402
from .. import codec, labels  # noqa: E402
from ..crop import crop_and_resize  # noqa: E402
from ..datasets.common import read_file_bytes  # noqa: E402
from .table import RULES, Build, Row, augment_ops, rule_box_name, rule_window  # noqa: E402

BOX_COLOURS = {"gt": "#00e5ff", "pt2d": "#ff2bd6", "pt2d_valid": "#ff9f1c", "mtcnn": "#ffe600",
               "retinaface": "#b6ff3b"}
OTHER_COLOURS = ["#ffffff", "#c77dff", "#ff6b6b"]
CROP_COLOUR = "#ffffff"
#: --compare pictures: build A's box and stored crop window, build B's.
A_COLOUR, B_COLOUR = "#ffe600", "#ff2bd6"
AXIS_COLOURS = ("#ff3030", "#30e030", "#3080ff")
THUMB = 152
DPI = 72
HIST_DPI = 96


def save_png(fig, path: Path) -> Path:
    """Save ``fig`` as a 256-colour PNG (dithered, about a third of the size of a full-colour one);
    the palette always holds the drawing colours exactly, so boxes and axes keep their colours."""
    from PIL import Image

    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    fixed = list(dict.fromkeys([*BOX_COLOURS.values(), *OTHER_COLOURS, CROP_COLOUR, A_COLOUR, B_COLOUR, *AXIS_COLOURS,
                                "#000000", "#202020", "#3a3a3a", "#808080", "#c0c0c0", "#ffffff"]))
    fixed_rgb = [int(c[i:i + 2], 16) for c in fixed for i in (1, 3, 5)]
    n = 256 - len(fixed)
    adaptive = rgb.quantize(colors=n, method=Image.Quantize.MEDIANCUT).getpalette()[:3 * n]
    adaptive += [0] * (3 * n - len(adaptive))
    palette = Image.new("P", (1, 1))
    palette.putpalette(adaptive + fixed_rgb)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    indexed = np.array(rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG))
    pixels = np.asarray(rgb)
    for i, c in enumerate(fixed):  # pixels drawn in an exact palette colour stay exact (no dither noise)
        indexed[np.all(pixels == [int(c[j:j + 2], 16) for j in (1, 3, 5)], axis=-1)] = n + i
    out = Image.fromarray(indexed, mode="P")
    out.putpalette(adaptive + fixed_rgb)
    out.save(path, optimize=True)
    return path


def box_colour(name: str) -> str:
    if name in BOX_COLOURS:
        return BOX_COLOURS[name]
    return OTHER_COLOURS[sum(map(ord, name)) % len(OTHER_COLOURS)]


def pose_axes(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Image-plane directions (3 x 2, image y down) of the head's x, y and nose axes (see module doc)."""
    r = labels.rotation_from_euler(yaw, pitch, roll)
    return np.array([[r[0, 0], r[0, 1]], [r[1, 0], r[1, 1]], [-r[2, 0], -r[2, 1]]])


# ----------------------------------------------------------------------------------------- views
@dataclass
class View:
    """An image and the source-pixel window ``[x1, y1, x2, y2]`` it covers: the raw source image
    (window = the whole image) or, without raw files, the stored crop (window = ``record["crop"]``)."""

    image: np.ndarray
    window: list[float]
    kind: str  # "source" or "stored crop"

    def crop(self, window, size: int = THUMB) -> np.ndarray:
        """What ``window`` (source pixels) looks like resized to a ``size`` square."""
        h, w = self.image.shape[:2]
        mapped = box_rules.box_to_crop_coords(window, self.window, (w, h))
        out, _ = crop_and_resize(self.image, mapped, size)
        return out


def decode_rgb(data: bytes | None) -> np.ndarray | None:
    return codec.decode_rgb(data) if data else None


def thumbnail(image: np.ndarray | None, size: int = THUMB) -> np.ndarray | None:
    return None if image is None else cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def raw_image(raw_root: Path | None, source: str, size=None) -> np.ndarray | None:
    """The raw image as the build read it, or None. Its header's size is checked before decoding,
    as the build checks it: a file of another size than ``size`` (the record's ``(w, h)``; None for
    a rejected sample), or one past ``codec.MAX_DECODE_PIXELS``, is not decoded (a huge picture in a
    small file, rejected by the build unread, would take GBs here)."""
    if raw_root is None or not source:
        return None
    try:
        data = read_file_bytes(Path(raw_root) / source)
    except OSError:  # missing, unreadable, not a regular file: the stored crop is shown instead
        return None
    header = codec.header_size(data)
    if size is not None and header is not None and header != tuple(size):
        return None
    image = codec.decode_rgb_capped(data)
    if image is not None and size is not None and [image.shape[1], image.shape[0]] != list(size):
        return None
    return image


def sample_view(build: Build, row: Row, raw_root: Path | None) -> View | None:
    """The raw source image when it is there and matches the record, else the stored crop."""
    rec = row.sample.record
    if not augment_ops(rec):  # augmented variants (flips ...) no longer match the raw image
        image = raw_image(raw_root, rec.get("source", ""), rec["image_size"])
        if image is not None:
            return View(image, [0.0, 0.0, float(image.shape[1]), float(image.shape[0])], "source")
    stored = decode_rgb(build.read_member(row.sample, "jpg"))
    if stored is None:
        return None
    return View(stored, [float(v) for v in rec["crop"]], "stored crop")


# ---------------------------------------------------------------------------------- contact sheet
@dataclass
class Overlay:
    label: str
    box: list[float]
    colour: str
    dashed: bool = False


@dataclass
class SheetRow:
    view: View | None
    caption: str
    overlays: list[Overlay] = field(default_factory=list)
    pose: tuple[float, float, float] | None = None
    pose_box: list[float] | None = None
    thumbs: list[tuple[str, np.ndarray | None]] = field(default_factory=list)


def _draw_source(ax, row: SheetRow, panel_aspect: float = 1.0) -> None:
    """Source panel; ``panel_aspect`` (width / height of the axes) widens the shown region so the
    image keeps square pixels and fills the panel."""
    ax.set_facecolor("#202020")
    ax.set_xticks([])
    ax.set_yticks([])
    if row.view is None:
        ax.text(0.5, 0.5, "no image", color="white", ha="center", va="center", transform=ax.transAxes)
        return
    x1, y1, x2, y2 = row.view.window
    ax.imshow(row.view.image, extent=(x1, x2, y2, y1), interpolation="bilinear")
    region = [x1, y1, x2, y2] if row.view.kind == "stored crop" else None
    for o in row.overlays:
        b = o.box
        ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor=o.colour,
                               linewidth=1.8, linestyle=(0, (4, 2)) if o.dashed else "-"))
        region = list(b) if region is None else [min(region[0], b[0]), min(region[1], b[1]),
                                                   max(region[2], b[2]), max(region[3], b[3])]
    if row.pose is not None and row.pose_box is not None:
        cx, cy = box_rules.center(row.pose_box)
        length = 0.6 * max(box_rules.width_height(row.pose_box))
        for (dx, dy), colour in zip(pose_axes(*row.pose), AXIS_COLOURS):
            ex, ey = cx + length * dx, cy + length * dy
            if region is not None:
                region = [min(region[0], ex), min(region[1], ey), max(region[2], ex), max(region[3], ey)]
            ax.plot([cx, cx + length * dx], [cy, cy + length * dy], color="black", linewidth=4.2,
                    solid_capstyle="round", alpha=0.55)
            ax.plot([cx, cx + length * dx], [cy, cy + length * dy], color=colour, linewidth=2.6,
                    solid_capstyle="round")
    if region is None:
        region = [x1, y1, x2, y2]
    pad = 0.05 * max(region[2] - region[0], region[3] - region[1])
    rx1, ry1, rx2, ry2 = region[0] - pad, region[1] - pad, region[2] + pad, region[3] + pad
    w, h = rx2 - rx1, ry2 - ry1
    if w / h < panel_aspect:
        grow = (h * panel_aspect - w) / 2
        rx1, rx2 = rx1 - grow, rx2 + grow
    else:
        grow = (w / panel_aspect - h) / 2
        ry1, ry2 = ry1 - grow, ry2 + grow
    ax.set_xlim(rx1, rx2)
    ax.set_ylim(ry2, ry1)
    ax.set_aspect("equal")


#: Contact-sheet layout, inches.
_SRC_W, _CELL, _GAP, _CAPTION, _TITLE, _ROW_GAP, _HEAD = 2.9, 2.1, 0.1, 0.24, 0.2, 0.22, 0.72


def contact_sheet(rows: list[SheetRow], path: Path, title: str, legend: list[tuple[str, str, str]]) -> Path:
    """One row per sample: a caption line, then the source panel (boxes, crop windows, pose axes)
    and the crops (``SheetRow.thumbs``) side by side.

    ``legend``: ``(label, colour, kind)`` with kind ``box``, ``dashed`` or ``axis``.
    """
    n_thumbs = max((len(r.thumbs) for r in rows), default=0)
    row_h = _CAPTION + _TITLE + _CELL + _ROW_GAP
    fig_w = _GAP + _SRC_W + _GAP * 2 + n_thumbs * (_CELL + _GAP)
    fig_h = _HEAD + row_h * len(rows)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI, facecolor="white")

    def axes_at(left, top, width, height):  # inches from the top-left corner
        return fig.add_axes((left / fig_w, 1.0 - (top + height) / fig_h, width / fig_w, height / fig_h))

    for i, row in enumerate(rows):
        top = _HEAD + i * row_h
        fig.text(_GAP / fig_w, 1.0 - (top + 0.04) / fig_h, row.caption, fontsize=9, va="top", ha="left",
                 family="monospace")
        img_top = top + _CAPTION + _TITLE
        ax = axes_at(_GAP, img_top, _SRC_W, _CELL)
        _draw_source(ax, row, _SRC_W / _CELL)
        for j, (name, image) in enumerate(row.thumbs):
            ax = axes_at(_GAP * 3 + _SRC_W + j * (_CELL + _GAP), img_top, _CELL, _CELL)
            ax.set_xticks([])
            ax.set_yticks([])
            if image is not None:
                ax.imshow(image, interpolation="bilinear")
            else:
                ax.set_facecolor("#202020")
                ax.text(0.5, 0.5, "no image", color="white", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(name, fontsize=8, pad=3)
    handles = []
    for label, colour, kind in legend:
        if kind == "axis":
            handles.append(Line2D([0], [0], color=colour, linewidth=2.6, label=label))
        elif kind == "dashed":
            handles.append(Line2D([0], [0], color=colour, linewidth=1.8, linestyle=(0, (4, 2)), label=label))
        else:
            handles.append(Patch(facecolor="none", edgecolor=colour, linewidth=1.8, label=label))
    fig.text(_GAP / fig_w, 1.0 - 0.08 / fig_h, title, fontsize=11, weight="bold", va="top", ha="left")
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(_GAP / fig_w, 1.0 - 0.3 / fig_h),
               ncol=len(handles), fontsize=8, frameon=True, facecolor="#3a3a3a", labelcolor="white",
               edgecolor="#3a3a3a", handlelength=2.2, columnspacing=1.2, borderaxespad=0.0)
    return save_png(fig, path)


def legend_for(variants: list[str], extra: list[tuple[str, str, str]] = ()) -> list[tuple[str, str, str]]:
    items = [(f"{v} box", box_colour(v), "box") for v in variants]
    items += list(extra)
    items += [("pose x", AXIS_COLOURS[0], "axis"), ("pose y", AXIS_COLOURS[1], "axis"), ("nose", AXIS_COLOURS[2], "axis")]
    return items


def flag_sheet_row(build: Build, row: Row, raw_root: Path | None, caption: str) -> SheetRow:
    """Source image with every box and the stored crop window, the pose axes, each rule's crop and the
    stored crop."""
    rec = row.sample.record
    view = sample_view(build, row, raw_root)
    boxes = rec.get("boxes", {})
    overlays = [Overlay(n, b, box_colour(n)) for n, b in boxes.items()]
    overlays.append(Overlay("stored crop", [float(v) for v in rec["crop"]], CROP_COLOUR, dashed=True))
    thumbs = []
    for rule in RULES:
        d = row.values[f"{rule}_distortion"]
        label = f"{rule} ({rule_box_name(rec, rule)}) d={d:.2f}"
        thumbs.append((label, view.crop(rule_window(rec, rule)) if view is not None else None))
    stored = thumbnail(decode_rgb(build.read_member(row.sample, "jpg")))
    thumbs.append((f"stored: {rec.get('crop_rule', '?')} d={row.values['crop_distortion']:.2f}", stored))
    if view is not None and view.kind != "source":
        caption += "  [raw image not found: drawn on the stored crop]"
    return SheetRow(view, caption, overlays, (rec["yaw"], rec["pitch"], rec["roll"]),
                    boxes.get("gt") or rec.get("box"), thumbs)


def rejected_sheet_row(row: Row, raw_root: Path | None) -> SheetRow | None:
    image = raw_image(raw_root, row.values.get("source", ""))
    if image is None:
        return None
    scale = 3 * THUMB / max(image.shape[:2])  # the panel's size: matplotlib would hold a large picture many times over
    if scale < 1:
        image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    view = View(image, [0.0, 0.0, float(image.shape[1]), float(image.shape[0])], "source")
    return SheetRow(view, f"{row.key}  [{row.values.get('reason', '')}]")


def rejected_sheet(rows: list[SheetRow], path: Path, title: str) -> Path:
    cols = min(4, len(rows))
    n = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(n, cols, figsize=(3.0 * cols, 3.2 * n), dpi=DPI, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(row.view.image)
        ax.set_title(row.caption, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    return save_png(fig, path)


# ------------------------------------------------------------------------------------ histograms
def _finite(values) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None and v != ""], dtype=np.float64)
    return a[np.isfinite(a)]


def _hist(ax, series: dict[str, np.ndarray], title: str, xlabel: str, bins=30, range_=None) -> None:
    data = {k: v for k, v in series.items() if len(v)}
    if not data:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    else:
        if range_ is None:
            lo = min(float(v.min()) for v in data.values())
            hi = max(float(v.max()) for v in data.values())
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            range_ = (lo, hi)
        # side by side within each bin: overlaid bars hid series with the same values (the square
        # rules' windows and the stored crops all at w/h 1)
        ax.hist(list(data.values()), bins=bins, range=range_, histtype="bar",
                label=[f"{name} (n={len(values)})" for name, values in data.items()])
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)


def histograms(rows: list[Row], variants: list[str], out_dir: Path) -> dict[str, Path]:
    """``hist_angles.png`` (yaw/pitch/roll per split), ``hist_aspect.png`` (aspect ratio per box
    variant, per rule window and of the stored crops), ``hist_iou.png`` (IoU between box variants and
    between rule windows)."""
    written = [r for r in rows if r.sample is not None]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    splits = sorted({r.values["split"] for r in written})

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=HIST_DPI)
    for ax, angle in zip(axes, ("yaw", "pitch", "roll")):
        series = {s: _finite(r.values[angle] for r in written if r.values["split"] == s) for s in splits}
        _hist(ax, series, f"{angle} per split", "degrees")
    fig.tight_layout()
    paths["angles"] = save_png(fig, out_dir / "hist_angles.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), dpi=HIST_DPI)
    _hist(axes[0], {v: _finite(r.values.get(f"{v}_aspect") for r in written) for v in variants},
          "aspect ratio (w/h) of the box variants", "w / h")
    rule_series = {f"{rule} window": _finite(r.values[f"{rule}_aspect"] for r in written) for rule in RULES}
    rule_series["stored crop"] = _finite(r.values["crop_aspect"] for r in written)
    _hist(axes[1], rule_series, "aspect ratio (w/h) of each rule's crop window", "w / h")
    fig.tight_layout()
    paths["aspect"] = save_png(fig, out_dir / "hist_aspect.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), dpi=HIST_DPI)
    pairs = [(a, b) for i, a in enumerate(variants) for b in variants[i + 1:]]
    _hist(axes[0], {f"{a} vs {b}": _finite(r.values.get(f"iou_{a}_{b}") for r in written) for a, b in pairs},
          "IoU between box variants", "IoU", range_=(0.0, 1.0))
    rule_pairs = [(a, b) for i, a in enumerate(RULES) for b in RULES[i + 1:]]
    _hist(axes[1], {f"{a} vs {b}": _finite(r.values.get(f"iou_{a}_{b}") for r in written) for a, b in rule_pairs},
          "IoU between the rules' crop windows", "IoU", range_=(0.0, 1.0))
    fig.tight_layout()
    paths["iou"] = save_png(fig, out_dir / "hist_iou.png")
    return paths
