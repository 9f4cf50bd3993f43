"""Training data from a latent store: deterministic, resumable, sharded global batches.

The order of samples is a function of (seed, epoch) only. Each optimisation step takes the next
``global_batch`` valid entries of that order; under ``torchrun`` rank r takes its contiguous
slice of them. So the global batch does not depend on the number of GPUs, and the data position
to resume from is just the step number.

Each DataLoader item is a whole per-rank batch, read from the store in one sorted pass (one
inner chunk per sample), so worker processes scale the read rate.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts.images import BadImage, center_crop_arr, load_rgb, reference_crop
from ..artifacts.images import check_sources
from ..artifacts.manifest import read_manifest
from ..artifacts.store import LatentStore
from ..errors import ArtifactError, RaeError
from .config import rank_slice


@dataclass
class BatchPlan:
    """Which store entries each step reads: step -> global batch -> this rank's slice.

    With ``mirrors`` (a store encoded with ``--flip``), ``indices`` are the source images and
    ``mirrors`` the entry of each one's horizontal mirror: every epoch takes each image once,
    as itself or as its mirror with probability 1/2 — the reference's RandomHorizontalFlip, so an
    epoch counts images (1,281,167 on ImageNet), not store entries.
    """
    indices: np.ndarray   # valid entries of the store (unmirrored ones when ``mirrors`` is given)
    global_batch: int
    seed: int
    rank: int = 0
    world: int = 1
    drop_last: bool = True
    mirrors: np.ndarray | None = None  # per item of ``indices``: its mirrored entry

    @classmethod
    def for_store(cls, store: LatentStore, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                  flip: bool = True):
        """``flip=False``: the images only, never their stored mirrors (the decoder's reference recipe
        crops the images afresh and does not flip)."""
        valid = store.valid_indices()
        flipped = np.asarray(store.flipped[:])
        if not flip:
            return cls(valid[~flipped[valid]], global_batch, seed, rank, world)
        if not flipped[valid].any():
            return cls(valid, global_batch, seed, rank, world)
        source = np.asarray(store.source_index[:])
        plain, mirrored = valid[~flipped[valid]], valid[flipped[valid]]
        mirror_of = np.full(int(source.max()) + 1, -1, dtype=np.int64)
        mirror_of[source[mirrored]] = mirrored
        mirrors = mirror_of[source[plain]]
        mirrors = np.where(mirrors >= 0, mirrors, plain)  # an image without a valid mirror: itself
        return cls(plain, global_batch, seed, rank, world, mirrors=mirrors)

    def __post_init__(self):
        if self.global_batch % self.world:
            raise ArtifactError(f"global batch {self.global_batch} is not divisible by {self.world} processes")
        if len(self.indices) < self.global_batch:
            raise ArtifactError(f"the store has {len(self.indices)} usable entries, fewer than one batch "
                                f"({self.global_batch}); lower --batch-size")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.indices))
        if self.mirrors is None:
            return self.indices[perm]
        flip = rng.random(len(self.indices)) < 0.5
        return np.where(flip, self.mirrors[perm], self.indices[perm])

    def batch(self, step: int) -> np.ndarray:
        """This rank's entries for global ``step`` (0-based, counting across epochs)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        glob = self.order(epoch)[k * self.global_batch: (k + 1) * self.global_batch]
        return glob[rank_slice(self.global_batch, self.rank, self.world)]


