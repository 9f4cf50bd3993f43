"""The whole chain through the real command line, at the smallest sizes: each stage reads the
previous stage's artifacts from disk, as `make all` runs it."""
import json

import numpy as np

from tests.conftest import run_rae


def test_demo_chain_end_to_end(demo_images, tmp_path):
    o = tmp_path
    run_rae("encode", demo_images, "--out", o / "lat.zarr", "--preset", "demo", "--num-workers", "0")
    run_rae("train-decoder", "--latents", o / "lat.zarr", "--out", o / "dec", "--preset", "demo", "--steps", "6",
            "--batch-size", "8", "--lpips-start-step", "3", "--disc-start-step", "3", "--gan-start-step", "4",
            "--num-workers", "0", "--preview-every", "3", "--checkpoint-every", "3")
    run_rae("train-diffusion", "--latents", o / "lat.zarr", "--out", o / "dit", "--preset", "demo", "--steps", "6",
            "--batch-size", "8", "--decay-end-step", "6", "--sample-every", "0", "--num-samples", "2",
            "--sample-steps", "2", "--checkpoint-every", "3")
    run_rae("sample", "--model", o / "dit", "--out", o / "s.zarr", "--preset", "demo", "--per-class", "1",
            "--steps", "3")
    run_rae("decode", o / "s.zarr", "--decoder", o / "dec", "--out", o / "img")
    with np.load(o / "img" / "samples.npz") as f:
        assert f["arr_0"].shape == (10, 64, 64, 3) and f["arr_0"].dtype == np.uint8
        assert sorted(f["arr_1"].tolist()) == list(range(10))
    assert (o / "img" / "grid.png").is_file() and (o / "dec" / "reconstructions.png").is_file()
    run_rae("eval", o / "img", "--ref", demo_images, "--fd-encoder", o / "lat.zarr", "--offline",
            "--metrics", "fd_dinov2", "--device", "cpu", "--num-workers", "0")
    result = json.loads((o / "img" / "eval.json").read_text())
    assert np.isfinite(result["metrics"]["fd_rae"]) and result["metrics"]["fd_rae"] > 0
    # Running a finished stage again reuses it.
    again = run_rae("sample", "--model", o / "dit", "--out", o / "s.zarr", "--preset", "demo", "--per-class", "1",
                    "--steps", "3")
    assert "already complete" in " ".join((again.stdout + again.stderr).split())
