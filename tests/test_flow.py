"""Flow-matching maths: shift, time distribution, path/loss, solvers (against the exact
Gaussian case), the reference time grid, and CFG / AutoGuidance with guidance intervals.

Floating-point comparisons are exact where both sides run the same operations on the same shapes;
otherwise the tolerance comes from the error model written beside it (u32 = 2^-24, u64 = 2^-53 are
the unit roundoffs), so it holds on any CPU, vector instruction set and thread count."""

import math

import pytest
import torch

from stages import flow
from stages.models.dit import DiT
from tests.helpers import randomize_

# ----------------------------------------------------------------------------- time / shift


def test_shift_formula_and_default_shift():
    # Python floats, every operation exact here: 3*0.5 = 1.5, 1 + 2*0.5 = 2, 1.5/2 = 0.75.
    assert flow.shift_time(0.5, 3.0) == 0.75
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = flow.shift_time(t, 4.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()  # 0/1 and 4/4: exact
    assert torch.equal(flow.shift_time(t, 1.0), t)
    # float64 round trip: 3 + 3 correctly rounded operations, and the inverse's relative condition
    # number 4 / (4 - 3s) <= 4 amplifies them: |err| <= (3 + 4*3) u64 |t| < 2e-15 |t|.
    torch.testing.assert_close(flow.unshift_time(shifted, 4.0), t, rtol=1e-14, atol=0)
    # 196608 / 4096 = 48 exactly, and sqrt is correctly rounded: the same float on both sides.
    assert flow.default_shift((768, 16, 16)) == math.sqrt(48)
    assert flow.default_shift((768, 32, 32)) == math.sqrt(192)
    assert flow.default_shift((768, 16, 16), base=196608) == 1.0


def _ks_statistic(samples, cdf):
    n = samples.numel()
    f = cdf(samples.double().sort().values)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).max().item(), (f - (i - 1) / n).max().item())


@pytest.mark.parametrize("kind,mean,std", [("logit_normal", 0.0, 1.0), ("logit_normal", -0.5, 1.5),
                                           ("uniform", 0.0, 1.0)])
