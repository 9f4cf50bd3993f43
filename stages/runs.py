"""Loading finished training runs for the stages that use them (sampling, guidance)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import load_weights
from .errors import ArtifactError
from .manifest import read_manifest
from .models.dit import DiT, DiTDH

MODEL_CLASSES = {"DiT": DiT, "DiTDH": DiTDH}


def load_diffusion_run(run_dir: str | os.PathLike, ema: bool = True,
                       device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A complete diffusion run -> (model in eval mode, frozen, on ``device``; info).

    ``ema``: the EMA weights (what the paper samples with) or the raw model's. ``info`` is the
    run's config.json (model class and kwargs, latent_shape, num_classes, null_label, flow
    settings with the training shift, encoder identity, eps) plus ``mean`` / ``var`` [C, h, w]
    float32 tensors (the store's exact statistics: raw = x * sqrt(var + eps) + mean), the
    ``manifest`` and ``run_dir``.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir, kind="diffusion-run", what="diffusion run")
    try:
        info = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {run_dir / 'config.json'}: {e}") from None
    spec = info["model"]
    if spec["class"] not in MODEL_CLASSES:
        raise ArtifactError(f"{run_dir}: unknown model class {spec['class']!r}")
    model = MODEL_CLASSES[spec["class"]](**spec["kwargs"])
    weights = run_dir / ("model_ema.safetensors" if ema else "model.safetensors")
    state = load_weights(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{weights} does not fit {spec['class']}({spec['kwargs']}): "
                            f"{len(missing)} missing, {len(unexpected)} unexpected tensors")
    model = model.to(device).eval().requires_grad_(False)
    stats = load_weights(run_dir / info.get("statistics", "latent_stats.safetensors"))
    info.update(mean=stats["mean"], var=stats["var"], manifest=manifest, run_dir=str(run_dir))
    return model, info
