"""Scoring images made in memory against a reference, for a trainer's periodic evaluation
(``train-diffusion --eval-every``): FID (Inception pool3) and the Frechet distance in DINOv2-L space
(FD_DINOv2), or in the RAE encoder's own space with ``fd_encoder``, with `rae eval`'s networks,
weights options and maths. No PNG is written. Under ``torchrun`` every rank scores its share of the
images and the float64 statistics are summed over ranks, so the number does not depend on the
number of processes. The networks are loaded once, and a missing weights file is one line at the
start, not after hours of training."""
from __future__ import annotations

import torch

from ..errors import RaeError
from . import metrics as M
from .features import Collector, PairSums, feature_pass
from .nets import DINOV2_DEFAULT, exact_float32, load_dinov2, load_inception, load_store_encoder
from .refs import RefStats, open_reference

LIVE_METRICS = ("fid", "fd_dinov2")


class LiveScorer:
    def __init__(self, ref: str, metrics: tuple[str, ...], d, inception_weights: str | None = None,
                 dinov2_weights: str | None = None, fd_model: str = DINOV2_DEFAULT, fd_encoder: str | None = None,
                 offline: bool = False, batch_size: int = 64):
        unknown = [m for m in metrics if m not in LIVE_METRICS]
        if unknown or not metrics:
            raise RaeError(f"--eval-metrics must be some of {', '.join(LIVE_METRICS)} (got {', '.join(metrics)})")
        self.d, self.metrics = d, tuple(metrics)
        self.fd_key = "fd_rae" if fd_encoder else ("fd_dinov2" if fd_model == DINOV2_DEFAULT else f"fd_{fd_model}")
        self.inception = load_inception(inception_weights, offline, d.device) if "fid" in metrics else None
        self.dinov2 = None
        if "fd_dinov2" in metrics:
            self.dinov2 = (load_store_encoder(fd_encoder, d.device) if fd_encoder
                           else load_dinov2(fd_model, dinov2_weights, offline, d.device))
        self.ref = self._reference(ref, batch_size)

    def _reference(self, path: str, batch_size: int) -> RefStats:
        """The reference's statistics: given (ADM batch, --save-ref file) or computed once from its images."""
        ref = open_reference(path)
        stats = ref.stats if ref.stats is not None else RefStats()
        need_fid = self.inception is not None and stats.mu is None
        need_fd = self.dinov2 is not None and (stats.dinov2_mu is None or self.fd_key == "fd_rae")
        if need_fid or need_fd:
            if ref.images is None:
                raise RaeError(f"--eval-ref {path} holds no images nor the statistics these metrics need")
            col = Collector(len(ref.images), self.d.device, self.inception if need_fid else None,
                            self.dinov2 if need_fd else None, fid_stats=need_fid)
            with exact_float32():
                feature_pass([ref.images], [col], self.d, batch_size, 0, "eval reference")
            col.finish()
            if need_fid:
                stats.mu, stats.sigma = col.inc_stats.mean_cov()
            if need_fd:
                stats.dinov2_mu, stats.dinov2_sigma = col.dino_stats.mean_cov()
        return stats

    def score(self, batches, n: int) -> dict[str, float]:
        """``batches``: this rank's images, uint8 [B, 3, H, W] on the device, with their indices (a
        tensor [B]) among the ``n`` of all ranks. Returns {"eval/fid": ..., "eval/fd_dinov2": ...}."""
        col = Collector(n, self.d.device, self.inception, self.dinov2, fid_stats=self.inception is not None)
        with exact_float32(), torch.no_grad():
            for x, idx in batches:
                col.update(x, idx)
        col.finish()
        out = {}
        if self.inception is not None:
            mu, sigma = col.inc_stats.mean_cov()
            out["eval/fid"] = float(M.frechet_distance(mu, sigma, self.ref.mu, self.ref.sigma))
        if self.dinov2 is not None:
            mu, sigma = col.dino_stats.mean_cov()
            out[f"eval/{self.fd_key}"] = float(M.frechet_distance(mu, sigma, self.ref.dinov2_mu,
                                                                   self.ref.dinov2_sigma))
        return out


RECON_METRICS = ("fid", "lpips")  # PSNR and SSIM always


class ReconScorer:
    """A decoder's reconstructions of held-out images against the originals, in memory: rFID (the
    originals' Inception statistics computed on the first call and kept), PSNR, SSIM and LPIPS over
    the pairs; every rank scores its share, sums over ranks."""

    def __init__(self, metrics: tuple[str, ...], d, inception_weights: str | None = None, offline: bool = False,
                 lpips=None):
        unknown = [m for m in metrics if m not in RECON_METRICS]
        if unknown:
            raise RaeError(f"--eval-metrics must be some of {', '.join(RECON_METRICS)} (got {', '.join(metrics)})")
        self.d = d
        self.inception = load_inception(inception_weights, offline, d.device) if "fid" in metrics else None
        self.lpips = lpips if "lpips" in metrics else None
        self.ref: tuple | None = None

    def score(self, batches, n: int) -> dict[str, float]:
        """``batches``: this rank's (reconstructions, originals, indices), uint8 [B, 3, H, W] on the device."""
        col = Collector(n, self.d.device, self.inception, None, fid_stats=True) if self.inception is not None else None
        ref_col = (Collector(n, self.d.device, self.inception, None, fid_stats=True)
                   if self.inception is not None and self.ref is None else None)
        pairs = PairSums(self.d.device, self.lpips)
        with exact_float32(), torch.no_grad():
            for recon, original, idx in batches:
                pairs.update(recon, original)
                if col is not None:
                    col.update(recon, idx)
                if ref_col is not None:
                    ref_col.update(original, idx)
        out = {f"eval/{k}": v for k, v in pairs.finish().items()}
        if col is not None:
            col.finish()
            if ref_col is not None:
                self.ref = ref_col.finish().inc_stats.mean_cov()
            mu, sigma = col.inc_stats.mean_cov()
            out["eval/rfid"] = float(M.frechet_distance(mu, sigma, *self.ref))
        return out
