"""``rae eval``: FID, sFID, Inception Score, precision/recall, KID, FD_DINOv2 and PSNR/SSIM, in PyTorch,
giving the numbers of the ADM evaluation suite (openai/guided-diffusion ``evaluations/evaluator.py``).

IMAGES is a folder of images (sorted relative paths, recursive) or an ADM ``.npz`` (``arr_0``: uint8
N x H x W x 3). REF is one of

* an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``): its precomputed ``mu``/``sigma``
  (TF Inception pool3 over the ImageNet training set) are the FID reference and its ``mu_s``/
  ``sigma_s`` (the spatial features below) the sFID reference, its images (10,000) the
  precision/recall, KID and FD_DINOv2 reference (and the sFID one if it has no ``mu_s``/``sigma_s``);
* images (a folder or an ``.npz``): everything is computed from them. rFID is this case:
  ``rae eval RECONSTRUCTIONS --ref ORIGINALS --pairs`` (the paper's protocol: the 50,000 ImageNet
  validation images, ADM center crop at 256, reconstructed by the autoencoder) also gives PSNR and
  SSIM over matched pairs (sorted file names, or ``.npz`` order);
* a statistics file written earlier with ``--save-ref`` (``.npz`` or ``.safetensors``: Inception
  ``mu``/``sigma`` and spatial ``mu_s``/``sigma_s`` under ADM's key names, the pool features for
  precision/recall, the DINOv2 ``dinov2_mu``/``dinov2_sigma``).

Features. Inception: torch-fidelity's TF-exact InceptionV3 (same graph and weights as the ADM
suite; TF1 bilinear resize to 299 inside), pool3 (2048) for FID/PR/KID, the unbiased logits
(1008) for IS and, from the same forward pass, ADM's sFID features: the TF graph's ``mixed_6/conv``
(the 1x1 branch of ``mixed_6``, torch-fidelity's ``Mixed_6d.branch1x1`` after its batch norm and
ReLU, [B, 192, 17, 17]), its first 7 channels flattened in TF's NHWC order (17 x 17 x 7 = 2,023).
Its weights are torch-fidelity's own file, read from the torch hub cache where torch-fidelity puts
it (downloaded there on first use) or from ``--inception-weights FILE``; the file is read with
``weights_only`` (tensors, never pickled code) and handed to torch-fidelity's class. DINOv2
(FD_DINOv2 as EDM2 / dgm-eval report it): ViT-L/14, images resized bicubic (antialiased) to 224,
ImageNet mean/std, the CLS token after the final LayerNorm; the position embedding is resampled to
16x16 the way the torch hub DINOv2 does it.

sFID is the Frechet distance of those features' mean/covariance (FID's functions, float64) between
the images and the reference, the same reference batch as FID.

Under ``torchrun`` each rank takes a round-robin share of the images; feature sums are float64 and
summed across ranks; pool features are gathered (in image order) for precision/recall and KID,
which rank 0 computes. TF32 is switched off while evaluating: it would move Inception features.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist
from . import metrics as M
from .errors import ArtifactError, RaeError
from .images import BadImage, load_rgb
from .manifest import atomic_write_json, jsonable
from .progress import console, progress
from .weights import (MissingWeightsError, WeightsFileError, create_timm_model, hf_download_hint,
                      load_state_dict_file, reachable, sha256_file)

METRICS = ("fid", "sfid", "is", "pr", "kid", "fd_dinov2")  # all of them: the default
INCEPTION_METRICS = ("fid", "sfid", "is", "pr", "kid")
DINOV2_DEFAULT = "vit_large_patch14_dinov2.lvd142m"   # DINOv2 ViT-L/14, as EDM2's FD_DINOv2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
STATS_FORMAT = "rae-eval-stats"
# ADM's sFID features: the TF graph's "mixed_6/conv:0" (blocks mixed, mixed_1, ... = torchvision's
# Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d: mixed_6 is Mixed_6d, its "conv" the 1x1 branch, whose op is the
# ReLU after the batch norm), [N, 17, 17, 192] NHWC; ADM keeps spatial[..., :7] and flattens per image.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2,023


@dataclass
class EvalConfig:
    images: str                                  # image folder or ADM .npz
    ref: str | None = None                       # ADM reference batch, images, or a --save-ref file
    pairs: bool = False                          # PSNR/SSIM over matched (images[i], ref[i]) pairs
    save_ref: str | None = None                  # write IMAGES' statistics here (.npz or .safetensors)
    out: str | None = None                       # eval.json (default: next to the images)
    metrics: tuple[str, ...] = METRICS  # any of fid, sfid, is, pr, kid, fd_dinov2 (METRICS)
    inception_weights: str | None = None         # torch-fidelity Inception file; None = torch hub cache
    dinov2_weights: str | None = None            # DINOv2 file; None = timm / Hugging Face cache
    fd_model: str = DINOV2_DEFAULT               # timm DINOv2 name for the FD in representation space
    fd_encoder: str | None = None                # a latent store: FD in its RAE encoder's space instead
                                                 # (mean-pooled tokens; needs no downloaded weights)
    offline: bool = False                        # never download weights
    # Protocol constants (ADM / torch-fidelity defaults).
    is_split_size: int = 5000
    pr_k: int = 3
    pr_batch_size: int = 10000
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    # Run settings.
    batch_size: int = 64
    num_workers: int = 4
    device: str = "auto"


# ----------------------------------------------------------------------------------------------
# Image sets: a folder or an ADM .npz


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _list_image_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                out.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(out)


def _npz_member(path: Path, name: str) -> tuple[tuple, np.dtype, int | None]:
    """(shape, dtype, byte offset of the data or None) of ``name`` inside an .npz, without reading it.

    ``np.savez`` stores members uncompressed, so the array's bytes sit contiguously in the file and
    can be memory-mapped: 50,000 images are never loaded at once, and each rank reads only its share.
    """
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(f"{name}.npy")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)(f)
                header_len = f.tell()
    except KeyError:
        raise ArtifactError(f"{path} has no '{name}' array") from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path} as an .npz: {_first_line(e)}") from None
    shape, fortran, dtype = header
    offset = None
    if info.compress_type == zipfile.ZIP_STORED and not fortran and not dtype.hasobject:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = info.header_offset + 30 + name_len + extra_len + header_len
    return shape, dtype, offset


def _check_member_crc(path: Path, name: str) -> None:
    """The zip CRC-32 of an uncompressed member, streamed (a flipped byte would be scored otherwise)."""
    import zlib

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
        crc, left = 0, info.file_size
        with z.open(info) as f:
            f._expected_crc = None  # zipfile's own check at EOF would raise a generic error; ours names the file
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    break
                crc, left = zlib.crc32(block, crc), left - len(block)
    if crc != info.CRC:
        raise ArtifactError(f"{path}: {name} fails its zip checksum (the file is corrupt); write it again")


def npz_keys(path: str | os.PathLike) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"cannot read {path} as an .npz: {e}") from None


def read_adm_npz(path: str | os.PathLike) -> np.ndarray:
    """The images of an ADM .npz (``arr_0``, uint8 N x H x W x 3): memory-mapped when stored
    uncompressed (as ``np.savez`` writes it), else loaded."""
    path = Path(path)
    shape, dtype, offset = _npz_member(path, "arr_0")
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise ArtifactError(f"{path}: arr_0 must be uint8 N x H x W x 3 (the ADM format), got {dtype} {shape}")
    if offset is not None:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    with np.load(path, allow_pickle=False) as z:
        return z["arr_0"]


def save_adm_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write images (uint8 N x H x W x 3) in the ADM format: ``arr_0`` (+ ``arr_1`` labels), uncompressed."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"ADM images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, **arrays)
    os.replace(tmp, path)


class ImageSet:
    """Images by index, uint8 H x W x 3: a folder (sorted relative paths) or an ADM .npz."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ArtifactError(f"images not found: {self.path}")
        self._arr = None
        if self.path.is_dir():
            self.kind = "folder"
            self.files = _list_image_files(self.path)
            if (self.path / "manifest.json").is_file():  # a `rae decode` folder: its numbered PNGs, not grid.png
                import re

                from .manifest import read_manifest

                read_manifest(self.path, kind="image-folder", what="image folder")  # unfinished: refused
                self.files = [f for f in self.files if re.fullmatch(r"\d+\.png", f)]
            if not self.files:
                raise ArtifactError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.path}")
            self.n = len(self.files)
            self.mappable = True
        elif self.path.suffix == ".npz":
            self.kind = "npz"
            self.files = None
            shape, dtype, offset = _npz_member(self.path, "arr_0")
            if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
                raise ArtifactError(f"{self.path}: arr_0 must be uint8 N x H x W x 3 (the ADM format), got {dtype} {shape}")
            self.n = shape[0]
            self.mappable = offset is not None  # compressed members are loaded once, in one process
            if offset is not None:  # memory-mapped reads skip the zip's checksum: check it once here
                _check_member_crc(self.path, "arr_0")
        else:
            raise ArtifactError(f"{self.path} is neither an image folder nor an .npz")
        if self.n == 0:
            raise ArtifactError(f"{self.path} holds no images (arr_0 has 0 of them): nothing to score")

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return self.files[i] if self.files is not None else f"{self.path.name}[{i}]"

    def __getitem__(self, i: int) -> np.ndarray:
        if self.kind == "folder":
            return np.asarray(load_rgb(self.path / self.files[i], min_size=1))
        if self._arr is None:
            self._arr = read_adm_npz(self.path)
        return np.asarray(self._arr[i])

    def __getstate__(self):  # DataLoader workers reopen the memory map themselves
        return {**self.__dict__, "_arr": None}

    def listing_sha256(self) -> str:
        """Digest of what the set is made of (file names and sizes, or the .npz file's size and shape)."""
        h = hashlib.sha256()
        if self.files is not None:
            for rel in self.files:
                h.update(f"{rel}\t{os.path.getsize(self.path / rel)}\n".encode())
        else:
            h.update(f"{self.path.name}\t{os.path.getsize(self.path)}\t{self.n}\n".encode())
        return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reference statistics files (--save-ref) and references


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, rae_meta=np.array(meta), **stats.arrays())
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.arrays().items()}, str(tmp),
                  metadata={"rae_meta": meta})
    else:
        raise RaeError(f"--save-ref must end in .npz or .safetensors (got {path.name})")
    os.replace(tmp, path)


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
        raise ArtifactError(f"cannot read reference statistics {path}: {_first_line(e)}") from None
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


