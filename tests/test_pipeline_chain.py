"""The whole chain through the real command line, at the smallest sizes, as `make all` runs it (each
stage reads the previous stage's artifacts from disk), once in one process and once with every stage
under 2 processes (torchrun, gloo, CPU): the stores, weights, logged losses, samples and images of
the two are identical, bit for bit. The 2-process run is two simulated machines (two torchrun
launches of one process each, c10d rendezvous on localhost, one shared filesystem).

Identical by construction, not by tolerance: the single-process chain trains with ``--grad-accum 2``,
so its micro-batch k computes exactly what rank k computes (same samples, same shapes, same noise,
DiffAug and spectral-norm state, same kernels at the same thread count); the two micro-batches'
gradients, the adaptive GAN weight's last-layer gradients and the logged values are then summed
once, a + b, as gloo's all-reduce of two ranks sums them, and halved (exact for powers of two).
Encoding, sampling and decoding split their work by blocks and chunks that are the same in both
runs. So no floating-point tolerance is needed, whatever the CPU, its vector instructions or the
thread count; any real bug (a wrong batch split, a per-rank seed, a missing all-reduce) shows up
as a difference.

Sizes: the demo preset, 40 images of 64 px (80 entries with --flip), 6 training steps of 8. The
sample run draws 70 samples with the demo preset's blocks of 64, so the second rank gets a real
block (ranks take alternate blocks: 0-63 on rank 0, 64-69 on rank 1); decode's chunks of 64 split
the same way. Each simulated machine runs the whole chain in one launch (tests/tools/torchrun_chain.py)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.artifacts.manifest import read_manifest
from stages.artifacts.store import LatentStore
from tests.helpers import (DECODE_ARGS, DECODER_ARGS, DIFFUSION_ARGS, ENCODE_ARGS, REPO, SAMPLE_ARGS, THREADS,
                           TIMING_KEYS, run_rae)

pytestmark = pytest.mark.chain


def _chain(images, o, accum: list) -> list[list]:
    return [["encode", images, "--out", o / "lat.zarr", *ENCODE_ARGS],
            ["train-decoder", "--latents", o / "lat.zarr", "--out", o / "dec", *DECODER_ARGS, *accum],
            ["train-diffusion", "--latents", o / "lat.zarr", "--out", o / "dit", *DIFFUSION_ARGS, *accum],
            ["sample", "--model", o / "dit", "--out", o / "s.zarr", *SAMPLE_ARGS],
            ["decode", o / "s.zarr", "--decoder", o / "dec", "--out", o / "img", *DECODE_ARGS]]


@pytest.fixture(scope="module")
def chains(demo_images, tmp_path_factory):
    """{1: run folder, 2: run folder}: store, decoder, diffusion model, samples and images."""
    root = tmp_path_factory.mktemp("chains")
    one, two = root / "p1", root / "p2"
    for argv in _chain(demo_images, one, ["--grad-accum", 2]):
        run_rae(*argv)
    spec = root / "chain.json"
    spec.write_text(json.dumps([[str(a) for a in argv] for argv in _chain(demo_images, two, [])]))
    # Two simulated machines: two torchrun launches of one process each, meeting through a c10d
    # rendezvous on localhost, sharing the filesystem (the store and run folders), as on a cluster.
    env = {**os.environ, "RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_id", "rae-test",
                               "--rdzv_endpoint", f"127.0.0.1:{port}",
                               str(REPO / "tests" / "tools" / "torchrun_chain.py"), str(spec)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    for node in nodes:
        out, _ = node.communicate(timeout=900)
        assert node.returncode == 0, out[-5000:]
    return {1: one, 2: two}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_same_weights(one, two, names):
    for name in names:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name} {k}: max difference {(a[k] - b[k]).abs().max().item():.3g}"


def _assert_same_losses(one, two):
    """Every logged value of every step (losses, lambda, D's statistics, gradient norms, learning
    rates; not the speed)."""
    ra, rb = _metrics(one), _metrics(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 7))
    for a, b in zip(ra, rb):
        assert a.keys() == b.keys(), a["step"]
        assert ({k: a[k] for k in a if k not in TIMING_KEYS} == {k: b[k] for k in b if k not in TIMING_KEYS}), a["step"]


def _arrays(path):
    store = LatentStore(path)
    return {k: np.asarray(store.group[k][:]) for k in store.group.array_keys()}


def test_encode_two_processes_equal_one_bit_for_bit(chains):
    a, b = _arrays(chains[1] / "lat.zarr"), _arrays(chains[2] / "lat.zarr")
    assert a.keys() == b.keys() and len(a["latents"]) == 80
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert read_manifest(chains[1] / "lat.zarr")["content_id"] == read_manifest(chains[2] / "lat.zarr")["content_id"]


def test_train_decoder_two_processes_equal_one_with_accumulation(chains):
    one, two = chains[1] / "dec", chains[2] / "dec"
    _assert_same_weights(one, two, ("decoder.safetensors", "decoder_ema.safetensors"))
    _assert_same_losses(one, two)
    records = _metrics(one)
    # Every part of the step ran: LPIPS, D updates and the GAN term with its adaptive weight.
    assert {"lpips", "d_loss", "gan", "lambda"} <= records[-1].keys() and records[-1]["lambda"] > 0
    assert records[0]["l1"] != records[-1]["l1"]


def test_train_diffusion_two_processes_equal_one_with_accumulation(chains):
    one, two = chains[1] / "dit", chains[2] / "dit"
    _assert_same_weights(one, two, ("model.safetensors", "model_ema.safetensors"))
    _assert_same_losses(one, two)
    first = _metrics(one)
    assert first[0]["loss"] != first[-1]["loss"]  # the weights moved


def test_sample_two_processes_equal_one(chains):
    a, b = LatentStore(chains[1] / "s.zarr"), LatentStore(chains[2] / "s.zarr")
    assert np.array_equal(a.labels[:], b.labels[:]) and np.array_equal(a.group["seeds"][:], b.group["seeds"][:])
    assert sorted(np.asarray(a.labels[:]).tolist()) == sorted(list(range(10)) * 7)
    la, lb = np.asarray(a.latents[:]), np.asarray(b.latents[:])
    assert la.shape == lb.shape == (70, 96, 4, 4) and np.isfinite(la).all()
    # Both ranks' blocks were written (rank 1's block 64-69 is not left at zero).
    assert (np.abs(lb.astype(np.float32)).reshape(70, -1).max(axis=1) > 0).all()
    np.testing.assert_array_equal(lb, la)


def test_chain_outputs_evaluate_and_finished_stages_are_reused(chains, demo_images):
    o = chains[1]
    with np.load(o / "img" / "samples.npz") as f:
        assert f["arr_0"].shape == (70, 64, 64, 3) and f["arr_0"].dtype == np.uint8
        assert sorted(f["arr_1"].tolist()) == sorted(list(range(10)) * 7)
    assert (o / "img" / "grid.png").is_file() and (o / "dec" / "reconstructions.png").is_file()
    run_rae("eval", o / "img", "--ref", demo_images, "--fd-encoder", o / "lat.zarr", "--offline",
            "--metrics", "fd_dinov2", "--device", "cpu", "--num-workers", "0")
    result = json.loads((o / "img" / "eval.json").read_text())
    assert np.isfinite(result["metrics"]["fd_rae"]) and result["metrics"]["fd_rae"] > 0
    # Tied to what it scored: the decode folder's content id and its listing.
    from stages.eval.evaluate import ImageSet

    assert result["images"]["content_id"] == read_manifest(o / "img")["content_id"]
    assert result["images"]["listing_sha256"] == ImageSet(o / "img").listing_sha256()
    # Running a finished stage again reuses it.
    again = run_rae("sample", "--model", o / "dit", "--out", o / "s.zarr", *SAMPLE_ARGS)
    assert "already complete" in " ".join((again.stdout + again.stderr).split())


def test_decode_two_processes_equal_one(chains):
    ia, ib = chains[1] / "img", chains[2] / "img"
    assert sorted(p.name for p in ia.glob("*.png")) == sorted(p.name for p in ib.glob("*.png"))
    assert len(list(ib.glob("[0-9]*.png"))) == 70 and (ib / "grid.png").is_file()
    for name in ("000000.png", "000069.png"):
        assert (ia / name).read_bytes() == (ib / name).read_bytes(), name
    with np.load(ia / "samples.npz") as fa, np.load(ib / "samples.npz") as fb:
        assert fb["arr_0"].shape == fa["arr_0"].shape == (70, 64, 64, 3) and fb["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(fa["arr_0"], fb["arr_0"])
        np.testing.assert_array_equal(fa["arr_1"], fb["arr_1"])
