"""Flow-matching maths for RAE: time sampling and shift, the linear path and its loss, ODE
solvers and guidance. Pure torch, no I/O; deterministic given explicit generators / noise.

Conventions (as the paper and the authors' code):
- x_t = (1 - t) x + t eps, t = 1 is pure noise, t = 0 is data;
- the model predicts the velocity v = eps - x, trained with the mean squared error;
- sampling integrates dx/dt = v from t = 1 down to t = 0;
- every time (training and sampling) goes through the dimension-dependent shift
  t' = a t / (1 + (a - 1) t), a = sqrt(C*h*w / 4096) (sqrt(48) for a [768, 16, 16] latent):
  high-dimensional latents need more time at high noise.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], t [B]) -> v

# The reference draws training times on [0, 1 - 1/1000] and starts its sampling grid at
# 1 - 0, ending at 1 - (1 - 1/1000) = 1/1000 (both before the shift).
REFERENCE_T_MAX = 1 - 1 / 1000


#################################################################################
#                              Time distribution                                #
#################################################################################

def shift_time(t, alpha: float):
    """t' = a t / (1 + (a - 1) t): keeps 0 and 1 fixed, moves mass towards t = 1 for a > 1."""
    return alpha * t / (1 + (alpha - 1) * t)


def unshift_time(t, alpha: float):
    """Inverse of ``shift_time``."""
    return t / (alpha - (alpha - 1) * t)


def default_shift(latent_shape, base: int = 4096) -> float:
    """a = sqrt(m / n): m = C*h*w of the latent, n = 4096 (the paper's base dimension)."""
    return math.sqrt(math.prod(latent_shape) / base)


