"""DiT / DiT^DH: sizes as the reference, adaLN-Zero, labels, RoPE, checkpoint names, compile,
and the paper's width rule at toy scale.

Floating-point comparisons are exact where both sides run the same operations on the same shapes;
otherwise the tolerance comes from the error model written beside it (u32 = 2^-24, u64 = 2^-53), so it
holds on any CPU, vector instruction set and thread count."""

import math

import pytest
import torch

from stages import flow
from stages.errors import RaeError
from stages.models.dit import (DIT_SIZES, DiT, DiTDH, RoPE2D, apply_rope, config_from_reference_state_dict, create_dit,
                               from_reference_state_dict, swiglu_hidden, to_reference_state_dict, width_rule_warning)
from tests.helpers import randomize_

# sum(p.numel() for p in model.parameters()) of the authors' LightningDiT / DiTwDDTHead for a
# [768, 16, 16] latent and 1000 classes (measured on their code).
REFERENCE_PARAMS = {
    "dit-s": 33_649_792,
    "dit-b": 131_884_288,
    "dit-l": 459_923_424,
    "dit-xl": 677_248_384,
    "ditdh-s": 196_455_764,
    "ditdh-b": 294_295_892,
    "ditdh-xl": 838_675_796,
}
PAPER_MILLIONS = {"ditdh-s": 196.46, "ditdh-b": 294.30, "ditdh-xl": 838.68}

C, S, K = 16, 4, 10  # tiny latent [16, 4, 4], 10 classes
U32 = 2.0**-24


def tiny(kind, depth=2):
    torch.manual_seed(0)
    if kind == "dit":
        return DiT(in_channels=C, input_size=S, width=32, depth=depth, num_heads=2, num_classes=K)
    return DiTDH(in_channels=C, input_size=S, width=16, depth=depth, num_heads=2,
                 head_width=32, head_depth=depth, head_num_heads=2, num_classes=K)


def randomized(kind, seed=1, depth=2):
    """A tiny model with every weight random (adaLN-Zero layers included) so outputs are non-trivial."""
    return randomize_(tiny(kind, depth), seed)


def inputs(batch=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, C, S, S, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, K, (batch,), generator=g))