# ----------------------------------------------------------------------------------------------
# Feature extractors


def _fidelity_inception():
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    return tfi


def inception_cache_path() -> Path:
    """Where torch-fidelity keeps its Inception weights: the torch hub checkpoint cache
    ($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints by default)."""
    url = _fidelity_inception().URL_INCEPTION_V3
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _sha_prefix(url: str) -> str:
    """torch hub convention: ``name-<sha256 prefix>.pth`` ("6726825d" for torch-fidelity's file)."""
    return os.path.basename(url).rsplit("-", 1)[-1].split(".")[0]


def adm_spatial(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """ADM's sFID feature from the ``mixed_6/conv`` map [B, C, 17, 17] (NCHW): the first 7 channels,
    flattened per image in TF's NHWC order ((row * 17 + column) * 7 + channel), float32 [B, 2023]."""
    x = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1).to(torch.float32)


class InceptionV3(nn.Module):
    """torch-fidelity's TF-exact InceptionV3: uint8 [B, 3, H, W] at any size -> (pool3 [B, 2048],
    unbiased logits [B, 1008]), plus with ``spatial=True`` ADM's sFID features [B, 2023] taken from
    the same forward pass (a hook on ``Mixed_6d.branch1x1``, the TF graph's ``mixed_6/conv``)."""

    def __init__(self, net: nn.Module, identity: dict):
        super().__init__()
        self.net = net
        self.identity = identity
        self.dim = 2048
        self._capture, self._spatial = False, None
        net.get_submodule(SPATIAL_LAYER).register_forward_hook(self._spatial_hook)

    def _spatial_hook(self, module, args, output):
        if self._capture:
            if tuple(output.shape[1:]) != (192, SPATIAL_GRID, SPATIAL_GRID):
                raise RuntimeError(f"{SPATIAL_LAYER} gave {tuple(output.shape[1:])}, not mixed_6/conv's [192, 17, 17]")
            self._spatial = adm_spatial(output)  # a copy: the block's later ops cannot change it

    @torch.no_grad()
    def forward(self, x: torch.Tensor, spatial: bool = False):
        if not spatial:
            pool, logits = self.net(x)
            return pool, logits
        self._capture, self._spatial = True, None
        try:
            pool, logits = self.net(x)
            feats = self._spatial
        finally:
            self._capture, self._spatial = False, None
        if feats is None:
            raise RuntimeError(f"the Inception forward pass did not run {SPATIAL_LAYER}")
        return pool, logits, feats


