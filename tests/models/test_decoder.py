"""The RAE pixel decoder (stages/models/decoder.py): sizes, reference key mapping, shapes, noise.

Floating-point comparisons are exact where both sides run the same operations; otherwise the bound
comes from the error model written beside it, so it holds on any CPU, vector instruction set and
thread count."""
import pytest
import torch

from stages.models.decoder import (DECODER_SIZES, ViTDecoder, add_noise, create_decoder, from_reference_state_dict,
                                   to_reference_state_dict)
from stages.models.imagenet import IMAGENET_MEAN
from stages.models.pos_embed import sincos_pos_embed_2d


def tiny(grid=4, patch_size=4, in_dim=8, **kw):
    return ViTDecoder(in_dim=in_dim, grid=grid, patch_size=patch_size, width=32, depth=2, heads=4, mlp_dim=64,
                      **kw)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size,patch_size,expected,millions", [
    ("vit-b", 16, 86_435_328, 86.44),
    ("vit-l", 16, 304_150_272, 304.15),
    ("vit-xl", 16, 415_352_704, 415.35),
    ("vit-xl", 32, 418_009_216, 418.01),  # 512x512 from 256 tokens
])
def test_parameter_counts_equal_reference(size, patch_size, expected, millions):
    with torch.device("meta"):
        model = create_decoder(size, in_dim=768, grid=16, patch_size=patch_size)
    assert n_params(model) == expected
    assert round(n_params(model) / 1e6, 2) == millions


def test_presets_follow_paper_table():
    assert DECODER_SIZES["vit-b"] == dict(width=768, depth=12, heads=12, mlp_dim=3072)
    assert DECODER_SIZES["vit-l"] == dict(width=1024, depth=24, heads=16, mlp_dim=4096)
    assert DECODER_SIZES["vit-xl"] == dict(width=1152, depth=28, heads=16, mlp_dim=4096)
    with pytest.raises(ValueError, match="unknown decoder size"):
        create_decoder("vit-h", in_dim=768, grid=16, patch_size=16)