@pytest.mark.parametrize("size", list(REFERENCE_PARAMS))
def test_param_count_equals_reference_implementation(size):
    with torch.device("meta"):
        model = create_dit(size, in_channels=768, input_size=16, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert count == REFERENCE_PARAMS[size]
    if size in PAPER_MILLIONS:
        assert round(count / 1e6, 2) == PAPER_MILLIONS[size]


def test_named_sizes_are_the_papers():
    sizes = {name: (kw["width"], kw["depth"], kw["num_heads"]) for name, (_, kw) in DIT_SIZES.items()}
    assert sizes["dit-xl"] == sizes["ditdh-xl"] == (1152, 28, 16)
    assert sizes["ditdh-s"] == (384, 12, 6) and sizes["ditdh-b"] == (768, 12, 12)
    assert sizes["dit-l"] == (1024, 24, 16)
    for name, (cls, kw) in DIT_SIZES.items():
        if cls is DiTDH:
            assert (kw["head_width"], kw["head_depth"], kw["head_num_heads"]) == (2048, 2, 16)


def test_create_dit_applies_overrides_and_rejects_unknown_names():
    with torch.device("meta"):
        model = create_dit("ditdh-s", in_channels=32, input_size=8, depth=3, head_width=64)
    assert model.config["depth"] == 3 and model.config["head_width"] == 64
    assert len(model.blocks) == 3 + 2
    with pytest.raises(RaeError, match="ditdh-xl"):
        create_dit("dit-xxl", in_channels=32, input_size=8)


def test_swiglu_hidden_width_truncates_like_reference():
    assert [swiglu_hidden(w, 4.0) for w in (384, 768, 1024, 1152, 2048)] == [1024, 2048, 2730, 3072, 5461]
    assert tiny("dit").blocks[0].mlp.w3.in_features == swiglu_hidden(32, 4.0)


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
def test_velocity_has_latent_shape(kind):
    x, t, y = inputs()
    v = randomized(kind)(x, t, y)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
def test_fresh_model_is_adaln_zero(kind):
    model = tiny(kind)
    x, t, y = inputs()
    # Zero output layer: the fresh model predicts v = 0 exactly (0 * finite + 0 is 0) ...
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    # ... and every block starts as the identity (zero gates: x + 0 * finite is x).
    h = torch.randn(3, S * S, model.blocks[0].norm1.weight.numel())
    c = torch.randn(3, h.shape[-1])
    rope_module = model.feat_rope if kind == "dit" else model.enc_feat_rope
    rope = (rope_module.freqs_cos, rope_module.freqs_sin)
    assert torch.equal(model.blocks[0](h, c, rope), h)


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
def test_null_label_is_an_extra_class(kind):
    model = randomized(kind)
    x, t, _ = inputs()
    null = torch.full((3,), K)
    v_null = model(x, t, null)
    assert torch.isfinite(v_null).all()
    # The label enters through an O(1) embedding row: the outputs differ by O(1), not by rounding.
    assert (v_null - model(x, t, torch.zeros(3, dtype=torch.long))).abs().max() > 0.1
    assert model.y_embedder.embedding_table.num_embeddings == K + 1
    with pytest.raises(IndexError):
        model(x, t, torch.full((3,), K + 1))


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
def test_forward_is_deterministic_in_train_mode(kind):
    # Label dropout lives in the training loop (diffusion_training.step_draws), not in the model.
    model = randomized(kind).train()
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), model(x, t, y))


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
def test_each_sample_is_independent_of_the_rest_of_the_batch(kind):
    # What batching conditional + unconditional passes for CFG relies on.
    model = randomized(kind)
    x, t, y = inputs(batch=4)
    batched = model(x, t, y)
    # Exact: new values for the other samples (same shapes, so the same kernels and summation orders)
    # leave sample 0's velocity bit for bit as it was.
    g = torch.Generator().manual_seed(9)
    x2, t2, y2 = x.clone(), t.clone(), (y + 1) % K
    x2[1:], t2[1:] = torch.randn(3, C, S, S, generator=g), torch.rand(3, generator=g)
    y2[0] = y[0]
    other = model(x2, t2, y2)
    assert torch.equal(other[0], batched[0]) and (other[1:] - batched[1:]).abs().max() > 0.1
    # A batch of 1 gives each sample's velocity up to rounding, the batch size changing kernels'
    # summation orders. The whole forward runs in float64 (RMSNorm included), where those orders move
    # v by a few float64 roundoffs per layer over sums of ~100 terms (measured 3e-15 * max|v|);
    # 1e-10 * max|v| holds that with room, and stays far below one float32 rounding (6e-8) or a leak
    # between samples, which moves v by O(max|v|) (above).
    model, x, t = model.double(), x.double(), t.double()
    batched = model(x, t, y)
    tol = 1e-10 * batched.abs().max().item()
    for i in range(4):
        torch.testing.assert_close(batched[i:i + 1], model(x[i:i + 1], t[i:i + 1], y[i:i + 1]), rtol=0, atol=tol)


def test_time_embedding_is_fourier_features_of_raw_t():
    model = randomized("dit").double()
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    angles = 2 * math.pi * t[:, None] * model.t_embedder.W[None]
    expected = model.t_embedder.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))
    # float64 (t is exact in float32, which the embedder rounds it to): the angles (|angle| < 40) differ
    # by the order of 3 multiplications, <= 6 u64 * 40 < 3e-14, sin/cos by 2 u64 more; the first layer
    # sums 512 terms (row sums of |w| < 25, |features| <= 1): <= 25 * (512 u64 + 3e-14) < 2e-12; SiLU
    # (slope <= 1.1) and the second layer (row sums of |w| < 8) make that < 2e-11, plus its own 32-term
    # sum: atol 1e-10.
    mlp = model.t_embedder.mlp
    assert model.t_embedder.W.abs().max() < 40 / (2 * math.pi)
    assert mlp[0].weight.abs().sum(1).max() < 25 and mlp[2].weight.abs().sum(1).max() < 8
    torch.testing.assert_close(model.t_embedder(t), expected, rtol=0, atol=1e-10)
    assert not model.t_embedder.W.requires_grad and not model.pos_embed.requires_grad


