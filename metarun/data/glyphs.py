"""Glyphs: a procedurally generated stand-in for handwritten characters.

The default dataset has to work on a fresh machine with no network and no
files, yet be hard enough that a benchmark means something: raw pixels and an
untrained network should do poorly, while a meta-learned embedding should
separate unseen classes almost perfectly. Each class is a random set of pen
strokes (lines, corners, curves, arcs, often joined as in real writing); each
image redraws it as a different "writer" would, with a smooth deformation, bent
strokes, a different pen width and a random affine placement. Classes differ in
structure, images of a class differ in nuisance variables a convolutional
network can learn to ignore but a pixel comparison cannot.

Rendering is vectorised over all images: strokes are cubic Bezier segments,
sampled densely, splatted into the pixel grid with bilinear weights
proportional to arc length, blurred with a Gaussian (so the value at a pixel is
a smooth function of its distance to the pen path) and soft-thresholded at a
per-image level, which sets the pen width and antialiases the edges. Every
random draw comes from one explicitly seeded numpy generator, made before any
rendering, so the seed (part of the cache key) fixes the dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metarun.data.cache import cached_dataset
from metarun.data.split import FewShotDataset, Split
from metarun.errors import ConfigError

# Bumped whenever the output for a given set of arguments changes, so stale caches are not reused.
GENERATOR_VERSION = 2

MAX_SEGMENTS = 8  # cubic segments per class: up to 4 strokes of up to 2 segments each
SAMPLES_PER_SEGMENT = 40  # points along a segment: well under a pixel apart at 28 px
BLUR_SIGMA = 1.0  # pixels, at 28 px; scaled with image_size
CLASS_EXTENT = 0.82  # a class's bounding box is scaled into [-CLASS_EXTENT, CLASS_EXTENT]^2
EDGE = 0.25  # field units over which ink ramps from 0 to 1: about a pixel, the antialiased edge
CLASSES_PER_CHUNK = 100  # at 28 px, fewer at larger sizes: bounds the renderer's peak memory (~100 MB)


def load(
    root: str = "data/glyphs",
    seed: int = 0,
    num_classes: int = 1200,
    images_per_class: int = 20,
    image_size: int = 28,
    val_classes: int = 100,
    test_classes: int = 200,
) -> FewShotDataset:
    """Generated once per ``root`` and argument set, then read from the dataset cache."""
    if min(val_classes, test_classes) < 1 or num_classes - val_classes - test_classes < 1:
        raise ConfigError(
            f"glyphs: num_classes={num_classes} must exceed val_classes={val_classes} + test_classes={test_classes}, each at least 1"
        )
    if images_per_class < 1 or image_size < 8:
        raise ConfigError(f"glyphs: need images_per_class >= 1 and image_size >= 8, got {images_per_class} and {image_size}")
    key_parts = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "val_classes": val_classes,
        "test_classes": test_classes,
    }

    def build() -> FewShotDataset:
        images = render_classes(np.random.default_rng(seed), num_classes, images_per_class, image_size)
        return _assemble(images, val_classes, test_classes, key_parts)

    return cached_dataset(Path(root), "glyphs", key_parts, build)


def _assemble(images: np.ndarray, val_classes: int, test_classes: int, meta: dict) -> FewShotDataset:
    """Classes are i.i.d. draws, so contiguous ranges are already a random split."""
    n_train = images.shape[0] - val_classes - test_classes
    tensor = torch.from_numpy(images).unsqueeze(2)  # [classes, n, 1, H, W]
    names = [f"glyph{i:05d}" for i in range(images.shape[0])]
    bounds = {"train": (0, n_train), "val": (n_train, n_train + val_classes), "test": (n_train + val_classes, images.shape[0])}
    # Each split owns its storage: torch.save writes a view's whole base tensor, which would triple the cache.
    splits = {k: Split(tensor[a:b].clone(), names[a:b]) for k, (a, b) in bounds.items()}
    train = splits["train"].images.double() / 255.0
    return FewShotDataset("glyphs", splits, (float(train.mean()),), (float(train.std()),), dict(meta))


def render_classes(rng: np.random.Generator, num_classes: int, images_per_class: int, image_size: int) -> np.ndarray:
    """uint8 ``[classes, images_per_class, H, W]``; all random draws happen up front, so chunking does not change the bytes."""
    ctrl, mask, width = _sample_classes(rng, num_classes)
    images = _sample_images(rng, ctrl, images_per_class)
    out = np.empty((num_classes, images_per_class, image_size, image_size), dtype=np.uint8)
    chunk_classes = max(1, CLASSES_PER_CHUNK * 28 * 28 // image_size**2)
    for start in range(0, num_classes, chunk_classes):
        part = slice(start, start + chunk_classes)
        chunk = {k: v[part] for k, v in images.items()}
        out[part] = _render(chunk, mask[part], width[part], image_size)
    return out


def _sample_classes(rng: np.random.Generator, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: cubic control points ``[K, 4, 2]``, which of the K segments exist, and a base pen threshold."""
    ctrl = np.zeros((num_classes, MAX_SEGMENTS, 4, 2))
    mask = np.zeros((num_classes, MAX_SEGMENTS), dtype=bool)
    for c in range(num_classes):
        segments: list[np.ndarray] = []
        for _ in range(rng.integers(2, 5)):
            start = _stroke_start(rng, segments)
            segments.extend(_stroke(rng, start))
        pts = np.stack(segments)
        lo, hi = pts.reshape(-1, 2).min(0), pts.reshape(-1, 2).max(0)
        scale = 2 * CLASS_EXTENT / max(float((hi - lo).max()), 1e-6)
        ctrl[c, : len(segments)] = (pts - (lo + hi) / 2) * scale
        mask[c, : len(segments)] = True
    width = rng.uniform(0.3, 0.55, size=num_classes)
    return ctrl, mask, width


