"""Decode a latent store or sample store into PNGs, an ADM-format .npz and a preview grid."""
from __future__ import annotations

from stages.decode import DecodeConfig, run
from stages.progress import console

from .config_command import config_command


@config_command(DecodeConfig, run, "decode")
def report_decode(result: dict, cfg: DecodeConfig, preset: str | None) -> None:
    """Decode a latent store or sample store into PNGs, an ADM-format .npz and a preview grid.

    Decoding an encoded store gives reconstructions (rFID); decoding a sample store gives generations
    (gFID). Refuses a decoder trained for another encoder. Resumable; shards under torchrun.
    """
    speed = f", {result['images_per_second']:,.1f} img/s" if "images_per_second" in result else ""
    console.print(f"[bold green]done:[/] {result['folder']}: {result['images']} images {result['image_shape']}, "
                  f"{result['npz']}, preview {result['grid']}{speed}", highlight=False)
