"""rae crop: the ADM center crops `rae encode` encodes, as a rae image folder numbered like the store's
entries, so reconstructions and originals are scored pair by pair on the same crops."""
import numpy as np
import pytest
from PIL import Image

from stages.artifacts.images import list_images
from stages.artifacts.manifest import read_manifest
from stages.artifacts.store import LatentStore
from stages.encode import _LoadChunk
from tests.helpers import ENCODE_ARGS, run_rae


@pytest.fixture(scope="module")
def folder(demo_images, tmp_path_factory):
    """The demo images plus one file that is not an image (skipped by both commands)."""
    import shutil

    root = tmp_path_factory.mktemp("crop") / "images"
    shutil.copytree(demo_images, root)
    (root / sorted(p.name for p in root.iterdir())[1] / "broken.png").write_bytes(b"not an image")
    return root


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("size", [64, 48])
def test_crops_equal_what_rae_encode_encodes(folder, tmp_path, size):
    out = tmp_path / "crops"
    run_rae("crop", folder, "--out", out, "--image-size", size, "--num-workers", 0)
    listing = list_images(folder)
    ids = list(range(len(listing.files)))
    buf = np.empty(len(ids) * size * size * 3 + 1024, np.uint8)
    (layout, ok, _), _ = _LoadChunk(listing.root, listing.files, size, 16)(ids, buf)
    encoded = buf[: np.prod(layout)].reshape(layout)
    written = sorted(p.name for p in out.glob("[0-9]*.png"))
    assert written == [f"{i:06d}.png" for i in ids if ok[i]] and not ok.all()
    for i in ids:
        if ok[i]:
            assert np.array_equal(_png(out / f"{i:06d}.png"), encoded[i])
    with np.load(out / "samples.npz") as z:
        assert np.array_equal(z["arr_0"], np.stack([encoded[i] for i in ids if ok[i]]))
        assert np.array_equal(z["arr_1"], np.asarray(listing.labels)[ok])
    m = read_manifest(out, kind="image-folder")
    assert m["num_images"] == ok.sum() and m["skipped_files"][0][0].endswith("broken.png")


def test_numbering_matches_the_store_and_pairs_without_warning(folder, tmp_path):
    run_rae("crop", folder, "--out", tmp_path / "crops", "--image-size", 64)
    args = [a for a in ENCODE_ARGS if a != "--flip"]
    run_rae("encode", folder, "--out", tmp_path / "s.zarr", *args)
    valid = LatentStore(tmp_path / "s.zarr").valid_indices()
    assert sorted(p.name for p in (tmp_path / "crops").glob("[0-9]*.png")) == [f"{i:06d}.png" for i in valid]
    # Scoring the crops against themselves as pairs: rae folders on both sides, so no name warning.
    proc = run_rae("eval", tmp_path / "crops", "--ref", tmp_path / "crops", "--pairs", "--metrics", "lpips",
                   "--offline", "--num-workers", 0, "--out", tmp_path / "e.json")
    assert "file names differ" not in proc.stderr


def test_a_rerun_resumes_and_a_changed_size_is_refused(folder, tmp_path):
    out = tmp_path / "crops"
    run_rae("crop", folder, "--out", out, "--image-size", 64)
    first = sorted(out.glob("[0-9]*.png"))[3]
    first.unlink()
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace('"complete": true',
                                                                                    '"complete": false'))
    run_rae("crop", folder, "--out", out, "--image-size", 64)
    assert first.is_file() and read_manifest(out)["complete"]
    proc = run_rae("crop", folder, "--out", out, "--image-size", 32, check=False)
    assert proc.returncode == 1 and "--image-size 64 there, 32 here" in proc.stderr
    proc = run_rae("crop", folder, "--out", folder / "crops", check=False)
    assert proc.returncode == 1 and "lies inside the input IMAGES" in proc.stderr
