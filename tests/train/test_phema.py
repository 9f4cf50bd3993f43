"""Post-hoc EMA (`train-diffusion --phema`, `rae ema`): the power-function profiles, their tracking, the
least-squares reconstruction of one profile from the snapshots of others, and the commands."""
import numpy as np
import pytest
import torch

from stages.artifacts.checkpoint import load_weights
from stages.artifacts.manifest import read_manifest
from stages.artifacts.runs import load_diffusion_run, phema_snapshot_path, phema_snapshots
from stages.train import phema as P
from tests.helpers import DIFFUSION_ARGS, ENCODE_ARGS, SAMPLE_ARGS, run_rae


def test_exponents_are_edm2s_and_the_update_unrolls_to_the_profile():
    # EDM2's pairs: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    assert P.exponent_of(0.05) == pytest.approx(16.97, abs=0.01)
    assert P.exponent_of(0.10) == pytest.approx(6.94, abs=0.01)
    for std in (0.01, 0.05, 0.137, 0.25):
        assert P.std_of(P.exponent_of(std)) == pytest.approx(std, rel=1e-9)
    for t in (1, 7, 300):
        w = P.profile_weights(t, 6.94)
        assert w.sum() == pytest.approx(1.0, abs=1e-12) and (w >= 0).all() and np.all(np.diff(w) >= 0)
    # The tracker (the trainer's own class) after t steps is exactly the profile's weighting of the steps.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = P.PowerEMA(model, (0.05, 0.2))
    seen = []
    for t in range(1, 41):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        seen.append(model.weight.detach().double().clone())
        ema.update(t)
    for gamma, copy in zip(ema.gammas, ema.models):
        expected = torch.einsum("s,sij->ij", torch.from_numpy(P.profile_weights(40, gamma)), torch.stack(seen))
        assert torch.allclose(copy.weight.double(), expected, atol=1e-6)


def test_the_gram_matrix_is_exact_for_the_discrete_profiles():
    t = np.array([50, 100, 37, 1])
    g = np.array([P.exponent_of(0.05), P.exponent_of(0.1), 3.0, 0.5])
    W = np.stack([np.pad(P.profile_weights(int(a), b), (0, 100 - a)) for a, b in zip(t, g)])
    assert np.allclose(P._inner(t, g, t, g), W @ W.T, rtol=1e-10, atol=0)
    # Narrow profiles over long runs stay finite (log space): s^a would overflow float64 here.
    big = P._inner(np.array([10**6]), np.array([P.exponent_of(0.01)]), np.array([10**6]), np.array([P.exponent_of(0.01)]))
    assert np.isfinite(big).all() and big[0, 0] > 0


