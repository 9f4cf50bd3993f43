"""The embedded demonstration dataset: procedurally drawn shapes and textures in class folders.

Ten classes, each a recognisable kind of picture with random colours, positions, sizes and
backgrounds, deterministic from a seed. Small enough for a laptop CPU, varied enough that a
generative model has something to learn and a person can tell the classes apart.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "ring", "cross", "h_stripes", "v_stripes", "checker", "dots", "gradient")


def _colour(rng: np.random.Generator, dark: bool) -> tuple[int, int, int]:
    base = rng.uniform(0.0, 0.35) if dark else rng.uniform(0.55, 1.0)
    hue = rng.uniform(0, 2 * math.pi)
    rgb = [base + 0.3 * math.cos(hue + k * 2 * math.pi / 3) for k in range(3)]
    return tuple(int(255 * min(max(c, 0.0), 1.0)) for c in rgb)


def draw(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    dark_bg = bool(rng.integers(2))
    bg, fg = _colour(rng, dark_bg), _colour(rng, not dark_bg)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r, 2)
    if cls == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif cls == "square":
        a = rng.uniform(0, math.pi / 2)
        pts = [(cx + r * math.cos(a + k * math.pi / 2), cy + r * math.sin(a + k * math.pi / 2)) for k in range(4)]
        d.polygon(pts, fill=fg)
    elif cls == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
        d.polygon(pts, fill=fg)
    elif cls == "ring":
        w = max(2, int(r * 0.35))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w)
    elif cls == "cross":
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif cls in ("h_stripes", "v_stripes"):
        period = rng.uniform(0.12, 0.25) * size
        offset = rng.uniform(0, period)
        for k in range(-1, int(size / period) + 2):
            p = offset + k * period
            box = [0, p, size, p + period / 2] if cls == "h_stripes" else [p, 0, p + period / 2, size]
            d.rectangle(box, fill=fg)
    elif cls == "checker":
        cell = rng.uniform(0.15, 0.3) * size
        ox, oy = rng.uniform(0, cell, 2)
        n = int(size / cell) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                if (i + j) % 2 == 0:
                    d.rectangle([ox + i * cell, oy + j * cell, ox + (i + 1) * cell, oy + (j + 1) * cell], fill=fg)
    elif cls == "dots":
        for _ in range(int(rng.integers(5, 10))):
            rr = rng.uniform(0.04, 0.08) * size
            x, y = rng.uniform(rr, size - rr, 2)
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fg)
    elif cls == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
        t = np.clip(0.5 + (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a), 0, 1)[..., None]
        arr = (1 - t) * np.array(bg) + t * np.array(fg)
        img = Image.fromarray(arr.round().astype(np.uint8))
    else:
        raise ValueError(cls)
    return img


def generate(out: str | Path, per_class: int = 40, size: int = 64, seed: int = 0,
             classes: tuple[str, ...] = CLASSES) -> Path:
    """Write ``per_class`` PNGs per class into ``out/<class>/``; the same seed gives the same files."""
    out = Path(out)
    for ci, cls in enumerate(classes):
        folder = out / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, ci, i])
            path = folder / f"{cls}_{i:04d}.png"
            if not path.exists():
                draw(cls, size, rng).save(path)
    return out
