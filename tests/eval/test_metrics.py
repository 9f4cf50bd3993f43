"""stages.eval.metrics: the evaluation maths against closed forms and hand-computed values.

Floating-point comparisons are exact where both sides run the same operations; otherwise the tolerance
comes from the error model written beside it (u64 = 2^-53, u32 = 2^-24, u16 = 2^-11 unit roundoffs;
LAPACK's symmetric eigensolvers are backward stable: each eigenvalue moves by <= ~n u ||A||), so it
holds on any CPU, BLAS kernel, vector instruction set and thread count."""
import math

import numpy as np
import pytest
import torch

from stages.eval import metrics as M

U64, U32, U16 = 2.0**-53, 2.0**-24, 2.0**-11


def _random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ---------------------------------------------------------------- FID


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # Diagonal input: Cholesky, the products and LAPACK's tridiagonal reduction (all Householder vectors
    # zero) leave it diagonal, so the eigenvalues are the a_i b_i up to 2 u64 each; what remains is the
    # order of float64 sums of 16-48 terms: <= 50 u64 * (|mu1 - mu2|^2 + tr a + tr b + 2 sum sqrt(ab)),
    # i.e. < 5e-14 relative to the expected values here (>= 1/6 of that sum).
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # Singular covariances (no Cholesky factor: the eigen square root path) obey the same formula.
    a[:5] = 0.0
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(np.diag(a))
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_matches_closed_form_for_rotated_gaussians_with_shared_axes():
    # Same eigenvectors, non-diagonal covariances: sqrt(S1 S2) = Q sqrt(ab) Q^T.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    a, b = rng.uniform(0.1, 3, 12), rng.uniform(0.1, 3, 12)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu = rng.standard_normal(12)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # float64, eigenvalues of the 12 x 12 product >= 0.01 and ||.|| <= 9: each moves by <= 12 u64 * 9 * c
    # (c: a modest LAPACK constant), its square root by that / (2 * 0.1); summed over 12, plus the traces'
    # cancellation (tr s1 + tr s2 = 39 at 12 u64): < 1e-12, while expected = 2.07.
    assert M.frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-10)


def test_fid_matches_closed_form_for_non_commuting_2x2_covariances():
    # For 2x2 matrices with positive eigenvalues: tr sqrt(P) = sqrt(tr P + 2 sqrt(det P)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    p = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(p) + 2 * math.sqrt(np.linalg.det(p)))
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    # 2 x 2, well conditioned (eigenvalues of s1 s2 in [0.3, 3]), terms <= 5: a few dozen float64
    # roundings of values <= 10 on either side, < 1e-14 relative to expected (= 5.2).
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_fid_agrees_with_scipy_sqrtm_as_the_adm_suite_computes_it():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    # Ill-conditioned like real feature covariances: eigenvalues spread over 8 decades.
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    s1 = q @ np.diag(np.logspace(-6, 2, 64)) @ q.T
    s2 = _random_spd(rng, 64, scale=2.0)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    covmean = linalg.sqrtm(s1 @ s2).real
    adm = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    # Both float64 and backward stable; the eigenvalues of s1 s2 go down to 6e-7 with ||s1 s2|| ~ 500:
    # each moves by ~64 u64 * 500 = 3.5e-12, its square root by <= 3.5e-12 / (2 sqrt(6e-7)) = 2.3e-9;
    # 64 of them on both sides: <= 3e-7, i.e. 6e-10 of the FD (489). rel 1e-9.
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm, rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero_even_with_singular_covariance():
    # 40 points in 64 dimensions: the covariance has rank 39.
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((40, 64)) * 3 + 1)
    st = M.FeatureStats(64)
    st.update(x)
    mu, sigma = st.mean_cov()
    assert np.linalg.matrix_rank(sigma) < 64
    # float64: tr + tr - 2 tr sqrt(root sigma root) cancels to 0 up to the eigenvalue errors of the 25
    # null directions (~64 u64 ||sigma||^2 each, whose square roots count) and of the 39 others:
    # <= 2 * (25 sqrt(64 u64) + 39 * 64 u64) ||sigma|| < 6e-6 ||sigma||. A wrong formula is off by O(tr).
    bound = 2 * (25 * math.sqrt(64 * U64) + 39 * 64 * U64) * np.linalg.norm(sigma, 2)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) <= bound < 1e-4 * np.trace(sigma)


