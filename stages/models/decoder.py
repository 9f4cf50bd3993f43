"""The RAE pixel decoder: an MAE-style ViT that maps frozen-encoder tokens back to pixels.

Each of the h*w encoder tokens is linearly embedded to the decoder width, a trainable CLS token
is prepended, a fixed 2-D sin-cos position embedding is added, pre-norm transformer blocks run,
a final LayerNorm and a linear head give p_d*p_d*3 pixels per token, and the CLS output is
dropped before the tokens are laid out as an image. The decoder works in the encoder's input
space (ImageNet-normalised pixels for DINOv2), so the last step undoes that normalisation.

Choosing p_d = 2 * p_e upsamples: the same 16x16 tokens of a 256x256 image decode to 512x512.

Parameter names map one-to-one onto the reference implementation's ``GeneralDecoder``
(``from_reference_state_dict`` / ``to_reference_state_dict``), so released decoders load.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn
from timm.layers import Attention, Mlp

from .imagenet import IMAGENET_MEAN, IMAGENET_STD
from .pos_embed import sincos_pos_embed_2d


def add_noise(z: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise augmentation of the paper (``noise_tau``): z + sigma * N(0, I), sigma = tau * U(0, 1).

    One sigma per sample, so the decoder sees every noise level from clean to tau during training
    and becomes robust to the imperfect latents a diffusion model generates. Training only: the
    decoder's ``forward`` never adds noise, the training loop calls this on the G step's input.
    """
    if tau <= 0:
        return z
    sigma = tau * torch.rand((z.shape[0],) + (1,) * (z.dim() - 1), generator=generator,
                             device=z.device, dtype=z.dtype)
    return z + sigma * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)


