"""`rae eval` inputs it must refuse before scoring: a corrupt .npz, an empty one, reference
statistics of another dimension — one line each, through the command line too."""
import numpy as np
import pytest

from stages.errors import ArtifactError
from stages.eval.inputs import ImageSet, save_adm_npz
from stages.eval.refs import load_ref_stats
from tests.helpers import run_rae


def _images(n=6, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_an_npz_with_flipped_pixel_bytes_is_refused_by_its_checksum(tmp_path):
    path = tmp_path / "s.npz"
    save_adm_npz(path, _images())
    assert len(ImageSet(path)) == 6  # intact: read as before
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55  # a pixel byte in the middle of arr_0
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum") as info:
        ImageSet(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    proc = run_rae("eval", path, "--offline", "--metrics", "fid", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "checksum" in proc.stderr


def test_an_npz_without_images_is_refused(tmp_path):
    path = tmp_path / "empty.npz"
    save_adm_npz(path, np.zeros((0, 16, 16, 3), np.uint8))
    with pytest.raises(ArtifactError, match="no images"):
        ImageSet(path)
    # Through the command line: refused in one line before scoring, and no eval.json written where
    # --out says it goes (nothing at all beside the input).
    out = tmp_path / "empty.eval.json"
    proc = run_rae("eval", path, "--out", out, "--offline", "--metrics", "fid", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no images" in lines[0] and str(path) in lines[0], proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty.npz"]


def test_reference_statistics_of_another_dimension_are_refused_before_any_feature_pass(tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(64), sigma=np.eye(64))
    assert load_ref_stats(ref).mu.shape == (64,)  # a readable file ...
    images = tmp_path / "s.npz"
    save_adm_npz(images, _images())
    # ... refused for FID before Inception is even looked for (--offline, no weights here).
    proc = run_rae("eval", images, "--ref", ref, "--offline", "--metrics", "fid", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "2048" in lines[0] and str(ref) in lines[0], proc.stderr


def test_without_network_missing_weights_are_named_at_once_without_download_attempts(tmp_path, monkeypatch):
    """No --offline, no cached file, no network: the one-line error comes from a connection probe,
    not after the downloaders' retries (the download function is never entered)."""
    import torch

    import stages.eval.nets as ev
    from stages.models.weights import MissingWeightsError, reachable

    assert reachable("https://rae-test.invalid/file", timeout=1.0) is False  # a name that never resolves
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(ev, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not try to download"))
    with pytest.raises(MissingWeightsError, match="Inception weights not found") as info:
        ev.load_inception(None, offline=False)
    assert "\n" not in str(info.value)