def load_inception(weights: str | os.PathLike | None = None, offline: bool = False,
                   device: torch.device | str = "cpu") -> InceptionV3:
    """The Inception network of FID/sFID/IS/PR/KID, on torch-fidelity's real loading path.

    ``weights=None``: torch-fidelity's file in the torch hub cache, downloaded there first if missing
    (unless ``offline``). The file is read as plain tensors (``weights_only``) and handed to
    torch-fidelity's own constructor; a file that cannot be found raises MissingWeightsError
    with one line saying what to fetch and where to put it.
    """
    tfi = _fidelity_inception()
    url = tfi.URL_INCEPTION_V3
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise MissingWeightsError(f"Inception weights file not found: {path}")
    else:
        path = inception_cache_path()
        if not path.is_file() and not offline and reachable(url):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), hash_prefix=_sha_prefix(url), progress=True)
            except Exception:
                pass
        if not path.is_file():
            raise MissingWeightsError(
                f"Inception weights not found: download {url} into {path.parent}/ "
                f"(torch hub cache, set by $TORCH_HOME) or pass --inception-weights FILE")
    state = load_state_dict_file(path)
    buf = io.BytesIO()
    torch.save(state, buf)  # tensors only: torch-fidelity's own torch.load then has nothing to unpickle but them
    buf.seek(0)
    try:
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=buf)
    except Exception as e:
        raise WeightsFileError(f"{path} does not hold torch-fidelity's InceptionV3 weights: "
                               f"{_first_line(e)[:200]}") from None
    digest = sha256_file(path)
    identity = {"name": "InceptionV3 (TF 2015-12-05 graph, torch-fidelity FeatureExtractorInceptionV3)",
                "features": "pool3 2048-d (FID, PR, KID); unbiased logits 1008-d (IS); mixed_6/conv "
                            "(Mixed_6d.branch1x1 after BN+ReLU) channels 0-6 at 17x17, NHWC, 2023-d (sFID)",
                "weights": str(path), "weights_sha256": digest, "official": digest.startswith(_sha_prefix(url))}
    return InceptionV3(net, identity).to(device).eval()


def _hub_pos_embed_224(pos_embed: torch.Tensor, prefix: int, grid: int, antialias_size: bool) -> torch.Tensor:
    """Resample a DINOv2 position embedding to ``grid`` x ``grid`` as the torch hub model does on the
    fly: DINOv2 without registers scales by (grid + 0.1) / M with plain bicubic; the register
    models ask for the size directly, with antialiasing."""
    cls_part, patch = pos_embed[:, :prefix], pos_embed[:, prefix:].float()
    m = math.isqrt(patch.shape[1])
    patch = patch.reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if antialias_size:
        patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=True)
    else:
        s = (grid + 0.1) / m
        patch = F.interpolate(patch, scale_factor=(s, s), mode="bicubic", antialias=False)
    assert patch.shape[-2:] == (grid, grid), patch.shape
    return torch.cat([cls_part, patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], dim=1)


