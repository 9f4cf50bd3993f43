"""``rae ema``: a diffusion run trained with ``--phema`` -> a new diffusion run whose EMA weights are the
post-hoc EMA of any relative standard deviation (``stages.train.phema``: EDM2's reconstruction from
the snapshots of the tracked profiles), as it would have been at any snapshot step. The new run is
what ``rae sample`` and ``rae eval --model`` take as they are: the source's config.json (with what
was reconstructed, from which snapshots, and how well) and statistics, and model_ema.safetensors.

The weights are combined tensor by tensor in float64 from the snapshot files (memory: one tensor
of each at a time, plus the result), and everything is checked before the output is touched.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts.atomic import jsonable
from .artifacts.manifest import claim_output, create_artifact_dir, digest_json, input_ref, new_manifest, read_manifest, verify_files
from .artifacts.outputs import stage
from .artifacts.runs import DIFFUSION_EMA, STATS, finish_run, phema_snapshots, read_config
from .errors import ArtifactError
from .options import check_options, option
from .progress import console, progress
from .train.phema import MAX_STD, exponent_of, solve

POOR_FIT = 0.05  # a relative residual above this is reported as a poor reconstruction


@dataclass
class EmaConfig:
    run: str = option(help="A diffusion run trained with --phema (finished, or still training: its snapshots).",
                      path=True, argument=True)
    out: str = option(help="The new diffusion run.", short="-o", path=True)
    std: float = option(help="Relative standard deviation of the EMA to make (EDM2 finds its best between 0.05 "
                        "and 0.20; the recipe's EMA 0.9995 at batch 1024 is about 0.0003 of an 800-epoch run).",
                        check=(lambda v: 0 < v <= MAX_STD, f"in (0, {MAX_STD}]"))
    step: int | None = option(None, "The EMA as it was at this step (default: the last snapshot's); only the "
                              "snapshots up to it are used.", check=(lambda v: v >= 1, "at least 1"))
    overwrite: bool = option(False, "Replace an existing output.")


def _snapshots(cfg: EmaConfig) -> tuple[list[tuple[int, float, Path]], int]:
    found = phema_snapshots(cfg.run)
    if not found:
        raise ArtifactError(f"{cfg.run} has no post-hoc EMA snapshots: train it with --phema 0.05,0.10 "
                            "--snapshot-every N")
    step = cfg.step if cfg.step is not None else max(s for s, _, _ in found)
    used = [f for f in found if f[0] <= step]
    if not used:
        raise ArtifactError(f"{cfg.run} has no post-hoc EMA snapshot at or before step {step} (the first is at step "
                            f"{found[0][0]})")
    return used, step


def _gamma(path: Path, std: float) -> float:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return float(meta["gamma"]) if "gamma" in meta else exponent_of(std)


def combine(paths: list[Path], coefficients: np.ndarray) -> dict[str, torch.Tensor]:
    """sum_i coefficients[i] * weights of paths[i], tensor by tensor in float64, as float32."""
    from safetensors import safe_open

    files = [safe_open(str(p), framework="pt") for p in paths]
    keys = list(files[0].keys())
    for p, f in zip(paths, files):
        if set(f.keys()) != set(keys):
            raise ArtifactError(f"{p} does not hold the same tensors as {paths[0]}: the snapshots are not of one model")
    out = {}
    with progress(len(keys), "rae ema", unit="tensor") as advance:
        for key in keys:
            acc = None
            for c, f in zip(coefficients.tolist(), files):
                t = f.get_tensor(key).double() * c
                acc = t if acc is None else acc.add_(t)
            out[key] = acc.float()
            advance(1)
    return out


@stage
def run(cfg: EmaConfig) -> dict:
    check_options(cfg)
    source = Path(cfg.run)
    manifest = read_manifest(source, kind="diffusion-run", what="diffusion run", require_complete=False)
    if manifest.get("complete"):
        verify_files(source, manifest)
    snaps, step = _snapshots(cfg)
    gammas = [_gamma(p, std) for _, std, p in snaps]
    fit = solve([s for s, _, _ in snaps], gammas, step, cfg.std)
    config = read_config(source)
    stds = sorted({std for _, std, _ in snaps})
    record = {"std": cfg.std, "gamma": fit.gamma, "step": step, "from_stds": stds, "snapshots": len(snaps),
              "relative_residual": fit.residual,
              "method": "EDM2 post-hoc EMA: least squares over the exact discrete power-function profiles"}
    if fit.residual > POOR_FIT:
        console.print(f"[yellow]warning:[/] the snapshots give this profile only roughly (relative residual "
                      f"{fit.residual:.3f}): a std far outside {', '.join(f'{s:g}' for s in stds)}, or too few snapshots "
                      f"before step {step}", highlight=False)

    out = Path(cfg.out)
    identity = digest_json({"config": jsonable(cfg) | {"out": None, "overwrite": None},
                            "snapshots": [(s, std) for s, std, _ in snaps], "run": manifest.get("identity")})

    def reuse(old: dict) -> str | None:
        if old.get("kind") == "diffusion-run" and old.get("identity") == identity:
            return "done" if old.get("complete") else "replace"
        return None

    state = claim_output(out, cfg.overwrite, reuse,
                         different=lambda old: f"{out} already holds another {old.get('kind')}; pass --overwrite "
                                               "to replace it, or choose another --out",
                         foreign=f"{out} exists and is not a rae artifact; choose another --out")
    if state == "done":
        console.print(f"{out} already holds this reconstruction; nothing to do.", highlight=False)
        return {"run": str(out), **record}
    weights = combine([p for _, _, p in snaps], fit.coefficients)
    new = new_manifest("diffusion-run", cfg, inputs={"run": input_ref(source, manifest)}, identity=identity,
                       posthoc_ema=record, step=step, total_steps=step,
                       **{k: manifest.get(k) for k in ("encoder", "latent_shape", "num_classes", "class_names",
                                                       "warnings")})

    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        shutil.copyfile(source / STATS, folder / STATS)  # the same bytes: the same normalisation
        finish_run(folder, new, {DIFFUSION_EMA: weights}, {**config, "posthoc_ema": record}, DIFFUSION_EMA,
                   also=(STATS,))

    create_artifact_dir(out, build)
    return {"run": str(out), **record}
