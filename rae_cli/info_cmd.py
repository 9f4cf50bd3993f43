"""Describe any rae artifact (latent store, run, sample store, image folder) from its manifest."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import user_errors


@user_errors
def info(path: Path = typer.Argument(..., help="An artifact directory."),
         as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON.")):
    """Describe any rae artifact (latent store, run, sample store, image folder) from its manifest."""
    from rich.console import Console
    from rich.table import Table

    from stages.artifacts.manifest import RECORDS, changed_files, read_manifest

    manifest = read_manifest(path, require_complete=False, what="artifact")
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    table = Table(show_header=False, title=f"{path}", title_justify="left")
    table.add_row("kind", manifest["kind"])
    table.add_row("complete", "yes" if manifest.get("complete") else "[red]no (interrupted: run its command again)[/]")
    for key in ("num_entries", "num_valid", "num_images", "latent_shape", "num_samples", "steps", "content_id", "created"):
        if key in manifest:
            table.add_row(key.replace("_", " "), str(manifest[key]))
    if "encoder" in manifest:
        e = manifest["encoder"]
        table.add_row("encoder", f"{e['name']} ({e['timm_name']}, input {e['input_size']}, patch {e['patch_size']}, "
                                 f"width {e['width']}, weights sha256 {str(e.get('weights_sha256'))[:16]}…"
                                 + ("" if e.get("pretrained", True) else ", RANDOM weights") + ")")
    if manifest.get("class_names"):
        names = manifest["class_names"]
        table.add_row("classes", f"{len(names)}: " + ", ".join(names[:8]) + (" …" if len(names) > 8 else ""))
    if manifest.get(RECORDS):
        changed = changed_files(path, manifest)
        table.add_row("files", f"{len(manifest[RECORDS])}, as written" if not changed else
                      "[red]changed since written: " + "; ".join(f"{n} ({why})" for n, why in changed)
                      + " — the content id no longer describes them[/]")
    if manifest["kind"] in ("decoder-run", "diffusion-run"):
        from stages.artifacts.runs import phema_snapshots, saved_steps  # (imports torch: only for runs)

        kept = saved_steps(path)
        for what, steps in kept.items():
            if steps:
                table.add_row(what, f"steps {', '.join(map(str, steps))} (`--step N` of sample / decode)")
        profiles = phema_snapshots(path)
        if profiles:
            stds = sorted({std for _, std, _ in profiles})
            steps = sorted({step for step, _, _ in profiles})
            table.add_row("post-hoc EMA", f"std {', '.join(f'{v:g}' for v in stds)} at steps {', '.join(map(str, steps))}"
                                          " (`rae ema RUN --std S [--step N]`)")
    if manifest.get("posthoc_ema"):
        p = manifest["posthoc_ema"]
        table.add_row("made by rae ema", f"std {p['std']:g} at step {p['step']} from {p['snapshots']} snapshots, "
                                         f"relative residual {p['relative_residual']:.2e}")
    if manifest.get("skipped_files"):
        table.add_row("skipped files", str(len(manifest["skipped_files"])))
    for name, ref in manifest.get("inputs", {}).items():
        table.add_row(f"input {name}", f"{ref.get('path')} ({ref.get('kind')})")
    table.add_row("config", json.dumps(manifest.get("config", {}), indent=1))
    Console().print(table)
