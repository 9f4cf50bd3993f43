"""One optimisation step of ``rae train-diffusion`` and what decides it: the learning-rate schedule,
the random draws of a step, and ``DiffusionTraining`` (model, EMA, optimiser, the step itself). No I/O: the
stage (``stages.train.diffusion``) feeds it batches and saves its state; the benchmarks drive this
same class.

Every random draw of step s (the times, which labels are dropped, each sample's noise) is a
function of (seed, s) and of the sample's position in the *global* batch, so a run on N processes
with gradient accumulation computes the same gradients as a single process (to float rounding).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .. import flow
from .config import TrainDiffusionConfig, micro_batches, rank_slice
from .fused_update import ParameterUpdate
from .phema import PowerEMA, ema_copy

# Whether compiled CUDA runs update with stages.train.fused_update (BENCHMARKS.md, issue 29's optimiser route).
FUSED_UPDATE = False


def learning_rate(step: int, base: float, final: float, warmup: int, decay_end: int,
                  warmup_from_zero: bool = False) -> float:
    """The released DiT^DH schedule at optimiser step ``step`` (0-based): ``warmup`` steps at the
    base rate (or a linear ramp from 0 with ``warmup_from_zero``), a linear decay to ``final``
    at ``decay_end``, then constant."""
    if step < warmup:
        return base * (step + 1) / warmup if warmup_from_zero else base
    if step >= decay_end:
        return final
    progress_ = (step - warmup) / max(decay_end - warmup, 1)
    return base + (final - base) * progress_


@dataclass(frozen=True)
class Schedule:
    """Step counts of a run: its length and the learning rate's hold and decay."""
    total: int
    warmup: int
    decay_end: int
    steps_per_epoch: int

    @classmethod
    def of(cls, cfg: TrainDiffusionConfig, steps_per_epoch: int) -> "Schedule":
        total = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
        decay_end = cfg.decay_end_step if cfg.decay_end_step is not None else int(cfg.decay_end_epoch * steps_per_epoch)
        return cls(total, warmup, max(decay_end, warmup), steps_per_epoch)


@dataclass
class StepDraws:
    t: torch.Tensor            # [n] float32, shifted training times
    drop: torch.Tensor         # [n] bool, labels replaced by the null class (classifier-free guidance)
    noise_seeds: torch.Tensor  # [n] int64, one noise generator seed per sample


def step_draws(cfg: TrainDiffusionConfig, step: int, shift: float, lo: int, hi: int) -> StepDraws:
    """The random draws of global batch positions [lo, hi) at ``step``: drawn for the whole
    global batch from a generator seeded by (seed, step), then sliced, so they do not depend on
    how the batch is split over processes and micro-batches."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, step]).generate_state(1, np.uint64)[0]))
    t = flow.sample_t(cfg.batch_size, cfg.time_dist, cfg.t_mean, cfg.t_std, shift, generator=g)
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
    seeds = torch.randint(0, 2**62, (cfg.batch_size,), generator=g)
    return StepDraws(t[lo:hi], drop[lo:hi], seeds[lo:hi])


def enable_grad_checkpointing(model: nn.Module, num_blocks: int) -> None:
    """Recompute the activations of the first ``num_blocks`` transformer blocks (-1: all) in the
    backward pass instead of keeping them: memory for compute. The state dict is unchanged."""
    import torch.utils.checkpoint as ckpt

    blocks = list(model.blocks)
    for block in blocks if num_blocks < 0 else blocks[:num_blocks]:
        block.forward = lambda *args, _forward=block.forward: ckpt.checkpoint(_forward, *args, use_reentrant=False)


class DiffusionTraining:
    """The model, its EMA, the optimiser and one optimisation step.

    ``train_step(step, x, labels, lr)`` takes this process's share of the global batch of
    ``step`` (normalised latents on the device, labels on the CPU), draws its times, label
    dropout and noise, and returns the loss and gradient norm as device tensors: nothing in it
    waits for the GPU. The benchmark drives this same class.
    """

    def __init__(self, model: nn.Module, cfg: TrainDiffusionConfig, device: torch.device, shift: float,
                 null_label: int, rank: int = 0, world: int = 1, fused_update: bool | None = None):
        self.cfg, self.device, self.shift, self.null_label = cfg, device, shift, null_label
        self.share = rank_slice(cfg.batch_size, rank, world)  # this rank's positions in the step's draws
        self.model = model.to(device).train()
        # The EMA starts from the initial weights, as the reference; it is kept in float32.
        self.ema, self.ema_params = ema_copy(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # --phema: power-function EMAs for post-hoc EMA, beside the recipe's (float32 too).
        self.phema = PowerEMA(self.model, cfg.phema) if cfg.phema else None
        # Only trainable parameters: pos_embed and the Fourier frequencies are frozen buffers-as-parameters.
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(self.model, cfg.grad_checkpointing)
        self.net = self.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                           broadcast_buffers=False, gradient_as_bucket_view=True)
        if cfg.compile:
            self.net = torch.compile(self.net)
        # The clip, AdamW and the EMA as one compiled pass over the parameters (stages.train.fused_update),
        # or as three (clip_grad_norm_, the fused AdamW kernel, a foreach lerp).
        if fused_update is None:
            fused_update = FUSED_UPDATE and cfg.compile and device.type == "cuda"
        self.update = ParameterUpdate(self.optimizer, self.ema_params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
                                      cfg.ema_decay, fused=fused_update, compiled=cfg.compile)

    def train_step(self, step: int, x: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        draws = step_draws(self.cfg, step, self.shift, self.share.start, self.share.stop)
        # Unlabelled entries (label -1) and dropped labels train the unconditional (null) class.
        y = torch.where(draws.drop | (labels < 0), self.null_label, labels)
        loss, grad_norm = self.step(x, self._to_device(y), self._to_device(draws.t), draws.noise_seeds, lr)
        if self.phema is not None:
            self.phema.update(step + 1)  # the profiles count optimiser steps from 1
        return loss, grad_norm

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned, so the copy does not wait for the GPU
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise_seeds: torch.Tensor,
             lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        accum = self.cfg.grad_accum
        micro = micro_batches(len(x), 1, accum)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for m in range(accum):
            part = slice(m * micro, (m + 1) * micro)
            x0 = x[part]
            eps = flow.seeded_noise(noise_seeds[part].tolist(), x0.shape[1:], self.device)
            x_t = flow.interpolate(x0, eps, t[part])
            # Gradients are averaged over processes by DDP only at the last micro-batch.
            sync = m == accum - 1 or not isinstance(self.net_module, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.net_module.no_sync():
                with torch.autocast(**self.autocast):
                    v = self.net(x_t, t[part], y[part])
                loss = flow.loss(v, flow.target(x0, eps))
                (loss / accum).backward()
            total += loss.detach()
        return total / accum, self.update(lr)

    @property
    def net_module(self) -> nn.Module:
        """The DDP wrapper (or the model) under torch.compile's wrapper."""
        return getattr(self.net, "_orig_mod", self.net)

    def weights_finite(self) -> bool:
        return bool(torch.stack([p.isfinite().all() for p in self.params + self.ema_params]).all())

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict()}
        if self.phema is not None:
            state["phema"] = self.phema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.phema is not None:
            self.phema.load_state_dict(state["phema"])
