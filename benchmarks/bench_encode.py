"""Benchmark `rae encode` end to end on one GPU, and where its time goes.

Generates a folder of JPEGs at ImageNet-like sizes (about 500x375, quality 90), then measures:
  1. image loading alone (decode + ADM crop in DataLoader workers), per --resize mode; for `gpu`
     also loading plus the crop's bicubic step on the GPU (everything but the encoder),
  2. the encoder forward alone (ours: timm DINOv2-B/14 + 4 registers at 224, bf16), and the
     reference code's encoder (Hugging Face Dinov2WithRegistersModel) side by side when
     `transformers` is importable,
  3. latent store writes alone,
  4. the whole `rae encode` (dinov2-b, 256, random weights: the same compute as pretrained ones),
     per --resize mode, and the same without shard writes.
Prints a table last, naming the card.

    python benchmarks/bench_encode.py --n 20000 --workdir /tmp/bench_encode
    python benchmarks/bench_encode.py --only loader --resize gpu     # one part, one mode
    python benchmarks/bench_encode.py --only worker --n 1000         # CPU only: a worker's ms per image

`--only worker` needs no GPU: it times what one DataLoader worker does per image in each mode
(decode, then Pillow's crop for `cpu` or box-halving + coefficients for `gpu`, then the batch
collation), in-process step by step and through a real one-worker DataLoader.
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


def _loader(root: Path, workers: int, batch: int, resize: str, limit: int | None = None, pin: bool = True):
    from stages.encode import _collate, _Images
    from stages.images import list_images

    listing = list_images(root, limit)
    ds = _Images(listing.root, listing.files, 256, 16, resize_on_device=resize == "gpu")
    batches = [list(range(i, min(i + batch, len(ds)))) for i in range(0, len(ds), batch)]
    return ds, torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                                           pin_memory=pin, prefetch_factor=4 if workers else None)


def bench_loader(root: Path, workers: int, batch: int, resize: str, crop_on_gpu: bool = False) -> float:
    """Images per second out of the DataLoader; with ``crop_on_gpu`` the batches also go through the
    main process's part of the crop (`rae encode`'s `_crops_on_device`), synchronised at the end."""
    from stages.encode import _crops_on_device

    ds, loader = _loader(root, workers, batch, resize)
    t0 = time.time()
    for images, _, _ in loader:
        if crop_on_gpu:
            _crops_on_device(images, "cuda")
    if crop_on_gpu:
        torch.cuda.synchronize()
    return len(ds) / (time.time() - t0)


def bench_breakdown(root: Path, workers: int, batch: int, work: Path) -> list[tuple]:
    """Where the end-to-end time goes, stage by stage added (--resize gpu, 1024-entry blocks as `rae
    encode`): loading + crop + encoder; + latents to host memory; + float64 statistics; and the
    disk's sustained write rate (dd, 4 GiB, O_DIRECT) next to the bytes per second the target needs."""
    import subprocess

    from stages.encode import _crops_on_device
    from stages.encoders import build_encoder
    from stages.store import Moments

    enc, _ = build_encoder("dinov2-b", 256, pretrained=False)
    enc = enc.cuda()
    rows = []
    for name, to_host, stats in (("loading + GPU crop + encoder", False, False),
                                 ("  + latents to host memory (per 1024-entry block)", True, False),
                                 ("  + float64 statistics per shard (as rae encode)", True, True)):
        ds, loader = _loader(root, workers, batch, "gpu")
        block, t0 = [], time.time()
        for images, ok, _ in loader:
            x = _crops_on_device(images, "cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                block.append(enc(x).half())
            if sum(len(b) for b in block) >= 1024:
                lat = torch.cat(block)
                block = []
                if stats:
                    Moments.of_shards(lat, torch.ones(len(lat), dtype=torch.bool, device="cuda"), 64)
                if to_host:
                    lat.cpu()
        torch.cuda.synchronize()
        rows.append((name, f"{len(ds) / (time.time() - t0):,.0f}", f"{workers} workers, batch {batch}"))
        print(rows[-1], flush=True)
    target = work / "dd.bin"
    out = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", "count=256", "oflag=direct"],
                         capture_output=True, text=True).stderr.strip().splitlines()[-1]
    target.unlink(missing_ok=True)
    rows.append(("disk: sustained write (dd 4 GiB, O_DIRECT)", out.split(",")[-1].strip(),
                 "3,000 entries/s x 362 KiB = 1.1 GB/s needed"))
    return rows


