"""The hand-written RMSNorm + adaLN kernel (issue 29's route 1), run by Triton's interpreter on the CPU: the
same maths as the module, in float64, forward and backward, alone and inside a DiT^DH."""
import importlib.util
import textwrap

import pytest

from tests.helpers import run_triton_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

CHECKS = textwrap.dedent("""
    import torch
    from stages.models import adaln_triton
    from stages.models.dit import RMSNorm, create_dit, modulate

    def grads(out, inputs, dy):
        return torch.autograd.grad(out, inputs, dy)

    # Alone: T = 70 rows per sample spans three of the backward's 32-row blocks; D = 24 is masked to 32 lanes.
    B, T, D = 2, 70, 24
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        torch.manual_seed(0)
        norm = RMSNorm(D).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(D, dtype=dtype))
        x = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
        shift, scale = (torch.randn(B, 1, D, dtype=dtype, requires_grad=True) for _ in range(2))
        dy = torch.randn(B, T, D, dtype=dtype)
        inputs = (x, norm.weight, shift, scale)
        ref = modulate(norm(x), shift, scale)
        out = adaln_triton.norm_modulate(x, norm.weight, shift, scale, norm.eps)
        assert out.dtype == dtype and out.shape == ref.shape
        err = (out - ref).abs().max() / ref.abs().max()
        assert err < tol, (dtype, "forward", err)
        for name, g, r in zip(("x", "weight", "shift", "scale"), grads(out, inputs, dy), grads(ref, inputs, dy)):
            assert g.dtype == r.dtype and g.shape == r.shape, name
            err = (g - r).abs().max() / r.abs().max()
            assert err < tol, (dtype, name, err)

    # Inside a DiT^DH in float64: the trunk's blocks switched (the head's per-token condition keeps its own
    # forward), output and every parameter's gradient as the model's own.
    def build():
        torch.manual_seed(0)
        m = create_dit("ditdh-s", 8, 4, 10, width=32, depth=2, num_heads=2, head_width=48, head_depth=1,
                       head_num_heads=2).double()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # zero-initialised gates would hide the blocks' gradients
        return m
    ours, fused = build(), build()
    assert adaln_triton.enable(fused) == 3
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    t, y = torch.rand(3, dtype=torch.float64), torch.tensor([1, 2, 10])
    calls, kernel = [], adaln_triton.norm_modulate
    adaln_triton.norm_modulate = lambda *args: calls.append(1) or kernel(*args)
    a, b = ours(x, t, y), fused(x, t, y)
    adaln_triton.norm_modulate = kernel
    assert len(calls) == 4  # two trunk blocks, two norms each; the head's per-token condition is its own
    assert (a - b).abs().max() < 1e-13
    a.square().sum().backward()
    b.square().sum().backward()
    checked = 0
    for (name, p), q in zip(ours.named_parameters(), fused.parameters()):
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max() <= 1e-12 * p.grad.abs().max(), name
            checked += 1
    assert checked > 20
    # torch.compile traces the kernels as ops of known output shapes (one graph, no break) and gets the same.
    fused.zero_grad()
    c = torch.compile(fused, backend="aot_eager", fullgraph=True)(x, t, y)
    c.square().sum().backward()
    assert (c - b).abs().max() < 1e-13

    # A per-token shift is not this kernel's: one clear error.
    try:
        adaln_triton.norm_modulate(torch.randn(2, 5, 8), torch.ones(8), torch.randn(2, 5, 8), torch.randn(2, 5, 8), 1e-6)
    except ValueError as e:
        assert "[B, 1, D]" in str(e)
    else:
        raise AssertionError("a per-token shift was accepted")
    print("checked", checked)
""")


def test_norm_modulate_kernel_is_the_modules_maths_forward_and_backward():
    run_triton_interpreted(CHECKS)
