"""The demonstration chain on a GPU machine, and 1-GPU vs 2-GPU equality (issue: make all).

    python benchmarks/gpu_demo_check.py --out /tmp/demo_gpu [--gpus 2]

1. Runs the `make all` chain (demo-data, encode, train-decoder, train-diffusion, sample, decode,
   demo-report) with CUDA, each stage from the previous one's artifacts, and times every stage.
2. With 2 GPUs: trains the demo diffusion model for a few hundred steps in fp32 once on one GPU and
   once under ``torchrun --nproc_per_node 2`` (same global batch), samples each (one GPU for the
   first, two for the second) with the same seeds, and reports how far weights and samples are apart;
   also samples the 1-GPU model under 2 processes (same model, same seeds: the sharding alone).

Prints a table last, naming the card. Uses ``python -m rae_cli.main`` (no virtual environment needed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rae(args: list[str], nproc: int = 1, env: dict | None = None) -> float:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "rae_cli.main"] if nproc > 1 else [sys.executable, "-m", "rae_cli.main"]) + args
    start = time.perf_counter()
    print("$ rae " + " ".join(args) + (f"   [{nproc} processes]" if nproc > 1 else ""), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "NCCL_NVLS_ENABLE": "0", **(env or {})})
    return time.perf_counter() - start


def demo_chain(out: Path, upto: str | None = None) -> list[tuple[str, float]]:
    o = str(out)
    steps = [
        ("demo-data", ["demo-data", f"{o}/images"]),
        ("encode (--flip)", ["encode", f"{o}/images", "--out", f"{o}/latents.zarr", "--preset", "demo", "--flip"]),
        ("encode (originals)", ["encode", f"{o}/images", "--out", f"{o}/originals.zarr", "--preset", "demo"]),
        ("train-decoder", ["train-decoder", "--latents", f"{o}/latents.zarr", "--out", f"{o}/decoder", "--preset", "demo"]),
        ("train-diffusion", ["train-diffusion", "--latents", f"{o}/latents.zarr", "--out", f"{o}/diffusion",
                             "--preset", "demo"]),
        ("sample", ["sample", "--model", f"{o}/diffusion", "--out", f"{o}/samples.zarr", "--preset", "demo"]),
        ("sample (noise baseline)", ["sample", "--model", f"{o}/diffusion", "--out", f"{o}/noise.zarr", "--preset",
                                     "demo", "--steps", "0", "--per-class", "40"]),
        ("decode samples", ["decode", f"{o}/samples.zarr", "--decoder", f"{o}/decoder", "--out", f"{o}/sample_images"]),
        ("decode noise", ["decode", f"{o}/noise.zarr", "--decoder", f"{o}/decoder", "--out", f"{o}/noise_images"]),
        ("decode originals", ["decode", f"{o}/originals.zarr", "--decoder", f"{o}/decoder", "--out",
                              f"{o}/reconstructions"]),
        ("demo-report (eval)", ["demo-report", o]),
    ]
    if upto:  # only the stages up to (and including) this one
        steps = steps[: [name for name, _ in steps].index(upto) + 1]
    return [(name, rae(args)) for name, args in steps]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from stages.artifacts.runs import load_diffusion_run

    model = load_diffusion_run(run, ema=True, device="cpu").model
    return {k: v.float() for k, v in model.state_dict().items()}


def _latents(store: Path) -> np.ndarray:
    from stages.artifacts.store import LatentStore

    s = LatentStore(store)
    return s.read(np.arange(s.n)).astype(np.float32)


def multi_gpu(out: Path, store: Path, steps: int) -> list[tuple[str, str]]:
    common = ["--latents", str(store), "--preset", "demo", "--steps", str(steps), "--precision", "fp32",
              "--checkpoint-every", str(steps), "--sample-every", "0", "--num-workers", "2"]
    one = {"CUDA_VISIBLE_DEVICES": "0"}
    rae(["train-diffusion", "--out", str(out / "diff_1gpu"), *common], env=one)
    rae(["train-diffusion", "--out", str(out / "diff_2gpu"), *common], nproc=2)
    sampling = ["--preset", "demo", "--per-class", "13", "--precision", "fp32"]
    rae(["sample", "--model", str(out / "diff_1gpu"), "--out", str(out / "s_1gpu.zarr"), *sampling], env=one)
    rae(["sample", "--model", str(out / "diff_2gpu"), "--out", str(out / "s_2gpu.zarr"), *sampling], nproc=2)
    rae(["sample", "--model", str(out / "diff_1gpu"), "--out", str(out / "s_1gpu_sharded.zarr"), *sampling], nproc=2)

    w1, w2 = _weights(out / "diff_1gpu"), _weights(out / "diff_2gpu")
    diff = torch.cat([(w1[k] - w2[k]).flatten() for k in w1])
    ref = torch.cat([w1[k].flatten() for k in w1])
    w_abs, w_rel = diff.abs().max().item(), (diff.norm() / ref.norm()).item()
    l1 = [json.loads(x)["loss"] for x in (out / "diff_1gpu" / "metrics.jsonl").read_text().splitlines()
          if '"loss"' in x]
    l2 = [json.loads(x)["loss"] for x in (out / "diff_2gpu" / "metrics.jsonl").read_text().splitlines()
          if '"loss"' in x]
    loss_rel = max(abs(a - b) / abs(a) for a, b in zip(l1, l2))
    s1, s2, s3 = (_latents(out / n) for n in ("s_1gpu.zarr", "s_2gpu.zarr", "s_1gpu_sharded.zarr"))
    scale = np.abs(s1).max()
    return [
        ("EMA weights after training, 1 GPU vs 2 GPUs: max |diff|", f"{w_abs:.2e}"),
        ("EMA weights after training, 1 GPU vs 2 GPUs: ||diff|| / ||w||", f"{w_rel:.2e}"),
        (f"logged losses ({len(l1)} points), max rel diff", f"{loss_rel:.2e}"),
        (f"samples ({len(s1)}), models trained on 1 vs 2 GPUs, sampled on 1 vs 2: max |diff| / max |x|",
         f"{np.abs(s1 - s2).max() / scale:.2e}"),
        ("samples, the same model sampled on 1 vs 2 GPUs: max |diff| / max |x|",
         f"{np.abs(s1 - s3).max() / scale:.2e}"),
        ("  ... identical bit for bit", str(bool(np.array_equal(s1, s3)))),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/demo_gpu"))
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--steps", type=int, default=300, help="training steps of the 1-vs-2-GPU comparison")
    ap.add_argument("--skip-chain", action="store_true")
    ap.add_argument("--chain-upto", help="run the chain only up to this stage, e.g. 'encode (--flip)'")
    args = ap.parse_args()
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    args.out.mkdir(parents=True, exist_ok=True)
    times = [] if args.skip_chain else demo_chain(args.out, args.chain_upto)
    rows = multi_gpu(args.out, args.out / "latents.zarr", args.steps) if args.gpus >= 2 else []

    print(f"\n## Demo chain with CUDA — {card} x {args.gpus}, torch {torch.__version__}")
    if times:
        print("| stage | seconds |\n|---|---|")
        for name, sec in times:
            print(f"| {name} | {sec:.1f} |")
        print(f"| **whole chain** | **{sum(s for _, s in times):.1f}** |")
    if rows:
        print(f"\n| 1 GPU vs 2 GPUs (demo preset, {args.steps} steps, fp32) | value |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
    print(f"card: {card}")


if __name__ == "__main__":
    main()