def test_rope_scores_depend_only_on_relative_position():
    grid, head_dim = 4, 8
    rope = RoPE2D(head_dim, grid)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(head_dim, generator=g).expand(1, 1, grid * grid, head_dim)
    k = torch.randn(head_dim, generator=g).expand(1, 1, grid * grid, head_dim)
    rq, rk = apply_rope(q, rope.freqs_cos, rope.freqs_sin), apply_rope(k, rope.freqs_cos, rope.freqs_sin)
    # A rotation, in float32: cos and sin are within 1 ulp (so cos^2 + sin^2 within 4 u32 of 1), each
    # rotated pair adds 3 u32, the norm of 8 terms 5 u32 more: relative error <= 12 u32 = 7e-7.
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-6, atol=0)
    scores = (rq[0, 0] @ rk[0, 0].T).reshape(grid, grid, grid, grid)  # [r_q, c_q, r_k, c_k]
    # Equal only up to float32 rounding of the angles (position <= 3 times a frequency <= 1, itself
    # rounded: <= 9 u32 absolute), of cos/sin (1 ulp) and of the 8-term dot products (10 u32):
    # |score error| <= (2 * 11 + 10) u32 |q| |k| per score, twice that between two scores.
    tol = 64 * U32 * (q[0, 0, 0].norm() * k[0, 0, 0].norm()).item()
    torch.testing.assert_close(scores[0, 0, 1, 2], scores[2, 1, 3, 3], rtol=0, atol=tol)  # offset (+1, +2)
    torch.testing.assert_close(scores[3, 0, 1, 0], scores[2, 2, 0, 2], rtol=0, atol=tol)  # offset (-2, 0)
    assert (scores[0, 0, 1, 2] - scores[0, 0, 2, 1]).abs() > 100 * tol  # rows and columns differ
    assert "freqs_cos" not in rope.state_dict()  # recomputed, never checkpointed


def test_state_dict_names_are_the_reference_names():
    block = ["norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias",
             "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]
    top = ["pos_embed", "t_embedder.W", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
           "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
           "final_layer.norm_final.weight", "final_layer.linear.weight", "final_layer.linear.bias",
           "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
           "x_embedder.proj.weight", "x_embedder.proj.bias"]
    dh_top = top + ["s_embedder.proj.weight", "s_embedder.proj.bias", "s_projector.weight",
                    "s_projector.bias"]
    dit, ditdh = tiny("dit"), tiny("ditdh")
    assert set(dit.state_dict()) == set(top) | {f"blocks.{i}.{b}" for i in range(2) for b in block}
    assert set(ditdh.state_dict()) == set(dh_top) | {f"blocks.{i}.{b}" for i in range(4) for b in block}
    sd = ditdh.state_dict()
    assert sd["blocks.1.attn.qkv.weight"].shape == (48, 16)  # trunk
    assert sd["blocks.2.attn.qkv.weight"].shape == (96, 32)  # head
    assert sd["x_embedder.proj.weight"].shape == (32, C, 1, 1)  # Conv2d layout of the checkpoints


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
def test_reference_checkpoint_round_trip(kind):
    model = randomized(kind)
    ref_sd = to_reference_state_dict(model)
    rope_keys = {k for k in ref_sd if k.endswith(("freqs_cos", "freqs_sin"))}
    assert len(rope_keys) == (2 if kind == "dit" else 4)
    # A training checkpoint of the reference keeps the EMA weights under "ema".
    cls, kwargs = config_from_reference_state_dict({"ema": ref_sd})
    assert cls is type(model) and kwargs == model.config
    loaded = cls(**kwargs).eval()
    loaded.load_state_dict(from_reference_state_dict({"ema": ref_sd}), strict=True)
    x, t, y = inputs()
    assert torch.equal(loaded(x, t, y), model(x, t, y))  # same weights, same operations


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
def test_forward_traces_as_one_graph(kind):
    model = randomized(kind, depth=1)  # one block per stack: the same code, less to trace
    x, t, y = inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fails on any graph break
    # The "eager" backend runs the traced graph's operations with the ordinary kernels: exact.
    assert torch.equal(compiled(x, t, y), model(x, t, y))


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
def test_bf16_autocast_forward_stays_close_to_fp32(kind):
    model = randomized(kind)
    x, t, y = inputs()
    reference = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, y)
    assert torch.isfinite(low).all()
    # bf16 keeps 8 significant bits: each autocast matmul rounds its operands by <= 2^-9 relative,
    # and through these random blocks that amounts to an RMS error of 0.6% (DiT) / 2.2% (DiT^DH) of
    # the output. Seeded, so that is a fixed number up to which float32 sums round to which bf16
    # value (measured: 1e-6 input perturbations move it < 1e-4 of itself); bound 5%.
    assert (low.float() - reference).norm() < 0.05 * reference.norm()


