"""The paper's width experiment (Theorem 1): overfit ONE latent of a store with DiTs of a fixed depth and
widths below, at and above the token dimension n, and with a narrow DiT twice as deep.

A DiT of width d < n predicts each n-dimensional token through a d-dimensional layer, so the part of
the target eps - x outside that subspace is never predicted: the flow-matching loss stays above the
sum of the n - d smallest eigenvalues of the per-token covariance of eps - x, divided by n. For one
latent x the target's covariance is that of the noise, the identity, so the floor is (n - d) / n. At
d >= n the loss can reach 0 and samples land on the latent. Doubling the depth at d < n does not help.

Each model is rae's own (``stages.models.dit.DiT``, LightningDiT), trained by rae's own step
(``stages.train.diffusion_step.DiffusionTraining``, the recipe's AdamW, EMA and clipping) on copies of
the latent (normalised with the store's statistics) with fresh noise and times, then sampled with 50
Euler steps from fixed noise (the trained weights, not the EMA, which lags a run this short). Writes DIR/width.json, DIR/width.md (the table) and DIR/width.png (the
loss curves against their floors). Seeds fixed; each model is short (minutes on one GPU), so the
experiment is not resumable: it skips the models already in width.json.

    python experiments/width.py --latents STORE --out DIR [--widths 384,768,1024] [--deep 384x24]
        [--depth 12] [--steps 2000] [--batch 32] [--lr 2e-4] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages import dist, flow  # noqa: E402
from stages.artifacts.runs import normalize, training_shift  # noqa: E402
from stages.artifacts.store import open_complete_store  # noqa: E402
from stages.models.dit import DiT  # noqa: E402
from stages.progress import console, progress  # noqa: E402
from stages.train.config import TrainDiffusionConfig  # noqa: E402
from stages.train.diffusion_step import DiffusionTraining  # noqa: E402


def theorem_floor(x: torch.Tensor, width: int) -> float:
    """The lower bound of Theorem 1 for the single latent x [n, h, w]: the sum of the (n - d) smallest
    eigenvalues of the per-token covariance of the target eps - x, over n (the loss is a mean over the n
    channels). x is fixed, so that covariance is the noise's, the identity: every eigenvalue is 1 and the
    floor is (n - d) / n."""
    n = x.shape[0]
    return max(n - width, 0) / n


def heads_for(width: int) -> int:
    """64-wide heads, as the paper's DiTs (a head dimension divisible by 4 for 2-D RoPE)."""
    for head_dim in (64, 32, 16, 8, 4):
        if width % head_dim == 0:
            return width // head_dim
    raise SystemExit(f"width {width}: no head dimension divisible by 4 divides it")


