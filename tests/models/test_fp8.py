"""Float8 inference (``rae sample --precision fp8``): the layer, which layers it replaces, and the stage."""
import numpy as np
import pytest
import torch
from torch import nn

from stages.models import fp8
from stages.models.dit import DiT, DiTDH, SwiGLU
from stages.options import check_options
from stages.errors import RaeError
from stages.decode import DecodeConfig
from stages.artifacts.manifest import read_manifest
from stages.sample import run
from tests.helpers import TINY_DIT, make_diffusion_run, randomize_, sample_config, store_latents


def _layer(k, n, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def test_quantize_rows_puts_each_row_max_at_448_and_survives_zero_rows():
    x = torch.randn(4, 32) * torch.tensor([[1e-3], [1.0], [50.0], [0.0]])
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4, 1)
    assert q[:3].float().abs().amax(dim=1).tolist() == [448.0] * 3
    assert torch.all(q[3].float() == 0) and torch.isfinite(scale).all()


def test_quantize_per_tensor_puts_the_matrix_max_at_448_and_keeps_the_small_rows_coarser():
    x = torch.randn(4, 32) * torch.tensor([[1e-3], [1.0], [50.0], [0.0]])
    q, scale = fp8.quantize(x, "tensor")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == ()
    assert q.float().abs().max().item() == 448.0 and torch.all(q[3].float() == 0)
    # One scale for all rows: the 1e-3 row lands among e4m3's subnormals, rounded far more coarsely than per row.
    qr, sr = fp8.quantize_rows(x)
    rel = [((qq[0].float() * ss.reshape(-1)[0] - x[0]).norm() / x[0].norm()).item() for qq, ss in ((q, scale), (qr, sr))]
    assert rel[1] < 2 ** -4 < rel[0], rel
    with pytest.raises(ValueError, match="scaling"):
        fp8.Float8Linear(nn.Linear(16, 16), "column")


@pytest.mark.parametrize("scaling", fp8.SCALINGS)
@pytest.mark.parametrize("k,n", [(32, 48), (40, 20), (24, 84)])  # multiples of 16 and not (zero padding)
def test_float8_linear_is_the_product_of_its_float8_operands(k, n, scaling):
    linear = _layer(k, n)
    layer = fp8.Float8Linear(linear, scaling)
    x = torch.randn(5, 3, k)
    out = layer(x)
    assert out.shape == (5, 3, n) and out.dtype == torch.bfloat16
    # What it must compute: the float8 input (rounded per token) times the float8 weight, both scaled back.
    xq, xs = fp8.quantize(nn.functional.pad(x.reshape(15, k), (0, layer.weight.shape[1] - k)), scaling)
    w = layer.weight.double() * layer.weight_scale.double().t()
    product = ((xq.double() * xs.double()) @ w.t())[:, :n]
    expected = product + layer.bias[:n].double()
    # The bias is added in the product's epilogue: one bf16 rounding of the sum (2^-8 of |sum|) on top of
    # the float32 accumulation of K terms (at most K 2^-24 sum|x||w|).
    err = (out.reshape(15, n).double() - expected).abs()
    magnitude = ((xq.double() * xs.double()).abs() @ w.abs().t())[:, :n]
    assert torch.all(err <= 2 ** -8 * expected.abs() + k * 2 ** -24 * magnitude), err.max()
    # And against the exact linear map: each operand rounds to 3 mantissa bits (relative 2^-4 at most, above
    # e4m3's subnormals), so |error| <= (2^-4 + 2^-4 + 2^-8) sum_k |x_k||w_k| + subnormal and output rounding.
    exact = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    bound = 0.13 * (x.double().abs() @ linear.weight.double().abs().t()) + 1e-2 * exact.abs() + 1e-3
    assert torch.all((out.double() - exact).abs() <= bound)
    assert (out.double() - exact).abs().max() > 0  # it is float8: not the bf16 product by another name