def _trajectory(steps: int, step_fn, stds, every: int, seed: int = 0):
    """Run ``step_fn`` on a tiny model for ``steps`` steps with the trainer's tracker; returns the
    parameter trajectory [steps, n] (float64), the snapshots {t: [flat weights of each profile]} and the tracker."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    tracker = P.PowerEMA(model, stds)
    flat = lambda m: torch.cat([m.weight.detach().flatten(), m.bias.detach().flatten()]).double()  # noqa: E731
    traj, snaps = [], {}
    for t in range(1, steps + 1):
        with torch.no_grad():
            step_fn(model)
        traj.append(flat(model))
        tracker.update(t)
        if t % every == 0:
            snaps[t] = [flat(m) for m in tracker.models]
    return torch.stack(traj).numpy(), snaps, tracker, flat


def _reconstruct(snaps, gammas, which, step, std):
    """Solve from the snapshots of profiles ``which`` up to ``step``; returns (weights, fit, explicit residual)."""
    keys = [(t, i) for i in which for t in sorted(snaps) if t <= step]
    fit = P.solve([t for t, _ in keys], [gammas[i] for _, i in keys], step, std)
    rec = sum(c * snaps[t][i].numpy() for c, (t, i) in zip(fit.coefficients, keys))
    W = np.stack([np.pad(P.profile_weights(t, gammas[i]), (0, step - t)) for t, i in keys])
    target = P.profile_weights(step, P.exponent_of(std))
    return rec, fit, target - fit.coefficients @ W, target


def _bound(r: np.ndarray, traj: np.ndarray) -> np.ndarray:
    """|sum_s r(s) theta_s| <= ||r|| ||theta - c|| + |sum_s r(s)| |c| for any c (Cauchy-Schwarz); c = the mean."""
    c = traj.mean(axis=0)
    return np.linalg.norm(r) * np.sqrt(((traj - c) ** 2).sum(axis=0)) + abs(r.sum()) * np.abs(c)


def test_a_third_tracked_profile_is_reconstructed_from_the_other_two_within_the_bound():
    def random_walk(model):
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))

    traj, snaps, tracker, flat = _trajectory(400, random_walk, (0.05, 0.10, 0.07), every=20)
    rec, fit, r, target = _reconstruct(snaps, tracker.gammas, (0, 1), 400, 0.07)
    direct = flat(tracker.models[2]).numpy()  # tracked directly, as the trainer does
    assert fit.residual == pytest.approx(np.linalg.norm(r) / np.linalg.norm(target), rel=1e-3)
    assert fit.residual < 0.01
    err = np.abs(rec - direct)
    assert (err <= _bound(r, traj) + 1e-5).all()   # float32 tracking: 1e-5 of slack
    assert err.max() < 0.01 * np.abs(direct).max()
    # And at an earlier snapshot step, only from the snapshots up to it.
    traj200 = traj[:200]
    rec, fit, r, _ = _reconstruct(snaps, tracker.gammas, (0, 1), 200, 0.07)
    exact = P.profile_weights(200, P.exponent_of(0.07)) @ traj200
    assert (np.abs(rec - exact) <= _bound(r, traj200) + 1e-5).all()


def test_a_quadratic_toy_gets_its_known_averages():
    """Noisy gradient descent on f(theta) = 0.5 |theta - 1|^2: the exactly weighted average of the
    iterates (the known answer) for EMA lengths inside and outside the tracked ones, and the longer the
    average, the closer to the minimum (the noise averages out)."""
    gen = torch.Generator().manual_seed(1)

    def sgd(model):
        for p in model.parameters():
            p.sub_(0.05 * ((p - 1.0) + 2.0 * torch.randn(p.shape, generator=gen)))

    traj, snaps, tracker, _ = _trajectory(600, sgd, (0.05, 0.10), every=25, seed=1)
    distances = []
    for std in (0.04, 0.07, 0.13):
        rec, fit, r, target = _reconstruct(snaps, tracker.gammas, (0, 1), 600, std)
        known = target @ traj
        assert (np.abs(rec - known) <= _bound(r, traj) + 1e-5).all(), std
        distances.append(np.abs(known - 1.0).mean())
    assert distances[0] > distances[1] > distances[2]


# ---- the commands --------------------------------------------------------------------------------------------

PHEMA = ["--phema", "0.05,0.10", "--snapshot-every", 2]


@pytest.fixture(scope="module")
def phema_run(demo_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("phema")
    run_rae("encode", demo_images, "--out", root / "lat.zarr", *ENCODE_ARGS)
    run_rae("train-diffusion", "--latents", root / "lat.zarr", "--out", root / "dit", *DIFFUSION_ARGS, *PHEMA)
    return root


def test_training_keeps_the_profiles_at_each_snapshot_and_resumes_them_exactly(phema_run, tmp_path):
    dit = phema_run / "dit"
    assert [(s, std) for s, std, _ in phema_snapshots(dit)] == [(s, std) for s in (2, 4, 6) for std in (0.05, 0.1)]
    # Stopped at step 4 and run again: the same profiles as the uninterrupted run.
    out = tmp_path / "dit"
    run_rae("train-diffusion", "--latents", phema_run / "lat.zarr", "--out", out, *DIFFUSION_ARGS, *PHEMA,
            "--stop-after", 4)
    run_rae("train-diffusion", "--latents", phema_run / "lat.zarr", "--out", out, *DIFFUSION_ARGS, *PHEMA)
    for std in (0.05, 0.1):
        a, b = (load_weights(phema_snapshot_path(d, 6, std)) for d in (dit, out))
        assert all(torch.equal(a[k], b[k]) for k in a)
    info = run_rae("info", dit).stdout
    assert "post-hoc EMA" in info and "std 0.05, 0.1 at steps 2, 4, 6" in " ".join(info.split())
    # The two profiles differ from each other and from the recipe's EMA.
    narrow, wide = (load_weights(phema_snapshot_path(dit, 6, s)) for s in (0.05, 0.1))
    ema = load_weights(dit / "model_ema.safetensors")
    key = "final_layer.linear.weight" if "final_layer.linear.weight" in ema else next(iter(ema))
    assert not torch.equal(narrow[key], wide[key]) and not torch.equal(narrow[key], ema[key])


def test_rae_ema_makes_a_run_that_samples(phema_run, tmp_path):
    dit = phema_run / "dit"
    # A tracked profile at a snapshot step is reconstructed as itself.
    proc = run_rae("ema", dit, "--std", "0.1", "--out", tmp_path / "e10")
    assert "relative residual" in proc.stdout + proc.stderr
    got = load_weights(tmp_path / "e10" / "model_ema.safetensors")
    want = load_weights(phema_snapshot_path(dit, 6, 0.1))
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    assert "made by rae ema" in run_rae("info", tmp_path / "e10").stdout
    record = read_manifest(tmp_path / "e10")["posthoc_ema"]
    assert record["step"] == 6 and record["relative_residual"] < 1e-6
    # Another length at an earlier step: a complete run that rae sample takes as it is.
    run_rae("ema", dit, "--std", "0.07", "--step", 4, "--out", tmp_path / "e07")
    run = load_diffusion_run(tmp_path / "e07")
    assert run.config["posthoc_ema"]["step"] == 4 and run.config["posthoc_ema"]["snapshots"] == 4
    run_rae("sample", "--model", tmp_path / "e07", "--out", tmp_path / "s.zarr", *SAMPLE_ARGS)
    assert read_manifest(tmp_path / "s.zarr")["complete"]
    # Again: nothing to do; another std over it: refused without --overwrite.
    again = run_rae("ema", dit, "--std", "0.07", "--step", 4, "--out", tmp_path / "e07")
    assert "nothing to do" in again.stdout + again.stderr
    proc = run_rae("ema", dit, "--std", "0.08", "--out", tmp_path / "e07", check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr


def test_bad_uses_are_one_line(phema_run, tmp_path):
    dit = phema_run / "dit"
    cases = [
        (["ema", dit, "--std", "0.07", "--step", 1, "--out", tmp_path / "a"], "no post-hoc EMA snapshot at or before step 1"),
        (["ema", dit, "--std", "0.5", "--out", tmp_path / "b"], "--std must be in (0, 0.28]"),
        (["ema", dit, "--std", "0.07", "--out", dit / "e"], "inside"),
        (["train-diffusion", "--latents", phema_run / "lat.zarr", "--out", tmp_path / "c", *DIFFUSION_ARGS,
          "--phema", "0.05,0.1"], "--snapshot-every"),
        (["train-diffusion", "--latents", phema_run / "lat.zarr", "--out", tmp_path / "d", *DIFFUSION_ARGS,
          "--phema", "0.05,x", "--snapshot-every", 2], "not a comma-separated list of numbers"),
    ]
    for argv, message in cases:
        proc = run_rae(*argv, check=False)
        assert proc.returncode != 0 and message in proc.stderr + proc.stdout, (argv, proc.stderr)
    plain = tmp_path / "plain"
    run_rae("train-diffusion", "--latents", phema_run / "lat.zarr", "--out", plain, *DIFFUSION_ARGS)
    proc = run_rae("ema", plain, "--std", "0.07", "--out", tmp_path / "e", check=False)
    assert proc.returncode == 1 and "train it with --phema" in proc.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "a").exists()
