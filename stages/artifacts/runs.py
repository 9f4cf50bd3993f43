"""The two run formats, written and read here only: a decoder run and a diffusion run.

A decoder run (``rae train-decoder``, ``rae import decoder``) holds the decoder's weights
(``decoder_ema.safetensors``, ``decoder.safetensors``) and ``config.json``: the ``ViTDecoder``
keyword arguments and the encoder identity, what ``rae decode`` rebuilds and checks its input with.

A diffusion run (``rae train-diffusion``, ``rae import diffusion``) holds the model's weights
(``model_ema.safetensors``, ``model.safetensors``), ``latent_stats.safetensors`` (the store's exact
mean / var [C, h, w]: the model works on (z - mean) / sqrt(var + eps), and sampling must undo that
same normalisation) and ``config.json``: the model class and keyword arguments, the latent shape,
the classes with the null label, the flow settings with the training shift, and the encoder.

Both carry a ``manifest.json`` (``stages.artifacts.manifest``) that says ``"complete": true`` last.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import flow
from ..digests import sha256_file
from ..errors import ArtifactError
from ..models.decoder import DECODER_SIZES, ViTDecoder
from ..models.dit import DiT, DiTDH
from ..models.encoders import UNKNOWN_DIGEST
from ..progress import console
from .atomic import atomic_write_json
from .checkpoint import checkpoints, load_state, load_weights, save_weights, step_of
from .manifest import RECORDS, file_records, read_manifest, verify_files, write_manifest

CONFIG = "config.json"
STATS = "latent_stats.safetensors"
DECODER_EMA, DECODER_RAW = "decoder_ema.safetensors", "decoder.safetensors"
DIFFUSION_EMA, DIFFUSION_RAW = "model_ema.safetensors", "model.safetensors"
NORM_EPS = 1e-5
# What a finished run's manifest records (``manifest.file_records``) and every load checks.
DECODER_FILES = (DECODER_EMA, DECODER_RAW, CONFIG, STATS)
DIFFUSION_FILES = (DIFFUSION_EMA, DIFFUSION_RAW, CONFIG, STATS)
MODEL_CLASSES = {"DiT": DiT, "DiTDH": DiTDH}


SNAPSHOTS = "snapshots"  # EMA weights kept for good at --snapshot-every steps (never rotated away)


def snapshot_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"ema_{step:08d}.safetensors"


def save_snapshot(run_dir: str | os.PathLike, step: int, ema_state: dict[str, torch.Tensor]) -> None:
    path = snapshot_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, ema_state, metadata={"step": step})


def phema_snapshot_path(run_dir: str | os.PathLike, step: int, std: float) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"phema_std{std:.4f}_{step:08d}.safetensors"


def save_phema_snapshots(run_dir: str | os.PathLike, step: int, stds, gammas, states) -> None:
    """``--phema``: each tracked power-function EMA as it is after ``step`` steps (with its std and exponent)."""
    for std, gamma, state in zip(stds, gammas, states):
        path = phema_snapshot_path(run_dir, step, std)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(path, state, metadata={"step": step, "std": repr(float(std)), "gamma": repr(float(gamma))})


def phema_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, float, Path]]:
    """A run's post-hoc EMA snapshots as (step, std, path), by step then std."""
    found = []
    for p in (Path(run_dir) / SNAPSHOTS).glob("phema_std*_*.safetensors"):
        std, _, step = p.stem[len("phema_std"):].partition("_")
        try:
            found.append((int(step), float(std), p))
        except ValueError:
            continue
    return sorted(found, key=lambda x: (x[0], x[1]))


def saved_steps(run_dir: str | os.PathLike) -> dict[str, list[int]]:
    """The steps whose weights a run keeps: {"snapshots": [...], "checkpoints": [...]}, ascending."""
    snaps = sorted(int(p.stem.split("_")[1]) for p in (Path(run_dir) / SNAPSHOTS).glob("ema_*.safetensors")
                   if p.stem.split("_")[1].isdigit())
    return {"snapshots": snaps, "checkpoints": sorted(step_of(p) for p in checkpoints(run_dir))}


def weights_at_step(run_dir: str | os.PathLike, step: int, ema: bool, pick) -> tuple[dict, Path]:
    """A run's weights as they were at ``step``: its snapshot (EMA weights), else its kept checkpoint
    (``pick(state, ema)`` takes the weights out of a training state). One line naming the steps there
    are when there are none of ``step``."""
    snap = snapshot_path(run_dir, step)
    if ema and snap.is_file():
        return load_weights(snap), snap
    ckpt = Path(run_dir) / "checkpoints" / f"step_{step:08d}.safetensors"
    if ckpt.is_file():
        return pick(load_state(ckpt), ema), ckpt
    have = saved_steps(run_dir)
    raise ArtifactError(f"{run_dir} keeps no weights of step {step}: snapshots at steps {have['snapshots'] or 'none'}, "
                        f"checkpoints at {have['checkpoints'] or 'none'} (train with --snapshot-every to keep more)")


