"""Train a DiT / DiT^DH with flow matching on a latent store."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import build_config, user_errors


@user_errors
def train_diffusion(
    latents: Path = typer.Option(..., "--latents", help="Latent store made by `rae encode` (must be complete)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (created, or resumed when it exists)."),
    preset: Optional[str] = typer.Option(None, help="Named defaults: imagenet256 | demo."),
    model: Optional[str] = typer.Option(None, help="dit-s | dit-b | dit-l | dit-xl | ditdh-s | ditdh-b | ditdh-xl (default)."),
    width: Optional[int] = typer.Option(None, help="Override the (trunk) width."),
    depth: Optional[int] = typer.Option(None, help="Override the (trunk) depth."),
    num_heads: Optional[int] = typer.Option(None, help="Override the (trunk) number of heads."),
    head_width: Optional[int] = typer.Option(None, help="DiT^DH: override the head width [2048]."),
    head_depth: Optional[int] = typer.Option(None, help="DiT^DH: override the head depth [2]."),
    head_num_heads: Optional[int] = typer.Option(None, help="DiT^DH: override the head's number of heads [16]."),
    time_dist: Optional[str] = typer.Option(None, help="Training time distribution: logit_normal (default) | uniform."),
    t_mean: Optional[float] = typer.Option(None, help="Logit-normal mean [0]."),
    t_std: Optional[float] = typer.Option(None, help="Logit-normal standard deviation [1]."),
    shift: Optional[float] = typer.Option(None, help="Time shift a (default: sqrt(C*h*w / shift-base), sqrt(48) for [768, 16, 16] latents)."),
    shift_base: Optional[int] = typer.Option(None, help="Base dimension n of the shift a = sqrt(m / n) [4096]."),
    no_shift: bool = typer.Option(False, "--no-shift", help="No time shift (a = 1), for ablations."),
    label_dropout: Optional[float] = typer.Option(None, help="Probability of training a label as the null class [0.1]."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size, for any number of GPUs [1024]."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per step and GPU, to save memory [1]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [2e-4]."),
    final_lr: Optional[float] = typer.Option(None, help="Learning rate at the end of the decay [2e-5]."),
    beta1: Optional[float] = typer.Option(None, help="AdamW beta1 [0.9]."),
    beta2: Optional[float] = typer.Option(None, help="AdamW beta2 [0.95]."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay [0]."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Epochs before the decay starts [40]."),
    decay_end_epoch: Optional[float] = typer.Option(None, help="Epoch where the learning rate reaches --final-lr [800]."),
    warmup_steps: Optional[int] = typer.Option(None, help="Warm-up length in steps (instead of epochs)."),
    decay_end_step: Optional[int] = typer.Option(None, help="End of the decay in steps (instead of epochs)."),
    warmup_from_zero: Optional[bool] = typer.Option(None, "--warmup-from-zero", help="Ramp the learning rate up from 0 during warm-up (the released config holds it constant)."),
    grad_clip: Optional[float] = typer.Option(None, help="Gradient norm clipping (0: none) [1.0]."),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay per step [0.9995]."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."),
    seed: Optional[int] = typer.Option(None, help="Seed of the initial weights, the data order and every draw [0]."),
    epochs: Optional[float] = typer.Option(None, help="Training length in epochs [800]."),
    steps: Optional[int] = typer.Option(None, help="Training length in steps (wins over --epochs)."),
    grad_checkpointing: Optional[int] = typer.Option(None, help="Recompute the activations of the first N blocks in the backward pass to save memory (-1: all) [0]."),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the model."),
    log_every: Optional[int] = typer.Option(None, help="Steps between metrics.jsonl records [100]."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints [5000]."),
    keep_checkpoints: Optional[int] = typer.Option(None, help="Checkpoints kept on disk [2]."),
    sample_every: Optional[int] = typer.Option(None, help="Steps between EMA latent samples in RUN/samples (0: only at the end) [10000]."),
    num_samples: Optional[int] = typer.Option(None, help="EMA samples each time [8]."),
    sample_steps: Optional[int] = typer.Option(None, help="Euler steps of those samples [50]."),
    num_workers: Optional[int] = typer.Option(None, help="Data loading processes per GPU (default: the CPU cores per GPU, less one)."),
    device: Optional[str] = typer.Option(None, help="auto | cuda | cpu."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a run made with another configuration."),
):
    """Train a DiT / DiT^DH with flow matching on a latent store.

    Defaults are the paper's DiT^DH-XL recipe. Run the same command again to resume after an
    interruption; under `torchrun --nproc_per_node N` the global batch stays --batch-size.
    """
    import os

    from stages.presets import DEMO_NOTE
    from stages.progress import console
    from stages.train_diffusion import TrainDiffusionConfig, run

    cfg = build_config(TrainDiffusionConfig, "train_diffusion", preset, latents=latents, out=out, model=model,
                       width=width, depth=depth, num_heads=num_heads, head_width=head_width, head_depth=head_depth,
                       head_num_heads=head_num_heads, time_dist=time_dist, t_mean=t_mean, t_std=t_std, shift=shift,
                       shift_base=shift_base, use_shift=False if no_shift else None, label_dropout=label_dropout,
                       batch_size=batch_size, grad_accum=grad_accum, lr=lr, final_lr=final_lr, beta1=beta1,
                       beta2=beta2, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                       decay_end_epoch=decay_end_epoch, warmup_steps=warmup_steps, decay_end_step=decay_end_step,
                       warmup_from_zero=warmup_from_zero, grad_clip=grad_clip, ema_decay=ema_decay,
                       precision=precision, seed=seed, epochs=epochs, steps=steps,
                       grad_checkpointing=grad_checkpointing, compile=compile, log_every=log_every,
                       checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                       sample_every=sample_every, num_samples=num_samples, sample_steps=sample_steps,
                       num_workers=num_workers, device=device, overwrite=overwrite)
    result = run(cfg)
    if os.environ.get("RANK", "0") != "0":
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
