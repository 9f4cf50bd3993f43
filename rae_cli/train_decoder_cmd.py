"""Train the RAE pixel decoder on a latent store: L1 + LPIPS + GAN, noise-augmented latents."""
from __future__ import annotations

from stages.presets import DEMO_NOTE
from stages.progress import console
from stages.train.config import TrainDecoderConfig
from stages.train.decoder import run

from .config_command import config_command


@config_command(TrainDecoderConfig, run, "train_decoder")
def report_train_decoder(result: dict, cfg: TrainDecoderConfig, preset: str | None) -> None:
    """Train the RAE pixel decoder on a latent store: L1 + LPIPS + GAN, noise-augmented latents.

    The encoder never runs: latents come from the store and targets are its source images. Run the
    same command again after an interruption to resume from the latest checkpoint; under
    `torchrun --nproc_per_node N` the global batch is shared by the ranks.
    """
    speed = f", {result['images_per_second']:,.0f} img/s" if result.get("images_per_second") else ""
    if result["complete"]:
        final = result.get("final_metrics", {})
        losses = " ".join(f"{k}={final[k]:.4g}" for k in ("l1", "lpips", "gan", "d_loss") if k in final)
        console.print(f"[bold green]done:[/] {result['run']}: {result['steps']} steps{speed}; EMA decoder "
                      f"{result['weights']} ({losses})", highlight=False)
    else:
        console.print(f"stopped at step {result['step']}/{result['steps']}{speed}: run the same command again to go on",
                      highlight=False)
    if preset == "demo" or cfg.random_loss_nets:
        console.print("[yellow]note:[/] LPIPS and the discriminator had random weights (--random-loss-nets): "
                      "not a real RAE decoder.", highlight=False)
    if preset == "demo":
        console.print(f"[yellow]note:[/] {DEMO_NOTE}", highlight=False)
