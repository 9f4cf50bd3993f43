"""The cost of `train-diffusion --eval-every`'s evaluation on one GPU: K EMA samples of DiT^DH-XL
(no guidance, 50 Euler steps, [768, 16, 16]), decoded by the ViT-XL decoder and scored with
FD_DINOv2 (DINOv2-L at 224) in memory: the very code of the trainer (``evaluate_ema`` over
``stages.eval.live.LiveScorer``), random weights everywhere (the same compute as trained ones).
Prints the table last, naming the card; the time of a 10,000-sample evaluation is extrapolated from
``--num`` samples (the cost is linear in K after the first batch).

    python benchmarks/bench_live_eval.py [--num 2048] [--batch 256]
    python benchmarks/bench_live_eval.py --smoke      # CPU, tiny models: checks that the harness runs
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import timm
    from safetensors.torch import save_file

    from stages.dist import Dist
    from stages.eval.live import LiveScorer
    from stages.eval.refs import RefStats, save_ref_stats
    from stages.models.decoder import ViTDecoder, create_decoder
    from stages.models.dit import create_dit
    from stages.train.config import TrainDiffusionConfig
    from stages.train.diffusion import _Latents, evaluate_ema
    from stages.train.diffusion_step import DiffusionTraining

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--compile", action="store_true", help="as train-diffusion --compile: the EMA and decoder compiled")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    d = Dist(0, 1, 0, device)
    shape, model, dec, fd = ((768, 16, 16), "ditdh-xl", "vit-xl", "vit_large_patch14_dinov2.lvd142m")
    if args.smoke:
        args.num, args.batch, args.steps = 8, 4, 2
        shape, fd = (32, 4, 4), "vit_small_patch14_dinov2.lvd142m"
    torch.manual_seed(0)
    overrides = dict(width=64, depth=1, num_heads=2, head_width=64, head_depth=1, head_num_heads=2) if args.smoke else {}
    dit = create_dit(model, in_channels=shape[0], input_size=shape[1], num_classes=1000, **overrides)
    if args.smoke:
        decoder = ViTDecoder(in_dim=shape[0], grid=shape[1], patch_size=16, width=32, depth=1, heads=2, mlp_dim=64)
    else:
        decoder = create_decoder(dec, in_dim=shape[0], grid=shape[1], patch_size=16)
    decoder = decoder.to(device).eval()
    cfg = TrainDiffusionConfig(latents="-", out="-", eval_num=args.num, eval_batch_size=args.batch,
                               eval_steps=args.steps, precision="bf16" if device.type == "cuda" else "fp32")
    trainer = DiffusionTraining(dit, cfg, device, shift=(shape[0] * shape[1] * shape[2] / 4096) ** 0.5, null_label=1000)
    mean, var = torch.zeros(shape), torch.ones(shape)
    latents = _Latents({}, None, shape, [], 1000, mean, var, decoder)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "dinov2.safetensors"
        save_file(timm.create_model(fd, pretrained=False, num_classes=0).state_dict(), str(weights))
        ref = Path(tmp) / "ref.npz"
        dim = 384 if args.smoke else 1024
        save_ref_stats(ref, RefStats(dinov2_mu=np.zeros(dim), dinov2_sigma=np.eye(dim), meta={"source": "random"}))
        t0 = time.perf_counter()
        scorer = LiveScorer(str(ref), ("fd_dinov2",), d, dinov2_weights=str(weights), fd_model=fd, offline=True)
        setup = time.perf_counter() - t0
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        compiled = (torch.compile(trainer.ema), torch.compile(decoder)) if args.compile else None
        if compiled:  # one warm-up evaluation of a batch: the compilation is a one-time cost of the run
            evaluate_ema(scorer, trainer, TrainDiffusionConfig(**{**cfg.__dict__, "eval_num": args.batch}), latents, d,
                         compiled)
        t0 = time.perf_counter()
        scores = evaluate_ema(scorer, trainer, cfg, latents, d, compiled)
        sync()
        seconds = time.perf_counter() - t0
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test: tiny sizes, not a benchmark)"
    rate = args.num / seconds
    print(f"\n## train-diffusion --eval-every: one evaluation — {card}, torch {torch.__version__}")
    print(f"{model} ({args.steps} Euler steps, no guidance, {cfg.precision}{', compiled' if args.compile else ''}) + {dec} decoder + FD in {fd} space; "
          f"{args.num} samples in batches of {args.batch}; FD {next(iter(scores.values())):.2f} (random weights)")
    print("| what | value |\n|---|---|")
    print(f"| networks and reference loaded | {setup:.1f} s |")
    print(f"| {args.num} samples drawn, decoded, scored | {seconds:.1f} s ({rate:,.1f} samples/s) |")
    print(f"| a 10,000-sample evaluation (extrapolated) | {10000 / rate / 60:.1f} min |")


if __name__ == "__main__":
    main()
