"""Train the RAE pixel decoder on a latent store: L1 + LPIPS + GAN, noise-augmented latents."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from .common import build_config, user_errors


@user_errors
def train_decoder(
    latents: Path = typer.Option(..., "--latents", help="Latent store from `rae encode` (its source images are read too)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: weights, config.json, metrics, previews, checkpoints."),
    preset: Optional[str] = typer.Option(None, help="Named defaults: imagenet256 | imagenet512 | demo."),
    model: Optional[str] = typer.Option(None, help="Decoder size: vit-b | vit-l | vit-xl (default)."),
    decoder_patch: Optional[int] = typer.Option(None, help="Decoder patch size p_d [16]; 2 x the encoder's upsamples."),
    width: Optional[int] = typer.Option(None, help="Override the size's width (tiny decoders)."),
    depth: Optional[int] = typer.Option(None, help="Override the size's depth."),
    heads: Optional[int] = typer.Option(None, help="Override the size's attention heads."),
    mlp_dim: Optional[int] = typer.Option(None, help="Override the size's MLP hidden width."),
    noise_tau: Optional[float] = typer.Option(None, help="Noise augmentation: sigma ~ tau * U(0, 1) [0.8]."),
    lpips_weight: Optional[float] = typer.Option(None, help="w_L, weight of LPIPS [1.0]; 0 turns it off."),
    gan_weight: Optional[float] = typer.Option(None, help="w_G, weight of the adaptive GAN term [0.75]; 0 turns it off."),
    max_gan_lambda: Optional[float] = typer.Option(None, help="Cap of the adaptive GAN weight lambda [1e4]."),
    lpips_start_epoch: Optional[float] = typer.Option(None, help="LPIPS from this epoch [0]."),
    disc_start_epoch: Optional[float] = typer.Option(None, help="Discriminator updates from this epoch [6]."),
    gan_start_epoch: Optional[float] = typer.Option(None, help="GAN term in the decoder loss from this epoch [8]."),
    lpips_start_step: Optional[int] = typer.Option(None, help="LPIPS from this step (wins over the epoch)."),
    disc_start_step: Optional[int] = typer.Option(None, help="Discriminator updates from this step."),
    gan_start_step: Optional[int] = typer.Option(None, help="GAN term from this step."),
    disc_backbone: Optional[str] = typer.Option(None, help="timm name of the frozen discriminator backbone [DINO ViT-S/8]."),
    disc_weights: Optional[Path] = typer.Option(None, help="Local DINO ViT-S/8 checkpoint (else timm / Hugging Face cache)."),
    lpips_vgg_weights: Optional[Path] = typer.Option(None, help="Local torchvision VGG16 weights (else the torch hub cache)."),
    lpips_lin_weights: Optional[Path] = typer.Option(None, help="Local LPIPS v0.1 vgg.pth (else the lpips package's copy)."),
    random_loss_nets: Optional[bool] = typer.Option(None, "--random-loss-nets", help="Seeded random LPIPS and discriminator weights (demo only)."),
    disc_aug_prob: Optional[float] = typer.Option(None, help="DiffAug probability [1.0]."),
    disc_cutout: Optional[float] = typer.Option(None, help="DiffAug cutout size [0]."),
    epochs: Optional[float] = typer.Option(None, help="Training length in epochs [16]."),
    steps: Optional[int] = typer.Option(None, help="Training length in steps (wins over --epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size, whatever the number of GPUs [512]."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per step and GPU, to save memory [1]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of the decoder [2e-4]."),
    final_lr: Optional[float] = typer.Option(None, help="Learning rate at the end of the cosine decay [2e-5]."),
    disc_lr: Optional[float] = typer.Option(None, help="Peak learning rate of the discriminator heads [2e-4]."),
    disc_final_lr: Optional[float] = typer.Option(None, help="Final learning rate of the discriminator heads [2e-5]."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Linear warm-up from zero, in epochs [1]."),
    warmup_steps: Optional[int] = typer.Option(None, help="Warm-up in steps (wins over --warmup-epochs)."),
    betas: Optional[Tuple[float, float]] = typer.Option(None, help="AdamW betas [0.9 0.95]."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay [0]."),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay of the decoder weights [0.9978]."),
    clip_grad: Optional[float] = typer.Option(None, help="Clip the decoder's gradient norm to this (default off)."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."),
    seed: Optional[int] = typer.Option(None, help="Seed of initialisation, data order, noise and DiffAug [0]."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints [one epoch]."),
    keep_checkpoints: Optional[int] = typer.Option(None, help="Checkpoints kept [2]."),
    preview_every: Optional[int] = typer.Option(None, help="Steps between reconstruction grids [one epoch]."),
    preview_count: Optional[int] = typer.Option(None, help="Fixed store entries shown in the grids [8]."),
    log_every: Optional[int] = typer.Option(None, help="Steps per metrics.jsonl record [10]."),
    stop_after: Optional[int] = typer.Option(None, help="End this invocation after N steps (checkpointed; run again to go on)."),
    num_workers: Optional[int] = typer.Option(None, help="Data loading processes per rank [cores / ranks - 1, at most 8]."),
    device: Optional[str] = typer.Option(None, help="auto | cuda | cpu."),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the transformer blocks and LPIPS."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a run made with another configuration or input."),
):
    """Train the RAE pixel decoder on a latent store: L1 + LPIPS + GAN, noise-augmented latents.

    The encoder never runs: latents come from the store and targets are its source images. Run the
    same command again after an interruption to resume from the latest checkpoint; under
    `torchrun --nproc_per_node N` the global batch is shared by the ranks.
    """
    import os

    from stages.presets import DEMO_NOTE
    from stages.progress import console
    from stages.train_decoder import TrainDecoderConfig, run

    cfg = build_config(TrainDecoderConfig, "train_decoder", preset, latents=latents, out=out, model=model,
                       decoder_patch=decoder_patch, width=width, depth=depth, heads=heads, mlp_dim=mlp_dim,
                       noise_tau=noise_tau, lpips_weight=lpips_weight, gan_weight=gan_weight,
                       max_gan_lambda=max_gan_lambda, lpips_start_epoch=lpips_start_epoch,
                       disc_start_epoch=disc_start_epoch, gan_start_epoch=gan_start_epoch,
                       lpips_start_step=lpips_start_step, disc_start_step=disc_start_step,
                       gan_start_step=gan_start_step, disc_backbone=disc_backbone, disc_weights=disc_weights,
                       lpips_vgg_weights=lpips_vgg_weights, lpips_lin_weights=lpips_lin_weights,
                       random_loss_nets=random_loss_nets, disc_aug_prob=disc_aug_prob, disc_cutout=disc_cutout,
                       epochs=epochs, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, final_lr=final_lr, disc_lr=disc_lr,
                       disc_final_lr=disc_final_lr, warmup_epochs=warmup_epochs, warmup_steps=warmup_steps,
                       betas=tuple(betas) if betas else None, weight_decay=weight_decay, ema_decay=ema_decay,
                       clip_grad=clip_grad, precision=precision, seed=seed, checkpoint_every=checkpoint_every,
                       keep_checkpoints=keep_checkpoints, preview_every=preview_every, preview_count=preview_count,
                       log_every=log_every, stop_after=stop_after, num_workers=num_workers, device=device,
                       compile=compile, overwrite=overwrite)
    result = run(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
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