def test_shifted_time_sampler_matches_closed_form_cdf(kind, mean, std):
    n, shift = 20000, math.sqrt(48)
    t = flow.sample_t(n, kind, mean, std, shift=shift, generator=torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    # Kolmogorov-Smirnov at the 0.1% level. Seeded: the statistic is a fixed number (0.0076 here) up to
    # the last bits of ndtri/sigmoid/float32 rounding on another CPU, which move it by < 1e-6.
    critical = 1.95 / math.sqrt(n)
    assert _ks_statistic(t, lambda s: flow.t_cdf(s, kind, mean, std, shift)) < critical
    # The test has power: the unshifted distribution is rejected.
    assert _ks_statistic(t, lambda s: flow.t_cdf(s, kind, mean, std, 1.0)) > 10 * critical


def test_time_sampling_is_reproducible_from_generator():
    a = flow.sample_t(64, shift=3.0, generator=torch.Generator().manual_seed(7))
    b = flow.sample_t(64, shift=3.0, generator=torch.Generator().manual_seed(7))
    c = flow.sample_t(64, shift=3.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_times_truncated_like_reference():
    t = flow.sample_t(100000, "uniform", generator=torch.Generator().manual_seed(0))
    # Exact: u * t_max < t_max in float64, and rounding to float32 is monotone (the comparison rounds
    # REFERENCE_T_MAX to float32 too).
    assert t.max() <= flow.REFERENCE_T_MAX
    # float64: the CDF at the shifted truncation point is 1 up to a few roundings near 1 (< 100 u64);
    # without the truncation it would be 1 - 2.5e-12.
    cdf = flow.t_cdf(flow.shift_time(flow.REFERENCE_T_MAX, 5.0), "logit_normal", shift=5.0).item()
    assert abs(cdf - 1.0) < 1e-14


# ----------------------------------------------------------------------------- path and loss


def test_path_endpoints_and_velocity_target():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    assert torch.equal(flow.interpolate(x, eps, torch.zeros(4)), x)
    assert torch.equal(flow.interpolate(x, eps, torch.ones(4)), eps)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    x, eps = x.double(), eps.double()
    h = 1e-6
    numeric = (flow.interpolate(x, eps, t + h) - flow.interpolate(x, eps, t)) / h
    # The path is linear in t, so the difference quotient has no truncation error, only float64
    # rounding: each x_t carries <= 3 u64 (|x| + |eps|), t + h is off by <= u64, the difference
    # <= u64 |x_t|; divided by h: <= (8 u64 (|x| + |eps|) + u64 |eps - x|) / h < 1.2e-8 for |x|, |eps| < 6.
    assert max(x.abs().max(), eps.abs().max()) < 6
    torch.testing.assert_close(numeric, flow.target(x, eps), rtol=0, atol=2e-8)
    # t is per sample; t = 0.5 makes (1 - t) x + t eps the same float64 operations as 0.5 x + 0.5 eps
    assert torch.equal(flow.interpolate(x, eps, t)[2], 0.5 * x[2] + 0.5 * eps[2])


def test_loss_is_mean_squared_error():
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    per_sample = flow.loss(pred, tgt, reduction="none")
    # Against float64: the float32 loss rounds the difference and the square (2 u32 each term) and sums
    # 48 positive terms in some order (<= 47 u32 of the sum): relative error <= 50 u32 = 3e-6; the
    # batch mean adds 5 more terms: 55 u32 = 3.3e-6.
    exact = ((pred.double() - tgt.double()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample.double(), exact, rtol=3.5e-6, atol=0)
    torch.testing.assert_close(flow.loss(pred, tgt).double(), exact.mean(), rtol=3.5e-6, atol=0)
    assert flow.loss(pred.bfloat16(), tgt).dtype == torch.float32
    assert flow.loss(tgt, tgt) == 0


def test_seeded_noise_is_each_samples_own_whatever_the_batch():
    noise = flow.seeded_noise(torch.tensor([5, 6, 7]), (4, 2, 2))
    assert noise.dtype == torch.float32 and noise.shape == (3, 4, 2, 2)
    assert torch.equal(noise[1], torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(6)))
    assert torch.equal(flow.seeded_noise([6, 7], (4, 2, 2)), noise[1:])


# ----------------------------------------------------------------------------- grids and solvers


def test_standard_grid_runs_from_noise_to_data_on_the_shifted_schedule():
    grid = flow.time_grid(10, 3.0)
    # shift_time maps 1 and 0 to 3/3 and 0/1: exact
    assert grid.shape == (11,) and grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all()
    # The float32 formula: linspace (<= 3 u32 of 1) and 4 operations on values <= 3, whose relative
    # condition number is <= 1: |err| <= 10 u32 < 1e-6 for times in [0, 1] (the grid's float32
    # rounding of the float64 result adds u32 / 2).
    torch.testing.assert_close(grid, flow.shift_time(torch.linspace(1, 0, 11), 3.0), rtol=0, atol=1e-6)


def test_reference_grid_has_fifty_points_and_stops_short_of_zero():
    shift = math.sqrt(48)
    grid = flow.time_grid(49, shift, "reference")
    assert grid.shape == (50,) and grid.dtype == torch.float32
    assert grid[0] == 1 and (grid.diff() < 0).all()
    # The grid is float32: 1 - float32(0.999) is 0.001 up to float32's rounding of 0.999 (<= 2^-25, i.e.
    # 3e-5 relative to 0.001); the shift's relative condition number is <= 1 and its 4 float32
    # operations add 4 u32. Ending at 0 or at the unshifted 0.001 would be off by 100% / 85%.
    assert grid[-1].item() == pytest.approx(flow.shift_time(0.001, shift), rel=3.5e-5, abs=0)
    assert 0.0068 < grid[-1] < 0.0070
    # the authors' expression, bit for bit
    u = 1 - torch.linspace(0, 1 - 1 / 1000, 50)
    assert torch.equal(grid, shift * u / (1 + (shift - 1) * u))


MU, SIGMA = 1.5, 0.5  # data ~ N(MU, SIGMA^2), noise ~ N(0, 1)


def gaussian_velocity(x, t):
    """Exact E[eps - x0 | x_t] for the linear path when the data are N(MU, SIGMA^2 I)."""
    t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    var_t = (1 - t) ** 2 * SIGMA**2 + t**2
    return (t - (1 - t) * SIGMA**2) / var_t * (x - (1 - t) * MU) - MU


def _affine_error(solver, steps, shift=3.0):
    """The solvers are affine in x for this field: push 0 and 1 through to get the exact output
    distribution N(b, a^2) for N(0, 1) noise; return |b - MU| + |a - SIGMA|."""
    out = flow.sample(gaussian_velocity, torch.tensor([[0.0], [1.0]], dtype=torch.float64),
                      steps, shift, solver)
    b, a = out[0, 0].item(), (out[1, 0] - out[0, 0]).item()
    return abs(b - MU) + abs(abs(a) - SIGMA)


def test_solvers_transport_noise_to_the_gaussian_data_distribution():
    # The solvers are affine in x for this field, so N(0, 1) noise becomes exactly N(b, a^2): check that
    # a batch of noise is mapped sample by sample to b + a * noise, and that (b, a) is (MU, SIGMA) up
    # to the discretisation error (euler 200 steps: 0.007, heun 50: 0.0001, deterministic float64).
    noise = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for solver, steps in [("euler", 200), ("heun", 50)]:
        x = flow.sample(gaussian_velocity, noise, steps, 3.0, solver)
        ends = flow.sample(gaussian_velocity, torch.tensor([[0.0], [1.0]], dtype=torch.float64), steps, 3.0,
                           solver)
        b, a = ends[0, 0].item(), (ends[1, 0] - ends[0, 0]).item()
        # float64 rounding only: <= 2 * steps velocity evaluations of ~6 operations on values < 6, each
        # <= 6 * 6 u64, grown at most 2x by the flow: < 400 * 36 * 2 u64 = 3.2e-12; 1e-10.
        torch.testing.assert_close(x, b + a * noise, rtol=0, atol=1e-10)
        assert abs(b - MU) < 0.01 and abs(a - SIGMA) < 0.01


def test_heun_is_more_accurate_than_euler_and_both_converge():
    # Discretisation errors are >= 2.8e-5 (heun 100 steps) and the ratios asserted hold with >= 14%
    # to spare; float64 rounding moves each error by < 1e-11.
    for steps in (5, 10, 20):
        assert _affine_error("heun", steps) < 0.2 * _affine_error("euler", steps)
    assert _affine_error("euler", 40) < 0.6 * _affine_error("euler", 20)
    assert _affine_error("heun", 40) < 0.35 * _affine_error("heun", 20)  # second order
    assert _affine_error("heun", 100) < 1e-4


def test_solvers_evaluate_the_model_once_or_twice_per_step():
    calls = []

    def velocity(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x)

    flow.sample(velocity, torch.zeros(3, 2), 7, 2.0, "euler")
    assert len(calls) == 7 and calls[0].shape == (3,) and (calls[0] == 1).all()  # 2/2: exact
    calls.clear()
    flow.sample(velocity, torch.zeros(3, 2), 7, 2.0, "heun")
    assert len(calls) == 14 and (calls[-1] == 0).all()  # 0/1: exact
    calls.clear()
    flow.sample(velocity, torch.zeros(3, 2), 49, 2.0, "euler-ref")
    assert len(calls) == 49 and calls[-1][0] > 0  # never evaluates at the last grid point


def test_reference_solver_is_euler_on_the_reference_grid():
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    grid = flow.time_grid(49, 6.0, "reference")
    assert torch.equal(flow.sample(gaussian_velocity, noise, 49, 6.0, "euler-ref"),
                       flow.euler(gaussian_velocity, noise, grid))
    with pytest.raises(ValueError, match="euler-ref"):
        flow.sample(gaussian_velocity, noise, 10, 6.0, "rk4")


# ----------------------------------------------------------------------------- guidance

K = 10


class Recording(torch.nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.batches = model, model.num_classes, []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


def random_dit(seed):
    torch.manual_seed(seed)
    return randomize_(DiT(in_channels=8, input_size=4, width=16, depth=1, num_heads=2, num_classes=K), seed)


# The guidance tests compare the guided velocity with the model's own outputs computed on the same
# batches (CFG: the batched [cond; null] pass), so every comparison is exact.


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 4, 4, generator=g)
    y = torch.randint(0, K, (4,), generator=g)
    return random_dit(1), random_dit(2), x, y


@torch.no_grad()
def test_cfg_scale_one_is_the_conditional_model(setup):
    model, _, x, y = setup
    recording = Recording(model)
    t = torch.full((4,), 0.5)
    v = flow.guided_velocity(recording, y, "cfg", scale=1.0)(x, t)
    assert torch.equal(v, model(x, t, y)) and recording.batches == [4]


@torch.no_grad()
def test_cfg_extrapolates_from_unconditional_in_one_batched_pass(setup):
    model, _, x, y = setup
    recording = Recording(model)
    t = torch.full((4,), 0.5)
    v = flow.guided_velocity(recording, y, "cfg", scale=3.0)(x, t)
    assert recording.batches == [8]
    cond, uncond = _batched_cond_uncond(model, x, t, y)
    assert torch.equal(v, uncond + 3.0 * (cond - uncond))


def _batched_cond_uncond(model, x, t, y):
    """The conditional and unconditional velocities as CFG computes them: one pass over [x; x]."""
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, K)]))
    return both.chunk(2)


