import numpy as np
import pytest
from PIL import Image

from stages.encode import EncodeConfig, run as encode
from stages.errors import ArtifactError
from stages.evaluate import EvalConfig, run as evaluate


def test_fd_in_the_rae_encoders_space_needs_no_downloads_and_separates_noise(demo_images, tmp_path):
    store = tmp_path / "s.zarr"
    encode(EncodeConfig(data=str(demo_images), out=str(store), encoder="dinov2-demo", random_init=True, image_size=64,
                        block_size=16, shard_size=8, num_workers=0, device="cpu"))
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    common = dict(ref=str(demo_images), fd_encoder=str(store), offline=True, metrics=("fd_dinov2",),
                  num_workers=0, device="cpu")
    same = evaluate(EvalConfig(images=str(demo_images), out=str(tmp_path / "a.json"), **common))
    far = evaluate(EvalConfig(images=str(noise), out=str(tmp_path / "b.json"), **common))
    assert abs(same["metrics"]["fd_rae"]) < 1e-3
    assert far["metrics"]["fd_rae"] > 1.0


def test_fd_encoder_refuses_an_unfinished_store(tmp_path, demo_images):
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(ArtifactError):
        evaluate(EvalConfig(images=str(demo_images), ref=str(demo_images), fd_encoder=str(tmp_path / "x.zarr"),
                            offline=True, metrics=("fd_dinov2",), num_workers=0, device="cpu",
                            out=str(tmp_path / "e.json")))
