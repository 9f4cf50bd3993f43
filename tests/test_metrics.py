"""stages.metrics: the evaluation maths against closed forms and hand-computed values."""
import math

import numpy as np
import pytest
import torch

from stages import metrics as M


def _random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ---------------------------------------------------------------- FID


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
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
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm, rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero_even_with_singular_covariance():
    # 40 points in 64 dimensions: the covariance has rank 39.
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((40, 64)) * 3 + 1)
    st = M.FeatureStats(64)
    st.update(x)
    mu, sigma = st.mean_cov()
    assert np.linalg.matrix_rank(sigma) < 64
    assert M.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8 * np.trace(sigma))


def test_feature_stats_accumulated_in_batches_equal_numpy_mean_and_cov():
    x = np.random.default_rng(4).standard_normal((101, 8)).astype(np.float32) + 5
    st = M.FeatureStats(8)
    for s in range(0, 101, 17):
        st.update(torch.from_numpy(x[s:s + 17]))
    mu, sigma = st.mean_cov()
    assert st.n == 101 and st.sum.dtype == torch.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


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
    assert M.inception_score(torch.zeros(30, 10))[0] == pytest.approx(1.0, abs=1e-12)
    # Confident predictions spread evenly over 10 classes: IS -> 10.
    logits = torch.full((100, 10), -50.0)
    logits[torch.arange(100), torch.arange(100) % 10] = 50.0
    assert M.inception_score(logits)[0] == pytest.approx(10.0, rel=1e-9)


def test_inception_score_parts_in_any_order_match_adm_splits():
    logits = torch.randn(23, 7, dtype=torch.float64) * 3
    parts = M.InceptionScoreParts(7, 23, split_size=5)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    for chunk in perm.split(4):  # batches arrive shuffled, as from several ranks
        parts.update(logits[chunk], chunk)
    mean, _ = parts.compute()
    assert mean == pytest.approx(_adm_inception_score(logits.numpy(), 5), rel=1e-10)


# ---------------------------------------------------------------- precision / recall


def test_manifold_radii_are_the_kth_neighbour_distance_blocked_or_not():
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((37, 6))).float()
    d = ((x[:, None] - x[None]) ** 2).sum(-1).numpy()
    brute = np.partition(d, 3, axis=1)[:, 3]  # index 0 is the point itself
    full = M.manifold_radii(x, k=3, dtype=torch.float32)
    blocked = M.manifold_radii(x, k=3, batch_size=8, dtype=torch.float32)
    np.testing.assert_allclose(full.numpy(), brute, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(full.numpy(), blocked.numpy(), rtol=1e-6)  # same up to matmul rounding


def test_precision_recall_identical_sets_give_one_and_one():
    x = torch.randn(60, 16)
    assert M.precision_recall(x, x.clone()) == (1.0, 1.0)


def test_precision_recall_disjoint_far_sets_give_zero_and_zero():
    x = torch.randn(50, 16)
    y = torch.randn(50, 16) + 1000.0  # squared norms overflow float16: the float32 retry must take over
    assert not torch.isfinite(M._sq_distances(x.half(), y.half())).all()
    assert M.precision_recall(x, y) == (0.0, 0.0)


def test_precision_recall_of_a_subset_has_full_precision_and_partial_recall():
    g = torch.Generator().manual_seed(0)
    ref = torch.cat([torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g) + 20])
    samples = ref[:40]  # only the first of the two clusters
    precision, recall = M.precision_recall(ref, samples, batch_size=32)
    assert precision == 1.0
    assert recall == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------- KID


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 32, generator=g), torch.randn(300, 32, generator=g)
    same, _ = M.kernel_inception_distance(x, y, num_subsets=20, subset_size=100)
    diff, _ = M.kernel_inception_distance(x, y + 1.0, num_subsets=20, subset_size=100)
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
    assert value == pytest.approx((xx + yy - 2 * xy).item(), rel=1e-10)


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_hand_computed_values():
    a = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    b = torch.full((1, 3, 16, 16), 110, dtype=torch.uint8)  # MSE 100
    assert M.psnr(a, b).item() == pytest.approx(10 * math.log10(255 ** 2 / 100), rel=1e-12)
    sign = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2 - 1
    c = (128 + 5 * sign).to(torch.uint8).expand(1, 3, 16, 16)  # +-5 noise: MSE 25
    assert M.psnr(torch.full_like(c, 128), c).item() == pytest.approx(10 * math.log10(255 ** 2 / 25), rel=1e-12)
    assert M.psnr(a, a).item() == pytest.approx(100.0)  # identical: capped, as the reference code does
    # [0, 1] images with data_range 1 give the same number.
    assert M.psnr(a.double() / 255, b.double() / 255, data_range=1.0).item() == pytest.approx(M.psnr(a, b).item(), rel=1e-12)


def test_ssim_hand_computed_values():
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    np.testing.assert_allclose(M.ssim(x, x).numpy(), 1.0, rtol=1e-12)
    # Constant images: no variance, SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1).
    a, b = torch.full((1, 3, 20, 20), 100.0), torch.full((1, 3, 20, 20), 110.0)
    C1 = (0.01 * 255) ** 2
    assert M.ssim(a, b).item() == pytest.approx((2 * 100 * 110 + C1) / (100 ** 2 + 110 ** 2 + C1), rel=1e-12)
    # Scale invariance: [0, 255] with range 255 == [0, 1] with range 1.
    y = (x.double() + 20 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255)
    assert M.ssim(x.double() / 255, y / 255, data_range=1.0).numpy() == pytest.approx(M.ssim(x, y).numpy(), rel=1e-10)
    assert (M.ssim(x, y) < 1).all()


def test_ssim_window_is_a_normalised_gaussian_of_size_11():
    g = M.gaussian_window()
    assert g.shape == (11,) and g.sum().item() == pytest.approx(1.0) and g.argmax().item() == 5
    assert (g[6] / g[5]).item() == pytest.approx(math.exp(-1 / (2 * 1.5 ** 2)))
