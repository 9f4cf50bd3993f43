"""Benchmark `rae train-diffusion`: the training step (ours and the reference code's, side by side
in one process) and the data loader alone. Prints a table last, naming the card.

    python benchmarks/bench_train_diffusion.py --reference /path/to/RAE                # everything
    python benchmarks/bench_train_diffusion.py --models ditdh-xl --batches 64 --compile on --reference ...
    python benchmarks/bench_train_diffusion.py --only loader
    python benchmarks/bench_train_diffusion.py --smoke [--reference ...]              # CPU, tiny, seconds

Training step: random weights, synthetic latents [768, 16, 16] already on the GPU (the loader is
measured separately), one GPU, bf16 autocast. "ours" is ``stages.train.diffusion_step.DiffusionTraining.train_step``
(the exact code of the training loop: per-step draws, per-sample noise, fused AdamW, grad clip
1.0, foreach EMA, no host sync). "reference" is the authors' loop body from their train.py on
their model (DiTwDDTHead imported from the --reference checkout): Transport.training_losses under
autocast, backward, clip 1.0, fused AdamW, LambdaLR, their per-parameter EMA update, and the
``loss.item()`` their loop does every step; compiled as they do (``model.forward =
torch.compile(model.forward)``). Their per-step encoder pass over images is not included.

FLOPs are counted once per model with torch.utils.flop_counter (forward + backward, per image);
TFLOP/s = that x img/s (recomputation for activation checkpointing not counted). A batch that does
not fit is reported OOM; ours then retries with activation checkpointing of the fewest blocks that
an eager memory probe says will fit (``--grad-checkpointing auto``, or give N).

The loader: a store of [768, 16, 16] float16 latents (blosc-zstd, as `rae encode` writes them) is
written under --workdir, then read with StoreReader + batches (the training loader) at batch 128,
into pinned memory and on to the GPU. The store is in the page cache after being written (a
training set read once per epoch from a fast disk behaves the same; a cold network disk does not).
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.train.diffusion_step import DiffusionTraining  # noqa: E402
from stages.train.config import TrainDiffusionConfig  # noqa: E402

# name -> (our preset + overrides, reference DiTwDDTHead kwargs, latent [C, H, W])
_REF_COMMON = dict(patch_size=1, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, use_qknorm=False,
                   use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True)
MODELS = {
    "ditdh-xl": (("ditdh-xl", {}), dict(hidden_size=[1152, 2048], depth=[28, 2], num_heads=[16, 16]), (768, 16, 16)),
    "ditdh-s": (("ditdh-s", {}), dict(hidden_size=[384, 2048], depth=[12, 2], num_heads=[6, 16]), (768, 16, 16)),
    "tiny": (("ditdh-s", dict(width=64, depth=2, num_heads=4, head_width=96, head_depth=2, head_num_heads=4)),
             dict(hidden_size=[64, 96], depth=[2, 2], num_heads=[4, 4]), (32, 4, 4)),
}


def import_reference(root: Path):
    """The reference's DiT^DH and transport. Modules it imports but the training step never uses
    (transformers, regex, torchdiffeq, tqdm) are stubbed when missing; einops must be installed."""
    sys.path.insert(0, str(root / "src"))
    for name, attrs in {"transformers": ["SwinModel"], "regex": ["B"], "torchdiffeq": ["odeint"], "tqdm": ["tqdm"]}.items():
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            for a in attrs:
                setattr(stub, a, None)
            sys.modules[name] = stub
    from stage2.models.DDT import DiTwDDTHead
    from stage2.transport import create_transport
    return DiTwDDTHead, create_transport


def _shift(C: int, H: int) -> float:
    return max(1.0, math.sqrt(C * H * H / 4096))  # sqrt(48) for [768, 16, 16]; the reference needs >= 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_ours(name, device, batch, precision, compile_, grad_ckpt):
    from stages.models.dit import create_dit

    (preset, overrides), _, (C, H, _) = MODELS[name]
    torch.manual_seed(0)
    model = create_dit(preset, C, H, 1000, **overrides)
    cfg = TrainDiffusionConfig(latents="-", out="-", model=preset, batch_size=batch, precision=precision,
                               compile=compile_, grad_checkpointing=grad_ckpt)
    trainer = DiffusionTraining(model, cfg, device, shift=_shift(C, H), null_label=1000)
    x = torch.randn(batch, C, H, H, device=device)
    labels = torch.randint(0, 1000, (batch,))
    state = {"step": 0}

    def step():
        state["step"] += 1
        trainer.train_step(state["step"], x, labels, 2e-4)

    return step, trainer


def build_reference(name, device, batch, precision, compile_, ref):
    DiTwDDTHead, create_transport = ref
    _, kwargs, (C, H, _) = MODELS[name]
    torch.manual_seed(0)
    model = DiTwDDTHead(input_size=H, in_channels=C, **kwargs, **_REF_COMMON).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    transport = create_transport("Linear", "velocity", None, time_dist_type="logit-normal_0_1",
                                 time_dist_shift=_shift(C, H))
    if compile_:
        model.forward = torch.compile(model.forward)
    x = torch.randn(batch, C, H, H, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    ema_pairs = list(zip(ema.parameters(), model.parameters()))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = transport.training_losses(model, x, dict(y=y))["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # their EMA: every parameter, one multiply and one add each
            for e, p in ema_pairs:
                e.mul_(0.9995).add_(p.data, alpha=1 - 0.9995)
        loss.item()  # their loop logs a running loss with .item() every step

    return step, model


def flops_per_image(name, device) -> float:
    """Forward + backward FLOPs of one training image (counted on a batch of 2, eager, bf16)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.models.dit import create_dit

    (preset, overrides), _, (C, H, _) = MODELS[name]
    model = create_dit(preset, C, H, 1000, **overrides).to(device)
    x, t, y = torch.randn(2, C, H, H, device=device), torch.rand(2, device=device), torch.zeros(2, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x, t, y)
        out.float().square().mean().backward()
    del model
    return counter.get_total_flops() / 2


