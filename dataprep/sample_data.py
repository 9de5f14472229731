"""A small raw-data tree in the exact on-disk formats of 300W-LP, AFLW2000-3D and BIWI, for tests and
demos without the research-licensed datasets.

The images hold a real face: ``skimage.data.astronaut()`` (Eileen Collins, a public-domain NASA
photo shipped with scikit-image), scaled, shifted and slightly rotated onto a smooth background,
so face detectors find it where the labels say. Labels (poses) are drawn from a seeded RNG in
advance; they are *not* the pose of the pictured face (she always looks at the camera), they only
have to round-trip. Landmarks (68 points) are placed around the pasted face so that the ground-truth
boxes match it.

``write_sample_tree(out, seed)`` writes ``out/300W_LP``, ``out/AFLW2000``, ``out/hpdb`` and
``out/expected_labels.json`` and returns the expected values. Same seed -> byte-identical files.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import codec, labels
from .datasets import aflw2000 as aflw_reader
from .datasets import biwi
from .datasets import w300lp as w300lp_reader
from .boxes import bbox_of_points as points_box
from .boxes import center as box_center
from .datasets.matfile import PT2D_MISSING_XY, write_mat
from .records import make_key

# --------------------------------------------------------------------------------------------
# The face: astronaut() measured with facenet-pytorch MTCNN (box and 5 landmarks, 512x512 image)
# --------------------------------------------------------------------------------------------
ASTRONAUT_FACE_BOX = (181.05, 62.16, 267.75, 172.05)
ASTRONAUT_EYES = ((205.01, 101.73), (246.76, 103.71))
ASTRONAUT_NOSE = (224.67, 128.96)
ASTRONAUT_MOUTH = ((201.72, 139.25), (245.27, 141.86))
#: sqrt(area) of the MTCNN box: the face size the BIWI head box is matched to.
ASTRONAUT_FACE_SIZE = math.sqrt((267.75 - 181.05) * (172.05 - 62.16))

#: 68-point indices standing in for AFLW's 21 points (ears are jaw points pushed outwards).
AFLW21_FROM_68 = [17, 19, 21, 22, 24, 26, 36, 37, 39, 42, 44, 45, 0, 31, 30, 35, 16, 48, 62, 54, 8]

SUBSETS_300WLP = {"AFW": ["AFW_1000207_1"], "HELEN": ["HELEN_10024381_1"], "IBUG": ["IBUG_image_017_1"],
                  "LFPW": ["LFPW_image_train_0042"]}
SAMPLES_PER_300WLP_BASE = {"AFW": 3, "HELEN": 2, "IBUG": 2, "LFPW": 3}
N_AFLW2000 = 12
BIWI_SEQUENCES = [f"{i:02d}" for i in range(1, 25)]
BIWI_FIRST_FRAME = 3
BIWI_HEAD_RADIUS_MM = 100.0


def _ellipse(cx, cy, rx, ry, angles) -> np.ndarray:
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([cx + rx * np.cos(a), cy - ry * np.sin(a)], axis=1)


@functools.lru_cache(maxsize=1)
def astronaut_landmarks() -> np.ndarray:
    """68 iBUG-ordered points laid out on astronaut()'s face (plausible, not annotated)."""
    (lex, ley), (rex, rey) = ASTRONAUT_EYES
    (mlx, mly), (mrx, mry) = ASTRONAUT_MOUTH
    nx, ny = ASTRONAUT_NOSE
    jaw = _ellipse(225.4, 103.0, 42.5, 69.0, np.linspace(math.pi, 2 * math.pi, 17))
    jaw[:, 1] = 103.0 + np.abs(jaw[:, 1] - 103.0)  # lower half of the ellipse (image y grows down)
    arc = np.sin(np.linspace(0.15 * math.pi, 0.85 * math.pi, 5))
    brow_l = np.stack([np.linspace(189.0, 217.0, 5), 92.0 - 5.0 * arc], axis=1)
    brow_r = np.stack([np.linspace(233.0, 262.0, 5), 93.0 - 5.0 * arc], axis=1)
    bridge = np.stack([np.linspace(225.6, nx, 4), np.linspace(104.0, ny, 4)], axis=1)
    nostrils = np.stack([np.linspace(214.0, 235.0, 5), 133.0 + np.array([-1.0, 0.5, 1.5, 0.5, -1.0])], axis=1)
    eye_angles = np.array([180, 120, 60, 0, -60, -120]) * labels.DEG2RAD
    eye_l = _ellipse(lex, ley, 8.5, 3.5, eye_angles)
    eye_r = _ellipse(rex, rey, 8.5, 3.5, eye_angles)
    mcx, mcy = (mlx + mrx) / 2, (mly + mry) / 2
    outer = _ellipse(mcx, mcy, (mrx - mlx) / 2, 7.0, np.linspace(math.pi, -math.pi, 13)[:-1])
    inner = _ellipse(mcx, mcy, (mrx - mlx) / 2 - 6.0, 2.5, np.linspace(math.pi, -math.pi, 9)[:-1])
    pts = np.concatenate([jaw, brow_l, brow_r, bridge, nostrils, eye_l, eye_r, outer, inner])
    assert pts.shape == (68, 2)
    pts.flags.writeable = False
    return pts


