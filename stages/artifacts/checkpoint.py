"""Training checkpoints and weights as safetensors: loading a file never runs code from it.

A checkpoint is any nested structure of dicts, lists, numbers, strings and tensors (model and EMA
weights, optimiser states, the data position). Tensors go into the safetensors body; the structure
goes into its JSON metadata with tensors replaced by references. Writes are atomic (temporary file,
fsync, rename): a checkpoint file is complete once it exists, so the newest is simply the highest
step, and a crash while writing leaves the previous one intact.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ArtifactError
from .atomic import atomic_replace

_REF = "__tensor__"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_REF: key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _flatten(torch.from_numpy(np.ascontiguousarray(obj)), tensors, prefix)}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k))] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _key(k):
    return {"int": k} if isinstance(k, int) else k


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _REF in obj:
            return tensors[obj[_REF]]
        if "__ndarray__" in obj:
            return _unflatten(obj["__ndarray__"], tensors).numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {(k["int"] if isinstance(k, dict) else k): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | os.PathLike, state: Any, metadata: dict | None = None) -> None:
    """Write a nested state to one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, "")
    # safetensors refuses tensors that share memory; checkpoints are small enough to copy.
    tensors = {k: v.clone() if v.numel() else v for k, v in tensors.items()}
    meta = {"rae_state": json.dumps(skeleton), **{k: str(v) for k, v in (metadata or {}).items()}}
    with atomic_replace(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ArtifactError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if "rae_state" not in meta:
        raise ArtifactError(f"{path} is not a rae checkpoint")
    return _unflatten(json.loads(meta["rae_state"]), tensors)


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Plain model weights (what later stages load), atomically, as a flat safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_replace(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as e:
        raise ArtifactError(f"cannot read weights {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ---- run directories: checkpoints/step_XXXXXXXX.safetensors (the newest is the highest step) -------
_STEP = re.compile(r"step_(\d+)\.safetensors$")


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: Any, keep: int = 2) -> Path:
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.safetensors"
    save_state(path, state, metadata={"step": step})
    done = sorted((p for p in folder.iterdir() if _STEP.search(p.name)), key=lambda p: p.name)
    for old in done[:-keep] if keep > 0 else []:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def step_of(path: Path) -> int:
    return int(_STEP.search(path.name).group(1))


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint files of ``run_dir``, newest (highest step) first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step_*.safetensors") if _STEP.search(p.name)),
                  key=lambda p: int(_STEP.search(p.name).group(1)), reverse=True)


def load_latest(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(path, state, skipped)`` of the newest readable checkpoint of ``run_dir``, or None if there
    is none. Checkpoint files are complete once they exist (atomic rename), so the newest is tried
    first; one that cannot be read (a disk error, a copy cut short) is skipped for the one before it
    and listed in ``skipped`` as (path, reason), so the caller can say so. None readable: the error."""
    folder = Path(run_dir) / "checkpoints"
    skipped = []
    for path in checkpoints(run_dir):
        try:
            return path, load_state(path, device), skipped
        except ArtifactError as e:
            skipped.append((path, str(e)))
    if skipped:
        raise ArtifactError(f"no readable checkpoint in {folder}: {skipped[0][1]}; remove the folder to start again")
    return None


def resume_state(run_dir: str | os.PathLike, say=None):
    """``(path, state)`` of the checkpoint a run resumes from (``load_latest``), or None; each
    unreadable newer checkpoint is reported through ``say`` (a print function) as one line."""
    found = load_latest(run_dir)
    if found is None:
        return None
    path, state, skipped = found
    for bad, why in skipped:
        if say is not None:
            say(f"warning: skipping checkpoint {bad.name}, which cannot be read ({why}); resuming from {path.name}")
    return path, state
