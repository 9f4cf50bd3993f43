import numpy as np
import pytest
from PIL import Image

from stages.encode import EncodeConfig, run as encode
from stages.errors import ArtifactError
from stages.eval.evaluate import EvalConfig, run as evaluate


def test_fd_in_the_rae_encoders_space_needs_no_downloads_and_separates_noise(demo_images, tmp_path):
    store = tmp_path / "s.zarr"
    encode(EncodeConfig(data=str(demo_images), out=str(store), encoder="dinov2-demo", random_init=True, image_size=64,
                        block_size=16, shard_size=8, num_workers=0, device="cpu"))
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    common = dict(ref=str(demo_images), fd_encoder=str(store), offline=True, metrics=("fd_dinov2",),
                  num_workers=0, device="cpu")
    same = evaluate(EvalConfig(images=str(demo_images), out=str(tmp_path / "a.json"), **common))
    far = evaluate(EvalConfig(images=str(noise), out=str(tmp_path / "b.json"), **common))
    # The same 40 images on both sides (features bit for bit equal: same batches and kernels): FD = 0 up
    # to float64 rounding, which for a rank-39 covariance of 96-dim features (||sigma|| = 23 here) is
    # dominated by the square roots of the 57 null eigenvalues' errors (~96 u64 ||sigma||^2 each):
    # <= 2 (57 sqrt(96 u64) + 39 * 96 u64) ||sigma|| = 2.7e-4 (see test_metrics).
    assert abs(same["metrics"]["fd_rae"]) < 1e-3
    assert far["metrics"]["fd_rae"] > 1.0  # noise images: ~50 (seeded; float32 features move it ~1e-5)


def test_fd_encoder_refuses_an_unfinished_store(tmp_path, demo_images):
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(ArtifactError):
        evaluate(EvalConfig(images=str(demo_images), ref=str(demo_images), fd_encoder=str(tmp_path / "x.zarr"),
                            offline=True, metrics=("fd_dinov2",), num_workers=0, device="cpu",
                            out=str(tmp_path / "e.json")))