def test_width_rule_warning_only_when_width_below_token_dim():
    assert width_rule_warning(768, 768) is None
    assert width_rule_warning(1152, 768) is None
    message = width_rule_warning(384, 768)
    assert "384" in message and "768" in message and "width" in message
    with torch.device("meta"):
        ditdh_s = create_dit("ditdh-s", in_channels=768, input_size=16)
        dit_s = create_dit("dit-s", in_channels=768, input_size=16)
    # DiT^DH-S has a 384-wide trunk but a 2048-wide head: it satisfies the rule, DiT-S does not.
    assert width_rule_warning(ditdh_s.output_width, 768) is None
    assert width_rule_warning(dit_s.output_width, 768) is not None


def _overfit_one_latent(width, heads, token_dim=32, steps=120):
    """Train on a single latent, return the flow-matching loss on 256 fresh (eps, t)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, token_dim, 4, 4, generator=g).expand(32, -1, -1, -1)
    model = DiT(in_channels=token_dim, input_size=4, width=width, depth=1, num_heads=heads,
                num_classes=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3,
                            weight_decay=0.0)
    y = torch.zeros(32, dtype=torch.long)
    for _ in range(steps):
        eps, t = torch.randn(x.shape, generator=g), flow.sample_t(32, generator=g)
        loss = flow.loss(model(flow.interpolate(x, eps, t), t, y), flow.target(x, eps))
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(1)
    x, y = x[:1].expand(256, -1, -1, -1), torch.zeros(256, dtype=torch.long)
    eps, t = torch.randn(x.shape, generator=g), flow.sample_t(256, generator=g)
    with torch.no_grad():
        return flow.loss(model(flow.interpolate(x, eps, t), t, y), flow.target(x, eps)).item()


def test_model_narrower_than_tokens_cannot_fit_one_latent():
    # The paper's width experiment at toy scale: tokens of dimension 32.
    # A width-16 model's last layer maps 16 dimensions to each 32-dimensional token, so its output lies
    # in a 16-dimensional affine subspace: the noise's component outside it (independent of the
    # weights, half its variance) is never predicted, whatever the training: loss >= 0.5 in expectation,
    # and the 256 x 16 x 16 fresh normal components put the sample below 0.45 at > 10 standard errors.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs cost more than they save on a busy CPU
    try:
        narrow = _overfit_one_latent(width=16, heads=2)
        wide = _overfit_one_latent(width=64, heads=4)
    finally:
        torch.set_num_threads(threads)
    assert narrow > 0.45
    # A width-64 model gets well below that floor. Training is chaotic in the last bits (other CPUs
    # take other trajectories), so this bound is statistical: training seeds 0-4 end at 0.09-0.13.
    assert wide < 0.25


def test_patch_embedding_matmul_form_equals_the_reference_conv():
    """The default matmul form of the patch embedding is the reference's Conv2d map (same weights,
    same state dict keys), up to rounding; conv_forward runs the Conv2d itself."""
    import torch

    from stages.models.dit import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(12, 20, patch_size=1).double()
    x = torch.randn(3, 12, 5, 5, dtype=torch.float64)
    fast = embed(x)
    embed.conv_forward = True
    conv = embed(x)
    assert fast.shape == conv.shape == (3, 25, 20)
    # float64, the two forms differ only in the order of 12 products and the bias:
    # <= 2 * 13 u64 * sum|w x| (< 30 here) < 1e-13.
    torch.testing.assert_close(fast, conv, rtol=0, atol=1e-12)
    assert set(embed.state_dict()) == {"proj.weight", "proj.bias"}
    big = PatchEmbed(12, 20, patch_size=2)  # larger patches always run the convolution
    assert big(torch.randn(1, 12, 4, 4)).shape == (1, 4, 20)


def test_rmsnorm_keeps_float64_in_float64():
    """Float64 checks (gradient accumulation, parity) need the norm itself in float64: the float32
    rounding it would otherwise add (~6e-8 relative) is far above float64's 1.1e-16 unit roundoff."""
    from stages.models.dit import RMSNorm

    x = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e3 + 1 / 3
    exact = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    out = RMSNorm(64)(x)
    assert out.dtype == torch.float64 and (out - exact).abs().max() < 64 * 2.3e-16 * exact.abs().max()


# ---- the reference's architecture switches -------------------------------------------------------------

SWITCHES = [dict(use_qknorm=True), dict(use_swiglu=False), dict(use_rmsnorm=False), dict(use_rmsnorm=False, use_qknorm=True),
            dict(wo_shift=True), dict(use_pos_embed=False), dict(use_rope=False)]


