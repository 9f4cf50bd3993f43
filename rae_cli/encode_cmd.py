"""Encode an image folder (ImageNet layout or flat) into a Zarr latent store with exact statistics."""
from __future__ import annotations

from stages.encode import EncodeConfig, run
from stages.presets import DEMO_NOTE
from stages.progress import console

from .config_command import config_command


@config_command(EncodeConfig, run, "encode")
def report_encode(result: dict, cfg: EncodeConfig, preset: str | None) -> None:
    """Encode an image folder (ImageNet layout or flat) into a Zarr latent store with exact statistics.

    Run it again after an interruption to resume; under `torchrun --nproc_per_node N` the ranks share
    the work and write one store, identical to a single-process run.
    """
    c, h, w = result["latent_shape"]
    speed = f", {result['images_per_second']:,.0f} img/s" if "images_per_second" in result else ""
    console.print(f"[bold green]done:[/] {result['store']}: {result['valid']}/{result['entries']} entries "
                  f"[{c}, {h}, {w}] from {result['encoder']}, {result['bytes_per_entry'] / 1024:.1f} KiB/entry on disk{speed}",
                  highlight=False)
    if result["skipped"]:
        console.print(f"[yellow]{len(result['skipped'])} file(s) skipped[/] (listed in the manifest):", highlight=False)
        for rel, why in result["skipped"][:20]:
            console.print(f"  {rel}: {why}", highlight=False)
    if preset == "demo":
        console.print(f"[yellow]note:[/] {DEMO_NOTE}", highlight=False)
    elif cfg.random_init:
        console.print("[yellow]note:[/] the encoder has random weights (--random-init): not a real representation.",
                      highlight=False)
