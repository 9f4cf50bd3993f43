"""The feature networks of ``rae eval`` and their loading.

Inception: torch-fidelity's TF-exact InceptionV3 (same graph and weights as the ADM suite; TF1
bilinear resize to 299 inside), pool3 (2048) for FID/PR/KID, the unbiased logits (1008) for IS and,
from the same forward pass, ADM's sFID features: the TF graph's ``mixed_6/conv`` (the 1x1 branch of
``mixed_6``, torch-fidelity's ``Mixed_6d.branch1x1`` after its batch norm and ReLU,
[B, 192, 17, 17]), its first 7 channels flattened in TF's NHWC order (17 x 17 x 7 = 2,023). sFID is
the Frechet distance of those features' mean/covariance (FID's functions, float64) between the images
and the reference, the same reference batch as FID. Its weights are torch-fidelity's own file, read
from the torch hub cache where torch-fidelity puts it (downloaded there on first use) or from
``--inception-weights FILE``; the file is read with ``weights_only`` (tensors, never pickled code)
and handed to torch-fidelity's class.

DINOv2 (FD_DINOv2 as EDM2 / dgm-eval report it): ViT-L/14, images resized bicubic (antialiased) to
224, ImageNet mean/std, the CLS token after the final LayerNorm; the position embedding is resampled
to 16x16 the way the torch hub DINOv2 does it. With ``--fd-encoder`` the FD is taken in a latent
store's RAE encoder space instead (mean-pooled tokens).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts.manifest import read_manifest
from ..digests import sha256_file
from ..errors import ArtifactError
from ..models.encoders import build_encoder
from ..models.imagenet import IMAGENET_MEAN, IMAGENET_STD
from ..models.weights import (MissingWeightsError, WeightsFileError, create_timm_model, hf_download_hint,
                              load_state_dict_file, reachable)
from .inputs import first_line

DINOV2_DEFAULT = "vit_large_patch14_dinov2.lvd142m"   # DINOv2 ViT-L/14, as EDM2's FD_DINOv2
# ADM's sFID features: the TF graph's "mixed_6/conv:0" (blocks mixed, mixed_1, ... = torchvision's
# Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d: mixed_6 is Mixed_6d, its "conv" the 1x1 branch, whose op is the
# ReLU after the batch norm), [N, 17, 17, 192] NHWC; ADM keeps spatial[..., :7] and flattens per image.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2,023


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
                               f"{first_line(e)[:200]}") from None
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
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

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


@contextlib.contextmanager
def exact_float32():
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
