"""Decoder-training losses (stages/losses.py) and the DINO discriminator (stages/models/discriminator.py).

Floating-point comparisons are exact where both sides run the same operations; otherwise the tolerance
comes from the error model written beside it (u32 = 2^-24), so it holds on any CPU, vector instruction
set and thread count."""
import pytest
import torch
import torch.nn as nn

from stages.models.lpips import LPIPS, VGG16_FILE, VGG16_URL
from stages.train.losses import GanSchedule, adaptive_gan_weight, generator_loss, hinge_d_loss
from stages.models.discriminator import diffaug, round_to_8bit
from stages.models.weights import load_discriminator
from stages.models.weights import MissingWeightsError

U32 = 2.0**-24


@pytest.fixture
def single_thread():
    # Small CPU ops on a shared 2-core machine: thread hand-offs cost more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- adaptive weight, GAN losses, schedule

def test_adaptive_weight_equals_direct_gradient_norm_ratio():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x, target = torch.randn(8, 5), torch.randn(8, 3)
    out = layer(x)
    rec = (out - target).abs().mean()
    gan = -3.0 * torch.tanh(out).mean()
    weight = adaptive_gan_weight(rec, gan, layer.weight)

    # The same graphs, shapes and operations as inside adaptive_gan_weight (clamping 0.21 to [0, 1e4]
    # changes nothing): exact.
    g_rec = torch.autograd.grad((layer(x) - target).abs().mean(), layer.weight)[0]
    g_gan = torch.autograd.grad(-3.0 * torch.tanh(layer(x)).mean(), layer.weight)[0]
    assert torch.equal(weight, g_rec.norm() / (g_gan.norm() + 1e-6))
    assert not weight.requires_grad
    (rec + weight * gan).backward()  # the graph is kept for the real backward pass
    assert layer.weight.grad is not None


def test_adaptive_weight_is_capped():
    w = torch.ones(3, requires_grad=True)
    rec, gan = (w * 1e3).sum(), (w * 1e-9).sum()  # tiny GAN gradient -> huge ratio
    assert adaptive_gan_weight(rec, gan, w, max_weight=1e4).item() == 1e4  # the clamp's bound, exact
    assert adaptive_gan_weight(rec, gan, w, max_weight=5.0).item() == 5.0


def test_hinge_and_generator_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1. float32: the sums
    # are exact, then a division by 3 and an addition round (<= 2 u32), the float64 constant's rounding
    # to float32 adds u32 / 2.
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)), rtol=3 * U32, atol=0)
    torch.testing.assert_close(generator_loss(fake), torch.tensor(1 / 3), rtol=2 * U32, atol=0)


def test_gan_schedule_switches_at_configured_steps():
    s = GanSchedule.from_epochs(steps_per_epoch=10, disc_epoch=6, gan_epoch=8, lpips_epoch=0)
    assert (s.disc_start, s.gan_start, s.lpips_start) == (60, 80, 0)
    assert not s.disc_active(59) and s.disc_active(60)
    assert not s.gan_active(79) and s.gan_active(80) and s.gan_active(10_000)
    assert s.lpips_active(0)
    assert GanSchedule(disc_start=3, gan_start=5).gan_active(5)


# ---------------------------------------------------------------- LPIPS

@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


@pytest.fixture
def vgg_in_hub_cache(torch_home):
    """A random-init torchvision VGG16 (its own architecture code) where torch hub caches it."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    path = torch_home / "hub" / "checkpoints" / VGG16_FILE
    path.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def test_lpips_loads_vgg_from_torch_hub_cache(vgg_in_hub_cache, monkeypatch, single_thread):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    lpips = LPIPS()
    saved = torch.load(vgg_in_hub_cache, weights_only=True)
    assert torch.equal(lpips.vgg[28].weight, saved["features.28.weight"])  # relu5_3's conv
    assert all(not p.requires_grad for p in lpips.parameters())
    assert lpips.lins[0].weight.abs().sum() > 0  # the package's learned linear layers

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    x.requires_grad_(True)
    d_same, d_diff = lpips(x, x), lpips(x, y)
    # x against itself: both halves of the one [x; x] batch go through the same kernels, so the unit
    # features are equal and every squared difference is 0 exactly.
    assert d_same.shape == (2,) and torch.equal(d_same, torch.zeros(2))
    assert (d_diff > 0).all()
    d_diff.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_accepts_explicit_vgg_file(vgg_in_hub_cache, tmp_path, single_thread):
    local = tmp_path / "my_vgg.pth"
    vgg_in_hub_cache.rename(local)
    lpips = LPIPS(vgg_weights=local)
    assert torch.equal(lpips.vgg[0].bias, torch.load(local, weights_only=True)["features.0.bias"])


def test_lpips_offline_without_file_raises_one_line(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeightsError) as info:
        LPIPS()
    message = str(info.value)
    assert "\n" not in message
    assert VGG16_FILE in message and VGG16_URL in message and str(torch_home / "hub" / "checkpoints") in message


# ---------------------------------------------------------------- DINO discriminator, DiffAug

@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    """A random-init DINO ViT-S/8 in the layout of the released checkpoint (= timm's names)."""
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino") / "dino_vits8.pth"
    torch.save(timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).state_dict(), path)
    return path


def test_discriminator_trains_heads_only_and_passes_gradient_to_images(dino_file, single_thread):
    disc = load_discriminator(dino_file).train()
    assert torch.equal(disc.backbone.blocks[3].attn.qkv.weight,
                       torch.load(dino_file, weights_only=True)["blocks.3.attn.qkv.weight"])
    assert not disc.backbone.training  # frozen backbone stays in eval mode under .train()
    assert all(not p.requires_grad for p in disc.backbone.parameters())

    images = torch.rand(1, 3, 32, 32, requires_grad=True)  # resized to 224 inside, as in the reference
    logits = disc(images)
    assert logits.shape == (1, 5 * 28 * 28)  # 5 heads (last block + depths 2, 5, 8, 11), one logit per token
    generator_loss(logits).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_diffaug_preserves_shape_and_is_off_at_prob_zero():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 20, 24) * 2 - 1
    out = diffaug(x, prob=1.0, cutout=0.2)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert not torch.equal(out, x)
    assert torch.equal(diffaug(x, prob=0.0), x)


def test_diffaug_translates_each_sample_by_its_own_offset():
    torch.manual_seed(1)
    x = torch.ones(16, 1, 16, 16)  # one channel: colour changes move all of a sample's pixels together
    out = diffaug(x, prob=1.0)
    # shifts are at most 16 / 8 = 2 pixels, so the centre is always image; the rest is image or zero fill.
    # Within a sample the image pixels are equal exactly (the same operations on the same values), and
    # zero fill differs from the image by the O(1) colour-shifted value (checked: > 0.1).
    fill = out != out[:, :, 8:9, 8:9]
    assert (out[fill] - out[:, :, 8:9, 8:9].expand_as(out)[fill]).abs().min() > 0.1
    assert fill.any()
    assert len({tuple(m.flatten().tolist()) for m in fill}) > 2  # different samples, different offsets
    assert not fill[:, :, 2:-2, 2:-2].any()


def test_round_to_8bit_clamps_and_quantises():
    x = torch.tensor([-0.2, 0.0, 0.5, 0.7012, 1.3])
    # round() gives the integers 128 and 179 exactly; k / 255 divided in float32 and the float64 quotient
    # rounded to float32 are the same floats for these k (IEEE arithmetic: the same on every machine)
    assert torch.equal(round_to_8bit(x), torch.tensor([0.0, 0.0, 128 / 255, 179 / 255, 1.0]))
