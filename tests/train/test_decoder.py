"""rae train-decoder (stages/train_decoder.py, stages/decoder_training.py): learning, exact resume,
loss schedules, DDP equality, input checks and outputs. Tiny decoders on a tiny store; LPIPS and the
discriminator with seeded random weights (timm's small test ViT as the discriminator backbone),
through the real code path."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stages.encode import EncodeConfig
from stages.encode import run as encode
from stages.errors import ArtifactError
from stages.artifacts.images import load_crop
from stages.dist import Dist
from stages.train.losses import GanSchedule, adaptive_gan_weight, generator_loss
from stages.artifacts.manifest import read_manifest
from stages.models.decoder import ViTDecoder
from stages.train.decoder_step import (DecoderTraining, Schedule, build_loss_networks, gan_lambda, learning_rate,
                                       noise_augment)
from stages.train.runlog import read_metrics
from stages.train.config import TrainDecoderConfig
from stages.train.decoder import _Reader, run
from tests.helpers import TIMING_KEYS, run_rae

TINY = dict(model="vit-b", width=32, depth=1, heads=2, mlp_dim=64, batch_size=4, warmup_steps=1, lr=1e-3,
            final_lr=1e-4, disc_lr=1e-3, disc_final_lr=1e-4, random_loss_nets=True, disc_backbone="test_vit",
            log_every=1, num_workers=0, device="cpu", augment="none")
CLI_TINY = ["--model", "vit-b", "--width", 32, "--depth", 1, "--heads", 2, "--mlp-dim", 64, "--warmup-steps", 1,
            "--lr", 1e-3, "--final-lr", 1e-4, "--disc-lr", 1e-3, "--disc-final-lr", 1e-4, "--random-loss-nets",
            "--disc-backbone", "test_vit", "--log-every", 1, "--num-workers", 0, "--device", "cpu",
            "--augment", "none"]


def _cfg(store, out, **kw):
    return TrainDecoderConfig(latents=str(store), out=str(out), **{**TINY, **kw})


@pytest.fixture(autouse=True)
def single_thread():
    # Small CPU ops on a shared 2-core machine: thread hand-offs cost more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _encode(images, out, seed):
    encode(EncodeConfig(data=str(images), out=str(out), encoder="dinov2-demo", random_init=True, seed=seed,
                        image_size=64, block_size=16, shard_size=8, num_workers=0, device="cpu"))
    return out


@pytest.fixture(scope="module")
def store(demo_images, tmp_path_factory):
    return _encode(demo_images, tmp_path_factory.mktemp("td") / "s.zarr", seed=0)  # 40 entries, [96, 4, 4]


@pytest.fixture(scope="module")
def full_run(store, tmp_path_factory):
    """6 uninterrupted steps: LPIPS throughout, D updates from step 2, the GAN term from step 4."""
    out = tmp_path_factory.mktemp("td") / "full"
    torch.set_num_threads(1)
    run(_cfg(store, out, steps=6, disc_start_step=2, gan_start_step=4, checkpoint_every=2, preview_every=3))
    return out


def _weights(run_dir):
    return {name: load_file(str(run_dir / name)) for name in ("decoder.safetensors", "decoder_ema.safetensors")}


def _losses(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# ---------------------------------------------------------------- the step's pieces

def test_noise_is_per_sample_whatever_the_batch_split():
    z = torch.zeros(8, 3, 2, 2)
    whole = noise_augment(z, 0.8, seed=0, step=5, first=0)
    halves = torch.cat([noise_augment(z[:4], 0.8, 0, 5, first=0), noise_augment(z[4:], 0.8, 0, 5, first=4)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, noise_augment(z, 0.8, seed=0, step=6, first=0))  # a new draw each step
    sigma = whole.flatten(1).std(dim=1)
    assert (sigma > 0).all() and (sigma < 0.8 * 1.5).all()
    assert noise_augment(z, 0.0, 0, 5, 0) is z  # tau = 0: no augmentation


def test_gan_lambda_from_image_gradients_equals_adaptive_gan_weight():
    torch.manual_seed(0)
    decoder = ViTDecoder(in_dim=8, grid=2, patch_size=4, width=16, depth=1, heads=2, mlp_dim=32)
    z, x = torch.randn(3, 8, 2, 2), torch.rand(3, 3, 8, 8)
    x_hat = decoder(z)
    rec, gan = (x_hat - x).abs().mean(), -torch.tanh(3 * x_hat).mean()
    direct = adaptive_gan_weight(rec, gan, decoder.last_layer_weight)
    image = x_hat.detach().requires_grad_(True)
    g_rec = torch.autograd.grad((image - x).abs().mean(), image)[0]
    g_gan = torch.autograd.grad(-torch.tanh(3 * image).mean(), image)[0]
    ours = gan_lambda(x_hat, g_rec, g_gan, decoder.last_layer_weight)
    # The same norms reached by another order of float32 operations through a 16-wide layer: each
    # gradient entry sums at most 3 x 4 x 16 terms, so the ratio moves by well under 1e-5 (~170 u).
    assert torch.allclose(ours, direct, rtol=1e-5, atol=0), (ours, direct)


def test_decoder_gradients_equal_the_single_loss_formulation():
    """The step pushes d(loss)/d(image) through the decoder once; the gradients must equal those of
    the reference's L1 + w_L * LPIPS + w_G * lambda * GAN backpropagated as one loss."""
    cfg = TrainDecoderConfig(latents="", out="", **{**TINY, "noise_tau": 0.0, "disc_aug_prob": 0.0})
    lpips, disc, _ = build_loss_networks(cfg)
    arch = dict(in_dim=8, grid=2, patch_size=16, width=32, depth=1, heads=2, mlp_dim=64)
    schedule = Schedule(total=10, warmup=1, steps_per_epoch=10, losses=GanSchedule(disc_start=0, gan_start=0))
    training = DecoderTraining(cfg, arch, schedule, Dist(0, 1, 0, torch.device("cpu")), lpips, disc, "fp32")
    z, images = torch.randn(2, 8, 2, 2), torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)

    reference = ViTDecoder(**arch)
    reference.load_state_dict(training.decoder.state_dict())
    x = images.float() / 255
    x_hat = reference(z)
    rec = (x_hat - x).abs().mean() + cfg.lpips_weight * lpips(x_hat, x).mean()
    gan = generator_loss(disc(x_hat, augment=False))
    lam = adaptive_gan_weight(rec, gan, reference.last_layer_weight)
    (rec + cfg.gan_weight * lam * gan).backward()

    grads = {}
    training.opt.step = lambda: grads.update({n: p.grad.clone() for n, p in training.decoder.named_parameters()
                                              if p.grad is not None})
    training.step(0, z, images)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    # One backward of the summed loss vs the image's gradient pushed through the decoder: the same
    # float32 products summed in another order (u = 2^-24). Norm-wise per tensor (entries whose
    # gradient is ~0 are all rounding): reductions of at most 4608 terms (LPIPS-VGG) chained ~20 deep
    # give at most ~20 sqrt(4608) u = 8e-5 relative; a wrong lambda or a missing term moves it by O(1).
    for name in expected:
        assert (grads[name] - expected[name]).norm() <= 1e-4 * expected[name].norm(), name


