"""Diffusion transformers for RAE latents: DiT (the LightningDiT variant) and DiT^DH.

Both predict the flow-matching velocity v = eps - x for a noisy latent x_t of shape [C, H, W]
(C = the encoder's token dimension, e.g. 768 for DINOv2-B; H = W = 16 at 256px), a time t in
[0, 1] (t = 1 is pure noise) and a class label y (``num_classes`` is the null label used for
classifier-free guidance).

DiT block (LightningDiT): adaLN-Zero modulation, RMSNorm, SwiGLU MLP, 2-D RoPE in attention,
fixed 2-D sin-cos position embedding, Gaussian-Fourier time embedding, patch size 1.

DiT^DH (the paper's "wide diffusion head"): a DiT trunk M computes z = M(x_t | t, y); a shallow,
wide head H (2 blocks of width 2048) embeds x_t again at its own width and is modulated *per
token* by silu(t + z), projected to the head width: v = H(x_t | z, t). The head, not the trunk,
has to be at least as wide as the token dimension (the paper's width rule).

Parameter and buffer names are those of the authors' implementation, so its checkpoints load
directly (``from_reference_state_dict``). Two frozen tensors (``pos_embed`` and the time
embedding's Fourier frequencies ``t_embedder.W``) are ``nn.Parameter(requires_grad=False)`` as
there: they are in the state dict and in the parameter counts (so DiT^DH-XL is 838.68M as in
the paper), and an optimizer must be given only ``p.requires_grad`` parameters.

Label dropout for classifier-free guidance is *not* done here (the reference drops labels
inside the model in training mode): the training loop replaces dropped labels by the null label
itself, drawn from its own generator, so the forward pass is the same in train and eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RaeError
from .pos_embed import sincos_pos_embed_2d


#################################################################################
#                        Rotary position embedding (RoPE)                       #
#################################################################################

class RoPE2D(nn.Module):
    """2-D rotary position embedding (EVA style) for square token grids.

    Half of each head's channels rotate with the token's row, the other half with its column;
    channels rotate in adjacent pairs (2k, 2k+1). cos/sin are precomputed for the fixed grid and
    kept as non-persistent buffers (recomputed at construction, never stored in checkpoints).
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        assert head_dim % 4 == 0, f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}"
        axis_dim = head_dim // 2  # channels per spatial axis
        freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2).float() / axis_dim)
        angles = torch.outer(torch.arange(grid_size).float(), freqs).repeat_interleave(2, dim=-1)
        rows = angles[:, None, :].expand(grid_size, grid_size, axis_dim)
        cols = angles[None, :, :].expand(grid_size, grid_size, axis_dim)
        angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
        self.register_buffer("freqs_cos", angles.cos(), persistent=False)
        self.register_buffer("freqs_sin", angles.sin(), persistent=False)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, heads, N, head_dim] by the per-token angles."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rotated * sin


#################################################################################
#                                 Building blocks                               #
#################################################################################

def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) if shift is None else x * (1 + scale) + shift


# The reference's architecture switches (LightningDiT / DiTwDDTHead keyword arguments, same names) and
# the released models' values. A model's config records only those that differ.
ARCH_DEFAULTS = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False,
                     use_pos_embed=True)