class DINOv2(nn.Module):
    """FD_DINOv2's feature: uint8 [B, 3, H, W] -> bicubic antialiased resize to 224 -> ImageNet
    mean/std -> DINOv2 -> the CLS token after the final LayerNorm (EDM2 / dgm-eval)."""

    def __init__(self, vit: nn.Module, identity: dict, size: int = 224):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.identity = identity
        self.size = size
        self.dim = vit.num_features
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(self.size, self.size), mode="bicubic", antialias=True)
        x = (x / 255 - self.mean) / self.std
        return self.vit(x)


def _hf_cached_file(timm_name: str) -> str | None:
    """The timm weights of ``timm_name`` if they already sit in the Hugging Face cache."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        hit = try_to_load_from_cache(hub_id, name)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def load_dinov2(timm_name: str = DINOV2_DEFAULT, weights: str | os.PathLike | None = None, offline: bool = False,
                device: torch.device | str = "cpu") -> DINOv2:
    """DINOv2 through timm (``weights`` file, else the Hugging Face cache, else a download unless
    ``offline``), at its native 518 resolution, then rebuilt for 224 input with the hub-style
    position embedding. MissingWeightsError (one line) when there are no weights."""
    import timm

    if weights is None:
        weights = _hf_cached_file(timm_name)
        if weights is None and offline:
            cfg = timm.models.get_pretrained_cfg(timm_name)
            hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
            where = hf_download_hint(hub_id) if hub_id else f"the timm weights of {timm_name}"
            raise MissingWeightsError(f"DINOv2 weights for '{timm_name}' are not cached: fetch {where} and pass it "
                                      f"with --dinov2-weights FILE (or put it in the Hugging Face cache, $HF_HOME/hub)")
    vit, digest = create_timm_model(timm_name, weights=weights, pretrained=True, flag="--dinov2-weights", num_classes=0)
    patch = vit.patch_embed.patch_size[0]
    prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    state = vit.state_dict()
    state["pos_embed"] = _hub_pos_embed_224(state["pos_embed"], prefix, 224 // patch,
                                            antialias_size=vit.num_prefix_tokens > 1)
    del vit
    with torch.device("meta"):
        vit224 = timm.create_model(timm_name, pretrained=False, img_size=224, num_classes=0)
    vit224.load_state_dict(state, assign=True)
    if any(t.is_meta for t in list(vit224.parameters()) + list(vit224.buffers())):
        vit224 = timm.create_model(timm_name, pretrained=False, img_size=224, num_classes=0)
        vit224.load_state_dict(state)
    identity = {"name": f"DINOv2 {timm_name} (timm), CLS token, 224 bicubic antialiased, ImageNet mean/std",
                "weights": str(weights) if weights else "timm download", "weights_sha256": digest}
    return DINOv2(vit224, identity).to(device).eval()


class EncoderFeatures(nn.Module):
    """FD in the RAE encoder's own space: the encoder of a latent store (rebuilt exactly as the store
    recorded it, weights digest checked) on the image, its latent tokens mean-pooled to [C]."""

    def __init__(self, encoder: nn.Module, identity: dict):
        super().__init__()
        self.encoder, self.identity = encoder, identity
        self.dim = encoder.spec.width

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).float().mean(dim=(2, 3))


def load_store_encoder(store: str | os.PathLike, device: torch.device | str = "cpu") -> EncoderFeatures:
    from .encoders import build_encoder
    from .manifest import read_manifest

    manifest = read_manifest(store, kind="latent-store", what="--fd-encoder store")
    cfg, enc = manifest["config"], manifest["encoder"]
    encoder, digest = build_encoder(enc["name"], cfg["image_size"], weights=cfg.get("encoder_weights"),
                                    pretrained=enc.get("pretrained", True), seed=cfg.get("seed", 0))
    if digest != enc["weights_sha256"]:
        raise ArtifactError(f"the encoder weights found now (sha256 {digest[:12]}…) are not those of {store} "
                            f"({enc['weights_sha256'][:12]}…)")
    identity = {"name": f"RAE encoder {enc['name']} of {store}, mean-pooled latent tokens",
                "weights": cfg.get("encoder_weights") or ("random init" if not enc.get("pretrained", True) else "timm"),
                "weights_sha256": digest}
    return EncoderFeatures(encoder, identity).to(device).eval()


# ----------------------------------------------------------------------------------------------
# One pass over aligned image sets


class _Items(torch.utils.data.Dataset):
    """Index i -> (i, [image of each set], error message or "")."""

    def __init__(self, sets: list[ImageSet]):
        self.sets = sets

    def __len__(self):
        return len(self.sets[0])

    def __getitem__(self, i):
        out = []
        for s in self.sets:
            try:
                out.append(s[i])
            except BadImage as e:
                return i, None, f"{s.path / s.name(i) if s.files else s.name(i)}: {e}"
        return i, out, ""


class _Collector:
    """What one image set yields in a pass: float64 Inception (pool3 and spatial) and DINOv2
    statistics, the pool features (kept with their indices), the Inception Score parts."""

    def __init__(self, n: int, device, inception: InceptionV3 | None = None, dinov2: DINOv2 | None = None,
                 fid_stats: bool = False, keep_pool: bool = False, with_is: bool = False, is_split_size: int = 5000,
                 spatial_stats: bool = False):
        self.inception, self.dinov2 = inception, dinov2
        self.inc_stats = M.FeatureStats(2048, device) if inception is not None and fid_stats else None
        self.sp_stats = M.FeatureStats(SPATIAL_DIM, device) if inception is not None and spatial_stats else None
        self.dino_stats = M.FeatureStats(dinov2.dim, device) if dinov2 is not None else None
        self.is_parts = M.InceptionScoreParts(1008, n, is_split_size, device) if inception is not None and with_is else None
        self.keep_pool = inception is not None and keep_pool
        self.pool_idx, self.pool_rows = [], []
        self.pool = None

    @property
    def busy(self) -> bool:
        return (self.inc_stats is not None or self.sp_stats is not None or self.keep_pool
                or self.is_parts is not None or self.dino_stats is not None)

    def update(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        if self.sp_stats is not None:  # one forward pass gives pool3, logits and the spatial features
            pool, logits, spatial = self.inception(x, spatial=True)
            self.sp_stats.update(spatial)
        elif self.inc_stats is not None or self.keep_pool or self.is_parts is not None:
            pool, logits = self.inception(x)
        if self.inc_stats is not None:
            self.inc_stats.update(pool)
        if self.is_parts is not None:
            self.is_parts.update(logits, idx)
        if self.keep_pool:
            self.pool_idx.append(idx.numpy())
            self.pool_rows.append(pool.float().cpu().numpy())
        if self.dino_stats is not None:
            self.dino_stats.update(self.dinov2(x))

    def finish(self) -> "_Collector":
        """Sum statistics over ranks; gather pool features in image order (every rank gets them)."""
        for s in (self.inc_stats, self.sp_stats, self.dino_stats, self.is_parts):
            if s is not None:
                s.all_reduce()
        if self.keep_pool:
            idx = np.concatenate(self.pool_idx) if self.pool_idx else np.zeros(0, np.int64)
            rows = np.concatenate(self.pool_rows) if self.pool_rows else np.zeros((0, 2048), np.float32)
            parts = dist.all_gather_object((idx, rows))
            idx = np.concatenate([p[0] for p in parts])
            rows = np.concatenate([p[1] for p in parts])
            self.pool = rows[np.argsort(idx, kind="stable")]
            self.pool_idx = self.pool_rows = []
        return self


class _PairSums:
    """PSNR and SSIM summed over matched pairs (float64), summed across ranks."""

    def __init__(self, device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # psnr, ssim, count

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.sums[0] += M.psnr(a, b, 255.0).sum()
        self.sums[1] += M.ssim(a, b, 255.0).sum()
        self.sums[2] += a.shape[0]

    def finish(self) -> dict:
        dist.all_reduce_sum(self.sums)
        n = self.sums[2].item()
        return {"psnr": self.sums[0].item() / n, "ssim": self.sums[1].item() / n}


def _pass(sets: list[ImageSet], collectors: list[_Collector], d, cfg: EvalConfig, label: str,
          pair_sums: _PairSums | None = None) -> None:
    """Run every collector over its set, on this rank's round-robin share of the indices."""
    n = len(sets[0])
    mine = dist.shard(list(range(n)), d.rank, d.world)
    batches = [mine[s:s + cfg.batch_size] for s in range(0, len(mine), cfg.batch_size)]
    workers = cfg.num_workers if len(batches) > 1 and all(s.mappable for s in sets) else 0
    loader = torch.utils.data.DataLoader(_Items(sets), batch_sampler=batches, num_workers=workers,
                                         collate_fn=list, prefetch_factor=4 if workers else None)
    shapes = [None] * len(sets)
    with progress(len(mine), label, unit="img") as advance, torch.no_grad():
        for items in loader:
            for _, _, err in items:
                if err:
                    raise ArtifactError(f"cannot read image {err}")
            idx = torch.tensor([it[0] for it in items], dtype=torch.long)
            xs = []
            for k, s in enumerate(sets):
                imgs = [it[1][k] for it in items]
                for i, im in zip(idx.tolist(), imgs):
                    if shapes[k] is None:
                        shapes[k] = (im.shape, s.name(i))
                    elif im.shape != shapes[k][0]:
                        raise ArtifactError(
                            f"images in {s.path} differ in size ({shapes[k][1]}: {shapes[k][0][1]}x{shapes[k][0][0]}, "
                            f"{s.name(i)}: {im.shape[1]}x{im.shape[0]}): crop them to one size first (the ADM center crop)")
                xs.append(torch.from_numpy(np.stack(imgs)).to(d.device).permute(0, 3, 1, 2).contiguous())
            for x, c in zip(xs, collectors):
                if c is not None and c.busy:
                    c.update(x, idx)
            if pair_sums is not None:
                if xs[0].shape != xs[1].shape:
                    raise ArtifactError(f"--pairs: {sets[0].name(idx[0].item())} is {tuple(xs[0].shape[1:])} but "
                                        f"{sets[1].name(idx[0].item())} is {tuple(xs[1].shape[1:])}")
                pair_sums.update(xs[0], xs[1])
            advance(len(items))