class DecoderBlock(nn.Module):
    """Pre-norm ViT block (ViT-MAE decoder layer): x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, norm_eps: float = 1e-12):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)  # fused scaled_dot_product_attention
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, hidden_features=mlp_dim, act_layer=nn.GELU)  # exact (erf) GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDecoder(nn.Module):
    """Encoder latents [B, in_dim, grid, grid] (raw encoder space) -> images [B, 3, H, W] in [0, 1].

    H = W = grid * patch_size. The output is not clamped: the L1/LPIPS/GAN losses see the raw
    values, and whoever writes images clamps.
    """

    def __init__(self, in_dim: int, grid: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_dim: int, image_mean: tuple[float, ...] = IMAGENET_MEAN,
                 image_std: tuple[float, ...] = IMAGENET_STD, norm_eps: float = 1e-12):
        super().__init__()
        self.in_dim, self.grid, self.patch_size = in_dim, grid, patch_size
        self.embed = nn.Linear(in_dim, width)
        # The reference initialises the CLS token to zero and leaves every Linear at PyTorch's default.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # Fixed, not learned; a frozen Parameter (as in MAE/DiT and the reference) so released
        # checkpoints carry it and the reference's parameter counts include it. Slot 0 (CLS) is zero.
        pos = torch.cat([torch.zeros(1, width), sincos_pos_embed_2d(width, grid)], dim=0)
        self.pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([DecoderBlock(width, heads, mlp_dim, norm_eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.head = nn.Linear(width, patch_size * patch_size * 3)
        # The encoder's input normalisation, undone at the end (configuration, not weights).
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """The pixel head's weight: where the adaptive GAN weight compares gradient norms."""
        return self.head.weight

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, grid*grid, p*p*3] (pixels of a patch in (row, col, channel) order) -> [B, 3, H, W]."""
        b, g, p = x.shape[0], self.grid, self.patch_size
        x = x.reshape(b, g, g, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, g * p, g * p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or tuple(z.shape[1:]) != (self.in_dim, self.grid, self.grid):
            raise ValueError(f"decoder expects latents [B, {self.in_dim}, {self.grid}, {self.grid}], "
                             f"got {list(z.shape)}")
        x = self.embed(z.flatten(2).transpose(1, 2))  # tokens in row-major order
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm(x))
        # The CLS token runs through every layer (as in the reference) but carries no pixels.
        x = self.unpatchify(x[:, 1:])
        return x * self.image_std + self.image_mean


# The paper's decoder sizes (width / depth / heads / MLP hidden size).
DECODER_SIZES = {
    "vit-b": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "vit-l": dict(width=1024, depth=24, heads=16, mlp_dim=4096),
    "vit-xl": dict(width=1152, depth=28, heads=16, mlp_dim=4096),
}


def create_decoder(size: str, in_dim: int, grid: int, patch_size: int, **kwargs) -> ViTDecoder:
    """``create_decoder("vit-xl", in_dim=768, grid=16, patch_size=16)``: a named size from DECODER_SIZES."""
    if size not in DECODER_SIZES:
        raise ValueError(f"unknown decoder size {size!r}; choose from {', '.join(DECODER_SIZES)}")
    return ViTDecoder(in_dim=in_dim, grid=grid, patch_size=patch_size, **DECODER_SIZES[size], **kwargs)


# ---------------------------------------------------------------------------------------------
# State-dict conversion to and from the reference implementation (GeneralDecoder, built on the
# Hugging Face ViT-MAE layer). Only names change, except that the reference keeps separate
# query/key/value projections where we keep one fused qkv projection.

_RENAMES = [  # (reference pattern, ours); {i} is the layer index
    ("decoder_embed.", "embed."),
    ("trainable_cls_token", "cls_token"),
    ("decoder_pos_embed", "pos_embed"),
    ("decoder_norm.", "norm."),
    ("decoder_pred.", "head."),
    ("decoder_layers.{i}.layernorm_before.", "blocks.{i}.norm1."),
    ("decoder_layers.{i}.attention.output.dense.", "blocks.{i}.attn.proj."),
    ("decoder_layers.{i}.layernorm_after.", "blocks.{i}.norm2."),
    ("decoder_layers.{i}.intermediate.dense.", "blocks.{i}.mlp.fc1."),
    ("decoder_layers.{i}.output.dense.", "blocks.{i}.mlp.fc2."),
]
_REF_QKV = re.compile(r"decoder_layers\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_OUR_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    """Apply the first matching (prefix -> prefix) rule of ``table``; None if no rule matches."""
    for src, dst in table:
        m = re.match(re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)"), key)
        if m:
            index = m.groupdict().get("i") or ""
            return dst.replace("{i}", index) + key[m.end():]
    return None


def from_reference_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference decoder state dict (e.g. a released ``model.pt``) -> ours.

    Accepts keys with a ``module.`` / ``_orig_mod.`` / ``decoder.`` prefix (DDP, compile, a whole
    RAE). Raises ValueError on keys that are not part of the decoder.
    """
    out, qkv, unknown = {}, {}, []
    for key, value in sd.items():
        for prefix in ("module.", "_orig_mod.", "decoder."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        m = _REF_QKV.match(key)
        if m:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
            continue
        new = _rename(key, _RENAMES)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"reference decoder layer {i}: incomplete query/key/value {kind}s")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unknown:
        raise ValueError(f"not a reference decoder state dict: unexpected keys {unknown[:5]}")
    return out


def to_reference_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our decoder state dict -> the reference ``GeneralDecoder`` key names (inverse of the above)."""
    inverse = [(dst, src) for src, dst in _RENAMES]
    out = {}
    for key, value in sd.items():
        m = _OUR_QKV.match(key)
        if m:
            i, kind = m.groups()
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"decoder_layers.{i}.attention.attention.{name}.{kind}"] = part.clone()
            continue
        new = _rename(key, inverse)
        if new is None:
            raise ValueError(f"not a ViTDecoder state dict: unexpected key {key!r}")
        out[new] = value
    return out


def pixels(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, 3, H, W] where they are: clamp, x255, truncate (as the reference and ADM)."""
    return images.float().clamp(0, 1).mul(255).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] on the CPU: ``pixels``, as an image file holds them."""
    return pixels(images).permute(0, 2, 3, 1).cpu().numpy()
