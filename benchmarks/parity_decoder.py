"""Numerical parity of the decoder-training models with the authors' reference code (dev script).

    python benchmarks/parity_decoder.py --reference /path/to/RAE-checkout [--sizes vit-b,vit-xl] [--image-sizes 256,512]

Builds the reference modules and ours with the same random weights (decoder through
``from_reference_state_dict``) and prints the max absolute and relative difference of the
outputs, fp32 on CPU (``--device cuda``: encoder and decoder on the GPU, TF32 off):

* encoder: reference ``Dinov2withNorm`` (Hugging Face, needs ``transformers``) vs our timm DINOv2-B
  loaded from the same weights file through ``--encoder-weights``;
* decoder: reference ``GeneralDecoder`` (needs ``transformers``) vs ``ViTDecoder``, per size,
  including an upsampling (p_d = 32) case; also checks the fixed position embedding as built;
* discriminator: reference ``DinoDisc`` (recipe S_8, ks 9, spectral norm) vs ``DinoDiscriminator``
  on a random DINO ViT-S/8 written to a temporary file, with and without DiffAug (same seed);
* LPIPS: the ``lpips`` package (the same weights as the reference's) vs ``stages.train.losses.LPIPS``.

Not a test (tests never import the reference code); run it by hand after touching these files.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.models.decoder import DECODER_SIZES, ViTDecoder, from_reference_state_dict  # noqa: E402


def import_reference_package(alias: str, folder: Path) -> types.ModuleType:
    """Make ``folder`` importable as package ``alias`` without running its ``__init__`` (which pulls
    in dependencies these checks do not need)."""
    pkg = types.ModuleType(alias)
    pkg.__path__ = [str(folder)]
    sys.modules[alias] = pkg
    return pkg


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (ours.double() - ref.double()).abs().max().item()
    rel = diff / ref.double().abs().max().item()
    print(f"{name:48s} max|diff| {diff:.3e}   relative {rel:.3e}")
    return rel


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (incl. LayerNorm affine and the CLS token, which start at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pos_embed" in name:
                continue
            centre = 1.0 if p.dim() == 1 and "weight" in name else 0.0  # norm scales around 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1) + centre)


def check_decoder(ref_root: Path, size: str, patch_size: int, batch: int, device: str = "cpu", grid: int = 16) -> float:
    import json

    from transformers import ViTMAEConfig

    dec = importlib.import_module("ref_decoders.decoder")
    cfg_dir = ref_root / "configs/decoder" / {"vit-b": "ViTB", "vit-l": "ViTL", "vit-xl": "ViTXL"}[size]
    fields = json.loads((cfg_dir / "config.json").read_text())
    in_dim = 768
    # as the reference RAE sets it up for DINOv2-B at 224 (256 tokens) or at 448 (1024 tokens, 512 px)
    fields.update(hidden_size=in_dim, patch_size=patch_size, image_size=patch_size * grid)
    config = ViTMAEConfig(**{k: v for k, v in fields.items() if not k.startswith("_")})
    torch.manual_seed(0)
    ref = dec.GeneralDecoder(config, num_patches=grid * grid).eval()
    ours = ViTDecoder(in_dim, grid, patch_size, **DECODER_SIZES[size]).eval()
    print(f"{size} p_d={patch_size} grid {grid}x{grid}: params reference {sum(p.numel() for p in ref.parameters()) / 1e6:.2f}M, "
          f"ours {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M")
    report(f"  {size} fixed position embedding (as built)", ours.pos_embed, ref.decoder_pos_embed)

    randomize_(ref, seed=1)
    ours.load_state_dict(from_reference_state_dict(ref.state_dict()), strict=True)
    ref.to(device), ours.to(device)

    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
    z = torch.randn(batch, in_dim, grid, grid, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        # the reference RAE.decode: [B, C, h, w] -> tokens -> decoder (CLS kept) -> unpatchify -> un-normalise
        tokens = z.view(batch, in_dim, grid * grid).transpose(1, 2)
        x_ref = ref.unpatchify(ref(tokens, drop_cls_token=False).logits) * std + mean
        x_ours = ours(z)
    assert x_ours.shape == x_ref.shape == (batch, 3, grid * patch_size, grid * patch_size)
    return report(f"  {size} p_d={patch_size} {grid}x{grid} tokens -> {grid * patch_size} px [{device}]", x_ours, x_ref)


def check_encoder(ref_root: Path, batch: int, device: str = "cpu", image_size: int = 256) -> float:
    """Our timm DINOv2-B (+4 registers) encoder vs the reference's ``Dinov2withNorm`` (Hugging Face
    ``Dinov2WithRegistersModel``, final LayerNorm without affine) from the same random weights: the
    Hugging Face model is saved with ``save_pretrained`` (the layout of ``facebook/dinov2-with-
    registers-base``), the reference loads that folder, ours loads its ``model.safetensors`` through
    ``rae encode --encoder-weights`` (converted to the original DINOv2 layout, then timm's filter
    resamples the 37x37 position embedding to 16x16 once at load time; the reference interpolates
    at every forward). Images: 256x256 -> bicubic 224 -> ImageNet mean/std, as the reference's
    ``RAE.encode`` (512x512 -> 448 -> [768, 32, 32] for ``image_size`` 512)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from stages.models.encoders import build_encoder

    dinov2 = importlib.import_module("ref_encoders.dinov2")
    config = Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                       intermediate_size=3072, patch_size=14, image_size=518,
                                       num_register_tokens=4, layerscale_value=1.0)
    torch.manual_seed(0)
    hf = Dinov2WithRegistersModel(config).eval()
    randomize_(hf, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ref = dinov2.Dinov2withNorm(dinov2_path=tmp).eval()
        ours, _ = build_encoder("dinov2-b", image_size, weights=str(Path(tmp) / "model.safetensors"))
    ref.to(device), ours.to(device)
    size, grid = image_size * 7 // 8, image_size * 7 // 8 // 14  # 224 -> 16x16, 448 -> 32x32
    g = torch.Generator().manual_seed(8)
    images = (torch.rand(batch, 3, image_size, image_size, generator=g) * 255).round().to(torch.uint8).to(device)
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        x = torch.nn.functional.interpolate(images.float() / 255, size=(size, size), mode="bicubic",
                                            align_corners=False)
        tokens = ref((x - mean) / std)
        z_ref = tokens.transpose(1, 2).reshape(batch, 768, grid, grid)
        z_ours = ours(images)
        emb = hf.to(device).embeddings
        pos_ref = emb.interpolate_pos_encoding(torch.zeros(1, grid * grid + 1, 768, device=device), size, size)[:, 1:]
    report(f"  position embedding at {grid}x{grid} (timm at load vs HF per forward) [{device}]",
           ours.vit.pos_embed, pos_ref)
    return report(f"  DINOv2-B/14+reg4 latents [768, {grid}, {grid}] from {image_size} px [{device}]", z_ours, z_ref)


def check_discriminator(ref_root: Path, batch: int) -> float:
    import timm

    from stages.models.discriminator import diffaug
    from stages.models.weights import load_discriminator

    dinodisc = importlib.import_module("ref_disc.dinodisc")
    ref_diffaug = importlib.import_module("ref_disc.diffaug")
    torch.manual_seed(0)
    backbone = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dino_vits8.pth"
        torch.save(backbone.state_dict(), path)
        ref = dinodisc.DinoDisc(device=torch.device("cpu"), dino_ckpt_path=str(path), ks=9, norm_type="bn",
                                using_spec_norm=True, recipe="S_8")
        ours = load_discriminator(path, kernel_size=9)
    randomize_(ref.heads, seed=3)
    # only the spectral-norm names differ: weight_orig/_u/_v -> parametrizations.weight.original/0._u/0._v
    renames = {"weight_orig": "parametrizations.weight.original", "weight_u": "parametrizations.weight.0._u",
               "weight_v": "parametrizations.weight.0._v"}
    heads = {}
    for k, v in ref.heads.state_dict().items():
        prefix, _, last = k.rpartition(".")
        heads[f"{prefix}.{renames.get(last, last)}"] = v
    ours.heads.load_state_dict(heads, strict=True)
    ref.eval(), ours.eval()  # no power iteration: both use the stored u, v

    g = torch.Generator().manual_seed(4)
    images = torch.rand(batch, 3, 256, 256, generator=g)
    with torch.no_grad():
        rel = report("discriminator logits, no augmentation", ours(images, augment=False), ref(images * 2 - 1))
        aug = ref_diffaug.DiffAug(prob=1.0, cutout=0.2)
        torch.manual_seed(5)
        a_ref = aug.aug(images * 2 - 1)
        torch.manual_seed(5)
        a_ours = diffaug(images * 2 - 1, prob=1.0, cutout=0.2)
        rel = max(rel, report("DiffAug (translation, colour, cutout 0.2)", a_ours, a_ref))
        torch.manual_seed(6)
        l_ref = ref(ref_diffaug.DiffAug(prob=1.0, cutout=0.0).aug(images * 2 - 1))
        torch.manual_seed(6)
        l_ours = ours(images, augment=True)
        rel = max(rel, report("discriminator logits, DiffAug as configured", l_ours, l_ref))
    return rel


def check_lpips(batch: int) -> float:
    import lpips

    from stages.models.lpips import LPIPS

    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    # the package keeps torchvision's layer indices inside its slices: net.sliceK.<i>.* = features.<i>.*
    vgg = {"features." + k.split(".", 1)[1]: v for k, v in ref.net.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(vgg, Path(tmp) / "vgg16.pth")
        ours = LPIPS(vgg_weights=Path(tmp) / "vgg16.pth")
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(batch, 3, 64, 64, generator=g), torch.rand(batch, 3, 64, 64, generator=g)
    with torch.no_grad():
        return report("LPIPS(VGG) per-sample distances", ours(x, y), ref(x * 2 - 1, y * 2 - 1).flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="checkout of the reference RAE code")
    parser.add_argument("--sizes", default="vit-b,vit-l,vit-xl", help="decoder sizes to check")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: "
                                                   "encoder,decoder,discriminator,lpips")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (encoder and decoder; fp32, TF32 off)")
    parser.add_argument("--image-sizes", default="256", help="comma list: 256 (16x16 tokens) and/or 512 "
                                                              "(DINOv2 at 448: 32x32 tokens, the 512 decoder)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_grad_enabled(True)
    skip = set(filter(None, args.skip.split(",")))
    src = args.reference / "src"
    import_reference_package("ref_decoders", src / "stage1/decoders")
    import_reference_package("ref_disc", src / "disc")
    import_reference_package("ref_encoders", src / "stage1/encoders")
    sys.modules["ref_encoders"].register_encoder = lambda *a, **k: (lambda cls: cls)  # its registry decorator

    worst = 0.0
    image_sizes = [int(v) for v in args.image_sizes.split(",")]
    if "encoder" not in skip:
        for image_size in image_sizes:
            worst = max(worst, check_encoder(args.reference, args.batch, args.device, image_size))
    if "decoder" not in skip:
        for image_size in image_sizes:
            grid = image_size // 16
            for size in args.sizes.split(","):
                worst = max(worst, check_decoder(args.reference, size, 16, args.batch, args.device, grid))
            if image_size == 256:  # p_d = 2 p_e: 16x16 tokens to 512 px
                worst = max(worst, check_decoder(args.reference, "vit-b", 32, args.batch, args.device))
    if "discriminator" not in skip:
        worst = max(worst, check_discriminator(args.reference, args.batch))
    if "lpips" not in skip:
        worst = max(worst, check_lpips(args.batch))
    print(f"worst relative difference {worst:.3e} ({'OK' if worst < 1e-5 else 'ABOVE 1e-5'})")


if __name__ == "__main__":
    main()
