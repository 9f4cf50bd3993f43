"""`rae train-diffusion` itself (the whole loop: loader, step, logging, tracking) on DiT^DH-XL, compiled,
on a synthetic complete latent store of ImageNet's shape: the img/s its records report, for this
checkout and, with ``--baseline DIR``, another checkout of rae in the same call. Prints a table last.

    python benchmarks/bench_train_loop.py --store /tmp/s.zarr [--baseline DIR] [--steps 80] [--batch 128]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_complete_store(path: Path, n: int, shape=(768, 16, 16)) -> None:
    """A complete latent store of ``n`` unit-Gaussian float16 entries, 1000 classes, as `rae encode` leaves it."""
    from stages.artifacts.manifest import new_manifest, write_manifest
    from stages.artifacts.store import LatentStore
    from stages.models.encoders import encoder_identity

    if (path / "manifest.json").is_file():
        return
    names = [f"n{i:08d}" for i in range(1000)]
    store = LatentStore.create(path, n, shape, "float16", np.arange(n) % 1000, np.arange(n), np.zeros(n, bool),
                               {"num_classes": 1000, "class_names": names, "image_size": 256}, block_size=1024)
    lat = np.random.default_rng(0).standard_normal((1024, *shape)).astype(np.float16)
    for b in range(store.num_blocks):
        r = store.block_range(b)
        store.write_block(b, lat[: len(r)], np.ones(len(r), bool))
    enc = encoder_identity("dinov2-b", 256, "0" * 64, pretrained=True)
    write_manifest(path, new_manifest("latent-store", {}, identity="synthetic", encoder=enc, latent_shape=list(shape),
                                      num_entries=n, class_names=names))
    store.finish(skipped_files=[])


def run(checkout: Path, store: Path, out: Path, steps: int, batch: int, extra: list[str]) -> list[float]:
    env = {**os.environ, "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{checkout}", "RAE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "rae_cli.main", "train-diffusion", "--latents", str(store), "--out", str(out),
           "--model", "ditdh-xl", "--batch-size", str(batch), "--steps", str(steps), "--log-every", "20",
           "--checkpoint-every", "100000", "--sample-every", "0", "--num-samples", "0", "--compile", *extra]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{checkout}: {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["img_per_s"] for r in records if "img_per_s" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--baseline", type=Path)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--no-tensorboard", action="store_true", help="pass --no-tensorboard to this checkout's run")
    ap.add_argument("--phema", action="store_true", help="also run this checkout with --phema 0.05,0.10 (post-hoc EMA)")
    args = ap.parse_args()
    import torch

    make_complete_store(args.store, args.steps * args.batch)
    rows = []
    phema = ["--phema", "0.05,0.10", "--snapshot-every", "1000000"]
    for name, checkout, more in (("baseline", args.baseline, []), ("this checkout", REPO, []),
                                 ("this checkout, --phema 0.05,0.10", REPO if args.phema else None, phema)):
        if checkout is None:
            continue
        # (TensorBoard files need the tensorboard package, which the GPU machines lack: off for this checkout.)
        extra = (["--no-tensorboard"] if checkout == REPO and args.no_tensorboard else []) + more
        rates = run(checkout.resolve(), args.store, args.store.parent / f"run-{len(rows)}", args.steps,
                    args.batch, extra)
        rows.append((name, rates))
        print(name, [round(r, 1) for r in rates], flush=True)
    print(f"\n## rae train-diffusion, DiT^DH-XL, batch {args.batch}, compiled — {torch.cuda.get_device_name()}")
    print("| code | img/s per record (20 steps each; the first includes compilation) | steady (last records) |")
    print("|---|---|---|")
    for name, rates in rows:
        print(f"| {name} | {', '.join(f'{r:.0f}' for r in rates)} | {np.mean(rates[-2:]):.0f} |")


if __name__ == "__main__":
    main()
