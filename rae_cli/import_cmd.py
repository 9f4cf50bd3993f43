"""Import the paper's released models (decoder, latent statistics, DiT^DH) as rae runs."""
from __future__ import annotations

from stages.importer import ImportConfig, run
from stages.progress import console

from .config_command import config_command


@config_command(ImportConfig, run)
def report_import(result: dict, cfg: ImportConfig, preset: None) -> None:
    """Import the paper's released models (decoder, latent statistics, DiT^DH) as rae runs.

    The files of Hugging Face `nyu-visionx/RAE-collections` become what `rae train-decoder` and
    `rae train-diffusion` write, for `rae decode` and `rae sample` (also as --guide-model). Files are
    read with torch.load(weights_only=True): tensors only, never code.
    """
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
