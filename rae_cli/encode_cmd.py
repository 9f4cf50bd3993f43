"""Encode an image folder (ImageNet layout or flat) into a Zarr latent store with exact statistics."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import build_config, user_errors


@user_errors
def encode(
    data: Path = typer.Argument(..., help="Image folder: one subfolder per class (ImageNet layout) or flat."),
    out: Path = typer.Option(..., "--out", "-o", help="Output latent store (a .zarr directory)."),
    preset: Optional[str] = typer.Option(None, help="Named defaults: imagenet256 | imagenet512 | demo."),
    encoder: Optional[str] = typer.Option(None, help="dinov2-s | dinov2-b (default) | dinov2-l | siglip2-b | mae-b | dinov2-demo"),
    encoder_weights: Optional[Path] = typer.Option(None, help="Local encoder checkpoint (else timm's pretrained weights)."),
    random_init: Optional[bool] = typer.Option(None, "--random-init", help="Random encoder weights from --seed (tests, demos)."),
    seed: Optional[int] = typer.Option(None, help="Seed for --random-init [0]."),
    image_size: Optional[int] = typer.Option(None, help="ADM center-crop size: 256 (default) or 512."),
    flip: Optional[bool] = typer.Option(None, "--flip", help="Also encode each image's horizontal mirror."),
    limit: Optional[int] = typer.Option(None, help="Encode N images, evenly spread over the sorted list."),
    dtype: Optional[str] = typer.Option(None, help="Stored latent dtype: float16 (default) or float32."),
    codec: Optional[str] = typer.Option(None, help="Compressor: blosc-zstd (default) | blosc-lz4 | none."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."),
    resize: Optional[str] = typer.Option(None, help="Where the crop's bicubic step runs: auto (default: gpu on CUDA, else cpu) | gpu (bit-identical to Pillow; half the worker CPU per image) | cpu (Pillow in the loading workers)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per encoder batch [256]."),
    num_workers: Optional[int] = typer.Option(None, help="Image decoding processes [one per core, less two]."),
    block_size: Optional[int] = typer.Option(None, help="Entries per unit of work and resume [1024]."),
    shard_size: Optional[int] = typer.Option(None, help="Entries per Zarr shard file [64]."),
    min_size: Optional[int] = typer.Option(None, help="Skip images whose short side is below this [16]."),
    device: Optional[str] = typer.Option(None, help="auto | cuda | cpu."),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the encoder."),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="Replay full batches as a CUDA graph [on]."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a store made with another configuration."),
):
    """Encode an image folder (ImageNet layout or flat) into a Zarr latent store with exact statistics.

    Run it again after an interruption to resume; under `torchrun --nproc_per_node N` the ranks share
    the work and write one store, identical to a single-process run.
    """
    import os

    from stages.encode import EncodeConfig, run
    from stages.presets import DEMO_NOTE
    from stages.progress import console

    cfg = build_config(EncodeConfig, "encode", preset, data=data, out=out, encoder=encoder,
                       encoder_weights=encoder_weights, random_init=random_init, seed=seed, image_size=image_size,
                       flip=flip, limit=limit, dtype=dtype, codec=codec, precision=precision, resize=resize, batch_size=batch_size,
                       num_workers=num_workers, block_size=block_size, shard_size=shard_size, min_size=min_size,
                       device=device, compile=compile, cuda_graph=cuda_graph, overwrite=overwrite)
    result = run(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
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
