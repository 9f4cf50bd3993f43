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
    from stages.demo.data import CLASSES, generate
    from stages.progress import console

    generate(out, per_class=per_class, size=size, seed=seed)
    console.print(f"demonstration data: {len(CLASSES)} classes x {per_class} images of {size}x{size} in {out}",
                  highlight=False)


@user_errors
def demo_report(out: Path = typer.Argument(..., help="The demo output folder of `make all`.")):
    """Evaluate the demonstration chain against its pure-noise baselines and show where to look."""
    from rich.table import Table

    from stages.demo.report import run
    from stages.progress import console

    report = run(out)
    table = Table(title="rae demonstration: results", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in report["rows"]:
        table.add_row(name, f"{value:.3f}")
    console.print(table)
    for what, path in report["pictures"]:
        console.print(f"  {what}: {path}", highlight=False)
    verdict = ("[green]samples are far closer to the data than decoded noise, and reconstructions beat the noise "
               "baseline[/]" if report["ok"] else "[red]the demo models did not beat the noise baselines clearly[/]")
    console.print(verdict)
    console.print(f"[yellow]note:[/] {report['note']}", highlight=False)