def test_feature_stats_accumulated_in_batches_equal_numpy_mean_and_cov():
    x = np.random.default_rng(4).standard_normal((101, 8)).astype(np.float32) + 5
    st = M.FeatureStats(8)
    for s in range(0, 101, 17):
        st.update(torch.from_numpy(x[s:s + 17]))
    mu, sigma = st.mean_cov()
    assert st.n == 101 and st.sum.dtype == torch.float64
    x64 = x.astype(np.float64)  # exact
    # Sums of 101 positive values (x > 0 here) in some order: relative error <= 102 u64 = 1.1e-14.
    assert x.min() > 0
    np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-13, atol=0)
    # sum(x x^T) - n mu mu^T: each entry is <= 101 products summed (<= 102 u64 * sum_k |x_ki x_kj|) minus
    # n mu_i mu_j (as much again), over n - 1; numpy's centred np.cov is more accurate than that.
    bound = 4 * 102 * U64 * (np.abs(x64).T @ np.abs(x64)) / 100
    assert (np.abs(sigma - np.cov(x64, rowvar=False)) <= bound).all()


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- Inception Score


def _adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """The ADM suite's loop, written out with numpy."""
    z = logits - logits.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_known_values():
    # Uniform predictions: KL = 0, IS = 1. float64: the two sums of 300 terms |p log p| <= 0.23 (total
    # 69) cancel to <= 2 * 300 u64 * 69 = 4.6e-12, divided by n = 30: 1.5e-13 on the KL and on IS.
    assert M.inception_score(torch.zeros(30, 10))[0] == pytest.approx(1.0, abs=1e-12)
    # Confident predictions spread evenly over 10 classes: IS -> 10 (exp(-100) terms aside, far below
    # float64's resolution). KL = log 10 from sums of 10 terms of 23: error <= 20 u64 * 230 / 100.
    logits = torch.full((100, 10), -50.0)
    logits[torch.arange(100), torch.arange(100) % 10] = 50.0
    assert M.inception_score(logits)[0] == pytest.approx(10.0, rel=1e-12)


def test_inception_score_parts_in_any_order_match_adm_splits():
    logits = torch.randn(23, 7, dtype=torch.float64) * 3
    parts = M.InceptionScoreParts(7, 23, split_size=5)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    for chunk in perm.split(4):  # batches arrive shuffled, as from several ranks
        parts.update(logits[chunk], chunk)
    mean, _ = parts.compute()
    # float64 both. Per split of <= 5 images: sums of <= 5 * 7 terms |p log p| (<= log 7 per image)
    # whose difference is the KL: <= 2 * 40 u64 * 5 log 7 / 5 < 2e-14 on each KL, so on each exp(KL)
    # (<= 7) < 2e-13; the numpy loop's own error is of the same order. rel 1e-12.
    assert mean == pytest.approx(_adm_inception_score(logits.numpy(), 5), rel=1e-12)


# ---------------------------------------------------------------- precision / recall


def test_manifold_radii_are_the_kth_neighbour_distance_blocked_or_not():
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((37, 6))).float()
    d = ((x[:, None] - x[None]) ** 2).sum(-1).numpy()
    brute = np.partition(d, 3, axis=1)[:, 3]  # index 0 is the point itself
    full = M.manifold_radii(x, k=3, dtype=torch.float32)
    blocked = M.manifold_radii(x, k=3, batch_size=8, dtype=torch.float32)
    # float32 ||u||^2 - 2 u.v + ||v||^2 over d = 6: each of the three terms is off by <= (d + 1) u32 of
    # its size, the two additions by u32 more: |err| <= (d + 3) u32 (||u|| + ||v||)^2 <= 9 u32 * 4 max||x||^2.
    # The k-th smallest of a row moves by no more than the row's entries do. (The brute force direct
    # differences are closer still: <= (d + 2) u32 * max distance.)
    bound = 9 * U32 * 4 * (x ** 2).sum(1).max().item() + 8 * U32 * brute.max()
    np.testing.assert_allclose(full.numpy(), brute, rtol=0, atol=bound)
    np.testing.assert_allclose(full.numpy(), blocked.numpy(), rtol=0, atol=2 * bound)  # other matmul shapes


