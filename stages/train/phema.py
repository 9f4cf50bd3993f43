"""Post-hoc EMA: choose the EMA length after training (Karras et al., "Analyzing and Improving the
Training Dynamics of Diffusion Models", 2024, section 3 and appendix C; written here from the paper).

A *power-function* EMA of exponent gamma averages the weights theta_1 .. theta_t of a run after t
optimiser steps with weights proportional to tau^gamma: its update after step t is

    ema <- beta_t ema + (1 - beta_t) theta_t,    beta_t = (1 - 1/t)^(gamma + 1),

so the first step replaces the initial weights and the profile keeps its shape as the run grows.
Unrolled, step s (1..t) carries exactly

    w_t(s) = (s^a - (s - 1)^a) / t^a,    a = gamma + 1,

(the product of the later betas telescopes to (s / t)^a), the integral over [s - 1, s] of the
continuous profile a tau^gamma / t^a. Its relative standard deviation (the profile's width over its
length) is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))); sigma_rel 0.05 is gamma 16.97,
0.10 is gamma 6.94.

Training tracks a few such profiles and keeps snapshots of each every N steps. Any other profile
(sigma_rel, ending at step T) is then the least-squares combination of the snapshots' weight
vectors: minimise ||w_target - sum_i x_i w_i||^2 over x, i.e. solve G x = b with the Gram matrix
G_ij = <w_i, w_j> and b_i = <w_i, w_target>. The inner products are computed exactly for the discrete
profiles above, in log space (a running log-sum-exp over steps), so long runs and narrow profiles
neither overflow nor lose the first steps. The reconstruction is sum_i x_i snapshot_i, and its
distance to the profile actually wanted is bounded, weight by weight, by
||w_target - sum_i x_i w_i|| times the root sum of squares of that weight over the steps
(Cauchy-Schwarz): ``Reconstruction.residual`` reports the first factor, relative to ||w_target||.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

MAX_STD = 0.28  # gamma -> 0 gives sigma_rel = 1/sqrt(12) = 0.2887; wider profiles weigh early steps more than late


def exponent_of(std: float) -> float:
    """gamma of the profile with relative standard deviation ``std``: from
    std^2 (gamma+2)^2 (gamma+3) = gamma+1, the largest real root of
    gamma^3 + 7 gamma^2 + (16 - 1/std^2) gamma + (12 - 1/std^2)."""
    s = float(std) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-7 * max(1.0, abs(r.real))))


def std_of(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def decay(t: int, gamma: float) -> float:
    """beta_t of the update after optimiser step t (1-based)."""
    return (1.0 - 1.0 / t) ** (gamma + 1)


def profile_weights(t: int, gamma: float) -> np.ndarray:
    """w_t(s) for s = 1..t (float64): what each step's weights count in the profile at step t."""
    a = gamma + 1
    s = np.arange(1, t + 1, dtype=np.float64)
    return (s / t) ** a - ((s - 1) / t) ** a


def ema_copy(model: nn.Module) -> tuple[nn.Module, list[torch.Tensor]]:
    """A frozen copy of ``model`` to average into, and its parameters that match ``model``'s trainable ones,
    in their order (frozen buffers-as-parameters, such as pos_embed, are copied once and left alone)."""
    copied = copy.deepcopy(model).requires_grad_(False).eval()
    named = dict(copied.named_parameters())
    return copied, [named[name] for name, p in model.named_parameters() if p.requires_grad]


class PowerEMA:
    """Power-function EMAs of a model's trainable parameters, one model copy per relative standard
    deviation (float32, like the recipe's EMA); ``update(t)`` after optimiser step t."""

    def __init__(self, model: nn.Module, stds: tuple[float, ...]):
        self.stds = tuple(float(s) for s in stds)
        self.gammas = tuple(exponent_of(s) for s in self.stds)
        self.models, self.copies = map(list, zip(*(ema_copy(model) for _ in self.stds)))
        self.params = [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, t: int) -> None:
        for gamma, copies in zip(self.gammas, self.copies):
            torch._foreach_lerp_(copies, self.params, 1.0 - decay(t, gamma))

    def state_dict(self) -> list[dict[str, torch.Tensor]]:
        return [m.state_dict() for m in self.models]

    def load_state_dict(self, states: list[dict[str, torch.Tensor]]) -> None:
        if len(states) != len(self.models):
            raise ValueError(f"{len(states)} post-hoc EMA profiles saved, {len(self.models)} tracked")
        for m, state in zip(self.models, states):
            m.load_state_dict(state)


#################################################################################
#                               Reconstruction                                  #
#################################################################################

def _log_f(steps: int, a: float) -> np.ndarray:
    """log(s^a - (s - 1)^a) for s = 1..steps."""
    s = np.arange(1, steps + 1, dtype=np.float64)
    out = np.zeros(steps)
    if steps > 1:  # s = 1 gives log 1 = 0
        out[1:] = a * np.log(s[1:]) + np.log(-np.expm1(a * np.log1p(-1.0 / s[1:])))
    return out


def _inner(t1: np.ndarray, g1: np.ndarray, t2: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """<w_{t1}^{g1}, w_{t2}^{g2}> for every pair of rows (t1[i], g1[i]) and columns (t2[j], g2[j])."""
    m = np.minimum.outer(t1, t2).astype(np.int64)
    a1, a2 = np.broadcast_to((g1 + 1)[:, None], m.shape), np.broadcast_to((g2 + 1)[None, :], m.shape)
    logs = {a: _log_f(int(m.max()), a) for a in set(a1.ravel().tolist()) | set(a2.ravel().tolist())}
    log_sum = np.zeros(m.shape)
    for x, y in {(x, y) for x, y in zip(a1.ravel().tolist(), a2.ravel().tolist())}:
        pick = (a1 == x) & (a2 == y)  # log sum_{s <= m} f_x(s) f_y(s), for every m at once
        log_sum[pick] = np.logaddexp.accumulate(logs[x] + logs[y])[m[pick] - 1]
    return np.exp(log_sum - a1 * np.log(t1)[:, None] - a2 * np.log(t2)[None, :])


@dataclass
class Reconstruction:
    coefficients: np.ndarray  # x_i, one per snapshot
    residual: float           # ||w_target - sum x_i w_i|| / ||w_target||
    gamma: float


def solve(snap_steps, snap_gammas, step: int, std: float) -> Reconstruction:
    """The least-squares coefficients of the snapshots (taken after ``snap_steps[i]`` steps of the profile
    of exponent ``snap_gammas[i]``) that best give the profile of ``std`` at ``step``."""
    t = np.asarray(snap_steps, dtype=np.int64)
    g = np.asarray(snap_gammas, dtype=np.float64)
    if len(t) == 0 or t.min() < 1:
        raise ValueError("snapshots must be taken after at least one step")
    gamma = exponent_of(std)
    gram = _inner(t, g, t, g)
    target = _inner(t, g, np.array([step]), np.array([gamma]))[:, 0]
    norm2 = _inner(np.array([step]), np.array([gamma]), np.array([step]), np.array([gamma]))[0, 0]
    # Scale rows and columns to a unit diagonal before solving: the Gram matrix spans orders of magnitude.
    d = np.sqrt(np.diag(gram))
    y = np.linalg.lstsq(gram / np.outer(d, d), target / d, rcond=None)[0]
    x = y / d
    r2 = norm2 - 2 * x @ target + x @ gram @ x
    return Reconstruction(x, math.sqrt(max(r2, 0.0) / norm2), gamma)