def bench_worker(root: Path, n: int, batch: int) -> list[tuple]:
    """A DataLoader worker's cost per image for each --resize mode, on the CPU: the steps in-process
    (decode; Pillow's crop or box-halving + coefficients; collation), then one real worker process."""
    from stages.encode import _collate
    from stages.images import banded_crop, center_crop_arr, list_images, load_rgb

    files = list_images(root, n).files
    n = len(files)

    def per_image(fn, items):
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        return out, (time.perf_counter() - t0) / len(items) * 1e3

    images, decode_ms = per_image(lambda f: load_rgb(root / f), files)
    rows = []
    for resize, crop in (("cpu", center_crop_arr), ("gpu", banded_crop)):
        crops, crop_ms = per_image(lambda im: crop(im, 256), images)
        items = [(c, True, "") for c in crops]
        _, collate_ms = per_image(_collate, [items[i: i + batch] for i in range(0, n, batch)])
        collate_ms *= len(range(0, n, batch)) / n
        _, loader = _loader(root, 1, batch, resize, limit=n, pin=False)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        worker_ms = (time.perf_counter() - t0) / n * 1e3
        rows.append((resize, decode_ms, crop_ms, collate_ms, decode_ms + crop_ms + collate_ms, worker_ms))
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


def bench_store_write(tmp: Path, entries: int = 4096) -> float:
    import concurrent.futures as cf

    from stages.store import LatentStore

    shutil.rmtree(tmp, ignore_errors=True)
    n = entries
    s = LatentStore.create(tmp, n, (768, 16, 16), "float16", np.zeros(n), np.arange(n), np.zeros(n, bool), {})
    lat = (np.random.default_rng(0).standard_normal((1024, 768, 16, 16)) * 0.7).astype(np.float16)
    ok = np.ones(1024, bool)
    from stages.store import Moments

    moments = Moments.of_shards(torch.from_numpy(lat).cuda(), torch.from_numpy(ok).cuda(), 64)
    t0 = time.time()
    with cf.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda b: s.write_block(b, lat, ok, None, moments), range(s.num_blocks)))
    return n / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workdir", default="/tmp/bench_encode")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", choices=["all", "worker", "loader", "forward", "store", "encode", "breakdown"],
                    default="all",
                    help="one part (worker: CPU only, per-image cost of a DataLoader worker)")
    ap.add_argument("--profile", action="store_true",
                    help="with --only encode: profile the main thread of one end-to-end run (cProfile, top functions)")
    ap.add_argument("--resize", choices=["both", "cpu", "gpu"], default="both",
                    help="the --resize mode(s) of the loading and end-to-end rows")
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
        rows = bench_worker(data, n, args.batch)
        print(f"\n## rae encode: a DataLoader worker's cost per image — {n} JPEGs, batch {args.batch}, "
              f"Pillow {PIL.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores")
        print("| --resize | decode ms | crop step ms | collate ms | sum ms | 1 DataLoader worker, ms/img |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} |")
        return

    from stages.encoders import build_encoder
    from stages.encode import EncodeConfig, run

    rows = []
    card = torch.cuda.get_device_name()
    if part("loader"):
        for mode in modes:
            what = "PIL decode + exact ADM crop" if mode == "cpu" else "PIL decode + box-halving + coefficients"
            rows.append((f"image loading alone, --resize {mode} ({what})",
                         f"{bench_loader(data, args.workers, args.batch, mode):,.0f}", f"{args.workers} workers"))
            if mode == "gpu":
                rows.append(("image loading + the crop's bicubic step on the GPU (no encoder)",
                             f"{bench_loader(data, args.workers, args.batch, mode, crop_on_gpu=True):,.0f}",
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
        rows.append(("store writes alone (blosc-zstd, statistics precomputed)", f"{bench_store_write(work / 'w.zarr'):,.0f}", "[768,16,16] fp16"))
    if part("encode"):
        from stages import store as store_mod

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
            res = encode(work / "store.zarr", mode, compile=args.compile)
            rows.append((f"rae encode end to end (dinov2-b, 256), --resize {mode}", f"{res['images_per_second']:,.0f}",
                         f"{res['entries']} images, {res['bytes_per_entry'] / 1024:.0f} KiB/entry (raw {768 * 256 * 2 / 1024:.0f} KiB)"))
            # Where the end-to-end time goes: the same run with the store's data writes switched off.
            real = store_mod.ShardIO.write_shard
            store_mod.ShardIO.write_shard = lambda self, shard, data: None
            try:
                res2 = encode(work / "store_nowrite.zarr", mode)
            finally:
                store_mod.ShardIO.write_shard = real
            rows.append((f"probe: end to end without shard writes, --resize {mode}", f"{res2['images_per_second']:,.0f}",
                         "statistics still computed"))
    print(f"\n## rae encode benchmark — {card}, torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print("| measurement | images/s | notes |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
