"""RMSNorm + adaLN modulation as one hand-written Triton kernel each way (issue 29, route 1; opt-in).

``norm_modulate(x, weight, shift, scale, eps)`` is ``modulate(RMSNorm(x), shift, scale)`` of
``stages.models.dit`` for a per-sample condition (the trunk's: ``shift`` and ``scale`` of shape [B, 1, D]),
with the same maths in the same order: the norm in at least float32, ``1 + scale`` rounded to the scale's
own dtype (as PyTorch adds a bf16 tensor and a number), then ``* (1 + scale) + shift``.

Forward: one program per row writes the output (in ``out_dtype``: the bf16 that the next Linear reads under
autocast, or the input's dtype) and the row's 1 / rms. Backward: one program per block of rows of one
sample reads each row of x and of the output's gradient once and writes the input's gradient, while it
sums in registers the three reductions that Inductor runs as separate passes over the same rows: the
gradients of ``shift`` and ``scale`` (over the sample's tokens) and of the norm's weight (over all rows).
The per-block partial sums (14 MB at DiT^DH-XL's batch 128) are added by PyTorch after.

Triton runs on CUDA; with ``TRITON_INTERPRET=1`` the same kernels run on the CPU (how the tests check them
in float64 against the module; the interpreter rounds float32 to bf16 by truncation, so agreement in bf16 is
for the GPU to show). Registered as ``torch.library.custom_op``s with their output shapes, so
``torch.compile`` keeps them in its graph as opaque kernels.

Measured on one H200 (BENCHMARKS.md, 2026-12-03, the switch by class so that the route compiles a graph of
its own): the DiT^DH-XL step at batch 128 ran at 429 img/s with the trunk's norms on these kernels against 435
with Inductor's. Profiled, Inductor's fused kernels lose 9.3 ms per step and these take 14.8 (13.6 in the
kernels, 1.2 adding the partial sums): Inductor fuses each norm with the residual add and gate before it,
which an opaque kernel splits into one more pass. Nothing is gained, so the module stays opt-in
(``bench_speed_routes.py --routes adaln-triton``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from .dit import DiTBlock, RMSNorm

ROWS_PER_BLOCK = 32  # backward: rows of one sample per program (partial sums: B x ceil(T / 32) x D, x 3)


def _warps(block_d: int) -> int:
    return 8 if block_d >= 2048 else 4


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def norm_modulate_rows(X, W, SHIFT, SCALE, mask, D, eps, ACC: tl.constexpr):
    """Rows of ``modulate(RMSNorm(x), shift, scale)`` from blocks of pointers [R, BLOCK_D] to their x, shift and
    scale (and the norm's weight; ``mask``: the columns below D of the rows that exist): the rows in ACC (0 where
    masked) and their 1 / rms [R, 1]. Also ``stages.models.fp8_triton``'s, before its cast to float8."""
    x = tl.load(X, mask=mask, other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1, keep_dims=True) / D + eps)
    normed = (x * rstd).to(X.dtype.element_ty).to(ACC) * tl.load(W, mask=mask, other=0.0).to(ACC)
    scale = tl.load(SCALE, mask=mask, other=0.0)
    one_plus = (scale.to(ACC) + 1.0).to(SCALE.dtype.element_ty).to(ACC)
    shift = tl.load(SHIFT, mask=mask, other=0.0).to(ACC)
    return normed * one_plus + shift, rstd