def sample_t(n: int, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
             shift: float = 1.0, t_max: float = REFERENCE_T_MAX,
             generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training times [n] (float32): u ~ logit-normal(mean, std) or uniform on [0, t_max], then
    t = shift_time(u, shift).

    As the reference, u is truncated to [0, t_max] with t_max = 1 - 1/1000 (inverse-CDF
    sampling of the truncated normal in logit space); pass t_max=1 for no truncation.
    ``device`` must be the generator's device.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    if kind == "uniform":
        t = u * t_max
    elif kind == "logit_normal":
        p_max = _normal_cdf((_logit(t_max) - mean) / std)
        t = torch.sigmoid(mean + std * torch.special.ndtri(u * p_max))
    else:
        raise ValueError(f"unknown time distribution {kind!r} (logit_normal or uniform)")
    return shift_time(t, shift).float()


def t_cdf(t, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
          shift: float = 1.0, t_max: float = REFERENCE_T_MAX) -> torch.Tensor:
    """Closed-form CDF of ``sample_t``'s distribution (for tests and plots)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    u = unshift_time(t, shift).clamp(0.0, t_max)
    if kind == "uniform":
        return u / t_max
    if kind == "logit_normal":
        p_max = _normal_cdf((_logit(t_max) - mean) / std)
        return _normal_cdf((torch.logit(u) - mean) / std) / p_max
    raise ValueError(f"unknown time distribution {kind!r} (logit_normal or uniform)")


def _logit(p: float) -> float:
    return math.inf if p >= 1 else math.log(p / (1 - p))


def _normal_cdf(z):
    if isinstance(z, torch.Tensor):
        return torch.special.ndtr(z)
    return 0.5 * math.erfc(-z / math.sqrt(2))


#################################################################################
#                           Noise, path, target, loss                           #
#################################################################################

def seeded_noise(seeds, shape, device: str | torch.device = "cpu") -> torch.Tensor:
    """Noise [n, *shape] (float32), sample i from its own generator seeded with ``seeds[i]`` on
    ``device``: a sample's noise does not depend on the batch it is drawn in."""
    generator = torch.Generator(device=device)
    out = torch.empty(len(seeds), *shape, device=device)
    for row, seed in zip(out, seeds):
        generator.manual_seed(int(seed))
        torch.randn(tuple(shape), generator=generator, device=device, out=row)
    return out


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps, with t [B] broadcast over each sample."""
    t = _per_sample(t, x)
    return (1 - t) * x + t * eps


def target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity of the linear path, d x_t / dt = eps - x."""
    return eps - x


def loss(model_out: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error in float32. As the reference: the mean over each sample's elements,
    then ("mean") the mean over the batch; reduction="none" returns the per-sample losses [B]."""
    per_sample = (model_out.float() - target.float()).square().flatten(1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


#################################################################################
#                                  Sampling                                     #
#################################################################################

def time_grid(steps: int, shift: float, rule: str = "standard") -> torch.Tensor:
    """The ``steps + 1`` times (float32, decreasing) a fixed-step solver visits.

    "standard": shift_time(linspace(1, 0, steps + 1)), from pure noise to exactly t = 0.
    "reference": the authors' ODE grid, shift_time(1 - linspace(0, 1 - 1/1000, steps + 1)),
        computed as they do in float32. It stops at t = shift_time(1/1000) (0.0069 for
        a = sqrt(48)), not at 0, and returns that state: there is no extra last step. Their
        config ``num_steps: 50`` counts *time points*, i.e. ``steps = 49`` here.
    """
    if rule == "standard":
        return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()
    if rule == "reference":
        return reference_grid(steps + 1, REFERENCE_T_MAX, shift)
    raise ValueError(f"unknown time grid rule {rule!r}")


def euler(velocity: Velocity, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Explicit Euler along ``grid``: one velocity evaluation per step. The state stays in
    x's dtype (keep it float32 when the model runs under bf16 autocast)."""
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * velocity(x, t_cur.expand(x.shape[0])).to(x.dtype)
    return x


def heun(velocity: Velocity, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Heun's second-order method (trapezoidal corrector) along ``grid``: two velocity
    evaluations per step, the last step included (the velocity is well defined at t = 0)."""
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t_cur
        v_cur = velocity(x, t_cur.expand(x.shape[0])).to(x.dtype)
        x_pred = x + dt * v_cur
        v_next = velocity(x_pred, t_next.expand(x.shape[0])).to(x.dtype)
        x = x + dt * (0.5 * (v_cur + v_next))
    return x


# name -> (integrator, time grid rule)
SOLVERS = {
    "euler": (euler, "standard"),
    "heun": (heun, "standard"),
    # The authors' sampler (torchdiffeq "euler" on their grid): steps=49 == their num_steps=50.
    "euler-ref": (euler, "reference"),
}
# The reference's other samplers: its sample_sde (Euler-Maruyama, Heun) and its sample_ode with
# torchdiffeq's adaptive methods.
SDE_SOLVERS = {"sde-euler": "euler", "sde-heun": "heun", "sde-euler-ref": "euler", "sde-heun-ref": "heun"}
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
ALL_SOLVERS = (*SOLVERS, *SDE_SOLVERS, *ADAPTIVE_SOLVERS)
SDE_FORMS = ("sigma", "constant", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("Mean", "Tweedie", "Euler", "none")


def sample(velocity: Velocity, noise: torch.Tensor, steps: int, shift: float, solver: str = "euler",
           options: dict | None = None, seeds=None) -> torch.Tensor:
    """Integrate from t = 1 (``noise``) towards t = 0 and return the final state.

    ``steps`` is the number of solver steps in every fixed-step solver (Euler: ``steps`` velocity
    evaluations, Heun: 2 * ``steps``). "euler"/"heun" end at t = 0; "euler-ref" reproduces the
    reference sampler exactly (ends at t = 0.0069; the reference's ``num_steps`` = steps + 1).
    "sde-euler" / "sde-heun" (``sample_sde``) and the adaptive ODE solvers (``sample_ode_adaptive``)
    take their ``options``; the SDE draws its noise from each sample's ``seeds``.
    """
    options = options or {}
    if solver in SDE_SOLVERS:
        if seeds is None:
            raise ValueError("the SDE samplers draw their noise from the samples' seeds: give seeds")
        return sample_sde(velocity, noise, steps, shift, SDE_SOLVERS[solver],
                          noise_stream=sde_noise(seeds, noise.shape[1:], noise.device),
                          reference=solver.endswith("-ref"), **options)
    if solver in ADAPTIVE_SOLVERS:
        return sample_ode_adaptive(velocity, noise, steps, shift, solver, **options)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(ALL_SOLVERS)}")
    integrate, rule = SOLVERS[solver]
    grid = time_grid(steps, shift, rule).to(noise.device)
    return integrate(velocity, noise, grid)


#################################################################################
#                    The reference's SDE and adaptive ODE samplers              #
#################################################################################

def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad log p_t(x) of the linear path x_t = (1 - t) x_0 + t eps from its velocity v = eps - x_0:
    eps = x + (1 - t) v, so the score -eps / t is ((t - 1) v - x) / t."""
    t = _per_sample(t, x)
    return ((t - 1) * v - x) / t


def sde_diffusion(t: torch.Tensor, form: str, norm: float) -> torch.Tensor:
    """D(t) of the reverse SDE dx = [v - D score] dt + sqrt(2 D) dW (the reference's diffusion forms
    of its linear path, with t = 1 the noise end). The reference's default "SBDM" is left out: on this
    path its formula is -t / (1 - t), negative, and its sampler returns NaN with it."""
    if form in ("sigma", "linear"):  # the same on this path: its sigma_t is t
        return norm * t
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * (1 - t)) + 1) ** 2
    if form == "increasing-decreasing":
        return norm * torch.sin(math.pi * (1 - t)) ** 2
    raise ValueError(f"unknown diffusion form {form!r}; choose one of {', '.join(SDE_FORMS)}")


def sde_noise(seeds, shape, device) -> Callable[[], torch.Tensor]:
    """Each sample's own stream of SDE noise: a generator on ``device`` per sample, seeded from its
    seed (apart from the seed of its initial noise), one draw of ``shape`` per call. So a sample's
    path does not depend on its batch nor on the number of processes."""
    import numpy as np

    gens = []
    for seed in (int(s) for s in seeds):
        g = torch.Generator(device=device)
        g.manual_seed(int(np.random.SeedSequence([seed, 0x5DE]).generate_state(1, np.uint64)[0] >> 1))
        gens.append(g)

    def draw() -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in gens])

    return draw


