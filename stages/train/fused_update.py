"""The update after the backward pass in one pass over the parameters: the gradient-norm clip, AdamW and
the EMA, as one compiled function of foreach operations (Inductor fuses them into a few multi-tensor
kernels that read each gradient, parameter, moment and EMA weight once and write each once).

Today's three passes (``clip_grad_norm_``'s scaling of every gradient in place, the fused AdamW kernel,
``_foreach_lerp_`` for the EMA) read the parameters twice and the gradients twice more. The maths is
AdamW's own (``torch.optim.AdamW``'s multi-tensor formula, decoupled weight decay), on the AdamW
optimiser's own state tensors, so checkpoints are the same either way and either path resumes the
other's. The clip coefficient is ``clip_grad_norm_``'s, min(1, max_norm / (norm + 1e-6)).
"""
from __future__ import annotations

import math

import torch


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The total 2-norm of ``grads`` as ``clip_grad_norm_`` computes it (per-tensor norms, then their norm)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def adamw_ema_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], emas: list[torch.Tensor],
               lr: torch.Tensor, norm: torch.Tensor, max_norm: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, ema_weight: float) -> None:
    """In place: ``steps`` += 1; gradients scaled by the clip coefficient (not written back); one AdamW
    step of ``params`` with moments ``exp_avgs`` / ``exp_avg_sqs``; then ``emas`` <- lerp(emas, params,
    ``ema_weight``). ``lr`` (float64) and ``norm`` are 0-d tensors on the parameters' device (no
    recompiles as the learning rate changes, no wait for the norm)."""
    dtype = params[0].dtype
    torch._foreach_add_(steps, 1)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0) if math.isfinite(max_norm) else None
    g = torch._foreach_mul(grads, coef) if coef is not None else grads
    if weight_decay:
        torch._foreach_mul_(params, (1 - lr * weight_decay).to(dtype))
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)
    # The bias corrections in float64, as AdamW's Python floats.
    step = steps[0].double()
    step_size = (lr / (1 - beta1 ** step)).to(dtype)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, torch.sqrt(1 - beta2 ** step).to(dtype))
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(update, step_size)
    torch._foreach_sub_(params, update)
    torch._foreach_lerp_(emas, params, ema_weight)


class ParameterUpdate:
    """The update after the backward pass: clip + AdamW + EMA over ``optimizer``'s one parameter group and
    ``emas``. ``fused``: one pass (``adamw_ema_``; ``compiled``: torch.compile'd, else eager, e.g. on the
    CPU); else, or on a step where some parameter has no gradient, the three passes (``clip_grad_norm_``,
    ``optimizer.step()``, a foreach lerp). Returns the gradients' total norm before clipping."""

    def __init__(self, optimizer: torch.optim.AdamW, emas: list[torch.Tensor], max_norm: float, ema_decay: float,
                 fused: bool = False, compiled: bool = False):
        if len(optimizer.param_groups) != 1:
            raise ValueError("ParameterUpdate takes an optimiser with one parameter group")
        self.optimizer, self.emas = optimizer, emas
        self.max_norm, self.ema_weight = max_norm, 1 - ema_decay
        self.fn = (torch.compile(adamw_ema_, fullgraph=True, dynamic=False) if compiled else adamw_ema_) if fused else None
        self._lr: torch.Tensor | None = None

    @property
    def fused(self) -> bool:
        return self.fn is not None

    @property
    def group(self) -> dict:
        # Looked up each time: the optimiser's load_state_dict replaces its group dictionaries.
        return self.optimizer.param_groups[0]

    def three_passes(self, lr: float) -> torch.Tensor:
        params = self.group["params"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, foreach=True)
        self.group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():  # ema <- ema + (1 - decay) (model - ema)
            torch._foreach_lerp_(self.emas, params, self.ema_weight)
        return grad_norm

    def _state(self) -> tuple[list, list, list]:
        """The optimiser's moments and step counters, created as AdamW creates them on its first step."""
        state, params = self.optimizer.state, self.group["params"]
        on_device = bool(self.group.get("fused")) or bool(self.group.get("capturable"))
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not on_device else torch.float32
        for p in params:
            if p not in state or not state[p]:
                step = torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu")
                state[p] = {"step": step, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return ([state[p]["exp_avg"] for p in params], [state[p]["exp_avg_sq"] for p in params],
                [state[p]["step"] for p in params])

    def __call__(self, lr: float) -> torch.Tensor:
        """One update at learning rate ``lr``; returns the gradients' total norm before clipping."""
        params = self.group["params"]
        grads = [p.grad for p in params]
        if self.fn is None or any(g is None for g in grads):
            return self.three_passes(lr)
        exp_avgs, exp_avg_sqs, steps = self._state()
        norm = grad_norm(grads)
        device = params[0].device
        if self._lr is None or self._lr.device != device:
            self._lr = torch.zeros((), dtype=torch.float64, device=device)
        self._lr.fill_(lr)
        self.group["lr"] = lr
        beta1, beta2 = self.group["betas"]
        # The step counters live where AdamW keeps them (CUDA for fused); the maths wants them beside the weights.
        on_device = [s if s.device == device else s.to(device) for s in steps]
        with torch.no_grad():
            self.fn(params, grads, exp_avgs, exp_avg_sqs, on_device, self.emas, self._lr, norm, self.max_norm,
                    beta1, beta2, self.group["eps"], self.group["weight_decay"], self.ema_weight)
        for s, d in zip(steps, on_device):
            if s is not d:
                s.copy_(d)
        return norm
