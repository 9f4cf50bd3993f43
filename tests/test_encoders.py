import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stages.encoders import ENCODERS, Encoder, build_encoder
from stages.weights import MissingWeightsError, WeightsFileError


def _independent_dinov2_features(vit, images_uint8, input_size):
    """The RAE encoder recipe written out by hand on timm's pieces."""
    x = images_uint8.float() / 255
    x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = vit.patch_embed((x - mean) / std)
    x = vit._pos_embed(x)
    for blk in vit.blocks:
        x = blk(x)
    x = F.layer_norm(x, x.shape[-1:], eps=vit.norm.eps)  # final LayerNorm, no affine
    tokens = x[:, 5:]                                       # drop CLS + 4 registers
    b, n, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, 4, 4)


def test_encoder_recipe_matches_independent_computation():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, num_classes=0,
                            embed_dim=48, depth=2, num_heads=2)
    # Give the final norm a non-trivial affine: the recipe must ignore it.
    vit.norm.weight.data.uniform_(0.5, 2.0)
    vit.norm.bias.data.uniform_(-1, 1)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    expected = _independent_dinov2_features(vit, images, 56)
    enc = Encoder(vit, ENCODERS["dinov2-demo"], image_size=64)
    got = enc(images)
    assert got.shape == (3, 48, 4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,size,shape", [
    ("dinov2-b", 256, (768, 16, 16)), ("siglip2-b", 256, (768, 16, 16)), ("mae-b", 256, (768, 16, 16)),
    ("dinov2-b", 512, (768, 32, 32)), ("dinov2-s", 256, (384, 16, 16)), ("dinov2-l", 256, (1024, 16, 16)),
])
def test_real_size_encoders_build_with_right_token_grid(name, size, shape):
    spec = ENCODERS[name]
    assert spec.latent_shape(size) == shape
    with torch.device("meta"):
        vit = timm.create_model(spec.timm_name.split(".")[0], pretrained=False, img_size=spec.input_size(size),
                                num_classes=0)
        enc = Encoder(vit, spec, size)
        out = enc(torch.zeros(2, 3, size, size))
    assert tuple(out.shape) == (2, *shape)


def test_weights_load_from_local_file_through_timm(tmp_path):
    spec = ENCODERS["dinov2-demo"]
    torch.manual_seed(123)
    vit = timm.create_model(spec.timm_name.split(".")[0], pretrained=False, img_size=56, num_classes=0,
                            **spec.timm_kwargs)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    enc, digest = build_encoder("dinov2-demo", image_size=64, weights=str(path))
    assert len(digest) == 64
    for name, p in vit.state_dict().items():
        if not name.startswith("norm."):  # the encoder's final norm is the affine-free one
            torch.testing.assert_close(enc.vit.state_dict()[name], p)
    # Same weights, different seed at build time: identical features.
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(enc(images), Encoder(vit, spec, 64)(images))


def test_pickled_or_corrupt_weights_are_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(WeightsFileError):
        build_encoder("dinov2-demo", image_size=64, weights=str(bad))
    with pytest.raises(MissingWeightsError):
        build_encoder("dinov2-demo", image_size=64, weights=str(tmp_path / "nope.safetensors"))


def test_offline_without_weights_is_one_clear_line(tmp_path):
    code = ("from stages.encoders import build_encoder\n"
            "from stages.weights import MissingWeightsError\n"
            "try:\n    build_encoder('dinov2-s', 256)\n"
            "except MissingWeightsError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    lines = [l for l in out.splitlines() if l.startswith("ERR")]
    assert len(lines) == 1 and len(out.strip().splitlines()) == 1
    assert "vit_small_patch14_reg4_dinov2.lvd142m" in lines[0] and "model.safetensors" in lines[0]
    assert "--encoder-weights" in lines[0]


def test_random_init_is_deterministic_from_seed():
    a, da = build_encoder("dinov2-demo", 64, pretrained=False, seed=3)
    b, db = build_encoder("dinov2-demo", 64, pretrained=False, seed=3)
    c, dc = build_encoder("dinov2-demo", 64, pretrained=False, seed=4)
    assert da == db != dc
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(a(x), b(x))