@triton.jit
def _forward_kernel(X, W, SHIFT, SCALE, Y, RSTD, T, D, eps, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0) + tl.arange(0, 1)[:, None]  # [1, 1]: one row per program
    b = row // T
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = cols < D
    y, rstd = norm_modulate_rows(X + row * D + cols, W + cols, SHIFT + b * D + cols, SCALE + b * D + cols, mask, D,
                                 eps, ACC)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _backward_kernel(DY, X, W, SCALE, RSTD, DX, DW_PART, DSCALE_PART, DSHIFT_PART, T, D, CHUNKS,
                     ACC: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    one_plus = (tl.load(SCALE + b * D + cols, mask=mask, other=0.0).to(ACC) + 1.0).to(SCALE.dtype.element_ty)
    one_plus = one_plus.to(ACC)
    dw = tl.zeros([BLOCK_D], dtype=ACC)
    dscale = tl.zeros([BLOCK_D], dtype=ACC)
    dshift = tl.zeros([BLOCK_D], dtype=ACC)
    for i in range(ROWS):
        t = chunk * ROWS + i
        if t < T:
            row = b * T + t
            x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(ACC)
            rstd = tl.load(RSTD + row).to(ACC)
            xhat = (x * rstd).to(X.dtype.element_ty).to(ACC)
            dshift += dy
            dscale += dy * xhat * w
            dnormed = dy * one_plus      # the gradient of normed * weight
            dw += dnormed * xhat
            g = dnormed * w              # ... of x * rstd
            dx = rstd * (g - (x * rstd) * (tl.sum(g * x * rstd, axis=0) / D))
            tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
    part = (b * CHUNKS + chunk) * D + cols
    tl.store(DW_PART + part, dw, mask=mask)
    tl.store(DSCALE_PART + part, dscale, mask=mask)
    tl.store(DSHIFT_PART + part, dshift, mask=mask)


def _check(x, weight, shift, scale):
    B, T, D = x.shape
    for name, c in (("shift", shift), ("scale", scale)):
        if c.shape != (B, 1, D):
            raise ValueError(f"norm_modulate: {name} must be [B, 1, D] = {[B, 1, D]} (one per sample), not "
                             f"{list(c.shape)}")
    if weight.shape != (D,):
        raise ValueError(f"norm_modulate: weight must be [{D}], not {list(weight.shape)}")


@custom_op("rae::norm_modulate", mutates_args=())
def _norm_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, D = x.shape
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    y = torch.empty((B, T, D), dtype=out_dtype, device=x.device)
    rstd = torch.empty((B * T,), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    block = triton.next_power_of_2(D)
    _forward_kernel[(B * T,)](x, weight, shift, scale, y, rstd, T, D, eps, ACC=_acc(rstd.dtype), BLOCK_D=block,
                              num_warps=_warps(block))
    return y, rstd


@_norm_modulate.register_fake
def _norm_modulate_shapes(x, weight, shift, scale, eps, out_dtype):
    B, T, D = x.shape
    return x.new_empty((B, T, D), dtype=out_dtype), x.new_empty((B * T,), dtype=torch.promote_types(x.dtype,
                                                                                                  torch.float32))


@custom_op("rae::norm_modulate_backward", mutates_args=())
def _norm_modulate_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                            rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, D = x.shape
    chunks = triton.cdiv(T, ROWS_PER_BLOCK)
    dy, x, scale = dy.contiguous(), x.contiguous(), scale.contiguous()
    dx = torch.empty_like(x)
    parts = [torch.empty((B * chunks, D), dtype=rstd.dtype, device=x.device) for _ in range(3)]
    block = triton.next_power_of_2(D)
    _backward_kernel[(B, chunks)](dy, x, weight, scale, rstd, dx, *parts, T, D, chunks, ACC=_acc(rstd.dtype),
                                  BLOCK_D=block, ROWS=ROWS_PER_BLOCK, num_warps=_warps(block))
    dw, dscale, dshift = parts
    return (dx, dw.sum(0).to(weight.dtype), dscale.view(B, chunks, D).sum(1, keepdim=True).to(scale.dtype),
            dshift.view(B, chunks, D).sum(1, keepdim=True).to(scale.dtype))


@_norm_modulate_backward.register_fake
def _norm_modulate_backward_shapes(dy, x, weight, scale, rstd):
    B, _, D = x.shape
    return (torch.empty_like(x), weight.new_empty(weight.shape), scale.new_empty((B, 1, D)),
            scale.new_empty((B, 1, D)))


def _setup_context(ctx, inputs, output):
    x, weight, shift, scale, _, _ = inputs
    ctx.save_for_backward(x, weight, scale, output[1])
    ctx.shift_dtype = shift.dtype


def _backward(ctx, dy, _drstd):
    x, weight, scale, rstd = ctx.saved_tensors
    dx, dw, dscale, dshift = _norm_modulate_backward(dy, x, weight, scale, rstd)
    return dx, dw, dshift.to(ctx.shift_dtype), dscale, None, None


_norm_modulate.register_autograd(_backward, setup_context=_setup_context)


def norm_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``modulate(RMSNorm(x), shift, scale)`` for x [B, T, D] and a per-sample shift and scale [B, 1, D]."""
    _check(x, weight, shift, scale)
    return _norm_modulate(x, weight, shift, scale, float(eps), out_dtype or x.dtype)[0]


class TritonNormBlock(DiTBlock):
    """A ``DiTBlock`` whose ``norm_modulate`` is this module's kernel where it covers it: an RMSNorm and a
    per-sample shift and scale [B, 1, D]; else (the head's per-token condition, no shift, LayerNorm) the
    block's own. (A class, not a method set on the instance: torch.compile guards on a module's class.)"""

    def norm_modulate(self, norm, x, shift, scale):
        if shift is None or shift.shape[1] != 1 or not isinstance(norm, RMSNorm):
            return super().norm_modulate(norm, x, shift, scale)
        # Under autocast the next Linear reads bf16: written so here, the same rounding of the same value.
        out = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return norm_modulate(x, norm.weight, shift, scale, norm.eps, out)


def enable(model: torch.nn.Module) -> int:
    """Switch every ``DiTBlock`` of ``model`` to ``norm_modulate`` where it applies; returns how many blocks.
    Opt-in: the benchmark's ``adaln-triton`` route (BENCHMARKS.md says what it measured)."""
    blocks = [m for m in model.modules() if type(m) is DiTBlock]
    for block in blocks:
        block.__class__ = TritonNormBlock
    return len(blocks)