@torch.no_grad()
def test_autoguidance_with_the_model_as_its_own_guide_is_no_guidance(setup):
    model, _, x, y = setup
    t = torch.full((4,), 0.5)
    v = flow.guided_velocity(model, y, "autoguidance", scale=1.42, guide_model=model)(x, t)
    assert torch.equal(v, model(x, t, y))


@torch.no_grad()
def test_autoguidance_extrapolates_away_from_the_bad_model(setup):
    model, guide, x, y = setup
    t = torch.full((4,), 0.5)
    v = flow.guided_velocity(model, y, "autoguidance", scale=1.42, guide_model=guide)(x, t)
    good, bad = model(x, t, y), guide(x, t, y)  # the same batches as the guided velocity's
    assert torch.equal(v, bad + 1.42 * (good - bad))


@pytest.mark.parametrize("method", ["cfg", "autoguidance"])
@torch.no_grad()
def test_guidance_interval_switches_guidance_per_sample_in_model_time(setup, method):
    model, guide, x, y = setup
    velocity = flow.guided_velocity(model, y, method, scale=2.0, interval=(0.3, 0.6),
                                    guide_model=guide)
    t = torch.tensor([0.2, 0.3, 0.6, 0.7])  # the interval is closed: 0.3 and 0.6 are inside
    v = velocity(x, t)
    if method == "cfg":
        cond, other = _batched_cond_uncond(model, x, t, y)
    else:
        cond, other = model(x, t, y), guide(x, t, y)
    guided = other + 2.0 * (cond - other)
    assert torch.equal(v[[0, 3]], cond[[0, 3]])
    assert torch.equal(v[[1, 2]], guided[[1, 2]])
    assert (v[[1, 2]] - cond[[1, 2]]).abs().max() > 0.1  # guidance moves v by O(1), not by rounding