def time_steps(step, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return time.perf_counter() - t0


def probe_checkpointing(name, device, batch, precision) -> int:
    """Fewest blocks to checkpoint (from the first) for ``batch`` to fit in 92% of the card,
    extrapolated from eager peaks at a small batch without and with every block checkpointed."""
    small = max(batch // 8, 2)
    peaks = {}
    for n in (0, -1):
        free(device)
        step, trainer = build_ours(name, device, small, precision, False, n)
        step()
        step()
        sync(device)
        peaks[n] = torch.cuda.max_memory_allocated(device)
        static = sum(t.numel() * t.element_size() for t in trainer.params) * 4 + \
            sum(t.numel() * t.element_size() for t in trainer.ema_params)  # weights, grads, Adam m and v, EMA
        blocks = len(trainer.model.blocks)
        del step, trainer
    scale = batch / small
    per_block = (peaks[0] - peaks[-1]) / blocks * scale
    need = static + (peaks[0] - static) * scale
    budget = 0.92 * torch.cuda.get_device_properties(device).total_memory
    free(device)
    if need <= budget:
        return 0
    return min(blocks, math.ceil((need - budget) / max(per_block, 1)) + 1)


def bench_steps(args, device, ref, rows, flops):
    for name in args.models:
        if name not in flops:
            flops[name] = flops_per_image(name, device)
            free(device)
        for batch in args.batches:
            for compile_ in args.compile:
                for impl in args.impl:
                    if impl == "reference" and ref is None:
                        continue
                    ckpt = 0 if impl == "reference" or args.grad_checkpointing == "auto" else args.grad_checkpointing
                    while ckpt is not None:
                        label = dict(model=name, batch=batch, impl=impl, precision=args.precision,
                                     compile="on" if compile_ else "off",
                                     ckpt="-" if impl == "reference" else ("all" if ckpt == -1 else str(ckpt)))
                        rows.append(measure(name, impl, batch, compile_, ckpt, args, device, ref, flops, label))
                        print(_fmt(rows[-1]), flush=True)
                        free(device)
                        # Ours out of memory: once more, checkpointing as many blocks as a probe says it needs.
                        retry = (rows[-1].get("note") == "OOM" and impl == "ours" and ckpt == 0
                                 and args.grad_checkpointing == "auto" and device.type == "cuda")
                        ckpt = probe_checkpointing(name, device, batch, args.precision) or None if retry else None


def measure(name, impl, batch, compile_, ckpt, args, device, ref, flops, label) -> dict:
    """One configuration's img/s, TFLOP/s and peak memory (a row marked OOM if it does not fit).
    Everything it allocated is garbage once it returns (the OOM traceback included)."""
    try:
        if impl == "ours":
            step, _model = build_ours(name, device, batch, args.precision, compile_, ckpt)
        else:
            step, _model = build_reference(name, device, batch, args.precision, compile_, ref)
        seconds = time_steps(step, device, args.warmup, args.iters)
    except torch.OutOfMemoryError:
        return {**label, "img_s": None, "tflops": None, "peak_gb": None, "note": "OOM"}
    ips = batch * args.iters / seconds
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return {**label, "img_s": ips, "tflops": ips * flops[name] / 1e12, "peak_gb": peak}


def make_store(path: Path, n: int, shape, shard: int = 64) -> None:
    from stages.artifacts.store import LatentStore, Moments

    marker = f"{n} {list(shape)}"
    if (path / "done").is_file() and (path / "done").read_text() == marker:
        return
    shutil.rmtree(path, ignore_errors=True)
    block = min(1024, n)
    s = LatentStore.create(path, n, shape, "float16", np.arange(n) % 1000, np.arange(n), np.zeros(n, bool), {},
                           shard_size=min(shard, block), block_size=block)
    # DINOv2-like values (layer-normalised tokens, roughly unit Gaussian); one block's worth reused.
    lat = np.random.default_rng(0).standard_normal((block, *shape)).astype(np.float16)
    ok = np.ones(block, bool)
    moments = Moments.of(lat[:2])  # the statistics do not matter here
    for b in range(s.num_blocks):
        r = s.block_range(b)
        s.write_block(b, lat[: len(r)], ok[: len(r)], None, moments)
    (path / "done").write_text(marker)


def bench_loader(path: Path, workers: int, batch: int, steps: int, device, to_device: bool) -> float:
    from stages.train.data import BatchPlan, StoreReader, batches
    from stages.artifacts.store import LatentStore

    n = LatentStore(path).n
    plan = BatchPlan(np.arange(n), batch, seed=0)
    loader = batches(plan, StoreReader(path), 0, steps, num_workers=workers, pin_memory=device.type == "cuda")
    skip, count, t0 = 3, 0, None
    for i, (lat, labels) in enumerate(loader):
        if to_device:
            lat = lat.to(device, non_blocking=True)
        if i == skip - 1:  # start the clock once the workers are up
            sync(device)
            t0 = time.perf_counter()
        elif i >= skip:
            count += len(lat)
    sync(device)
    return count / (time.perf_counter() - t0)


def _fmt(r) -> str:
    def num(v, spec):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    return (f"| {r['model']} | {r['batch']} | {r['impl']} | {r['precision']} | {r['compile']} | {r['ckpt']} | "
            f"{num(r['img_s'], ',.0f')} | {num(r['tflops'], '.3g')} | {num(r['peak_gb'], '.1f')} | {r.get('note', '')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, help="checkout of the authors' code (github.com/bytetriper/RAE)")
    ap.add_argument("--models", default="ditdh-xl,ditdh-s")
    ap.add_argument("--batches", default="64,128")
    ap.add_argument("--compile", default="off,on", help="off, on or off,on")
    ap.add_argument("--impl", default="ours,reference")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--grad-checkpointing", default="auto", help="ours on OOM: auto (probe) or a number of blocks (-1: all)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", choices=["steps", "loader"], help="run one part only")
    ap.add_argument("--workdir", default="/tmp/bench_train_diffusion")
    ap.add_argument("--loader-entries", type=int, default=4096)
    ap.add_argument("--loader-batch", type=int, default=128)
    ap.add_argument("--loader-steps", type=int, default=100)
    ap.add_argument("--workers", default="4,8,15", help="loader worker counts to measure")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model and store: checks that the script works")
    ap.add_argument("--grid", type=int, default=16, help="latent grid of the real models: 16 (ImageNet 256) or "
                                                         "32 (ImageNet 512: [768, 32, 32])")
    args = ap.parse_args()
    for name in ("ditdh-xl", "ditdh-s"):  # the latent of --grid
        MODELS[name] = (*MODELS[name][:2], (768, args.grid, args.grid))
    os.environ["RAE_NO_PROGRESS"] = "1"
    if args.smoke:
        args.models, args.batches, args.compile = "tiny", "4", args.compile if "--compile" in sys.argv else "off"
        args.warmup, args.iters, args.loader_entries, args.loader_steps = 3, 3, 64, 12
        args.loader_batch, args.workers, args.precision = 4, "0,2", "fp32"
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.compile = [c == "on" for c in args.compile.split(",")]
    args.impl = ["reference" if i.startswith("ref") else i for i in args.impl.split(",")]
    if args.grad_checkpointing != "auto":
        args.grad_checkpointing = int(args.grad_checkpointing)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    ref = None
    if args.reference and "reference" in args.impl and args.only != "loader":
        ref = import_reference(args.reference)
    elif "reference" in args.impl and args.only != "loader":
        print("no --reference given: measuring ours only", flush=True)

    rows, flops, loader_rows = [], {}, []
    if args.only != "loader":
        print("| model | batch/GPU | code | precision | compile | ckpt blocks | img/s | TFLOP/s | peak GB | note |", flush=True)
        bench_steps(args, device, ref, rows, flops)
    if args.only != "steps":
        shape = MODELS["tiny"][2] if args.smoke else (768, 16, 16)
        path = Path(args.workdir) / "loader_store.zarr"
        t0 = time.time()
        make_store(path, args.loader_entries, shape)
        print(f"loader store: {args.loader_entries} x {list(shape)} float16 written in {time.time() - t0:.0f}s", flush=True)
        for w in [int(w) for w in args.workers.split(",")]:
            for to_device in ([False, True] if device.type == "cuda" else [False]):
                ips = bench_loader(path, w, args.loader_batch, args.loader_steps, device, to_device)
                loader_rows.append((w, "pinned host memory -> GPU" if to_device else
                                    ("pinned host memory" if device.type == "cuda" else "host memory"), ips))
                print(f"loader: {w} workers, {loader_rows[-1][1]}: {ips:,.0f} img/s", flush=True)

    print(f"\n## rae train-diffusion benchmark — {card}, torch {torch.__version__}, {os.cpu_count()} CPU cores")
    if flops:
        print("FLOPs per training image (forward + backward): "
              + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP" for k, v in flops.items()))
    if rows:
        print("\n| model | batch/GPU | code | precision | compile | ckpt blocks | img/s | TFLOP/s | peak GB | note |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(_fmt(r))
    if loader_rows:
        consumption = max((r["img_s"] for r in rows if r["impl"] == "ours" and r["img_s"] and r["model"] == "ditdh-xl"),
                          default=None)
        print(f"\n| data loader (batch {args.loader_batch}, [768,16,16] fp16 store) | workers | img/s | x DiT^DH-XL step (ours, best) |")
        print("|---|---|---|---|")
        for w, what, ips in loader_rows:
            ratio = f"{ips / consumption:.1f}x" if consumption else "-"
            print(f"| {what} | {w} | {ips:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
