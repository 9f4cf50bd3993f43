"""The RAE encoders (stages/encoders.py): the recipe, token grids, weights files and offline errors.

Features are compared exactly: both sides run the same timm modules on the same inputs."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stages.errors import RaeError
from stages.models.encoders import ENCODERS, Encoder, build_encoder, spec_for
from stages.models.weights import MissingWeightsError, WeightsFileError


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
    # The same operations in the same order on the same inputs (timm's forward_features is patch_embed,
    # _pos_embed, the blocks, the norm): exact.
    assert torch.equal(got, expected)


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
            assert torch.equal(enc.vit.state_dict()[name], p)  # copied, not recomputed
    # Same weights, different seed at build time: identical features (same operations, exact).
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(enc(images), Encoder(vit, spec, 64)(images))


def _original_dinov2_layout(spec, grid: int, seed: int) -> dict:
    """A DINOv2-with-registers checkpoint in Meta's original layout (what timm converts from), with a
    position embedding for a ``grid`` x ``grid`` pretraining resolution (plus the CLS position)."""
    g = torch.Generator().manual_seed(seed)
    d, depth = spec.timm_kwargs["embed_dim"], spec.timm_kwargs["depth"]
    r = lambda *shape: 0.05 * torch.randn(*shape, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, d), "register_tokens": r(1, 4, d), "mask_token": r(1, d),
          "pos_embed": r(1, 1 + grid * grid, d), "patch_embed.proj.weight": r(d, 3, 14, 14),
          "patch_embed.proj.bias": r(d), "norm.weight": 1 + r(d), "norm.bias": r(d)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                   b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                   b + "ls1.gamma": 1 + r(d), b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d),
                   b + "mlp.fc1.weight": r(4 * d, d), b + "mlp.fc1.bias": r(4 * d), b + "mlp.fc2.weight": r(d, 4 * d),
                   b + "mlp.fc2.bias": r(d), b + "ls2.gamma": 1 + r(d)})
    return sd


def _transformers_layout(sd: dict) -> dict:
    """The same weights under Hugging Face ``Dinov2WithRegistersModel`` names (the reference's encoder)."""
    hf = {"embeddings.cls_token": sd["cls_token"], "embeddings.register_tokens": sd["register_tokens"],
          "embeddings.mask_token": sd["mask_token"], "embeddings.position_embeddings": sd["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
          "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    for key, v in sd.items():
        if not key.startswith("blocks."):
            continue
        _, i, rest = key.split(".", 2)
        layer = f"encoder.layer.{i}."
        module, param = rest.rsplit(".", 1)
        if module == "attn.qkv":
            for part, name in zip(v.chunk(3), ("query", "key", "value")):
                hf[f"{layer}attention.attention.{name}.{param}"] = part
        elif module in ("ls1", "ls2"):
            hf[f"{layer}layer_scale{module[-1]}.lambda1"] = v
        else:
            hf[f"{layer}{names[module]}.{param}"] = v
    return hf


def test_transformers_dinov2_checkpoint_gives_the_same_encoder_as_the_original(tmp_path):
    """The reference code's encoder weights (Hugging Face layout, e.g. the hub folder of
    facebook/dinov2-with-registers-base) load through --encoder-weights into the same encoder as
    Meta's original checkpoint, position embedding resampled (6x6 -> 4x4) as timm does."""
    spec = ENCODERS["dinov2-demo"]
    original = _original_dinov2_layout(spec, grid=6, seed=5)
    paths = {"original": tmp_path / "original.pth", "transformers": tmp_path / "model.safetensors"}
    torch.save(original, paths["original"])
    save_file({k: v.contiguous() for k, v in _transformers_layout(original).items()}, str(paths["transformers"]))
    enc = {name: build_encoder("dinov2-demo", image_size=64, weights=str(p))[0] for name, p in paths.items()}
    for name, p in enc["original"].vit.state_dict().items():
        assert torch.equal(enc["transformers"].vit.state_dict()[name], p)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(enc["transformers"](images), enc["original"](images))
    assert enc["original"](images).abs().max() > 0.1  # the features are not trivially zero


def test_pickled_or_corrupt_weights_are_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(WeightsFileError):
        build_encoder("dinov2-demo", image_size=64, weights=str(bad))
    with pytest.raises(MissingWeightsError):
        build_encoder("dinov2-demo", image_size=64, weights=str(tmp_path / "nope.safetensors"))


def test_offline_without_weights_is_one_clear_line(tmp_path, monkeypatch, capfd):
    # In this process, as HF_HUB_OFFLINE=1 and an empty HF_HOME would configure huggingface_hub at import
    # (its constants are read then, so they are set here directly), and with every connection refused
    # in case a download is attempted anyway.
    import socket

    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if hasattr(hf, name):
            monkeypatch.setattr(hf, name, str(tmp_path / "hf" / ("" if name == "HF_HOME" else "hub")))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("tried the network"))
    with pytest.raises(MissingWeightsError) as e:
        build_encoder("dinov2-s", 256)
    line = str(e.value)
    assert "\n" not in line and capfd.readouterr().out == ""
    assert "vit_small_patch14_reg4_dinov2.lvd142m" in line and "model.safetensors" in line
    assert "--encoder-weights" in line


def test_random_init_is_deterministic_from_seed():
    a, da = build_encoder("dinov2-demo", 64, pretrained=False, seed=3)
    b, db = build_encoder("dinov2-demo", 64, pretrained=False, seed=3)
    c, dc = build_encoder("dinov2-demo", 64, pretrained=False, seed=4)
    assert da == db != dc
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(a(x), b(x))


# ---- any timm ViT: --encoder timm:MODEL_NAME -----------------------------------------------------------

DINOV3 = "timm:vit_small_patch16_dinov3"


def test_a_timm_vit_is_an_encoder_with_its_own_patch_normalisation_and_grid(tmp_path):
    spec = spec_for(DINOV3)
    assert (spec.patch_size, spec.width, spec.timm_name) == (16, 384, "vit_small_patch16_dinov3.lvd1689m")
    assert spec.latent_shape(256) == (384, 16, 16) and spec.latent_shape(512) == (384, 32, 32)
    assert spec_for("timm:vit_small_patch14_dinov2.lvd142m").input_size(256) == 224  # DINOv2's 16 px grid
    assert spec_for("timm:vit_base_patch16_siglip_256.v2_webli").mean == (0.5, 0.5, 0.5)
    # Its weights through the same loading path as the named encoders: a local file, its sha256 recorded.
    torch.manual_seed(5)
    vit = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=64)
    path = tmp_path / "dinov3.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    enc, digest = build_encoder(DINOV3, image_size=64, weights=str(path))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    z = enc(images)
    assert z.shape == (2, 384, 4, 4) and len(digest) == 64
    # The class token and the 4 registers are dropped; the tokens are the affine-free final norm's.
    x = (images.float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    vit.norm = torch.nn.LayerNorm(384, eps=vit.norm.eps, elementwise_affine=False)
    tokens = vit.eval().forward_features(x)
    assert vit.num_prefix_tokens == 5 and torch.equal(z, tokens[:, 5:].transpose(1, 2).reshape(2, 384, 4, 4))


def test_timm_names_that_cannot_be_encoders_are_one_line():
    with pytest.raises(RaeError, match="timm has no model 'vit_nonexistent'"):
        spec_for("timm:vit_nonexistent")
    with pytest.raises(RaeError, match="not a ViT"):
        spec_for("timm:resnet18")
    with pytest.raises(RaeError, match="or timm:MODEL_NAME"):
        spec_for("dinov9")


def test_a_timm_encoder_offline_without_weights_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if hasattr(hf, name):
            monkeypatch.setattr(hf, name, str(tmp_path / "hf" / ("" if name == "HF_HOME" else "hub")))
    with pytest.raises(MissingWeightsError) as e:
        build_encoder(DINOV3, 256)
    assert "\n" not in str(e.value) and "vit_small_patch16_dinov3" in str(e.value) and "--encoder-weights" in str(e.value)
