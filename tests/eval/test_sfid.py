"""sFID in `rae eval`: ADM's spatial Inception features, their statistics and the Frechet distance.

ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) takes "mixed_6/conv:0" from the
TF Inception graph in the pass that gives pool_3, keeps ``spatial[..., :7]`` of the [N, 17, 17, 192]
NHWC map and flattens it per image (2,023 dims); sFID is the Frechet distance of those features'
mean/covariance (np.cov, n - 1) between samples and reference. mixed_6 is torchvision's / torch-fidelity's
Mixed_6d (mixed, mixed_1, mixed_2 = Mixed_5b-d, mixed_3 = 6a, mixed_4..7 = 6b-e), "conv" its 1x1 branch
(``branch1x1``: conv, batch norm, ReLU).

The network is torch-fidelity's InceptionV3 with random weights, written to a temporary torch hub cache
(the ``torch_home`` fixture of tests/eval/conftest.py) and loaded through the real loading path. The
covariances of 2 images are rank-1 2,023 x 2,023 matrices, for which one Frechet distance costs ~5 s of
eigendecompositions on one core: each distinct set of statistics is evaluated once (the spy on
``frechet_distance`` computes it for new inputs only; it is a deterministic function of them, and the
tests compare the inputs themselves bit for bit).

Floating-point comparisons are exact where both sides run the same operations on the same inputs;
otherwise the tolerance comes from the error model written beside it (u64 = 2^-53), so it holds on any
CPU, BLAS/LAPACK kernel, vector instruction set and thread count.
"""
import hashlib
import inspect

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import stages.eval.evaluate as E
from stages.eval import metrics as M
from stages.errors import ArtifactError, RaeError
from stages.eval.nets import adm_spatial, load_inception
from stages.eval.refs import RefStats, open_reference, save_ref_stats
from tests.helpers import smooth_images, write_folder

U64 = 2.0**-53
D = 17 * 17 * 7  # 2,023


# ---------------------------------------------------------------- runs, spied on


class _Runs:
    """`rae eval` runs with sFID over two small folders, A and B (2 images each, B brighter), each made
    once (on first use) and kept with what the spies saw: the spatial features accumulated into the
    2,023-dim statistics, the Mixed_6c outputs (the input of Mixed_6d), the frechet_distance calls."""

    def __init__(self, root, net):
        self.root, self.net = root, net
        self.A, self.B = smooth_images(2, 48, seed=0), smooth_images(2, 48, seed=1, brightness=60)
        self.a, self.b = write_folder(root / "a", self.A), write_folder(root / "b", self.B)
        self.rec = None
        self.fd_cache = {}
        self._done = {}

    def _run(self, images, ref, **kw):
        self.rec = {"spatial": [], "mixed_6c": [], "fd": []}
        cfg = E.EvalConfig(images=str(images), ref=str(ref), metrics=("sfid",), offline=True, num_workers=0,
                           device="cpu", batch_size=1, out=str(self.root / f"eval{len(self._done)}.json"), **kw)
        result = E.run(cfg)
        rec, self.rec = self.rec, None
        return result, rec

    def get(self, name):
        if name not in self._done:
            if name == "same_b":  # identical sample and reference sets; B's statistics saved
                self._done[name] = self._run(self.b, self.b, save_ref=str(self.root / "b_stats.npz"))
            elif name == "a_vs_b":  # reference given as images
                self._done[name] = self._run(self.a, self.b)
            elif name == "a_vs_b_stats":  # the same reference given as its --save-ref statistics
                self.get("same_b")
                self._done[name] = self._run(self.a, self.root / "b_stats.npz")
            elif name == "b_vs_adm":  # an ADM batch: A's images, but B's mu_s/sigma_s
                self.get("same_b")
                with np.load(self.root / "b_stats.npz") as z:
                    np.savez(self.root / "VIRTUAL_ab.npz", arr_0=self.A, mu=z["mu"], sigma=z["sigma"],
                             mu_s=z["mu_s"], sigma_s=z["sigma_s"])
                self._done[name] = self._run(self.b, self.root / "VIRTUAL_ab.npz")
        return self._done[name]


