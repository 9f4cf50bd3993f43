"""Import the paper's released models (decoder, latent statistics, DiT^DH) as rae runs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import build_config, user_errors


@user_errors
def import_file(
    kind: str = typer.Argument(..., help="decoder | stats | diffusion."),
    source: Path = typer.Argument(..., help="The released file: model.pt (decoder), stat.pt (stats), stage2_model.pt "
                                            "(diffusion), or a training checkpoint of the reference code."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: a decoder run, a diffusion run, or "
                                                       "a statistics directory (latent_stats.safetensors)."),
    stats: Optional[Path] = typer.Option(None, help="diffusion: the latent statistics it was trained with "
                                                    "(stat.pt, or a directory from `rae import stats`)."),
    encoder: Optional[str] = typer.Option(None, help="The encoder of the latents: dinov2-b (default, the released "
                                                     "models) | dinov2-s | dinov2-l | siglip2-b | mae-b."),
    image_size: Optional[int] = typer.Option(None, help="Image size of the encoded crops (default: from the token "
                                                        "grid, 16x16 -> 256 and 32x32 -> 512 for DINOv2)."),
    encoder_weights: Optional[Path] = typer.Option(None, help="The encoder's weights file, to record its sha256 as "
                                                              "`rae encode --encoder-weights` does "
                                                              "(default: the Hugging Face cache's)."),
    heads: Optional[int] = typer.Option(None, help="decoder: attention heads (default: the reference config's "
                                                   "for its width, 12 for 768, 16 for 1024 and 1152)."),
    num_heads: Optional[int] = typer.Option(None, help="diffusion: trunk attention heads "
                                                       "(default: from the RoPE tables)."),
    head_num_heads: Optional[int] = typer.Option(None, help="diffusion: DiT^DH head attention heads "
                                                            "(default: from the RoPE tables)."),
    shift: Optional[float] = typer.Option(None, help="diffusion: time shift "
                                                     "(default: sqrt(C*h*w / 4096), as the reference)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing output."),
):
    """Import the paper's released models (decoder, latent statistics, DiT^DH) as rae runs.

    The files of Hugging Face `nyu-visionx/RAE-collections` become what `rae train-decoder` and
    `rae train-diffusion` write, for `rae decode` and `rae sample` (also as --guide-model). Files are
    read with torch.load(weights_only=True): tensors only, never code.
    """
    from stages.importer import ImportConfig, run
    from stages.progress import console

    cfg = build_config(ImportConfig, "import", None, kind=kind, source=source, out=out, stats=stats,
                       encoder=encoder, image_size=image_size, encoder_weights=encoder_weights, heads=heads,
                       num_heads=num_heads, head_num_heads=head_num_heads, shift=shift, overwrite=overwrite)
    result = run(cfg)
    for note in result["notes"]:
        console.print(f"[bold yellow]note:[/] {note}", highlight=False)
    details = [result["model"], f"latents {result['latent_shape']}"]
    if "encoder" in result:
        identity = result["encoder"]
        details.append(f"encoder {identity['name']} (weights sha256 {identity['weights_sha256'][:12]})")
    if "shift" in result:
        details.append(f"shift {result['shift']:.4g}")
    console.print(f"[bold green]done:[/] {result['out']}: {', '.join(details)}; {', '.join(result['files'])}",
                  highlight=False)