@functools.lru_cache(maxsize=1)
def _astronaut() -> tuple[np.ndarray, np.ndarray]:
    """(RGB float32 image, soft head-and-shoulders mask float32), both 512x512."""
    from skimage import data

    img = data.astronaut().astype(np.float32)
    mask = np.zeros((512, 512), np.float32)
    cv2.ellipse(mask, (225, 128), (92, 118), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 7)
    return img, mask


def _affine(src_center, dst_center, scale_x: float, scale_y: float, angle_deg: float) -> np.ndarray:
    """2x3 matrix: astronaut pixels -> canvas pixels (scale about src_center, rotate, move)."""
    a = angle_deg * labels.DEG2RAD
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin = rot @ np.diag([scale_x, scale_y])
    shift = np.asarray(dst_center, np.float64) - lin @ np.asarray(src_center, np.float64)
    return np.hstack([lin, shift[:, None]])


def _apply(A: np.ndarray, pts) -> np.ndarray:
    p = np.asarray(pts, dtype=np.float64)
    return p @ A[:, :2].T + A[:, 2]


def _face_box(A: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = ASTRONAUT_FACE_BOX
    return points_box(_apply(A, [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]))


def _background(rng: np.random.Generator, width: int, height: int, flat: bool = False) -> np.ndarray:
    """Smooth colour field, or (``flat``, for PNGs: compresses ~10x better) a wall of flat colour
    blocks; nothing face-like either way."""
    if not flat:
        grid = rng.uniform(40, 215, size=(4, 5, 3)).astype(np.float32)
        return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    out = np.empty((height, width, 3), np.float32)
    out[:] = rng.uniform(60, 200, 3)
    for _ in range(4):
        x1, y1 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        out[y1:y1 + int(rng.integers(40, 300)), x1:x1 + int(rng.integers(40, 300))] = rng.uniform(40, 215, 3)
    return out


def _compose(rng: np.random.Generator, A: np.ndarray, width: int, height: int, flat: bool = False) -> np.ndarray:
    """RGB uint8 canvas with the astronaut warped by ``A`` onto a fresh background."""
    face, mask = _astronaut()
    warped = cv2.warpAffine(face, A, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
    alpha = cv2.warpAffine(mask, A, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)[..., None]
    out = _background(rng, width, height, flat) * (1.0 - alpha) + warped * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _jpg(path: Path, rgb: np.ndarray) -> None:
    path.write_bytes(codec.encode_jpeg_rgb(rgb, 90))


def _png(path: Path, rgb: np.ndarray) -> None:
    path.write_bytes(codec.encode_png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 6))


def _r(v) -> float:
    return float(round(float(v), 6))


def _entry(dataset: str, stem: str, source: str, group: str, yaw, pitch, roll, gt, face) -> dict[str, Any]:
    return {
        "key": make_key(dataset, stem), "source": source, "group": group,
        "yaw": float(yaw), "pitch": float(pitch), "roll": float(roll),
        "gt_box": [float(v) for v in gt], "face_box": [_r(v) for v in face],
        "in_range": labels.angles_in_range(yaw, pitch, roll),
    }


def _fit_params(rng: np.random.Generator, shape_exp_dtype=np.float64) -> dict[str, np.ndarray]:
    return {
        "Illum_Para": rng.normal(0, 0.5, (1, 10)),
        "Color_Para": rng.normal(0, 0.5, (1, 7)).astype(np.float32),
        "Tex_Para": rng.normal(0, 50.0, (199, 1)),
        "Shape_Para": rng.normal(0, 2e4, (199, 1)).astype(shape_exp_dtype),
        "Exp_Para": rng.normal(0, 0.5, (29, 1)).astype(shape_exp_dtype),
    }


def _pose_para(rng: np.random.Generator, yaw, pitch, roll, center, scale) -> np.ndarray:
    rad = labels.euler_to_pose_para(yaw, pitch, roll)
    tx, ty = center
    return np.array([[*rad, tx, 450.0 - ty, rng.uniform(-120, -40), 0.00125 * scale]], dtype=np.float32)


def _roi(box) -> np.ndarray:
    x1, y1, x2, y2 = box
    pad = 0.8 * max(x2 - x1, y2 - y1)
    return np.array([[x1 - pad, y1 - pad, x2 + pad, y2 + pad]]).round().astype(np.int16)


# --------------------------------------------------------------------------------------------
# 300W-LP
# --------------------------------------------------------------------------------------------
def _write_300wlp(root: Path, rng: np.random.Generator) -> list[dict[str, Any]]:
    expected = []
    template = astronaut_landmarks()
    src_center = box_center(points_box(template))
    for subset, bases in SUBSETS_300WLP.items():
        for d in (root / subset, root / f"{subset}_Flip", root / "landmarks" / subset):
            d.mkdir(parents=True, exist_ok=True)
        for base in bases:
            for k in range(SAMPLES_PER_300WLP_BASE[subset]):
                name = f"{base}_{k}"
                yaw = rng.uniform(-20, 20) if k == 0 else rng.uniform(-85, 85)
                pitch, roll = rng.uniform(-35, 35), rng.uniform(-25, 25)
                size = rng.uniform(150, 215) / 85.0
                center = (225 + rng.uniform(-15, 15), 235 + rng.uniform(-15, 15))
                A = _affine(src_center, center, size, size, rng.uniform(-10, 10))
                image = _compose(rng, A, 450, 450)
                pts = _apply(A, template)
                for flip in (False, True):
                    sub = f"{subset}_Flip" if flip else subset
                    if flip:  # the mirrored image, its pose re-fitted; pt2d as the real files have it:
                        # mirrored in MATLAB pixel coordinates (x -> W + 1 - x), not re-indexed
                        img, p = image[:, ::-1].copy(), labels.mirror_points(pts, 450.0, labels.mirror_offset("300w_lp"))
                        noise = rng.uniform(-0.7, 0.7, 3)
                        y, pi, r = (a + n for a, n in zip(labels.flip_euler(yaw, pitch, roll), noise))
                        face = labels.mirror_box(_face_box(A), 450.0)
                    else:
                        img, p, (y, pi, r), face = image, pts, (yaw, pitch, roll), _face_box(A)
                    box = points_box(p)
                    pose = _pose_para(rng, y, pi, r, box_center(box), size)
                    arrays = {"pt2d": p.T.copy(), "roi": _roi(box)}
                    arrays.update(_fit_params(rng, np.float32 if flip else np.float64))
                    arrays["Pose_Para"] = pose
                    _jpg(root / sub / f"{name}.jpg", img)
                    write_mat(root / sub / f"{name}.mat", arrays)
                    if not flip and k == 0:
                        write_mat(root / "landmarks" / subset / f"{name}_pts.mat",
                                  {"pts_2d": p.copy(), "pts_3d": (p + rng.normal(0, 1.0, p.shape))})
                    ey, ep, er = labels.pose_para_to_euler(pose)
                    expected.append(_entry(w300lp_reader.NAME, f"{sub}/{name}", f"{sub}/{name}.jpg", sub,
                                           ey, ep, er, box, face))
    code = root / "Code"
    code.mkdir(exist_ok=True)
    (code / "ReadMe.txt").write_text("Not a sample folder: readers must ignore it.\n")
    _jpg(code / "demo.jpg", np.full((16, 16, 3), 128, np.uint8))
    return sorted(expected, key=lambda e: e["source"])


# --------------------------------------------------------------------------------------------
# AFLW2000-3D
# --------------------------------------------------------------------------------------------
def _write_aflw2000(root: Path, rng: np.random.Generator) -> list[dict[str, Any]]:
    root.mkdir(parents=True, exist_ok=True)
    expected = []
    template = astronaut_landmarks()
    tb = points_box(template)
    src_center = box_center(tb)
    numbers = sorted(rng.choice(np.arange(2, 4400), N_AFLW2000, replace=False).tolist())
    placeholders = {1: 1, 4: 4, 9: 9}  # sample index -> number of unannotated AFLW points
    out_of_range = {3: ("pitch", -104.5), 7: ("yaw", 123.25)}
    narrow, off_image = 5, 10  # a tall narrow gt box; a face hanging over the left image border
    for i, number in enumerate(numbers):
        name = f"image{number:05d}"
        angles = {"yaw": rng.uniform(-80, 80), "pitch": rng.uniform(-40, 40), "roll": rng.uniform(-30, 30)}
        if i in out_of_range:
            angles[out_of_range[i][0]] = out_of_range[i][1]
        size = rng.uniform(160, 220) / 85.0
        sx = size * (0.6 if i == narrow else 1.0)
        center = (225 + rng.uniform(-10, 10), 240 + rng.uniform(-10, 10))
        if i == off_image:
            center = (55.0, center[1])
        A = _affine(src_center, center, sx, size, rng.uniform(-8, 8))
        image = _compose(rng, A, 450, 450)
        pts = _apply(A, template)
        # z: a dome over the face (3DDFA's pt3d_68 z is in the same pixel units)
        rel = (template - np.asarray(src_center)) / 42.5
        z = size * 60.0 * (1.0 - 0.35 * (rel ** 2).sum(axis=1))
        pt3d = np.vstack([pts.T, z[None, :]]).astype(np.float32)
        pt2d = pts[AFLW21_FROM_68].T.copy()
        width_vec = pts[16] - pts[0]
        pt2d[:, 12] -= 0.06 * width_vec  # left ear, outside the jaw
        pt2d[:, 16] += 0.06 * width_vec  # right ear
        n_missing = placeholders.get(i, 0)
        if n_missing:
            idx = rng.choice(21, n_missing, replace=False)
            pt2d[0, idx], pt2d[1, idx] = PT2D_MISSING_XY
        gt = points_box(pt3d[:2].T.astype(np.float64))
        arrays = {"pt2d": pt2d}
        arrays.update(_fit_params(rng))
        arrays["Pose_Para"] = _pose_para(rng, angles["yaw"], angles["pitch"], angles["roll"],
                                         box_center(gt), size)
        arrays["roi"] = _roi(gt)
        arrays["pt3d_68"] = pt3d
        _jpg(root / f"{name}.jpg", image)
        write_mat(root / f"{name}.mat", arrays)
        ey, ep, er = labels.pose_para_to_euler(arrays["Pose_Para"])
        e = _entry(aflw_reader.NAME, name, f"{name}.jpg", aflw_reader.GROUP, ey, ep, er, gt, _face_box(A))
        e["pt2d_missing"] = n_missing
        e["pt2d_box"] = points_box(pt2d.T)
        expected.append(e)
    return expected


# --------------------------------------------------------------------------------------------
# BIWI
# --------------------------------------------------------------------------------------------
_OBJ = (
    "# 4 vertices, 2 faces\n"
    "v 0.0 0.0 0.0\nvn 0.0 0.0 1.0\nvt 0.000000 0.000000\n"
    "v 100.0 0.0 0.0\nvn 0.0 0.0 1.0\nvt 1.000000 0.000000\n"
    "v 100.0 100.0 0.0\nvn 0.0 0.0 1.0\nvt 1.000000 1.000000\n"
    "v 0.0 100.0 0.0\nvn 0.0 0.0 1.0\nvt 0.000000 1.000000\n"
    "f 1/1/1 2/2/2 3/3/3\nf 1/1/1 3/3/3 4/4/4\n"
)


def _depth_map(rng: np.random.Generator, t: np.ndarray, cal: biwi.Calibration) -> np.ndarray:
    """Zeros except a head (sphere of BIWI_HEAD_RADIUS_MM around t) and a torso below it, with
    scattered dropouts, like a thresholded Kinect frame."""
    h, w = cal.height, cal.width
    f = cal.focal
    cx, cy = cal.project(t)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rho = np.hypot(xx - cx, yy - cy) * (t[2] / f)  # mm from the head axis at the head's depth
    depth = np.zeros((h, w), np.float32)
    head = rho < BIWI_HEAD_RADIUS_MM
    depth[head] = t[2] - np.sqrt(BIWI_HEAD_RADIUS_MM ** 2 - rho[head] ** 2)
    r_px = f * BIWI_HEAD_RADIUS_MM / t[2]
    torso = (np.abs(xx - cx) < 1.6 * r_px) & (yy > cy + 1.3 * r_px) & ~head
    depth[torso] = t[2] + 60.0 + 0.05 * (yy[torso] - cy)
    depth[rng.random((h, w)) < 0.02] = 0
    return np.rint(depth).astype(np.uint16)


def _write_biwi(root: Path, seed_seq: np.random.SeedSequence, frames: int) -> list[dict[str, Any]]:
    """Each sequence and each frame draws from its own child seed, so a tree with fewer frames per
    sequence holds byte-identical copies of the first frames of a bigger one."""
    root.mkdir(parents=True, exist_ok=True)
    expected = []
    for seq, seq_seed in zip(BIWI_SEQUENCES, seed_seq.spawn(len(BIWI_SEQUENCES))):
        children = seq_seed.spawn(1 + frames)
        rng = np.random.default_rng(children[0])
        d = root / seq
        d.mkdir(exist_ok=True)
        (root / f"{seq}.obj").write_text(_OBJ)
        rgb_text = biwi.format_cal(biwi.Calibration(**_rgb_calibration(rng)))
        depth_text = biwi.format_cal(biwi.Calibration(
            K=np.array([[575.816, 0, 320], [0, 575.816, 240], [0, 0, 1]]), dist=np.zeros(4),
            R=np.eye(3), T=np.zeros(3), width=640, height=480))
        (d / "rgb.cal").write_text(rgb_text)
        (d / "depth.cal").write_text(depth_text)
        rgb_cal = biwi.parse_cal_text(rgb_text)
        depth_cal = biwi.parse_cal_text(depth_text)
        # Like the real 30 fps video, the head drifts a few pixels and degrees from frame to frame
        # (FSA-Net's tracking treats a move of 80 px between frames as a detector jump).
        start = np.array([rng.uniform(-50, 50), rng.uniform(-30, 30), rng.uniform(-25, 25),
                          rng.uniform(290, 370), rng.uniform(230, 275), rng.uniform(840, 1030)])
        velocity = np.concatenate([rng.uniform(-4, 4, 3), rng.uniform(-5, 5, 2), rng.uniform(-5, 5, 1)])
        for k in range(frames):
            rng = np.random.default_rng(children[1 + k])
            frame = f"frame_{BIWI_FIRST_FRAME + k:05d}"
            step = start + k * velocity + rng.uniform(-2, 2, 6)
            yaw, pitch, roll, u, v, z = (float(x) for x in step)
            p_rgb = z * np.linalg.solve(rgb_cal.K, [u, v, 1.0])
            t = rgb_cal.R.T @ (p_rgb - rgb_cal.T)
            pose_text = biwi.format_pose_txt(labels.euler_to_biwi_matrix(yaw, pitch, roll), t)
            (d / f"{frame}_pose.txt").write_text(pose_text)
            M, t = biwi.parse_pose_text(pose_text)
            box, centre, _ = biwi.head_box(t, rgb_cal)
            scale = (box[2] - box[0]) / ASTRONAUT_FACE_SIZE
            A = _affine(ASTRONAUT_NOSE, centre, scale, scale, rng.uniform(-8, 8))
            _png(d / f"{frame}_rgb.png", _compose(rng, A, rgb_cal.width, rgb_cal.height, flat=True))
            (d / f"{frame}_depth.bin").write_bytes(biwi.encode_depth_bin(_depth_map(rng, t, depth_cal)))
            ey, ep, er = labels.biwi_matrix_to_euler(M)
            e = _entry(biwi.NAME, f"{seq}/{frame}_rgb", f"{seq}/{frame}_rgb.png", seq, ey, ep, er, box, _face_box(A))
            e["head_center_mm"] = [float(x) for x in t]
            expected.append(e)
    return expected


def _rgb_calibration(rng: np.random.Generator) -> dict[str, Any]:
    """A plausible Kinect RGB calibration: BIWI-like focal length, small R, ~25 mm baseline."""
    f = 517.679 + rng.uniform(-4, 4)
    small = rng.uniform(-1.0, 1.0, 3)
    return {
        "K": np.array([[f, 0, 320], [0, f, 240.5], [0, 0, 1]]),
        "dist": np.zeros(4),
        "R": labels.rotation_from_euler(*small),
        "T": np.array([-24.0, 5.9, -13.2]) + rng.uniform(-2, 2, 3),
        "width": 640,
        "height": 480,
    }


# --------------------------------------------------------------------------------------------
def write_sample_tree(out: Path, seed: int = 0, biwi_frames_per_sequence: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Write ``out/300W_LP``, ``out/AFLW2000``, ``out/hpdb`` and ``out/expected_labels.json``.

    Returns ``{dataset: [entry, ...]}`` (entries sorted by source) where an entry holds ``key``,
    ``source``, ``group``, ``yaw``/``pitch``/``roll`` (degrees, exactly what the readers decode from
    the written files), ``gt_box`` (the reader's ``gt`` box), ``face_box`` (where the pasted face's
    MTCNN box is), ``in_range`` (protocol 1's +-99 filter), plus ``pt2d_missing``/``pt2d_box``
    (AFLW2000) and ``head_center_mm`` (BIWI).
    """
    out = Path(out)
    # The sample files carry the real datasets' names (hpdb/01/frame_00003_rgb.png, ...): written
    # over a real download they would replace its files without a word.
    taken = [name for name in (w300lp_reader.DEFAULT_ROOT_NAME, aflw_reader.DEFAULT_ROOT_NAME, biwi.DEFAULT_ROOT_NAME,
                               "expected_labels.json") if (out / name).exists()]
    if taken:
        raise FileExistsError(f"{out} already holds {', '.join(taken)}; the sample tree uses the real datasets' "
                              "file names and would overwrite them")
    out.mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(seed).spawn(3)
    expected = {
        w300lp_reader.NAME: _write_300wlp(out / w300lp_reader.DEFAULT_ROOT_NAME, np.random.default_rng(seeds[0])),
        aflw_reader.NAME: _write_aflw2000(out / aflw_reader.DEFAULT_ROOT_NAME, np.random.default_rng(seeds[1])),
        biwi.NAME: _write_biwi(out / biwi.DEFAULT_ROOT_NAME, seeds[2],
                               int(biwi_frames_per_sequence)),
    }
    (out / "expected_labels.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return expected