@torch.no_grad()
def test_guidance_outside_the_interval_costs_one_plain_pass(setup):
    model, _, x, y = setup
    recording = Recording(model)
    t = torch.full((4,), 0.9)
    v = flow.guided_velocity(recording, y, "cfg", scale=4.0, interval=(0.0, 0.5))(x, t)
    assert torch.equal(v, model(x, t, y)) and recording.batches == [4]
    with pytest.raises(ValueError):
        flow.guided_velocity(model, y, "cfg", scale=2.0, interval=(0.5, 0.5))


@torch.no_grad()
def test_guided_sampling_is_deterministic_given_the_noise(setup):
    model, guide, _, y = setup
    noise = torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    velocity = flow.guided_velocity(model, y, "autoguidance", 1.5, guide_model=guide)
    a = flow.sample(velocity, noise, 5, 2.0, "heun")
    b = flow.sample(velocity, noise.clone(), 5, 2.0, "heun")
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_zero_steps_return_the_starting_noise_for_the_baseline():
    from stages import flow as F

    noise = torch.randn(3, 4, 2, 2)
    calls = []
    out = F.sample(lambda x, t: calls.append(1) or x, noise, 0, 2.0, "euler")
    assert torch.equal(out, noise) and not calls


# ---- the reference's SDE and adaptive ODE samplers ----------------------------------------------------------

def _posterior_mean(x, t):
    """E[x0 | x_t] for data N(MU, SIGMA^2) on the linear path."""
    return MU + (1 - t) * SIGMA**2 / ((1 - t) ** 2 * SIGMA**2 + t**2) * (x - (1 - t) * MU)


@pytest.mark.parametrize("solver,steps", [("sde-euler", 100), ("sde-heun", 50)])
def test_sde_samplers_reach_the_data_distribution(solver, steps):
    # 2,000 samples: the standard error of the mean is SIGMA / sqrt(2000) = 0.011 and of the standard
    # deviation 0.008; the discretisation and the last step at t = 0.04 add a bias below 0.02 here.
    noise = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = flow.sample(gaussian_velocity, noise, steps, 3.0, solver, {"diffusion_form": "sigma"}, seeds=range(2000))
    assert abs(x.mean().item() - MU) < 0.05 and abs(x.std().item() - SIGMA) < 0.05
    # Not the ODE's answer: the noise moved the samples.
    ode = flow.sample(gaussian_velocity, noise, steps, 3.0, "euler")
    assert (x - ode).abs().mean() > 0.05


def test_each_sdes_noise_is_its_samples_own_whatever_the_batch():
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seeds = list(range(10, 16))
    whole = flow.sample(gaussian_velocity, noise, 8, 3.0, "sde-heun", seeds=seeds)
    parts = torch.cat([flow.sample(gaussian_velocity, noise[a:b], 8, 3.0, "sde-heun", seeds=seeds[a:b])
                       for a, b in ((0, 2), (2, 6))])
    assert torch.equal(whole, parts)
    other = flow.sample(gaussian_velocity, noise, 8, 3.0, "sde-heun", seeds=[s + 100 for s in seeds])
    assert not torch.equal(whole, other)


