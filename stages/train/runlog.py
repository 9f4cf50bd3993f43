"""The training log both trainers keep in their run directory (rank 0 writes it): metrics.jsonl,
one JSON record per logged step, and a PNG of its curves.

A resumed run first cuts the log back to its checkpoint's step, so the log of an interrupted and
resumed run is the log of an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import ArtifactError

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir``'s log; [] if there is none. A torn last line (the run was killed
    while writing it) is dropped: the resume that reads it rewrites the log up to its checkpoint
    anyway. A bad line before the last is corruption: one-line error naming the file."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ArtifactError(f"{path} line {i + 1} is not JSON (a corrupt log): remove that line, or the run "
                                "folder to start again") from None
    return records


def append_metrics(run_dir: str | os.PathLike, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> list[dict]:
    """Drop the records past ``step`` (written after the checkpoint a resumed run restarts from);
    returns the records kept."""
    path = Path(run_dir) / METRICS
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    if path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def plot_metrics(records: list[dict], path: str | os.PathLike, titles: dict[str, str],
                 panel: tuple[int, int] = (360, 180), cols: int = 2, smooth: bool = False) -> None:
    """A PNG (PIL only) of the logged values against step: one panel per key of ``titles`` that the
    records hold, each with its own y range; with ``smooth`` and at least 100 records, the values in
    light and their centred mean over 1% of the records on each side in dark (no lag: a trailing mean
    of a falling loss would sit above it). Nothing is drawn before there is a record."""
    from PIL import Image, ImageDraw

    keys = [k for k in titles if any(k in r for r in records)]
    if not keys:
        return
    (pw, ph), cols = panel, min(cols, len(keys))
    img = Image.new("RGB", (cols * pw, math.ceil(len(keys) / cols) * ph), "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in records]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    for n, key in enumerate(keys):
        ox, oy = (n % cols) * pw, (n // cols) * ph
        left, top, right, bottom = ox + 70, oy + 30, ox + pw - 20, oy + ph - 45
        draw.text((left, oy + 8), titles[key], fill="black")
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        lo, hi = (min(v for _, v in pts), max(v for _, v in pts)) if pts else (0.0, 1.0)
        pad = (hi - lo) * 0.05 or abs(lo) * 0.05 or 0.05
        lo, hi = lo - pad, hi + pad

        def to_px(s, v):
            return left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top)

        for k in range(5):  # grid and tick labels
            _, py = to_px(s0, lo + (hi - lo) * k / 4)
            draw.line([left, py, right, py], fill=(225, 225, 225))
            draw.text((ox + 5, py - 6), f"{lo + (hi - lo) * k / 4:.3g}", fill="black")
        for step in sorted({round(s0 + (s1 - s0) * k / 4) for k in range(5)}):
            px, _ = to_px(step, lo)
            width = draw.textlength(str(step))  # centred under its tick, kept inside the panel
            draw.text((min(px - width / 2, ox + pw - 2 - width), bottom + 6), str(step), fill="black")
        draw.text(((left + right) // 2 - 15, bottom + 25), "step", fill="black")
        draw.rectangle([left, top, right, bottom], outline="black")
        if not pts:
            continue
        lines = [(pts, (20, 60, 160), 2)]
        if smooth and len(pts) >= 100:
            lines = [(pts, (150, 180, 230), 1), (centred_mean(pts, len(pts) // 100), (20, 60, 160), 2)]
        for line, colour, width in lines:
            xy = [to_px(s, v) for s, v in line]
            draw.line(xy if len(xy) > 1 else xy * 2, fill=colour, width=width)
    img.save(path)


def centred_mean(pts: list[tuple[int, float]], half: int) -> list[tuple[int, float]]:
    """(step, mean of the values within ``half`` records on each side), the window shrunk at the ends."""
    values = [v for _, v in pts]
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    out = []
    for i, (step, _) in enumerate(pts):
        a, b = max(0, i - half), min(len(pts), i + half + 1)
        out.append((step, (sums[b] - sums[a]) / (b - a)))
    return out
