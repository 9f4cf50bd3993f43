"""Evaluate images: FID, sFID, IS, precision/recall, KID and FD_DINOv2 as the ADM suite computes them; PSNR/SSIM with --pairs."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from stages import dist
from stages.eval.evaluate import EvalConfig, run

from .config_command import config_command

# How each value is printed (name in the table, format).
_SHOWN = {
    "fid": ("FID", "{:.4f}"), "sfid": ("sFID", "{:.4f}"),
    "is": ("Inception Score", "{:.3f}"), "is_std": ("  IS std over splits", "{:.3f}"),
    "precision": ("Precision", "{:.4f}"), "recall": ("Recall", "{:.4f}"),
    "kid": ("KID", "{:.6f}"), "kid_std": ("  KID std over subsets", "{:.6f}"),
    "fd_dinov2": ("FD_DINOv2", "{:.3f}"), "psnr": ("PSNR (dB)", "{:.3f}"), "ssim": ("SSIM", "{:.4f}"),
    "lpips": ("LPIPS (VGG)", "{:.4f}"),
}


def _run(cfg: EvalConfig) -> dict:
    try:
        return run(cfg)
    finally:
        dist.cleanup()


@config_command(EvalConfig, _run)
def report_eval(result: dict, cfg: EvalConfig, preset: None) -> None:
    """Evaluate images: FID, sFID, IS, precision/recall, KID and FD_DINOv2 as the ADM suite computes them; PSNR/SSIM with --pairs.

    rFID: `rae eval RECONSTRUCTIONS --ref ORIGINALS --pairs` (ImageNet val, 50K, ADM center crop 256).
    Writes eval.json (see --out for where); under `torchrun --nproc_per_node N` the GPUs share the images.
    """
    print_result(result)


def print_result(result: dict, console: Console | None = None) -> None:
    """The metric table, the notes on it, then one line per reason for the metrics that were skipped."""
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
    for note in result.get("notes", ()):
        console.print(f"[cyan]note:[/] {note}", highlight=False, soft_wrap=True)
    by_reason: dict[str, list[str]] = {}
    for key, why in result["skipped"].items():
        by_reason.setdefault(why, []).append("precision/recall" if key == "pr" else _SHOWN.get(key, (key,))[0])
    for why, names in by_reason.items():
        console.print(f"[yellow]skipped[/] {', '.join(names)}: {why}", highlight=False, soft_wrap=True)
    if result.get("written"):
        console.print(f"wrote {result['written']}", highlight=False, soft_wrap=True)  # the whole path, unbroken
    if result.get("saved_ref"):
        console.print(f"saved reference statistics to {result['saved_ref']}", highlight=False)
