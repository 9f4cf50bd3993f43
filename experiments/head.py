"""The paper's wide head: a DiT against a DiT^DH at similar training compute. Each model's training FLOPs
per image are counted (PyTorch's FlopCounterMode over a forward and backward pass, as the benchmarks
count them); each trains through `rae train-diffusion` itself for the steps that spend the same
``--budget`` of training FLOPs; at each tenth of the budget its EMA samples are scored by the Frechet
distance to the training latents in the encoder's own space (``common.sample_fd``). The paper: DiT^DH-B
(294M) beats DiT-XL (677M) at a fraction of the compute on DINOv2-B latents.

Writes DIR/head.json, DIR/head.md and DIR/head.png (FD against training PFLOPs), and keeps the runs
in DIR/<model>: running the command again resumes them and scores only what is missing. head.json is saved
after every score; a model whose scores are all in it is not trained again, so that file alone carries the
experiment to another machine.

    python experiments/head.py --latents STORE --out DIR [--models dit-xl,ditdh-b] --budget PFLOP
        [--batch 256] [--num 2000] [-- other train-diffusion options, for both]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (all_scored, load_results, parse_scored, save_figure, save_results, score_snapshots,  # noqa: E402
                    settings_of, train)
from stages.artifacts.store import open_complete_store  # noqa: E402
from stages.progress import console  # noqa: E402


def training_flops_per_image(model: str, latent_shape, overrides: dict) -> float:
    """Forward + backward FLOPs of one training image of ``model`` (a batch of 2, float32, on the CPU's
    meta-free path: FlopCounterMode counts the operators' formulas, not the time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.models.dit import create_dit

    C, H, _ = latent_shape
    net = create_dit(model, C, H, 1000, **overrides)
    x, t, y = torch.randn(2, C, H, H), torch.rand(2), torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        net(x, t, y).square().mean().backward()
    return counter.get_total_flops() / 2


SIZES = ("width", "depth", "num_heads", "head_width", "head_depth", "head_num_heads")


def parse_models(spec: str) -> list[tuple[str, str, dict]]:
    """"dit-xl,ditdh-b", each name optionally with size overrides: "ditdh-s:width=32:head_width=96"; for each,
    (the item as given, the model's name, its sizes)."""
    models = []
    for item in spec.split(","):
        name, *pairs = item.split(":")
        sizes = dict(pair.split("=", 1) for pair in pairs)
        unknown = set(sizes) - set(SIZES)
        if unknown:
            raise SystemExit(f"{item}: unknown size override(s) {', '.join(sorted(unknown))}; choose from {SIZES}")
        models.append((item, name, {k: int(v) for k, v in sizes.items()}))
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="dit-xl,ditdh-b",
                    help="comma list of train-diffusion models, each optionally NAME:width=W:head_width=H...")
    ap.add_argument("--budget", type=float, required=True, help="training PFLOPs each model spends")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--points", type=int, default=10, help="scores along the budget")
    args, extra, device, ref = parse_scored(ap)
    manifest, _ = open_complete_store(args.latents)
    path = args.out / "head.json"
    settings = settings_of(args, extra, select=("models",))
    results = load_results(path, settings).get("models", {})

    def save():
        save_results(path, settings, models=results)

    chosen = parse_models(args.models)
    for spec, model, sizes in chosen:
        per_image = training_flops_per_image(model, manifest["latent_shape"], sizes)
        steps = max(args.points, int(args.budget * 1e15 / (per_image * args.batch)) // args.points * args.points)
        every = steps // args.points
        run_dir = args.out / spec.replace(":", "_").replace("=", "")
        mine = results.setdefault(spec, {"gflop_per_image": per_image / 1e9, "steps": steps, "scores": {}})
        if not all_scored(every, steps, mine["scores"]):
            size_options = [a for k, v in sizes.items() for a in (f"--{k.replace('_', '-')}", str(v))]
            train(args.latents, run_dir, model, steps, args.batch, every, args.device, [*size_options, *extra])
        score_snapshots(spec, run_dir, every, steps, mine["scores"], args.num, args.sample_batch, ref, device, save)
        save()
    shown = [(spec, results[spec]) for spec, _, _ in chosen]
    lines = [f"Head experiment on {args.latents}: {args.budget:g} training PFLOPs each, batch {args.batch}; FD of "
             f"{args.num} EMA samples (50 Euler steps) to the training latents, mean-pooled tokens", "",
             "| model | GFLOP per training image | steps | FD at 1/2 of the budget | FD at the budget |",
             "|---|---|---|---|---|"]
    for model, r in shown:
        steps = sorted(int(s) for s in r["scores"])
        half = min(steps, key=lambda s: abs(s - r["steps"] / 2))
        lines.append(f"| {model} | {r['gflop_per_image']:.2f} | {r['steps']} | {r['scores'][str(half)]:.3f} | "
                     f"{r['scores'][str(steps[-1])]:.3f} |")
    (args.out / "head.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    for model, r in shown:
        steps = sorted(int(s) for s in r["scores"])
        ax.plot([s * args.batch * r["gflop_per_image"] / 1e6 for s in steps], [r["scores"][str(s)] for s in steps],
                marker="o", label=f"{model} ({r['gflop_per_image']:.1f} GFLOP/img)")
    ax.set(xlabel="training PFLOPs", ylabel="FD to the training latents (encoder space)",
           title="DiT against DiT^DH at equal training compute")
    ax.legend(fontsize=8)
    save_figure(fig, args.out / "head.png")
    console.print((args.out / "head.md").read_text(), highlight=False)


if __name__ == "__main__":
    main()