def _step_gradients(grad_accum: int, share=None):
    """One step with L1, LPIPS, the GAN term (adaptive lambda) and a D update, all on: the decoder's
    and the discriminator heads' gradients as the optimisers see them, and the logged values."""
    cfg = TrainDecoderConfig(latents="", out="", **{**TINY, "batch_size": 8, "grad_accum": grad_accum,
                                                   "disc_aug_prob": 0.0})  # DiffAug draws per micro-batch
    lpips, disc, _ = build_loss_networks(cfg)
    arch = dict(in_dim=8, grid=2, patch_size=16, width=32, depth=1, heads=2, mlp_dim=64)
    schedule = Schedule(total=10, warmup=1, steps_per_epoch=10, losses=GanSchedule(disc_start=0, gan_start=0))
    training = DecoderTraining(cfg, arch, schedule, Dist(0, 1, 0, torch.device("cpu")), lpips, disc, "fp32")
    g = torch.Generator().manual_seed(3)
    z, images = torch.randn(8, 8, 2, 2, generator=g), torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    first = 0
    if share is not None:  # this process's share of the global batch, as a rank's
        z, images, first = z[share[0]: share[1]], images[share[0]: share[1]], share[0]
    grads = {}
    training.opt.step = lambda: grads.update(
        decoder=torch.cat([p.grad.flatten() for p in training.decoder.parameters() if p.grad is not None]))
    training.opt_d.step = lambda: grads.update(
        heads=torch.cat([p.grad.flatten() for p in training.disc.heads.parameters() if p.grad is not None]))
    metrics = training.step(2, z, images, first=first)
    return grads, {k: float(v) for k, v in metrics.items()}


