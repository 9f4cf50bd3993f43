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
    Straight from a model: `rae eval --model RUN --decoder DEC --per-class 50 --ref REF` samples, decodes
    and scores in memory (with `rae sample`'s options; a comma list of --cfg-scale or --ag-scale scores
    each). Writes eval.json (see --out for where); under `torchrun --nproc_per_node N` the GPUs share the work.
    """
    print_result(result)


def print_result(result: dict, console: Console | None = None) -> None:
    """The metric table (a column per scale for a sweep), the notes on it, then one line per reason for
    the metrics that were skipped."""
    console = console or Console()
    runs = result.get("results") or [result]
    first = runs[0]
    scored = first.get("images") or {}
    title = f"rae eval: {first['num_images']} " + (f"samples of {scored['path']}" if "model" in scored else "images")
    if first.get("num_ref_images"):
        title += f" vs {first['num_ref_images']} reference images"
    table = Table()
    table.add_column("metric")
    for r in runs:
        table.add_column(f"{result['swept']} {r['images']['sampling']['scale']:g}" if "swept" in result else "value",
                         justify="right")
    for key in first["metrics"]:
        name, fmt = _SHOWN.get(key, (key, "{:.4f}"))
        table.add_row(name, *(fmt.format(r["metrics"][key]) if key in r["metrics"] else "-" for r in runs))
    console.print(f"[bold]{title}[/]", highlight=False, soft_wrap=True)
    if first["metrics"]:
        console.print(table)
    result = {**first, **{k: result[k] for k in ("written", "saved_ref") if k in result}}
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
