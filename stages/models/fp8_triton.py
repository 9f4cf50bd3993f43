"""Float8 sampling's casts as one-pass Triton kernels (issue 29, route 3): ``rae sample --precision fp8`` on CUDA.

A per-row ``Float8Linear`` casts its input to e4m3 with one scale per row: the row's max |x| first, then the
cast. Compiled, Inductor fuses that with the elementwise work before it, but as a looped reduction that reads
the input rows twice, once for the maximum and once for the cast (three times after an RMSNorm, whose own
reduction comes first). Here each program holds whole rows in registers (DiT^DH-XL's rows are 1,152 to
5,472 wide; ``_config``) and reads them once:

- ``norm_modulate_float8``: ``modulate(RMSNorm(x), shift, scale)``, then the row's scale and the cast, the
  input of ``attn.qkv`` and of the MLP's first Linear. The norm and modulation are
  ``adaln_triton.norm_modulate_rows``, the same maths as ``DiTBlock.norm_modulate``; the condition is per sample
  [B, 1, D] (the trunk) or per token [B, T, D] (the head).
- ``swiglu_float8``: ``silu(a) * b`` of the first Linear's output [a, b], each rounded to the activations'
  dtype as PyTorch does, then the scale and the cast, the input of ``w3``; the padded columns (the head's 5,461
  to 5,472) are written as zeros, so no separate pad. Where the hidden width is not a multiple of 16, the
  switch lays ``w12``'s float8 rows out so that b starts aligned (``_align_halves``).

The cast is ``fp8.quantize``'s: scale = max(row max |x|, 1e-12) / 448 and e4m3(clamp(x / scale)), except
that x / scale is x * (1 / scale), one division per row instead of one per element (the kernels must not
become bound by arithmetic); the two differ in the last float32 bit at most, which moves an e4m3 rounding
only for a value within that bit of a rounding boundary. Each returns an
``fp8.Float8Input`` that the next ``Float8Linear`` multiplies as it is. Registered as ``torch.library``
custom ops, so ``torch.compile`` keeps them as opaque kernels in its graph. With ``TRITON_INTERPRET=1`` they
run on the CPU (how the tests check them).

Measured on one H200 (BENCHMARKS.md, 2026-12-03): 1.45-3.8x faster than Inductor's kernels for the same
casts at DiT^DH-XL's and -S's shapes (2.4-4.0 TB/s at the XL's and the head's widths), giving the bytes of
eager ``fp8.quantize`` for 99.87-99.9999% of the values (Inductor's: 95.7-97.4%); AutoGuidance sampling +
decoding at batch 128 went from 29.95 to 31.7 img/s (FID-50K in 26.3 minutes against 27.8).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from . import fp8
from .adaln_triton import norm_modulate_rows
from .dit import DiTBlock, RMSNorm, SwiGLU

_E4M3_MAX = tl.constexpr(fp8.E4M3_MAX)
_TINY = tl.constexpr(fp8._TINY)


def _config(width: int) -> dict:
    """Rows per program and warps for rows ``width`` wide: 4 warps over whole rows of at least 4,096 elements,
    so that a narrow row (DiT^DH-S's 384) does not leave a program's fixed cost (two reductions across its
    warps) to a few kilobytes. Chosen from ``bench_speed_routes.py --part casts --sweep`` on an H200
    (BENCHMARKS.md): the fastest or within 3% of it at each of DiT^DH-XL's and -S's widths."""
    block = triton.next_power_of_2(width)
    return dict(BLOCK=block, ROWS=max(1, 4096 // block), num_warps=4)


@triton.jit
def _store_float8_rows(Q, S, rows, row_ok, v, WIDTH):
    """Cast the float32 rows v [R, BLOCK] (0 past the input's width) to e4m3, each with its own scale, as
    ``fp8.quantize``: q at Q + rows * WIDTH + columns, the scales at S + rows (rows [R, 1], those that exist
    ``row_ok``)."""
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), axis=1, keep_dims=True), _TINY), _E4M3_MAX)
    q = tl.clamp(v * tl.math.div_rn(1.0, scale), -_E4M3_MAX, _E4M3_MAX)
    cols = tl.arange(0, v.shape[1])[None, :]
    tl.store(Q + rows * WIDTH + cols, q.to(Q.dtype.element_ty), mask=row_ok & (cols < WIDTH))
    tl.store(S + rows, scale, mask=row_ok)


@triton.jit
def _norm_modulate_float8_kernel(X, W, SHIFT, SCALE, Q, S, M, T, D, WIDTH, shift_b, shift_t, scale_b, scale_t, eps,
                                 BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    row_ok = rows < M
    b, t = rows // T, rows % T
    v, _ = norm_modulate_rows(X + rows * D + cols, W + cols, SHIFT + b * shift_b + t * shift_t + cols,
                              SCALE + b * scale_b + t * scale_t + cols, row_ok & (cols < D), D, eps, tl.float32)
    _store_float8_rows(Q, S, rows, row_ok, v, WIDTH)


@triton.jit
def _swiglu_float8_kernel(H12, Q, S, M, row_stride, HIDDEN, WIDTH, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    row_ok = rows < M
    mask = row_ok & (cols < HIDDEN)
    a = tl.load(H12 + rows * row_stride + cols, mask=mask, other=0.0)
    b = tl.load(H12 + rows * row_stride + HIDDEN + cols, mask=mask, other=0.0)
    a32 = a.to(tl.float32)
    silu = (a32 / (1.0 + tl.exp(-a32))).to(a.dtype)
    v = (silu.to(tl.float32) * b.to(tl.float32)).to(a.dtype).to(tl.float32)
    _store_float8_rows(Q, S, rows, row_ok, v, WIDTH)


def _cond_strides(c: torch.Tensor) -> tuple[int, int]:
    """Element strides of a condition [B, 1 or T, D] between samples and between tokens (0: one per sample)."""
    return c.stride(0), (c.stride(1) if c.shape[1] > 1 else 0)


# The kernels write into q [rows, width] of e4m3, or (the tests, on Triton's CPU interpreter, whose own float8
# conversion is wrong where rounding carries into the next power of two) of float32: the scaled, clamped row
# before its rounding to e4m3. ``config``: the launch's (``_config``'s keys), for the benchmark's sweep.
def _norm_modulate_rows(x, weight, shift, scale, eps, q, s, config=None):
    B, T, D = x.shape
    x = x.contiguous()
    shift, scale = (c if c.stride(-1) == 1 else c.contiguous() for c in (shift, scale))
    config = config or _config(q.shape[1])
    _norm_modulate_float8_kernel[(triton.cdiv(B * T, config["ROWS"]),)](
        x, weight, shift, scale, q, s, B * T, T, D, q.shape[1], *_cond_strides(shift), *_cond_strides(scale), eps,
        **config)


def _swiglu_rows(rows, q, s, config=None):
    config = config or _config(q.shape[1])
    _swiglu_float8_kernel[(triton.cdiv(rows.shape[0], config["ROWS"]),)](
        rows, q, s, rows.shape[0], rows.stride(0), rows.shape[1] // 2, q.shape[1], **config)


def _outputs(rows: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((rows, width), dtype=fp8.E4M3, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


@custom_op("rae::norm_modulate_float8", mutates_args=())
def _norm_modulate_float8(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                          width: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _outputs(x.shape[0] * x.shape[1], width, x.device)
    _norm_modulate_rows(x, weight, shift, scale, eps, q, s)
    return q, s


@_norm_modulate_float8.register_fake
def _norm_modulate_float8_shapes(x, weight, shift, scale, eps, width):
    return _outputs(x.shape[0] * x.shape[1], width, x.device)


@custom_op("rae::swiglu_float8", mutates_args=())
def _swiglu_float8(h12: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = h12.reshape(-1, h12.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q, s = _outputs(rows.shape[0], width, h12.device)
    _swiglu_rows(rows, q, s)
    return q, s


@_swiglu_float8.register_fake
def _swiglu_float8_shapes(h12, width):
    return _outputs(h12.numel() // h12.shape[-1], width, h12.device)


def norm_modulate_float8(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                         width: int) -> fp8.Float8Input:
    """``fp8.quantize(modulate(RMSNorm(x), shift, scale), "row")`` for x [B, T, D], a condition [B, 1, D] or
    [B, T, D], zero-padded to ``width`` >= D columns."""
    B, T, D = x.shape
    for name, c in (("shift", shift), ("scale", scale)):
        if c.dim() != 3 or c.shape[0] != B or c.shape[1] not in (1, T) or c.shape[2] != D:
            raise ValueError(f"norm_modulate_float8: {name} must be [B, 1, D] or [B, T, D] for x {list(x.shape)}, "
                             f"not {list(c.shape)}")
    if width < D:
        raise ValueError(f"norm_modulate_float8: width {width} < the rows' {D}")
    q, s = _norm_modulate_float8(x, weight, shift, scale, float(eps), width)
    return fp8.Float8Input(q, s, tuple(x.shape))


def swiglu_float8(h12: torch.Tensor, width: int) -> fp8.Float8Input:
    """``fp8.quantize(silu(a) * b, "row")`` for [a, b] = h12 (chunks of the last dimension), zero-padded to
    ``width`` >= the hidden width."""
    hidden = h12.shape[-1] // 2
    if h12.shape[-1] % 2 or width < hidden:
        raise ValueError(f"swiglu_float8: {h12.shape[-1]} columns are not [a, b] of a hidden width <= {width}")
    q, s = _swiglu_float8(h12, width)
    return fp8.Float8Input(q, s, (*h12.shape[:-1], hidden))


def _row_float8(layer) -> bool:
    return isinstance(layer, fp8.Float8Linear) and layer.scaling == "row"


# The switch changes a block's class, not an attribute of it: torch.compile guards on a module's class, so a
# switched and an unswitched model of one architecture never share a compiled graph. (torch 2.11 was seen
# running a model with its methods replaced on the instance through the graph compiled for another without.)
class Float8CastBlock(DiTBlock):
    """A ``DiTBlock`` whose norm + modulation hands its float8 ``qkv`` and MLP input float8 rows (see module)."""

    def norm_modulate(self, norm, x, shift, scale):
        if shift is None or not isinstance(norm, RMSNorm) or x.dtype == torch.float64:  # not this kernel's
            return super().norm_modulate(norm, x, shift, scale)
        return norm_modulate_float8(x, norm.weight, shift, scale, norm.eps, self.attn.qkv.weight.shape[1])


class Float8CastSwiGLU(SwiGLU):
    """A ``SwiGLU`` whose gate hands its float8 ``w3`` float8 rows (see module). Its float8 ``w12`` holds each
    half at a multiple of 16 rows, [a; 0; b; 0] (``_align_halves``), which the gate reads as [a, b]."""

    def gate(self, h12):
        return swiglu_float8(h12, self.w3.weight.shape[1])


def _align_halves(w12: fp8.Float8Linear, hidden: int) -> None:
    """Lay a float8 ``w12``'s halves [a; b] out as [a; 0; b; 0], each padded to a multiple of 16 rows, so that b
    starts 16-byte aligned in every row of its output: at the head's 5,461, b would start at an odd element
    and the gate kernel would load it one element at a time. The zero rows give a = b = 0 there, and
    silu(0) * 0 = 0: the gate's padded columns, which ``w3`` multiplies by its own zero columns."""
    half = fp8._ceil(hidden)
    if half == hidden:
        return

    def spread(t: torch.Tensor, dim: int) -> torch.Tensor:
        bytes_ = t.view(torch.uint8) if t.dtype == fp8.E4M3 else t
        out = bytes_.new_zeros(bytes_.shape[:dim] + (2 * half,) + bytes_.shape[dim + 1:])
        out.narrow(dim, 0, hidden).copy_(bytes_.narrow(dim, 0, hidden))
        out.narrow(dim, half, hidden).copy_(bytes_.narrow(dim, hidden, hidden))
        return out.view(t.dtype)

    w12.weight, w12.weight_scale = spread(w12.weight, 0), spread(w12.weight_scale, 1)
    if w12.bias is not None:
        w12.bias = spread(w12.bias, 0)
    w12.out_features = 2 * half


def enable(model: torch.nn.Module) -> int:
    """Switch the ``DiTBlock``s of a model after ``fp8.to_float8`` (per-row scales) to these kernels: the norm +
    modulation where ``attn.qkv`` and the MLP's first Linear are float8, the SwiGLU gate where ``w3`` is.
    Returns how many blocks changed."""
    changed = 0
    for block in (m for m in model.modules() if isinstance(m, DiTBlock)):
        first = block.mlp.w12 if isinstance(block.mlp, SwiGLU) else block.mlp.fc1
        fused_norm = _row_float8(block.attn.qkv) and _row_float8(first) and (
            block.attn.qkv.weight.shape[1] == first.weight.shape[1])
        fused_gate = isinstance(block.mlp, SwiGLU) and _row_float8(block.mlp.w3)
        if fused_norm and type(block) is DiTBlock:
            block.__class__ = Float8CastBlock
        if fused_gate and type(block.mlp) is SwiGLU:
            _align_halves(block.mlp.w12, block.mlp.w3.in_features)
            block.mlp.__class__ = Float8CastSwiGLU
        changed += fused_norm or fused_gate
    return changed
