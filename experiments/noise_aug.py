"""Noise-augmented decoder training (the paper's section on the decoder): decoders trained through
`rae train-decoder` with noise tau 0 and tau 0.8 (sigma ~ tau * U(0, 1) added to the latents), each
scored on the reconstructions of a store (PSNR against the images, and the Frechet distance of the
reconstructions to the images) and on the images it decodes from one diffusion model's samples (the
Frechet distance of those to the images). The distances are taken in the store's own encoder space
(`rae eval --fd-encoder`: each image re-encoded, its tokens mean-pooled), so nothing is downloaded;
`--metrics fid` adds Inception FIDs where its weights are at hand. The paper (DINOv2-B, ViT-XL decoder,
DiT^DH-S): rFID 0.49 -> 0.57 with the noise, gFID 4.81 -> 4.28: a little worse at reconstructing the
encoder's exact latents, better at decoding the diffusion model's.

The diffusion model is --diffusion RUN: an existing `rae train-diffusion` run, or trained there on the
same store when RUN does not exist (--diffusion-model, --diffusion-steps, --diffusion-batch,
--diffusion-args). Its samples are drawn once (`rae sample`, seeds 0..num-1) and decoded by every
decoder, so the decoders see the very same latents.

Writes DIR/noise_aug.json, .md and .png (the metrics per tau, and the same samples decoded by each
decoder side by side); running the command again resumes every stage it left unfinished. A tau whose
scores are in noise_aug.json is not trained, sampled or scored again: that file alone, copied to another
machine, remakes the table and the plot (without the pictures it did not carry).

    python experiments/noise_aug.py --latents STORE --images DIR --out DIR [--taus 0,0.8] [--num 2000]
        [--diffusion RUN] [-- other train-decoder options]
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_results, parse, rae, save_figure, save_results, settings_of, train  # noqa: E402
from stages.artifacts.image_folder import png_name, read_png  # noqa: E402
from stages.eval.evaluate import EvalConfig, run as evaluate  # noqa: E402
from stages.progress import console  # noqa: E402


def scores(images: Path, ref: str, store: str, metrics: tuple[str, ...], pairs: bool, out: Path) -> dict:
    """FD in ``store``'s encoder space (and ``metrics``) of ``images`` to ``ref``; with ``pairs`` also PSNR/SSIM."""
    found = evaluate(EvalConfig(images=str(images), ref=ref, fd_encoder=store, metrics=("fd_dinov2", *metrics),
                                pairs=pairs, offline=True, num_workers=0, out=str(out)))["metrics"]
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", required=True, help="the training store (decoders and diffusion model)")
    ap.add_argument("--images", required=True, help="the images the store was encoded from: the reference")
    ap.add_argument("--recon", default=None, help="store whose entries are reconstructed and paired with --images "
                    "(default: --latents; give a store encoded without --flip when --latents has flips)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--taus", default="0,0.8")
    ap.add_argument("--num", type=int, default=2000, help="diffusion samples decoded by each decoder")
    ap.add_argument("--metrics", default="", help="more `rae eval` metrics, comma-separated (e.g. fid)")
    ap.add_argument("--diffusion", type=Path, default=None, help="diffusion run (default: DIR/diffusion)")
    ap.add_argument("--diffusion-model", default="ditdh-s")
    ap.add_argument("--diffusion-steps", type=int, default=20000)
    ap.add_argument("--diffusion-batch", type=int, default=256)
    ap.add_argument("--diffusion-args", default="", help="more train-diffusion options, one string")
    ap.add_argument("--sample-args", default="", help="more `rae sample` options, one string")
    ap.add_argument("--device", default="auto")
    args, extra = parse(ap)
    taus = [float(t) for t in args.taus.split(",")]
    metrics = tuple(m for m in args.metrics.split(",") if m)
    recon_store = args.recon or args.latents
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    diffusion = args.diffusion or out / "diffusion"
    path = out / "noise_aug.json"
    settings = settings_of(args, extra, select=("taus",))
    results = load_results(path, settings).get("results", {})
    # A decoder whose scores are in the file is not trained again: the file alone carries them to another machine.
    missing = [tau for tau in taus if f"{tau:g}" not in results]
    samples = out / "samples.zarr"
    if missing:
        if not (diffusion / "config.json").is_file() or args.diffusion is None:
            every = max(args.diffusion_steps // 4, 1)
            train(args.latents, diffusion, args.diffusion_model, args.diffusion_steps, args.diffusion_batch, every,
                  args.device, shlex.split(args.diffusion_args))
        rae("sample", "--model", diffusion, "--out", samples, "--number", args.num, "--device", args.device,
            *shlex.split(args.sample_args))
    for tau in missing:
        key = f"{tau:g}"
        decoder = out / f"decoder_tau{key}"
        rae("train-decoder", "--latents", args.latents, "--out", decoder, "--noise-tau", tau, "--device", args.device,
            *extra)
        rae("decode", recon_store, "--decoder", decoder, "--out", out / f"recon_tau{key}", "--device", args.device)
        rae("decode", samples, "--decoder", decoder, "--out", out / f"gen_tau{key}", "--device", args.device)
        recon = scores(out / f"recon_tau{key}", args.images, recon_store, metrics, True,
                       out / f"recon_tau{key}.eval.json")
        gen = scores(out / f"gen_tau{key}", args.images, recon_store, metrics, False, out / f"gen_tau{key}.eval.json")
        results[key] = {"recon": recon, "gen": gen}
        console.print(f"tau {key}: reconstruction PSNR {recon['psnr']:.2f} dB, FD {recon['fd_rae']:.3f}; "
                      f"decoded samples FD {gen['fd_rae']:.3f}", highlight=False)
        save_results(path, settings, diffusion=str(diffusion), results=results)
    report(out, taus, results, metrics, args)


def report(out: Path, taus: list[float], results: dict, metrics: tuple[str, ...], args) -> None:
    keys = [f"{t:g}" for t in taus]
    more = [m for m in metrics if m in results[keys[0]]["gen"]]
    lines = [f"Noise-augmented decoding: decoders on {args.latents}; reconstructions of {args.recon or args.latents}; "
             f"{args.num} samples of {args.diffusion or out / 'diffusion'} decoded by each; FD in the store's "
             "encoder space (mean-pooled tokens)", "",
             "| noise tau | reconstruction PSNR (dB) | reconstruction SSIM | reconstruction FD | decoded samples FD |"
             + "".join(f" recon {m} | samples {m} |" for m in more),
             "|---|---|---|---|---|" + "---|---|" * len(more)]
    for k in keys:
        r, g = results[k]["recon"], results[k]["gen"]
        lines.append(f"| {k} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['fd_rae']:.3f} | {g['fd_rae']:.3f} |"
                     + "".join(f" {r[m]:.3f} | {g[m]:.3f} |" for m in more))
    (out / "noise_aug.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    show = 8
    fig = plt.figure(figsize=(12, 3.2 + 1.6 * len(keys)), dpi=100)
    grid = fig.add_gridspec(len(keys) + 1, 3, height_ratios=[2.2] + [1] * len(keys))
    for col, (title, part, metric) in enumerate((("reconstruction PSNR (dB)", "recon", "psnr"),
                                                 ("reconstruction FD", "recon", "fd_rae"),
                                                 ("decoded samples FD", "gen", "fd_rae"))):
        ax = fig.add_subplot(grid[0, col])
        ax.bar([f"tau {k}" for k in keys], [results[k][part][metric] for k in keys], color=["C0", "C1", "C2"][:len(keys)])
        ax.set_title(title, fontsize=10)
    for row, k in enumerate(keys, start=1):
        ax = fig.add_subplot(grid[row, :])
        ax.set_axis_off()
        names = [out / f"gen_tau{k}" / png_name(i) for i in range(min(show, args.num))]
        if not all(n.is_file() for n in names):  # scores carried in the JSON file, images left on another machine
            ax.set_title(f"tau {k}: the decoded samples are not in {out} (scores from noise_aug.json)", fontsize=9)
            continue
        tiles = [read_png(n) for n in names]
        ax.imshow(np.concatenate(tiles, axis=1))
        ax.set_title(f"samples 0-{len(tiles) - 1} decoded by the tau {k} decoder", fontsize=9)
    save_figure(fig, out / "noise_aug.png")
    console.print((out / "noise_aug.md").read_text(), highlight=False)


if __name__ == "__main__":
    main()
