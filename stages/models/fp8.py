"""Float8 inference for the diffusion transformers' per-token matrix products (``rae sample --precision fp8``).

``Float8Linear`` replaces an ``nn.Linear`` for inference: the weight is stored in float8 e4m3 with one
float32 scale per output row (set once, from the bf16-rounded weight); the input is cast to e4m3 on every
call with one scale per token (its row's max |x| maps to e4m3's largest value, 448), and
``torch._scaled_mm`` multiplies the two on the tensor cores' float8 path (twice the bf16 rate on
Hopper), applying both scales and returning bf16. Under ``torch.compile`` the cast of the input fuses
with the elementwise work before it. Only the layers that see one row per token are converted (most of
the FLOPs); the timestep, label and per-sample adaLN layers have one row per image and stay as they are.

Float8 rounds each input to 3 mantissa bits, so samples differ from bf16 ones: this is an opt-in
precision, measured in BENCHMARKS.md. ``torch._scaled_mm`` needs float8 matrix units on CUDA (compute
capability 8.9 or later: Ada, Hopper); on the CPU it runs too (slowly: it is how the tests check it).
Dimensions that are not multiples of 16 (DiT^DH's 5,461-wide head MLP) are zero-padded, which leaves
the product unchanged.

On CUDA, ``stages.models.fp8_triton.enable`` makes the casts before the blocks' products one-pass Triton
kernels: RMSNorm + modulation + cast before ``qkv`` and ``w12``, SiLU-gate + cast before ``w3``. They hand
the layer a ``Float8Input``, an activation already in float8 with its row scales.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
_ALIGN = 16                        # torch._scaled_mm: both dimensions of each operand multiples of 16
_TINY = 1e-12                      # an all-zero row gets scale 1e-12 / 448 instead of 0 (no 0 / 0)


def _ceil(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


SCALINGS = ("row", "tensor")


class Float8Input(NamedTuple):
    """An activation of shape ``shape`` ([..., K]) already cast to float8: ``q`` [M, K'] e4m3 (K' = K padded to
    16, the padding 0) and ``scale`` [M, 1] float32 per row, what a fused kernel hands a per-row ``Float8Linear``."""
    q: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with x ~= q * scale, each row's max |x| at 448."""
    return quantize(x, "row")


def quantize(x: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], float32 scales) with x ~= q * scale: per row ([M, 1], each row's max |x| at
    448) or per tensor (a 0-d scale, the whole matrix's max |x| at 448)."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True) if scaling == "row" else xf.abs().amax()
    scale = amax.clamp(min=_TINY) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(nn.Module):
    """Inference-only float8 version of an ``nn.Linear`` (see the module docstring). Output: bf16.

    ``scaling="tensor"``: one scale for the whole input and one for the whole weight instead of one per
    row (cuBLASLt's own float8 path rather than CUTLASS's per-row kernel; coarser where rows differ in size).
    ``out_dtype``: the output's (and the bias's) dtype, bf16 as the bf16 path's Linears give under autocast.
    """

    def __init__(self, linear: nn.Linear, scaling: str = "row", out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"float8 scaling {scaling!r}: one of {', '.join(SCALINGS)}")
        self.scaling, self.out_dtype = scaling, out_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        k, n = _ceil(self.in_features), _ceil(self.out_features)
        w = torch.zeros(n, k, dtype=torch.float32, device=linear.weight.device)
        # Scale from the bf16-rounded weight: what the bf16 path multiplies by.
        w[: self.out_features, : self.in_features] = linear.weight.detach().to(torch.bfloat16).float()
        q, scale = quantize(w, scaling)
        self.register_buffer("weight", q)                                # [N', K'] e4m3, row-major
        self.register_buffer("weight_scale", scale.t().contiguous())     # [1, N'] (or 0-d) float32
        # The bias rides in the product's epilogue (added to the float32 accumulator before the one bf16
        # rounding), so no separate pass reads and writes the output again; padded like the output.
        bias = None
        if linear.bias is not None:
            bias = torch.zeros(n, dtype=out_dtype, device=linear.bias.device)
            bias[: self.out_features] = linear.bias.detach().to(torch.bfloat16).to(out_dtype)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor | Float8Input) -> torch.Tensor:
        lead = x.shape[:-1]
        if isinstance(x, Float8Input):
            if self.scaling != "row" or x.q.shape[1] != self.weight.shape[1]:
                raise ValueError(f"a float8 input [M, {x.q.shape[1]}] with row scales for a layer of {self.extra_repr()}")
            q, scale = x.q, x.scale
        else:
            x = x.reshape(-1, self.in_features)
            if x.shape[1] != self.weight.shape[1]:
                x = nn.functional.pad(x, (0, self.weight.shape[1] - x.shape[1]))
            q, scale = quantize(x, self.scaling)
        # The weight's transpose is column-major, as _scaled_mm's second operand must be.
        y = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=self.out_dtype, use_fast_accum=True)
        return y[:, : self.out_features].reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3 per-{self.scaling}"


def to_float8(model: nn.Module, names: list[str], scaling: str = "row",
              out_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace the ``nn.Linear`` modules called ``names`` (``model.per_token_linears()``) in place; the
    model is for inference from here on (no gradients through the float8 layers)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        setattr(parent, child, Float8Linear(linear, scaling, out_dtype))
    return model


def float8_supported(device: torch.device) -> str | None:
    """None if ``device`` runs float8 matrix products, else why not (one line)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"--precision fp8 needs float8 matrix units (compute capability 8.9 or later: Ada, Hopper); "
                    f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --precision bf16")
    try:  # an older torch may lack per-row scales in _scaled_mm: one tiny product tells
        Float8Linear(nn.Linear(_ALIGN, _ALIGN).to(device))(torch.ones(_ALIGN, _ALIGN, device=device))
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return (f"--precision fp8: torch {torch.__version__} cannot run float8 products on {device.type} "
                f"({str(e).strip().splitlines()[0][:160]}): use --precision bf16")
    return None
