"""The decoder-training losses: L1 + w_L * LPIPS(VGG) + w_G * lambda * GAN (paper, Sec. 3 / App. C).

* ``LPIPS`` (``stages.models.lpips``): the standard LPIPS v0.1 with a VGG16 trunk.
* ``hinge_d_loss`` for the discriminator, ``generator_loss`` (-E[D(fake)]) for the decoder.
* ``adaptive_gan_weight``: lambda = ||grad L_rec|| / ||grad L_GAN|| at the decoder's last layer, so
  the GAN term neither drowns nor is drowned by the reconstruction terms.
* ``GanSchedule``: when the discriminator starts updating and when the GAN term enters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Decoder's GAN loss -E[D(fake)]: the reference's (and VQGAN's) companion of the hinge D loss."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4, eps: float = 1e-6) -> torch.Tensor:
    """lambda = ||d rec_loss / d W|| / (||d gan_loss / d W|| + eps) at the last layer W, clamped to
    [0, max_weight] and detached (reference: eps 1e-6, cap 1e4; rec_loss = L1 + w_L * LPIPS).

    Both graphs are kept (retain_graph) so the total loss can still be backpropagated.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + eps)).clamp(0.0, max_weight).detach()


@dataclass(frozen=True)
class GanSchedule:
    """Which loss terms are on at a global step (reference: LPIPS from epoch 0, D updates from epoch 6,
    the GAN term in the decoder loss from epoch 8 - D gets a head start on a decoder trained without it)."""

    disc_start: int
    gan_start: int
    lpips_start: int = 0

    @classmethod
    def from_epochs(cls, steps_per_epoch: int, disc_epoch: float = 6, gan_epoch: float = 8,
                    lpips_epoch: float = 0) -> "GanSchedule":
        return cls(disc_start=round(disc_epoch * steps_per_epoch), gan_start=round(gan_epoch * steps_per_epoch),
                   lpips_start=round(lpips_epoch * steps_per_epoch))

    def disc_active(self, step: int) -> bool:
        """Update the discriminator at this step."""
        return step >= self.disc_start

    def gan_active(self, step: int) -> bool:
        """Add the adaptive-weighted GAN term to the decoder loss at this step."""
        return step >= self.gan_start

    def lpips_active(self, step: int) -> bool:
        return step >= self.lpips_start
