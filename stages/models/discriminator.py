"""The decoder's GAN discriminator: a frozen DINO ViT-S/8 with small trainable heads, plus DiffAug.

As in the reference (after StyleGAN-T): the self-supervised DINO features already tell real from
blurry, so only light 1-D convolutional heads over the token sequence are trained, one per tapped
depth, each giving one logit per token. Images are augmented differentiably (DiffAug) before
the discriminator sees them, real and fake alike, which keeps D from overfitting.

Conventions: ``DinoDiscriminator.forward`` takes images in [0, 1]; internally (like the reference)
everything up to the DINO input normalisation works on [-1, 1] images, including ``diffaug``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from .imagenet import IMAGENET_MEAN, IMAGENET_STD

DINO_TIMM_NAME = "vit_small_patch8_224.dino"


def diffaug(x: torch.Tensor, prob: float = 1.0, cutout: float = 0.0,
            generators: tuple[torch.Generator, torch.Generator] | None = None) -> torch.Tensor:
    """DiffAugment as the reference configures it, on [-1, 1] images [B, C, H, W] (float32 out).

    With probability ``prob`` each (one draw per call): translation by up to 1/8 of the size with
    zero fill, colour (brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5]), and cutout of a
    ``cutout``-sized square (the reference recipe: prob 1, cutout 0). Random offsets are per sample;
    the draws follow the reference's order so both give the same images from the same seed.
    ``generators``: (CPU generator, generator of x's device) to draw from; None: the global RNGs.
    """
    x = x.float()
    if prob < 1e-6:
        return x
    g_cpu, g_dev = generators if generators is not None else (None, None)
    translate, color, cut = (torch.rand(3, generator=g_cpu) <= prob).tolist()
    b, _, h, w = x.shape
    r = torch.rand(7, b, 1, 1, device=x.device, generator=g_dev)  # per-sample uniforms, one row per use below
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)

    if translate:
        dh, dw = round(h * 0.125), round(w * 0.125)
        src_rows = rows + (r[0] * (2 * dh + 1)).floor().long() - dh  # [B, H, 1]
        src_cols = cols + (r[1] * (2 * dw + 1)).floor().long() - dw  # [B, 1, W]
        inside = (src_rows >= 0) & (src_rows < h) & (src_cols >= 0) & (src_cols < w)  # [B, H, W]
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        shifted = x.permute(0, 2, 3, 1)[batch, src_rows.clamp(0, h - 1), src_cols.clamp(0, w - 1)]
        x = torch.where(inside.unsqueeze(1), shifted.permute(0, 3, 1, 2), 0.0)

    if color:
        x = x + (r[2] - 0.5).unsqueeze(1)  # brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (r[3] * 2).unsqueeze(1) + mean  # saturation
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (r[4] + 0.5).unsqueeze(1) + mean  # contrast

    if cut:
        ch, cw = round(h * cutout), round(w * cutout)
        top = (r[5] * (h + 1 - ch % 2)).floor().long() - ch // 2
        left = (r[6] * (w + 1 - cw % 2)).floor().long() - cw // 2
        hole = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
        x = x * (~hole).unsqueeze(1).to(x.dtype)
    return x


def round_to_8bit(images: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels: D's fakes look like stored images, as its reals do."""
    return images.clamp(0, 1).mul(255).round().div(255)


class TokenNorm(nn.Module):
    """Per-sample normalisation of each channel over the tokens, with affine (float32 inside).

    The reference's "local batch norm" with a virtual batch of 1: no statistics are shared across
    samples, so real and fake batches can be mixed freely and there are no running statistics.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L]
        x = x.float()
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight[:, None] + self.bias[:, None]


class Residual(nn.Module):
    """(f(x) + x) / sqrt(2): keeps the activation scale of a residual branch at init."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


def _conv(c_in: int, c_out: int, kernel_size: int, spectral: bool) -> nn.Module:
    # Circular padding: the token sequence has no meaningful ends.
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12) if spectral else conv


def _conv_block(channels: int, kernel_size: int, norm_eps: float, spectral: bool) -> nn.Sequential:
    return nn.Sequential(_conv(channels, channels, kernel_size, spectral), TokenNorm(channels, norm_eps),
                         nn.LeakyReLU(0.2))


def _head(channels: int, kernel_size: int, norm_eps: float, spectral: bool) -> nn.Sequential:
    """Token features [B, C, L] -> one logit per token [B, 1, L]."""
    return nn.Sequential(
        _conv_block(channels, 1, norm_eps, spectral),
        Residual(_conv_block(channels, kernel_size, norm_eps, spectral)),
        _conv(channels, 1, 1, spectral),
    )


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT-S/8 + one trainable head per tapped block (reference recipe: ks 9, spectral norm).

    ``forward(images)``: images [B, 3, H, W] in [0, 1] -> logits [B, n_heads * 784]. The heads see
    the token outputs of the last block and of blocks ``key_depths`` (block outputs, before the
    final LayerNorm). Inputs are resized (bilinear) to 224 and ImageNet-normalised as in the
    reference. ``augment=True`` applies ``diffaug`` first (the reference augments every D input).

    ``backbone``: a timm DINO ViT with its weights already loaded (``stages.models.weights.
    load_discriminator`` builds one from a file or the caches). It stays frozen and in eval mode;
    gradients still flow through it to the images, as the decoder's GAN loss needs. Optimise
    ``heads.parameters()``. As in the reference, call ``.eval()`` for the decoder's step (no
    spectral-norm power iteration) and ``.train()`` for the discriminator's own update.
    """

    def __init__(self, backbone: nn.Module, backbone_sha256: str | None = None, kernel_size: int = 9,
                 key_depths: tuple[int, ...] = (2, 5, 8, 11), spectral: bool = True, norm_eps: float = 1e-6,
                 aug_prob: float = 1.0, cutout: float = 0.0):
        super().__init__()
        self.backbone_sha256 = backbone_sha256
        self.backbone = backbone.eval().requires_grad_(False)
        depth = len(backbone.blocks)
        self.key_depths = tuple(d for d in key_depths if d < depth)
        self.input_size = backbone.patch_embed.img_size[0]
        self.aug_prob, self.cutout = aug_prob, cutout
        width = backbone.embed_dim
        self.heads = nn.ModuleList(
            [_head(width, kernel_size, norm_eps, spectral) for _ in range(len(self.key_depths) + 1)])
        # [-1, 1] -> ImageNet-normalised: ((x + 1) / 2 - mean) / std = x * scale + shift
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("x_scale", 0.5 / std, persistent=False)
        self.register_buffer("x_shift", (0.5 - mean) / std, persistent=False)

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()  # frozen: always in inference mode
        return self

    def features(self, x_pm1: torch.Tensor) -> list[torch.Tensor]:
        """[-1, 1] images -> token features [B, C, L]: the last block's, then each key depth's."""
        x = F.interpolate(x_pm1, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = x * self.x_scale + self.x_shift
        last = len(self.backbone.blocks) - 1
        taps = self.backbone.forward_intermediates(x, indices=sorted(set(self.key_depths) | {last}),
                                                   output_fmt="NLC", intermediates_only=True, stop_early=True)
        by_depth = dict(zip(sorted(set(self.key_depths) | {last}), taps))
        return [by_depth[d].transpose(1, 2) for d in (last, *self.key_depths)]

    def forward(self, images: torch.Tensor, augment: bool = True,
                generators: tuple[torch.Generator, torch.Generator] | None = None) -> torch.Tensor:
        x = images * 2 - 1
        if augment:
            x = diffaug(x, self.aug_prob, self.cutout, generators)
        feats = self.features(x)
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, feats)], dim=1)