def reference_grid(points: int, t1: float, shift: float) -> torch.Tensor:
    """The reference's sampler grids: shift_time(1 - linspace(0, t1, points)), in float32 as there."""
    return shift_time(1 - torch.linspace(0, t1, points), shift)


def sample_sde(velocity: Velocity, x: torch.Tensor, steps: int, shift: float, method: str = "euler",
               noise_stream: Callable[[], torch.Tensor] | None = None, diffusion_form: str = "sigma",
               diffusion_norm: float = 1.0, last_step: str = "Mean", last_step_size: float = 0.04,
               reference: bool = False) -> torch.Tensor:
    """``steps`` Euler-Maruyama or stochastic Heun steps from t = 1 down to t = ``last_step_size`` on the
    shifted grid, then the last step from there: "Mean" (the drift without noise), "Tweedie" (the
    posterior mean), "Euler" (the velocity alone) or "none" (the steps then run to t = 0).

    ``reference``: the reference's ``sample_sde`` exactly (its ``num_steps`` = steps + 1). Its grid is
    shift_time(1 - linspace(0, 1 - last_step_size, steps + 1)), which ends at shift_time(last_step_size)
    (0.22 for a = sqrt(48)), while its last step is taken at the unshifted t = last_step_size: with a
    shift its samples stop short of the data. Without ``reference`` the steps end where the last step
    starts. One velocity evaluation per drift: the score is derived from it (the reference evaluates
    the model twice for the same value)."""
    size = 0.0 if last_step == "none" else last_step_size
    if reference:
        grid = reference_grid(steps + 1, 1 - size, shift).to(x.device)
    else:
        u_end = unshift_time(torch.tensor(size, dtype=torch.float64), shift)
        grid = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64) * (1 - u_end) + u_end, shift)
        grid = grid.float().to(x.device)
    if method == "heun" and size == 0.0:
        raise ValueError("the stochastic Heun step evaluates the score at its step's end, undefined at t = 0: "
                         "give a last step")
    B = x.shape[0]

    def drift(x, t):
        v = velocity(x, t).to(x.dtype)
        D = _per_sample(sde_diffusion(t, diffusion_form, diffusion_norm), x)
        return v - D * score_from_velocity(v, x, t)

    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        h = t_cur - t_next
        dw = noise_stream().to(x) * torch.sqrt(h)
        t = t_cur.expand(B)
        g = torch.sqrt(2 * _per_sample(sde_diffusion(t, diffusion_form, diffusion_norm), x))
        if method == "euler":  # Euler-Maruyama
            x = x - drift(x, t) * h + g * dw
        elif method == "heun":
            x_hat = x + g * dw
            k1 = drift(x_hat, t)
            k2 = drift(x_hat - h * k1, t_next.expand(B))
            x = x_hat - 0.5 * h * (k1 + k2)
        else:
            raise ValueError(f"unknown SDE method {method!r} (euler or heun)")
    if last_step == "none":
        return x
    t = torch.full((B,), 1 - (1 - size) if reference else float(grid[-1]), device=x.device,
                   dtype=grid.dtype)  # the reference's 1 - t1, unshifted
    if last_step == "Mean":
        return x - drift(x, t) * size
    v = velocity(x, t).to(x.dtype)
    if last_step == "Euler":
        return x - v * size
    if last_step == "Tweedie":
        alpha, sigma = 1 - t[0], t[0]
        return x / alpha + sigma ** 2 / alpha * score_from_velocity(v, x, t)
    raise ValueError(f"unknown last step {last_step!r}; choose one of {', '.join(LAST_STEPS)}")


