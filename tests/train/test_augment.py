"""The decoder trained on the paper's data recipe (`train-decoder --augment reference`): the crop is
torchvision's Resize + crop, drawn per (seed, epoch, image) so that a resume and any number of
processes see the same crops; the store's frozen encoder runs in the loop and, given the crop the
store encoded, gives exactly the stored latent; `--init` for both trainers."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file

from stages.artifacts.images import crop_offsets, first_resize, reference_crop, resize_short_side
from stages.artifacts.manifest import read_manifest
from stages.artifacts.store import LatentStore
from stages.dist import Dist
from stages.errors import ArtifactError
from stages.train.config import TrainDecoderConfig
from stages.train.data import BatchPlan, StoreReader
from stages.train.decoder import frozen_encoder, load_init
from stages.train.decoder_step import DecoderTraining, Schedule
from tests.helpers import DIFFUSION_ARGS, ENCODE_ARGS, run_rae

DEC = ["--model", "vit-b", "--width", 32, "--depth", 1, "--num-heads", 2, "--mlp-dim", 64, "--warmup-steps", 1,
       "--lr", 1e-3, "--final-lr", 1e-4, "--random-loss-nets", "--disc-backbone", "test_vit", "--lpips-weight", 0,
       "--gan-weight", 0, "--batch-size", 8, "--log-every", 1, "--num-workers", 0, "--device", "cpu"]


@pytest.fixture(scope="module")
def store(demo_images, tmp_path_factory):
    """The demo images (40 of 64 px) encoded with --flip: 80 entries of [96, 4, 4]."""
    out = tmp_path_factory.mktemp("aug") / "s.zarr"
    run_rae("encode", demo_images, "--out", out, *ENCODE_ARGS)
    return out


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (97, 97), (64, 140), (1000, 333)])
@pytest.mark.parametrize("image_size", [64, 256])
def test_the_crop_is_torchvisions_resize_and_crop_bit_for_bit(size, image_size):
    rng = np.random.default_rng(size[0] * 7 + image_size)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    short = first_resize(image_size)
    assert short == (384 if image_size == 256 else int(image_size * 1.5))
    theirs = T.Resize(short, interpolation=T.InterpolationMode.BICUBIC)(img)
    ours = resize_short_side(img, short)
    assert ours.size == theirs.size and np.array_equal(np.asarray(ours), np.asarray(theirs))
    for epoch, index in ((0, 0), (3, 17)):
        top, left = crop_offsets(ours.size[1], ours.size[0], image_size, seed=5, epoch=epoch, index=index)
        expected = np.asarray(TF.crop(theirs, top, left, image_size, image_size))
        got = reference_crop(img, image_size, seed=5, epoch=epoch, index=index)
        assert got.shape == (image_size, image_size, 3) and np.array_equal(got, expected)


def test_crops_depend_on_seed_epoch_and_image_only(store):
    plan = BatchPlan.for_store(LatentStore(store), 8, seed=3, flip=False)
    assert len(plan.indices) == 40 and not np.asarray(LatentStore(store).flipped[:])[plan.indices].any()
    whole = StoreReader(store, crop_seed=3)
    step = 7  # epoch 1 (5 steps of 8 per epoch)
    lat, labels, images = whole(plan.batch(step), epoch=step // plan.steps_per_epoch)
    assert lat.numel() == 0 and images.shape == (8, 3, 64, 64) and images.dtype == torch.uint8
    # Two processes, each its half of the global batch: the same crops.
    halves = [StoreReader(store, crop_seed=3)(BatchPlan.for_store(LatentStore(store), 8, 3, r, 2, flip=False).batch(step),
                                              epoch=1)[2] for r in range(2)]
    assert torch.equal(torch.cat(halves), images)
    # A resumed run (a new reader, a new process) draws the same; another epoch draws others.
    assert torch.equal(StoreReader(store, crop_seed=3)(plan.batch(step), epoch=1)[2], images)
    assert not torch.equal(StoreReader(store, crop_seed=3)(plan.batch(step), epoch=2)[2], images)
    assert not torch.equal(StoreReader(store, crop_seed=4)(plan.batch(step), epoch=1)[2], images)


def test_the_encoder_in_the_loop_gives_the_stored_latent_of_the_same_crop(store):
    manifest = read_manifest(store)
    cfg = TrainDecoderConfig(latents=str(store), out="-", precision="fp32", device="cpu")
    encode = frozen_encoder(cfg, manifest, torch.float16, torch.device("cpu"))
    idx = np.arange(0, 80, 7)  # images and mirrors: the reader gives each entry's own (center) crop
    cached, _, images = StoreReader(store, with_images=True)(idx)
    assert torch.equal(encode(images), cached)


def test_a_store_whose_encoder_cannot_be_rebuilt_is_refused(store, tmp_path):
    manifest = read_manifest(store)
    manifest["encoder"]["weights_sha256"] = "0" * 64
    cfg = TrainDecoderConfig(latents=str(store), out="-", precision="fp32", device="cpu")
    with pytest.raises(ArtifactError, match="--encoder-weights") as e:
        frozen_encoder(cfg, manifest, torch.float16, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_train_decoder_reference_resumes_exactly_and_records_the_recipe(store, tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    run_rae("train-decoder", "--latents", store, "--out", full, *DEC, "--steps", 4, "--augment", "reference")
    run_rae("train-decoder", "--latents", store, "--out", parts, *DEC, "--steps", 4, "--stop-after", 2)
    run_rae("train-decoder", "--latents", store, "--out", parts, *DEC, "--steps", 4)
    a, b = load_file(full / "decoder_ema.safetensors"), load_file(parts / "decoder_ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_manifest(full)["config"]["augment"] == "reference"
    # The cached-latent path trains on other data: other weights.
    none = tmp_path / "none"
    run_rae("train-decoder", "--latents", store, "--out", none, *DEC, "--steps", 4, "--augment", "none")
    c = load_file(none / "decoder_ema.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_an_upsampling_decoder_cannot_use_reference_crops(store, tmp_path):
    proc = run_rae("train-decoder", "--latents", store, "--out", tmp_path / "d", *DEC, "--steps", 2,
                   "--decoder-patch", 32, check=False)
    assert proc.returncode == 1 and "--augment none" in proc.stderr and "Traceback" not in proc.stderr


# ---- --init -----------------------------------------------------------------------------------

def test_train_decoder_init_starts_from_the_source_weights(store, tmp_path):
    src = tmp_path / "src"
    run_rae("train-decoder", "--latents", store, "--out", src, *DEC, "--steps", 2, "--augment", "none")
    cfg = TrainDecoderConfig(latents=str(store), out="-", init=str(src), model="vit-b", width=32, depth=1, heads=2,
                             mlp_dim=64, random_loss_nets=True, disc_backbone="test_vit", lpips_weight=0,
                             gan_weight=0, device="cpu")
    from stages.train.decoder import decoder_architecture

    arch = decoder_architecture(cfg, read_manifest(store)["encoder"], LatentStore(store).latent_shape)
    training = DecoderTraining(cfg, arch, Schedule.of(cfg, 5), Dist(0, 1, 0, torch.device("cpu")), None, None, "fp32")
    load_init(cfg, training)
    want = load_file(src / "decoder_ema.safetensors")
    for model in (training.decoder, training.ema):
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    # Through the command: recorded as an input, and a different --init is another run.
    out = tmp_path / "tuned"
    run_rae("train-decoder", "--latents", store, "--out", out, *DEC, "--steps", 2, "--augment", "none", "--init", src)
    m = read_manifest(out)
    assert m["inputs"]["init"]["content_id"] == read_manifest(src)["content_id"]
    wider = tmp_path / "wider"
    proc = run_rae("train-decoder", "--latents", store, "--out", wider, *[str(a) for a in DEC], "--width", "64",
                   "--steps", "2", "--augment", "none", "--init", src, check=False)
    assert proc.returncode == 1 and "does not fit this decoder" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_train_diffusion_init_starts_from_the_source_weights(store, tmp_path):
    src = tmp_path / "src"
    run_rae("train-diffusion", "--latents", store, "--out", src, *DIFFUSION_ARGS)
    out = tmp_path / "tuned"
    run_rae("train-diffusion", "--latents", store, "--out", out, *DIFFUSION_ARGS, "--init", src, "--steps", 1,
            "--lr", "1e-12", "--final-lr", "1e-12")
    a, b = load_file(src / "model_ema.safetensors"), load_file(out / "model.safetensors")
    # One step at a vanishing learning rate: the raw weights are still the source's EMA weights.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert read_manifest(out)["inputs"]["init"]["content_id"] == read_manifest(src)["content_id"]
    proc = run_rae("train-diffusion", "--latents", store, "--out", tmp_path / "other", *DIFFUSION_ARGS,
                   "--init", src, "--depth", 2, check=False)
    assert proc.returncode == 1 and "does not fit this model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
