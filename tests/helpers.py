"""What the tests (and tests/tools/) share that is not a fixture: the repository root and thread count,
the real `rae` command line, deterministic random weights for a DiT, tiny artifacts made without
training (a store, a diffusion run), the demo chain's arguments, the kill at the k-th write, and
image-like test images. Test modules import from here, never from one another."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a log record says about the machine and the clock, not about training: left out where two
# runs' logs are compared.
TIMING_KEYS = ("img_per_s", "data_wait", "peak_mem_gib")
# One thread count for the whole run, in this process and in every `rae` subprocess, so that a result
# computed here and one computed by a subprocess come from the same kernels.
THREADS = os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402  (after OMP_NUM_THREADS is set)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight of a DiT random (adaLN-Zero layers included, so outputs are non-trivial), scaled by
    fan-in; the frozen position table and Fourier frequencies kept. Returns the model in eval mode."""
    import math

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in ("pos_embed", "t_embedder.W"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model.eval()


def run_rae(*args, env=None, check=True, nproc=None, timeout=600, fresh_process=False):
    """Run the real `rae` command line and return a CompletedProcess (returncode, stdout, stderr).

    By default the Typer app runs in this process (the same code as the console script, without
    the ~5 s of importing torch and timm again). A subprocess is used when the call needs its own
    environment (``env``: variables read at import time, such as HF_HUB_OFFLINE), its own process
    (``fresh_process``: e.g. to be killed), or torchrun (``nproc``: gloo processes on the CPU).
    """
    argv = [str(a) for a in args]
    if env is None and nproc is None and not fresh_process:
        proc = _run_in_process(argv)
    else:
        base = [sys.executable, "-m", "rae_cli.main"]
        if nproc:
            base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(29500 + os.getpid() % 1000), "-m", "rae_cli.main"]
        full_env = {**os.environ, "RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS, **(env or {})}
        proc = subprocess.run(base + argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"rae {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    from typer.testing import CliRunner

    from rae_cli.main import app

    cwd = os.getcwd()
    os.chdir(REPO)  # as the subprocess form runs
    try:
        result = CliRunner().invoke(app, argv, catch_exceptions=True)
    finally:
        os.chdir(cwd)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What the console script would have printed: the traceback of an uncaught exception.
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["rae", *argv], result.exit_code, result.stdout, stderr)


# ---- encode: a store of the demo images --------------------------------------------------------

def run_triton_interpreted(script: str) -> None:
    """Run ``script`` in a process of its own under Triton's CPU interpreter (Triton picks it when a kernel is
    defined, at import); it must print "checked" at its end."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": THREADS}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "checked" in proc.stdout, proc.stderr[-3000:]


def encode_config(data, out, **kw):
    """``rae encode``'s configuration at the demo encoder's smallest sizes, on the CPU."""
    from stages.encode import EncodeConfig

    base = dict(encoder="dinov2-demo", random_init=True, image_size=64, block_size=16, shard_size=8,
                batch_size=8, num_workers=0, device="cpu")
    base.update(kw)
    return EncodeConfig(data=str(data), out=str(out), **base)


def store_arrays(path):
    """Every array of a latent store, and its statistics: what two equal stores agree on."""
    from stages.artifacts.store import LatentStore

    s = LatentStore(path)
    mean, var = s.statistics()
    return {"latents": np.asarray(s.latents[:]), "labels": np.asarray(s.labels[:]), "valid": np.asarray(s.valid[:]),
            "flipped": np.asarray(s.flipped[:]), "source": np.asarray(s.source_index[:]), "mean": mean, "var": var}


# ---- sample: a tiny diffusion run --------------------------------------------------------------

LATENT = (8, 4, 4)
ENCODER = dict(name="dinov2-demo", weights_sha256="a" * 64, latent_shape=list(LATENT), pretrained=False)
TINY_DIT = dict(in_channels=8, input_size=4, patch_size=1, width=16, depth=1, num_heads=2, head_width=16,
                head_depth=1, head_num_heads=2, num_classes=3)


def make_diffusion_run(path, seed=0, encoder=ENCODER, **overrides):
    """A complete diffusion run (``stages.artifacts.runs``' format): a tiny DiT^DH with non-trivial random weights
    (adaLN-zero alone would give v = 0), config.json, statistics and manifest."""
    from stages.artifacts.checkpoint import save_weights
    from stages.artifacts.manifest import new_manifest, write_manifest
    from stages.artifacts.runs import diffusion_config, write_config
    from stages.models.dit import DiTDH

    torch.manual_seed(seed)
    kwargs = {**TINY_DIT, **overrides}
    model = DiTDH(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path.mkdir(parents=True)
    save_weights(path / "model_ema.safetensors", model.state_dict())
    save_weights(path / "model.safetensors", model.state_dict())
    stats = {"mean": torch.randn(LATENT), "var": torch.rand(LATENT) + 0.5}
    save_weights(path / "latent_stats.safetensors", stats)
    write_config(path, diffusion_config("DiTDH", kwargs, "tiny", LATENT, [], shift=2.0, encoder=encoder, image_size=16))
    write_manifest(path, new_manifest("diffusion-run", {}, encoder=encoder, latent_shape=list(LATENT),
                                      num_classes=kwargs["num_classes"], content_id=f"run-{seed}", step=1,
                                      class_names=["a", "b", "c"][: kwargs["num_classes"]], complete=True))
    return path


def sample_config(model, out, **kw):
    """``rae sample``'s configuration for a tiny run, on the CPU in float32."""
    from stages.sample import SampleConfig

    base = dict(num=10, steps=4, block_size=8, shard_size=4, batch_size=8, device="cpu", dtype="float32")
    base.update(kw)
    return SampleConfig(model=str(model), out=str(out), **base)


def store_latents(path):
    from stages.artifacts.store import LatentStore

    s = LatentStore(path)
    return np.asarray(s.latents[:])


# ---- the whole chain at its smallest sizes (the demo preset) -----------------------------------

ENCODE_ARGS = ["--preset", "demo", "--flip", "--block-size", 16, "--shard-size", 8, "--batch-size", 8,
               "--num-workers", 0, "--device", "cpu"]
DECODER_ARGS = ["--preset", "demo", "--steps", 6, "--batch-size", 8, "--lpips-start-step", 2,
                "--disc-start-step", 2, "--gan-start-step", 3, "--num-workers", 0, "--preview-every", 3,
                "--checkpoint-every", 3, "--log-every", 1]
DIFFUSION_ARGS = ["--preset", "demo", "--steps", 6, "--batch-size", 8, "--decay-end-step", 6, "--sample-every", 0,
                  "--num-samples", 2, "--sample-steps", 2, "--checkpoint-every", 3, "--log-every", 1]
SAMPLE_ARGS = ["--preset", "demo", "--per-class", 7, "--steps", 3]
DECODE_ARGS = ["--batch-size", 8]


# ---- kills at a write (test_end_windows, tools/fuzz_kills.py) ----------------------------------

def chain_stages(root: Path, images: Path) -> list[tuple[str, callable, str]]:
    """(name, argv for an output folder, what must be equal afterwards) in chain order."""
    lat = root / "ref" / "lat.zarr"
    dec, dit, smp = root / "ref" / "dec", root / "ref" / "dit", root / "ref" / "s.zarr"
    return [
        ("encode", lambda o: ["encode", images, "--out", o, "--preset", "demo", "--flip", "--block-size", 16,
                              "--shard-size", 8, "--num-workers", 0], "content_id"),
        ("train-decoder", lambda o: ["train-decoder", "--latents", lat, "--out", o, "--preset", "demo", "--steps", 4,
                                     "--batch-size", 8, "--lpips-start-step", 1, "--disc-start-step", 1,
                                     "--gan-start-step", 2, "--num-workers", 0, "--preview-every", 2,
                                     "--checkpoint-every", 2, "--log-every", 1], "content_id"),
        ("train-diffusion", lambda o: ["train-diffusion", "--latents", lat, "--out", o, "--preset", "demo", "--steps", 4,
                                       "--batch-size", 8, "--decay-end-step", 4, "--sample-every", 2,
                                       "--num-samples", 2, "--sample-steps", 2, "--checkpoint-every", 2,
                                       "--log-every", 1], "content_id"),
        ("sample", lambda o: ["sample", "--model", dit, "--out", o, "--preset", "demo", "--per-class", 7, "--steps", 2],
         "content_id"),
        ("decode", lambda o: ["decode", smp, "--decoder", dec, "--out", o, "--batch-size", 4], "npz"),
    ]


def fingerprint(out: Path, what: str):
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.get("complete"), f"{out} not complete"
    leftovers = [str(p) for p in out.rglob(".*tmp*")]
    assert not leftovers, f"temporary files left: {leftovers[:3]}"
    if what == "npz":
        with np.load(out / "samples.npz") as f:
            return f["arr_0"].tobytes(), f["arr_1"].tobytes()
    return manifest["content_id"]


class Killer:
    """Raises KeyboardInterrupt instead of the k-th os.replace (k from 1); counts them when k is None."""

    def __init__(self, k: int | None):
        self.k, self.calls, self.real = k, 0, os.replace

    def __call__(self, src, dst, *a, **kw):
        import threading

        # Zarr's own writes run on its event loop's threads ("asyncio_N"): an exception there would
        # stop that loop for the rest of this process (a real kill stops all threads at once), so
        # those are not counted; rae's own writes run on the main thread and its thread pools.
        if threading.current_thread().name.startswith("asyncio"):
            return self.real(src, dst, *a, **kw)
        self.calls += 1
        if self.k is not None and self.calls == self.k:
            raise KeyboardInterrupt(f"killed at write {self.k}: {dst}")
        return self.real(src, dst, *a, **kw)

    def __enter__(self):
        os.replace = self
        return self

    def __exit__(self, *exc):
        os.replace = self.real


# ---- eval: image-like images, and torch-fidelity's Inception file name -------------------------

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def write_folder(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def smooth_images(n, size, seed, brightness=0):
    """Blurry colour blobs (more image-like than white noise), uint8 N x H x W x 3."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (n, 4, 4, 3))
    x = torch.nn.functional.interpolate(torch.from_numpy(low).permute(0, 3, 1, 2), size=(size, size),
                                        mode="bicubic", align_corners=False)
    return (x.permute(0, 2, 3, 1).numpy() + brightness).clip(0, 255).astype(np.uint8)


DECODER = dict(in_dim=8, grid=4, patch_size=4, width=16, depth=1, heads=2, mlp_dim=32)


def make_decoder_run(path, encoder=ENCODER, seed=0):
    """A complete decoder run (``stages.artifacts.runs``' format): a tiny ViTDecoder (latents [8, 4, 4]
    -> 16x16 images) with seeded random weights."""
    import json

    from stages.artifacts.checkpoint import save_weights
    from stages.artifacts.manifest import new_manifest, write_manifest
    from stages.models.decoder import ViTDecoder

    torch.manual_seed(seed)
    decoder = ViTDecoder(**DECODER)
    path.mkdir(parents=True)
    save_weights(path / "decoder_ema.safetensors", decoder.state_dict())
    config = {"decoder": {"size": "tiny", "kwargs": DECODER}, "encoder": encoder, "latent_shape": list(LATENT),
              "image_size": 16}
    (path / "config.json").write_text(json.dumps(config))
    write_manifest(path, new_manifest("decoder-run", {}, encoder=encoder, latent_shape=list(LATENT),
                                      content_id=f"dec-{seed}", complete=True))
    return path


def tree_snapshot(path: Path) -> dict:
    """Every file under ``path`` (or ``path`` itself) with its size and modification time: what an
    input must keep when a command is refused."""
    path = Path(path)
    if path.is_file():
        return {"": (path.stat().st_size, path.stat().st_mtime_ns)}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file()}