# ----------------------------------------------------------------------------------------------
# run


@contextlib.contextmanager
def _exact_float32():
    """IEEE float32 for convolutions and matmuls while evaluating (TF32 would move features ~1e-3)."""
    conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved_reduced = mm.allow_fp16_reduced_precision_reduction
    if hasattr(conv, "fp32_precision") and hasattr(mm, "fp32_precision"):
        saved = (conv.fp32_precision, mm.fp32_precision)
        conv.fp32_precision, mm.fp32_precision = "ieee", "ieee"
    else:  # older torch
        saved = (torch.backends.cudnn.allow_tf32, mm.allow_tf32)
        torch.backends.cudnn.allow_tf32, mm.allow_tf32 = False, False
    mm.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        if hasattr(conv, "fp32_precision") and hasattr(mm, "fp32_precision"):
            conv.fp32_precision, mm.fp32_precision = saved
        else:
            torch.backends.cudnn.allow_tf32, mm.allow_tf32 = saved
        mm.allow_fp16_reduced_precision_reduction = saved_reduced


def _artifact_content_id(path: Path) -> str | None:
    """The content id of the rae artifact at (or holding) ``path``, if it is one."""
    from .manifest import read_manifest

    folder = path if path.is_dir() else path.parent
    if not (folder / "manifest.json").is_file():
        return None
    try:
        return read_manifest(folder, require_complete=False).get("content_id")
    except ArtifactError:
        return None