def _arch(given: dict) -> dict:
    """The switches that differ from ``ARCH_DEFAULTS`` (what a config records)."""
    unknown = set(given) - set(ARCH_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown architecture switch(es) {', '.join(sorted(unknown))}")
    return {k: bool(v) for k, v in given.items() if bool(v) != ARCH_DEFAULTS[k]}


def norm_layer(width: int, rmsnorm: bool) -> nn.Module:
    """RMSNorm, or (``use_rmsnorm=False``) LayerNorm without affine parameters, eps 1e-6, as the reference."""
    return RMSNorm(width) if rmsnorm else nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


class RMSNorm(nn.Module):
    """RMSNorm computed in at least float32 (as LightningDiT; float64 stays float64), then scaled by a
    learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """SwiGLU MLP: w3(silu(a) * b) with [a, b] = w12(x).

    A hidden width that is not a multiple of ``align`` (the wide head's 5,461) is computed zero-padded to
    the next multiple: w12 gets zero rows after each half and w3 zero columns, so a and b are 0 there,
    silu(0) * 0 = 0, and w3 adds nothing: the same sums. The parameters keep the checkpoints' shapes; the
    padding is made on the fly (under ``torch.compile`` it joins the weights' cast to bf16). It is for
    speed: a bf16 matrix whose rows are not a whole number of 16 bytes cannot be loaded by Hopper's
    tensor-copy engine, and cuBLAS falls back to slower kernels (BENCHMARKS.md, issue 29). ``align = 1``
    computes at the stored width. Layers already replaced (float8, which pads by itself) are called as they are.
    """

    align = 8

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.w3.in_features
        pad = -hidden % self.align if type(self.w12) is nn.Linear and type(self.w3) is nn.Linear else 0
        if not pad:
            return self.w3(self.gate(self.w12(x)))
        w12 = F.pad(self.w12.weight.unflatten(0, (2, hidden)), (0, 0, 0, pad)).flatten(0, 1)
        b12 = self.w12.bias
        b12 = None if b12 is None else F.pad(b12.unflatten(0, (2, hidden)), (0, pad)).flatten()
        return F.linear(self.gate(F.linear(x, w12, b12)), F.pad(self.w3.weight, (0, pad)), self.w3.bias)

    def gate(self, h12: torch.Tensor) -> torch.Tensor:
        """``silu(a) * b`` for [a, b] = h12, one method so that a fused kernel can stand in for it (float8
        sampling: ``stages.models.fp8_triton.enable``)."""
        a, b = h12.chunk(2, dim=-1)
        return F.silu(a) * b


class GeluMlp(nn.Module):
    """``use_swiglu=False``: fc2(gelu_tanh(fc1(x))), hidden width ``mlp_ratio`` x (timm's Mlp, as the reference)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    # 2/3 of the usual 4x width keeps the SwiGLU MLP at the parameter cost of a GELU MLP;
    # truncation (not rounding to a multiple of 8) is what the released checkpoints use:
    # 1152 -> 3072, 384 -> 1024, 2048 -> 5461.
    return int(2 / 3 * int(width * mlp_ratio))


class Attention(nn.Module):
    """Multi-head attention; ``qk_norm``: queries and keys normalised per head before RoPE (the reference's
    QK-norm: RMSNorm over the head dimension, or LayerNorm with affine parameters without RMSNorm)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rmsnorm: bool = True):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.q_norm, self.k_norm = ((RMSNorm(self.head_dim) if rmsnorm else nn.LayerNorm(self.head_dim))
                                        for _ in range(2))
        self.qk_norm = qk_norm
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            # RoPE runs in float32 (cos/sin are float32); cast back so SDPA gets one dtype.
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        x = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class PatchEmbed(nn.Module):
    """Linear embedding of p x p patches; the weights are the reference's strided Conv2d's.

    With patch size 1 (DiT^DH on 16 x 16 latents) the map runs as a matrix product over tokens: the
    same map, much faster than cuDNN's 1x1 convolution on an H100 (DiT^DH-XL: a training step 175 vs
    152 img/s, a bf16 forward of 128 latents 221 vs 279 ms; BENCHMARKS.md). ``conv_forward = True``
    runs the reference's convolution itself, which rounds like the reference bit for bit
    (benchmarks/parity_dit.py ``--conv-patch-embed``); the matrix product differs by ~1e-6 relative.
    """

    def __init__(self, in_channels: int, width: int, patch_size: int = 1):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.conv_forward = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size == 1 and not self.conv_forward:
            return F.linear(x.flatten(2).transpose(1, 2), self.proj.weight.flatten(1), self.proj.bias)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Gaussian-Fourier features of t in [0, 1] (fixed random frequencies W ~ N(0, 1), used
    as t * W * 2 pi, no rescaling of t) followed by a 2-layer SiLU MLP."""

    def __init__(self, width: int, num_freqs: int = 256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(num_freqs), requires_grad=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_freqs, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.W[None, :] * 2 * torch.pi
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row: label ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero. The condition c is [B, D] (one vector per
    sample, DiT and the DiT^DH trunk) or [B, N, D] (one per token, the DiT^DH head)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False):
        super().__init__()
        self.norm1 = norm_layer(width, use_rmsnorm)
        self.attn = Attention(width, num_heads, use_qknorm, use_rmsnorm)
        self.norm2 = norm_layer(width, use_rmsnorm)
        self.mlp = (SwiGLU(width, swiglu_hidden(width, mlp_ratio)) if use_swiglu
                    else GeluMlp(width, int(width * mlp_ratio)))
        self.wo_shift = wo_shift  # adaLN without shifts: scale and gate only
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, (4 if wo_shift else 6) * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope) -> torch.Tensor:
        if c.dim() == 2:
            c = c.unsqueeze(1)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                self.adaLN_modulation(c).chunk(6, dim=-1))
        x = x + gate_msa * self.attn(self.norm_modulate(self.norm1, x, shift_msa, scale_msa), rope)
        x = x + gate_mlp * self.mlp(self.norm_modulate(self.norm2, x, shift_mlp, scale_mlp))
        return x

    def norm_modulate(self, norm: nn.Module, x: torch.Tensor, shift: torch.Tensor | None,
                      scale: torch.Tensor) -> torch.Tensor:
        """``modulate(norm(x), shift, scale)``, one method so that a fused kernel can stand in for it
        (``stages.models.adaln_triton.enable``; for float8 sampling ``stages.models.fp8_triton.enable``)."""
        return modulate(norm(x), shift, scale)


class FinalLayer(nn.Module):
    """adaLN-modulated RMSNorm (shift and scale, no gate), then a linear map to p*p*C per token."""

    def __init__(self, width: int, out_per_token: int, use_rmsnorm: bool = True):
        super().__init__()
        self.norm_final = norm_layer(width, use_rmsnorm)
        self.linear = nn.Linear(width, out_per_token)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.dim() == 2:
            c = c.unsqueeze(1)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, channels: int, patch_size: int) -> torch.Tensor:
    """[B, h*w, p*p*C] tokens -> [B, C, h*p, w*p] (square grid)."""
    B, N, _ = x.shape
    p, h = patch_size, math.isqrt(N)
    x = x.reshape(B, h, h, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, h * p, h * p)


