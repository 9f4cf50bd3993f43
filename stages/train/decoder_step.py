"""One training step of the RAE pixel decoder (``rae train-decoder``), and what it needs: the
schedule, the latent noise augmentation, the adaptive GAN weight and the loss networks.

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
(DiffAug's of the micro-batch: rank x --grad-accum + index), so the latent noise and lambda do not
depend on the number of GPUs, and a resumed run draws what the interrupted one would have. With the
GAN term on, lambda needs every micro-batch's gradients at the last layer before any backward, so
each micro-batch's decoder forward runs twice (once for lambda, once for the backward).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .. import dist
from ..errors import RaeError
from ..models.decoder import ViTDecoder, add_noise
from ..models.discriminator import DinoDiscriminator, round_to_8bit
from ..models.lpips import LPIPS
from ..models.weights import load_discriminator
from .config import TrainDecoderConfig
from .losses import GanSchedule, generator_loss, hinge_d_loss



# ---------------------------------------------------------------------------------------------
# The schedule and the pieces of a step


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
            disc = load_discriminator(cfg.disc_weights, pretrained=not cfg.random_loss_nets, timm_name=cfg.disc_backbone,
                                      aug_prob=cfg.disc_aug_prob, cutout=cfg.disc_cutout)
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
