"""``rae train-decoder``: train the RAE pixel decoder on a latent store (the encoder never runs).

The decoder maps the frozen encoder's latents, as stored (raw encoder space), back to pixels. Its
loss (paper Sec. 3, reference ``train_stage1.py``) is

    L1 + w_L * LPIPS + w_G * lambda * GAN,    lambda = ||grad_W rec|| / ||grad_W GAN|| at the last layer W,

with noise augmentation of the input latents (z + sigma * eps, sigma ~ tau * U(0, 1)). Each step
follows the reference's order of operations:

1. decoder step, discriminator in eval mode: reconstruct the noised latents; L1 and LPIPS against
   the source image; once the GAN term is on, D's logits on the (DiffAug-ed) reconstruction and the
   adaptive lambda; one AdamW step; EMA update.
2. discriminator step, once D is on: a fresh reconstruction by the updated decoder from the clean
   latents (no gradient), rounded to 8-bit like a stored image; hinge loss of D on real vs fake.

Everything a step draws is a function of (seed, step) and of the position in the global batch
(DiffAug's of the micro-batch: rank x --grad-accum + index), so a resumed run continues exactly where
the interrupted one stopped, and the batches, the latent noise and lambda do not depend on the
number of GPUs. ``--grad-accum A`` splits each process's share of the batch into A micro-batches
whose gradients are summed before the step: one process with A = 2 computes, micro-batch by
micro-batch, what two processes compute (bit for bit: tests/test_pipeline_chain.py). With the
GAN term on, lambda needs every micro-batch's gradients at the last layer before any backward, so
each micro-batch's decoder forward runs twice (once for lambda, once for the backward).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import dist
from .checkpoint import resume_state, save_checkpoint, save_weights
from .data import BatchPlan, StoreReader, batches
from .errors import ArtifactError, RaeError
from .options import AT_LEAST_1, NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, check_options, option
from .losses import LPIPS, GanSchedule, generator_loss, hinge_d_loss
from .manifest import (atomic_write_json, digest_json, has_manifest, input_ref, jsonable, new_manifest,
                       read_jsonl, read_manifest, remove_temporaries, write_manifest)
from .models.decoder import DECODER_SIZES, ViTDecoder, add_noise
from .models.discriminator import DINO_TIMM_NAME, DinoDiscriminator, round_to_8bit
from .progress import console, progress
from .store import open_complete_store, remove_store
from .weights import sha256_file

METRICS = "metrics.jsonl"
CONFIG = "config.json"
EMA_WEIGHTS = "decoder_ema.safetensors"
WEIGHTS = "decoder.safetensors"
LATENT_STATS = "latent_stats.safetensors"


@dataclass
class TrainDecoderConfig:
    latents: str = option(help="Latent store from `rae encode` (its source images are read too).", path=True)
    out: str = option(help="Run directory: weights, config.json, metrics, previews, checkpoints.", short="-o", path=True)
    # Decoder: a named size of DECODER_SIZES; the four overrides give tiny decoders for tests and the demonstration.
    model: str = option("vit-xl", "Decoder size: vit-b | vit-l | vit-xl.")
    decoder_patch: int = option(16, "Decoder patch size p_d; 2 x the encoder's upsamples (256 px tokens -> 512 px "
                                "images).", check=AT_LEAST_1)
    width: int | None = option(None, "Override the size's width (tiny decoders).", check=AT_LEAST_1)
    depth: int | None = option(None, "Override the size's depth.", check=AT_LEAST_1)
    # The field keeps the name the decoder (and every run's config.json) gives it; --num-heads as train-diffusion.
    heads: int | None = option(None, "Override the size's attention heads.", check=AT_LEAST_1, flag="--num-heads",
                               alias="--heads")
    mlp_dim: int | None = option(None, "Override the size's MLP hidden width.", check=AT_LEAST_1)
    # Loss (reference recipe).
    noise_tau: float = option(0.8, "Noise augmentation: sigma ~ tau * U(0, 1).", check=NON_NEGATIVE)
    lpips_weight: float = option(1.0, "w_L, weight of LPIPS; 0 turns it off.", check=NON_NEGATIVE)
    gan_weight: float = option(0.75, "w_G, weight of the adaptive GAN term; 0 turns it off.", check=NON_NEGATIVE)
    max_gan_lambda: float = option(1e4, "Cap of the adaptive GAN weight lambda.", check=NON_NEGATIVE)
    lpips_start_epoch: float = option(0, "LPIPS from this epoch.")
    disc_start_epoch: float = option(6, "Discriminator updates from this epoch.")
    gan_start_epoch: float = option(8, "GAN term in the decoder loss from this epoch.")
    lpips_start_step: int | None = option(None, "LPIPS from this step (wins over the epoch).")
    disc_start_step: int | None = option(None, "Discriminator updates from this step.")
    gan_start_step: int | None = option(None, "GAN term from this step.")
    # Loss networks: pretrained weights through timm / torch hub, or local files.
    disc_backbone: str = option(DINO_TIMM_NAME, "timm name of the frozen discriminator backbone (DINO ViT-S/8).")
    disc_weights: str | None = option(None, "Local DINO ViT-S/8 checkpoint (else timm / Hugging Face cache).", path=True)
    lpips_vgg_weights: str | None = option(None, "Local torchvision VGG16 weights (else the torch hub cache).",
                                           path=True)
    lpips_lin_weights: str | None = option(None, "Local LPIPS v0.1 vgg.pth (else the lpips package's copy).",
                                           path=True)
    random_loss_nets: bool = option(False, "Seeded random LPIPS and discriminator weights (demo only).")
    disc_aug_prob: float = option(1.0, "DiffAug probability.", check=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    disc_cutout: float = option(0.0, "DiffAug cutout size.", check=UNIT_INTERVAL)
    # Optimisation (reference recipe: 16 epochs, batch 512, AdamW, 1 warm-up epoch, cosine to 2e-5).
    epochs: float = option(16, "Training length in epochs.", check=POSITIVE)
    steps: int | None = option(None, "Training length in steps (wins over --epochs).", check=AT_LEAST_1)
    batch_size: int = option(512, "Global batch size, whatever the number of GPUs.", check=AT_LEAST_1)
    grad_accum: int = option(1, "Micro-batches per step and GPU, to save memory (not maths).", check=AT_LEAST_1)
    lr: float = option(2e-4, "Peak learning rate of the decoder.", check=POSITIVE)
    final_lr: float = option(2e-5, "Learning rate at the end of the cosine decay.", check=NON_NEGATIVE)
    disc_lr: float = option(2e-4, "Peak learning rate of the discriminator heads.", check=POSITIVE)
    disc_final_lr: float = option(2e-5, "Final learning rate of the discriminator heads.", check=NON_NEGATIVE)
    warmup_epochs: float = option(1, "Linear warm-up from zero, in epochs.", check=NON_NEGATIVE)
    warmup_steps: int | None = option(None, "Warm-up in steps (wins over --warmup-epochs).", check=NON_NEGATIVE)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas.")
    weight_decay: float = option(0.0, "AdamW weight decay.", check=NON_NEGATIVE)
    ema_decay: float = option(0.9978, "EMA decay of the decoder weights.", check=UNIT_INTERVAL)
    clip_grad: float | None = option(None, "Clip the decoder's gradient norm to this (reference: off).", check=POSITIVE)
    precision: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32.")
    seed: int = option(0, "Seed of initialisation, data order, noise and DiffAug.")
    # Run settings: they do not change the result, so a resume may change them.
    checkpoint_every: int | None = option(None, "Steps between checkpoints (default: once per epoch).",
                                          check=AT_LEAST_1)
    keep_checkpoints: int = option(2, "Checkpoints kept.", check=NON_NEGATIVE)
    preview_every: int | None = option(None, "Steps between reconstruction grids (default: once per epoch).",
                                       check=AT_LEAST_1)
    preview_count: int = option(8, "Fixed store entries shown in the grids.", check=NON_NEGATIVE)
    log_every: int = option(10, "Steps per metrics.jsonl record.", check=AT_LEAST_1)
    stop_after: int | None = option(None, "End this invocation after N steps (checkpointed; run again to go on), "
                                    "e.g. for wall-time limits.", check=AT_LEAST_1)
    num_workers: int = option(-1, "Data loading processes per rank (-1: the CPU cores / ranks, less one, at most 8).")
    device: str = option("auto", "auto | cuda | cpu.")
    compile: bool = option(False, "torch.compile the transformer blocks and LPIPS.")
    overwrite: bool = option(False, "Replace a run made with another configuration or input.")

    RUN_ONLY = ("latents", "out", "grad_accum", "checkpoint_every", "keep_checkpoints", "preview_every", "preview_count",
                "log_every", "stop_after", "num_workers", "device", "compile", "overwrite")

    def identity(self) -> dict:
        """The fields that define the trained decoder (compared on resume)."""
        return {k: v for k, v in jsonable(self).items() if k not in self.RUN_ONLY}


def _validate(cfg: TrainDecoderConfig) -> None:
    check_options(cfg)
    if cfg.model not in DECODER_SIZES:
        raise RaeError(f"unknown decoder --model '{cfg.model}'; choose one of: {', '.join(DECODER_SIZES)}")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise RaeError(f"--precision must be auto, bf16 or fp32 (got {cfg.precision})")
    if cfg.random_loss_nets and (cfg.disc_weights or cfg.lpips_vgg_weights or cfg.lpips_lin_weights):
        raise RaeError("--random-loss-nets and weight files for LPIPS or the discriminator exclude each other")
    size = decoder_size(cfg)
    if size["width"] % size["heads"] or size["width"] % 4:
        raise RaeError(f"decoder width {size['width']} must be divisible by 4 and by its {size['heads']} heads")


# ---------------------------------------------------------------------------------------------
# Pieces


def decoder_size(cfg: TrainDecoderConfig) -> dict:
    """The named size from DECODER_SIZES with any of width/depth/heads/mlp_dim overridden."""
    size = dict(DECODER_SIZES[cfg.model])
    size.update({k: getattr(cfg, k) for k in ("width", "depth", "heads", "mlp_dim") if getattr(cfg, k) is not None})
    return size


def decoder_architecture(cfg: TrainDecoderConfig, encoder: dict, latent_shape) -> dict:
    """``ViTDecoder`` keyword arguments for the store's latents: what config.json records and
    ``rae decode`` rebuilds. The decoder undoes the encoder's own input normalisation."""
    c, h, w = (int(s) for s in latent_shape)
    if h != w:
        raise ArtifactError(f"the decoder needs a square token grid, the store's latents are [{c}, {h}, {w}]")
    return dict(in_dim=c, grid=h, patch_size=cfg.decoder_patch, **decoder_size(cfg),
                image_mean=[float(v) for v in encoder["mean"]], image_std=[float(v) for v in encoder["std"]])