def _linear_rows(model, x, t, y):
    """For every nn.Linear/Float8Linear of ``model``: the number of rows it multiplied in one forward."""
    rows, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, fp8.Float8Linear)):
            hooks.append(m.register_forward_hook(lambda m, a, o, name=name: rows.__setitem__(name, a[0].numel()
                                                                                            // a[0].shape[-1])))
    with torch.no_grad():
        model(x, t, y)
    for h in hooks:
        h.remove()
    return rows


@pytest.mark.parametrize("cls", [DiTDH, DiT])
def test_per_token_linears_are_exactly_the_layers_that_see_every_token(cls, monkeypatch):
    # Rows are counted by forward hooks on the Linear modules; a SwiGLU of a hidden width off its alignment
    # multiplies its padded weights functionally, past those hooks, so here it computes at the stored width.
    monkeypatch.setattr(SwiGLU, "align", 1)
    kw = dict(TINY_DIT) if cls is DiTDH else {k: v for k, v in TINY_DIT.items() if not k.startswith("head")}
    model = randomize_(cls(**kw), 0)
    B, tokens = 3, kw["input_size"] ** 2
    x, t, y = torch.randn(B, kw["in_channels"], 4, 4), torch.rand(B), torch.tensor([0, 1, 2])
    rows = _linear_rows(model, x, t, y)
    names = model.per_token_linears()
    assert set(names) == {n for n, r in rows.items() if r == B * tokens}
    assert all(rows[n] == B for n in set(rows) - set(names))  # the rest: one row per image
    if cls is DiTDH:  # the head's adaLN is conditioned per token, the trunk's per image
        assert "blocks.1.adaLN_modulation.1" in names and "blocks.0.adaLN_modulation.1" not in names

    # Converted: the same model shape, every listed layer float8, output close to the bf16 model's.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, t, y).float()
        fp8.to_float8(model, names)
        out = model(x, t, y).float()
    assert {n for n, m in model.named_modules() if isinstance(m, fp8.Float8Linear)} == set(names)
    rel = ((out - ref).norm() / ref.norm()).item()
    # e4m3 rounds each operand by up to 2^-4 (rms 3.6%), so each product moves by ~5% of its value; five
    # layers deep that is ~10% here (measured 10% for DiT^DH, 3% for DiT), far above bf16's rounding.
    assert 1e-3 < rel < 0.25, rel


def test_sample_with_fp8(tmp_path):
    model = make_diffusion_run(tmp_path / "run", seed=0)
    a, b = tmp_path / "bf16.zarr", tmp_path / "fp8.zarr"
    run(sample_config(model, a, precision="bf16"))
    run(sample_config(model, b, precision="fp8"))
    assert read_manifest(b, kind="sample-store")["sampling"]["precision"] == "fp8"
    run(sample_config(model, tmp_path / "fp32.zarr", precision="fp32"))
    x32, x16, x8 = store_latents(tmp_path / "fp32.zarr"), store_latents(a), store_latents(b)
    assert np.isfinite(x8).all()
    # Same noise: fp8 samples stay far closer to the fp32 ones than two different noises' samples are to
    # each other (measured: 0.09 of that distance with this tiny, large-weight model, 4 steps), and float8
    # moves them more than bf16 does (measured 6x): the float8 layers really ran.
    gap8, gap16 = np.abs(x8 - x32).mean(), np.abs(x16 - x32).mean()
    between = np.abs(x32[1:] - x32[:-1]).mean()
    assert gap16 < gap8 < 0.3 * between, (gap16, gap8, between)


def test_fp8_is_offered_only_where_it_runs(monkeypatch):
    with pytest.raises(RaeError, match="--precision must be"):
        check_options(DecodeConfig(store="s", decoder="d", out="o", precision="fp8"))
    assert fp8.float8_supported(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    why = fp8.float8_supported(torch.device("cuda"))
    assert "8.9" in why and "A100" in why and "\n" not in why
    monkeypatch.undo()

    def no_rowwise(*a, **k):
        raise RuntimeError("Invalid scaling configuration\nmore detail")
    monkeypatch.setattr(torch, "_scaled_mm", no_rowwise)
    why = fp8.float8_supported(torch.device("cpu"))
    assert "Invalid scaling configuration" in why and "--precision bf16" in why and "\n" not in why