def test_an_sde_without_diffusion_is_euler_on_its_grid_and_the_last_steps_are_the_references():
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    quiet = dict(diffusion_form="constant", diffusion_norm=0.0)

    def run(solver, **options):
        return flow.sample(gaussian_velocity, noise, 12, 3.0, solver, {**quiet, **options}, seeds=range(5))

    # Without a last step: Euler on the standard grid to t = 0; the reference's variant on its own grid.
    euler = flow.euler(gaussian_velocity, noise, flow.time_grid(12, 3.0).double())
    torch.testing.assert_close(run("sde-euler", last_step="none"), euler, rtol=0, atol=1e-12)
    ref = flow.euler(gaussian_velocity, noise, flow.reference_grid(13, 1.0, 3.0).double())
    torch.testing.assert_close(run("sde-euler-ref", last_step="none"), ref, rtol=0, atol=1e-12)
    # With one: the steps end at t = 0.04 (rae), or at shift_time(0.04) = 0.111 while the last step is
    # taken at the unshifted 0.04 (the reference's grid).
    before = flow.sample_sde(gaussian_velocity, noise, 12, 3.0, noise_stream=lambda: torch.zeros_like(noise),
                             last_step="Euler", last_step_size=0.04, diffusion_form="constant", diffusion_norm=0.0)
    grid = flow.shift_time(torch.linspace(1.0, 0.0, 13, dtype=torch.float64) * (1 - flow.unshift_time(
        torch.tensor(0.04, dtype=torch.float64), 3.0)) + flow.unshift_time(torch.tensor(0.04, dtype=torch.float64), 3.0),
        3.0).float().double()
    x_stop = flow.euler(gaussian_velocity, noise, grid)
    stop = grid[-1].float()
    assert abs(float(stop) - 0.04) < 1e-8
    t = torch.full((5,), float(stop))
    # (The SDE takes each step size t_cur - t_next in float32, Euler in float64 from the same float32 times:
    # <= 12 steps x 2^-24 relative x |v| < 6, i.e. < 5e-6.)
    torch.testing.assert_close(before, x_stop - 0.04 * gaussian_velocity(x_stop, t), rtol=0, atol=5e-6)
    # Tweedie: the posterior mean E[x0 | x_t], from the score the velocity gives.
    torch.testing.assert_close(run("sde-euler", last_step="Tweedie"), _posterior_mean(x_stop, float(stop)),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(run("sde-euler", last_step="Mean"), before, rtol=0, atol=1e-12)  # no diffusion
    with pytest.raises(ValueError, match="seeds"):
        flow.sample(gaussian_velocity, noise, 3, 3.0, "sde-euler")
    with pytest.raises(ValueError, match="undefined at t = 0"):
        run("sde-heun", last_step="none")


def test_adaptive_solvers_follow_the_exact_flow():
    # For Gaussian data the flow is affine: x_t = (1 - t) MU + sqrt((1 - t)^2 SIGMA^2 + t^2) x_1.
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t_end = flow.reference_grid(51, flow.REFERENCE_T_MAX, 3.0)[-1].double()
    exact = (1 - t_end) * MU + torch.sqrt((1 - t_end) ** 2 * SIGMA**2 + t_end**2) * noise
    for method in ("dopri5", "bosh3", "adaptive_heun"):
        # 1e-8 leaves each solver's own error below 1e-6 here (adaptive_heun at 1e-10 takes 64,000 calls).
        tight = flow.sample(gaussian_velocity, noise, 50, 3.0, method, {"atol": 1e-8, "rtol": 1e-8})
        # The solver's times are float32, as the reference's grid: each step's time is off by up to
        # 2^-24 relative, about 3e-7 of state per step at |v| < 6, over a few tens of steps: 1e-5.
        torch.testing.assert_close(tight, exact, rtol=0, atol=1e-5)
    # The reference's tolerances (atol 1e-6, rtol 1e-3) control each step's error, not the whole path's:
    # a few hundredths here, and fewer model evaluations than the tight run.
    counts = {}
    for name, options in (("loose", {}), ("tight", {"atol": 1e-10, "rtol": 1e-10})):
        calls = []
        out = flow.sample(lambda x, t: calls.append(1) or gaussian_velocity(x, t), noise, 50, 3.0, "dopri5", options)
        counts[name] = (len(calls), (out - exact).abs().max().item())
    assert counts["loose"][1] < 0.1 and counts["tight"][1] < 1e-5 and counts["loose"][0] < counts["tight"][0]