def _init_weights(model: DiT | DiTDH, patch_embeds: list[PatchEmbed]) -> None:
    """The initialisation DiT and DiT^DH share (they differ in their other linear layers). The
    order of the random draws decides a seed's initial weights: keep it."""
    for embed in patch_embeds:  # like nn.Linear (instead of nn.Conv2d)
        w = embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(embed.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    nn.init.normal_(model.t_embedder.W)
    # adaLN-Zero: every block starts as the identity and the model outputs v = 0.
    final = model.final_layer
    for linear in [b.adaLN_modulation[-1] for b in model.blocks] + [final.adaLN_modulation[-1], final.linear]:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


#################################################################################
#                                    Models                                     #
#################################################################################

def _tables(rope: RoPE2D | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if rope is None else (rope.freqs_cos, rope.freqs_sin)


def _linears_except(model: nn.Module, per_sample: tuple[str, ...]) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` outside the ``per_sample`` prefixes."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.startswith(per_sample)]


class DiT(nn.Module):
    """LightningDiT as RAE uses it: x_t [B, C, H, W], t [B] in [0, 1], y [B] -> v [B, C, H, W]."""

    def __init__(self, in_channels: int = 768, input_size: int = 16, patch_size: int = 1, width: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000, **switches):
        super().__init__()
        given = _arch(switches)
        arch = {**ARCH_DEFAULTS, **given}
        self.config = dict(in_channels=in_channels, input_size=input_size, patch_size=patch_size,
                           width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, **given)
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.output_width = width  # of the layers that produce v: what the paper's width rule is about
        grid = input_size // patch_size
        blocks = {k: arch[k] for k in ("use_qknorm", "use_swiglu", "use_rmsnorm", "wo_shift")}

        self.x_embedder = PatchEmbed(in_channels, width, patch_size)
        self.pos_embed = (nn.Parameter(sincos_pos_embed_2d(width, grid)[None], requires_grad=False)
                          if arch["use_pos_embed"] else None)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width)
        self.feat_rope = RoPE2D(width // num_heads, grid) if arch["use_rope"] else None
        self.blocks = nn.ModuleList([DiTBlock(width, num_heads, mlp_ratio, **blocks) for _ in range(depth)])
        self.final_layer = FinalLayer(width, patch_size * patch_size * in_channels, arch["use_rmsnorm"])
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        _init_weights(self, [self.x_embedder])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rope = _tables(self.feat_rope)
        h = self.x_embedder(x)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c, rope)
        h = self.final_layer(h, c)
        return unpatchify(h, self.in_channels, self.patch_size)

    def per_token_linears(self) -> list[str]:
        """The Linear layers applied to every token (what ``--precision fp8`` converts); the timestep,
        label and adaLN layers see one row per image."""
        return _linears_except(self, ("t_embedder.", "y_embedder.", "final_layer.adaLN_modulation.")
                               + tuple(f"blocks.{i}.adaLN_modulation." for i in range(len(self.blocks))))


class DiTDH(nn.Module):
    """DiT^DH: DiT trunk + shallow wide head. Same interface as ``DiT``.

    ``blocks[:depth]`` is the trunk (width ``width``), ``blocks[depth:]`` the head (width
    ``head_width``); ``s_embedder`` embeds x_t for the trunk, ``x_embedder`` for the head
    (names as in the reference checkpoints).
    """

    def __init__(self, in_channels: int = 768, input_size: int = 16, patch_size: int = 1, width: int = 1152,
                 depth: int = 28, num_heads: int = 16, head_width: int = 2048, head_depth: int = 2,
                 head_num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000, **switches):
        super().__init__()
        given = _arch(switches)
        arch = {**ARCH_DEFAULTS, **given}
        self.config = dict(in_channels=in_channels, input_size=input_size, patch_size=patch_size,
                           width=width, depth=depth, num_heads=num_heads, head_width=head_width,
                           head_depth=head_depth, head_num_heads=head_num_heads,
                           mlp_ratio=mlp_ratio, num_classes=num_classes, **given)
        blocks = {k: arch[k] for k in ("use_qknorm", "use_swiglu", "use_rmsnorm", "wo_shift")}
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.output_width = head_width  # the head produces v: its width is what the paper's rule is about
        self.depth = depth
        grid = input_size // patch_size

        # Trunk M: z = M(x_t | t, y).
        self.s_embedder = PatchEmbed(in_channels, width, patch_size)
        self.pos_embed = (nn.Parameter(sincos_pos_embed_2d(width, grid)[None], requires_grad=False)
                          if arch["use_pos_embed"] else None)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width)
        self.enc_feat_rope = RoPE2D(width // num_heads, grid) if arch["use_rope"] else None
        # Head H: v = H(x_t | z, t); x_t is embedded again, at the head width (no position
        # embedding: RoPE carries position in the head).
        self.x_embedder = PatchEmbed(in_channels, head_width, patch_size)
        self.s_projector = nn.Linear(width, head_width) if width != head_width else nn.Identity()
        self.dec_feat_rope = RoPE2D(head_width // head_num_heads, grid) if arch["use_rope"] else None
        self.blocks = nn.ModuleList(
            [DiTBlock(width, num_heads, mlp_ratio, **blocks) for _ in range(depth)]
            + [DiTBlock(head_width, head_num_heads, mlp_ratio, **blocks) for _ in range(head_depth)])
        self.final_layer = FinalLayer(head_width, patch_size * patch_size * in_channels, arch["use_rmsnorm"])
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # As the reference DiT^DH: linear layers keep PyTorch's default init (no xavier pass).
        _init_weights(self, [self.x_embedder, self.s_embedder])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_emb = self.t_embedder(t)
        # Note the SiLU here *and* inside each block's adaLN_modulation (as the released model).
        c = F.silu(t_emb + self.y_embedder(y))

        enc_rope = _tables(self.enc_feat_rope)
        z = self.s_embedder(x)
        if self.pos_embed is not None:
            z = z + self.pos_embed
        for block in self.blocks[: self.depth]:
            z = block(z, c, enc_rope)

        # Per-token condition of the head: silu(t + z), projected to the head width.
        z = self.s_projector(F.silu(t_emb.unsqueeze(1) + z))
        dec_rope = _tables(self.dec_feat_rope)
        h = self.x_embedder(x)
        for block in self.blocks[self.depth:]:
            h = block(h, z, dec_rope)
        h = self.final_layer(h, z)
        return unpatchify(h, self.in_channels, self.patch_size)

    def per_token_linears(self) -> list[str]:
        """The Linear layers applied to every token (what ``--precision fp8`` converts). The head's adaLN
        layers are among them: their condition z is per token."""
        return _linears_except(self, ("t_embedder.", "y_embedder.")
                               + tuple(f"blocks.{i}.adaLN_modulation." for i in range(self.depth)))


#################################################################################
#                  Width rule, reference checkpoints, sizes                     #
#################################################################################

def width_rule_warning(width: int, token_dim: int) -> str | None:
    """None if ``width >= token_dim``; otherwise a loud warning to print.

    The paper shows that diffusion in a high-dimensional token space fails unless the
    transformer is at least as wide as the token: a width-d model cannot even overfit a single
    latent when d < n. For DiT^DH pass the head width (``model.output_width``).
    """
    if width >= token_dim:
        return None
    return (f"WARNING: model width {width} < token dimension {token_dim}. RAE's width rule "
            f"(Zheng et al. 2025): the diffusion transformer must be at least as wide as the "
            f"token dimension, or it cannot fit the latents (the loss stalls high and samples "
            f"fail). Use a wider model or a DiT^DH head at least {token_dim} wide.")


_ROPE_SUFFIXES = (".freqs_cos", ".freqs_sin")


def _unwrap(checkpoint: dict) -> dict:
    # A reference training checkpoint holds "model", "ema", "optimizer", ...: EMA is what samples.
    for key in ("ema", "model"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def from_reference_state_dict(state_dict: dict) -> dict:
    """A state dict of the authors' LightningDiT / DiTwDDTHead (plain, or a training checkpoint,
    whose "ema" entry is taken: what they sample with) -> ours. Names are identical; only the
    RoPE tables, which we recompute instead of storing, are dropped."""
    state_dict = _unwrap(state_dict)
    return {k: v for k, v in state_dict.items() if not k.endswith(_ROPE_SUFFIXES)}


def to_reference_state_dict(model: nn.Module) -> dict:
    """Our model -> a state dict the authors' code loads with strict=True (adds the RoPE tables)."""
    state = dict(model.state_dict())
    state.update({name: buf for name, buf in model.named_buffers() if name.endswith(_ROPE_SUFFIXES)})
    return state


def config_from_reference_state_dict(state_dict: dict) -> tuple[type[nn.Module], dict]:
    """Infer (model class, constructor kwargs) from a reference checkpoint, architecture switches
    included (QK-norm, SwiGLU or GELU MLP, RMSNorm or LayerNorm, RoPE, shift-free adaLN, position
    embedding: each leaves its own tensors). The heads come from the RoPE tables (their width is the
    head dimension); without RoPE they must be given. Assumes mlp_ratio 4."""
    state_dict = _unwrap(state_dict)
    is_dh = "s_embedder.proj.weight" in state_dict
    embed = state_dict["s_embedder.proj.weight" if is_dh else "x_embedder.proj.weight"]
    width, in_channels, patch_size = embed.shape[0], embed.shape[1], embed.shape[-1]
    # Block widths from the adaLN layers: [k * width, width] with k = 6, or 4 without shifts.
    ada = [(int(k.split(".")[1]), v.shape) for k, v in state_dict.items()
           if k.startswith("blocks.") and k.endswith(".adaLN_modulation.1.weight")]
    block_widths = [shape[1] for _, shape in sorted(ada)]
    rope_key = "enc_feat_rope.freqs_cos" if is_dh else "feat_rope.freqs_cos"
    switches = dict(use_qknorm="blocks.0.attn.q_norm.weight" in state_dict,
                    use_swiglu="blocks.0.mlp.w12.weight" in state_dict,
                    use_rmsnorm="blocks.0.norm1.weight" in state_dict,
                    use_rope=rope_key in state_dict, wo_shift=sorted(ada)[0][1][0] == 4 * width,
                    use_pos_embed="pos_embed" in state_dict)
    if switches["use_pos_embed"]:
        grid = math.isqrt(state_dict["pos_embed"].shape[1])
    elif switches["use_rope"]:
        grid = math.isqrt(state_dict[rope_key].shape[0])
    else:
        raise ValueError("a checkpoint without position embedding nor RoPE does not show its latent size")
    kwargs = dict(in_channels=in_channels, patch_size=patch_size, width=width, mlp_ratio=4.0,
                  input_size=grid * patch_size,
                  num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1, **_arch(switches))
    hidden = (state_dict["blocks.0.mlp.w3.weight"].shape[1] if switches["use_swiglu"]
              else state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    if hidden != (swiglu_hidden(width, 4.0) if switches["use_swiglu"] else 4 * width):
        raise ValueError("only mlp_ratio 4.0 checkpoints can be inferred; pass the config")

    def heads(key: str, w: int) -> int | None:
        return w // state_dict[key].shape[1] if key in state_dict else None

    if not is_dh:
        kwargs.update(depth=len(block_widths), num_heads=heads("feat_rope.freqs_cos", width))
        return DiT, kwargs
    head_width = state_dict["x_embedder.proj.weight"].shape[0]
    if head_width == width:
        raise ValueError("trunk and head have the same width: pass the DiT^DH config explicitly")
    depth = block_widths.count(width)
    kwargs.update(depth=depth, num_heads=heads("enc_feat_rope.freqs_cos", width), head_width=head_width,
                  head_depth=len(block_widths) - depth, head_num_heads=heads("dec_feat_rope.freqs_cos", head_width))
    return DiTDH, kwargs


# Named sizes (trunk width / depth / heads). Every DiT^DH has the paper's head: 2 blocks,
# width 2048, 16 heads. Parameter counts for a [768, 16, 16] latent and 1000 classes (as the
# reference counts them, frozen pos_embed and Fourier frequencies included):
#   dit-s 33.65M, dit-b 131.88M, dit-l 459.92M, dit-xl 677.25M,
#   ditdh-s 196.46M, ditdh-b 294.30M, ditdh-xl 838.68M.
_HEAD = dict(head_width=2048, head_depth=2, head_num_heads=16)
DIT_SIZES: dict[str, tuple[type[nn.Module], dict]] = {
    "dit-s": (DiT, dict(width=384, depth=12, num_heads=6)),
    "dit-b": (DiT, dict(width=768, depth=12, num_heads=12)),
    "dit-l": (DiT, dict(width=1024, depth=24, num_heads=16)),
    "dit-xl": (DiT, dict(width=1152, depth=28, num_heads=16)),
    "ditdh-s": (DiTDH, dict(width=384, depth=12, num_heads=6, **_HEAD)),
    "ditdh-b": (DiTDH, dict(width=768, depth=12, num_heads=12, **_HEAD)),
    "ditdh-xl": (DiTDH, dict(width=1152, depth=28, num_heads=16, **_HEAD)),
}


def create_dit(size: str, in_channels: int, input_size: int, num_classes: int = 1000,
               **overrides) -> nn.Module:
    """``create_dit("ditdh-xl", in_channels=768, input_size=16)``: a named size from DIT_SIZES for a
    latent [in_channels, input_size, input_size]; any constructor argument (width, depth,
    num_heads, head_width, ...) can be overridden."""
    if size not in DIT_SIZES:
        raise RaeError(f"unknown model {size!r}; choose one of {', '.join(DIT_SIZES)}")
    cls, kwargs = DIT_SIZES[size]
    return cls(in_channels=in_channels, input_size=input_size, num_classes=num_classes,
               **{**kwargs, **overrides})