def test_reference_state_dict_round_trip_and_key_names():
    model = tiny()
    ours = model.state_dict()
    ref = to_reference_state_dict(ours)
    layer = {f"decoder_layers.{i}.{name}.{kind}" for i in range(2) for kind in ("weight", "bias") for name in (
        "layernorm_before", "attention.attention.query", "attention.attention.key", "attention.attention.value",
        "attention.output.dense", "layernorm_after", "intermediate.dense", "output.dense")}
    top = {"trainable_cls_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
           "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    assert set(ref) == layer | top
    assert ref["decoder_layers.1.attention.attention.key.weight"].shape == (32, 32)
    value_bias = ref["decoder_layers.0.attention.attention.value.bias"]
    assert torch.equal(value_bias, ours["blocks.0.attn.qkv.bias"][64:])  # qkv = [query; key; value]

    back = from_reference_state_dict(ref)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # a DDP / whole-RAE checkpoint carries prefixes
    prefixed = from_reference_state_dict({"module.decoder." + k: v for k, v in ref.items()})
    tiny().load_state_dict(prefixed, strict=True)
    with pytest.raises(ValueError, match="unexpected keys"):
        from_reference_state_dict({**ref, "encoder.blocks.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="incomplete"):
        from_reference_state_dict({k: v for k, v in ref.items() if not k.endswith("0.attention.attention.key.bias")})


def test_forward_shapes_including_upsampling():
    z = torch.randn(2, 8, 4, 4)
    assert tiny(patch_size=4)(z).shape == (2, 3, 16, 16)
    up = tiny(patch_size=8)  # p_d = 2 * p_e: the same tokens decode to twice the resolution
    assert up.image_size == 32 and up(z).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[B, 8, 4, 4\]"):
        tiny()(torch.randn(2, 8, 5, 5))


def test_unpatchify_places_each_token_at_its_patch():
    model = tiny(grid=3, patch_size=2)
    tokens = torch.arange(9.0).view(1, 9, 1).expand(1, 9, 2 * 2 * 3)  # token t = r * 3 + c holds value t
    image = model.unpatchify(tokens)
    assert image.shape == (1, 3, 6, 6)
    for r in range(3):
        for c in range(3):
            assert (image[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] == r * 3 + c).all()


def test_output_undoes_encoder_normalisation():
    model = tiny(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(1.0)  # "+1 std" in encoder input space
    # 0 * finite + 1 = 1 and 1 * 0.5 + 0.5 = 1: exact
    assert torch.equal(model(torch.randn(1, 8, 4, 4)), torch.ones(1, 3, 16, 16))
    assert "image_mean" not in model.state_dict()  # configuration, not weights
    assert torch.equal(tiny().image_mean.flatten(), torch.tensor(IMAGENET_MEAN))


def test_position_embedding_is_fixed_sincos_with_zero_cls_slot():
    model = tiny(grid=4)
    pos = model.pos_embed[0]
    assert not model.pos_embed.requires_grad
    assert pos.shape == (17, 32) and torch.equal(pos[0], torch.zeros(32))
    table = sincos_pos_embed_2d(32, 4).view(4, 4, 32)  # [row, col, channel]
    assert torch.equal(pos[1:].view(4, 4, 32), table)
    # MAE convention: first half encodes the column, second half the row; sin(0) = 0, cos(0) = 1
    assert torch.equal(table[:, 0, :8], torch.zeros(4, 8)) and torch.equal(table[:, 0, 8:16], torch.ones(4, 8))
    assert torch.equal(table[0, :, 16:24], torch.zeros(4, 8))
    # Same column: sin/cos of the same float64 angles, but possibly one through a vector and one through
    # a scalar routine (each within 1 ulp), then rounded to float32: at most 1 float32 ulp apart.
    torch.testing.assert_close(table[2, 3, :16], table[0, 3, :16], rtol=2.0**-23, atol=0)
    assert (table[2, 3, 16:] - table[0, 3, 16:]).abs().max() > 0.1  # different row: O(1) apart


def test_last_layer_weight_is_the_pixel_head():
    model = tiny()
    assert model.last_layer_weight is model.head.weight
    assert model.last_layer_weight.shape == (4 * 4 * 3, 32)


def test_tiny_decoder_overfits_a_few_latents():
    torch.manual_seed(0)
    model = tiny(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    z, images = torch.randn(4, 8, 4, 4), torch.rand(4, 3, 16, 16)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs cost more than they save on a busy CPU
    try:
        losses = []
        for _ in range(150):
            loss = (model(z) - images).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    # The best output that ignores the latents (each pixel's median over the 4 images) has 30% of the
    # initial L1 loss (0.20 of 0.67); fitting each image from its latent goes below. Training is chaotic
    # in the last bits (other CPUs take other trajectories), so the bound is statistical: seeds 0-2 end
    # at 0.156-0.160 of the initial loss.
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


def test_noise_augmentation_draws_one_sigma_below_tau_per_sample():
    tau, z = 0.8, torch.zeros(64, 16, 16, 16)
    noisy = add_noise(z, tau, generator=torch.Generator().manual_seed(0))
    # Seeded draws (the normal ones may differ in their last bits between CPUs, which moves these
    # statistics by ~1e-7): a std estimate from n normal values has relative standard error
    # 1 / sqrt(2n), 1.1% for a sample's 4096 values, so 5% above the largest sigma (< tau) is > 4 SE.
    sigma = noisy.flatten(1).std(dim=1)
    assert (sigma < tau * 1.05).all()
    # 64 uniform sigmas: P(none below 0.2 tau or none above 0.8 tau) = 2 * 0.8^64 = 1e-6 (and seeded)
    assert sigma.min() < 0.2 * tau and sigma.max() > 0.8 * tau  # spread over [0, tau)
    # the same sigma for all of a sample's channels: 256 values each, relative SE 4.4%; 0.25 is 5.7 SE
    per_channel = noisy.flatten(2).std(dim=2)
    assert ((per_channel / sigma[:, None] - 1).abs() <= 0.25).all()
    again = add_noise(z, tau, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    assert add_noise(z, 0.0) is z


def test_forward_adds_no_noise_in_train_or_eval_mode():
    model, z = tiny(), torch.randn(2, 8, 4, 4)
    model.train()
    a, b = model(z), model(z)
    model.eval()
    assert torch.equal(a, b) and torch.equal(a, model(z))  # the same operations each time