# Precision / recall count points inside balls: exact fractions, as long as every distance is on the
# right side of every radius by more than its rounding. Float16 distances (float32 accumulation, then
# three float16 roundings of the terms and two of the sums): |err| <= 5 u16 (||u|| + ||v||)^2.


def test_precision_recall_identical_sets_give_one_and_one():
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    # a point's distance to itself (<= 5 u16 * 4 * 41 = 0.4) is far below every radius (>= 11.6)
    assert 20 * U16 * (x ** 2).sum(1).max() < M.manifold_radii(x).min()
    assert M.precision_recall(x, x.clone()) == (1.0, 1.0)


def test_precision_recall_disjoint_far_sets_give_zero_and_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 16, generator=g)
    y = torch.randn(50, 16, generator=g) + 1000.0  # squared norms overflow float16: the float32 retry must take over
    assert not torch.isfinite(M._sq_distances(x.half(), y.half())).all()
    # distances ~1.6e7 (float32: +-19 u32 * 6.4e7 = +-73) against radii of ~30 (+-73 too)
    assert M.precision_recall(x, y) == (0.0, 0.0)


def test_precision_recall_of_a_subset_has_full_precision_and_partial_recall():
    g = torch.Generator().manual_seed(0)
    ref = torch.cat([torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g) + 20])
    samples = ref[:40]  # only the first of the two clusters
    precision, recall = M.precision_recall(ref, samples, batch_size=32)
    # Each sample is a reference point (distance <= 5 u16 * 4 * 30 = 0.3 to itself, radii >= 2.5); the
    # second cluster is >= 2850 away from the first (float16 error <= 5 u16 * 4 * 3600 = 35), radii <= 20:
    # exactly the first 40 of the 80 reference points are covered.
    assert precision == 1.0
    assert recall == 0.5


# ---------------------------------------------------------------- KID


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 32, generator=g), torch.randn(300, 32, generator=g)
    same, _ = M.kernel_inception_distance(x, y, num_subsets=20, subset_size=100)
    diff, _ = M.kernel_inception_distance(x, y + 1.0, num_subsets=20, subset_size=100)
    # Seeded: same = 0.0059 (the standard error of a mean of 20 subsets, 0.017 / sqrt(20) = 0.004, is
    # what makes it non-zero) and diff = 7.25, fixed numbers up to the last bits of the normal draws
    # on another CPU (a relative 1e-7 change at most).
    assert abs(same) < 0.01 < diff
    assert M.kernel_inception_distance(x, y, 5, 50, seed=3) == M.kernel_inception_distance(x, y, 5, 50, seed=3)


