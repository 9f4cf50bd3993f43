"""Benchmark `rae encode` end to end on one GPU, and where its time goes.

Generates a folder of JPEGs at ImageNet-like sizes (about 500x375, quality 90), then measures:
  1. image loading alone (decode + ADM crop in `rae encode`'s loading workers, into shared
     page-locked buffers, then to the GPU), per --resize mode; for `gpu` also loading plus the crop's
     bicubic step on the GPU (everything but the encoder),
  2. the encoder forward alone (ours: timm DINOv2-B/14 + 4 registers at 224, bf16), and the
     reference code's encoder (Hugging Face Dinov2WithRegistersModel) side by side when
     `transformers` is importable,
  3. latent store writes alone, per --codecs value,
  4. the whole `rae encode` (dinov2-b, 256, random weights: the same compute as pretrained ones),
     per --resize mode and --codecs value (with --probe also without shard writes).
Prints a table last, naming the card.

    python benchmarks/bench_encode.py --n 20000 --workdir /tmp/bench_encode
    python benchmarks/bench_encode.py --only loader --resize gpu     # one part, one mode
    python benchmarks/bench_encode.py --only worker --n 1000         # CPU only: a worker's ms per image

`--only worker` needs no GPU: it times what one loading worker does per image in each mode
(decode, then Pillow's crop for `cpu` or box-halving + coefficients for `gpu`, then packing the
chunk into its buffer), in-process step by step and through a real one-worker loader.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _make_jpeg(args):
    path, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(450, 551)), int(rng.integers(330, 420))
    # Smooth structure plus texture: decodes like a photograph, not like white noise.
    low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(root: Path, n: int, classes: int = 100) -> None:
    if root.exists() and sum(1 for _ in root.rglob("*.JPEG")) >= n:
        return
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for i in range(n):
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d / f"img_{i:07d}.JPEG", i))
    with mp.Pool(os.cpu_count()) as pool:
        pool.map(_make_jpeg, jobs, chunksize=64)


def _loader(root: Path, workers: int, resize: str, limit: int | None = None, device: str = "cuda"):
    """`rae encode`'s loader over a folder: chunks of `chunk_images(256)` images, shared buffers."""
    from stages.encode import _LoadChunk, chunk_bytes, chunk_images
    from stages.artifacts.images import list_images
    from stages.artifacts.loader import SlotLoader

    listing = list_images(root, limit)
    n, c = len(listing.files), chunk_images(256)
    tasks = [list(range(i, min(i + c, n))) for i in range(0, n, c)]
    fill = _LoadChunk(listing.root, listing.files, 256, 16, resize_on_device=resize == "gpu")
    return n, SlotLoader(fill, tasks, workers, chunk_bytes(256), device)


def bench_loader(root: Path, workers: int, resize: str, crop_on_gpu: bool = False) -> float:
    """Images per second out of the loader (into page-locked shared buffers); with ``crop_on_gpu``
    the chunks also go to the GPU through `rae encode`'s `_crops_on_device` (synchronised at the end)."""
    from stages.encode import _crops_on_device

    n, loader = _loader(root, workers, resize)
    t0 = time.time()
    for data, (layout, _, _) in loader.start():
        if crop_on_gpu:
            _crops_on_device(data, layout)
    torch.cuda.synchronize()
    return n / (time.time() - t0)


def bench_breakdown(root: Path, workers: int, batch: int, work: Path) -> list[tuple]:
    """Loading + GPU crop + encoder (no host copy, statistics or writes; batches of ``batch`` images
    from whole chunks), and the disk's sustained write rate (dd, O_DIRECT) next to what the target needs."""
    import subprocess

    from stages.encode import _crops_on_device
    from stages.models.encoders import build_encoder

    enc, _ = build_encoder("dinov2-b", 256, pretrained=False)
    enc = enc.cuda()
    n, loader = _loader(root, workers, "gpu")
    parts, t0 = [], time.time()
    for data, (layout, _, _) in loader.start():
        parts.append(_crops_on_device(data, layout))
        if sum(len(p) for p in parts) >= batch:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                enc(torch.cat(parts)).half()
            parts = []
    torch.cuda.synchronize()
    rows = [("loading + GPU crop + encoder (no statistics, no host copy, no writes)", f"{n / (time.time() - t0):,.0f}",
             f"{workers} workers, batch {batch}")]
    print(rows[-1], flush=True)
    for writers in (1, 4):
        cmd = " & ".join(f"dd if=/dev/zero of={work}/dd{i}.bin bs=16M count={256 // writers} oflag=direct 2>&1 | tail -1"
                         for i in range(writers)) + "; wait"
        t0 = time.time()
        subprocess.run(cmd, shell=True, capture_output=True, text=True)
        rate = 4 * 1024 ** 3 / (time.time() - t0) / 1e9
        for i in range(writers):
            (work / f"dd{i}.bin").unlink(missing_ok=True)
        rows.append((f"disk: sustained write, {writers} dd writer(s), 4 GiB, O_DIRECT", f"{rate:.2f} GB/s",
                     "3,000 entries/s x 334 KiB = 1.03 GB/s needed"))
    return rows


