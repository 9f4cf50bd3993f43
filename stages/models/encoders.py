"""The frozen representation encoders of RAE, built through timm.

Recipe (the reference code's ``encode``; README, "`rae encode`"): the 256x256 crop is resized
bicubic (no antialiasing, as ``F.interpolate`` in the reference) to the encoder's input size,
normalised with the encoder's mean/std, the ViT runs, its final LayerNorm is applied *without* its
affine weight and bias, the prefix tokens (CLS, registers) are dropped, and the remaining tokens
are laid out as a [C, h, w] grid.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RaeError
from .imagenet import IMAGENET_MEAN, IMAGENET_STD
from .weights import create_timm_model

HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderSpec:
    timm_name: str          # registry name with pretrained tag
    patch_size: int
    width: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    input_scale: float | None = 1.0  # encoder input size = image size * input_scale (DINOv2: 224/256)
    timm_kwargs: dict = field(default_factory=dict)  # architecture overrides (tiny test/demo models)

    def input_size(self, image_size: int) -> int:
        if self.input_scale is None:  # `timm:NAME`: the image size, or DINOv2's rule (a 16 px grid) when not divisible
            return image_size if image_size % self.patch_size == 0 else image_size // 16 * self.patch_size
        size = round(image_size * self.input_scale)
        if size % self.patch_size:
            raise RaeError(f"image size {image_size} gives encoder input {size}, not a multiple of "
                           f"the patch size {self.patch_size}")
        return size

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        g = self.input_size(image_size) // self.patch_size
        return (self.width, g, g)


_DINO = dict(input_scale=224 / 256)
ENCODERS: dict[str, EncoderSpec] = {
    # DINOv2 with 4 registers: 256 px images -> 224 input -> 16x16 tokens (512 -> 448 -> 32x32).
    "dinov2-s": EncoderSpec("vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, **_DINO),
    "dinov2-b": EncoderSpec("vit_base_patch14_reg4_dinov2.lvd142m", 14, 768, **_DINO),
    "dinov2-l": EncoderSpec("vit_large_patch14_reg4_dinov2.lvd142m", 14, 1024, **_DINO),
    # SigLIP2-B/16 at 256 (no CLS token), mean/std 0.5.
    "siglip2-b": EncoderSpec("vit_base_patch16_siglip_256.v2_webli", 16, 768, mean=HALF, std=HALF),
    # MAE-B/16 at 256 input (the 224 position embedding resampled to 16x16), no masking.
    "mae-b": EncoderSpec("vit_base_patch16_224.mae", 16, 768),
    # The demonstration encoder: the DINOv2-with-registers architecture at a small width, random
    # weights from a fixed seed. Real code path, not a real representation.
    "dinov2-demo": EncoderSpec("vit_small_patch14_reg4_dinov2.lvd142m", 14, 96, **_DINO,
                               timm_kwargs=dict(embed_dim=96, depth=4, num_heads=4)),
}


TIMM = "timm:"


def spec_for(name: str) -> EncoderSpec:
    """A named encoder, or ``timm:MODEL_NAME``: any timm ViT (e.g. DINOv3's ``vit_base_patch16_dinov3``)."""
    if name.startswith(TIMM):
        return timm_spec(name[len(TIMM):])
    if name not in ENCODERS:
        raise RaeError(f"unknown encoder '{name}'; choose one of: {', '.join(ENCODERS)}, or timm:MODEL_NAME")
    return ENCODERS[name]


@functools.lru_cache(maxsize=None)
def timm_spec(model_name: str) -> EncoderSpec:
    """The spec of a timm ViT, from its architecture (built on the meta device: no weights, no memory):
    its patch size, width and pretrained normalisation; the token grid follows the image size
    (``EncoderSpec.input_size``); prefix tokens (class, registers) are dropped as for DINOv2."""
    import timm

    if not timm.is_model(model_name):
        raise RaeError(f"timm has no model {model_name!r} (timm {timm.__version__}; `timm.list_models('*dinov3*')` "
                       "lists names)")
    try:
        with torch.device("meta"):
            vit = timm.create_model(model_name, pretrained=False, num_classes=0)
    except Exception as e:
        raise RaeError(f"cannot build timm model {model_name!r}: {str(e).splitlines()[0][:160]}") from None
    patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if patch is None or not hasattr(vit, "forward_features") or not isinstance(getattr(vit, "norm", None), nn.LayerNorm):
        raise RaeError(f"timm model {model_name!r} is not a ViT with a patch embedding and a final LayerNorm: "
                       "rae cannot take its tokens as latents")
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    cfg = getattr(vit, "pretrained_cfg", {}) or {}
    name = model_name if "." in model_name or not cfg.get("tag") else f"{model_name}.{cfg['tag']}"
    return EncoderSpec(name, int(patch), int(vit.embed_dim), tuple(cfg.get("mean", IMAGENET_MEAN)),
                       tuple(cfg.get("std", IMAGENET_STD)), input_scale=None)


class Encoder(nn.Module):
    """A frozen timm ViT turned into an RAE encoder: uint8 or [0, 1] images -> [B, C, h, w] latents."""

    def __init__(self, vit: nn.Module, spec: EncoderSpec, image_size: int):
        super().__init__()
        self.spec = spec
        self.image_size = image_size
        self.input_size = spec.input_size(image_size)
        self.grid = self.input_size // spec.patch_size
        self.vit = vit
        # The final LayerNorm without its affine: RAE's latents are the normalised features.
        norm = vit.norm
        vit.norm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
        self.num_prefix = getattr(vit, "num_prefix_tokens", 0)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen, always in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # One memory layout whatever the caller's (a crop batch may arrive channels-last): kernels pick
        # their algorithm, hence their rounding, by layout, and a store must not depend on the crop path.
        images = images.contiguous()
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        tokens = self.vit.forward_features(x)[:, self.num_prefix:]
        b, n, c = tokens.shape
        g = int(math.isqrt(n))
        return tokens.transpose(1, 2).reshape(b, c, g, g)


def build_encoder(name: str, image_size: int = 256, weights: str | None = None, pretrained: bool = True,
                  seed: int = 0) -> tuple[Encoder, str]:
    """Build encoder ``name`` for ``image_size`` images. Returns ``(encoder, weights sha256)``.

    ``weights``: a local checkpoint file; else the timm pretrained weights (cache or download);
    ``pretrained=False``: random weights from ``seed`` (tests and the demonstration preset).
    """
    spec = spec_for(name)
    kwargs = dict(img_size=spec.input_size(image_size), num_classes=0, **spec.timm_kwargs)
    if not pretrained and weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit, digest = create_timm_model(spec.timm_name, pretrained=False, **kwargs)
    else:
        convert = dinov2_from_transformers if spec.timm_name.endswith("_dinov2.lvd142m") else None
        vit, digest = create_timm_model(spec.timm_name, weights=weights, pretrained=True,
                                        flag="--encoder-weights", convert=convert, **kwargs)
    return Encoder(vit, spec, image_size), digest


# The weights' sha256 of an encoder identity that no file was at hand for (``rae import`` without
# --encoder-weights and nothing in the cache); ``rae decode`` accepts it against any digest, with a note.
UNKNOWN_DIGEST = "unknown"


def encoder_identity(name: str, image_size: int, digest: str, pretrained: bool) -> dict:
    """What a store records about its encoder, and what later stages check against."""
    spec = spec_for(name)
    c, h, w = spec.latent_shape(image_size)
    return dict(name=name, timm_name=spec.timm_name, weights_sha256=digest, pretrained=pretrained,
                input_size=spec.input_size(image_size), patch_size=spec.patch_size, width=c,
                latent_shape=[c, h, w], mean=list(spec.mean), std=list(spec.std))


def dinov2_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A Hugging Face transformers ``Dinov2WithRegistersModel`` / ``Dinov2Model`` state dict (the
    reference code's encoder, e.g. ``facebook/dinov2-with-registers-base``) in the original DINOv2
    layout, which timm's checkpoint filter then maps onto its model (resampling the position
    embedding as for a download). Returns None for any other layout."""
    prefix = "dinov2." if "dinov2.embeddings.cls_token" in state else ""
    if prefix + "embeddings.cls_token" not in state:
        return None
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, -1),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")})
    names = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in layers:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat(
                [sd[f"{src}attention.attention.{n}.{p}"] for n in ("query", "key", "value")])
        out[f"{dst}ls1.gamma"] = sd[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = sd[f"{src}layer_scale2.lambda1"]
    return out
