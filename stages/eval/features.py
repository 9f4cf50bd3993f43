"""One pass of ``rae eval`` over aligned image sets, and what it collects from each.

Under ``torchrun`` each rank takes a round-robin share of the images; feature sums are float64 and
summed across ranks; pool features are gathered (in image order) for precision/recall and KID,
which rank 0 computes.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import dist
from ..artifacts.images import BadImage
from ..errors import ArtifactError
from ..progress import progress
from . import metrics as M
from .inputs import ImageSet
from .nets import SPATIAL_DIM, DINOv2, InceptionV3


class _Items(torch.utils.data.Dataset):
    """Index i -> (i, [image of each set], error message or "")."""

    def __init__(self, sets: list[ImageSet]):
        self.sets = sets

    def __len__(self):
        return len(self.sets[0])

    def __getitem__(self, i):
        out = []
        for s in self.sets:
            try:
                out.append(s[i])
            except BadImage as e:
                return i, None, f"{s.path / s.name(i) if s.files else s.name(i)}: {e}"
        return i, out, ""


class Collector:
    """What one image set yields in a pass: float64 Inception (pool3 and spatial) and DINOv2
    statistics, the pool features (kept with their indices), the Inception Score parts."""

    def __init__(self, n: int, device, inception: InceptionV3 | None = None, dinov2: DINOv2 | None = None,
                 fid_stats: bool = False, keep_pool: bool = False, with_is: bool = False, is_split_size: int = 5000,
                 spatial_stats: bool = False):
        self.inception, self.dinov2 = inception, dinov2
        self.inc_stats = M.FeatureStats(2048, device) if inception is not None and fid_stats else None
        self.sp_stats = M.FeatureStats(SPATIAL_DIM, device) if inception is not None and spatial_stats else None
        self.dino_stats = M.FeatureStats(dinov2.dim, device) if dinov2 is not None else None
        self.is_parts = M.InceptionScoreParts(1008, n, is_split_size, device) if inception is not None and with_is else None
        self.keep_pool = inception is not None and keep_pool
        self.pool_idx, self.pool_rows = [], []
        self.pool = None

    @property
    def busy(self) -> bool:
        return (self.inc_stats is not None or self.sp_stats is not None or self.keep_pool
                or self.is_parts is not None or self.dino_stats is not None)

    def update(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        if self.sp_stats is not None:  # one forward pass gives pool3, logits and the spatial features
            pool, logits, spatial = self.inception(x, spatial=True)
            self.sp_stats.update(spatial)
        elif self.inc_stats is not None or self.keep_pool or self.is_parts is not None:
            pool, logits = self.inception(x)
        if self.inc_stats is not None:
            self.inc_stats.update(pool)
        if self.is_parts is not None:
            self.is_parts.update(logits, idx)
        if self.keep_pool:
            self.pool_idx.append(idx.numpy())
            self.pool_rows.append(pool.float().cpu().numpy())
        if self.dino_stats is not None:
            self.dino_stats.update(self.dinov2(x))

    def finish(self) -> Collector:
        """Sum statistics over ranks; gather pool features in image order (every rank gets them)."""
        for s in (self.inc_stats, self.sp_stats, self.dino_stats, self.is_parts):
            if s is not None:
                s.all_reduce()
        if self.keep_pool:
            idx = np.concatenate(self.pool_idx) if self.pool_idx else np.zeros(0, np.int64)
            rows = np.concatenate(self.pool_rows) if self.pool_rows else np.zeros((0, 2048), np.float32)
            parts = dist.all_gather_object((idx, rows))
            idx = np.concatenate([p[0] for p in parts])
            rows = np.concatenate([p[1] for p in parts])
            self.pool = rows[np.argsort(idx, kind="stable")]
            self.pool_idx = self.pool_rows = []
        return self


class PairSums:
    """PSNR, SSIM and (with an ``lpips`` network) LPIPS summed over matched pairs (float64), summed
    across ranks. LPIPS sees both images in [0, 1] at their size, as the lpips package's
    ``LPIPS(net="vgg")`` does with ``normalize=True``."""

    def __init__(self, device, lpips=None):
        self.lpips = lpips
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # psnr, ssim, lpips, count

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.sums[0] += M.psnr(a, b, 255.0).sum()
        self.sums[1] += M.ssim(a, b, 255.0).sum()
        if self.lpips is not None:
            self.sums[2] += self.lpips(a.float() / 255.0, b.float() / 255.0).double().sum()
        self.sums[3] += a.shape[0]

    def finish(self) -> dict:
        dist.all_reduce_sum(self.sums)
        n = self.sums[3].item()
        out = {"psnr": self.sums[0].item() / n, "ssim": self.sums[1].item() / n}
        if self.lpips is not None:
            out["lpips"] = self.sums[2].item() / n
        return out


def feature_pass(sets: list[ImageSet], collectors: list[Collector], d, batch_size: int, num_workers: int,
                 label: str, pair_sums: PairSums | None = None) -> None:
    """Run every collector over its set, on this rank's round-robin share of the indices."""
    n = len(sets[0])
    mine = dist.shard(list(range(n)), d.rank, d.world)
    batches = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
    workers = num_workers if len(batches) > 1 and all(s.mappable for s in sets) else 0
    loader = torch.utils.data.DataLoader(_Items(sets), batch_sampler=batches, num_workers=workers,
                                         collate_fn=list, prefetch_factor=4 if workers else None)
    shapes = [None] * len(sets)
    with progress(len(mine), label, unit="img") as advance, torch.no_grad():
        for items in loader:
            for _, _, err in items:
                if err:
                    raise ArtifactError(f"cannot read image {err}")
            idx = torch.tensor([it[0] for it in items], dtype=torch.long)
            xs = []
            for k, s in enumerate(sets):
                imgs = [it[1][k] for it in items]
                for i, im in zip(idx.tolist(), imgs):
                    if shapes[k] is None:
                        shapes[k] = (im.shape, s.name(i))
                    elif im.shape != shapes[k][0]:
                        raise ArtifactError(
                            f"images in {s.path} differ in size ({shapes[k][1]}: {shapes[k][0][1]}x{shapes[k][0][0]}, "
                            f"{s.name(i)}: {im.shape[1]}x{im.shape[0]}): crop them to one size first (the ADM center crop)")
                xs.append(torch.from_numpy(np.stack(imgs)).to(d.device).permute(0, 3, 1, 2).contiguous())
            for x, c in zip(xs, collectors):
                if c is not None and c.busy:
                    c.update(x, idx)
            if pair_sums is not None:
                if xs[0].shape != xs[1].shape:
                    raise ArtifactError(f"--pairs: {sets[0].name(idx[0].item())} is {tuple(xs[0].shape[1:])} but "
                                        f"{sets[1].name(idx[0].item())} is {tuple(xs[1].shape[1:])}")
                pair_sums.update(xs[0], xs[1])
            advance(len(items))
