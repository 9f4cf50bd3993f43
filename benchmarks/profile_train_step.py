"""Where the time of one DiT^DH training step goes, by category of GPU kernel (torch.profiler).

    python benchmarks/profile_train_step.py --reference /path/to/RAE [--model ditdh-xl] [--batch 64] [--grid 16]

Builds the step of ``bench_train_diffusion.py`` (ours: ``DiffusionTraining.train_step``; the reference: its
loop body on its model), compiled, warms it up, then profiles a few steps and sums the CUDA
kernel time per category: matrix products, attention, normalisation + elementwise (eager kernels
and Triton-fused ones), optimiser + EMA, copies, other. Prints one table last, naming the card:
milliseconds per step and share of the kernel time, ours and the reference side by side.
``--smoke``: CPU, tiny model, CPU operator times (checks that the script runs).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train_diffusion as btd  # noqa: E402

# First match wins; kernel names of cuBLAS / CUTLASS / cuDNN / FlashAttention / Inductor / ATen.
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|_efficient_attention|cudnn.*(mha|sdpa)", re.I)),
    ("matrix products", re.compile(r"gemm|cutlass|xmma|nvjet|sm90_|sm80_|matmul|\bmm\b|addmm|bmm|cublas|ampere_|hopper_", re.I)),
    ("optimiser + EMA", re.compile(r"adam|multi_tensor|foreach|lerp|clip|norm_kernel.*multi", re.I)),
    # Inductor's fused kernels (triton_poi/red/per_...) carry the names of the ops they fuse, casts and
    # concatenations included: they are the norms, modulation, SwiGLU and their backward.
    ("norms + elementwise (fused, Triton)", re.compile(r"^triton_|triton", re.I)),
    ("copies / casts", re.compile(r"memcpy|memset|copy_kernel|cast|to_copy|cat_", re.I)),
    ("norms + elementwise (ATen)", re.compile(r"elementwise|vectorized|reduce|norm|softmax|silu|gelu|mul|add|pow|rsqrt|index", re.I)),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def profile(step, device, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """{category: ms per step}, {top kernel name: ms per step}."""
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    btd.sync(device)
    with prof(activities=acts) as p:
        for _ in range(steps):
            step()
        btd.sync(device)
    per_cat, per_kernel = defaultdict(float), defaultdict(float)
    for e in p.key_averages():
        t = (e.device_time_total if device.type == "cuda" else e.self_cpu_time_total) / 1e3 / steps  # ms
        if device.type == "cuda" and getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
            continue
        if t <= 0:
            continue
        per_cat[category(e.key)] += t
        per_kernel[e.key] += t
    return dict(per_cat), dict(per_kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--model", default="ditdh-xl")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    for name in ("ditdh-xl", "ditdh-s"):
        btd.MODELS[name] = (*btd.MODELS[name][:2], (768, args.grid, args.grid))
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.model, args.batch, args.steps, args.no_compile = "tiny", 4, 2, True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = "fp32" if args.smoke else "bf16"
    compile_ = not args.no_compile
    impls = {"ours": lambda: btd.build_ours(args.model, device, args.batch, precision, compile_, 0)[0]}
    if args.reference:
        ref = btd.import_reference(args.reference)
        impls["reference"] = lambda: btd.build_reference(args.model, device, args.batch, precision, compile_, ref)[0]
    results = {}
    for name, build in impls.items():
        step = build()
        step_s = btd.time_steps(step, device, 5 if not args.smoke else 1, 10 if not args.smoke else 2) / (10 if not args.smoke else 2)
        cats, kernels = profile(step, device, args.steps)
        results[name] = (step_s, cats)
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
        print(f"{name}: {step_s * 1e3:.1f} ms per step ({args.batch / step_s:.0f} img/s); top kernels (ms/step):", flush=True)
        for k, v in top:
            print(f"  {v:8.2f}  [{category(k)}]  {k[:110]}", flush=True)
        del step
        btd.free(device)
    labels = [c for c, _ in CATEGORIES] + ["other"]
    print()
    print(f"## One training step by kernel category: {args.model} [768, {args.grid}, {args.grid}], batch {args.batch}, "
          f"{precision}{' + compile' if compile_ else ''}, {card}, torch {torch.__version__}")
    head = " | ".join(f"{n} ms/step | {n} share" for n in results)
    print(f"| category | {head} |")
    print("|---|" + "---|" * (2 * len(results)))
    for c in labels + ["total kernel time", "wall time per step"]:
        cells = []
        for name, (step_s, cats) in results.items():
            total = sum(cats.values())
            v = total if c == "total kernel time" else step_s * 1e3 if c == "wall time per step" else cats.get(c, 0.0)
            share = f"{v / total:.0%}" if c not in ("wall time per step",) and total else ""
            cells += [f"{v:.1f}", share]
        print(f"| {c} | " + " | ".join(cells) + " |")
    print(f"card: {card}")


if __name__ == "__main__":
    main()
