"""Benchmark one decoder-training step on one GPU: ours against the reference code's, side by side.

Both steps do the paper's full recipe with every term active (L1 + LPIPS + adaptive-weighted GAN,
discriminator update), ViT-XL decoder with p_d = 16 on DINOv2-B's [768, 16, 16] latents, random
weights everywhere (the same compute as pretrained ones):

* ours: ``stages.train.decoder_step.DecoderTraining.step`` on latents and uint8 images already in GPU
  memory (``--augment none``: training reads both from the store; the encoder never runs);
* oursaug: the same step after the store's frozen encoder (DINOv2-B, bf16, compiled with the
  step) encodes the batch's images, as ``--augment reference`` does every step;
* reference: the operations of the loop body of the reference ``train_stage1.py``, built from the
  reference modules imported from ``--reference`` (its RAE with the Hugging Face DINOv2-B encoder
  run on every step, GeneralDecoder, DinoDisc, DiffAug, LPIPS) on images in GPU memory. Needs
  ``transformers``; without it the table says so.

Prints img/s, TFLOP/s (FLOPs of one eager step, counted by PyTorch's flop counter), GFLOP per image
and peak memory, as a table last, naming the card.

    python benchmarks/bench_train_decoder.py --reference /path/to/RAE [--batch 64] [--compile]
    python benchmarks/bench_train_decoder.py --smoke     # CPU, tiny sizes: checks that the harness runs

``--loader-workers N`` also measures the image loading of both data paths on N processes over
synthetic ImageNet-sized JPEGs: ``--augment reference``'s decode + short side to 384 + random crop,
against the cached path's decode + ADM center crop.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ---------------------------------------------------------------------------------------------- ours

def build_ours(args, device: torch.device, compile_: bool, precision: str, augment: bool = False):
    from stages.dist import Dist
    from stages.models.lpips import LPIPS
    from stages.train.losses import GanSchedule
    from stages.models.weights import load_discriminator
    from stages.train.decoder import DecoderTraining, Schedule
    from stages.train.config import TrainDecoderConfig

    size = dict(model="vit-xl") if not args.smoke else dict(model="vit-b", width=32, depth=1, heads=2, mlp_dim=64)
    cfg = TrainDecoderConfig(latents="", out="", compile=compile_, precision=precision, batch_size=args.batch, **size,
                             disc_backbone="test_vit" if args.smoke else TrainDecoderConfig.disc_backbone)
    arch = dict(in_dim=args.channels, grid=args.grid, patch_size=16, **{k: v for k, v in _size(cfg).items()})
    schedule = Schedule(total=10**6, warmup=1, steps_per_epoch=10**4, losses=GanSchedule(disc_start=0, gan_start=0))
    torch.manual_seed(0)
    lpips = LPIPS(pretrained=False)
    disc = load_discriminator(pretrained=False, timm_name=cfg.disc_backbone)
    training = DecoderTraining(cfg, arch, schedule, Dist(0, 1, 0, device), lpips, disc, precision)
    g = torch.Generator(device).manual_seed(1)
    z = torch.randn(args.batch, args.channels, args.grid, args.grid, device=device, generator=g)
    images = torch.randint(0, 256, (args.batch, 3, 16 * args.grid, 16 * args.grid), dtype=torch.uint8,
                           device=device, generator=g)
    counter = {"step": 0}
    encode = _frozen_encoder(args, device, compile_, precision) if augment else None

    def step():
        training.step(counter["step"], encode(images) if encode is not None else z, images)
        counter["step"] += 1

    n_params = sum(p.numel() for p in training.decoder.parameters())
    return step, n_params


def _frozen_encoder(args, device: torch.device, compile_: bool, precision: str):
    """``--augment reference``'s encoder on a batch: the store's encoder (random DINOv2-B weights:
    the same compute), bf16 autocast, latents rounded to the store's float16, as the stage runs it."""
    from stages.models.encoders import build_encoder

    name, size = ("dinov2-demo", 16 * args.grid) if args.smoke else ("dinov2-b", 256)
    encoder = build_encoder(name, size, pretrained=False)[0].to(device).eval().requires_grad_(False)
    forward = torch.compile(encoder) if compile_ else encoder

    def encode(images):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return forward(images).to(torch.float16).float()

    return encode