def bench_worker(root: Path, n: int) -> list[tuple]:
    """A loading worker's cost per image for each --resize mode, on the CPU: the steps in-process
    (decode; Pillow's crop or box-halving + coefficients; packing into the buffer), then through a
    real one-worker loader."""
    from stages.encode import chunk_bytes, chunk_images
    from stages.artifacts.images import (banded_crop, center_crop_arr, collate_banded, crop_batch_extra_bytes,
                                         fit_banded, list_images, load_rgb, pack_crop_batch, stack_crops)

    files = list_images(root, n).files
    n = len(files)

    def per_image(fn, items):
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        return out, (time.perf_counter() - t0) / len(items) * 1e3

    images, decode_ms = per_image(lambda f: load_rgb(root / f), files)
    c, buf = chunk_images(256), np.empty(chunk_bytes(256), np.uint8)
    rows = []
    for resize, crop in (("cpu", center_crop_arr), ("gpu", banded_crop)):
        crops, crop_ms = per_image(lambda im: crop(im, 256), images)
        chunks = [(crops[i: i + c], images[i: i + c]) for i in range(0, n, c)]
        if resize == "gpu":
            room = buf.nbytes - crop_batch_extra_bytes(c, 256)
            pack = lambda ch: pack_crop_batch(collate_banded(fit_banded(ch[0], ch[1], 256, room), buf), buf)  # noqa: E731
        else:
            pack = lambda ch: stack_crops(ch[0], buf)  # noqa: E731
        _, pack_ms = per_image(pack, chunks)
        pack_ms *= len(chunks) / n
        _, loader = _loader(root, 1, resize, limit=n, device="cpu")
        t0 = time.perf_counter()
        for _ in loader.start():
            pass
        worker_ms = (time.perf_counter() - t0) / n * 1e3
        rows.append((resize, decode_ms, crop_ms, pack_ms, decode_ms + crop_ms + pack_ms, worker_ms))
    return rows


def bench_forward(model, batch: int, size: int, iters: int = 20) -> float:
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(iters):
            model(x)
        torch.cuda.synchronize()
    return batch * iters / (time.time() - t0)


