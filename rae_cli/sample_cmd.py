"""Sample a trained diffusion run into a sample store of generated latents (raw encoder space)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from .common import build_config, user_errors


@user_errors
def sample(
    model: Path = typer.Option(..., "--model", "-m", help="Diffusion run directory (rae train-diffusion)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output sample store (a .zarr directory)."),
    preset: Optional[str] = typer.Option(None, help="Named defaults: imagenet256 | imagenet512 | demo."),
    per_class: Optional[int] = typer.Option(None, help="Exactly K samples of every class (FID-50K: 50)."),
    num: Optional[int] = typer.Option(None, help="N samples with random labels (seeded)."),
    classes: Optional[List[int]] = typer.Option(None, "--classes", help="Only these class indices (repeat the option)."),
    seed: Optional[int] = typer.Option(None, help="Base seed: sample i starts from the noise of seed + i [0]."),
    solver: Optional[str] = typer.Option(None, help="euler (default) | heun | euler-ref (the authors' sampler: "
                                                   "their 50 time points = --solver euler-ref --steps 49)."),
    steps: Optional[int] = typer.Option(None, help="Solver steps [50] (Heun: 2 model passes per step; 0 = no denoising: the pure-noise baseline)."),
    shift: Optional[float] = typer.Option(None, help="Time shift [the one the run was trained with]."),
    guidance: Optional[str] = typer.Option(None, help="none (default) | cfg | autoguidance."),
    cfg_scale: Optional[float] = typer.Option(None, help="Classifier-free guidance scale [1.0 = none]."),
    guide_model: Optional[Path] = typer.Option(None, help="AutoGuidance: the guiding (smaller/earlier) diffusion run."),
    ag_scale: Optional[float] = typer.Option(None, help="AutoGuidance scale [1.42, the paper's with DiT^DH-S]."),
    guidance_interval: Optional[Tuple[float, float]] = typer.Option(
        None, help="Guide only for t in [T_MIN, T_MAX] (model time, t = 1 is noise) [0 1]."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="EMA weights (default) or raw weights."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."),
    dtype: Optional[str] = typer.Option(None, help="Stored latent dtype: float16 (default) or float32."),
    block_size: Optional[int] = typer.Option(None, help="Samples per unit of work and resume [1024]."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per model batch [256]."),
    device: Optional[str] = typer.Option(None, help="auto | cuda | cpu."),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the model(s)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a store made with other settings."),
):
    """Sample a trained diffusion run into a sample store of generated latents (raw encoder space).

    Each sample's noise comes from its own seed, so the store is the same at any batch size and on
    any number of GPUs (`torchrun --nproc_per_node N`). Run it again after an interruption to resume.
    Decode the store with `rae decode`.
    """
    import os

    from stages.progress import console
    from stages.sample import SampleConfig, run

    cfg = build_config(SampleConfig, "sample", preset, model=model, out=out, per_class=per_class, num=num,
                       classes=list(classes) if classes else None, seed=seed, solver=solver, steps=steps,
                       shift=shift, guidance=guidance, cfg_scale=cfg_scale, guide_model=guide_model,
                       ag_scale=ag_scale, guidance_interval=guidance_interval, ema=ema, precision=precision,
                       dtype=dtype, block_size=block_size, batch_size=batch_size, device=device,
                       compile=compile, overwrite=overwrite)
    if num is not None and per_class is None:
        cfg.per_class = None  # --num replaces a preset's --per-class
    result = run(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
    s = result["sampling"]
    speed = f", {result['images_per_second']:,.2f} img/s" if "images_per_second" in result else ""
    console.print(f"[bold green]done:[/] {result['store']}: {result['entries']} samples {result['latent_shape']}, "
                  f"{s['solver']} {s['steps']} steps, guidance {s['guidance']} (scale {s['scale']}){speed}",
                  highlight=False)
