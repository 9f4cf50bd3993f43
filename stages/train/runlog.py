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

from ..artifacts.atomic import atomic_replace
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
    """A PNG (matplotlib) of the logged values against step: one panel per key of ``titles`` that the
    records hold, each with its own y axis, logarithmic where the positive values span more than a
    decade and a half; with ``smooth`` and at least 100 records, the values in light and their centred
    mean over 1% of the records on each side in dark (no lag: a trailing mean of a falling loss would
    sit above it). ``panel``: each panel's size in pixels. Nothing is drawn before there is a record."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in titles if any(k in r for r in records)]
    if not keys:
        return
    (pw, ph), cols = panel, min(cols, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * pw / 100, rows * ph / 100), dpi=100, squeeze=False)
    try:
        for ax in axes.flat[len(keys):]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, keys):
            pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            ax.set_title(titles[key], fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            ax.grid(True, color="0.9")
            if not pts:
                continue
            steps, values = [s for s, _ in pts], [v for _, v in pts]
            if wants_log_axis(values):
                ax.set_yscale("log")
            if smooth and len(pts) >= 100:
                ax.plot(steps, values, color=(0.59, 0.71, 0.9), linewidth=0.8)
                mean = centred_mean(pts, len(pts) // 100)
                ax.plot([s for s, _ in mean], [v for _, v in mean], color=(0.08, 0.24, 0.63), linewidth=1.6)
            else:
                ax.plot(steps, values, color=(0.08, 0.24, 0.63), linewidth=1.6, marker="o" if len(pts) == 1 else None)
        fig.tight_layout(pad=0.6)
        with atomic_replace(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def wants_log_axis(values: list[float]) -> bool:
    """A logarithmic y axis where positive values span more than a decade and a half (a loss falling
    from 5 to 0.01 is a line on it, a corner on a linear one)."""
    return min(values) > 0 and max(values) / min(values) > 30


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