def sample_ode_adaptive(velocity: Velocity, x: torch.Tensor, steps: int, shift: float, method: str = "dopri5",
                        atol: float = 1e-6, rtol: float = 1e-3) -> torch.Tensor:
    """The reference's ``sample_ode`` with an adaptive torchdiffeq method: from t = 1 to its grid's
    end (``steps + 1`` points, its ``num_steps``, down to shift_time(1/1000)) with tolerances ``atol`` /
    ``rtol``. The step size is the solver's, one for the whole batch (the error norm is the batch's),
    so, as there, a sample depends on the batch it is solved in."""
    from torchdiffeq import odeint

    grid = reference_grid(steps + 1, REFERENCE_T_MAX, shift).to(x.device)
    B = x.shape[0]

    def fn(t, state):
        return velocity(state, t.expand(B)).to(state.dtype)

    return odeint(fn, x, grid, method=method, atol=[atol], rtol=[rtol])[-1]


#################################################################################
#                                   Guidance                                    #
#################################################################################

def guided_velocity(model, y: torch.Tensor, method: str = "none", scale: float = 1.0,
                    interval: tuple[float, float] = (0.0, 1.0), guide_model=None,
                    null_label: int | None = None) -> Velocity:
    """The velocity function a solver integrates, for class labels y [B].

    method "none": v = model(x, t, y).
    method "cfg": classifier-free guidance, v = v_u + scale (v_c - v_u), the conditional and
        unconditional (label ``null_label``, default ``model.num_classes``) velocities computed
        in one batched forward pass of size 2B.
    method "autoguidance" (Karras et al. 2024): v = v_bad + scale (v_good - v_bad), v_good from
        ``model`` and v_bad from ``guide_model`` (a smaller or less trained model), both
        conditional. The reference runs both models on a doubled [cond; null] batch and keeps
        the conditional half; computing only that half gives the same velocities at half cost.

    As the reference (DiT^DH ``forward_with_cfg`` / ``forward_with_autoguidance``): guidance
    applies to all channels, only to samples whose t (the model's time, after the shift, t = 1
    noise) lies in the closed ``interval`` [t_min, t_max], and elsewhere the velocity is the
    plain conditional one (v_c, resp. v_good). scale == 1 means no guidance (one plain forward
    pass); the reference also skips guidance for scale < 1, which this does not.
    """
    t_min, t_max = interval
    if not t_min < t_max:
        raise ValueError(f"guidance interval must have t_min < t_max, got {interval}")

    def conditional(x, t):
        return model(x, t, y)

    if method == "none" or scale == 1.0:
        return conditional

    def mix(v_cond, v_other, t):
        on = ((t >= t_min) & (t <= t_max)).reshape(-1, *([1] * (v_cond.dim() - 1)))
        return torch.where(on, v_other + scale * (v_cond - v_other), v_cond)

    def active(t):
        if t_min <= 0.0 and t_max >= 1.0:  # every t in [0, 1]: decided without a host sync
            return True
        return bool(((t >= t_min) & (t <= t_max)).any())

    if method == "cfg":
        null = model.num_classes if null_label is None else null_label
        y_both = torch.cat([y, torch.full_like(y, null)])

        def cfg(x, t):
            if not active(t):
                return conditional(x, t)
            v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), y_both).chunk(2)
            return mix(v_cond, v_uncond, t)

        return cfg

    if method == "autoguidance":
        if guide_model is None:
            raise ValueError("autoguidance needs a guide_model")

        def autoguidance(x, t):
            v_good = model(x, t, y)
            if not active(t):
                return v_good
            return mix(v_good, guide_model(x, t, y), t)

        return autoguidance

    raise ValueError(f"unknown guidance {method!r} (none, cfg or autoguidance)")
