"""Watching a run from outside: TensorBoard event files in the run folder (``tensorboard --logdir
RUN``), and Weights & Biases with ``--wandb PROJECT`` when the ``wandb`` package is installed. Both
get what metrics.jsonl gets (every record's numbers) and the preview grids. Rank 0 only.

A resumed run purges the events at and after its checkpoint's step, as it cuts metrics.jsonl back,
so the curves of an interrupted and resumed run are those of an uninterrupted one. Also here: the
two numbers a record carries about the machine, the peak GPU memory and the share of time the loop
waited for data (``DataWait``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import RaeError


def require_wandb(project: str | None) -> None:
    """``--wandb``: refused in one line before anything starts when the package is missing."""
    import importlib.util

    if project and importlib.util.find_spec("wandb") is None:
        raise RaeError("--wandb needs the wandb package: pip install wandb (TensorBoard files are written "
                       "without it)")

EVENTS = "tensorboard"  # RUN/tensorboard/events.out.tfevents.*


class Tracker:
    """Scalars and images of one run, for TensorBoard and (optionally) W&B."""

    def __init__(self, out: str | os.PathLike, start: int, config: dict, wandb_project: str | None = None,
                 tensorboard: bool = True):
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(out) / EVENTS), purge_step=start if start > 0 else None)
        self.wandb = None
        if wandb_project:
            self.wandb = _wandb_run(out, wandb_project, config)

    def scalars(self, record: dict) -> None:
        step = int(record["step"])
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """``image``: uint8 [H, W, 3] (a preview grid)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(out, project: str, config: dict):
    """A W&B run for ``out``, resumed across invocations: its id is derived from the run folder."""
    try:
        import wandb
    except ImportError:
        raise RaeError("--wandb needs the wandb package: pip install wandb (TensorBoard files are written "
                       "without it)") from None
    run_id = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(out), name=Path(out).name, config=config)


@contextlib.contextmanager
def closing(tracker: Tracker | None):
    try:
        yield tracker
    finally:
        if tracker is not None:
            tracker.close()


class DataWait:
    """Wraps the loop's batch iterator: the time spent waiting for the next batch, as a share of the
    wall time since the last ``share()``."""

    def __init__(self, batches):
        self.batches, self.waited, self.t0 = iter(batches), 0.0, time.perf_counter()

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - t

    def share(self) -> float:
        now = time.perf_counter()
        share = self.waited / max(now - self.t0, 1e-9)
        self.waited, self.t0 = 0.0, now
        return share


def peak_memory_gib(device: torch.device) -> float | None:
    """The peak GPU memory since the last call (GiB), or None off the GPU."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def open_tracker(cfg, out: Path, start: int) -> Tracker | None:
    """Rank 0's tracker for a trainer's config (``tensorboard``, ``wandb``), or None when both are off."""
    if not cfg.tensorboard and not cfg.wandb:
        return None
    from ..artifacts.atomic import jsonable

    return Tracker(out, start, jsonable(cfg), wandb_project=cfg.wandb, tensorboard=cfg.tensorboard)


def machine_record(waits: DataWait, device: torch.device) -> dict:
    """What a log record says about the machine since the last one: the share of time spent waiting
    for data, and the peak GPU memory (on the GPU)."""
    record = {"data_wait": round(waits.share(), 4)}
    peak = peak_memory_gib(device)
    if peak is not None:
        record["peak_mem_gib"] = round(peak, 3)
    return record


class Deadline:
    """--stop-after-hours: whether the wall time is up, decided on rank 0 and shared with every rank
    (call it at the same steps on every rank, e.g. at log steps), so all of them stop together."""

    def __init__(self, hours: float | None):
        self.end = time.time() + hours * 3600 if hours else None

    def due(self) -> bool:
        from .. import dist

        return self.end is not None and bool(dist.broadcast_object(time.time() >= self.end))
