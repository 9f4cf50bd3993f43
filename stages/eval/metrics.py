"""The evaluation metrics as plain maths on features and images: no models, no files.

Definitions follow the ADM evaluation suite (openai/guided-diffusion, ``evaluations/evaluator.py``),
which is what the RAE paper and its baselines report, so that our numbers can sit in the same table:

* FID: Frechet distance between Gaussians fitted to Inception pool3 features (covariance with n - 1).
* Inception Score: softmax of the *unbiased* logits (pool3 @ W, no bias; 1008 classes), KL to the
  marginal, exponentiated, averaged over consecutive splits of 5000 images.
* Precision / recall (Kynkaanniemi et al. 2019, as ADM runs it): a set's manifold is the union of
  balls around its points whose squared radius is the distance to the k = 3rd nearest neighbour;
  squared distances come from ||u||^2 - 2 u.v + ||v||^2 in float16, redone in float32 if that overflows.
* KID: unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, mean over random subsets.
* PSNR / SSIM: per image, then averaged over images.

Statistics that grow with the data (sums for the mean and covariance, Inception Score parts) are
kept in float64 and summed across ranks with ``stages.dist.all_reduce_sum``, so 1 GPU and 64 GPUs
give the same numbers up to float64 rounding.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist

# ----------------------------------------------------------------------------------------------
# Frechet distance


def _symmetric(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return (a + a.T) / 2


def psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (float64, eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(_symmetric(a))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrtm(sigma1 @ sigma2)`` for two covariance matrices, in float64.

    sigma1 @ sigma2 is not symmetric, but with sigma1 = L L^T it is similar to L^T sigma2 L, which
    is symmetric PSD: same eigenvalues, so the trace of the square root is the sum of the square
    roots of that matrix's eigenvalues. When sigma1 is singular (fewer images than feature
    dimensions) Cholesky fails and the symmetric square root s = sigma1^(1/2) from an
    eigen-decomposition takes L's place (s sigma2 s, same eigenvalues). Symmetric eigenvalue
    problems stay accurate where a general ``sqrtm`` of the product needs the ADM suite's retry
    with eps on the diagonal, and Cholesky + eigenvalues only is several times cheaper than
    ``sqrtm`` for 2048 x 2048.
    """
    s1, s2 = _symmetric(sigma1), _symmetric(sigma2)
    try:
        factor = np.linalg.cholesky(s1)
        m = factor.T @ s2 @ factor
    except np.linalg.LinAlgError:
        root = psd_sqrt(s1)
        m = root @ s2 @ root
    w = np.linalg.eigvalsh(_symmetric(m))
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)): FID on Inception pool3
    statistics, FD_DINOv2 on DINOv2 CLS statistics."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)  # >= 0 mathematically; only float64 rounding can go below


class FeatureStats:
    """Running float64 sums of features and of their outer products: mean and covariance of a set
    that is seen in batches, possibly spread over ranks."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._reduced = False

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        f = features.to(self.sum.device, torch.float64).reshape(-1, self.dim)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.n += f.shape[0]

    def all_reduce(self) -> "FeatureStats":
        """Sum over ranks (once). A world of one is left as it is."""
        if self._reduced or not dist.active():
            self._reduced = True
            return self
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device),
                          self.sum, self.outer.flatten()])
        dist.all_reduce_sum(flat)
        self.n = int(round(flat[0].item()))
        self.sum = flat[1:1 + self.dim].clone()
        self.outer = flat[1 + self.dim:].view(self.dim, self.dim).clone()
        self._reduced = True
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (n - 1, as ``np.cov`` in the ADM suite), float64 numpy."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), _symmetric(sigma.cpu().numpy())


# ----------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: torch.Tensor, split_size: int = 5000) -> tuple[float, float]:
    """IS of a whole set of logits in image order, ADM-style: splits of ``split_size`` consecutive
    images, exp(mean KL(p(y|x) || p(y))) per split, then mean (and std) over splits."""
    parts = InceptionScoreParts(logits.shape[1], logits.shape[0], split_size, device=logits.device)
    parts.update(logits, torch.arange(logits.shape[0], device=logits.device))
    return parts.compute()


class InceptionScoreParts:
    """Inception Score accumulated per split from sums, so images can arrive in any order and on
    any rank. For a split s with n images: mean_i KL(p_i || p_bar) = (sum_i sum_y p log p
    - sum_y P_y log(P_y / n)) / n with P = sum_i p_i; both sums add up across batches and ranks."""

    def __init__(self, num_classes: int, num_images: int, split_size: int = 5000, device="cpu"):
        self.split_size = split_size
        splits = max(1, math.ceil(num_images / split_size))
        self.plogp = torch.zeros(splits, dtype=torch.float64, device=device)
        self.p_sum = torch.zeros(splits, num_classes, dtype=torch.float64, device=device)
        self.count = torch.zeros(splits, dtype=torch.float64, device=device)
        self._reduced = False

    @torch.no_grad()
    def update(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """``indices``: each image's position in the whole set (it decides the split)."""
        logp = F.log_softmax(logits.to(self.plogp.device, torch.float64), dim=1)
        p = logp.exp()
        split = indices.to(self.plogp.device, torch.long) // self.split_size
        self.plogp.index_add_(0, split, (p * logp).sum(1))
        self.p_sum.index_add_(0, split, p)
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))

    def all_reduce(self) -> "InceptionScoreParts":
        if self._reduced or not dist.active():
            self._reduced = True
            return self
        s = self.plogp.shape[0]
        flat = dist.all_reduce_sum(torch.cat([self.plogp, self.count, self.p_sum.flatten()]))
        self.plogp, self.count, self.p_sum = flat[:s].clone(), flat[s:2 * s].clone(), flat[2 * s:].view(s, -1).clone()
        self._reduced = True
        return self

    def compute(self) -> tuple[float, float]:
        used = self.count > 0
        count, plogp, p_sum = self.count[used], self.plogp[used], self.p_sum[used]
        kl = (plogp - torch.special.xlogy(p_sum, p_sum / count[:, None]).sum(1)) / count
        scores = kl.exp()
        std = scores.std(unbiased=False).item() if scores.numel() > 1 else 0.0
        return scores.mean().item(), std