def _load_reference(path) -> int:
    from stages.artifacts.images import load_rgb, reference_crop

    return reference_crop(load_rgb(path), 256, seed=0, epoch=0, index=hash(str(path)) % 100000).nbytes


def _load_cached(path) -> int:
    from stages.artifacts.images import center_crop_arr, load_rgb

    return center_crop_arr(load_rgb(path), 256).nbytes


def bench_loader(workers: int, n: int, work: Path) -> list[tuple[str, float]]:
    """img/s of each data path's per-image CPU work on ``workers`` processes (JPEGs ~500x375, as ImageNet)."""
    import multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_encode import make_folder

    make_folder(work / "jpegs", n)
    files = sorted((work / "jpegs").rglob("*.JPEG"))[:n]
    rows = []
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_load_cached, files[: 4 * workers], chunksize=1)  # warm-up: imports, page cache
        for name, fn in (("--augment reference: decode + resize 384 + random crop", _load_reference),
                         ("--augment none: decode + ADM center crop (the target images)", _load_cached)):
            t0 = time.perf_counter()
            pool.map(fn, files, chunksize=16)
            rows.append((name, len(files) / (time.perf_counter() - t0)))
    return rows


def _size(cfg):
    from stages.train.config import decoder_size

    return decoder_size(cfg)


# ----------------------------------------------------------------------------------------- reference

def _alias_package(alias: str, folder: Path) -> None:
    """Make ``folder`` importable as package ``alias`` without running its ``__init__``."""
    pkg = types.ModuleType(alias)
    pkg.__path__ = [str(folder)]
    sys.modules[alias] = pkg