def test_gradient_accumulation_gives_the_batch_gradient_lambda_and_d_update():
    """--grad-accum A: the step's gradients, lambda, the D update and the logged values are the whole
    batch's. Across processes this is exact (tests/test_pipeline_chain.py: one process with
    A = 2 against two); within one process the micro-batches change the batch size of every kernel,
    hence the order of float32 sums (u = 2^-24 = 6e-8). Error model: a reordered sum of n terms moves by
    at most ~log2(n) u sum|terms| (blocked/pairwise summation) and typically sqrt(n) u |sum|; the
    backward chains ~20 reductions of at most n = 4608 terms (LPIPS-VGG's 512 x 3 x 3), so the
    gradient moves norm-wise by about 20 * 68 * u = 8e-5 at most: bound 1e-4. Logged losses are means
    of positive terms (L1 over 24,576 pixels: log2(n) u = 9e-7 relative) or of such gradients' images:
    bound 1e-5. Both bounds are orders of magnitude below a real bug: rank 0's gradient without the
    all-reduce (a lost micro-batch) moves the whole gradient by over 10%."""
    whole, m_whole = _step_gradients(1)

    def rel(a, b):
        return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)

    for accum in (2, 4):
        got, m_got = _step_gradients(accum)
        assert got.keys() == whole.keys() == {"decoder", "heads"} and rel(got, whole) < 1e-4, accum
        assert m_got.keys() == m_whole.keys() and {"lambda", "gan", "d_loss", "lpips"} <= m_got.keys()
        for k in m_whole:
            assert m_got[k] == pytest.approx(m_whole[k], rel=1e-5, abs=1e-7), (accum, k)
    half, _ = _step_gradients(1, share=(0, 4))
    assert min(((half[k] - whole[k]).norm() / whole[k].norm()).item() for k in whole) > 0.1


def test_loss_networks_load_weight_files_through_the_real_path(tmp_path):
    import timm
    from torchvision.models.vgg import cfgs, make_layers

    from stages.models.weights import MissingWeightsError
    from stages.digests import sha256_file

    torch.manual_seed(1)
    vgg = make_layers(cfgs["D"])  # torchvision's own VGG16 layout, random weights
    torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, tmp_path / "vgg16.pth")
    backbone = timm.create_model("test_vit", pretrained=False, num_classes=0)
    torch.save(backbone.state_dict(), tmp_path / "disc_backbone.pth")
    cfg = TrainDecoderConfig(latents="", out="", lpips_vgg_weights=str(tmp_path / "vgg16.pth"),
                             disc_weights=str(tmp_path / "disc_backbone.pth"), disc_backbone="test_vit")
    lpips, disc, record = build_loss_networks(cfg)
    assert torch.equal(lpips.vgg[28].weight, vgg[28].weight)
    assert (lpips.lins[0].weight >= 0).all() and lpips.lins[0].weight.abs().sum() > 0  # the lpips package's layers
    assert torch.equal(disc.backbone.blocks[2].attn.qkv.weight, backbone.blocks[2].attn.qkv.weight)
    assert record["discriminator"]["backbone_sha256"] == sha256_file(tmp_path / "disc_backbone.pth")
    with pytest.raises(MissingWeightsError) as info:
        build_loss_networks(TrainDecoderConfig(latents="", out="", lpips_weight=0.0, disc_weights=str(tmp_path / "nope.pth")))
    assert "\n" not in str(info.value) and "nope.pth" in str(info.value)


