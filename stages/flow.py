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
        return shift_time(1 - torch.linspace(0, REFERENCE_T_MAX, steps + 1), shift)
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


def sample(velocity: Velocity, noise: torch.Tensor, steps: int, shift: float,
           solver: str = "euler") -> torch.Tensor:
    """Integrate from t = 1 (``noise``) towards t = 0 and return the final state.

    ``steps`` is the number of solver steps in every solver (Euler: ``steps`` velocity
    evaluations, Heun: 2 * ``steps``). "euler"/"heun" end at t = 0; "euler-ref" reproduces the
    reference sampler exactly (ends at t = 0.0069; the reference's ``num_steps`` = steps + 1).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    integrate, rule = SOLVERS[solver]
    grid = time_grid(steps, shift, rule).to(noise.device)
    return integrate(velocity, noise, grid)


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