def switched(kind, **switches):
    torch.manual_seed(0)
    if kind == "dit":
        model = DiT(in_channels=C, input_size=S, width=32, depth=2, num_heads=2, num_classes=K, **switches)
    else:
        model = DiTDH(in_channels=C, input_size=S, width=16, depth=2, num_heads=2, head_width=32, head_depth=2,
                      head_num_heads=2, num_classes=K, **switches)
    return randomize_(model, 1)


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_switch_has_the_reference_tensors_and_round_trips(kind, switches):
    model = switched(kind, **switches)
    assert {k: v for k, v in model.config.items() if k.startswith(("use_", "wo_"))} == switches  # only what differs
    sd = model.state_dict()
    has = lambda key: any(k.endswith(key) for k in sd)  # noqa: E731
    assert has("attn.q_norm.weight") == bool(switches.get("use_qknorm"))
    assert has("attn.q_norm.bias") == (bool(switches.get("use_qknorm")) and switches.get("use_rmsnorm") is False)
    assert has("mlp.fc1.weight") == (switches.get("use_swiglu") is False) != has("mlp.w12.weight")
    assert has("norm1.weight") == (switches.get("use_rmsnorm") is not False)
    assert ("pos_embed" in sd) == (switches.get("use_pos_embed") is not False)
    width = 32 if kind == "dit" else 16
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape[0] == (4 if switches.get("wo_shift") else 6) * width
    if not switches.get("use_swiglu", True):
        assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * width, width)
    # A reference checkpoint of it gives back the class and every switch (the heads, without RoPE, are given).
    cls, kwargs = config_from_reference_state_dict(to_reference_state_dict(model))
    if not switches.get("use_rope", True):
        assert kwargs["num_heads"] is None
        kwargs.update({k: model.config[k] for k in ("num_heads", "head_num_heads") if k in model.config})
    assert cls is type(model) and kwargs == model.config
    loaded = cls(**kwargs).eval()
    loaded.load_state_dict(from_reference_state_dict(to_reference_state_dict(model)), strict=True)
    x, t, y = inputs()
    v = model.eval()(x, t, y)
    assert torch.equal(loaded(x, t, y), v) and v.isfinite().all()
    assert not torch.allclose(v, randomized(kind)(x, t, y))  # the switch changes the maths


@pytest.mark.parametrize("kind", ["dit", "ditdh"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(kind):
    model = switched(kind, use_qknorm=True).eval()
    x, t, y = inputs()
    before = model(x, t, y)
    width = 32 if kind == "dit" else 16
    with torch.no_grad():
        qkv = model.blocks[0].attn.qkv
        qkv.weight[: 2 * width] *= 7.0  # queries and keys of the first block, 7x larger
        qkv.bias[: 2 * width] *= 7.0
    after = model(x, t, y)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)  # RMSNorm's eps is all that sees the scale
    plain = randomized(kind).eval()
    ref = plain(x, t, y)
    with torch.no_grad():
        plain.blocks[0].attn.qkv.weight[: 2 * width] *= 7.0
        plain.blocks[0].attn.qkv.bias[: 2 * width] *= 7.0
    assert not torch.allclose(plain(x, t, y), ref, rtol=1e-4, atol=1e-5)


def test_without_shift_the_modulation_only_scales():
    block = switched("dit", wo_shift=True).blocks[0]
    assert block.adaLN_modulation[-1].out_features == 4 * 32
    with pytest.raises(TypeError, match="unknown architecture switch"):
        DiT(in_channels=C, input_size=S, width=32, depth=1, num_heads=2, num_classes=K, use_flash=True)


def test_swiglu_padded_to_its_alignment_computes_the_stored_widths_sums():
    """A hidden width off ``SwiGLU.align`` (the head's 5,461) is multiplied zero-padded: the same output and
    gradients as at the stored width, the parameters untouched."""
    import copy

    from stages.models.dit import SwiGLU

    torch.manual_seed(0)
    padded = SwiGLU(32, 85).double()  # 85: off 8
    stored = copy.deepcopy(padded)
    stored.align = 1
    x = torch.randn(3, 7, 32, dtype=torch.double)
    outs, grads = [], []
    for m in (padded, stored):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(*grads))
    assert padded.w12.weight.shape == (170, 32) and padded.w3.weight.shape == (32, 85)