def test_learning_rate_warms_up_from_zero_then_decays_to_final():
    lrs = [learning_rate(s, 2e-4, 2e-5, warmup=10, total=100) for s in range(101)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[9] == pytest.approx(2e-4)
    assert lrs[10] == pytest.approx(2e-4) and lrs[55] == pytest.approx(1.1e-4) and lrs[100] == pytest.approx(2e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_schedules_in_epochs_follow_the_reference_recipe_and_steps_win():
    defaults = TrainDecoderConfig(latents="", out="")
    s = Schedule.of(defaults, steps_per_epoch=2502)  # ImageNet's 1,281,167 images at batch 512
    assert (s.total, s.warmup) == (16 * 2502, 2502)
    assert (s.losses.lpips_start, s.losses.disc_start, s.losses.gan_start) == (0, 6 * 2502, 8 * 2502)
    s = Schedule.of(TrainDecoderConfig(latents="", out="", disc_start_step=7, gan_start_step=9, steps=20), 2502)
    assert (s.total, s.losses.disc_start, s.losses.gan_start) == (20, 7, 9)


# ---------------------------------------------------------------- training runs

def test_training_decreases_reconstruction_loss(store, tmp_path):
    out = tmp_path / "learn"
    run(_cfg(store, out, steps=80, batch_size=8, warmup_steps=5, lr=2e-3, final_lr=2e-4, lpips_weight=0.0,
             gan_weight=0.0, noise_tau=0.0, width=64, heads=4, mlp_dim=128))
    l1 = [r["l1"] for r in read_metrics(out)]
    assert len(l1) == 80 and np.mean(l1[-10:]) < 0.7 * np.mean(l1[:5]), (l1[:5], l1[-10:])
    # On all 40 entries, the trained decoder's error is far below the same decoder's at initialisation.
    config = json.loads((out / "config.json").read_text())
    torch.manual_seed(0)
    initial, trained = ViTDecoder(**config["decoder"]), ViTDecoder(**config["decoder"])
    trained.load_state_dict(load_file(str(out / "decoder.safetensors")))
    z, _, images = _Reader(str(store), 64)(np.arange(40))
    with torch.no_grad():
        before, after = ((m(z) - images / 255).abs().mean().item() for m in (initial, trained))
    assert after < 0.5 * before, (before, after)


def test_gan_and_disc_schedule_switch_at_configured_steps(full_run):
    records = read_metrics(full_run)  # "step" = steps done, so step index = step - 1
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all("lpips" in r for r in records)
    assert [("d_loss" in r) for r in records] == [False, False, True, True, True, True]  # D from index 2
    assert [("gan" in r and "lambda" in r) for r in records] == [False] * 4 + [True] * 2  # GAN from index 4
    assert all(r["lambda"] > 0 for r in records[4:])
    assert records[0]["lr"] == pytest.approx(1e-3)  # warm-up of one step from zero: full lr at index 0


def test_resume_after_kill_equals_uninterrupted_run(store, full_run, tmp_path):
    out = tmp_path / "resumed"
    cfg = dict(steps=6, disc_start_step=2, gan_start_step=4, checkpoint_every=2, preview_every=3)
    first = run(_cfg(store, out, stop_after=3, **cfg))
    assert first["complete"] is False and first["step"] == 3
    assert not read_manifest(out, require_complete=False)["complete"]
    # What a kill leaves behind: a metrics line past the checkpoint, one torn mid-write, and a
    # half-written checkpoint.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "l1": 123.0}) + "\n" + '{"step": 5, "l1": 1')
    (out / "checkpoints" / ".step_00000004.safetensors.tmp99").write_bytes(b"partial")
    run(_cfg(store, out, **cfg))
    assert not list(out.rglob(".*tmp*"))  # the finished run keeps no temporary file

    ours, ref = _weights(out), _weights(full_run)
    for file in ref:
        for name in ref[file]:
            assert torch.equal(ours[file][name], ref[file][name]), (file, name)
    assert _losses(read_metrics(out)) == _losses(read_metrics(full_run))
    assert read_manifest(out)["content_id"] == read_manifest(full_run)["content_id"]


def test_resume_between_log_steps_logs_the_same_interval_means(store, tmp_path):
    """Checkpoints every 4 steps, records every 5: a run stopped (or killed) at step 6 resumes with
    the interval 6-10 half summed; its records equal the uninterrupted run's, bit for bit."""
    cfg = dict(steps=12, checkpoint_every=4, log_every=5, lpips_weight=0.0, gan_weight=0.0)
    run(_cfg(store, tmp_path / "full", **cfg))
    run(_cfg(store, tmp_path / "cut", stop_after=6, **cfg))
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [5]  # 6 is inside an interval: not logged
    run(_cfg(store, tmp_path / "cut", **cfg))
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in full] == [5, 10, 12]
    assert _losses(cut) == _losses(full)


def test_outputs_config_and_manifest(store, full_run):
    for name in ("decoder.safetensors", "decoder_ema.safetensors", "config.json", "metrics.jsonl", "losses.png",
                 "reconstructions.png", "previews/step_00000003.png", "previews/step_00000006.png",
                 "latent_stats.safetensors"):
        assert (full_run / name).is_file(), name
    assert sorted(p.name for p in (full_run / "checkpoints").glob("step_*")) == \
        ["step_00000004.safetensors", "step_00000006.safetensors"]  # every 2 steps, 2 kept

    manifest, store_manifest = read_manifest(full_run, kind="decoder-run"), read_manifest(store)
    assert manifest["complete"] and manifest["steps"] == 6
    assert manifest["content_id"] == hashlib.sha256((full_run / "decoder_ema.safetensors").read_bytes()).hexdigest()
    assert manifest["inputs"]["latents"]["content_id"] == store_manifest["content_id"]
    assert manifest["encoder"] == store_manifest["encoder"]
    assert manifest["config"]["noise_tau"] == 0.8 and manifest["loss_networks"]["random_init"] is True

    # config.json rebuilds the EMA decoder; it decodes raw latents to 64x64 images.
    config = json.loads((full_run / "config.json").read_text())
    assert config["encoder"] == store_manifest["encoder"] and config["image_size"] == 64
    decoder = ViTDecoder(**config["decoder"])
    decoder.load_state_dict(load_file(str(full_run / config["weights"])))
    z = _Reader(str(store), 64)(np.arange(2))[0]
    assert decoder(z).shape == (2, 3, 64, 64)
    stats = load_file(str(full_run / "latent_stats.safetensors"))
    assert stats["mean"].shape == (96, 4, 4)

    grid = Image.open(full_run / "reconstructions.png")
    assert grid.size == (2 + 4 * (2 * 64 + 6), 2 + 2 * (64 + 2))  # 8 pairs (original | reconstruction), 4 per row
    assert Image.open(full_run / "losses.png").size[0] > 0


def test_upsampling_decoder_learns_crops_at_its_output_size(store, demo_images, tmp_path):
    out = tmp_path / "up"
    run(_cfg(store, out, decoder_patch=32, steps=1, lpips_weight=0.0, gan_weight=0.0, preview_count=2))
    assert json.loads((out / "config.json").read_text())["image_size"] == 128  # 4x4 tokens x 32 px
    assert Image.open(out / "reconstructions.png").size == (2 + 2 * (2 * 128 + 6), 2 + 128 + 2)
    reader = _Reader(str(store), 128)
    _, _, images = reader(np.array([1]))
    files = (store / "sources.txt").read_text().split()
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), load_crop(demo_images / files[1], 128))
    # The same `rae decode` turns the store's 4x4 latents into 128 px images (16 x 16 -> 512 px at full size).
    run_rae("decode", store, "--decoder", out, "--out", tmp_path / "img", "--device", "cpu")
    with np.load(tmp_path / "img" / "samples.npz") as f:
        assert f["arr_0"].shape == (40, 128, 128, 3)