# ----------------------------------------------------------------------------------------------
# Precision and recall (ADM's ManifoldEstimator)


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    nu = (u * u).sum(1, keepdim=True)
    nv = (v * v).sum(1)[None]
    return (nu - 2 * (u @ v.T) + nv).clamp_min(0)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Squared Euclidean distances [len(u), len(v)] as float32, computed the way ADM's DistanceBlock
    does: in ``dtype`` (float16 there), and again in float32 if anything overflowed."""
    if dtype != torch.float32:
        d = _sq_distances(u.to(dtype), v.to(dtype))
        if torch.isfinite(d).all():
            return d.float()
    return _sq_distances(u.float(), v.float())


def manifold_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000,
                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour (the point itself counts as
    the 0-th, as in ADM), computed in row x column blocks so memory stays bounded."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, have {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, batch_size):
        rows = features[r0:r0 + batch_size]
        # The k+1 smallest of each column block, then of their union: the same order statistics.
        best = torch.cat([pairwise_sq_distances(rows, features[c0:c0 + batch_size], dtype)
                          .topk(min(k + 1, min(batch_size, n - c0)), dim=1, largest=False).values
                          for c0 in range(0, n, batch_size)], dim=1)
        radii[r0:r0 + batch_size] = best.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def precision_recall(ref_features: torch.Tensor, sample_features: torch.Tensor, k: int = 3,
                     batch_size: int = 10000, dtype: torch.dtype = torch.float16) -> tuple[float, float]:
    """ADM precision and recall: precision = fraction of samples inside the reference manifold,
    recall = fraction of reference points inside the sample manifold."""
    ref, sam = ref_features, sample_features.to(ref_features.device)
    radii_ref = manifold_radii(ref, k, batch_size, dtype)
    radii_sam = manifold_radii(sam, k, batch_size, dtype)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sam_in = torch.zeros(len(sam), dtype=torch.bool, device=ref.device)
    for r0 in range(0, len(ref), batch_size):
        for c0 in range(0, len(sam), batch_size):
            d = pairwise_sq_distances(ref[r0:r0 + batch_size], sam[c0:c0 + batch_size], dtype)
            ref_in[r0:r0 + batch_size] |= (d <= radii_sam[None, c0:c0 + batch_size]).any(1)
            sam_in[c0:c0 + batch_size] |= (d <= radii_ref[r0:r0 + batch_size, None]).any(0)
    return sam_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------------------------
# Kernel Inception Distance


def kernel_inception_distance(x: torch.Tensor, y: torch.Tensor, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with kernel k(a, b) = (a.b / d + 1)^3 over ``num_subsets`` random subsets of
    ``min(subset_size, len(x), len(y))`` points each (seeded, so reruns agree); (mean, std)."""
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 points on each side, have {len(x)} and {len(y)}")
    d = x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        a = x[torch.randperm(len(x), generator=gen)[:m].to(x.device)].double()
        b = y[torch.randperm(len(y), generator=gen)[:m].to(y.device)].double().to(a.device)
        kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        off = m * (m - 1)
        mmd = ((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
               - 2 * kxy.mean())
        values.append(mmd.item())
    v = np.asarray(values)
    return float(v.mean()), float(v.std())


# ----------------------------------------------------------------------------------------------
# PSNR and SSIM
#
# Images are [B, C, H, W] on the [0, 255] scale with data_range=255 (uint8 input is fine); images on
# [0, 1] with data_range=1 give the same numbers: PSNR depends only on MSE / range^2, and SSIM's
# constants C1 = (0.01 L)^2, C2 = (0.03 L)^2 scale with the range exactly like the image moments.


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR in dB (float64). MSE is floored at 1e-10 of range^2, so identical images
    give 100 dB instead of infinity (as the reference implementation does)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    mse = mse.clamp_min(1e-10 * data_range ** 2)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device="cpu") -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), float64: Gaussian window 11 / sigma 1.5, each channel on
    its own, averaged over channels and over the positions where the window fits in the image
    (no padding) — the same as torchmetrics (the reference code's choice) and skimage with
    ``gaussian_weights=True, use_sample_covariance=False``."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    g = gaussian_window(window, sigma, device=a.device)
    gh = g.view(1, 1, 1, -1).expand(c, 1, 1, window)
    gv = g.view(1, 1, -1, 1).expand(c, 1, window, 1)

    def blur(x):  # separable Gaussian filter, valid region only
        return F.conv2d(F.conv2d(x, gh, groups=c), gv, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
