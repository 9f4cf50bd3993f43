"""Decode a latent store or sample store into PNGs, an ADM-format .npz and a preview grid."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import build_config, user_errors


@user_errors
def decode(
    store: Path = typer.Argument(..., help="A complete latent store (rae encode) or sample store (rae sample)."),
    decoder: Path = typer.Option(..., "--decoder", "-d", help="Decoder run directory (rae train-decoder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output image folder."),
    preset: Optional[str] = typer.Option(None, help="Named defaults: imagenet256 | imagenet512 | demo."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="EMA decoder weights (default) or raw weights."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."),
    batch_size: Optional[int] = typer.Option(None, help="Latents per decoder batch [128]."),
    device: Optional[str] = typer.Option(None, help="auto | cuda | cpu."),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the decoder."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a folder made from other inputs."),
):
    """Decode a latent store or sample store into PNGs, an ADM-format .npz and a preview grid.

    Decoding an encoded store gives reconstructions (rFID); decoding a sample store gives generations
    (gFID). Refuses a decoder trained for another encoder. Resumable; shards under torchrun.
    """
    import os

    from stages.decode import DecodeConfig, run
    from stages.progress import console

    cfg = build_config(DecodeConfig, "decode", preset, store=store, decoder=decoder, out=out, ema=ema,
                       precision=precision, batch_size=batch_size, device=device, compile=compile,
                       overwrite=overwrite)
    result = run(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
    speed = f", {result['images_per_second']:,.1f} img/s" if "images_per_second" in result else ""
    console.print(f"[bold green]done:[/] {result['folder']}: {result['images']} images {result['image_shape']}, "
                  f"{result['npz']}, preview {result['grid']}{speed}", highlight=False)
