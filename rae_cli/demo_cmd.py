"""Generate the embedded demonstration dataset (procedural shapes and textures, 10 classes)."""
from __future__ import annotations

from pathlib import Path

import typer

from .common import user_errors


@user_errors
def demo_data(out: Path = typer.Argument(..., help="Output folder (one subfolder per class)."),
              per_class: int = typer.Option(40, help="Images per class."),
              size: int = typer.Option(64, help="Image side in pixels."),
              seed: int = typer.Option(0, help="Seed: the same seed gives the same images.")):
    """Generate the embedded demonstration dataset (procedural shapes and textures, 10 classes)."""
    from stages.demo_data import CLASSES, generate
    from stages.progress import console

    generate(out, per_class=per_class, size=size, seed=seed)
    console.print(f"demonstration data: {len(CLASSES)} classes x {per_class} images of {size}x{size} in {out}",
                  highlight=False)
