"""The training and sampling stages through the real command line under 2 processes (torchrun,
gloo, CPU) against the same stages in one process: from one latent store, with the same global
batch and the same seeds, both chains must give the same weights, losses, samples and images.

Sizes are those of tests/test_pipeline.py (the demo preset, 40 images of 64 px, 6 training steps of
8). The sample run draws 70 samples with the demo preset's block of 64, so that the second process
really gets a block (ranks take alternate blocks: 0-63 on rank 0, 64-69 on rank 1; decode's chunks of
64 split the same way). About 50 s on 2 CPU cores, most of it process start-up."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.store import LatentStore
from tests.conftest import run_rae

# Tolerances. Both runs are float32 on the CPU (precision "auto") with the same seeds, the same data
# order and the same per-sample noise; they differ only in the order of floating-point sums: the
# gradient of a global batch of 8 is one mean over 8 samples in one process, and the mean of two
# half-batch means (gloo all-reduce) under torchrun: a few float32 ulps per step, which AdamW (its
# update divides by sqrt(v)) can amplify for parameters with tiny gradients. Measured after 6 steps:
# at most 1.0e-6 absolute on any weight (relative differences are large only for weights near zero,
# hence the atol), 1.2e-7 on the logged losses. The bounds below are those of the stage tests
# (test_train_diffusion, test_train_decoder): 10x above that noise, far below a real bug (a wrong
# batch split or a per-rank seed moves weights by ~lr = 1e-3 in one step).
WEIGHTS_TOL = dict(rtol=1e-4, atol=1e-5)
LOSS_TOL = dict(rel=1e-4, abs=1e-6)
# The sample stores hold float16 (the default); a float32 difference of ~1e-6 may round to the
# neighbouring float16 value, i.e. one ulp: 2^-10 relative (~1e-3) of the value. 2e-3 relative plus
# 1e-3 absolute (near-zero values) allows that one ulp and nothing more (measured: identical).
LATENT_TOL = dict(rtol=2e-3, atol=1e-3)

DECODER_ARGS = ["--preset", "demo", "--steps", 6, "--batch-size", 8, "--lpips-start-step", 3,
                "--disc-start-step", 3, "--gan-start-step", 4, "--num-workers", 0, "--preview-every", 3,
                "--checkpoint-every", 3, "--log-every", 1,
                # DiffAug draws its augmentations per rank, so with it the runs agree only in
                # distribution (see test_train_decoder); everything else is drawn per sample.
                "--disc-aug-prob", 0.0]
DIFFUSION_ARGS = ["--preset", "demo", "--steps", 6, "--batch-size", 8, "--decay-end-step", 6, "--sample-every", 0,
                  "--num-samples", 2, "--sample-steps", 2, "--checkpoint-every", 3, "--log-every", 1]
SAMPLE_ARGS = ["--preset", "demo", "--per-class", 7, "--steps", 3]


@pytest.fixture(scope="module")
def chains(demo_images, tmp_path_factory):
    """{1: run folder, 2: run folder}: decoder, diffusion, samples and images from one store."""
    root = tmp_path_factory.mktemp("chains")
    store = root / "lat.zarr"
    run_rae("encode", demo_images, "--out", store, "--preset", "demo", "--num-workers", "0")
    out = {}
    for nproc in (1, 2):
        o = root / f"p{nproc}"
        launch = dict(nproc=nproc if nproc > 1 else None)
        run_rae("train-decoder", "--latents", store, "--out", o / "dec", *DECODER_ARGS, **launch)
        run_rae("train-diffusion", "--latents", store, "--out", o / "dit", *DIFFUSION_ARGS, **launch)
        run_rae("sample", "--model", o / "dit", "--out", o / "s.zarr", *SAMPLE_ARGS, **launch)
        run_rae("decode", o / "s.zarr", "--decoder", o / "dec", "--out", o / "img", **launch)
        out[nproc] = o
    return out


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_same_weights(one, two, names):
    for name in names:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], **WEIGHTS_TOL, msg=lambda m, k=k: f"{name} {k}: {m}")


def _assert_same_losses(one, two):
    """Every logged value of every step (losses, gradient norms, learning rates; not the speed)."""
    ra, rb = _metrics(one), _metrics(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 7))
    for a, b in zip(ra, rb):
        assert a.keys() == b.keys(), a["step"]
        for k in a.keys() - {"img_per_s"}:
            assert b[k] == pytest.approx(a[k], **LOSS_TOL), (a["step"], k)


def test_train_diffusion_two_processes_equal_one(chains):
    one, two = chains[1] / "dit", chains[2] / "dit"
    _assert_same_weights(one, two, ("model.safetensors", "model_ema.safetensors"))
    _assert_same_losses(one, two)
    # The weights moved: the comparison is not between two untouched initialisations.
    first = _metrics(one)
    assert first[0]["loss"] != first[-1]["loss"]


def test_sample_two_processes_equal_one(chains):
    a, b = LatentStore(chains[1] / "s.zarr"), LatentStore(chains[2] / "s.zarr")
    assert np.array_equal(a.labels[:], b.labels[:]) and np.array_equal(a.group["seeds"][:], b.group["seeds"][:])
    assert sorted(np.asarray(a.labels[:]).tolist()) == sorted(list(range(10)) * 7)
    la, lb = np.asarray(a.latents[:], np.float32), np.asarray(b.latents[:], np.float32)
    assert la.shape == lb.shape == (70, 96, 4, 4) and np.isfinite(la).all()
    # Both ranks' blocks of the 2-process store were written (rank 1's block 64-69 is not left at zero).
    assert (np.abs(lb).reshape(70, -1).max(axis=1) > 0).all()
    np.testing.assert_allclose(lb, la, **LATENT_TOL)


def test_train_decoder_two_processes_equal_one_and_decode_the_samples(chains):
    one, two = chains[1] / "dec", chains[2] / "dec"
    _assert_same_weights(one, two, ("decoder.safetensors", "decoder_ema.safetensors"))
    _assert_same_losses(one, two)
    # The 2-process samples decoded (under 2 processes) with the 2-process decoder: the same files as
    # the 1-process chain.
    ia, ib = chains[1] / "img", chains[2] / "img"
    assert sorted(p.name for p in ia.glob("*.png")) == sorted(p.name for p in ib.glob("*.png"))
    assert len(list(ib.glob("[0-9]*.png"))) == 70 and (ib / "grid.png").is_file()
    with np.load(ia / "samples.npz") as fa, np.load(ib / "samples.npz") as fb:
        assert fb["arr_0"].shape == fa["arr_0"].shape == (70, 64, 64, 3) and fb["arr_0"].dtype == np.uint8
        assert np.array_equal(fa["arr_1"], fb["arr_1"])
        # Pixels are truncated to uint8, so a value next to an integer may fall either side: 1 level.
        diff = np.abs(fa["arr_0"].astype(int) - fb["arr_0"].astype(int))
        assert diff.max() <= 1, diff.max()
