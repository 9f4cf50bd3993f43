"""Float8 sampling's one-pass cast kernels (``stages.models.fp8_triton``), run by Triton's interpreter on the
CPU: each kernel's scaled row and scale as ``fp8.quantize`` computes them from the module's maths, and a
DiT^DH switched to them giving the unswitched model's output, eager and compiled."""
import importlib.util
import textwrap

import pytest

from tests.helpers import run_triton_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

# The interpreter rounds to bf16 by truncation and to float8 wrongly where rounding carries into the next power
# of two, so the kernels' values are compared in float32, before the rounding to e4m3, which PyTorch then does.
CHECKS = textwrap.dedent("""
    import copy
    import torch
    import torch.nn.functional as F
    from stages.models import fp8, fp8_triton
    from stages.models.dit import RMSNorm, DiTDH, modulate

    def before_cast(v):  # fp8.quantize's scaled, clamped rows and their scales, before the rounding to e4m3
        v = v.float()
        scale = v.abs().amax(1, keepdim=True).clamp(min=fp8._TINY) / fp8.E4M3_MAX
        return (v / scale).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX), scale

    def close(got, want, what):
        (q, s), (q_ref, s_ref) = got, want
        assert q.shape == q_ref.shape and s.shape == s_ref.shape, what
        assert ((s - s_ref).abs() / s_ref).max() < 1e-6, (what, "scale")
        assert (q - q_ref).abs().max() < 1e-6 * fp8.E4M3_MAX, (what, "row")
        assert (q[:, -1] == 0).all(), (what, "the padding")  # the last column is past the input's width

    torch.manual_seed(0)
    # RMSNorm + modulation, 24 wide, cast into 32 columns (8 of padding); per-sample and per-token conditions,
    # each a chunk of a wider adaLN output as in the blocks (rows not contiguous).
    B, T, D, W = 3, 5, 24, 32
    norm = RMSNorm(D)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D))
    x = torch.randn(B, T, D) * torch.tensor([1e-3, 1.0, 40.0])[:, None, None]
    for rows in (1, T):
        shift, scale = torch.randn(B, rows, 2 * D).chunk(2, dim=-1)
        q, s = torch.empty(B * T, W), torch.empty(B * T, 1)
        fp8_triton._norm_modulate_rows(x, norm.weight, shift, scale, norm.eps, q, s)
        want = before_cast(F.pad(modulate(norm(x), shift, scale).reshape(-1, D), (0, W - D)))
        close((q, s), want, f"norm_modulate, condition [B, {rows}, D]")

    # SiLU gate of [a, b], 20 wide into 32 columns; rows of a wider matrix (a row stride past their width),
    # an all-zero row (scale 1e-12 / 448, no 0 / 0).
    h12 = (torch.randn(B * T, 48) * 3)[:, :40]
    h12[2] = 0
    q, s = torch.empty(B * T, 32), torch.empty(B * T, 1)
    fp8_triton._swiglu_rows(h12, q, s)
    a, b = h12.chunk(2, dim=-1)
    close((q, s), before_cast(F.pad(F.silu(a) * b, (0, 12))), "swiglu")
    assert (q[2] == 0).all() and torch.isfinite(s).all()

    # Bad shapes: one clear error each.
    for call, words in ((lambda: fp8_triton.norm_modulate_float8(x, norm.weight, x[:, :2], x[:, :1], 1e-6, W), "shift"),
                        (lambda: fp8_triton.norm_modulate_float8(x, norm.weight, x[:, :1], x[:, :1], 1e-6, 16), "width"),
                        (lambda: fp8_triton.swiglu_float8(h12, 16), "hidden width")):
        try:
            call()
        except ValueError as e:
            assert words in str(e), e
        else:
            raise AssertionError(words)

    # The kernels write e4m3 through the custom ops; on the interpreter PyTorch rounds their float32 rows.
    launched = []
    def torch_rounds(launch):
        def run(*args):
            *inputs, q, s = args
            q32 = torch.empty(q.shape)
            launch(*inputs, q32, s)
            q.copy_(q32.to(q.dtype))
            launched.append(launch.__name__)
        return run
    fp8_triton._norm_modulate_rows = torch_rounds(fp8_triton._norm_modulate_rows)
    fp8_triton._swiglu_rows = torch_rounds(fp8_triton._swiglu_rows)

    # A DiT^DH (trunk 16 wide, SwiGLU hidden 42 -> 48; head 40 wide -> 48, hidden 106 -> 112) in float8, then
    # switched: both blocks' norms and gates go through the kernels, the output is the unswitched model's.
    torch.manual_seed(1)
    model = DiTDH(in_channels=8, input_size=4, width=16, depth=1, num_heads=2, head_width=40, head_depth=1,
                  head_num_heads=2, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # zero-initialised gates would hide the blocks' outputs
    # Float32 outputs, so that nothing is rounded to bf16 (which the interpreter does by truncation).
    fp8.to_float8(model, model.per_token_linears(), out_dtype=torch.float32)
    switched = copy.deepcopy(model)
    fused = fp8_triton.enable(switched)
    assert fused == 2, fused
    xt, t, y = torch.randn(2, 8, 4, 4), torch.tensor([0.3, 0.9]), torch.tensor([0, 3])
    with torch.no_grad():
        ref, out = model(xt, t, y), switched(xt, t, y)
        assert launched.count("_norm_modulate_rows") == 4 and launched.count("_swiglu_rows") == 2, launched
        # Only float32 rounding differs (1 / rms against rsqrt, x * (1 / scale) against x / scale), which moves
        # an e4m3 rounding only for a value within a bit of its boundary.
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, rel
        # torch.compile traces the kernels as ops of known output shapes and the float8 inputs through the
        # blocks (one graph, no break) and gets the same.
        compiled = torch.compile(switched, backend="aot_eager", fullgraph=True)(xt, t, y)
        assert (compiled - out).abs().max() == 0
    print("checked", rel)
""")


def test_float8_cast_kernels_are_quantize_of_the_modules_maths_and_a_model_switched_to_them_agrees():
    run_triton_interpreted(CHECKS)
