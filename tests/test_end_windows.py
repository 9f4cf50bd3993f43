"""Every stage killed at each of its last writes (the end window: final checkpoint, weights, plots,
manifest, block records, staging renames) and run again ends as the uninterrupted run: the same
content id (the same PNGs and .npz for decode), no temporary file left. The kill is the one of
`make fuzz` (tests/tools/fuzz_kills.py), which does the same at every write of every stage."""
from __future__ import annotations

import shutil

import pytest

from tests.helpers import Killer, chain_stages, fingerprint, run_rae

pytestmark = pytest.mark.chain

LAST_WRITES = 4
OUTPUT = {"encode": "lat.zarr", "train-decoder": "dec", "train-diffusion": "dit", "sample": "s.zarr", "decode": "img"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The uninterrupted chain: each stage's fingerprint and its number of writes."""
    from stages.demo.data import generate

    root = tmp_path_factory.mktemp("windows")
    images = generate(root / "images", per_class=2, size=64, seed=0)
    (root / "ref").mkdir()
    done = {}
    for name, argv, what in chain_stages(root, images):
        with Killer(None) as count:
            run_rae(*argv(root / "ref" / OUTPUT[name]))
        done[name] = (argv, what, fingerprint(root / "ref" / OUTPUT[name], what), count.calls)
    return root, done


@pytest.mark.parametrize("from_end", range(LAST_WRITES))
@pytest.mark.parametrize("name", list(OUTPUT))
def test_a_kill_at_each_of_the_last_writes_resumes_to_the_same_result(chain, name, from_end):
    root, done = chain
    argv, what, expected, writes = done[name]
    k = writes - from_end
    out = root / f"{name}-{k}"
    with Killer(k):
        killed = run_rae(*argv(out), check=False)
    assert killed.returncode != 0, f"write {k} of {writes} was not reached"
    run_rae(*argv(out))
    assert fingerprint(out, what) == expected
    shutil.rmtree(out)