class _Steps(torch.utils.data.Dataset):
    """Item ``i`` = the batch of step ``start + i``."""

    def __init__(self, plan: BatchPlan, start: int, stop: int, read):
        self.plan, self.start, self.stop, self.read = plan, start, stop, read

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        step = self.start + i
        return self.read(self.plan.batch(step), epoch=step // self.plan.steps_per_epoch)


class StoreReader:
    """Reads batches of (latents, labels[, images]) from a store; picklable for worker processes.

    ``with_images``: each entry's source image, ADM-center-cropped as it was encoded (mirrored for a
    mirror entry). ``crop_seed`` (with images): instead, the reference's random crop of the source
    (``reference_crop``, drawn from (crop_seed, epoch, source index)), and no latents (an empty
    tensor): the caller encodes the crops itself."""

    def __init__(self, store_path: str | os.PathLike, with_images: bool = False, crop_seed: int | None = None):
        self.path = str(store_path)
        self.with_images = with_images or crop_seed is not None
        self.crop_seed = crop_seed
        self._store = None
        self._labels = None

    def _open(self):
        if self._store is None:
            self._store = LatentStore(self.path)
            self._labels = np.asarray(self._store.labels[:])
            if self.with_images:
                m = read_manifest(self.path, require_complete=False)
                self._root = Path(m["inputs"]["images"]["path"])
                self._files = (Path(self.path) / m["sources_file"]).read_text().splitlines()
                stats = Path(self.path) / m.get("source_stats_file", "-")
                self._stats = np.load(stats) if stats.is_file() else None  # stores before 2026-12 have none
                self._src = np.asarray(self._store.source_index[:])
                self._flip = np.asarray(self._store.flipped[:])
                self._size = int(self._store.attrs["image_size"])
        return self._store

    def __call__(self, idx: np.ndarray, epoch: int = 0):
        store = self._open()
        labels = torch.from_numpy(self._labels[idx])
        if self.crop_seed is not None:
            lat = torch.empty(0)
        else:
            lat = torch.from_numpy(store.read(idx).astype(np.float32))
        if not self.with_images:
            return lat, labels
        imgs = []
        for i in idx:
            crop = self._source_crop(int(self._src[i]), epoch)
            imgs.append(crop[:, ::-1].copy() if self._flip[i] else crop)  # the mirrored entry's image
        images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        return lat, labels, images

    def _source_crop(self, s: int, epoch: int) -> np.ndarray:
        """Source image ``s``, checked against its size and time when encoded (a replaced image would
        train on a mismatched pair), ADM-cropped, or the reference's random crop for ``epoch``."""
        path = self._root / self._files[s]
        expect = tuple(int(v) for v in self._stats[s]) if self._stats is not None else None
        try:
            img = load_rgb(path, expect=expect)
            if self.crop_seed is not None:
                return reference_crop(img, self._size, self.crop_seed, epoch, s)
            return center_crop_arr(img, self._size)
        except BadImage as e:  # it was readable when the store was made (only valid entries are read)
            raise ArtifactError(f"{path} can no longer be read ({e}); restore it, or re-encode the images with "
                                "`rae encode ... --overwrite`") from None


def check_source_images(store: LatentStore, manifest: dict) -> None:
    """Before training on a store's source images: each one the store uses still has the size and
    modification time it had when encoded (one line naming the first that does not). Stores made
    before these were recorded are not checked."""
    stats_file = Path(store.path) / manifest.get("source_stats_file", "-")
    if not stats_file.is_file():
        return
    files = (Path(store.path) / manifest["sources_file"]).read_text().splitlines()
    stats = np.load(stats_file)
    used = np.unique(np.asarray(store.source_index[:])[store.valid_indices()])
    check_sources(Path(manifest["inputs"]["images"]["path"]), [files[i] for i in used], stats[used].tolist(),
                  progress_label="check source images")


def batches(plan: BatchPlan, reader: StoreReader, start_step: int, stop_step: int, num_workers: int = 4,
            pin_memory: bool = False):
    """Iterate this rank's batches for steps [start_step, stop_step), in order, prefetched by workers."""
    ds = _Steps(plan, start_step, stop_step, reader)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
                                         persistent_workers=False)
    return _one_line_errors(loader)


def _one_line_errors(loader):
    """The loader's batches; a user-facing error raised in a worker process (a damaged shard, a
    missing source image) comes out as its own one line, not wrapped in the worker's traceback."""
    try:
        yield from loader
    except RaeError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if len(lines) > 1:  # "Caught ArtifactError in DataLoader worker process 0. ... Original Traceback ..."
            raise type(e)(lines[-1].split(": ", 1)[-1]) from None
        raise