@pytest.fixture(scope="module")
def runs(torch_home, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        net = load_inception(offline=True)  # from the hub cache, as torch-fidelity would find it
        r = _Runs(tmp_path_factory.mktemp("sfid"), net)
        mp.setattr(E, "load_inception", lambda *a, **k: net)  # read the 95 MB file once, not per run

        real_update, real_fd = M.FeatureStats.update, M.frechet_distance

        def update(stats, features):
            if stats.dim == D and r.rec is not None:
                r.rec["spatial"].append(features.detach().clone())
            return real_update(stats, features)

        def frechet_distance(*args):
            args = tuple(np.array(a, dtype=np.float64) for a in args)
            key = hashlib.sha256(b"".join(a.tobytes() + str(a.shape).encode() for a in args)).hexdigest()
            if key not in r.fd_cache:
                r.fd_cache[key] = real_fd(*args)
            r.rec["fd"].append((args, r.fd_cache[key]))
            return r.fd_cache[key]

        mp.setattr(M.FeatureStats, "update", update)
        mp.setattr(M, "frechet_distance", frechet_distance)
        hook = net.net.Mixed_6c.register_forward_hook(
            lambda m, i, out: r.rec["mixed_6c"].append(out.detach().clone()) if r.rec is not None else None)
        try:
            yield r
        finally:
            hook.remove()


def _independent_spatial(net, mixed_6c: torch.Tensor) -> torch.Tensor:
    """Mixed_6d's 1x1 branch computed here from its input with the module's own parameters (conv, batch
    norm in inference, ReLU), then ADM's slicing: NHWC, [..., :7], flattened per image."""
    b = net.net.Mixed_6d.branch1x1
    pre = F.batch_norm(F.conv2d(mixed_6c, b.conv.weight), b.bn.running_mean, b.bn.running_var, b.bn.weight,
                       b.bn.bias, training=False, eps=b.bn.eps)
    assert pre.shape[1:] == (192, 17, 17) and b.bn.eps == 0.001  # TF's batch norm epsilon
    assert (pre < 0).any()  # so that the ReLU below is tested, not vacuous
    nhwc = F.relu(pre).permute(0, 2, 3, 1)
    return nhwc[..., :7].reshape(len(nhwc), -1)


# ---------------------------------------------------------------- error models


def _stats_bounds(x: np.ndarray):
    """float64 mean and covariance of float32 features x [n, d] (exact in float64), and entrywise bounds
    on how far the one-pass sums of stages.eval.metrics.FeatureStats (sum x, sum x x^T - n mu mu^T) can be from
    np.mean / np.cov (two-pass, centred). Each side sums n terms (<= (n + 1) u64 relative to the sum of
    the terms' absolute values) and rounds a few more times: P = |x|^T |x| bounds the products, Q =
    (sum |x|)(sum |x|)^T / n bounds n |mu mu^T| and with P the centred products (<= P + 3Q); both sides
    together, with slack for the second-order terms: 4 (n + 4) u64 (P + 3Q) / (n - 1)."""
    n = len(x)
    mu, cov = x.mean(0), np.cov(x, rowvar=False)  # ADM: np.mean(axis=0), np.cov(rowvar=False): ddof 1
    s = np.abs(x).sum(0)
    p, q = np.abs(x).T @ np.abs(x), np.outer(s, s) / n
    return mu, cov, 2 * (n + 2) * U64 * s / n, 4 * (n + 4) * U64 * (p + 3 * q) / (n - 1)


def _trace_sqrt(x1: np.ndarray, x2: np.ndarray) -> tuple[float, float]:
    """tr sqrtm(sigma1 sigma2) of np.cov(x1), np.cov(x2), with scipy.linalg.sqrtm as ADM, on a small matrix
    with the same nonzero eigenvalues (sqrtm of the rank-deficient 2,023 x 2,023 product, what ADM calls
    once 50,000 images make it full rank, takes ~30 s here and is inaccurate at its 2,021 null eigenvalues).

    With H an orthonormal basis of the vectors orthogonal to (1, ..., 1), Y = H^T x / sqrt(n - 1) has
    Y^T Y = np.cov(x); the nonzero eigenvalues of sigma1 sigma2 = Y1^T (Y1 Y2^T Y2) are those of
    (Y1 Y2^T Y2) Y1^T = G G^T, G = Y1 Y2^T, and of G^T G: the smaller one is positive definite.
    Returns the trace and the error bound of this computation: the entries of G carry <= (d + 2n) u64
    |Y1| |Y2|^T, K's <= 3 (d + 2n) u64 ||Y1||_F^2 ||Y2||_F^2 in norm, and sqrt moves each eigenvalue's
    error by at most 1 / (2 sqrt(lambda_min)) of it."""
    def y(x):
        h = scipy.linalg.null_space(np.ones((1, len(x))))
        out = h.T @ x / np.sqrt(len(x) - 1)
        # Y^T Y is np.cov(x): both sum n products of values each <= ||x||_F in size, with <= (n + 4) u64
        # relative roundings (as in _stats_bounds), plus n u64 from H^T x: within 8 (n + 4) n u64 ||x||_F^2.
        n = len(x)
        assert np.allclose(out.T @ out, np.cov(x, rowvar=False), rtol=0,
                           atol=8 * (n + 4) * n * U64 * (x ** 2).sum() / (n - 1))
        return out

    y1, y2 = y(x1), y(x2)
    g = y1 @ y2.T
    k = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    lam = np.linalg.eigvalsh(k)
    assert lam.min() > 0
    err = 3 * (x1.shape[1] + 2 * (len(x1) + len(x2))) * U64 * (y1 ** 2).sum() * (y2 ** 2).sum()
    # ... plus sqrtm's own rounding, a few u64 of ||sqrtm(K)|| per diagonal entry.
    bound = len(k) * err / (2 * np.sqrt(lam.min())) + 4 * len(k) * U64 * np.sqrt(lam.max())
    return float(np.trace(scipy.linalg.sqrtm(k)).real), bound


def _fd_error(s1, s2, e1, e2, dmu, emu) -> float:
    """How far stages.eval.metrics.frechet_distance(mu1, s1 + delta1, mu2, s2 + delta2) computed in float64
    can be from the exact distance of (mu1, s1, mu2, s2), |delta_i| <= e_i entrywise, |delta mu| <= emu.
    With rank-deficient covariances the trace of the square root is only Hoelder-continuous:
    * ||delta_i||_2 <= ||e_i||_F; LAPACK's eigh/eigvalsh are backward stable with error <= d u64 ||.||
      (p(d) = d taken for LAPACK's "modestly growing" constant; x4 for the products around them);
    * sigma1's root (eigenvalues clipped at 0) is that of a PSD matrix within 2 (||delta1|| + 4 d u64 S)
      of s1, S >= ||s_i||_2 (S = the larger trace); the operator-monotone square root moves by at most
      the square root of that in 2-norm, d times that in trace norm, times ||s2^(1/2)|| = sqrt(S);
    * delta2 moves each eigenvalue of root s2 root by <= S ||delta2||, and eigvalsh each by <= 4 d u64 S^2;
      sqrt moves a value by at most the square root of its change: d sqrt(S ||e2||) + d sqrt(4 d u64) S;
    * FD = ||dmu||^2 + tr s1 + tr s2 - 2 tr(...): the traces by their e_i diagonals and d u64 rounding,
      ||dmu||^2 by 2 ||dmu|| ||emu|| + d u64 ||dmu||^2."""
    d = len(s1)
    big = max(np.trace(s1), np.trace(s2))
    ne1, ne2 = np.linalg.norm(e1), np.linalg.norm(e2)
    t = d * (np.sqrt(2 * big * (ne1 + 4 * d * U64 * big)) + np.sqrt(big * ne2) + np.sqrt(4 * d * U64) * big)
    rest = np.trace(e1) + np.trace(e2) + 2 * np.linalg.norm(dmu) * np.linalg.norm(emu) \
        + 4 * d * U64 * (dmu @ dmu + np.trace(s1) + np.trace(s2))
    return float(2 * t + rest)


# ---------------------------------------------------------------- tests


def test_spatial_features_are_mixed_6d_branch1x1_nhwc_first_7_channels(runs):
    b1 = runs.net.net.state_dict()["Mixed_6d.branch1x1.conv.weight"]  # torch-fidelity's name for mixed_6/conv
    assert b1.shape == (192, 768, 1, 1)  # 1x1 conv, 768 -> 192 channels at 17x17
    result, rec = runs.get("a_vs_b")
    # One forward per batch gives them (batches of one image, so that the statistics add up over batches:
    # A's two, then B's two): 4 passes through Mixed_6c, 4 batches of spatial features.
    assert len(rec["mixed_6c"]) == len(rec["spatial"]) == 4
    assert [len(f) for f in rec["spatial"]] == [1, 1, 1, 1]
    for got, m6c in zip(rec["spatial"], rec["mixed_6c"]):
        assert got.shape == (len(m6c), D) and got.dtype == torch.float32
        # The same conv and batch-norm calls on the same input and weights: bit for bit.
        assert torch.equal(got, _independent_spatial(runs.net, m6c))
    feats = torch.cat(rec["spatial"])
    assert feats.min() == 0 and feats.max() > 0  # post-ReLU, not all zero
    # NHWC order: feature (r * 17 + c) * 7 + k is channel k at row r, column c.
    one = torch.arange(192 * 17 * 17, dtype=torch.float32).reshape(1, 192, 17, 17)
    flat = adm_spatial(one)[0]
    assert flat.shape == (D,) and flat[(5 * 17 + 3) * 7 + 6] == one[0, 6, 5, 3] and flat[7] == one[0, 0, 0, 1]
    assert result["protocol"]["sfid_features"].startswith("Inception mixed_6/conv (Mixed_6d.branch1x1")


def test_sfid_equals_an_independent_float64_computation(runs):
    result, rec = runs.get("a_vs_b")
    feats = torch.cat(rec["spatial"]).double().numpy()
    xa, xb = feats[:2], feats[2:]
    assert np.array_equal(xa, torch.cat([_independent_spatial(runs.net, m) for m in rec["mixed_6c"][:2]]).numpy())
    (mu1, s1, mu2, s2), value = rec["fd"][0]
    assert len(rec["fd"]) == 1 and result["metrics"] == {"sfid": value} and result["skipped"] == {}
    assert result["sfid_reference"] == "computed from the reference images"
    # The statistics handed to the Frechet distance: A's (sample) and B's (reference), against np.mean /
    # np.cov (ddof 1) within the bounds of _stats_bounds.
    ma, ca, ema, eca = _stats_bounds(xa)
    mb, cb, emb, ecb = _stats_bounds(xb)
    for got, want, bound in ((mu1, ma, ema), (s1, ca, eca), (mu2, mb, emb), (s2, cb, ecb)):
        assert got.shape == want.shape and (np.abs(got - want) <= bound).all()
    # The value against ADM's formula on np.mean / np.cov, the trace of the square root from scipy's sqrtm:
    # within the implementation's error (_fd_error, inputs off by the bounds above) plus the reference's.
    tr, tr_err = _trace_sqrt(xa, xb)
    dmu = ma - mb
    want = dmu @ dmu + np.trace(ca) + np.trace(cb) - 2 * tr
    tol = (_fd_error(ca, cb, eca, ecb, dmu, ema + emb) + 2 * tr_err  # + the rounding of `want`'s sum:
           + 4 * D * U64 * (dmu @ dmu + np.trace(ca) + np.trace(cb)))
    assert abs(value - want) <= tol, (value, want, tol)
    assert tol < 1e-2 * want  # (7.124 here, agreeing to 3.5e-8 relative; the worst case allows 2.9e-3)


def test_sfid_is_zero_for_identical_sets_and_positive_for_different_ones(runs):
    same, rec = runs.get("same_b")
    (mu1, s1, mu2, s2), value = rec["fd"][0]
    # B in the sample pass and in the reference pass: the same features (same pixels, batches, kernels),
    # hence bit-identical statistics, whose distance is 0 up to _fd_error with no input error.
    assert np.array_equal(mu1, mu2) and np.array_equal(s1, s2)
    zero_tol = _fd_error(s1, s2, 0 * s1, 0 * s2, 0 * mu1, 0 * mu1)
    assert 0 <= same["metrics"]["sfid"] == value <= zero_tol  # (0.0 here: the rounding went below 0, clipped)
    # A against B: 7.12 here, the value checked against the independent computation above (to within
    # 2.9e-3 relative at worst), far above the bound of a zero (0.019 here).
    diff, _ = runs.get("a_vs_b")
    assert diff["metrics"]["sfid"] > 10 * zero_tol


def test_reference_statistics_are_used_as_given_and_match_the_images(runs):
    # A reference given as --save-ref statistics of B: the same inputs to the distance as B's images.
    img, rec_img = runs.get("a_vs_b")
    st, rec_st = runs.get("a_vs_b_stats")
    with np.load(runs.root / "b_stats.npz") as z:  # ADM's key names
        mu_s, sigma_s = z["mu_s"], z["sigma_s"]
    assert mu_s.shape == (D,) and sigma_s.shape == (D, D) and mu_s.dtype == np.float64
    for x, y in zip(rec_img["fd"][0][0], rec_st["fd"][0][0]):
        # A's statistics recomputed; B's from its images here and from the saving run's file: bit for bit
        assert np.array_equal(x, y)
    assert np.array_equal(rec_st["fd"][0][0][2], mu_s) and np.array_equal(rec_st["fd"][0][0][3], sigma_s)
    assert st["metrics"]["sfid"] == img["metrics"]["sfid"]
    assert st["sfid_reference"] == "precomputed mu_s/sigma_s of the reference" and len(rec_st["spatial"]) == 2

    # An ADM batch carrying A's images and B's mu_s/sigma_s, for sample B: its mu_s/sigma_s are the
    # reference (sFID ~0, as B against B), its images are not even read; as a reference they would give
    # sFID >= ||mu_B - mu_A||^2 (A's mean as seen in the first run), far from 0.
    adm, rec_adm = runs.get("b_vs_adm")
    same, rec_same = runs.get("same_b")
    (mu1, s1, mu2, s2), value = rec_adm["fd"][0]
    assert np.array_equal(mu2, mu_s) and np.array_equal(s2, sigma_s)
    assert adm["reference"]["kind"] == "adm-ref-batch" and adm["sfid_reference"].startswith("precomputed")
    assert len(rec_adm["spatial"]) == len(rec_adm["mixed_6c"]) == 2  # B only: no reference pass
    assert adm["metrics"]["sfid"] == same["metrics"]["sfid"]  # the same inputs as B vs B (checked there)
    mu_a = rec_img["fd"][0][0][0]
    assert (mu_s - mu_a) @ (mu_s - mu_a) > 1.0 > 1e3 * adm["metrics"]["sfid"]


def test_skips_and_bad_spatial_statistics_are_one_line_errors(tmp_path):
    images = write_folder(tmp_path / "i", smooth_images(2, 16, seed=3))
    base = dict(metrics=("sfid",), offline=True, num_workers=0, device="cpu")
    # No spatial statistics in the reference file, or no reference: nothing else asked for, nothing to do.
    save_ref_stats(tmp_path / "fid_only.npz", RefStats(mu=np.zeros(3), sigma=np.eye(3)))
    with pytest.raises(RaeError, match="sfid: .* holds no Inception spatial statistics"):
        E.run(E.EvalConfig(images=str(images), ref=str(tmp_path / "fid_only.npz"), **base))
    with pytest.raises(RaeError, match=r"sfid: needs a reference \(--ref\)"):
        E.run(E.EvalConfig(images=str(images), **base))
    # mu_s/sigma_s must be ADM's 2,023-dim statistics, in pairs.
    arr = smooth_images(2, 16, seed=4)
    np.savez(tmp_path / "bad.npz", arr_0=arr, mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(5), sigma_s=np.eye(5))
    with pytest.raises(ArtifactError, match="not ADM's spatial statistics"):
        open_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "half.npz", mu_s=np.zeros(D))
    with pytest.raises(ArtifactError, match="only one of mu_s and sigma_s"):
        open_reference(tmp_path / "half.npz")


def test_cli_reports_sfid_by_default_and_prints_it(capsys):
    from rich.console import Console

    from rae_cli.eval_cmd import print_result, report_eval

    default = inspect.signature(report_eval).parameters["metrics"].default.default
    assert default.split(",")[:2] == ["fid", "sfid"] and set(default.split(",")) == set(E.METRICS)
    console = Console(width=100)
    print_result({"num_images": 4, "metrics": {"fid": 1.5, "sfid": 2.25}, "skipped": {}}, console)
    out = capsys.readouterr().out
    assert "FID" in out and "sFID" in out and "2.2500" in out
