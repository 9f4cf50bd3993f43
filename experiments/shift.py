"""The paper's dimension-dependent shift: the same DiT on the same latents, trained with the time shift
a = sqrt(C h w / 4096) and without it (`train-diffusion --no-shift`), both through `rae train-diffusion`
itself; at every snapshot step each run's EMA samples (50 Euler steps, its own training shift) are
scored by the Frechet distance to the training latents in the encoder's own space (each latent's
tokens mean-pooled: no decoder, no downloaded network). The paper: gFID 23.08 without the shift, 4.81
with it (DiT^DH-S, DINOv2-B, 80 epochs); at the sizes that fit a short run the gap may be small, and
the table says what it is.

Writes DIR/shift.json, DIR/shift.md and DIR/shift.png (training loss and FD against steps, both runs),
and keeps the two runs in DIR/with_shift and DIR/no_shift: running the command again resumes them and
scores only the steps not scored yet. shift.json is saved after every score; a run whose scores and loss
curve are all in it is not trained again, so that file alone carries the experiment to another machine.

    python experiments/shift.py --latents STORE --out DIR [--model ditdh-s] [--steps 20000] [--every 2000]
        [--batch 256] [--num 2000] [-- other train-diffusion options]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (all_scored, load_results, parse_scored, save_figure, save_results, score_snapshots,  # noqa: E402
                    settings_of, train)
from stages.artifacts.runs import read_config  # noqa: E402
from stages.progress import console  # noqa: E402
from stages.train.runlog import read_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="ditdh-s")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--every", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    args, extra, device, ref = parse_scored(ap)
    path = args.out / "shift.json"
    settings = settings_of(args, extra)
    saved = load_results(path, settings)
    scores, runs = saved.get("scores", {}), saved.get("runs", {})

    def save():
        save_results(path, settings, scores=scores, runs=runs)

    for name, shifted in (("with_shift", True), ("no_shift", False)):
        run_dir = args.out / name
        mine = scores.setdefault(name, {})
        if name not in runs or not all_scored(args.every, args.steps, mine):
            train(args.latents, run_dir, args.model, args.steps, args.batch, args.every, args.device,
                  [*([] if shifted else ["--no-shift"]), *extra])
            runs[name] = {"shift": float(read_config(run_dir)["flow"]["shift"]),
                          "loss": [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]}
            save()
        score_snapshots(name, run_dir, args.every, args.steps, mine, args.num, args.sample_batch, ref, device, save)
    shift = runs["with_shift"]["shift"]
    steps = sorted(int(s) for s in scores["with_shift"])
    lines = [f"Shift experiment: {args.model} on {args.latents}, batch {args.batch}; FD of {args.num} EMA samples "
             f"(50 Euler steps) to the training latents, mean-pooled tokens, raw encoder space", "",
             f"| step | FD with the shift a = {shift:.3f} | FD without (a = 1) |", "|---|---|---|"]
    lines += [f"| {s} | {scores['with_shift'][str(s)]:.3f} | {scores['no_shift'][str(s)]:.3f} |" for s in steps]
    (args.out / "shift.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for name, label in (("with_shift", f"shift a = {shift:.2f}"), ("no_shift", "no shift")):
        s, loss = zip(*runs[name]["loss"])
        a.plot(s, loss, lw=0.8, label=label)
        b.plot(steps, [scores[name][str(t)] for t in steps], marker="o", label=label)
    a.set(xlabel="step", ylabel="training loss", title="loss (each with its own time distribution)")
    b.set(xlabel="step", ylabel="FD, encoder space", title="FD of EMA samples to the training latents")
    for ax in (a, b):
        ax.legend(fontsize=8)
    save_figure(fig, args.out / "shift.png")
    console.print((args.out / "shift.md").read_text(), highlight=False)


if __name__ == "__main__":
    main()