def build_reference(args, device: torch.device, compile_: bool, precision: str, workdir: Path):
    """The reference's modules with random weights, offline, and a function doing its loop body once."""
    import timm
    import torchvision
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    src = Path(args.reference) / "src"
    try:
        import requests  # noqa: F401
    except ImportError:  # the reference's LPIPS imports it for a download this benchmark never makes
        sys.modules["requests"] = types.ModuleType("requests")
    _alias_package("ref_stage1", src / "stage1")
    _alias_package("ref_disc", src / "disc")
    rae_mod = importlib.import_module("ref_stage1.rae")
    disc_mod = importlib.import_module("ref_disc.discriminator")
    diffaug_mod = importlib.import_module("ref_disc.diffaug")
    lpips_mod = importlib.import_module("ref_disc.lpips")
    gan_mod = importlib.import_module("ref_disc.gan_loss")

    # The encoder: a random DINOv2-B with 4 registers, saved where the reference's from_pretrained looks;
    # the decoder: the reference's ViT-XL config. (--smoke: tiny widths, 4x4 tokens -> 64 px.)
    enc_dir, dec_dir = workdir / "dinov2_reg", workdir / "decoder"
    enc = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    dec = json.loads((Path(args.reference) / "configs/decoder/ViTXL/config.json").read_text())
    # Its patch_size is a string placeholder (the RAE sets it), which recent transformers refuse to load.
    dec["patch_size"] = 16
    if args.smoke:
        enc = dict(hidden_size=args.channels, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        dec.update(decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                   decoder_intermediate_size=64)
    dec_dir.mkdir(exist_ok=True)
    (dec_dir / "config.json").write_text(json.dumps(dec))
    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(patch_size=14, image_size=518, num_register_tokens=4, layerscale_value=1.0, **enc)
    Dinov2WithRegistersModel(cfg).save_pretrained(enc_dir)
    BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(enc_dir)
    rae = rae_mod.RAE(encoder_cls="Dinov2withNorm", encoder_config_path=str(enc_dir), encoder_input_size=14 * args.grid,
                      encoder_params={"dinov2_path": str(enc_dir), "normalize": True}, decoder_config_path=str(dec_dir),
                      decoder_patch_size=16, noise_tau=0.8, reshape_to_2d=True).to(device)
    rae.encoder.eval()
    rae.decoder.train()
    rae.encoder.requires_grad_(False)
    ema = [p.detach().clone() for p in rae.parameters()]
    if compile_:  # what the reference's --compile does
        rae.encode = torch.compile(rae.encode)
        rae.forward = torch.compile(rae.forward)

    # LPIPS with random VGG16 and linear layers (no downloads).
    lpips_mod.models = types.SimpleNamespace(vgg16=lambda pretrained=False, **kw: torchvision.models.vgg16(weights=None))
    lpips_mod.LPIPS._load_pretrained_weights = lambda self, name="vgg_lpips": None
    lpips = lpips_mod.LPIPS().to(device).eval()

    dino_file = workdir / "dino_vits8.pth"
    torch.save(timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).state_dict(), dino_file)
    disc = disc_mod.DinoDiscriminator(device=device, dino_ckpt_path=str(dino_file), ks=9, key_depths=(2, 5, 8, 11),
                                      norm_type="bn", using_spec_norm=True, norm_eps=1e-6, recipe="S_8").to(device)
    aug = diffaug_mod.DiffAug(prob=1.0, cutout=0.0)
    opt = torch.optim.AdamW(rae.decoder.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    opt_d = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.95),
                              weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: 1.0)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    last_layer = rae.decoder.decoder_pred.weight
    g = torch.Generator(device).manual_seed(1)
    images = torch.rand(args.batch, 3, 16 * args.grid, 16 * args.grid, device=device, generator=g)

    def lambda_at_last_layer(rec, gan):
        g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        g_gan = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
        return (g_rec.norm() / (g_gan.norm() + 1e-6)).clamp(0.0, 1e4).detach()

    def step():
        # Decoder step: encoder + noise + decoder, L1 + LPIPS + adaptive GAN, AdamW, EMA.
        real = images * 2 - 1
        opt.zero_grad(set_to_none=True)
        disc.eval()
        with torch.autocast(**autocast):
            recon = rae(images)
            recon_pm1 = recon * 2 - 1
            l1 = (recon - images).abs().mean()
            rec = l1 + 1.0 * lpips(real, recon_pm1)
            logits_fake, _ = disc(aug.aug(recon_pm1), None)
            gan = gan_mod.vanilla_g_loss(logits_fake)
        lam = lambda_at_last_layer(rec, gan)
        (rec + 0.75 * lam * gan).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, rae.parameters()):
                e.mul_(0.9978).add_(p.detach(), alpha=1 - 0.9978)
        # Discriminator step: fresh reconstruction without noise, 8-bit rounding, hinge loss.
        rae.eval()
        disc.train()
        opt_d.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            with torch.no_grad():
                fake = rae(images) * 2 - 1
            fake = torch.round((fake.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
            logits_fake, logits_real = disc(aug.aug(fake), aug.aug(real))
            d_loss = gan_mod.hinge_d_loss(logits_real, logits_fake)
        d_loss.backward()
        opt_d.step()
        sched_d.step()
        disc.eval()
        rae.train()

    return step, sum(p.numel() for p in rae.decoder.parameters())


# ------------------------------------------------------------------------------------------- harness

def count_flops(step) -> float:
    """FLOPs of one step, with PyTorch's per-operator formulas (those of FlopCounterMode; its module
    tracker cannot follow ``autograd.grad`` on a leaf, which both steps use)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Flops(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func._overloadpacket in flop_registry:
                self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
            return out

    with Flops() as counter:
        step()
    return float(counter.total)


def measure(name: str, build, args, device: torch.device, flops: float | None) -> dict:
    """Time ``args.steps`` steps after warm-up. ``flops``: the step's FLOPs if known (a compiled step
    does the eager step's work); None counts them on an eager step first."""
    row = {"step": name}
    try:
        step, n_params = build()
    except ImportError as e:
        return {**row, "note": f"not run: Python module '{e.name or e}' missing (the reference needs transformers)"}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if flops is None:
        flops = count_flops(step) if args.flops else float("nan")  # an eager step (also a warm-up)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    row.update(img_s=args.batch / seconds, tflops=flops / seconds / 1e12, gflop_img=flops / args.batch / 1e9,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
               decoder_params_m=n_params / 1e6)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, help="checkout of the reference RAE code (its src/ is imported)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure both with torch.compile")
    ap.add_argument("--modes", default="", help="comma list of ours-bf16, ours-fp32, ref-bf16, ref-fp32, and *-compile")
    ap.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny decoder and discriminator, 2 images: harness check")
    ap.add_argument("--loader-workers", type=int, default=0, help="also measure the image loading on N processes")
    ap.add_argument("--loader-images", type=int, default=4000)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.steps, args.warmup, args.channels, args.grid = 2, 1, 1, 96, 4
        torch.set_num_threads(1)
    else:
        args.channels, args.grid = 768, 16
    modes = [m for m in args.modes.split(",") if m] or (
        ["ours-fp32", "ref-fp32"] if args.smoke else ["ref-bf16", "ours-bf16"] + (["ref-bf16-compile", "ours-bf16-compile"] if args.compile else []))
    if args.reference is None:
        modes = [m for m in modes if not m.startswith("ref")]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            who, precision, *rest = mode.split("-")
            compile_ = rest == ["compile"]
            if who in ("ours", "oursaug"):
                build = lambda: build_ours(args, device, compile_, precision, who == "oursaug")  # noqa: E731
            else:
                build = lambda: build_reference(args, device, compile_, precision, Path(tmp))  # noqa: E731
            torch._dynamo.reset()
            eager = next((r for r in rows if r["step"] == f"{who}-{precision}" and "img_s" in r), None)
            if eager is None and compile_ and who == "oursaug":
                eager = next((r for r in rows if r["step"] == f"ours-{precision}" and "img_s" in r), None)
            flops = eager["gflop_img"] * 1e9 * args.batch if eager else (None if not compile_ else float("nan"))
            rows.append(measure(mode, build, args, device, flops))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.reference is None and not args.smoke:
        rows.append({"step": "reference", "note": "not run: pass --reference /path/to/RAE-checkout"})

    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test: tiny sizes, not a benchmark)"
    base = next((r for r in rows if r["step"] == "ref-bf16" and "img_s" in r), None)
    print(f"\n## decoder training step, batch {args.batch} — {card}, torch {torch.__version__}")
    what = "tiny decoder on [96, 4, 4] latents" if args.smoke else "ViT-XL decoder (p_d 16) on [768, 16, 16] latents"
    print(f"{what}; L1 + LPIPS + adaptive GAN + discriminator update, random weights; "
          "the reference re-runs its DINOv2-B encoder every step.")
    print("| step | img/s | TFLOP/s | GFLOP/img | peak GiB | vs reference bf16 |\n|---|---|---|---|---|---|")
    for r in rows:
        if "img_s" not in r:
            print(f"| {r['step']} | {r['note']} | | | | |")
            continue
        speedup = f"{r['img_s'] / base['img_s']:.2f}x" if base else "n/a"
        print(f"| {r['step']} | {r['img_s']:,.1f} | {r['tflops']:.0f} | {r['gflop_img']:,.0f} | {r['peak_gib']:.1f} | {speedup} |")
    for aug in (r for r in rows if r["step"].startswith("oursaug") and "img_s" in r):
        cached = next((r for r in rows if r["step"] == aug["step"].replace("oursaug", "ours") and "img_s" in r), None)
        if cached:
            print(f"{aug['step']}: {aug['img_s'] / cached['img_s']:.1%} of the cached-latent step's img/s")
    if args.loader_workers:
        with tempfile.TemporaryDirectory() as tmp:
            loads = bench_loader(args.loader_workers, args.loader_images, Path(tmp))
        print(f"\n## image loading, {args.loader_workers} processes, {args.loader_images} JPEGs of ~500x375 — "
              f"{os.cpu_count()} CPU cores")
        print("| data path | img/s |\n|---|---|")
        for name, rate in loads:
            print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