def run_one(x: torch.Tensor, width: int, depth: int, args, device: torch.device) -> dict:
    """Train one DiT on the latent x (model space) and sample it; returns its record."""
    torch.manual_seed(args.seed)
    C, h, _ = x.shape
    model = DiT(in_channels=C, input_size=h, width=width, depth=depth, num_heads=heads_for(width), num_classes=1)
    cfg = TrainDiffusionConfig(latents="-", out="-", model="dit-s", batch_size=args.batch, lr=args.lr,
                               label_dropout=0.0, seed=args.seed, precision=args.precision, compile=args.compile)
    shift = training_shift(list(x.shape))
    trainer = DiffusionTraining(model, cfg, device, shift, null_label=1)
    batch = x[None].expand(args.batch, -1, -1, -1).to(device)
    labels = torch.zeros(args.batch, dtype=torch.long)
    losses = []
    t0 = time.time()
    with progress(args.steps, f"d={width} depth {depth}", unit="step") as advance:
        for step in range(args.steps):
            loss, _ = trainer.train_step(step, batch, labels, args.lr)
            losses.append(loss)
            if (step + 1) % 50 == 0:
                advance(50, loss=float(loss))
    losses = torch.stack(losses).float().cpu().numpy()
    tail = losses[-max(args.steps // 10, 1):]
    noise = flow.seeded_noise(list(range(8)), tuple(x.shape)).to(device)
    # The trained weights themselves (the EMA of 0.9995 lags a run this short): the question is what the
    # model can fit.
    velocity = flow.guided_velocity(trainer.model.eval(), torch.zeros(8, dtype=torch.long, device=device))
    with torch.no_grad(), torch.autocast(**trainer.autocast):
        samples = flow.sample(velocity, noise, 50, shift, "euler").float()
    miss = ((samples - x.to(device)).square().mean(dim=(1, 2, 3)).sqrt() / x.square().mean().sqrt()).mean()
    return {"width": width, "depth": depth, "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": float(tail.mean()), "floor": theorem_floor(x, width),
            "sample_relative_rms_error": float(miss), "seconds": time.time() - t0,
            "losses": [float(v) for v in losses[::max(args.steps // 200, 1)]],
            "loss_every": max(args.steps // 200, 1)}


def write(out: Path, records: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "width.json").write_text(json.dumps({**meta, "models": records}, indent=1))
    lines = [f"Width experiment: one latent {meta['latent_shape']} of {meta['latents']} (entry {meta['index']}), "
             f"{meta['steps']} steps of batch {meta['batch']}, lr {meta['lr']}, shift {meta['shift']:.3f}, "
             f"{meta['device']}", "",
             "| width d | depth | parameters | final loss | floor (n - d) / n | 50-step sample, relative RMS error |",
             "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['width']} | {r['depth']} | {r['parameters'] / 1e6:.1f}M | {r['final_loss']:.4f} | "
                     f"{r['floor']:.4f} | {r['sample_relative_rms_error']:.3f} |")
    (out / "width.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=100)
    for i, r in enumerate(records):
        steps = np.arange(len(r["losses"])) * r["loss_every"]
        line, = ax.plot(steps, r["losses"], lw=1, label=f"d={r['width']}, depth {r['depth']}", color=f"C{i}")
        if r["floor"] > 0:
            ax.axhline(r["floor"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (dashed: the theorem's floor)")
    ax.set_title(f"One latent {meta['latent_shape']}: width against the token dimension n = {meta['latent_shape'][0]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "width.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", type=Path, required=True, help="a complete latent store (rae encode)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--index", type=int, default=0, help="which entry of the store")
    ap.add_argument("--widths", default="384,768,1024")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--deep", default="384x24", help="WIDTHxDEPTH of the deeper narrow model ('' for none)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--compile", action="store_true", help="torch.compile each model (fewer, fused kernels: "
                    "eager small models are bound by kernel launches on a GPU)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = dist.init(args.device).device
    args.precision = dist.resolve_precision(args.precision, device)
    _, store = open_complete_store(str(args.latents))
    mean, var = (torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for a in store.statistics())
    x = normalize(torch.from_numpy(np.asarray(store.read(np.array([args.index])), dtype=np.float32))[0], mean, var)
    configs = [(int(w), args.depth) for w in args.widths.split(",") if w]
    if args.deep:
        w, d = args.deep.lower().split("x")
        configs.append((int(w), int(d)))
    meta = {"latents": str(args.latents), "index": args.index, "latent_shape": list(x.shape), "steps": args.steps,
            "batch": args.batch, "lr": args.lr, "seed": args.seed, "precision": args.precision,
            "shift": training_shift(list(x.shape)), "device": torch.cuda.get_device_name() if device.type == "cuda"
            else "CPU"}
    done = []
    if (args.out / "width.json").is_file():  # models already measured with these settings are kept
        old = json.loads((args.out / "width.json").read_text())
        if {k: old.get(k) for k in meta if k != "device"} == {k: v for k, v in meta.items() if k != "device"}:
            done = [r for r in old["models"] if (r["width"], r["depth"]) in configs]
    for width, depth in configs:
        if any((r["width"], r["depth"]) == (width, depth) for r in done):
            continue
        done.append(run_one(x, width, depth, args, device))
        r = done[-1]
        console.print(f"d={width} depth {depth}: final loss {r['final_loss']:.4f} (floor {r['floor']:.4f}), sample "
                      f"error {r['sample_relative_rms_error']:.3f}, {r['seconds']:.0f} s", highlight=False)
        done.sort(key=lambda r: configs.index((r["width"], r["depth"])))
        write(args.out, done, meta)
    write(args.out, done, meta)
    console.print((args.out / "width.md").read_text(), highlight=False)
    console.print(f"token dimension n = {x.shape[0]}; wrote {args.out / 'width.png'}", highlight=False)


if __name__ == "__main__":
    main()