def _stroke_start(rng: np.random.Generator, segments: list[np.ndarray]) -> np.ndarray:
    """Most strokes begin on an earlier one, so glyphs are mostly connected like written characters."""
    if segments and rng.random() < 0.6:
        seg = segments[rng.integers(len(segments))]
        return _bezier_point(seg, rng.uniform(0, 1))
    return rng.uniform(-1, 1, size=2)


def _stroke(rng: np.random.Generator, start: np.ndarray) -> list[np.ndarray]:
    """One pen stroke as one or two cubic segments: a line, a corner, a free curve or a circular arc."""
    kind = rng.choice(4, p=[0.3, 0.25, 0.25, 0.2])
    if kind == 0:
        return [_line(start, _far_point(rng, start))]
    if kind == 1:
        mid = _far_point(rng, start)
        return [_line(start, mid), _line(mid, _far_point(rng, mid))]
    if kind == 2:
        end = _far_point(rng, start)
        return [np.stack([start, rng.uniform(-1.2, 1.2, 2), rng.uniform(-1.2, 1.2, 2), end])]
    radius = rng.uniform(0.3, 0.7)
    a0 = rng.uniform(0, 2 * np.pi)
    sweep = rng.uniform(0.5, 1.7) * np.pi * rng.choice([-1, 1])
    center = start - radius * np.array([np.cos(a0), np.sin(a0)])
    n = 1 if abs(sweep) <= np.pi / 2 else 2
    step = sweep / n
    return [_arc(center, radius, a0 + i * step, step) for i in range(n)]