@dataclass(frozen=True)
class Schedule:
    """Step counts of a run: its length, the learning-rate warm-up and when each loss term is on."""
    total: int
    warmup: int
    steps_per_epoch: int
    losses: GanSchedule

    @classmethod
    def of(cls, cfg: TrainDecoderConfig, steps_per_epoch: int) -> "Schedule":
        def steps(given: int | None, epochs: float) -> int:
            return int(given) if given is not None else round(epochs * steps_per_epoch)

        losses = GanSchedule(disc_start=steps(cfg.disc_start_step, cfg.disc_start_epoch),
                             gan_start=steps(cfg.gan_start_step, cfg.gan_start_epoch),
                             lpips_start=steps(cfg.lpips_start_step, cfg.lpips_start_epoch))
        return cls(total=steps(cfg.steps, cfg.epochs), warmup=steps(cfg.warmup_steps, cfg.warmup_epochs),
                   steps_per_epoch=steps_per_epoch, losses=losses)


def learning_rate(step: int, base: float, final: float, warmup: int, total: int) -> float:
    """Linear warm-up from zero over ``warmup`` steps, then cosine decay from ``base`` to ``final``
    at ``total`` (the reference's "cosine, warmup_from_zero" schedule)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if step >= total:
        return final
    progress_ = (step - warmup) / max(total - warmup, 1)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress_))


def _seed(*keys: int) -> int:
    """A 64-bit seed from integers (numpy's SeedSequence hashing): streams keyed by (seed, step, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def noise_augment(z: torch.Tensor, tau: float, seed: int, step: int, first: int) -> torch.Tensor:
    """``add_noise`` sample by sample, each from its own stream keyed by (seed, step, position in the
    global batch): a sample gets the same noise on any number of GPUs, and again after a resume."""
    if tau <= 0:
        return z
    g = torch.Generator(z.device)
    out = torch.empty_like(z)
    for i in range(len(z)):
        g.manual_seed(_seed(seed, 0, step, first + i))
        out[i: i + 1] = add_noise(z[i: i + 1], tau, generator=g)
    return out


def last_layer_grads(x_hat: torch.Tensor, grad_rec: torch.Tensor, grad_gan: torch.Tensor,
                     last_layer: torch.Tensor) -> torch.Tensor:
    """[2, *W.shape]: the reconstruction and GAN losses' gradients at the decoder's last layer W.

    ``grad_rec`` and ``grad_gan`` are d(loss)/d(x_hat); pulled back through the output layer (a short
    path: the head and the un-patchify) they are the gradients at W."""
    return torch.stack([torch.autograd.grad(x_hat, last_layer, grad_outputs=g, retain_graph=True)[0]
                        for g in (grad_rec, grad_gan)]).float()


def lambda_from_grads(g: torch.Tensor, parts: int = 1, max_weight: float = 1e4, eps: float = 1e-6) -> torch.Tensor:
    """The adaptive GAN weight of ``losses.adaptive_gan_weight`` from ``last_layer_grads`` summed over
    this process's ``parts`` micro-batches. Under DDP each rank holds the gradients of its share of
    the batch, so they are averaged over ranks and micro-batches first: lambda is the global batch's,
    the same on every rank for any number of GPUs (the reference uses each rank's own)."""
    g = dist.all_reduce_sum(g) / (parts * dist.world_size())
    return (g[0].norm() / (g[1].norm() + eps)).clamp(0.0, max_weight)


def gan_lambda(x_hat: torch.Tensor, grad_rec: torch.Tensor, grad_gan: torch.Tensor, last_layer: torch.Tensor,
               max_weight: float = 1e4, eps: float = 1e-6) -> torch.Tensor:
    """Lambda of one batch: ``lambda_from_grads(last_layer_grads(...))``."""
    return lambda_from_grads(last_layer_grads(x_hat, grad_rec, grad_gan, last_layer), 1, max_weight, eps)


def random_lpips() -> LPIPS:
    """LPIPS with random weights from the current RNG, for the demonstration (offline, no VGG16 file).

    Learned LPIPS linear layers are non-negative; random ones are made so too, so that the value is
    still a distance (zero for equal images, growing with feature differences). Not a perceptual loss.
    """
    lpips = LPIPS(pretrained=False)
    with torch.no_grad():
        for lin in lpips.lins:
            lin.weight.abs_()
    return lpips


def build_loss_networks(cfg: TrainDecoderConfig) -> tuple[LPIPS | None, DinoDiscriminator | None, dict]:
    """LPIPS (when w_L > 0) and the discriminator (when w_G > 0), and a record of their weights.

    Pretrained weights come from the files given, else from the torch hub cache (VGG16) and timm /
    the Hugging Face cache (DINO ViT-S/8), downloaded on first use; offline with neither, a one-line
    error says what to fetch. ``random_loss_nets`` (the demonstration) gives both random weights.
    The discriminator heads (and any random weights) are initialised from ``seed``.
    """
    lpips = disc = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.lpips_weight > 0:
            lpips = random_lpips() if cfg.random_loss_nets else LPIPS(vgg_weights=cfg.lpips_vgg_weights,
                                                                        lin_weights=cfg.lpips_lin_weights)
        if cfg.gan_weight > 0:
            disc = DinoDiscriminator(weights=cfg.disc_weights, pretrained=not cfg.random_loss_nets,
                                     timm_name=cfg.disc_backbone, aug_prob=cfg.disc_aug_prob, cutout=cfg.disc_cutout)
    record = {"random_init": cfg.random_loss_nets,
              "lpips": {"vgg_weights": cfg.lpips_vgg_weights, "lin_weights": cfg.lpips_lin_weights} if lpips else None,
              "discriminator": {"backbone": cfg.disc_backbone, "weights": cfg.disc_weights,
                                "backbone_sha256": disc.backbone_sha256} if disc else None}
    return lpips, disc, record


class _RealFake(nn.Module):
    """D on the fakes and on the reals in one forward: one DDP forward per backward."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, fake: torch.Tensor, real: torch.Tensor, generators=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.disc(fake, augment=True, generators=generators), self.disc(real, augment=True, generators=generators)


def _synced(module: nn.Module, last: bool):
    """DDP's gradient all-reduce only on a step's last micro-batch (``no_sync`` before it)."""
    if last or not isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


# ---------------------------------------------------------------------------------------------
# One training step


class DecoderTraining:
    """The decoder, its EMA, the loss networks and both optimisers; ``step()`` is one training step.

    Under ``torchrun`` the decoder and the discriminator heads are wrapped in DDP (gradient sync);
    the step itself is the same code on one GPU, several, or the CPU.
    """

    def __init__(self, cfg: TrainDecoderConfig, arch: dict, schedule: Schedule, d: dist.Dist,
                 lpips: LPIPS | None, disc: DinoDiscriminator | None, precision: str):
        self.cfg, self.schedule, self.device = cfg, schedule, d.device
        self.rank, self.world = d.rank, d.world
        self.autocast = dict(device_type=d.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        # The same initial weights on every rank (DDP would broadcast rank 0's anyway).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.decoder = ViTDecoder(**arch).to(d.device)
        self.ema = copy.deepcopy(self.decoder).requires_grad_(False).eval()
        self.lpips = lpips.to(d.device) if lpips is not None else None
        self.disc = disc.to(d.device).eval() if disc is not None else None

        fused = dict(fused=True) if d.device.type == "cuda" else {}
        params = [p for p in self.decoder.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fused)
        self.opt_d = (torch.optim.AdamW(self.disc.heads.parameters(), lr=cfg.disc_lr, betas=tuple(cfg.betas),
                                        weight_decay=cfg.weight_decay, **fused) if self.disc is not None else None)
        if cfg.compile:
            self._compile()
        wrap = _ddp if d.world > 1 else (lambda m: m)
        self.train_forward = wrap(self.decoder)  # the decoder step: gradients synced across ranks
        self.disc_pair = wrap(_RealFake(self.disc)) if self.disc is not None else None

    def _compile(self) -> None:
        """Compile the transformer blocks and LPIPS in place ("regional" compilation). The decoder's
        output layer stays outside any compiled graph, so lambda's gradients at its last layer cost a
        pass through the head alone; a whole-model graph would replay the full backward for each."""
        for block in self.decoder.blocks:
            block.compile()
        if self.disc is not None:
            for block in self.disc.backbone.blocks:
                block.compile()
        if self.lpips is not None:
            self.lpips.compile()

    # ---- the step ------------------------------------------------------------------------------
    def lpips_on(self, step: int) -> bool:
        return self.lpips is not None and self.schedule.losses.lpips_active(step)

    def gan_on(self, step: int) -> bool:
        return self.disc is not None and self.schedule.losses.gan_active(step)

    def disc_on(self, step: int) -> bool:
        return self.disc is not None and self.schedule.losses.disc_active(step)

    def step(self, step: int, z: torch.Tensor, images: torch.Tensor, first: int = 0) -> dict[str, torch.Tensor]:
        """One decoder step, then (once active) one discriminator step, for global step ``step``.

        ``z``: this rank's latents [B, C, h, w] (raw encoder space); ``images``: the matching uint8
        images; ``first``: the position of this rank's first sample in the global batch. The batch is
        split into ``grad_accum`` micro-batches; micro-batch k of this rank computes what rank
        ``rank * grad_accum + k`` would compute alone.
        Returns this step's metrics: detached float64 tensors (no device sync) and the learning rates.
        """
        cfg, s, parts = self.cfg, self.schedule, self.cfg.grad_accum
        if len(z) % parts:
            raise RaeError(f"the per-process batch {len(z)} is not divisible by --grad-accum {parts}")
        micro = len(z) // parts
        slices = [slice(k * micro, (k + 1) * micro) for k in range(parts)]
        # DiffAug's draws: a stream per (seed, step, micro-batch of the global batch), so a resumed run
        # draws what it would have, and any split of the batch over processes draws the same.
        gens = [self._generators(_seed(cfg.seed, 1, step, self.rank * parts + k)) for k in range(parts)]
        x = images.float() / 255.0
        lr = learning_rate(step, cfg.lr, cfg.final_lr, s.warmup, s.total)
        for group in self.opt.param_groups:
            group["lr"] = lr
        metrics: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
        gan = self.gan_on(step)

        # 1. Decoder. The losses see a detached copy of the reconstruction; their gradients at the
        # image are pushed through the decoder in one backward. (The reference backpropagates the LPIPS
        # and D graphs twice, once for lambda and once for the loss: the same gradients, at more cost.)
        # With the GAN term, lambda needs the whole batch's gradients at the last layer before any
        # backward: each micro-batch's graph is kept when there is one, else its forward runs again.
        keep_graph = not gan or parts == 1
        self.opt.zero_grad(set_to_none=True)
        pending, g_last = [], None
        for k, part in enumerate(slices):
            z_noisy = noise_augment(z[part], cfg.noise_tau, cfg.seed, step, first + k * micro)
            with _synced(self.train_forward, k == parts - 1) if keep_graph else contextlib.nullcontext():
                with torch.autocast(**self.autocast):
                    x_hat = (self.train_forward if keep_graph else self.decoder)(z_noisy).float()
                grad_rec, grad_gan = self._loss_grads(step, x_hat, x[part], gens[k], metrics[k])
                if not gan:
                    x_hat.backward(grad_rec / parts if parts > 1 else grad_rec)
                    continue
            g = last_layer_grads(x_hat, grad_rec, grad_gan, self.decoder.last_layer_weight)
            g_last = g if g_last is None else g_last + g
            pending.append((k, z_noisy if not keep_graph else None, x_hat if keep_graph else None, grad_rec, grad_gan))
            del x_hat
        if gan:
            lam = lambda_from_grads(g_last, parts, cfg.max_gan_lambda)
            for k, z_noisy, x_hat, grad_rec, grad_gan in pending:
                if x_hat is None:  # the forward again, this time for the backward
                    with _synced(self.train_forward, k == parts - 1), torch.autocast(**self.autocast):
                        x_hat = self.train_forward(z_noisy).float()
                grad = grad_rec + cfg.gan_weight * lam * grad_gan
                x_hat.backward(grad / parts if parts > 1 else grad)
                metrics[k]["loss"] = metrics[k]["loss"] + cfg.gan_weight * lam * metrics[k]["gan"]
                metrics[k]["lambda"] = lam
            pending.clear()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), cfg.clip_grad)
                     if cfg.clip_grad else None)
        self.opt.step()
        self.update_ema()

        # 2. Discriminator: real images vs the updated decoder's clean reconstructions, as 8-bit images.
        d_lr = None
        if self.disc_on(step):
            d_lr = learning_rate(step - s.losses.disc_start, cfg.disc_lr, cfg.disc_final_lr, s.warmup, s.total)
            self._disc_step(z, x, slices, gens, d_lr, metrics)

        # Micro-batch means, summed in float64 (as the all-reduce over ranks sums them).
        out = {key: sum(m[key].double() for m in metrics) / parts for key in metrics[0]}
        out["lr"] = lr
        if grad_norm is not None:
            out["grad_norm"] = grad_norm.detach().double()
        if d_lr is not None:
            out["d_lr"] = d_lr
        return out

    def _generators(self, seed: int) -> tuple[torch.Generator, torch.Generator]:
        """(CPU, device) generators seeded with ``seed``: DiffAug's draws (one generator on the CPU)."""
        g_cpu = torch.Generator().manual_seed(seed)
        return g_cpu, (g_cpu if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(seed))

    def _loss_grads(self, step: int, x_hat: torch.Tensor, x: torch.Tensor, gens, metrics: dict):
        """The reconstruction and GAN losses of one micro-batch and their gradients at the image."""
        cfg = self.cfg
        image = x_hat.detach().requires_grad_(True)
        with torch.autocast(**self.autocast):
            metrics["l1"] = (image - x).abs().mean()
            rec = metrics["l1"]
            if self.lpips_on(step):
                metrics["lpips"] = self.lpips(image, x).mean()
                rec = rec + cfg.lpips_weight * metrics["lpips"]
            if self.gan_on(step):
                metrics["gan"] = generator_loss(self.disc(image, augment=True, generators=gens))  # D in eval mode
        grad_rec = torch.autograd.grad(rec, image)[0]
        metrics["loss"] = rec.detach()
        grad_gan = torch.autograd.grad(metrics["gan"], image)[0] if self.gan_on(step) else None
        for key in ("l1", "lpips", "gan"):
            if key in metrics:
                metrics[key] = metrics[key].detach().float()
        return grad_rec, grad_gan

    def _disc_step(self, z: torch.Tensor, x: torch.Tensor, slices, gens, d_lr: float, metrics) -> None:
        """One discriminator update over the micro-batches. Spectral norm's power iteration advances its
        vectors at every forward in train mode; each micro-batch starts from the step's vectors, so
        they end as one process's forward would leave them (on one GPU or several)."""
        parts = len(slices)
        for group in self.opt_d.param_groups:
            group["lr"] = d_lr
        vectors = [b.clone() for b in self.disc.heads.buffers()] if parts > 1 else None
        self.opt_d.zero_grad(set_to_none=True)
        self.disc.train()
        for k, part in enumerate(slices):
            if k:
                for b, saved in zip(self.disc.heads.buffers(), vectors):
                    b.copy_(saved)
            with torch.no_grad(), torch.autocast(**self.autocast):
                fake = round_to_8bit(self.decoder(z[part]).float())
            with _synced(self.disc_pair, k == parts - 1):
                with torch.autocast(**self.autocast):
                    logits_fake, logits_real = self.disc_pair(fake, x[part], gens[k])
                    d_loss = hinge_d_loss(logits_real.float(), logits_fake.float())
                (d_loss / parts if parts > 1 else d_loss).backward()
            metrics[k].update(d_loss=d_loss.detach(), d_accuracy=(logits_real > logits_fake).float().mean().detach(),
                              logits_real=logits_real.detach().float().mean(),
                              logits_fake=logits_fake.detach().float().mean())
        self.opt_d.step()
        self.disc.eval()

    @torch.no_grad()
    def update_ema(self) -> None:
        ema = [p for p in self.ema.parameters()]
        model = [p.detach() for p in self.decoder.parameters()]
        torch._foreach_lerp_(ema, model, 1.0 - self.cfg.ema_decay)  # ema <- decay * ema + (1 - decay) * model

    @torch.no_grad()
    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """EMA decoder on clean latents -> images in [0, 1] (clamped)."""
        with torch.autocast(**self.autocast):
            return self.ema(z.to(self.device)).float().clamp(0, 1)

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"decoder": self.decoder.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict()}
        if self.disc is not None:
            state.update(disc_heads=self.disc.heads.state_dict(), opt_d=self.opt_d.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.decoder.load_state_dict(state["decoder"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None:
            self.disc.heads.load_state_dict(state["disc_heads"])
            self.opt_d.load_state_dict(state["opt_d"])


def _ddp(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(module.parameters()).device
    return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
               gradient_as_bucket_view=True)


# ---------------------------------------------------------------------------------------------
# The run: inputs, resume, the loop, outputs


class _Reader(StoreReader):
    """Store batches with source images cropped at the decoder's output size. Usually the store's
    own size; an upsampling decoder (p_d = 2 p_e) learns 512 px images from the latents of 256 px ones."""

    def __init__(self, path: str, image_size: int):
        super().__init__(path, with_images=True)
        self.image_size = image_size

    def _open(self):
        store = super()._open()
        self._size = self.image_size
        return store


def _short(encoder: dict) -> str:
    return f"'{encoder.get('name')}' (weights {str(encoder.get('weights_sha256'))[:12]})"


def _prepare_run(cfg: TrainDecoderConfig, out: Path, wanted: dict, store_manifest: dict) -> str:
    """Rank 0: create, resume or refuse the run directory. Returns "done", "resume" or "new"."""
    if out.exists() and has_manifest(out):
        old = read_manifest(out, require_complete=False, what="run")
        if old.get("kind") != "decoder-run":
            raise ArtifactError(f"{out} is a {old.get('kind')}, not a decoder run; choose another --out")
        if old.get("identity") == digest_json(wanted):
            return "done" if old.get("complete") else "resume"
        if not cfg.overwrite:
            if old.get("encoder") != wanted["encoder"]:
                raise ArtifactError(f"{out} was trained on latents of encoder {_short(old.get('encoder') or {})}, but "
                                    f"{cfg.latents} holds latents of encoder {_short(wanted['encoder'])}; pass the "
                                    "store it was trained on, or --overwrite to start a new run there")
            if old.get("inputs", {}).get("latents", {}).get("content_id") != wanted["store"]:
                raise ArtifactError(f"{out} was trained on another latent store than {cfg.latents} (same encoder, "
                                    "other content); pass the store it was trained on, or --overwrite to start over")
            changed = sorted(k for k in set(wanted["config"]) | set(old.get("config", {}))
                             if k not in cfg.RUN_ONLY and old.get("config", {}).get(k) != wanted["config"].get(k))
            raise ArtifactError(f"{out} was made with a different configuration ({', '.join(changed) or 'format'}); "
                                "pass --overwrite to replace it, or choose another --out")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ArtifactError(f"{out} exists and is not a rae run; choose another --out")
        remove_store(out)  # refuses anything that is not a rae artifact
    out.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest("decoder-run", cfg, inputs={"latents": input_ref(cfg.latents, store_manifest)},
                            identity=digest_json(wanted), **{k: v for k, v in wanted.items() if k not in ("config", "store")})
    write_manifest(out, manifest)
    return "new"


def _decoder_config(arch: dict, cfg: TrainDecoderConfig, store_manifest: dict, stats_sha: str) -> dict:
    """config.json: everything ``rae decode`` needs to rebuild the decoder and check its input."""
    return {"architecture": "ViTDecoder", "model": cfg.model, "decoder": arch,
            "image_size": arch["grid"] * arch["patch_size"], "weights": EMA_WEIGHTS,
            "encoder": store_manifest["encoder"], "latent_shape": store_manifest["latent_shape"],
            "latent_space": "raw encoder space (as stored; not normalised)",
            "latent_statistics": {"file": LATENT_STATS, "sha256": stats_sha,
                                  "store_content_id": store_manifest.get("content_id")},
            "noise_tau": cfg.noise_tau}


class _Metrics:
    """Per-step metrics summed on the device and written as interval means to metrics.jsonl (rank 0).

    Losses are averaged over ranks (the global batch's values). ``step`` counts the steps done."""

    def __init__(self, path: Path | None, global_batch: int):
        self.path, self.global_batch = path, global_batch
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.t0 = 0, time.time()
        self.records: list[dict] = []

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def _summed_over_ranks(self) -> dict[str, float]:
        """The interval's sums, in float64, summed over ranks (a collective: every rank calls it)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        values = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device="cpu") for k in keys])
        return dict(zip(keys, dist.all_reduce_sum(values).tolist()))

    def partial_state(self) -> dict:
        """The interval logged so far, over all ranks. A checkpoint keeps it, so a run resumed between
        two log steps writes the same interval means as an uninterrupted one."""
        return {"sums": self._summed_over_ranks(), "counts": dict(self.counts), "steps": self.steps}

    def restore(self, state: dict | None, is_main: bool) -> None:
        """Continue the interval of ``partial_state``: its sums on rank 0 (they are over all ranks already)."""
        if state:
            self.sums = {k: v if is_main else 0.0 for k, v in state["sums"].items()}
            self.counts, self.steps = {k: int(v) for k, v in state["counts"].items()}, int(state["steps"])

    def flush(self, step: int, world: int) -> dict | None:
        if not self.steps:
            return None
        sums = self._summed_over_ranks()
        elapsed = max(time.time() - self.t0, 1e-9)
        record = {"step": step, **{k: v / world / self.counts[k] for k, v in sums.items()},
                  "img_per_s": self.steps * self.global_batch / elapsed}
        self.sums, self.counts, self.steps, self.t0 = {}, {}, 0, time.time()
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.records.append(record)
        return record


def read_metrics(run: str | os.PathLike) -> list[dict]:
    return read_jsonl(Path(run) / METRICS)


def _truncate_metrics(path: Path, step: int) -> list[dict]:
    """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
    kept = [r for r in read_metrics(path.parent) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def save_recon_grid(path: Path, originals: torch.Tensor, recons: torch.Tensor, per_row: int = 4) -> None:
    """PNG of (original | reconstruction) pairs, ``per_row`` pairs per row, 2 px gaps."""
    from PIL import Image

    n, _, h, w = recons.shape
    originals = torch.nn.functional.interpolate(originals.float(), size=(h, w), mode="nearest") \
        if originals.shape[-1] != w else originals.float()
    per_row = min(per_row, n)
    rows, gap = math.ceil(n / per_row), 2
    canvas = np.full((rows * (h + gap) + gap, per_row * (2 * w + 3 * gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        y, x = gap + r * (h + gap), gap + c * (2 * w + 3 * gap)
        for k, img in enumerate((originals[i], recons[i] * 255)):
            pixels = img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            canvas[y: y + h, x + k * (w + gap): x + k * (w + gap) + w] = pixels
    Image.fromarray(canvas).save(path)


def plot_losses(records: list[dict], path: Path) -> None:
    """A small-multiples loss plot (one panel per metric, own y range) drawn with PIL."""
    from PIL import Image, ImageDraw

    keys = [k for k in ("l1", "lpips", "gan", "lambda", "d_loss", "d_accuracy", "lr") if any(k in r for r in records)]
    if not records or not keys:
        return
    pw, ph, pad = 360, 180, 36
    cols = 2
    rows = math.ceil(len(keys) / cols)
    img = Image.new("RGB", (cols * pw, rows * ph), "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in records]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    for n, key in enumerate(keys):
        ox, oy = (n % cols) * pw, (n // cols) * ph
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        left, top, right, bottom = ox + pad + 20, oy + 22, ox + pw - 10, oy + ph - pad + 10
        draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
        draw.text((ox + 8, oy + 4), key, fill="black")
        if not pts:
            continue
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        hi = hi if hi > lo else lo + 1e-12 + abs(lo) * 0.01
        xy = [(left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top)) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=(31, 119, 180), width=2)
        else:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=(31, 119, 180))
        draw.text((ox + 4, top - 2), f"{hi:.3g}", fill=(90, 90, 90))
        draw.text((ox + 4, bottom - 10), f"{lo:.3g}", fill=(90, 90, 90))
        draw.text((left, bottom + 4), f"step {s0}", fill=(90, 90, 90))
        draw.text((right - draw.textlength(str(s1)), bottom + 4), str(s1), fill=(90, 90, 90))
    img.save(path)


def run(cfg: TrainDecoderConfig) -> dict:
    _validate(cfg)
    d = dist.init(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if d.device.type == "cuda" else "fp32")
    cfg.precision = precision
    out = Path(cfg.out)
    store_manifest, store = open_complete_store(cfg.latents, kind=("latent-store",))
    encoder = store_manifest["encoder"]
    arch = decoder_architecture(cfg, encoder, store.latent_shape)
    image_size = arch["grid"] * arch["patch_size"]
    plan = BatchPlan.for_store(store, cfg.batch_size, cfg.seed, d.rank, d.world)
    if (cfg.batch_size // d.world) % cfg.grad_accum:
        raise RaeError(f"the per-process batch {cfg.batch_size // d.world} (= {cfg.batch_size} / {d.world} processes) "
                       f"is not divisible by --grad-accum {cfg.grad_accum}")
    schedule = Schedule.of(cfg, plan.steps_per_epoch)
    mean, var = store.statistics()
    stats_sha = hashlib.sha256(mean.tobytes() + var.tobytes()).hexdigest()
    wanted = {"config": cfg.identity(), "encoder": encoder, "store": store_manifest.get("content_id"),
              "latent_shape": store_manifest["latent_shape"], "decoder": arch, "image_size": image_size,
              "latent_statistics": {"sha256": stats_sha, "store_content_id": store_manifest.get("content_id")},
              "steps": schedule.total, "steps_per_epoch": schedule.steps_per_epoch}

    state = dist.main_decides(lambda: _prepare_run(cfg, out, wanted, store_manifest))
    if state == "done":
        if d.is_main:
            console.print(f"{out} is already complete; nothing to do.")
        return summary(out)

    lpips, disc, loss_nets = build_loss_networks(cfg)
    training = DecoderTraining(cfg, arch, schedule, d, lpips, disc, precision)
    start = 0
    found = resume_state(out, say=lambda line: console.print(line, highlight=False) if d.is_main else None)
    if found is not None:
        ckpt, saved = found
        if saved.get("identity") != digest_json(wanted):
            raise ArtifactError(f"{ckpt} belongs to another configuration than {out}/manifest.json; remove it or --overwrite")
        training.load_state_dict(saved["training"])
        start = int(saved["step"])
    stop = min(schedule.total, cfg.stop_after) if cfg.stop_after is not None else schedule.total
    every_epoch = max(schedule.steps_per_epoch, 1)
    ckpt_every = cfg.checkpoint_every or every_epoch
    preview_every = cfg.preview_every or every_epoch

    metrics = _Metrics(out / METRICS if d.is_main else None, cfg.batch_size)
    if found is not None:
        metrics.restore(saved.get("metrics"), d.is_main)
    previews = None
    if d.is_main:  # (re)written on every start: the same content, and a kill right after creation loses nothing
        save_weights(out / LATENT_STATS, {"mean": torch.from_numpy(mean), "var": torch.from_numpy(var)})
        atomic_write_json(out / CONFIG, _decoder_config(arch, cfg, store_manifest, stats_sha))
        manifest = read_manifest(out, require_complete=False)
        manifest["loss_networks"] = loss_nets
        write_manifest(out, manifest)
        metrics.records = _truncate_metrics(out / METRICS, start)
        (out / "previews").mkdir(exist_ok=True)
        valid = store.valid_indices()  # fixed entries spread over the store (its classes are in order)
        fixed = valid[np.linspace(0, len(valid) - 1, min(cfg.preview_count, len(valid))).round().astype(int)]
        z_fixed, _, img_fixed = _Reader(cfg.latents, image_size)(fixed)
        previews = (z_fixed, img_fixed)
        _announce(cfg, d, arch, schedule, start, loss_nets)

    per_rank = cfg.batch_size // d.world
    workers = cfg.num_workers if cfg.num_workers >= 0 else max(1, min(8, (os.cpu_count() or 2) // d.world - 1))
    loader = batches(plan, _Reader(cfg.latents, image_size), start, stop, num_workers=workers,
                     pin_memory=d.device.type == "cuda")
    t0, done = time.time(), 0
    step = start
    with progress(stop * cfg.batch_size, "train-decoder", unit="img", completed=start * cfg.batch_size) as advance:
        for z, _, images in loader:
            z = z.to(d.device, non_blocking=True)
            images = images.to(d.device, non_blocking=True)
            metrics.add(training.step(step, z, images, first=d.rank * per_rank))
            step += 1
            done += 1
            info = {}
            if step % cfg.log_every == 0 or step == schedule.total:  # (--stop-after keeps the interval open)
                record = metrics.flush(step, d.world)
                info = {k: record[k] for k in ("l1", "lpips", "gan", "d_loss") if k in record}
            advance(cfg.batch_size, **info)
            if d.is_main and (step % preview_every == 0 or step == schedule.total):
                _preview(training, previews, out / "previews" / f"step_{step:08d}.png")
                plot_losses(metrics.records, out / "losses.png")
            if step % ckpt_every == 0 or step == stop:
                partial = metrics.partial_state()
                if d.is_main:
                    save_checkpoint(out, step, {"step": step, "identity": digest_json(wanted), "metrics": partial,
                                                "training": training.state_dict()}, keep=cfg.keep_checkpoints)
                dist.barrier()
    elapsed = time.time() - t0
    if step < schedule.total:  # stopped early on purpose (--stop-after): resumable
        result = {"run": str(out), "step": step, "steps": schedule.total, "complete": False}
    else:
        if d.is_main:
            _finalize(training, previews, out, metrics.records)
        dist.barrier()
        result = summary(out)
    result["images_per_second"] = done * cfg.batch_size / elapsed if elapsed > 0 and done else 0.0
    return result


def _announce(cfg, d, arch, schedule: Schedule, start: int, loss_nets: dict) -> None:
    n_params = sum(math.prod(p) for p in _param_shapes(arch))
    what = "resuming at step %d" % start if start else "starting"
    console.print(f"train-decoder: {cfg.model} decoder ({n_params / 1e6:.2f}M parameters, p_d={arch['patch_size']}, "
                  f"{arch['grid'] * arch['patch_size']} px), {schedule.total} steps of {cfg.batch_size} "
                  f"({schedule.steps_per_epoch} per epoch) on {d.world} process(es), {cfg.precision}; {what}",
                  highlight=False)
    console.print(f"  LPIPS from step {schedule.losses.lpips_start}, D updates from step {schedule.losses.disc_start}, "
                  f"GAN term from step {schedule.losses.gan_start}", highlight=False)
    if cfg.random_loss_nets and (loss_nets["lpips"] or loss_nets["discriminator"]):
        console.print("[bold yellow]warning:[/] LPIPS (VGG16) and the discriminator backbone "
                      f"({cfg.disc_backbone}) have RANDOM weights (demonstration): the perceptual and GAN terms "
                      "are not the real ones and this decoder is not a real RAE decoder", highlight=False)


def _param_shapes(arch: dict):
    with torch.device("meta"):
        return [tuple(p.shape) for p in ViTDecoder(**arch).parameters()]


def _preview(training: DecoderTraining, previews, path: Path) -> None:
    z, images = previews
    save_recon_grid(path, images, training.reconstruct(z).cpu())


def _finalize(training: DecoderTraining, previews, out: Path, records: list[dict]) -> None:
    """Rank 0: final weights, grids, plot, and the manifest marked complete (the last write)."""
    save_weights(out / WEIGHTS, training.decoder.state_dict())
    save_weights(out / EMA_WEIGHTS, training.ema.state_dict())
    _preview(training, previews, out / "reconstructions.png")
    plot_losses(records, out / "losses.png")
    remove_temporaries(out)
    manifest = read_manifest(out, require_complete=False)
    manifest["content_id"] = sha256_file(out / EMA_WEIGHTS)
    manifest["final_metrics"] = records[-1] if records else {}
    manifest["complete"] = True
    write_manifest(out, manifest)


def summary(out: Path) -> dict:
    manifest = read_manifest(out, kind="decoder-run", what="decoder run")
    return {"run": str(out), "step": manifest["steps"], "steps": manifest["steps"], "complete": True,
            "weights": str(Path(out) / EMA_WEIGHTS), "content_id": manifest["content_id"],
            "final_metrics": manifest.get("final_metrics", {}), "encoder": manifest["encoder"]["name"]}