def finish_run(out: Path, manifest: dict, files: dict[str, dict[str, torch.Tensor]], config: dict,
               content_file: str, also: tuple[str, ...] = ()) -> None:
    """A run made in one go (``rae import``, ``rae ema``): its files, each written atomically, between an
    unfinished manifest and a complete one that records them (and the files ``also`` there)."""
    write_manifest(out, manifest)
    for name, tensors in files.items():
        save_weights(out / name, tensors)
    write_config(out, config)
    records = file_records(out, [*files, *also, CONFIG])
    manifest.update(content_id=records[content_file]["sha256"], complete=True)
    manifest[RECORDS] = records
    write_manifest(out, manifest)


def write_config(run_dir: str | os.PathLike, config: dict) -> None:
    atomic_write_json(Path(run_dir) / CONFIG, config)


def read_config(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None


#################################################################################
#                                 Decoder runs                                  #
#################################################################################

def decoder_config(arch: dict, size_name: str | None, encoder: dict, latent_shape, **extra) -> dict:
    """config.json of a decoder run: ``arch`` (``ViTDecoder`` keyword arguments), the named size it
    is (or None), the encoder whose raw latents it decodes, and ``extra`` fields of the maker."""
    return {"architecture": "ViTDecoder", "model": size_name, "decoder": arch,
            "image_size": arch["grid"] * arch["patch_size"], "weights": DECODER_EMA, "encoder": encoder,
            "latent_shape": latent_shape, "latent_space": "raw encoder space (as stored; not normalised)", **extra}


def _decoder_kwargs(config: dict) -> dict:
    """ViTDecoder constructor kwargs from a decoder run's config.json: the exact kwargs (under
    "decoder", "architecture" or "model", directly or as "kwargs"), or a named size plus the rest."""
    for key in ("decoder", "architecture", "model"):
        spec = config.get(key)
        if not isinstance(spec, dict):
            continue
        if isinstance(spec.get("kwargs"), dict):
            return dict(spec["kwargs"])
        if "in_dim" in spec and "size" not in spec:
            return dict(spec)
        if spec.get("size") in DECODER_SIZES:
            return {**DECODER_SIZES[spec["size"]], **{k: v for k, v in spec.items() if k != "size"}}
    raise ArtifactError("the decoder run's config.json has no decoder architecture (ViTDecoder keyword arguments)")


def load_decoder_run(run_dir: str | os.PathLike, device="cpu", ema: bool = True,
                     step: int | None = None) -> tuple[nn.Module, dict]:
    """A complete decoder run -> (ViTDecoder in eval mode on ``device``, info); with ``step``, the
    weights of that step (a snapshot or a kept checkpoint), from a finished run or one still training.

    info: {"encoder": identity dict, "latent_shape": [C, h, w], "image_size": int, "config": config.json,
    "manifest": manifest.json, "content_id": what identifies the weights used}.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir, kind="decoder-run", what="decoder run", require_complete=step is None)
    verify_files(run_dir, manifest)
    config = read_config(run_dir)
    decoder = ViTDecoder(**_decoder_kwargs(config))
    content_id = manifest.get("content_id")
    if step is not None:
        state, weights = weights_at_step(run_dir, step, ema, lambda s, e: s["training"]["ema" if e else "decoder"])
        content_id = sha256_file(weights)
    else:
        weights = run_dir / (DECODER_EMA if ema else DECODER_RAW)
        if not weights.is_file():
            raise ArtifactError(f"{run_dir} has no {weights.name}")
        state = load_weights(weights)
    try:
        decoder.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{weights} does not fit its config.json: {str(e).splitlines()[0]}") from None
    encoder = manifest.get("encoder") or config.get("encoder") or {}
    latent_shape = manifest.get("latent_shape") or config.get("latent_shape") or [decoder.in_dim, decoder.grid, decoder.grid]
    info = {"encoder": encoder, "latent_shape": list(latent_shape), "image_size": decoder.image_size,
            "config": config, "manifest": manifest, "content_id": content_id}
    return decoder.to(device).eval(), info


def check_compatible(store_encoder: dict, store_shape, decoder_info: dict, decoder_path) -> None:
    """Refuse a decoder trained for another encoder (name, weights sha256, latent shape)."""
    dec = decoder_info["encoder"]
    for key, what in (("name", "encoder"), ("weights_sha256", "encoder weights")):
        if key == "weights_sha256" and UNKNOWN_DIGEST in (store_encoder.get(key), dec.get(key)):
            # an imported run whose encoder file was not at hand (`rae import` without --encoder-weights)
            console.print(f"note: the encoder weights of {decoder_path} or of the store are not identified "
                          f"(sha256 unknown); assuming they are the same {dec.get('name')} weights")
            continue
        if store_encoder.get(key) != dec.get(key):
            a, b = str(store_encoder.get(key)), str(dec.get(key))
            raise ArtifactError(f"decoder {decoder_path} was trained for another {what} ({b[:16]}) than the store's ({a[:16]})")
    if list(store_shape) != list(decoder_info["latent_shape"]):
        raise ArtifactError(f"decoder {decoder_path} expects latents {decoder_info['latent_shape']}, the store has {list(store_shape)}")


#################################################################################
#                                Diffusion runs                                 #
#################################################################################

def start_from(state: dict[str, torch.Tensor], models, source, what: str, hint: str) -> None:
    """``--init``: copy a run's weights ``state`` into each of ``models`` (a trainer's model and its
    EMA); one line naming the first tensor that does not fit ``what`` otherwise."""
    try:
        for model in models:
            model.load_state_dict(state)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).splitlines()[0])
        raise ArtifactError(f"--init {source} does not fit this {what} ({first}); give a run of the same "
                            f"architecture ({hint})") from None


def normalize(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Raw encoder latents -> the diffusion model's space: (z - mean) / sqrt(var + eps)."""
    return (z - mean) / torch.sqrt(var + eps)


def denormalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    return x * torch.sqrt(var + eps) + mean


def training_shift(latent_shape, shift: float | None = None, base: int = 4096) -> float:
    """The time shift a run trains with: ``shift`` when given, else the paper's a = sqrt(C*h*w / base)."""
    return shift if shift is not None else flow.default_shift(latent_shape, base)


def diffusion_config(model_class: str, model_kwargs: dict, preset: str | None, latent_shape, class_names: list,
                     shift: float, encoder: dict | None, time_dist: str = "logit_normal", t_mean: float = 0.0,
                     t_std: float = 1.0, image_size: int | None = None, **extra) -> dict:
    """config.json of a diffusion run: how to rebuild its model, its classes (label ``num_classes``
    is the null class), its flow settings and its encoder; ``extra`` fields of the maker last."""
    num_classes = model_kwargs["num_classes"]
    return {"model": {"preset": preset, "class": model_class, "kwargs": model_kwargs},
            "latent_shape": list(latent_shape), "num_classes": num_classes, "null_label": num_classes,
            "class_names": class_names,
            "flow": {"path": "linear", "prediction": "velocity", "shift": shift, "time_dist": time_dist,
                     "t_mean": t_mean, "t_std": t_std, "t_max": flow.REFERENCE_T_MAX},
            "encoder": encoder, **({"image_size": image_size} if image_size is not None else {}),
            "statistics": STATS, "eps": NORM_EPS, **extra}


@dataclass
class DiffusionRun:
    """A complete diffusion run, loaded: its model (eval mode, frozen), config.json, manifest and the
    statistics [C, h, w] its latents were normalised with."""
    path: Path
    model: nn.Module
    config: dict
    manifest: dict
    mean: torch.Tensor
    var: torch.Tensor
    content_id: str | None = None  # what identifies the weights used: the run's, or those of --step
    @property
    def latent_shape(self) -> list[int]:
        return list(self.config["latent_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def null_label(self) -> int:
        return int(self.config["null_label"])

    @property
    def shift(self) -> float:
        """The shift the model was trained with (sampling's default)."""
        return float(self.config["flow"]["shift"])

    @property
    def encoder(self) -> dict:
        return self.config.get("encoder") or self.manifest.get("encoder") or {}

    def to_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> raw encoder space (``denormalize`` with the run's statistics)."""
        return denormalize(x, self.mean.to(x.device), self.var.to(x.device), self.config["eps"])


def load_diffusion_run(run_dir: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu",
                       step: int | None = None) -> DiffusionRun:
    """A complete diffusion run; ``ema``: the EMA weights (what the paper samples with) or the raw model's;
    ``step``: the weights of that step (a snapshot or a kept checkpoint), of a finished run or one
    still training."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir, kind="diffusion-run", what="diffusion run", require_complete=step is None)
    verify_files(run_dir, manifest)
    config = read_config(run_dir)
    spec = config["model"]
    if spec["class"] not in MODEL_CLASSES:
        raise ArtifactError(f"{run_dir}: unknown model class {spec['class']!r}")
    model = MODEL_CLASSES[spec["class"]](**spec["kwargs"])
    content_id = manifest.get("content_id")
    if step is not None:
        state, weights = weights_at_step(run_dir, step, ema, lambda s, e: s["ema" if e else "model"])
        content_id = sha256_file(weights)
    else:
        weights = run_dir / (DIFFUSION_EMA if ema else DIFFUSION_RAW)
        state = load_weights(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{weights} does not fit {spec['class']}({spec['kwargs']}): "
                            f"{len(missing)} missing, {len(unexpected)} unexpected tensors")
    stats = load_weights(run_dir / config["statistics"])
    return DiffusionRun(run_dir, model.to(device).eval().requires_grad_(False), config, manifest,
                        stats["mean"].float(), stats["var"].float(), content_id)