def _far_point(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """A point in the box well away from ``p``, so no stroke degenerates to a dot."""
    while True:
        q = rng.uniform(-1, 1, size=2)
        if np.hypot(*(q - p)) > 0.7:
            return q


def _line(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack([a, a + (b - a) / 3, a + 2 * (b - a) / 3, b])


def _arc(center: np.ndarray, radius: float, a0: float, sweep: float) -> np.ndarray:
    """The standard cubic approximation of a circular arc (tangent handles of length 4/3 tan(sweep/4))."""
    k = 4 / 3 * np.tan(sweep / 4) * radius
    a1 = a0 + sweep
    p0 = center + radius * np.array([np.cos(a0), np.sin(a0)])
    p3 = center + radius * np.array([np.cos(a1), np.sin(a1)])
    p1 = p0 + k * np.array([-np.sin(a0), np.cos(a0)])
    p2 = p3 - k * np.array([-np.sin(a1), np.cos(a1)])
    return np.stack([p0, p1, p2, p3])


def _bezier_point(ctrl: np.ndarray, t: float) -> np.ndarray:
    """The point at parameter ``t`` of one cubic segment ``[4, 2]``."""
    u = 1 - t
    return u**3 * ctrl[0] + 3 * u * u * t * ctrl[1] + 3 * u * t * t * ctrl[2] + t**3 * ctrl[3]


def _sample_images(rng: np.random.Generator, ctrl: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per image: the class's control points after a writer's distortion, plus pen and placement draws."""
    c = ctrl.shape[0]
    pts = np.broadcast_to(ctrl[:, None], (c, n, *ctrl.shape[1:])).copy()  # [C, N, K, 4, 2]
    # A smooth random warp moves shared endpoints together, so joined strokes stay joined.
    freq = rng.normal(0, 1.5, size=(c, n, 2, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(c, n, 2))
    amp = rng.normal(0, 0.05, size=(c, n, 2, 2))
    arg = pts @ freq[:, :, None] + phase[:, :, None, None, :]
    pts += np.sin(arg) @ amp[:, :, None]
    # Handles bend each segment a little on their own: the same stroke, drawn with a different hand.
    pts[..., 1:3, :] += rng.normal(0, 0.06, size=pts[..., 1:3, :].shape)
    return {
        "points": pts,
        "rotation": rng.uniform(-0.25, 0.25, size=(c, n)),
        "log_scale": rng.uniform(np.log(0.8), np.log(1.1), size=(c, n)),
        "log_aspect": rng.uniform(-0.15, 0.15, size=(c, n)),
        "shear": rng.uniform(-0.2, 0.2, size=(c, n)),
        "shift": rng.uniform(-0.15, 0.15, size=(c, n, 2)),
        "pen": np.exp(rng.normal(0, 0.25, size=(c, n))),
        "ink": rng.uniform(0.75, 1.0, size=(c, n)),
    }


def _affine(d: dict[str, np.ndarray]) -> np.ndarray:
    """Per-image 2x2 matrices ``rotation @ shear @ scale``."""
    cos, sin = np.cos(d["rotation"]), np.sin(d["rotation"])
    sx = np.exp(d["log_scale"] + d["log_aspect"])
    sy = np.exp(d["log_scale"] - d["log_aspect"])
    m = np.empty((*cos.shape, 2, 2))
    # [[cos, -sin], [sin, cos]] @ [[1, shear], [0, 1]] @ diag(sx, sy)
    m[..., 0, 0] = cos * sx
    m[..., 0, 1] = (cos * d["shear"] - sin) * sy
    m[..., 1, 0] = sin * sx
    m[..., 1, 1] = (sin * d["shear"] + cos) * sy
    return m


def _render(d: dict[str, np.ndarray], mask: np.ndarray, width: np.ndarray, size: int) -> np.ndarray:
    """Rasterise one chunk of classes to uint8 ``[C, N, H, W]``."""
    c, n = d["rotation"].shape
    # Placing the control points places the curve (Bezier curves commute with affine maps), and is far cheaper.
    m = _affine(d)[:, :, None]  # [C, N, 1, 2, 2]
    ctrl = (d["points"] @ np.swapaxes(m, -1, -2) + d["shift"][:, :, None, None, :]) * (size / 2) + (size - 1) / 2
    t = (np.arange(SAMPLES_PER_SEGMENT) + 0.5) / SAMPLES_PER_SEGMENT
    basis = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3]).astype(np.float32)  # [4, T]
    ctrl = np.swapaxes(ctrl, -1, -2).astype(np.float32)[..., None]  # [C, N, K, 2, 4, 1], pixel centres at integers
    pix = sum(ctrl[..., i, :] * basis[i] for i in range(4))  # [C, N, K, 2, T]
    x, y = pix[..., 0, :], pix[..., 1, :]
    # Each sample stands for the arc length around it, so ink per unit length is constant.
    seg_len = np.hypot(np.diff(x, axis=-1), np.diff(y, axis=-1)).sum(-1)  # [C, N, K]
    weight = (seg_len / SAMPLES_PER_SEGMENT * mask[:, None, :])[..., None]
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    image = np.arange(c * n).reshape(c, n, 1, 1) * (size * size)
    canvas = np.zeros(c * n * size * size)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xs, ys = x0 + dx, y0 + dy
        inside = (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
        idx = (image + ys * size + xs)[inside]
        canvas += np.bincount(idx, weights=(w * weight)[inside], minlength=canvas.size)
    field = _blur(canvas.reshape(c * n, size, size), BLUR_SIGMA * size / 28)
    # A pen path of unit ink per length blurs to a peak of 1 / (sqrt(2 pi) sigma); rescale so the path itself reads 1.
    field *= np.sqrt(2 * np.pi) * BLUR_SIGMA * size / 28
    level = (width[:, None] * d["pen"]).reshape(-1, 1, 1).clip(0.1, 0.9)
    ink = np.clip((field - level) / EDGE + 0.5, 0, 1) * d["ink"].reshape(-1, 1, 1)
    return np.round(ink * 255).astype(np.uint8).reshape(c, n, size, size)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[B, H, W]`` with zero padding."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = x.shape[1:]
    pad = np.pad(x, ((0, 0), (r, r), (0, 0)))
    x = sum(k[i] * pad[:, i : i + h, :] for i in range(2 * r + 1))
    pad = np.pad(x, ((0, 0), (0, 0), (r, r)))
    return sum(k[i] * pad[:, :, i : i + w] for i in range(2 * r + 1))
