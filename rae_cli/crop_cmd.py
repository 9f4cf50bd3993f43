"""Write the ADM center crops of an image folder (what `rae encode` encodes) as PNGs and an ADM .npz."""
from __future__ import annotations

from stages.crop import CropConfig, run
from stages.progress import console

from .config_command import config_command


@config_command(CropConfig, run)
def report_crop(result: dict, cfg: CropConfig, preset: None) -> None:
    """Write the ADM center crops of an image folder (what `rae encode` encodes) as PNGs and an ADM .npz.

    The originals for rFID: `rae eval RECONSTRUCTIONS --ref CROPS --pairs` scores them pair by pair
    (entry i of both is image i of the sorted listing). Resumable.
    """
    skipped = f", {result['skipped']} unreadable files skipped" if result["skipped"] else ""
    console.print(f"[bold green]done:[/] {result['folder']}: {result['images']} crops {result['image_shape']}"
                  f"{skipped}, {result['npz']}, preview {result['grid']}", highlight=False)
