"""Flow-matching maths: shift, time distribution, path/loss, solvers (against the exact
Gaussian case), the reference time grid, and CFG / AutoGuidance with guidance intervals."""

import math

import pytest
import torch

from stages import flow
from stages.models.dit import DiT

# ----------------------------------------------------------------------------- time / shift


def test_shift_formula_and_default_shift():
    assert flow.shift_time(0.5, 3.0) == pytest.approx(0.75)  # 3*0.5 / (1 + 2*0.5)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = flow.shift_time(t, 4.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    assert torch.equal(flow.shift_time(t, 1.0), t)
    torch.testing.assert_close(flow.unshift_time(shifted, 4.0), t)
    assert flow.default_shift((768, 16, 16)) == pytest.approx(math.sqrt(48))  # 196608 / 4096
    assert flow.default_shift((768, 32, 32)) == pytest.approx(math.sqrt(192))
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
    critical = 1.95 / math.sqrt(n)  # Kolmogorov-Smirnov at the 0.1% level
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
    assert t.max() <= flow.REFERENCE_T_MAX
    assert flow.t_cdf(flow.shift_time(flow.REFERENCE_T_MAX, 5.0), "logit_normal", shift=5.0) == 1.0


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
    torch.testing.assert_close(numeric, flow.target(x, eps), atol=1e-6, rtol=1e-6)
    # t is per sample
    torch.testing.assert_close(flow.interpolate(x, eps, t)[2], 0.5 * x[2] + 0.5 * eps[2])


def test_loss_is_mean_squared_error():
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    per_sample = flow.loss(pred, tgt, reduction="none")
    torch.testing.assert_close(per_sample, ((pred - tgt) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(flow.loss(pred, tgt), ((pred - tgt) ** 2).mean())
    assert flow.loss(pred.bfloat16(), tgt).dtype == torch.float32
    assert flow.loss(tgt, tgt) == 0


def test_label_dropout_rate_and_null_label():
    y = torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = flow.drop_labels(y, 0.1, 1000, torch.Generator().manual_seed(1))
    changed = dropped != y
    assert (dropped[changed] == 1000).all() and torch.equal(dropped[~changed], y[~changed])
    assert abs(changed.float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped, flow.drop_labels(y, 0.1, 1000, torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------- grids and solvers


def test_standard_grid_runs_from_noise_to_data_on_the_shifted_schedule():
    grid = flow.time_grid(10, 3.0)
    assert grid.shape == (11,) and grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all()
    torch.testing.assert_close(grid, flow.shift_time(torch.linspace(1, 0, 11), 3.0))


def test_reference_grid_has_fifty_points_and_stops_short_of_zero():
    shift = math.sqrt(48)
    grid = flow.time_grid(49, shift, "reference")
    assert grid.shape == (50,) and grid.dtype == torch.float32
    assert grid[0] == 1 and (grid.diff() < 0).all()
    assert grid[-1].item() == pytest.approx(flow.shift_time(0.001, shift), rel=1e-4)
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
    noise = torch.randn(200000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for solver, steps in [("euler", 200), ("heun", 50)]:
        x = flow.sample(gaussian_velocity, noise, steps, 3.0, solver)
        assert x.mean().item() == pytest.approx(MU, abs=0.01)
        assert x.std().item() == pytest.approx(SIGMA, abs=0.01)


def test_heun_is_more_accurate_than_euler_and_both_converge():
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
    assert len(calls) == 7 and calls[0].shape == (3,) and (calls[0] == 1).all()
    calls.clear()
    flow.sample(velocity, torch.zeros(3, 2), 7, 2.0, "heun")
    assert len(calls) == 14 and (calls[-1] == 0).all()
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
    model = DiT(in_channels=8, input_size=4, width=16, depth=1, num_heads=2, num_classes=K)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in ("pos_embed", "t_embedder.W"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model.eval()


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
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, K))
    torch.testing.assert_close(v, uncond + 3.0 * (cond - uncond))


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
    good, bad = model(x, t, y), guide(x, t, y)
    torch.testing.assert_close(v, bad + 1.42 * (good - bad))


@pytest.mark.parametrize("method", ["cfg", "autoguidance"])
@torch.no_grad()
def test_guidance_interval_switches_guidance_per_sample_in_model_time(setup, method):
    model, guide, x, y = setup
    velocity = flow.guided_velocity(model, y, method, scale=2.0, interval=(0.3, 0.6),
                                    guide_model=guide)
    t = torch.tensor([0.2, 0.3, 0.6, 0.7])  # the interval is closed: 0.3 and 0.6 are inside
    v = velocity(x, t)
    cond = model(x, t, y)
    other = model(x, t, torch.full_like(y, K)) if method == "cfg" else guide(x, t, y)
    guided = other + 2.0 * (cond - other)
    torch.testing.assert_close(v[[0, 3]], cond[[0, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(v[[1, 2]], guided[[1, 2]])
    assert not torch.allclose(v[[1, 2]], cond[[1, 2]])


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
