"""Evaluate images: FID, sFID, IS, precision/recall, KID and FD_DINOv2 as the ADM suite computes them; PSNR/SSIM with --pairs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import user_errors

METRICS_HELP = ("Comma-separated: fid, sfid (ADM's spatial FID: Inception mixed_6/conv, first 7 channels), is, "
                "pr (precision/recall), kid, fd_dinov2.")

# How each value is printed (name in the table, format).
_SHOWN = {
    "fid": ("FID", "{:.4f}"), "sfid": ("sFID", "{:.4f}"),
    "is": ("Inception Score", "{:.3f}"), "is_std": ("  IS std over splits", "{:.3f}"),
    "precision": ("Precision", "{:.4f}"), "recall": ("Recall", "{:.4f}"),
    "kid": ("KID", "{:.6f}"), "kid_std": ("  KID std over subsets", "{:.6f}"),
    "fd_dinov2": ("FD_DINOv2", "{:.3f}"), "psnr": ("PSNR (dB)", "{:.3f}"), "ssim": ("SSIM", "{:.4f}"),
}


@user_errors
def eval_cmd(
    images: Path = typer.Argument(..., help="Images to evaluate: a folder of PNGs or an ADM .npz "
                                  "(arr_0: uint8 N x H x W x 3)."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference: an ADM reference batch .npz (its mu/sigma and "
                                       "mu_s/sigma_s are the FID and sFID reference, its images the precision/recall "
                                       "one), an image folder or .npz, or a "
                                       "statistics file written by --save-ref."),
    pairs: bool = typer.Option(False, "--pairs", help="Also PSNR and SSIM over matched pairs (IMAGES[i] vs REF[i]: sorted "
                               "file names or .npz order). With reconstructions vs originals, FID is rFID."),
    save_ref: Optional[Path] = typer.Option(None, "--save-ref", help="Write IMAGES' statistics (Inception mu/sigma, spatial "
                                            "mu_s/sigma_s and pool features, DINOv2 mu/sigma) to this .npz or "
                                            ".safetensors, for later --ref."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="torch-fidelity's Inception file "
                                                     "(weights-inception-2015-12-05-6726825d.pth); default: the "
                                                     "torch hub cache."),
    dinov2_weights: Optional[Path] = typer.Option(None, "--dinov2-weights", help="DINOv2 weights file for FD_DINOv2; "
                                                  "default: the timm / Hugging Face cache."),
    fd_model: str = typer.Option("vit_large_patch14_dinov2.lvd142m", "--fd-model", help="timm DINOv2 model for the FD in "
                                 "representation space (the default is EDM2's FD_DINOv2; e.g. "
                                 "vit_base_patch14_reg4_dinov2.lvd142m for the RAE encoder's own network)."),
    fd_encoder: Optional[Path] = typer.Option(None, "--fd-encoder", help="A latent store: compute the FD in its RAE "
                                              "encoder's space (mean-pooled latent tokens) instead of DINOv2-L; "
                                              "needs no downloaded weights when the store's encoder is local."),
    metrics: str = typer.Option("fid,sfid,is,pr,kid,fd_dinov2", "--metrics", help=METRICS_HELP),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass (per GPU)."),
    num_workers: int = typer.Option(4, "--num-workers", help="Image-decoding processes per GPU."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write eval.json (default: inside the image folder, "
                                       "or NAME.eval.json beside an .npz)."),
    offline: bool = typer.Option(False, "--offline", help="Never download weights (use caches and files only)."),
):
    """Evaluate images: FID, sFID, IS, precision/recall, KID and FD_DINOv2 as the ADM suite computes them; PSNR/SSIM with --pairs.

    rFID: `rae eval RECONSTRUCTIONS --ref ORIGINALS --pairs` (ImageNet val, 50K, ADM center crop 256).
    Writes eval.json; under `torchrun --nproc_per_node N` the GPUs share the images.
    """
    from stages import dist
    from stages.evaluate import EvalConfig, run

    cfg = EvalConfig(
        images=str(images), ref=str(ref) if ref else None, pairs=pairs, save_ref=str(save_ref) if save_ref else None,
        out=str(out) if out else None, metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
        inception_weights=str(inception_weights) if inception_weights else None,
        dinov2_weights=str(dinov2_weights) if dinov2_weights else None, fd_model=fd_model, fd_encoder=str(fd_encoder) if fd_encoder else None, offline=offline,
        batch_size=batch_size, num_workers=num_workers, device=device)
    try:
        result = run(cfg)
    finally:
        dist.cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        print_result(result)


def print_result(result: dict, console: Console | None = None) -> None:
    """The metric table, then one line per reason for the metrics that were skipped."""
    console = console or Console()
    title = f"rae eval: {result['num_images']} images"
    if result.get("num_ref_images"):
        title += f" vs {result['num_ref_images']} reference images"
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        name, fmt = _SHOWN.get(key, (key, "{:.4f}"))
        table.add_row(name, fmt.format(value))
    console.print(f"[bold]{title}[/]", highlight=False)
    if result["metrics"]:
        console.print(table)
    by_reason: dict[str, list[str]] = {}
    for key, why in result["skipped"].items():
        by_reason.setdefault(why, []).append("precision/recall" if key == "pr" else _SHOWN.get(key, (key,))[0])
    for why, names in by_reason.items():
        console.print(f"[yellow]skipped[/] {', '.join(names)}: {why}", highlight=False, soft_wrap=True)
    if result.get("written"):
        console.print(f"wrote {result['written']}", highlight=False)
    if result.get("saved_ref"):
        console.print(f"saved reference statistics to {result['saved_ref']}", highlight=False)
