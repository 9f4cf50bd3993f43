"""Fixtures, and the environment every test runs in; shared functions are in tests/helpers.py."""
import os

import pytest

os.environ.setdefault("RAE_NO_PROGRESS", "1")
# One thread count for the whole run (OMP_NUM_THREADS=2, see tests/tools/portability_sweep.sh, runs
# everything with two), set before torch is imported.
from tests.helpers import THREADS  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(int(THREADS))


def pytest_configure(config):
    config.addinivalue_line("markers", "chain: runs the whole pipeline, stage after stage, through the command line "
                                       "(`pytest -m 'not chain'` for the unit tests alone)")


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    from stages.demo.data import generate

    return generate(tmp_path_factory.mktemp("demo") / "images", per_class=4, size=64, seed=0)
