"""The end of ``make all``: evaluate the demonstration chain against its baselines and say where to look.

Numbers (all offline, no downloaded weights):
  * FD of the decoded samples to the data, and of decoded pure noise (``--steps 0``) to the data,
    in the demo encoder's own latent space (``rae eval --fd-encoder``);
  * PSNR/SSIM of the reconstructions of the data, and of the decoded noise, against the data.
"""
from __future__ import annotations

from pathlib import Path

from ..eval.evaluate import EvalConfig, run as evaluate
from ..presets import DEMO_NOTE


def run(out: str | Path) -> dict:
    out = Path(out)
    images, store = out / "images", out / "latents.zarr"
    common = dict(ref=str(images), fd_encoder=str(store), offline=True, metrics=("fd_dinov2",), num_workers=0)
    fd_samples = evaluate(EvalConfig(images=str(out / "sample_images"), **common))["metrics"]["fd_rae"]
    fd_noise = evaluate(EvalConfig(images=str(out / "noise_images"), **common))["metrics"]["fd_rae"]
    pairs = dict(ref=str(images), pairs=True, offline=True, metrics=(), num_workers=0)
    recon = evaluate(EvalConfig(images=str(out / "reconstructions"), **pairs))["metrics"]
    noise = evaluate(EvalConfig(images=str(out / "noise_images"), out=str(out / "noise_images" / "pairs.eval.json"),
                                **pairs))["metrics"]
    return {
        "rows": [
            ("FD to the data, decoded samples (rae encoder space)", fd_samples),
            ("FD to the data, decoded pure noise (baseline)", fd_noise),
            ("PSNR of reconstructions vs originals (dB)", recon["psnr"]),
            ("PSNR of decoded noise vs originals (baseline, dB)", noise["psnr"]),
            ("SSIM of reconstructions vs originals", recon["ssim"]),
            ("SSIM of decoded noise vs originals (baseline)", noise["ssim"]),
        ],
        "pictures": [
            ("reconstructions (original | reconstruction)", out / "decoder" / "reconstructions.png"),
            ("class-conditional samples (one row per class)", out / "sample_images" / "grid.png"),
            ("decoder loss curves", out / "decoder" / "losses.png"),
            ("diffusion loss curve", out / "diffusion" / "loss.png"),
        ],
        "ok": fd_samples < 0.5 * fd_noise and recon["psnr"] > noise["psnr"] + 3.0,
        "note": DEMO_NOTE,
    }
