"""What ``rae eval`` compares against (``--ref``), and the statistics files ``--save-ref`` writes.

A reference is one of

* an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``): its precomputed ``mu``/``sigma``
  (TF Inception pool3 over the ImageNet training set) are the FID reference and its ``mu_s``/
  ``sigma_s`` (ADM's spatial features) the sFID reference, its images (10,000) the precision/recall,
  KID and FD_DINOv2 reference (and the sFID one if it has no ``mu_s``/``sigma_s``);
* images (a folder or an ``.npz``): everything is computed from them;
* a statistics file written earlier with ``--save-ref`` (``.npz`` or ``.safetensors``: Inception
  ``mu``/``sigma`` and spatial ``mu_s``/``sigma_s`` under ADM's key names, the pool features for
  precision/recall, the DINOv2 ``dinov2_mu``/``dinov2_sigma``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts.atomic import atomic_replace, jsonable
from ..digests import sha256_file
from ..errors import ArtifactError, RaeError
from .inputs import ImageSet, first_line, npz_keys
from .nets import SPATIAL_CHANNELS, SPATIAL_DIM, SPATIAL_GRID

STATS_FORMAT = "rae-eval-stats"


@dataclass
class RefStats:
    """What a reference contributes without its images: Inception mu/sigma (FID), spatial mu_s/sigma_s
    (sFID), pool features (precision/recall, KID), DINOv2 mu/sigma (FD_DINOv2) and where they came from."""
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    dinov2_mu: np.ndarray | None = None
    dinov2_sigma: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    ARRAYS = ("mu", "sigma", "mu_s", "sigma_s", "pool", "dinov2_mu", "dinov2_sigma")

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.ARRAYS if getattr(self, k) is not None}

    def sha256(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.arrays().items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()


def save_ref_stats(path: str | os.PathLike, stats: RefStats) -> None:
    """Write statistics as .npz (the ADM key names ``mu``/``sigma``/``mu_s``/``sigma_s``, plus ``pool``,
    ``dinov2_*`` and a JSON ``rae_meta`` string) or as .safetensors (same tensors, JSON in the metadata)."""
    path = Path(path)
    meta = json.dumps({"format": STATS_FORMAT, "version": 1, **jsonable(stats.meta)})
    if path.suffix not in (".npz", ".safetensors"):
        raise RaeError(f"--save-ref must end in .npz or .safetensors (got {path.name})")
    with atomic_replace(path) as tmp:
        if path.suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, rae_meta=np.array(meta), **stats.arrays())
        else:
            from safetensors.torch import save_file

            save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.arrays().items()}, str(tmp),
                      metadata={"rae_meta": meta})


def load_ref_stats(path: str | os.PathLike) -> RefStats:
    """Read a statistics file written by ``save_ref_stats`` (or any .npz with ADM ``mu``/``sigma``,
    ``mu_s``/``sigma_s``)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"reference statistics not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "numpy") as f:
                arrays = {k: f.get_tensor(k) for k in f.keys()}
                meta = json.loads((f.metadata() or {}).get("rae_meta", "{}"))
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "arr_0"}
            meta = json.loads(str(arrays.pop("rae_meta"))) if "rae_meta" in arrays else {}
    except Exception as e:
        raise ArtifactError(f"cannot read reference statistics {path}: {first_line(e)}") from None
    stats = RefStats(**{k: arrays[k] for k in RefStats.ARRAYS if k in arrays}, meta=meta)
    if (stats.mu is None) != (stats.sigma is None):
        raise ArtifactError(f"{path} has only one of mu and sigma")
    _check_spatial_stats(stats, path)
    return stats


def _check_spatial_stats(stats: RefStats, path) -> None:
    """mu_s/sigma_s come in pairs and are ADM's 2,023-dim spatial statistics."""
    if (stats.mu_s is None) != (stats.sigma_s is None):
        raise ArtifactError(f"{path} has only one of mu_s and sigma_s")
    if stats.mu_s is not None and (np.shape(stats.mu_s) != (SPATIAL_DIM,)
                                   or np.shape(stats.sigma_s) != (SPATIAL_DIM, SPATIAL_DIM)):
        raise ArtifactError(f"{path}: mu_s/sigma_s are {np.shape(stats.mu_s)}/{np.shape(stats.sigma_s)}, not ADM's "
                            f"spatial statistics ({SPATIAL_DIM} = {SPATIAL_GRID}x{SPATIAL_GRID}x{SPATIAL_CHANNELS})")


@dataclass
class Reference:
    path: Path
    kind: str                       # "adm-ref-batch", "folder", "npz" or "stats"
    images: ImageSet | None = None
    stats: RefStats | None = None   # precomputed statistics (ADM mu/sigma, or a --save-ref file)

    def identity(self, computed: RefStats | None) -> dict:
        out = {"path": str(self.path.resolve()), "kind": self.kind}
        if self.path.is_file():
            out["sha256"] = sha256_file(self.path)
        else:
            out["listing_sha256"] = self.images.listing_sha256()
            if computed is not None and computed.arrays():
                out["stats_sha256"] = computed.sha256()
        if self.images is not None:
            out["num_images"] = len(self.images)
        if self.stats is not None and self.stats.meta:
            out["meta"] = self.stats.meta
        return out


def open_reference(path: str | os.PathLike) -> Reference:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"reference not found: {path}")
    if path.is_dir():
        return Reference(path, "folder", images=ImageSet(path))
    if path.suffix == ".safetensors":
        return Reference(path, "stats", stats=load_ref_stats(path))
    if path.suffix != ".npz":
        raise ArtifactError(f"reference must be an image folder, an .npz or a .safetensors statistics file: {path}")
    keys = npz_keys(path)
    if "arr_0" not in keys:
        if "mu" not in keys and "mu_s" not in keys and "dinov2_mu" not in keys:
            raise ArtifactError(f"{path} has neither images (arr_0) nor statistics (mu, sigma)")
        return Reference(path, "stats", stats=load_ref_stats(path))
    images = ImageSet(path)
    pairs = [(m, s) for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")) if m in keys and s in keys]
    if pairs:  # ADM's reference batches carry both pairs: pool3 (FID) and mixed_6/conv (sFID)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k].astype(np.float64) for pair in pairs for k in pair}
        what = " and ".join({"mu": "pool3", "mu_s": "mixed_6/conv spatial"}[m] for m, _ in pairs)
        stats = RefStats(**arrays, meta={"source": f"ADM reference batch (TF Inception {what} statistics)"})
        _check_spatial_stats(stats, path)
        return Reference(path, "adm-ref-batch", images=images, stats=stats)
    return Reference(path, "npz", images=images)


def check_stats_identity(ref: Reference, inception, dinov2) -> None:
    """Statistics written by --save-ref must come from the same networks as ours."""
    meta = ref.stats.meta or {}
    for key, net in (("inception", inception), ("dinov2", dinov2)):
        theirs = (meta.get(key) or {}).get("weights_sha256")
        if net is not None and theirs and theirs != net.identity["weights_sha256"]:
            raise ArtifactError(f"{ref.path} was computed with other {key} weights (sha256 {theirs[:12]}…, "
                                f"now {net.identity['weights_sha256'][:12]}…): recompute it with --save-ref")
