"""Where `rae encode`'s main thread spends its time, and a few variants of one run (dev script, GPU).

    python3 benchmarks/probe_encode.py [--n 40000] [--workdir /tmp/bench_encode]

Runs `stages.encode.run` on the JPEG folder of bench_encode.py (generated if missing) several times:
the default, without the CUDA graph, with `--codec none`, with `--flip`, and without shard writes.
For each it prints images/s, the mean GPU utilisation (nvidia-smi) and the main thread's seconds
waiting for the loader, in `_crops_on_device` and in the encoder call.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stages.encode as encode  # noqa: E402
from stages.artifacts import store  # noqa: E402
from stages.artifacts.loader import SlotLoader  # noqa: E402

SECONDS: dict[str, float] = collections.defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[name] += time.perf_counter() - t0
    return wrapper


class TimedModule(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return timed("encoder call", self.module)(x)


def main() -> None:
    from bench_encode import make_folder

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40000)
    ap.add_argument("--workdir", default="/tmp/bench_encode")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = ap.parse_args()
    os.environ["RAE_NO_PROGRESS"] = "1"
    data = Path(args.workdir) / "images"
    make_folder(data, args.n)
    SlotLoader.__next__ = timed("waiting for the loader", SlotLoader.__next__)
    encode._crops_on_device = timed("_crops_on_device", encode._crops_on_device)
    build = encode.build_encoder
    encode.build_encoder = lambda *a, **k: (lambda m, digest: (TimedModule(m), digest))(*build(*a, **k))

    def run(label: str, **kw) -> None:
        SECONDS.clear()
        out = Path(args.workdir) / "probe.zarr"
        shutil.rmtree(out, ignore_errors=True)
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                "-lms", "250"], stdout=subprocess.PIPE, text=True)
        cfg = dict(data=str(data), out=str(out), encoder="dinov2-b", random_init=True, num_workers=args.workers,
                   device="cuda", limit=args.n)
        res = encode.run(encode.EncodeConfig(**{**cfg, **kw}))
        smi.terminate()
        util = [int(x) for x in smi.communicate()[0].split() if x.strip().isdigit()][4:-4]
        print(f"| {label} | {res['images_per_second']:,.0f} | {sum(util) / max(1, len(util)):.0f}% | "
              + " | ".join(f"{SECONDS[k]:.1f}" for k in ("waiting for the loader", "_crops_on_device", "encoder call"))
              + " |", flush=True)

    print(f"\n## rae encode probe — {torch.cuda.get_device_name()}, {args.n} JPEGs, {args.workers} workers")
    print("| run | entries/s | GPU util | main: waiting for loader, s | main: crops, s | main: encoder call, s |")
    print("|---|---|---|---|---|---|")
    run("warm-up (8,000 images)", limit=min(8000, args.n))
    run("default")
    run("--no-cuda-graph", cuda_graph=False)
    run("--codec none", codec="none")
    run(f"--flip ({args.n // 2:,} images)", limit=args.n // 2, flip=True)
    real = store.ShardIO.write_shard
    store.ShardIO.write_shard = lambda self, shard, data: None
    try:
        run("probe: no shard writes (nor compression)")
    finally:
        store.ShardIO.write_shard = real


if __name__ == "__main__":
    main()
