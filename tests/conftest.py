import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

os.environ.setdefault("RAE_NO_PROGRESS", "1")
# One thread count for the whole run, in this process and in every `rae` subprocess, so that a result
# computed here and one computed by a subprocess come from the same kernels. OMP_NUM_THREADS=2 (see
# tests/portability_sweep.sh) runs everything with two.
THREADS = os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

torch.set_num_threads(int(THREADS))


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


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    from stages.demo_data import generate

    return generate(tmp_path_factory.mktemp("demo") / "images", per_class=4, size=64, seed=0)