def test_store_of_another_encoder_is_refused_on_resume_in_one_line(store, demo_images, tmp_path):
    out = tmp_path / "run"
    run(_cfg(store, out, steps=4, stop_after=1, lpips_weight=0.0, gan_weight=0.0))
    other = _encode(demo_images, tmp_path / "other.zarr", seed=1)  # another (random) encoder
    with pytest.raises(ArtifactError, match="encoder") as info:
        run(_cfg(other, out, steps=4, lpips_weight=0.0, gan_weight=0.0))
    assert "\n" not in str(info.value)
    # The command line prints it as one line, without a traceback.
    proc = run_rae("train-decoder", "--latents", other, "--out", out, "--batch-size", 4, "--steps", 4,
                   "--lpips-weight", 0, "--gan-weight", 0, *CLI_TINY, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "encoder" in proc.stderr
    # A changed configuration is refused too, unless --overwrite.
    with pytest.raises(ArtifactError, match="lr"):
        run(_cfg(store, out, steps=4, stop_after=1, lpips_weight=0.0, gan_weight=0.0, lr=5e-4))
    result = run(_cfg(store, out, steps=4, stop_after=1, lpips_weight=0.0, gan_weight=0.0, lr=5e-4, overwrite=True))
    assert result["step"] == 1 and read_manifest(out, require_complete=False)["config"]["lr"] == 5e-4