def test_kid_unbiased_estimator_matches_a_direct_double_loop():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    k = lambda a, b: (a @ b / 4 + 1) ** 3  # noqa: E731
    m = 5
    # With one subset of size min(6, 5, 1000) = 5 and seed 0, the subsets are reproducible.
    gen = torch.Generator().manual_seed(0)
    xs = x[torch.randperm(6, generator=gen)[:m]]
    ys = y[torch.randperm(5, generator=gen)[:m]]
    xx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m)) / (m * m)
    value, _ = M.kernel_inception_distance(x, y, num_subsets=1, subset_size=1000, seed=0)
    # float64: each kernel value carries <= 8 u64 of itself (a 4-term dot product, /d, +1, cube), each
    # mean of <= 25 of them 25 u64 more; the three means' errors add up against the sum of their sizes.
    k_abs = lambda a, b: (a @ b.T / 4 + 1).abs() ** 3  # noqa: E731
    size = (k_abs(xs, xs).mean() + k_abs(ys, ys).mean() + 2 * k_abs(xs, ys).mean()).item() * m / (m - 1)
    assert value == pytest.approx((xx + yy - 2 * xy).item(), rel=0, abs=2 * 40 * U64 * size)


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_hand_computed_values():
    a = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    b = torch.full((1, 3, 16, 16), 110, dtype=torch.uint8)  # MSE 100
    # The MSE of integer images is exact in float64 (integer sums < 2^53, one correctly rounded
    # division); then one division and log10 (within 1 ulp in libm and SLEEF) on either side: rel 1e-14.
    assert M.psnr(a, b).item() == pytest.approx(10 * math.log10(255 ** 2 / 100), rel=1e-14)
    sign = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2 - 1
    c = (128 + 5 * sign).to(torch.uint8).expand(1, 3, 16, 16)  # +-5 noise: MSE 25
    assert M.psnr(torch.full_like(c, 128), c).item() == pytest.approx(10 * math.log10(255 ** 2 / 25), rel=1e-14)
    # identical: capped, as the reference code does (10 log10(1e10), a few ulps)
    assert M.psnr(a, a).item() == pytest.approx(100.0, rel=1e-14)
    # [0, 1] images with data_range 1 give the same number: the division by 255 makes the differences
    # inexact (2 u64), the mean of 768 equal squares <= 768 u64 = 8.5e-14 relative, which moves the
    # PSNR (~28 dB) by 10 / ln 10 * 8.5e-14 = 4e-13 dB: rel 1e-13.
    assert M.psnr(a.double() / 255, b.double() / 255, data_range=1.0).item() == pytest.approx(
        M.psnr(a, b).item(), rel=1e-13)


def test_ssim_hand_computed_values():
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    # a == b: numerator and denominator are the same float64 products up to mu^2 vs mu*mu and
    # var + var vs 2 cov (<= 1 ulp each): every window's ratio is 1 within 8 u64, so is the mean.
    np.testing.assert_allclose(M.ssim(x, x).numpy(), 1.0, rtol=1e-14, atol=0)
    # Constant images: no variance, SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1). float64: the blurred
    # moments (two 11-tap passes) are within 22 u64 of themselves, so the variances and the covariance
    # (1e4 - 1e4) are 0 within 66 u64 * 1.2e4 = 9e-11 each: against C2 = 58.5 that is <= 6e-12 relative.
    a, b = torch.full((1, 3, 20, 20), 100.0), torch.full((1, 3, 20, 20), 110.0)
    C1 = (0.01 * 255) ** 2
    assert M.ssim(a, b).item() == pytest.approx((2 * 100 * 110 + C1) / (100 ** 2 + 110 ** 2 + C1), rel=1e-11)
    # Scale invariance: [0, 255] with range 255 == [0, 1] with range 1. float64, on the [0, 255] scale:
    # blurred means are within 22 u64 of themselves, so the products of means within 45 u64 (relative:
    # harmless against C1 = 6.5), variances and covariance (blur(ab) - mu_a mu_b) within
    # 67 u64 * 255^2 = 5e-10 absolute, which moves each window's SSIM by <= 2 * 2 * 5e-10 / C2 (58.5)
    # = 3.4e-11; the mean over windows keeps that. Both sides: abs 1e-10.
    y = (x.double() + 20 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255)
    assert M.ssim(x.double() / 255, y / 255, data_range=1.0).numpy() == pytest.approx(M.ssim(x, y).numpy(),
                                                                                          rel=0, abs=1e-10)
    assert (M.ssim(x, y) < 1).all()


def test_ssim_window_is_a_normalised_gaussian_of_size_11():
    g = M.gaussian_window()
    # float64: normalised by its own sum of 11 terms, which sums back to 1 within ~24 u64
    assert g.shape == (11,) and g.sum().item() == pytest.approx(1.0, rel=0, abs=1e-14) and g.argmax().item() == 5
    # exp of -1/4.5 (libm or SLEEF, within 1 ulp) and 2 divisions on either side: rel 1e-14
    assert (g[6] / g[5]).item() == pytest.approx(math.exp(-1 / (2 * 1.5 ** 2)), rel=1e-14)
