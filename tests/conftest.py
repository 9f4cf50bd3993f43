import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAE_NO_PROGRESS", "1")
REPO = Path(__file__).resolve().parents[1]


def run_rae(*args, env=None, check=True, nproc=None, timeout=600):
    """Run the real `rae` command line (optionally under torchrun with gloo) in a subprocess."""
    base = [sys.executable, "-m", "rae_cli.main"]
    if nproc:
        base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 1000), "-m", "rae_cli.main"]
    full_env = {**os.environ, "RAE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(base + [str(a) for a in args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"rae {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    from stages.demo_data import generate

    return generate(tmp_path_factory.mktemp("demo") / "images", per_class=4, size=64, seed=0)