def reference_encoder():
    """The reference code's encoder: HF Dinov2WithRegistersModel, final LayerNorm affine removed,
    images interpolated to 224 and normalised, CLS + registers dropped (random weights)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, patch_size=14, image_size=518, num_register_tokens=4,
                                    layerscale_value=1.0)
    m = Dinov2WithRegistersModel(cfg).cuda().eval()
    m.layernorm.elementwise_affine = False
    m.layernorm.weight = None
    m.layernorm.bias = None
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1)

    def fwd(x):
        x = torch.nn.functional.interpolate(x.float() / 255, size=(224, 224), mode="bicubic", align_corners=False)
        return m((x - mean) / std).last_hidden_state[:, 5:]

    return fwd


def bench_store_write(tmp: Path, codec: str, entries: int = 4096) -> tuple[float, float]:
    """Entries/s of `LatentStore.write_block` (compression + shard files, statistics precomputed), two
    blocks at a time as `rae encode` writes them, and the bytes per entry on disk. Data: float16
    N(0, 0.7^2), which compresses like DINOv2 latents after its final LayerNorm (measured: 1.06x both)."""
    import concurrent.futures as cf

    from stages.artifacts.store import LatentStore, Moments

    shutil.rmtree(tmp, ignore_errors=True)
    n = entries
    s = LatentStore.create(tmp, n, (768, 16, 16), "float16", np.zeros(n), np.arange(n), np.zeros(n, bool), {},
                           codec=codec)
    lat = (np.random.default_rng(0).standard_normal((1024, 768, 16, 16)) * 0.7).astype(np.float16)
    ok = np.ones(1024, bool)
    moments = Moments.of_shards(torch.from_numpy(lat), torch.from_numpy(ok), 64)
    t0 = time.time()
    with cf.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda b: s.write_block(b, lat, ok, None, moments), range(s.num_blocks)))
    rate = n / (time.time() - t0)
    size = sum(f.stat().st_size for f in (tmp / "latents").rglob("*") if f.is_file())
    return rate, size / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workdir", default="/tmp/bench_encode")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", choices=["all", "worker", "loader", "forward", "store", "encode", "breakdown"],
                    default="all",
                    help="one part (worker: CPU only, per-image cost of a loading worker)")
    ap.add_argument("--profile", action="store_true",
                    help="with --only encode: profile the main thread of one end-to-end run (cProfile, top functions)")
    ap.add_argument("--resize", choices=["both", "cpu", "gpu"], default="both",
                    help="the --resize mode(s) of the loading and end-to-end rows")
    ap.add_argument("--codecs", default="blosc-zstd,none", help="the --codec values of the end-to-end rows")
    ap.add_argument("--probe", action="store_true", help="also each end-to-end run without shard writes")
    args = ap.parse_args()
    os.environ["RAE_NO_PROGRESS"] = "1"
    work = Path(args.workdir)
    data = work / "images"
    t0 = time.time()
    make_folder(data, args.n)
    print(f"generated {args.n} JPEGs in {time.time() - t0:.0f}s", flush=True)
    modes = ["cpu", "gpu"] if args.resize == "both" else [args.resize]

    def part(name: str) -> bool:
        return args.only in ("all", name)

    if args.only == "worker":
        import PIL

        n = min(args.n, 1000)
        rows = bench_worker(data, n)
        print(f"\n## rae encode: a loading worker's cost per image — {n} JPEGs, "
              f"Pillow {PIL.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores")
        print("| --resize | decode ms | crop step ms | packing ms | sum ms | 1 loading worker, ms/img |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} |")
        return

    from stages.models.encoders import build_encoder
    from stages.encode import EncodeConfig, run

    rows = []
    card = torch.cuda.get_device_name()
    if part("loader"):
        for mode in modes:
            what = "PIL decode + exact ADM crop" if mode == "cpu" else "PIL decode + box-halving + coefficients"
            rows.append((f"image loading alone, --resize {mode} ({what})",
                         f"{bench_loader(data, args.workers, mode):,.0f}", f"{args.workers} workers"))
            if mode == "gpu":
                rows.append(("image loading + the crop's bicubic step on the GPU (no encoder)",
                             f"{bench_loader(data, args.workers, mode, crop_on_gpu=True):,.0f}",
                             f"{args.workers} workers"))
    if args.only == "breakdown":
        rows += bench_breakdown(data, args.workers, args.batch, work)
    if part("forward"):
        enc, _ = build_encoder("dinov2-b", 256, pretrained=False)
        enc = enc.cuda()
        rows.append(("our encoder forward alone (timm DINOv2-B, bf16)", f"{bench_forward(enc, args.batch, 256):,.0f}", f"batch {args.batch}"))
        try:
            rows.append(("reference encoder forward (HF Dinov2WithRegisters, bf16)", f"{bench_forward(reference_encoder(), args.batch, 256):,.0f}", f"batch {args.batch}"))
        except ImportError as e:
            rows.append(("reference encoder forward", "n/a", f"transformers missing: {e}"))
    if part("store"):
        for codec in args.codecs.split(","):
            rate, size = bench_store_write(work / "w.zarr", codec)
            rows.append((f"store writes alone, --codec {codec} (statistics precomputed)", f"{rate:,.0f}",
                         f"[768,16,16] fp16, {size / 1024:.0f} KiB/entry"))
    if part("encode"):
        from stages.artifacts import store as store_mod

        def encode(out: Path, mode: str, **kw) -> dict:
            shutil.rmtree(out, ignore_errors=True)
            return run(EncodeConfig(data=str(data), out=str(out), encoder="dinov2-b", random_init=True, image_size=256,
                                    batch_size=args.batch, num_workers=args.workers, device="cuda", resize=mode, **kw))

        if args.profile:  # where the main thread's time goes (waiting for batches, on the GPU, on writes)
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            res = encode(work / "store.zarr", modes[0], compile=args.compile)
            prof.disable()
            print(f"profiled run: {res['images_per_second']:,.0f} img/s, --resize {modes[0]}")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
            return
        for mode in modes:
            for codec in args.codecs.split(","):
                res = encode(work / "store.zarr", mode, compile=args.compile, codec=codec)
                rows.append((f"rae encode end to end (dinov2-b, 256), --resize {mode} --codec {codec}",
                             f"{res['images_per_second']:,.0f}",
                             f"{res['entries']} images, {res['bytes_per_entry'] / 1024:.0f} KiB/entry "
                             f"(raw {768 * 256 * 2 / 1024:.0f} KiB)"))
                print(rows[-1], flush=True)
            if args.probe:  # where the end-to-end time goes: the same run with the shard writes switched off
                real = store_mod.ShardIO.write_shard
                store_mod.ShardIO.write_shard = lambda self, shard, data: None
                try:
                    res2 = encode(work / "store_nowrite.zarr", mode)
                finally:
                    store_mod.ShardIO.write_shard = real
                rows.append((f"probe: end to end without shard writes (nor compression), --resize {mode}",
                             f"{res2['images_per_second']:,.0f}", "statistics still computed"))
    print(f"\n## rae encode benchmark — {card}, torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print("| measurement | images/s | notes |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