def default_out(images: str | os.PathLike) -> Path:
    """eval.json inside an image folder; ``NAME.eval.json`` beside an .npz."""
    p = Path(images)
    return p / "eval.json" if p.is_dir() else p.with_name(p.stem + ".eval.json")


def fd_key(fd_model: str) -> str:
    return "fd_dinov2" if fd_model == DINOV2_DEFAULT else f"fd_{fd_model}"


def _validate(cfg: EvalConfig) -> None:
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise RaeError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if cfg.batch_size < 1:
        raise RaeError("--batch-size must be at least 1")
    if cfg.save_ref and Path(cfg.save_ref).suffix not in (".npz", ".safetensors"):
        raise RaeError(f"--save-ref must end in .npz or .safetensors (got {Path(cfg.save_ref).name})")
    if cfg.pairs and not cfg.ref:
        raise RaeError("--pairs needs --ref (the originals the images are matched with)")


def _rank0_first(d, load):
    """Rank 0 loads (and downloads into the cache) first; the others then find the file cached."""
    if not d.is_main:
        dist.barrier()
    try:
        return load()
    finally:
        if d.is_main:
            dist.barrier()


def _warn(d, msg: str) -> None:
    if d.is_main:
        console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def run(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg.images``; returns (on every rank) the dict written to eval.json."""
    _validate(cfg)
    d = dist.init(cfg.device)
    with _exact_float32():
        return _run(cfg, d)


def _run(cfg: EvalConfig, d) -> dict:
    images = ImageSet(cfg.images)
    ref = open_reference(cfg.ref) if cfg.ref else None
    wanted = [m for m in METRICS if m in cfg.metrics]
    skipped: dict[str, str] = {}
    fdk = "fd_rae" if cfg.fd_encoder else fd_key(cfg.fd_model)

    if cfg.pairs:
        if ref.images is None:
            raise RaeError(f"--pairs needs the reference to be images (a folder or an .npz with arr_0), "
                           f"not the {ref.kind} file {ref.path}")
        if len(ref.images) != len(images):
            raise RaeError(f"--pairs: {len(images)} images but {len(ref.images)} reference images")
        if images.files and ref.images.files and images.files != ref.images.files:
            _warn(d, "--pairs: file names differ between the two folders; pairing by sorted order")

    # What the reference cannot give decides what is skipped before any network is loaded.
    pre = ref.stats if ref is not None and ref.stats is not None else RefStats()
    fd_name = {"fd_dinov2": fdk}
    if ref is None:
        for m in ("fid", "sfid", "pr", "kid", "fd_dinov2"):
            if m in wanted:
                skipped[fd_name.get(m, m)] = "needs a reference (--ref)"
    elif ref.kind == "stats":
        for m, present, what in (("fid", pre.mu, "Inception mu/sigma"),
                                 ("sfid", pre.mu_s, "Inception spatial statistics (mu_s/sigma_s)"),
                                 ("pr", pre.pool, "Inception pool features"),
                                 ("kid", pre.pool, "Inception pool features"),
                                 ("fd_dinov2", pre.dinov2_mu, "DINOv2 statistics")):
            if m in wanted and present is None:
                skipped[fd_name.get(m, m)] = f"{ref.path} holds no {what}"
    # Checked before any feature pass: FID needs Inception's 2048-dim pool statistics.
    if "fid" in wanted and pre.mu is not None and (np.shape(pre.mu) != (2048,) or np.shape(pre.sigma) != (2048, 2048)):
        raise ArtifactError(f"{ref.path}: mu/sigma are {np.shape(pre.mu)}/{np.shape(pre.sigma)}, not Inception's "
                            "2048-dim pool statistics (ADM's reference batches and `rae eval --save-ref` files are)")

    def want(m):
        return m in wanted and fd_name.get(m, m) not in skipped

    # Extractors. Missing weights skip their metrics (one warning line); a bad or absent named file is an error.
    need_inception = any(want(m) for m in INCEPTION_METRICS) or bool(cfg.save_ref)
    need_dinov2 = want("fd_dinov2") or (bool(cfg.save_ref) and "fd_dinov2" in wanted)
    inception = dinov2 = None
    missing: list[MissingWeightsError] = []
    if need_inception:
        try:
            inception = _rank0_first(d, lambda: load_inception(cfg.inception_weights, cfg.offline, d.device))
        except MissingWeightsError as e:
            if cfg.inception_weights:
                raise
            missing.append(e)
            lost = [m for m in INCEPTION_METRICS if want(m)]
            for m in lost:
                skipped[m] = str(e)
            _warn(d, f"{e}; skipping {', '.join(lost) if lost else 'the Inception statistics of --save-ref'}")
        if inception is not None and not inception.identity["official"]:
            _warn(d, f"{inception.identity['weights']} is not torch-fidelity's published Inception file: "
                     "the numbers are not comparable with published ones")
    if need_dinov2:
        try:
            dinov2 = _rank0_first(d, lambda: load_store_encoder(cfg.fd_encoder, d.device) if cfg.fd_encoder
                                  else load_dinov2(cfg.fd_model, cfg.dinov2_weights, cfg.offline, d.device))
        except MissingWeightsError as e:
            if cfg.dinov2_weights:
                raise
            missing.append(e)
            if want("fd_dinov2"):
                skipped[fdk] = str(e)
            _warn(d, f"{e}; skipping {fdk}")
    if ref is not None and ref.kind == "stats":
        _check_stats_identity(ref, inception, dinov2)
    if ref is not None and ref.kind == "adm-ref-batch" and inception is not None and not inception.identity["official"]:
        given = [name for m, name, present in (("fid", "FID", pre.mu), ("sfid", "sFID", pre.mu_s))
                 if want(m) and present is not None]
        if given:
            _warn(d, f"{' and '.join(given)} against an ADM reference batch's precomputed statistics "
                     "is only meaningful with the official Inception weights")

    fd_ok = dinov2 is not None and want("fd_dinov2")
    want_pool = want("pr") or want("kid")
    img_col = _Collector(len(images), d.device, inception, dinov2 if fd_ok or cfg.save_ref else None,
                         fid_stats=want("fid") or bool(cfg.save_ref), keep_pool=want_pool or bool(cfg.save_ref),
                         with_is=want("is"), is_split_size=cfg.is_split_size,
                         spatial_stats=want("sfid") or bool(cfg.save_ref))
    ref_col = None
    if ref is not None and ref.images is not None:
        ref_col = _Collector(len(ref.images), d.device, inception, dinov2 if fd_ok and pre.dinov2_mu is None else None,
                             fid_stats=want("fid") and pre.mu is None, keep_pool=want_pool and pre.pool is None,
                             spatial_stats=want("sfid") and pre.mu_s is None)
    if not img_col.busy and not cfg.pairs:
        if missing:
            raise missing[0]
        raise RaeError("nothing to evaluate: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    # Passes. With --pairs the two aligned sets go through together (each image is read once).
    pair_sums = _PairSums(d.device) if cfg.pairs else None
    if cfg.pairs:
        _pass([images, ref.images], [img_col, ref_col], d, cfg, "eval (pairs)", pair_sums)
    else:
        _pass([images], [img_col], d, cfg, "eval images")
        if ref_col is not None and ref_col.busy:
            _pass([ref.images], [ref_col], d, cfg, "eval reference")
    img_col.finish()
    if ref_col is not None:
        ref_col.finish()
    pair_values = pair_sums.finish() if pair_sums is not None else {}

    result = None
    if d.is_main:
        result = _report(cfg, d, images, ref, pre, img_col, ref_col, pair_values, inception, dinov2, wanted,
                         skipped, fdk)
    result = dist.broadcast_object(result)
    return result


def _check_stats_identity(ref: Reference, inception, dinov2) -> None:
    """Statistics written by --save-ref must come from the same networks as ours."""
    meta = ref.stats.meta or {}
    for key, net in (("inception", inception), ("dinov2", dinov2)):
        theirs = (meta.get(key) or {}).get("weights_sha256")
        if net is not None and theirs and theirs != net.identity["weights_sha256"]:
            raise ArtifactError(f"{ref.path} was computed with other {key} weights (sha256 {theirs[:12]}…, "
                                f"now {net.identity['weights_sha256'][:12]}…): recompute it with --save-ref")


def _report(cfg, d, images, ref, pre, img_col, ref_col, pair_values, inception, dinov2, wanted, skipped, fdk) -> dict:
    values: dict[str, float] = {}

    def want(m):
        return m in wanted and m not in skipped

    computed_ref = None
    if ref_col is not None:
        computed_ref = RefStats()
        if ref_col.inc_stats is not None:
            computed_ref.mu, computed_ref.sigma = _mean_cov(ref_col.inc_stats, ref.path)
        if ref_col.sp_stats is not None:
            computed_ref.mu_s, computed_ref.sigma_s = _mean_cov(ref_col.sp_stats, ref.path)
        if ref_col.dino_stats is not None:
            computed_ref.dinov2_mu, computed_ref.dinov2_sigma = _mean_cov(ref_col.dino_stats, ref.path)
        computed_ref.pool = ref_col.pool

    def ref_value(name):
        got = getattr(pre, name)
        return got if got is not None else (getattr(computed_ref, name) if computed_ref is not None else None)

    if want("fid"):
        mu, sigma = _mean_cov(img_col.inc_stats, images.path)
        values["fid"] = M.frechet_distance(mu, sigma, ref_value("mu"), ref_value("sigma"))
    if want("sfid"):  # ADM's sFID: the same Frechet distance on the mixed_6/conv spatial statistics
        mu_s, sigma_s = _mean_cov(img_col.sp_stats, images.path)
        values["sfid"] = M.frechet_distance(mu_s, sigma_s, ref_value("mu_s"), ref_value("sigma_s"))
    if want("is"):
        values["is"], values["is_std"] = img_col.is_parts.compute()
    kid_subset = cfg.kid_subset_size
    if want("pr") or want("kid"):
        ref_pool = torch.from_numpy(np.asarray(ref_value("pool"), dtype=np.float32)).to(d.device)
        sam_pool = torch.from_numpy(img_col.pool).to(d.device)
        if want("pr"):
            try:
                values["precision"], values["recall"] = M.precision_recall(
                    ref_pool, sam_pool, k=cfg.pr_k, batch_size=cfg.pr_batch_size)
            except ValueError as e:  # too few images for k-NN balls
                skipped["pr"] = str(e)
        if want("kid"):
            try:
                values["kid"], values["kid_std"] = M.kernel_inception_distance(
                    sam_pool, ref_pool, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
                kid_subset = min(cfg.kid_subset_size, len(sam_pool), len(ref_pool))  # as the metric draws them
            except ValueError as e:
                skipped["kid"] = str(e)
    if dinov2 is not None and fdk not in skipped and ref is not None:
        mu, sigma = _mean_cov(img_col.dino_stats, images.path)
        values[fdk] = M.frechet_distance(mu, sigma, ref_value("dinov2_mu"), ref_value("dinov2_sigma"))
    values.update(pair_values)

    extractors = {}
    if inception is not None:
        extractors["inception"] = inception.identity
    if dinov2 is not None:
        extractors["dinov2"] = dinov2.identity
    from . import __version__

    result = {
        "kind": "eval",
        "rae_version": __version__,
        "metrics": values,
        "skipped": skipped,
        "num_images": len(images),
        "num_ref_images": len(ref.images) if ref is not None and ref.images is not None else None,
        # What was scored: its listing (file names and sizes) and, for a `rae decode` folder, its content id.
        "images": {"path": str(images.path.resolve()), "kind": images.kind, "listing_sha256": images.listing_sha256(),
                   "content_id": _artifact_content_id(images.path)},
        "reference": ref.identity(computed_ref) if ref is not None else None,
        "fid_reference": (None if "fid" not in values else "precomputed mu/sigma of the reference"
                          if pre.mu is not None else "computed from the reference images"),
        "sfid_reference": (None if "sfid" not in values else "precomputed mu_s/sigma_s of the reference"
                           if pre.mu_s is not None else "computed from the reference images"),
        "extractors": extractors,
        "protocol": {
            "is_split_size": cfg.is_split_size, "pr_k": cfg.pr_k,
            "pr_distances": "squared L2, float16 (float32 on overflow), as ADM",
            "sfid_features": f"Inception mixed_6/conv ({SPATIAL_LAYER}, after batch norm and ReLU), channels "
                             f"0-{SPATIAL_CHANNELS - 1} of the {SPATIAL_GRID}x{SPATIAL_GRID} map, flattened NHWC: "
                             f"{SPATIAL_DIM} dims, as ADM",
            "kid": f"polynomial kernel (x.y/d+1)^3, {cfg.kid_subsets} subsets of {kid_subset}, seed {cfg.seed}",
            "psnr_ssim": "per image on [0,255] (data range 255), then averaged; "
                         "SSIM Gaussian window 11, sigma 1.5, per channel",
            "world_size": d.world,
        },
        "config": jsonable(cfg),
    }
    out = Path(cfg.out) if cfg.out else default_out(cfg.images)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    result["written"] = str(out)

    if cfg.save_ref:
        stats = RefStats(pool=img_col.pool, meta={"source": str(images.path.resolve()), "num_images": len(images),
                                                  **({"inception": inception.identity} if inception else {}),
                                                  **({"dinov2": dinov2.identity} if dinov2 else {})})
        own = open_reference(images.path) if images.kind == "npz" else None
        own = own.stats if own is not None and own.kind == "adm-ref-batch" else RefStats()
        # Saving an ADM reference batch keeps its precomputed FID and sFID statistics (FID's are of the
        # whole training set), not those of the 10,000 images it carries.
        if own.mu is not None:
            stats.mu, stats.sigma = own.mu, own.sigma
            stats.meta["fid_statistics"] = "precomputed mu/sigma of the ADM reference batch"
        elif img_col.inc_stats is not None:
            stats.mu, stats.sigma = _mean_cov(img_col.inc_stats, images.path)
        if own.mu_s is not None:
            stats.mu_s, stats.sigma_s = own.mu_s, own.sigma_s
            stats.meta["sfid_statistics"] = "precomputed mu_s/sigma_s of the ADM reference batch"
        elif img_col.sp_stats is not None:
            stats.mu_s, stats.sigma_s = _mean_cov(img_col.sp_stats, images.path)
        if img_col.dino_stats is not None:
            stats.dinov2_mu, stats.dinov2_sigma = _mean_cov(img_col.dino_stats, images.path)
        if not stats.arrays():
            raise RaeError(f"--save-ref: no statistics could be computed ({'; '.join(skipped.values())})")
        Path(cfg.save_ref).parent.mkdir(parents=True, exist_ok=True)
        save_ref_stats(cfg.save_ref, stats)
        result["saved_ref"] = str(cfg.save_ref)
    return result


def _mean_cov(stats: M.FeatureStats, where) -> tuple[np.ndarray, np.ndarray]:
    if stats.n < 2:
        raise ArtifactError(f"{where}: need at least 2 images for feature statistics, have {stats.n}")
    return stats.mean_cov()
