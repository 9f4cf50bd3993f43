"""Train a DiT / DiT^DH with flow matching on a latent store."""
from __future__ import annotations

from stages.presets import DEMO_NOTE
from stages.progress import console
from stages.train.config import TrainDiffusionConfig
from stages.train.diffusion import run

from .config_command import config_command


@config_command(TrainDiffusionConfig, run, "train_diffusion")
def report_train_diffusion(result: dict, cfg: TrainDiffusionConfig, preset: str | None) -> None:
    """Train a DiT / DiT^DH with flow matching on a latent store.

    Defaults are the paper's DiT^DH-XL recipe. Run the same command again to resume after an
    interruption; under `torchrun --nproc_per_node N` the global batch stays --batch-size.
    """
    if not result.get("complete", True):
        speed = f", {result['images_per_second']:,.0f} img/s" if result.get("steps_run") else ""
        console.print(f"stopped at step {result['step']}/{result['steps']}{speed}: run the same command again to go on",
                      highlight=False)
        return
    c, h, w = result["latent_shape"]
    loss = ""
    if result.get("final_loss") is not None:
        loss = f", loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}"
    speed = f", {result['images_per_second']:,.0f} img/s" if result.get("steps_run") else ""
    console.print(f"[bold green]done:[/] {result['run']}: {result['model']} on [{c}, {h}, {w}] latents, "
                  f"{result['step']} steps{loss}{speed}", highlight=False)
    if result.get("warning"):
        console.print(f"[bold red]{result['warning']}[/]", highlight=False)
    if preset == "demo":
        console.print(f"[yellow]note:[/] {DEMO_NOTE}", highlight=False)
